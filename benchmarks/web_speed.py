"""Speed of the draw-a-digit web app (`mnistlab serve`) with the bundled model, in two figures:

1. In-process: one canvas drawing (a 280x280 RGBA PNG, as the page sends it) through decoding, preprocessing
   and the model, as the server runs them; the median of many, with each part timed alone.
2. Over HTTP on loopback: a bounded load run of CLIENTS concurrent keep-alive connections for SECONDS against a
   real `mnistlab serve`, driven from a separate process; throughput, p50, p99 and errors.

Both run twice: on this CPU as it is, and with PyTorch and oneDNN held to AVX2
(ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2), as on an AVX2-only machine.

Run (under the shared CPU lock): flock /work/cpu.lock .venv/bin/python benchmarks/web_speed.py
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from drawings import drawn_png  # noqa: E402

AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
BOUNDARY = "mnistlabbenchmark"


def request_image(kind: str) -> bytes:
    """The page's drawing of a 7 ("canvas"), or what preprocessing makes of it ("28x28": a digit already in
    MNIST's format, which preprocessing passes through, so the load run shows the rest of the server's cost)."""
    if kind == "canvas":
        return drawn_png("7")
    from mnistlab.preprocess import preprocess
    from mnistlab.serve.inference import open_image, png_base64

    return base64.b64decode(png_base64(preprocess(open_image(drawn_png("7"))).digit))


def multipart(png: bytes) -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="drawing.png"\r\n'
        "Content-Type: image/png\r\n\r\n".encode()
        + png
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


# ---------------------------------------------------------------------------------------------- in-process


def in_process(repeats: int) -> dict:
    """Median milliseconds of each part, measured in this process."""
    import torch

    from mnistlab.devices import describe_cpu
    from mnistlab.preprocess import preprocess
    from mnistlab.serve.inference import Predictor, load_served, open_image

    png = drawn_png("7")
    predictor = Predictor(load_served([None]))
    served = predictor.models[0]
    image = open_image(png)
    one = preprocess(image).tensor[None]
    sixteen = one.repeat(16, 1, 1)

    def median_ms(fn, n=repeats) -> float:
        for _ in range(10):
            fn()
        times = []
        for _ in range(n):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times)

    with torch.inference_mode():
        parts = {
            "decode": median_ms(lambda: open_image(png)),
            "preprocess": median_ms(lambda: preprocess(image)),
            "model": median_ms(lambda: predictor.forward(one)),
            "model as loaded (no folding, channels-first)": median_ms(lambda: served.loaded.model(one)),
            "model, 16 images in one pass, per image": median_ms(lambda: predictor.forward(sixteen), repeats // 4) / 16,
        }
    parts["total"] = median_ms(lambda: predictor.predict(png))
    assert predictor.predict(png)["predictions"][0]["label"] == 7
    return {"parts": parts, "cpu": describe_cpu(), "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------- load


async def load(url: str, image: str, clients: int, seconds: float, warmup: float, rate: float = 0) -> dict:
    """Requests for the image of a 7 for SECONDS after a warm-up, on keep-alive connections.

    Closed loop (rate 0): CLIENTS connections, each sending again as soon as its answer arrives; throughput is
    what the server sustains, and by Little's law the mean latency is CLIENTS / throughput. Open loop (rate R):
    requests start at R per second, evenly spaced, whatever the server's pace, on a pool of up to CLIENTS
    connections; each latency counts from the moment its request was due, so a request that waited for a free
    connection (the server falling behind) is charged for the wait.
    """
    parts = urlsplit(url)
    body = multipart(request_image(image))
    request = (
        f"POST /api/predict HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: multipart/form-data; "
        f"boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    latencies: list[float] = []
    errors: list[str] = []
    timeline: list[tuple[float, float]] = []

    async def connect():
        return await asyncio.open_connection(parts.hostname, parts.port)

    async def exchange(connection) -> tuple[bytes, bytes]:
        reader, writer = connection
        writer.write(request)
        status = (await reader.readline()).split(b" ", 2)[1]
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await reader.readexactly(length)

    def record(due: float, start_at: float, status: bytes, answer: bytes) -> None:
        if due < start_at:
            return  # warm-up
        if status != b"200" or json.loads(answer)["predictions"][0]["label"] != 7:
            errors.append(f"HTTP {status.decode()}: {answer[:200]!r}")
        else:
            latencies.append(time.perf_counter() - due)
            timeline.append((due - start_at, latencies[-1]))

    async def client(start_at: float, stop_at: float) -> None:
        connection = await connect()
        while (now := time.perf_counter()) < stop_at:
            try:
                status, answer = await exchange(connection)
            except (OSError, asyncio.IncompleteReadError, IndexError, ValueError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                connection[1].close()
                connection = await connect()
                continue
            record(now, start_at, status, answer)
        connection[1].close()

    async def open_loop(start_at: float, stop_at: float) -> None:
        pool: asyncio.Queue = asyncio.Queue()
        for connection in await asyncio.gather(*(connect() for _ in range(clients))):
            pool.put_nowait(connection)

        async def one(due: float) -> None:
            connection = await pool.get()
            try:
                status, answer = await exchange(connection)
            except (OSError, asyncio.IncompleteReadError, IndexError, ValueError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                connection[1].close()
                connection = await connect()
            else:
                record(due, start_at, status, answer)
            pool.put_nowait(connection)

        begin, tasks, i = time.perf_counter(), [], 0
        while (due := begin + i / rate) < stop_at:
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            tasks.append(asyncio.create_task(one(due)))
            i += 1
        await asyncio.gather(*tasks)
        while not pool.empty():
            pool.get_nowait()[1].close()

    begin = time.perf_counter()
    if rate:
        await open_loop(begin + warmup, begin + warmup + seconds)
    else:
        await asyncio.gather(*(client(begin + warmup, begin + warmup + seconds) for _ in range(clients)))
    latencies.sort()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "requests": len(latencies),
        "per_second": len(latencies) / seconds,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)],
        "max_ms": 1000 * latencies[-1],
        "errors": len(errors),
        "first_errors": errors[:3],
        "client_cpu_s": usage.ru_utime + usage.ru_stime,
        "worst_per_second": [round(1000 * max([l for t, l in timeline if int(t) == k] or [0])) for k in range(int(seconds))],
    }


def serve_and_load(env: dict, image: str, clients: int, seconds: float) -> dict:
    """A real `mnistlab serve` in one process, the load from another."""
    server = subprocess.Popen(
        [sys.executable, "-m", "mnistlab", "serve", "--port", "0", "--device", "cpu"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = server.stdout.readline()
        url = line.split(" at ")[1].split()[0]
        command = [sys.executable, __file__, "--client", url, "--image", image]
        command += ["--clients", str(clients), "--seconds", str(seconds)]
        result = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
        with open(f"/proc/{server.pid}/stat") as f:  # the server's CPU seconds (utime + stime, clock ticks)
            fields = f.read().rsplit(")", 1)[1].split()
        result["server_cpu_s"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return result
    finally:
        server.terminate()
        server.wait(timeout=30)


# ---------------------------------------------------------------------------------------------- report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=400, help="in-process timings per part")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--image", default="canvas", help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.in_process:
        print(json.dumps(in_process(args.repeats)))
        return
    if args.client:
        print(json.dumps(asyncio.run(load(args.client, args.image, args.clients, args.seconds, float(os.environ.get("WARMUP", 2)), args.rate))))
        return

    from common import machine, write_section

    inprocess, loads = {}, []
    for isa, extra in (("native", {}), ("AVX2", AVX2)):
        env = {**os.environ, **extra}
        command = [sys.executable, __file__, "--in-process", "--repeats", str(args.repeats)]
        inprocess[isa] = json.loads(subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout)
        print(isa, json.dumps(inprocess[isa]), flush=True)
        for image in ("canvas", "28x28") if isa == "native" else ("canvas",):
            loads.append((isa, image, serve_and_load(env, image, args.clients, args.seconds)))
            print(isa, image, json.dumps(loads[-1][2]), flush=True)

    names = list(inprocess["native"]["parts"])
    part_rows = "\n".join(
        f"| {name} | {inprocess['native']['parts'][name]:.2f} | {inprocess['AVX2']['parts'][name]:.2f} |"
        for name in names
    )
    what = {"canvas": "the page's drawing (280x280 RGBA PNG)", "28x28": "28x28 digit (preprocessing passes it)"}
    load_rows = "\n".join(
        f"| {isa} | {what[image]} | {h['per_second']:.0f} | {h['p50_ms']:.1f} | {h['p99_ms']:.1f} | {h['max_ms']:.0f} "
        f"| {h['errors']} | {h['requests']:,} | {h['server_cpu_s']:.0f} / {h['client_cpu_s']:.0f} |"
        for isa, image, h in loads
    )
    parts = inprocess["native"]["parts"]
    canvas, bare = loads[0][2], loads[1][2]
    meets = {True: "met", False: "not met"}
    summary = (
        f"Where the time goes (native): of the {parts['total']:.1f} ms, preprocessing the drawing takes "
        f"{parts['preprocess']:.1f} ms ({100 * parts['preprocess'] / parts['total']:.0f}%) and the model "
        f"{parts['model']:.1f} ms; folding BatchNorm into the convolutions and storing the weights channels-last "
        f"took the model from {parts['model as loaded (no folding, channels-first)']:.1f} ms to "
        f"{parts['model']:.1f} ms, and in a batch of 16 it costs {parts['model, 16 images in one pass, per image']:.2f}"
        f" ms an image. Goal of at most 5 ms in-process: {meets[parts['total'] <= 5]}. Over HTTP the server and model"
        f" alone (28x28 row) answer {bare['per_second']:.0f} predictions/s; preparing each drawing holds the page's "
        f"case to {canvas['per_second']:.0f}/s. Goal of at least 200/s with p99 at most 50 ms and no errors: "
        f"{meets[canvas['per_second'] >= 200 and canvas['p99_ms'] <= 50 and canvas['errors'] == 0]}."
    )
    extra = " ".join(f"{k}={v}" for k, v in AVX2.items())
    options = f" --repeats {args.repeats} --clients {args.clients} --seconds {args.seconds:g}"
    section = f"""## Web app: one drawing in-process, and a load run over HTTP

