"""Do predictions keep flowing while the lab trains? One person drawing on the page of a real `mnistlab serve`
(the bundled model, its default engine, a lab over a temporary --runs folder), in three phases:

1. idle: no training;
2. lab: cnn-fast started through the lab (`POST /api/runs`), in the training process the lab runs;
3. plain: the same training as `mnistlab train --config cnn-fast` beside the server, at normal priority with
   PyTorch's default threads: what the lab's way of running it buys.

The drawing person is one keep-alive connection that posts the page's canvas drawing (a 1, a 7 and a 0 in turn,
as multipart, as static/app.js does) to /api/predict, as the page asks while a stroke changes: one request in
flight, the next sent once the answer is in and no sooner than 80 ms after the previous one. Each phase counts
REQUESTS answers (each checked: status 200, the drawn digit) and, during the trainings, the training's images a
second, from its progress events (each timed as it arrives; images within an epoch only, so the evaluation
between epochs is left out). The trainings start first and are measured once their first progress event is in.
All of it once as this machine runs it and once with PyTorch and oneDNN held to AVX2 (the server and both
trainings); the figures go into docs/lab.md ("Serving while training"), with the command and the CPU.

Run with nothing else busy on the machine (the server, the training and the drawing share its cores):
.venv/bin/python benchmarks/lab_load.py
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from common import AVX2, ROOT, machine, others_while, write_section
from web_speed import BOUNDARY, multipart

from mnistlab.devices import cpu_model
from tests.support.drawings import drawn_png

CONFIG = "cnn-fast"
EPOCHS = 40  # far more than a phase lasts (an epoch takes seconds): each training is stopped when its phase ends
INTERVAL = 0.08  # static/app.js's INTERVAL: the page sends a drawing no sooner than this after the previous one
DIGITS = "170"
GOAL_MS = 150.0


class Drawing:
    """One person drawing: the page's requests on one keep-alive connection, one in flight at a time."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        self.bodies = [(int(digit), multipart(drawn_png(digit))) for digit in DIGITS]
        self.headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}

    def draw(self, requests: int) -> list[float]:
        """Seconds from sending each request to having read its answer."""
        # The server closes a connection idle for a few seconds (uvicorn: 5 s), as between phases; a browser then
        # opens a new one, and so does this, before the first request rather than after a failed one.
        self.connection.close()
        latencies = []
        for n in range(requests):
            digit, body = self.bodies[n % len(self.bodies)]
            sent = time.perf_counter()
            self.connection.request("POST", "/api/predict", body, self.headers)
            response = self.connection.getresponse()
            answer = response.read()
            latencies.append(time.perf_counter() - sent)
            if response.status != 200 or json.loads(answer)["predictions"][0]["label"] != digit:
                raise RuntimeError(f"/api/predict answered {response.status} for a {digit}: {answer[:300]!r}")
            time.sleep(max(0.0, sent + INTERVAL - time.perf_counter()))
        return latencies


def call(url: str, method: str, path: str, body: dict | None = None) -> dict:
    """One JSON request to the server; its answer, or an error naming the status and the server's detail."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        payload = None if body is None else json.dumps(body)
        connection.request(method, path, payload, {"Content-Type": "application/json"} if payload else {})
        response = connection.getresponse()
        answer = response.read()
    finally:
        connection.close()
    if response.status >= 300:
        raise RuntimeError(f"{method} {path} answered {response.status}: {answer[:300]!r}")
    return json.loads(answer)


def server_sent(url: str, path: str) -> Iterator[tuple[str, dict]]:
    """The (event, data) pairs of a Server-Sent Events stream, until it closes."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    connection.request("GET", path, headers={"Accept": "text/event-stream"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"GET {path} answered {response.status}: {response.read()[:300]!r}")
    event, data = "message", []
    try:
        while line := response.readline():
            line = line.decode().rstrip("\r\n")
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
            elif not line and data:
                yield event, json.loads("\n".join(data))
                event, data = "message", []
    finally:
        connection.close()


class Watcher:
    """A training's progress events, each with the time it arrived, read in a thread of its own."""

    def __init__(self, events: Iterator[tuple[str, dict]]):
        self.progress: list[tuple[float, dict]] = []
        self.last: tuple[str, dict] | None = None
        self.thread = threading.Thread(target=self._read, args=(events,), daemon=True)
        self.thread.start()

    def _read(self, events: Iterator[tuple[str, dict]]) -> None:
        for event, data in events:
            if event == "progress":
                self.progress.append((time.perf_counter(), data))
            self.last = (event, data)

    def wait_for_progress(self, seconds: float = 180) -> None:
        """Until the training has reported training images (past loading its data and building its model)."""
        deadline = time.monotonic() + seconds
        while not self.progress:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the training reported no progress (its last event: {self.last})")
            time.sleep(0.05)

    def images_per_second(self, start: float, end: float) -> float:
        """Training images a second between `start` and `end`: the images between consecutive progress events of
        one epoch over the time between their arrivals (the evaluation after an epoch is not training)."""
        inside = [(t, p) for t, p in self.progress if start <= t <= end]
        images = seconds = 0.0
        for (t0, a), (t1, b) in itertools.pairwise(inside):
            if a["epoch"] == b["epoch"] and b["images"] > a["images"]:
                images, seconds = images + b["images"] - a["images"], seconds + t1 - t0
        return images / seconds if seconds else float("nan")


