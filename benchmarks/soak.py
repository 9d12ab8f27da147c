"""A soak of `mnistlab serve`: many predictions, mixed as a classroom would send them, to see that the server
does not grow, leak file descriptors or lose preprocessing processes.

A real `mnistlab serve` (its defaults: the bundled model, uploads prepared in one process per core) on a free
loopback port, and CLIENTS threads in this process, each on a keep-alive connection of its own, sending
REQUESTS posts to /api/predict in all: canvas drawings as the page sends them (tests/support/drawings.py),
photos of MNIST test digits on paper and chalk on a board (tests/support/digit_images.py), and bad bodies
(text, empty, truncated PNGs, malformed JSON and data URLs). Every answer is checked: 200 for an image, a 4xx
for a bad body. Recorded: the server's resident memory after the warm-up (the first tenth, at most 2,000
requests) and at the end (and its preprocessing processes'), its open file descriptors (/proc/PID/fd) before
the first request and after the last connection closed, and the preprocessing-process restarts from
GET /metrics. Growth of the server's memory after the warm-up must stay within 5%.

The figures go into the "soak" section of docs/serving.md (`--doc` for another file):
.venv/bin/python benchmarks/soak.py                   # 50,000 requests, a few minutes
.venv/bin/python benchmarks/soak.py --requests 300    # a quick check that it works
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from common import ROOT, machine, others_while, write_section
from prometheus_client.parser import text_string_to_metric_families

from mnistlab.data.idx import read_images
from tests.support.digit_images import light_on_dark, on_paper
from tests.support.drawings import STROKES, drawing, png_bytes
from tests.support.mnist import mnist_dir

BOUNDARY = "mnistlabsoak"
GROWTH_LIMIT = 0.05


def multipart(data: bytes, media: str) -> tuple[bytes, str]:
    body = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="upload"\r\n'
        f"Content-Type: {media}\r\n\r\n".encode()
        + data
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={BOUNDARY}"


def jpeg(image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def payloads() -> list[tuple[str, bytes, str, bool]]:
    """(kind, body, content type, whether it is an image the server must classify) for one cycle of the mix:
    of every 8 requests, 5 canvas drawings, 2 photos and 1 bad body; 40 requests, each payload at least once."""
    folder = mnist_dir()
    if folder is None:
        sys.exit("soak.py needs the real MNIST test digits: set MNISTLAB_DATA (see CONTRIBUTING.md)")
    digits = read_images(folder / "t10k-images-idx3-ubyte.gz")[:10]
    canvases = [png_bytes(drawing(STROKES[d], size)) for d in STROKES for size in (280, 200)]
    papers = [jpeg(on_paper(digit, seed=i)) for i, digit in enumerate(digits[:7])]
    chalk = [png_bytes(light_on_dark(digit, seed=i)) for i, digit in enumerate(digits[7:])]
    as_json = papers.pop(), chalk.pop()
    drawings = [("canvas", *multipart(png, "image/png"), True) for png in canvases]
    photos = [("photo", *multipart(p, "image/jpeg"), True) for p in papers]
    photos += [("photo", *multipart(p, "image/png"), True) for p in chalk]
    for data, media in zip(as_json, ("image/jpeg", "image/png")):
        url = f"data:{media};base64," + base64.b64encode(data).decode()
        photos.append(("photo", json.dumps({"image": url}).encode(), "application/json", True))
    bad = [
        ("bad", b"just some text", "text/plain", False),
        ("bad", b"", "application/json", False),
        ("bad", *multipart(canvases[0][:200], "image/png"), False),  # a truncated PNG
        ("bad", b'{"image": "data:image/png;base64,@@@"}', "application/json", False),
        ("bad", b'{"image": ', "application/json", False),
    ]
    pattern = "cpccbcpc"  # 5 canvas drawings, 2 photos, 1 bad body
    queues = {"c": itertools.cycle(drawings), "p": iter(photos), "b": iter(bad)}
    return [next(queues[kind]) for _ in range(5) for kind in pattern]


# ---------------------------------------------------------------------------------------------- the server


def tree(pid: int) -> list[int]:
    """A process and its descendants."""
    children = [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
    return [pid, *itertools.chain.from_iterable(tree(c) for c in children)]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def settled_fds(pid: int) -> int:
    """Open descriptors once the server has closed the connections its clients closed (a moment after)."""
    counts = [open_fds(pid)]
    while len(counts) < 50 and counts[-3:] != [counts[-1]] * 3:
        time.sleep(0.1)
        counts.append(open_fds(pid))
    return counts[-1]


def restarts(url: str) -> float:
    """The server's preprocessing-process restarts, from GET /metrics."""
    host, port = url.split("/")[2].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "mnistlab_preprocessing_restarts_total":
                return sample.value
    raise SystemExit("GET /metrics has no mnistlab_preprocessing_restarts_total")


