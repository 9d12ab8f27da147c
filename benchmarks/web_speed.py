"""Speed of the draw-a-digit web app (`mnistlab serve`) with the bundled model, in two figures:

1. In-process: one canvas drawing (a 280x280 RGBA PNG, as the page sends it) through decoding, preprocessing
   and the model, as the server runs them, with each engine (onnxruntime, torch); the median of many, with each
   part timed alone.
2. Over HTTP on loopback: a real `mnistlab serve` (its defaults: uploads prepared in one process per core)
   and, in a separate process, load for SECONDS: closed loop (CLIENTS connections, each sending again as soon
   as its answer arrives: the throughput the server sustains) and open loop (RATE requests a second, evenly
   spaced, whatever the server's pace: the latency at that rate); throughput, p50, p99 and errors.

With PyTorch and oneDNN held to AVX2 (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2), as on an AVX2-only
machine, the torch engine runs again. onnxruntime picks its kernels by CPUID and has no switch to hold it to
AVX2, so its AVX2 figures cannot be shown on a machine with AVX-512.

Run with nothing else busy on the machine (the server and the load share its cores):
.venv/bin/python benchmarks/web_speed.py
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

from common import AVX2, machine, write_section

from tests.support.drawings import drawn_png

BOUNDARY = "mnistlabbenchmark"


def request_image(kind: str) -> bytes:
    """The page's drawing of a 7 ("canvas"), or what preprocessing makes of it ("28x28": a digit already in
    MNIST's format, which preprocessing passes through, so the load run shows the rest of the server's cost)."""
    if kind == "canvas":
        return drawn_png("7")
    from mnistlab.data.preprocess import preprocess
    from mnistlab.serve.images import open_image, png_base64

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

    from mnistlab.data.preprocess import preprocess
    from mnistlab.devices import describe_cpu
    from mnistlab.serve.engines import Predictor, load_served
    from mnistlab.serve.images import open_image

    png = drawn_png("7")
    image = open_image(png)
    one = preprocess(image).tensor[None]
    sixteen = one.repeat(16, 1, 1)
    onnx, reference = (
        Predictor(load_served([None], "cpu", "onnxruntime")),
        Predictor(load_served([None], "cpu", "torch")),
    )

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
            "model, onnxruntime": median_ms(lambda: onnx.forward(one)),
            "model, torch (BatchNorm folded, channels-last)": median_ms(lambda: reference.forward(one)),
            "model, torch as loaded": median_ms(lambda: reference.models[0].loaded.model(one)),
            "model, onnxruntime, 16 images in one pass, per image": median_ms(lambda: onnx.forward(sixteen)) / 16,
        }
    for name, predictor in (("onnxruntime", onnx), ("torch", reference)):
        parts[f"total, {name}"] = median_ms(lambda p=predictor: p.predict(png))
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

    async def attempt(connection, due: float, start_at: float):
        """One request on `connection`, its answer checked and its latency recorded (none in the warm-up);
        returns the connection to use next (a new one after an error)."""
        try:
            status, answer = await exchange(connection)
        except (OSError, asyncio.IncompleteReadError, IndexError, ValueError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            connection[1].close()
            return await connect()
        if due < start_at:
            pass  # warm-up
        elif status != b"200" or json.loads(answer)["predictions"][0]["label"] != 7:
            errors.append(f"HTTP {status.decode()}: {answer[:200]!r}")
        else:
            latencies.append(time.perf_counter() - due)
        return connection

    async def client(start_at: float, stop_at: float) -> None:
        connection = await connect()
        while (now := time.perf_counter()) < stop_at:
            connection = await attempt(connection, now, start_at)
        connection[1].close()

    async def open_loop(start_at: float, stop_at: float) -> None:
        pool: asyncio.Queue = asyncio.Queue()
        for connection in await asyncio.gather(*(connect() for _ in range(clients))):
            pool.put_nowait(connection)

        async def one(due: float) -> None:
            pool.put_nowait(await attempt(await pool.get(), due, start_at))

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
    }


def serve_and_load(env: dict, engine: str, image: str, clients: int, seconds: float, rate: float) -> dict:
    """A real `mnistlab serve` in one process (with its preprocessing processes), the load from another."""
    server = subprocess.Popen(
        [sys.executable, "-m", "mnistlab", "serve", "--port", "0", "--device", "cpu", "--engine", engine],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = server.stdout.readline()
        url = line.split(" at ")[1].split()[0]
        before = _tree_cpu_seconds(server.pid)
        command = [sys.executable, __file__, "--client", url, "--image", image, "--rate", str(rate)]
        command += ["--clients", str(clients), "--seconds", str(seconds)]
        result = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
        result["server_cpu_s"] = _tree_cpu_seconds(server.pid) - before
        return result
    finally:
        server.terminate()
        server.wait(timeout=30)


def _tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of a process and its children (the server's preprocessing processes)."""
    return _tree_ticks(pid) / os.sysconf("SC_CLK_TCK")