def measure(drawing: Drawing, requests: int, watcher: Watcher | None = None) -> dict:
    """The latencies of REQUESTS drawings (milliseconds: p50, p95, p99, max) and the training's images a second."""
    start = time.perf_counter()
    latencies = sorted(drawing.draw(requests))
    end = time.perf_counter()

    def at(q: float) -> float:
        return 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))]

    return {
        "requests": len(latencies),
        "seconds": end - start,
        "p50": at(0.50),
        "p95": at(0.95),
        "p99": at(0.99),
        "max": 1000 * latencies[-1],
        "images_per_second": watcher.images_per_second(start, end) if watcher else None,
    }


def lab_phase(url: str, drawing: Drawing, requests: int, server_pid: int) -> dict:
    """cnn-fast started through the lab's API, measured, and stopped through it."""
    created = call(url, "POST", "/api/runs", {"config": CONFIG, "set": {"training.epochs": EPOCHS}})
    run = created["id"]
    watcher = Watcher(server_sent(url, f"/api/runs/{run}/events"))
    try:
        watcher.wait_for_progress()
        result = measure(drawing, requests, watcher)
        result["how"] = how_it_runs(server_pid)
    finally:
        status = call(url, "GET", f"/api/runs/{run}")["status"]
        if status in ("queued", "running"):
            call(url, "POST", f"/api/runs/{run}/stop", {})
    if status != "running":
        raise RuntimeError(f"the lab's training ended before its phase did (status {status})")
    watcher.thread.join(timeout=120)  # the stream closes after its "end" event: the training process is gone
    if watcher.thread.is_alive() or watcher.last is None or watcher.last[0] != "end":
        raise RuntimeError(f"the lab's training did not end after its stop (its last event: {watcher.last})")
    return result


def how_it_runs(server_pid: int) -> str:
    """How the lab runs its training, read from /proc rather than taken on trust: the training process's niceness
    over the server's and its OMP_NUM_THREADS."""
    children = [
        int(c) for task in Path(f"/proc/{server_pid}/task").iterdir() for c in (task / "children").read_text().split()
    ]
    training = next(c for c in children if b"train" in Path(f"/proc/{c}/cmdline").read_bytes().split(b"\0"))
    niceness = os.getpriority(os.PRIO_PROCESS, training) - os.getpriority(os.PRIO_PROCESS, server_pid)
    environment = dict(
        item.split(b"=", 1) for item in Path(f"/proc/{training}/environ").read_bytes().split(b"\0") if b"=" in item
    )
    threads = environment.get(b"OMP_NUM_THREADS", b"unset").decode()
    return f"niceness {niceness:+d} over the server's, OMP_NUM_THREADS={threads}"


def plain_phase(drawing: Drawing, requests: int, env: dict, folder: Path) -> dict:
    """The same training as a plain `mnistlab train` process beside the server, measured, and stopped by SIGINT."""
    command = [sys.executable, "-m", "mnistlab", "train", "--config", CONFIG, "--set", f"training.epochs={EPOCHS}"]
    command += ["--out", str(folder / "plain"), "--events", "--until-stdin-closes", "--quiet"]
    # stdin held open: if this script dies, the training sees its end and stops too.
    training = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    try:
        lines = (json.loads(line) for line in training.stdout)
        watcher = Watcher((event["event"], event) for event in lines)
        watcher.wait_for_progress()
        result = measure(drawing, requests, watcher)
        if training.poll() is not None:
            raise RuntimeError(f"the plain training ended before its phase did (exit code {training.returncode})")
    finally:
        training.send_signal(signal.SIGINT)
        training.wait(timeout=120)
    return result