# ---------------------------------------------------------------------------------------------- the load


class Load:
    """Client threads sending the mix, answers checked."""

    def __init__(self, url: str, mix: list[tuple[str, bytes, str, bool]]):
        self.host, port = url.split("/")[2].split(":")
        self.port, self.mix = int(port), mix
        self.next = itertools.count()
        self.lock = threading.Lock()
        self.statuses: Counter = Counter()  # (kind, status)
        self.unexpected: list[str] = []
        self.latencies: list[float] = []

    def run(self, clients: int, start: int, stop: int) -> None:
        """Requests number `start` to `stop` (exclusive), shared among `clients` threads."""
        self.next = itertools.count(start)
        threads = [threading.Thread(target=self._client, args=(stop,)) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _client(self, stop: int) -> None:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            while (i := next(self.next)) < stop:
                kind, body, media, image = self.mix[i % len(self.mix)]
                begin = time.perf_counter()
                try:
                    connection.request("POST", "/api/predict", body, {"Content-Type": media})
                    answer = connection.getresponse()
                    answer.read()
                    status: int | str = answer.status
                    closing = answer.getheader("connection", "").lower() == "close"
                except (OSError, http.client.HTTPException) as exc:
                    status, closing = type(exc).__name__, True
                expected = status == 200 if image else isinstance(status, int) and 400 <= status < 500
                with self.lock:
                    self.latencies.append(time.perf_counter() - begin)
                    self.statuses[(kind, status)] += 1
                    if not expected:
                        self.unexpected.append(f"{kind} #{i}: {status}")
                if closing:
                    connection = self._reconnect(connection)
        finally:
            connection.close()

    def _reconnect(self, connection: http.client.HTTPConnection) -> http.client.HTTPConnection:
        connection.close()
        return http.client.HTTPConnection(self.host, self.port, timeout=60)


def soak(requests: int, clients: int) -> dict:
    """Start a server, send the load, and measure it."""
    mix = payloads()
    with tempfile.TemporaryFile("w+") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mnistlab", "serve", "--port", "0", "--device", "cpu"],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            cwd=ROOT,
        )
        try:
            line = server.stdout.readline()
            if " at http://" not in line:
                server.wait(timeout=60)
                log.seek(0)
                raise SystemExit(f"the server did not start: {line}{log.read()}")
            figures = measure(server.pid, line.split(" at ")[1].split()[0], mix, requests, clients)
        finally:
            server.terminate()
            server.wait(timeout=60)
        log.seek(0)
        figures["server_errors"] = [line for line in log.read().splitlines() if "Traceback" in line or "ERROR" in line]
    return figures


