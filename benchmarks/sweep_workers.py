"""Does splitting the cores between sweep workers matter? The same sweep with 1 worker (all cores), 2 workers with
their share of the cores each (what `mnistlab sweep --workers 2` does), and 2 workers that each take every core
(what two PyTorch processes do left alone). Writes the `sweep-workers` section of docs/benchmarks.md.

    MNISTLAB_DATA=... .venv/bin/python benchmarks/sweep_workers.py

Each sweep: the report's network B (seed-b), 2 epochs per trial on the full MNIST, 6 trials over a log range of
learning rates, no pruning, so every setup trains the same amount. Run once as the CPU is and once with
PyTorch and oneDNN capped at AVX2 (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA), as on an AVX2-only machine; the
workers inherit the environment.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import AVX2, machine, write_section

from mnistlab.devices import cpu_count, describe_cpu
from mnistlab.sweep.plan import SweepOptions
from mnistlab.sweep.run import sweep
from mnistlab.sweep.storage import load_sweep

TRIALS, EPOCHS = 6, 2


def run(workers: int, threads: int, folder: Path) -> tuple[float, float]:
    """Wall-clock seconds of the whole sweep, and the median seconds of one trial."""
    start = time.perf_counter()
    sweep(
        SweepOptions(
            config="seed-b",
            space=["optimizer.lr=log:1e-4:1e-2"],
            trials=TRIALS,
            epochs=EPOCHS,
            pruner="none",
            workers=workers,
            threads=threads,
            out=folder,
            device="cpu",
            quiet=True,
        )
    )
    wall = time.perf_counter() - start
    trials = load_sweep(folder)[0].get_trials(deepcopy=False)
    return wall, statistics.median(t.user_attrs["result"]["seconds"] for t in trials)


def main() -> None:
    n = cpu_count()
    setups = [(1, n, "1 worker x all cores"), (2, max(1, n // 2), "2 workers, cores split (the default)")]
    setups.append((2, n, "2 workers x all cores each (oversubscribed)"))
    rows = []
    for isa, env in (("native", {}), ("AVX2 cap", AVX2)):
        os.environ.update(env)
        for workers, threads, label in setups:
            with tempfile.TemporaryDirectory() as tmp:
                wall, trial = run(workers, threads, Path(tmp) / "sweep")
            rows.append(f"| {isa} | {label} | {workers} x {threads} | {wall:.1f} | {trial:.1f} |")
            print(rows[-1], file=sys.stderr, flush=True)
        for key in env:
            del os.environ[key]
    text = f"""## Sweep workers: splitting the cores

Command: `MNISTLAB_DATA=... .venv/bin/python benchmarks/sweep_workers.py`. Machine: {machine()}; {describe_cpu()}.
The same sweep each time: seed-b, {EPOCHS} epochs per trial on the full MNIST, {TRIALS} trials, no pruning.
Wall clock includes starting the worker processes (each imports PyTorch and loads MNIST).

| CPU kernels | setup | workers x threads | sweep wall clock (s) | one trial, median (s) |
|---|---|---|---|---|
{chr(10).join(rows)}
"""
    write_section("sweep-workers", text)
    print(text)


if __name__ == "__main__":
    main()
