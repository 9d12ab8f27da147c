"""The goals of `mnistlab lr-find`, measured: for the report's networks, the rate it suggests, how long it takes, and
the test accuracy of a full training at that rate.

For each config, `mnistlab lr-find --config NAME --json` runs as a user runs it (a fresh process: start-up, loading
MNIST, the test, the plot; its wall time is the figure), then the config trains for its own epochs at the
suggested rate as printed (three significant digits, the `train with:` line) through the same code as
`mnistlab train`. The table goes into docs/training.md ("Finding a learning rate"). Goals (issue 24): seed-a (SGD,
the report's Softmax quirk kept) reaches at least 95% after 10 epochs; seed-b-fixed (Adam) is told a rate in
[1e-4, 1e-2].

Run: .venv/bin/python benchmarks/lr_find_check.py [--data-dir DIR] [--configs seed-a seed-b-fixed seed-c]
(with ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 before it, the table goes to a section of its own).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from common import ROOT, held_back_prefix, held_back_suffix, machine, write_section

from mnistlab.config import load_config
from mnistlab.data.splits import load_data
from mnistlab.errors import plural
from mnistlab.train.loop import train
from mnistlab.train.lr_find import find_lr

DOC = ROOT / "docs" / "training.md"
CONFIGS = ("seed-a", "seed-b-fixed", "seed-c")
BATCHES = (100, 200, 300, 500)  # the rules' suggestions at these --max-batches (300: the default) ...
SEEDS = (0, 1)  # ... and training seeds (the network's initial weights and the batches' order)


def lr_find(name: str, data_dir: str | None) -> tuple[dict, float]:
    """`mnistlab lr-find --config NAME --json` in a fresh process: its result and its wall time."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "mnistlab", "lr-find", "--config", name, "--json", "--out", out]
        if data_dir:
            command += ["--data-dir", data_dir]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"lr-find failed for {name}: {done.stderr.strip()}")
    return json.loads(done.stdout), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None, help="the MNIST files (default: $MNISTLAB_DATA or the cache)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), help="configs to check")
    args = parser.parse_args()
    suffix = held_back_suffix()
    rows = []
    datasets = {}
    for name in args.configs:
        found, wall = lr_find(name, args.data_dir)
        config = load_config(name)
        d, t = config.data, config.training
        key = (d.dataset, d.val_size, t.seed)
        if key not in datasets:  # the seed configs share one: loaded once
            datasets[key] = load_data(d.dataset, args.data_dir, val_size=d.val_size, seed=t.seed)
        # the suggestion, and the other rule's rate measured beside it (docs/training.md: why this rule)
        for rule in sorted(found["candidates"], key=lambda r: r != found["method"]):
            lr = float(f"{found['candidates'][rule]:.3g}")  # as the command prints it
            run = train(config.with_overrides({"optimizer.lr": lr}), data=datasets[key], device="cpu", quiet=True)
            final, chosen = run.final, rule == found["method"]
            rows.append(
                f"| {name} | {config.optimizer.name} lr {config.optimizer.lr:g} | "
                + (f"**{lr:g}** | {rule} (the suggestion) | " if chosen else f"{lr:g} | {rule} (not used) | ")
                + (f"{wall:.1f} s ({found['seconds']:.1f} s for {found['batches']} batches) | " if chosen else "| ")
                + f"{'**' * chosen}{100 * final['test_accuracy']:.2f}%{'**' * chosen} after {final['epoch']} epochs |"
                f" {sum(e['train_seconds'] for e in run.epochs):.0f} s |"
            )
            print(rows[-1], flush=True)
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    command = f"{threads}{held_back_prefix(suffix)}.venv/bin/python benchmarks/lr_find_check.py"
    if args.configs != list(CONFIGS):
        command += " --configs " + " ".join(args.configs)
    table = "\n".join(
        [
            f"Command: `{command}`  ",
            f"Machine: {machine()}",
            "",
            "| config | as shipped | suggested lr | rule | `lr-find` wall time (the test's batches) | "
            "test accuracy, trained at the suggestion | training time |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
            "The wall time is the whole command as a user runs it (Python and torch starting, MNIST loading, the "
            "plot); the training is the config's own, with only `optimizer.lr` changed, the test set reporting "
            f"the last epoch. torch used {plural(torch.get_num_threads(), 'thread')}.",
        ]
    )
    write_section(f"lr-find{suffix}", table, DOC)
    print(f"wrote the table into {DOC.relative_to(ROOT)} (section lr-find{suffix}); command: {command}")
    if not suffix:  # the suggestions do not depend on the kernels' instruction set
        write_section("lr-find-rules", rules_table(args.configs, datasets, command, args.data_dir), DOC)


def rules_table(names: list[str], datasets: dict, command: str, data_dir: str | None) -> str:
    """What each rule suggests for each config at several test lengths and seeds: how steady each rule is."""
    rows = []
    for name in names:
        for seed in SEEDS:
            config = load_config(name).with_overrides({"training.seed": seed})
            d = config.data
            key = (d.dataset, d.val_size, seed)
            if key not in datasets:
                datasets[key] = load_data(d.dataset, data_dir, val_size=d.val_size, seed=seed)
            cells = []
            for batches in BATCHES:
                found = find_lr(config, data=datasets[key], device="cpu", max_batches=batches)
                cells.append(" / ".join(f"{found.candidates[rule]:.2g}" for rule in ("minimum/10", "steepest")))
            rows.append(f"| {name} | {seed} | " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
    return "\n".join(
        [
            f"Command: `{command}` (this second table)",
            "",
            "| config | seed | " + " | ".join(f"{b} batches" for b in BATCHES) + " |",
            "|---|---|" + "---|" * len(BATCHES),
            *rows,
            "",
            "Each cell: minimum/10 / steepest, the rates the two rules suggest from one range test (1e-7 to 10).",
        ]
    )


if __name__ == "__main__":
    main()
