"""What the caps of `mnistlab serve` should be: ApacheBench (`ab`) against a real server on loopback with rising
concurrency, the page's canvas drawing POSTed as multipart, each request on a new connection (as `ab` without
-k does). Two runs per concurrency:

1. uncapped (--max-queue and --max-connections far above the load): throughput, and the latency that grows
   once the cores are full, which is what an unbounded queue costs;
2. with the defaults (--max-queue 128, --max-connections 512): the share answered 503 and the latency of all.

The figures go into docs/serving.md ("Connections"), with the command and the CPU.

.venv/bin/python benchmarks/serve_load.py
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, machine, write_section

from mnistlab.serve.settings import ServeSettings
from tests.support.drawings import drawn_png

BOUNDARY = "mnistlabbenchmark"
UNCAPPED = ["--max-queue", "100000", "--max-connections", "4000"]


def body() -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="drawing.png"\r\n'
        "Content-Type: image/png\r\n\r\n".encode()
        + drawn_png("7")
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


def ab(url: str, payload: Path, clients: int, requests: int) -> dict:
    """One `ab` run: requests/s, median and 99th percentile (ms), connection errors (refused, reset, timed out:
    what a cap must prevent) and non-2xx answers (the 503s)."""
    command = ["ab", "-q", "-r", "-s", "60", "-n", str(requests), "-c", str(clients), "-p", str(payload)]
    command += ["-T", f"multipart/form-data; boundary={BOUNDARY}", url + "api/predict"]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout

    def number(pattern: str) -> float:
        found = re.search(pattern, out)
        return float(found.group(1)) if found else 0.0

    return {
        "per_second": number(r"Requests per second:\s+([\d.]+)"),
        "p50": number(r"\n\s+50%\s+(\d+)"),
        "p99": number(r"\n\s+99%\s+(\d+)"),
        "errors": int(sum(number(rf"{kind}: (\d+)") for kind in ("Connect", "Receive", "Exceptions"))),
        "non_2xx": int(number(r"Non-2xx responses:\s+(\d+)")),
        "requests": requests,
    }


def run(flags: list[str], levels: list[int], payload: Path) -> list[tuple[int, dict]]:
    server = subprocess.Popen(
        [sys.executable, "-m", "mnistlab", "serve", "--port", "0", *flags], stdout=subprocess.PIPE, text=True
    )
    try:
        url = server.stdout.readline().split(" at ")[1].split()[0]
        ab(url, payload, 4, 200)  # warm-up
        results = []
        for clients in levels:
            result = ab(url, payload, clients, max(400, 6 * clients))
            print(flags or "defaults", clients, result, flush=True)
            results.append((clients, result))
        return results
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="1,4,16,64,256,512", help="concurrencies (ab -c), comma-separated")
    args = parser.parse_args()
    levels = [int(level) for level in args.levels.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        payload = Path(tmp) / "body"
        payload.write_bytes(body())
        uncapped = run(UNCAPPED, levels, payload)
        capped = run([], levels, payload)
    default = ServeSettings()
    rows = "\n".join(
        f"| {clients} | {u['per_second']:.0f} | {u['p50']:.0f} | {u['p99']:.0f} | {u['errors']} | {c['errors']} | "
        f"{c['per_second']:.0f} | {c['p50']:.0f} | {c['p99']:.0f} | {c['non_2xx'] / c['requests']:.0%} |"
        for (clients, u), (_, c) in zip(uncapped, capped)
    )
    write_section(
        "serve-load",
        f"""`.venv/bin/python benchmarks/serve_load.py` on {machine()}; the server's defaults otherwise (one
preprocessing process per core, onnxruntime). Each request on a new connection (`ab -c N` without `-k`);
errors: connections refused, reset or timed out; a 503 costs the server far less than a prediction, so req/s
with the defaults counts answers, not predictions.

| ab -c | uncapped: req/s | p50 ms | p99 ms | errors | defaults (--max-queue {default.max_queue}): errors | \
req/s | p50 ms | p99 ms | 503 |
|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
{rows}""",
        ROOT / "docs" / "serving.md",
    )


if __name__ == "__main__":
    main()