Command: `flock /work/cpu.lock .venv/bin/python benchmarks/web_speed.py{options}`
Machine: {machine()}
CPU: {inprocess["native"]["cpu"]}
"AVX2" columns: the same run with `{extra}` (PyTorch and oneDNN held to AVX2, as on an AVX2-only machine).

In-process, the bundled model (three CNNs averaged) on the page's drawing of a 7 (a 280x280 RGBA PNG): median
milliseconds of {args.repeats} runs, each part alone; "total" is `Predictor.predict` (decode, preprocess, model,
the 28x28 PNG and the answer), what the server runs per request except for HTTP and batching.

| part | ms (native) | ms (AVX2) |
|---|---|---|
{part_rows}

Over HTTP on loopback: `mnistlab serve` (uvicorn, one process) and, in a separate process, {args.clients}
keep-alive clients each posting an image of a 7 again as soon as its answer arrives, for {args.seconds:g} s after
a 2 s warm-up; every answer is checked (status 200, digit 7). Both processes share the machine's 2 cores. The
28x28 row sends what preprocessing made of the drawing, a digit already in MNIST's format, which preprocessing
passes through: the same server and model without the cost of preparing a drawing.

| CPU | image | predictions/s | p50 ms | p99 ms | max ms | errors | requests | CPU s server / client |
|---|---|---|---|---|---|---|---|---|
{load_rows}

{summary}
"""
    print(section)
    write_section("web-speed", section)


if __name__ == "__main__":
    main()