def one_kind(env: dict, requests: int, warmup: int) -> dict:
    """The three phases against one server (and its lab), all in the environment `env`."""
    with tempfile.TemporaryDirectory(prefix="lab-load-") as tmp:
        folder = Path(tmp)
        command = [sys.executable, "-m", "mnistlab", "serve", "--runs", str(folder / "runs"), "--port", "0"]
        command += ["--device", "cpu"]
        server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
        try:
            line = server.stdout.readline()
            if " at " not in line:
                raise RuntimeError(f"the server did not start (its errors are above): {line!r}")
            url = line.split(" at ")[1].split()[0]
            lab = call(url, "GET", "/api/lab")
            if not lab["enabled"]:
                raise RuntimeError(f"the lab is off: {lab['reason']}")
            drawing = Drawing(url)
            drawing.draw(warmup)
            phases = {"idle": measure(drawing, requests)}
            print("idle", phases["idle"], flush=True)
            phases["lab"] = lab_phase(url, drawing, requests, server.pid)
            print("lab", phases["lab"], flush=True)
            phases["plain"] = plain_phase(drawing, requests, env, folder)
            print("plain", phases["plain"], flush=True)
            return phases
        finally:
            server.terminate()
            server.wait(timeout=60)


def cpu_kernels(env: dict) -> str:
    """The instruction set PyTorch uses in `env` (AVX512, AVX2, ...)."""
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    found = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return found.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300, help="drawings sent in each phase")
    parser.add_argument("--warmup", type=int, default=20, help="drawings sent before the first phase, not counted")
    args = parser.parse_args()
    native = {k: v for k, v in os.environ.items() if k not in AVX2}
    results = []
    for env in (native, {**native, **AVX2}):
        kernels = cpu_kernels(env)
        print(kernels, flush=True)
        # Other people's work on the same cores (everything started here is waited for by its end).
        phases, elsewhere, seconds = others_while(lambda env=env: one_kind(env, args.requests, args.warmup))
        results.append((kernels, phases, elsewhere, seconds))

    cpu = cpu_model()
    what = {
        "idle": "none",
        "lab": f"{CONFIG} from `POST /api/runs`",
        "plain": f"`mnistlab train --config {CONFIG}`",
    }
    rows = "\n".join(
        f"| {cpu}, {kernels} | {what[phase]} | {r['requests']} | {r['p50']:.1f} | {r['p95']:.1f} | {r['p99']:.1f} | "
        f"{r['max']:.0f} | {'' if r['images_per_second'] is None else format(r['images_per_second'], ',.0f')} |"
        for kernels, phases, _, _ in results
        for phase, r in phases.items()
    )
    verdicts = "; ".join(
        f"{cpu}, {kernels}: {phases['lab']['p99']:.0f} ms, {'met' if phases['lab']['p99'] <= GOAL_MS else 'not met'}"
        for kernels, phases, _, _ in results
    )
    trade = "; ".join(
        f"{kernels}: p99 {p['lab']['p99']:.0f} ms against {p['plain']['p99']:.0f} ms, training at "
        f"{p['lab']['images_per_second'] / p['plain']['images_per_second']:.0%} of the plain one's images a second"
        for kernels, p, _, _ in results
    )
    others = ", ".join(
        f"{kernels}: {elsewhere:.0f} CPU s in {seconds:.0f} s ({elsewhere / seconds:.2f} of {os.cpu_count()} cores)"
        for kernels, _, elsewhere, seconds in results
    )
    extra = " ".join(f"{k}={v}" for k, v in AVX2.items())
    section = f"""Command: `.venv/bin/python benchmarks/lab_load.py --requests {args.requests} --warmup {args.warmup}`
Machine: {machine()}
Other processes on the machine while it ran (its cores' busy time less this benchmark's): {others}.
"AVX2" rows: the server and both trainings with `{extra}` (PyTorch and oneDNN held to AVX2, as on an
AVX2-only CPU); the server's default engine, onnxruntime, picks its kernels by CPUID and is not held back.

One person drawing: one keep-alive connection posting the page's canvas drawings (a 1, a 7, a 0 in turn) to
`/api/predict` of `mnistlab serve --runs TMP --device cpu` (the bundled model, defaults otherwise), as the page
does while a stroke changes: one request in flight, the next no sooner than 80 ms after the previous one;
{args.warmup} drawings first, not counted, then {args.requests} per phase, each answer checked. Latency: from
sending a request to having read its answer, in ms. Training: {CONFIG} (asked for {EPOCHS} epochs, stopped when
its phase ends), measured from its first progress event on; images/s are its training images a second within
epochs, timed as its progress events arrive. The lab's training process ran with
{results[0][1]["lab"]["how"]} (read from /proc); the plain `mnistlab train` beside
the server with the server's niceness and PyTorch's default threads ({os.cpu_count()}).

| CPU, PyTorch kernels | training beside the server | drawings | p50 | p95 | p99 | max | training images/s |
|---|---|---:|---:|---:|---:|---:|---:|
{rows}

Goal: `/api/predict` p99 at most {GOAL_MS:.0f} ms for one person drawing while the lab trains {CONFIG}: {verdicts}.
What the lab's way of running the training buys the drawing, and costs the training, against the plain one:
{trade}.
"""
    print(section)
    write_section("lab-load", section, ROOT / "docs" / "lab.md")


if __name__ == "__main__":
    main()
