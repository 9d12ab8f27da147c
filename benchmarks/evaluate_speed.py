"""Evaluating the bundled model (three CNNs averaged) on the 10,000 MNIST test images: the model as loaded in
batches of 2,000 (mnistlab before this change) against `evaluation.predict_scores` (BatchNorm folded into a
channels-last copy, batches of 128, glibc told to keep freed memory). Each variant runs in a fresh process, with
the CPU's native kernels and held to AVX2, and reports wall seconds and minor page faults.

Run: .venv/bin/python benchmarks/evaluate_speed.py [--data-dir DIR] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from common import AVX2, machine, write_section


def measure(variant: str, data_dir: str | None) -> dict[str, float]:
    """One timed evaluation in this process (run as a child by `main`)."""
    import torch

    from mnistlab.data.splits import load_data, to_float
    from mnistlab.models.files import load_model
    from mnistlab.models.metrics import predict_scores

    loaded = load_model(None)
    images = load_data("mnist", data_dir, val_size=0).test.images
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    if variant == "as loaded, batches of 2,000":
        model = loaded.model.eval()
        with torch.no_grad():
            scores = torch.cat([model(to_float(images[i : i + 2000])) for i in range(0, len(images), 2000)])
    else:
        with torch.no_grad():
            scores = predict_scores(loaded.model, images)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults,
        "digits": int(scores.argmax(1).sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.data_dir)))
        return
    variants = ["as loaded, batches of 2,000", "predict_scores (folded, channels-last, batches of 128)"]
    rows, digits = [], set()
    for variant in variants:
        cells = []
        for env in ({}, AVX2):
            runs = []
            for _ in range(args.repeats):
                command = [sys.executable, __file__, "--child", variant]
                command += ["--data-dir", args.data_dir] if args.data_dir else []
                out = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, check=True)
                runs.append(json.loads(out.stdout))
            digits |= {r["digits"] for r in runs}
            cells.append(
                f"{statistics.median(r['seconds'] for r in runs):.2f} s, "
                f"{statistics.median(r['faults'] for r in runs) / 1e6:.2f} M faults"
            )
        rows.append(f"| {variant} | {cells[0]} | {cells[1]} |")
    assert len(digits) == 1, "the variants disagree on the predictions"
    write_section(
        "evaluate-speed",
        "\n".join(
            [
                "## Evaluating the bundled model on the test set",
                "",
                f"Command: `.venv/bin/python benchmarks/evaluate_speed.py --repeats {args.repeats}`",
                f"Machine: {machine()}",
                "",
                "Wall time of the forward passes over the 10,000 test images (the bundled model: three CNNs "
                "averaged) and the minor page faults they took, median of fresh processes. AVX2: the same with "
                "`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`. Both variants give the same predictions.",
                "",
                "| variant | native | AVX2 |",
                "|---|---|---|",
                *rows,
            ]
        ),
    )


if __name__ == "__main__":
    main()