def _tree_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    children = [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
    return int(fields[11]) + int(fields[12]) + sum(map(_tree_ticks, children))


# ---------------------------------------------------------------------------------------------- report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=400, help="in-process timings per part")
    parser.add_argument("--clients", type=int, default=16, help="closed-loop connections")
    parser.add_argument("--rate", type=float, default=200.0, help="open-loop requests per second")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--image", default="canvas", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.in_process:
        print(json.dumps(in_process(args.repeats)))
        return
    if args.client:
        # Open loop draws on a pool of connections: enough that the pool is never what holds requests back.
        clients = args.clients if not args.rate else 64
        print(json.dumps(asyncio.run(load(args.client, args.image, clients, args.seconds, 2.0, args.rate))))
        return

    inprocess, loads = {}, []
    runs = {
        "native": [
            ("onnxruntime", "canvas", 0),
            ("onnxruntime", "canvas", args.rate),
            ("torch", "canvas", 0),
            ("torch", "canvas", args.rate),
            ("onnxruntime", "28x28", 0),
        ],
        "AVX2": [("torch", "canvas", 0), ("torch", "canvas", args.rate)],
    }
    for isa, extra in (("native", {}), ("AVX2", AVX2)):
        env = {**os.environ, **extra}
        command = [sys.executable, __file__, "--in-process", "--repeats", str(args.repeats)]
        inprocess[isa] = json.loads(subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout)
        print(isa, json.dumps(inprocess[isa]), flush=True)
        for engine, image, rate in runs[isa]:
            result = serve_and_load(env, engine, image, args.clients, args.seconds, rate)
            loads.append((isa, engine, image, rate, result))
            print(isa, engine, image, rate, json.dumps(result), flush=True)

    names = list(inprocess["native"]["parts"])
    part_rows = "\n".join(
        f"| {name} | {inprocess['native']['parts'][name]:.2f} | "
        + ("(not held to AVX2)" if "onnxruntime" in name else f"{inprocess['AVX2']['parts'][name]:.2f}")
        + " |"
        for name in names
    )
    what = {"canvas": "the page's drawing", "28x28": "28x28 digit (no preparing)"}
    load_rows = "\n".join(
        f"| {isa} | {engine} | {what[image]} | "
        f"{f'open, {rate:g}/s' if rate else f'closed, {args.clients} clients'} | {h['per_second']:.0f} | "
        f"{h['p50_ms']:.1f} | {h['p99_ms']:.1f} | {h['max_ms']:.0f} | {h['errors']} | {h['requests']:,} | "
        f"{h['server_cpu_s']:.0f} / {h['client_cpu_s']:.0f} |"
        for isa, engine, image, rate, h in loads
    )
    parts = inprocess["native"]["parts"]
    served = {(isa, engine, image, rate): h for isa, engine, image, rate, h in loads}
    closed = served[("native", "onnxruntime", "canvas", 0)]
    opened = served[("native", "onnxruntime", "canvas", args.rate)]
    held = opened["per_second"] >= 0.99 * args.rate and opened["p99_ms"] <= 50 and opened["errors"] == 0
    mean_ms = 1000 * args.clients / closed["per_second"]
    meets = {True: "met", False: "not met"}
    summary = (
        f"Where the time goes (native, onnxruntime): of the {parts['total, onnxruntime']:.1f} ms, preprocessing the "
        f"drawing takes {parts['preprocess']:.1f} ms and the model {parts['model, onnxruntime']:.1f} ms (PyTorch: "
        f"{parts['model, torch (BatchNorm folded, channels-last)']:.1f} ms). Goal of at most 5 ms in-process: "
        f"{meets[parts['total, onnxruntime'] <= 5]} ({parts['total, onnxruntime']:.1f} ms; with the torch engine "
        f"{parts['total, torch']:.1f} ms). Over HTTP, at {args.rate:g} drawings/s the p99 latency is "
        f"{opened['p99_ms']:.0f} ms with {opened['errors']} errors: the goal of at least 200/s with p99 at most 50 ms "
        f"is {meets[args.rate >= 200 and held]}"
        f". With {args.clients} clients in a closed loop the server sustains {closed['per_second']:.0f}/s; there, by "
        f"Little's law, the mean latency is {args.clients} / throughput ({mean_ms:.0f} ms)"
        f": a p99 of 50 ms with {args.clients} clients always waiting would take over {args.clients / 0.05:.0f}/s."
    )
    extra = " ".join(f"{k}={v}" for k, v in AVX2.items())
    options = f" --repeats {args.repeats} --clients {args.clients} --rate {args.rate:g} --seconds {args.seconds:g}"
    section = f"""## Web app: one drawing in-process, and load over HTTP

Command: `.venv/bin/python benchmarks/web_speed.py{options}`
Machine: {machine()}
CPU: {inprocess["native"]["cpu"]}
"AVX2" rows and column: the same with `{extra}` (PyTorch and oneDNN held to AVX2, as on an AVX2-only
machine); onnxruntime chooses its kernels by CPUID and cannot be held back, so it has no AVX2 figures here.

In-process, the bundled model (three CNNs averaged) on the page's drawing of a 7 (a 280x280 RGBA PNG): median
milliseconds of {args.repeats} runs, each part alone; "total" is `Predictor.predict` (decode, preprocess, model,
the 28x28 PNG and the answer) with each engine, what the server runs per request except for HTTP and batching.

| part | ms (native) | ms (AVX2) |
|---|---|---|
{part_rows}

Over HTTP on loopback: `mnistlab serve --engine ENGINE` (its defaults otherwise: uploads decoded and
preprocessed in one process per core, one thread per forward pass, concurrent requests batched) and, in a
separate process, load for {args.seconds:g} s after a 2 s warm-up, every answer checked (status 200, digit 7).
Closed loop: {args.clients} keep-alive connections, each posting again as soon as its answer arrives (the
throughput the server sustains). Open loop: {args.rate:g} requests a second, evenly spaced whatever the
server's pace, each latency counted from when its request was due (the latency at that rate). The server and
the load share the machine's 2 cores. The 28x28 row sends a digit already in MNIST's format, which
preprocessing passes through: the server and model without the cost of preparing a drawing. CPU seconds are
the server's with its preprocessing processes, and the load generator's.

| CPU | engine | image | load | predictions/s | p50 ms | p99 ms | max ms | errors | requests | CPU s server / load |
|---|---|---|---|---|---|---|---|---|---|---|
{load_rows}

{summary}
"""
    print(section)
    write_section("web-speed", section)


if __name__ == "__main__":
    main()
