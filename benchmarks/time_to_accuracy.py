"""Time to accuracy for the CNN configs, peak memory of each training run, and inference speed.

Each training run is its own process (`mnistlab train`), so its peak resident memory is its own; the figures
come from the run's metrics.json: cumulative training seconds (evaluation excluded) against test accuracy
after each epoch. Inference throughput and single-image latency are measured on the trained models.

Run: .venv/bin/python benchmarks/time_to_accuracy.py [--data-dir DIR] [--seeds 3] [--configs A,B] [--best]
and, to see an AVX2-only CPU on a machine with more: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 before it
(its section and figure then carry the capability's name).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import DOC, held_back_prefix, held_back_suffix, machine, write_section

from mnistlab.data.splits import load_data, to_float
from mnistlab.models.files import load_model


def train_run(config: str, out: Path, extra: list[str], data_dir: str | None) -> dict:
    """Train in a child process; return its per-epoch curve and peak RSS."""
    cmd = [sys.executable, "-m", "mnistlab", "train", "--config", config, "--out", str(out), "--quiet", *extra]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with {proc.returncode}")
    epochs = json.loads((out / "metrics.json").read_text())["epochs"]
    elapsed, curve = 0.0, []
    for e in epochs:
        elapsed += e["train_seconds"]
        curve.append((elapsed, e["test_accuracy"]))
    return {"curve": curve, "peak_mb": usage.ru_maxrss / 1024, "wall": time.perf_counter() - start}


@torch.inference_mode()
def inference_speed(run_dir: Path, images: torch.Tensor) -> tuple[float, float]:
    """(images per second in batches of 1000, median milliseconds for one image)."""
    model = load_model(run_dir).model
    x = to_float(images)
    model(x[:1000])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(x), 1000):
        model(x[i : i + 1000])
    throughput = len(x) / (time.perf_counter() - start)
    one = x[:1]
    times = []
    for _ in range(200):
        t = time.perf_counter()
        model(one)
        times.append(time.perf_counter() - t)
    return throughput, 1000 * statistics.median(times)


def first_reaching(curve: list[tuple[float, float]], target: float) -> str:
    for seconds, accuracy in curve:
        if accuracy >= target:
            return f"{seconds:.0f} s"
    return "not reached"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--seeds", type=int, default=3, help="seeds of each timed config")
    parser.add_argument("--configs", default="cnn-fast,cnn-fast-995", help="the configs timed over seeds")
    parser.add_argument("--examples-epochs", type=int, default=1, help="epochs of cnn-examples to time")
    parser.add_argument("--best", action="store_true", help="also train cnn-best once (about 7 minutes)")
    args = parser.parse_args()

    capability = torch.backends.cpu.get_cpu_capability()
    print(f"CPU: {machine()}", flush=True)  # the children inherit this environment, and so its capability
    configs = args.configs.split(",")
    plan = [(f"{c} seed {s}", c, ["--seed", str(s)]) for c in configs for s in range(args.seeds)]
    plan.append(("cnn-examples", "cnn-examples", ["--epochs", str(args.examples_epochs)]))
    if args.best:
        plan.append(("cnn-best", "cnn-best", []))
    test_images = load_data("mnist", args.data_dir, val_size=0).test.images
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, config, extra in plan:
            out = Path(tmp) / label.replace(" ", "-")
            print(f"training {label} ...", flush=True)
            results[label] = train_run(config, out, extra, args.data_dir)
            results[label]["inference"] = inference_speed(out, test_images)
            print(f"  {results[label]['curve']} wall {results[label]['wall']:.1f} s", flush=True)

    examples_epoch = results["cnn-examples"]["curve"][0][0]
    rows = []
    for label, r in results.items():
        seconds, accuracy = r["curve"][-1]
        throughput, latency = r["inference"]
        to_99, to_995 = first_reaching(r["curve"], 0.99), first_reaching(r["curve"], 0.995)
        rows.append(
            f"| {label} | {len(r['curve'])} | {seconds:.0f} | {r['wall']:.0f} | {100 * accuracy:.2f}% | {to_99} | "
            f"{to_995} | {r['peak_mb']:.0f} | {throughput:,.0f} | {latency:.2f} |"
        )
    summary = []
    for config in configs:
        runs = [r for label, r in results.items() if label.startswith(f"{config} seed")]
        accuracy = statistics.median(r["curve"][-1][1] for r in runs)
        wall = statistics.median(r["wall"] for r in runs)
        train = statistics.median(r["curve"][-1][0] for r in runs)
        summary.append(
            f"- {config}, median of {len(runs)} seeds: **{100 * accuracy:.2f}%** test accuracy, "
            f"**{wall:.0f} s** wall time of `mnistlab train` ({train:.0f} s of it training)"
        )
    suffix = held_back_suffix()
    _plot(results, DOC.parent / f"time-to-accuracy{suffix}.png")
    env = held_back_prefix(suffix)
    command = (
        f"{env}.venv/bin/python benchmarks/time_to_accuracy.py --seeds {args.seeds} --configs {args.configs} "
        f"--examples-epochs {args.examples_epochs}" + (" --best" if args.best else "")
    )
    section = f"""## Time to accuracy ({capability} kernels): {", ".join(configs)}, cnn-examples

Command: `{command}`
Machine: {machine()}
"train s" is cumulative training time (evaluation excluded) at the last epoch, "wall s" the whole `mnistlab train`
process (start-up, data, training, evaluation, saving); "to 99.0%" and "to 99.5%" are training seconds when the
test accuracy first reached them. Every run trained in its own process, one after another, on the same machine.
Inference: images per second in batches of 1,000, and the median latency of one image.

| run | epochs | train s | wall s | final test acc | to 99.0% | to 99.5% | peak RSS MB | inference img/s | latency ms |
|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

{chr(10).join(summary)}
- one epoch of cnn-examples (the pytorch/examples network and recipe) took {examples_epoch:.0f} s of training in
  the same run.

![time to accuracy](time-to-accuracy{suffix}.png)
"""
    print(section)
    write_section(f"time-to-accuracy{suffix}", section)


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for label, r in results.items():
        xs, ys = zip(*r["curve"])
        ax.plot(xs, [100 * y for y in ys], marker="o", label=label)
    ax.axhline(99.0, color="grey", lw=0.8, ls="--")
    ax.axhline(99.5, color="grey", lw=0.8, ls=":")
    ax.set(xlabel="training seconds (2-core CPU)", ylabel="test accuracy (%)", ylim=(97.5, 100), xscale="log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
