"""One training in one process or in several (torch.distributed, gloo on the CPU), on this machine.

Each row is a real `mnistlab train` command; its seconds are the median training time per epoch from the run's
metrics.json. The thread rows show what torchrun's default of one thread per process costs a process that is
alone on a machine of several cores (mnistlab gives each rank cores / ranks threads instead).

Run: .venv/bin/python benchmarks/distributed_scaling.py [--config seed-b-fixed] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import machine, write_section

from mnistlab.devices import cpu_count


def run(label: str, argv: list[str], env: dict[str, str], out: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "mnistlab", *argv, "--out", str(out), "--quiet"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
    )
    if result.returncode:
        raise SystemExit(f"{label} failed:\n{result.stderr}")
    metrics = json.loads((out / "metrics.json").read_text())
    seconds = [e["train_seconds"] for e in metrics["epochs"]]
    row = (
        f"| {label} | `{' '.join(['mnistlab', *argv])}` | {metrics['world_size']} "
        f"| {statistics.median(seconds):.2f} | {100 * metrics['final']['test_accuracy']:.2f}% |"
    )
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="seed-b-fixed")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    print(machine())
    base = ["train", "--config", args.config, "--epochs", str(args.epochs)]
    cores = cpu_count()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [
            run(f"1 process, {cores} threads", base, {}, Path(tmp) / "a"),
            run("1 process, 1 thread (torchrun's default)", base, {"OMP_NUM_THREADS": "1"}, Path(tmp) / "b"),
            run(
                f"2 processes (`--nproc 2`), {max(1, cores // 2)} thread(s) each",
                [*base, "--nproc", "2"],
                {},
                Path(tmp) / "c",
            ),
        ]
    write_section(
        f"distributed-{args.config}",
        f"""## One training in one or two processes: {args.config}

Command: `.venv/bin/python benchmarks/distributed_scaling.py --config {args.config} --epochs {args.epochs}`
Machine: {machine()}
Median training seconds per epoch over {args.epochs} epochs (evaluation excluded), and the final test accuracy.
Two processes on two cores split the same arithmetic and add a gradient all-reduce per step, so no speed-up is
expected here: the point of `--nproc` on such a machine is that it runs the same code path as several GPUs or
machines. One thread for a process alone on the machine is what torchrun gives by default; mnistlab gives each
rank cores / ranks threads.

| setting | command | processes | s/epoch (train) | test accuracy |
|---|---|---|---|---|
"""
        + "\n".join(rows),
    )


if __name__ == "__main__":
    main()