def measure(pid: int, url: str, mix: list, requests: int, clients: int) -> dict:
    """The load against the server at `url` (process `pid`), with its memory, descriptors and restarts."""
    fds_start, restarts_start = open_fds(pid), restarts(url)
    load = Load(url, mix)
    warmup = min(2000, max(1, requests // 10))
    begin = time.perf_counter()
    load.run(clients, 0, warmup)
    seconds = time.perf_counter() - begin
    warm, fds_warm = {p: rss_mb(p) for p in tree(pid)}, settled_fds(pid)
    begin = time.perf_counter()
    load.run(clients, warmup, requests)
    seconds += time.perf_counter() - begin
    end, fds_end = {p: rss_mb(p) for p in tree(pid)}, settled_fds(pid)
    latencies = sorted(load.latencies)
    return {
        "requests": sum(load.statuses.values()),
        "clients": clients,
        "warmup": warmup,
        "seconds": round(seconds, 1),
        "per_second": round(requests / seconds, 1),
        "p50_ms": round(1000 * statistics.median(latencies), 1),
        "p99_ms": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 1),
        "statuses": {f"{kind} {status}": n for (kind, status), n in sorted(load.statuses.items(), key=str)},
        "unexpected": len(load.unexpected),
        "first_unexpected": load.unexpected[:5],
        "rss_warm_mb": round(warm[pid], 1),
        "rss_end_mb": round(end[pid], 1),
        "growth": round(end[pid] / warm[pid] - 1, 4),
        "workers_rss_warm_mb": round(sum(v for p, v in warm.items() if p != pid), 1),
        "workers_rss_end_mb": round(sum(v for p, v in end.items() if p != pid), 1),
        "fds_start": fds_start,
        "fds_warm": fds_warm,
        "fds_end": fds_end,
        "restarts": restarts(url) - restarts_start,
    }


def section(figures: dict, command: str) -> str:
    met = {True: "met", False: "not met"}
    statuses = ", ".join(f"{k}: {v:,}" for k, v in figures["statuses"].items())
    server = f"{figures['rss_warm_mb']:.1f} | {figures['rss_end_mb']:.1f} ({100 * figures['growth']:+.1f}%)"
    workers = f"{figures['workers_rss_warm_mb']:.1f} | {figures['workers_rss_end_mb']:.1f}"
    others = figures["others_cpu_seconds"] / max(1, figures["wall_seconds"])
    return f"""### Soak: {figures["requests"]:,} predictions

Command: `{command}`
Machine: {machine()}
Other processes on the machine while it ran (its cores' busy time less this benchmark's):
{figures["others_cpu_seconds"]:,} CPU s in {figures["wall_seconds"]:,} s ({others:.2f} of {os.cpu_count()} cores);
the rate and latencies depend on that, the memory, file-descriptor and restart figures do not.

{figures["clients"]} client threads on keep-alive connections sent {figures["requests"]:,} posts to `/api/predict`
against `mnistlab serve --device cpu` (defaults otherwise) on loopback in {figures["seconds"]:,.0f} s
({figures["per_second"]:.0f}/s, p50 {figures["p50_ms"]:.0f} ms, p99 {figures["p99_ms"]:.0f} ms): of every 8,
5 canvas drawings, 2 photos (MNIST test digits on paper as JPEGs, chalk on a board as PNGs, a few as JSON data
URLs) and 1 bad body (text, empty, a truncated PNG, bad base64, broken JSON). Answers by kind and status:
{statuses}; unexpected answers: {figures["unexpected"]}.

| resident memory (MB) | after the warm-up ({figures["warmup"]:,} requests) | at the end |
|---|---|---|
| the server | {server} |
| its preprocessing processes, together | {workers} |

Open file descriptors of the server: {figures["fds_start"]} before the first request, {figures["fds_warm"]} after
the warm-up (its connections closed; the first requests open an epoll, an io_uring, an eventfd, pipes and a
socket pair and /dev/null, once, and keep them), {figures["fds_end"]} after the last
connection closed. Preprocessing-process restarts (from `/metrics`): {figures["restarts"]:g}.

Memory growth within {100 * GROWTH_LIMIT:.0f}% after the warm-up: {met[figures["growth"] <= GROWTH_LIMIT]};
descriptors back to their count after the warm-up: {met[figures["fds_end"] <= figures["fds_warm"]]}; no
restarts: {met[figures["restarts"] == 0]}.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=50_000, help="posts to send in all")
    parser.add_argument("--clients", type=int, default=4, help="client threads, each on its own connection")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "serving.md", help="where to write the figures")
    args = parser.parse_args()
    if args.requests < 1 or args.clients < 1:
        parser.error("--requests and --clients must be 1 or more")
    figures, elsewhere, seconds = others_while(lambda: soak(args.requests, args.clients))
    figures["others_cpu_seconds"], figures["wall_seconds"] = round(elsewhere), round(seconds)
    options = "" if args.requests == 50_000 else f" --requests {args.requests}"
    options += "" if args.clients == 4 else f" --clients {args.clients}"
    write_section("soak", section(figures, f".venv/bin/python benchmarks/soak.py{options}"), args.doc)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
