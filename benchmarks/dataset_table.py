"""The measured accuracy of the shipped Fashion-MNIST configs in docs/datasets.md, from their run directories.

Train each config first (under the shared CPU lock on a shared machine), then point this script at the runs:

    mnistlab train --config fashion-mlp --data-dir DIR --out runs/fashion-mlp   (and fashion-cnn, fashion-best)
    .venv/bin/python benchmarks/dataset_table.py runs/fashion-mlp runs/fashion-cnn runs/fashion-best

Each row comes from the run's metrics.json (final test accuracy, training seconds without evaluation) and its
config.toml; the CPU is the one this script runs on, so run it where the training ran.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from common import write_section

from mnistlab.config import load_config
from mnistlab.devices import describe_cpu

DOC = Path(__file__).resolve().parents[1] / "docs" / "datasets.md"
ANCHORS = "Published anchors: small CNNs 91.6-93.2%, a WideResNet (with heavy augmentation) 96.7%."


def main(run_dirs: list[str]) -> None:
    lines = [
        "| config | network | epochs | test accuracy (10,000 images) | best epoch's test accuracy | training time |",
        "|---|---|---|---|---|---|",
    ]
    commands = []
    for folder in map(Path, run_dirs):
        config = load_config(folder / "config.toml")
        epochs = json.loads((folder / "metrics.json").read_text())["epochs"]
        final, best = epochs[-1], max(epochs, key=lambda e: e["test_accuracy"])
        seconds = sum(e["train_seconds"] for e in epochs)
        network = config.summary().split(",")[0]  # "MLP 784-...-10" or "CNN of N layers"
        lines.append(
            f"| {config.name} | {network} | {len(epochs)} | **{100 * final['test_accuracy']:.2f}%** | "
            f"{100 * best['test_accuracy']:.2f}% (epoch {best['epoch']}) | {seconds:.0f} s |"
        )
        commands.append(f"mnistlab train --config {config.name} --data-dir DIR --out {folder}")
    lines += [
        "",
        f"Measured on {describe_cpu()}, one run at a time, 2 threads; the time is training only (evaluation "
        "excluded). The saved model is the last epoch's; the best epoch is shown for information only (the test "
        "set chooses nothing).",
        "",
        "```sh",
        *commands,
        "```",
        "",
        ANCHORS,
    ]
    write_section("fashion", "\n".join(lines), DOC)


if __name__ == "__main__":
    main(sys.argv[1:])
