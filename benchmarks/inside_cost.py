"""The cost of looking inside a model (mnistlab.infer.inside): building the nearest-training-digits index over the
60,000 training images, the memory it holds, one query, one image's layer views, and whether the neighbours make
sense (the share of test digits whose nearest training digit carries their label).

Models: the bundled model (three CNNs, 1,152 features each) and a seed-B MLP (784-512-10, seed-b-fixed trained
for 2 epochs into a temporary folder, or the run directory given with --mlp). Each model is measured in a fresh
process, with the CPU's native kernels and held to AVX2 (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2).
Prints a markdown section; --write also puts it into docs/explain.md (between `<!-- begin inside-cost -->` and
`<!-- end inside-cost -->`).

Run: .venv/bin/python benchmarks/inside_cost.py [--mlp RUN_DIR] [--digits 1000] [--queries 50] [--data-dir DIR]
     [--native-only] [--write]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import AVX2, ROOT, machine, write_section

DOC = ROOT / "docs" / "explain.md"


def _resident_mb(peak: bool = False) -> float:
    """This process's resident memory in MB (Linux): now, with the memory glibc keeps for reuse handed back
    first, or its peak since `_reset_peak` (VmHWM: ru_maxrss would count the parent's peak, kept across exec)."""
    if not peak:
        ctypes.CDLL(None).malloc_trim(0)
    key = "VmHWM:" if peak else "VmRSS:"
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key))
    return int(line.split()[1]) * 1024 / 1e6


def _reset_peak() -> None:
    """Start VmHWM again from the resident memory now."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def measure(model_path: str | None, data_dir: str | None, digits: int, queries: int) -> dict:
    """One model's figures, in this process (run as a child by `main`)."""
    import torch

    from mnistlab.data.splits import load_data, to_float
    from mnistlab.infer.inside import NeighbourIndex, layer_views
    from mnistlab.models.files import load_model

    loaded = load_model(model_path)
    before = _resident_mb()
    _reset_peak()
    start = time.perf_counter()
    index = NeighbourIndex.build(loaded, data_dir)
    build = time.perf_counter() - start
    peak = _resident_mb(peak=True) - before
    held = _resident_mb() - before
    test = load_data(loaded.dataset, data_dir, val_size=0).test
    images, labels = to_float(test.images[:digits]), test.labels[:digits]
    _, rows = index.search(images, 5)
    found = index.labels[rows].long()
    query_times, view_times = [], []
    for image in images[:queries]:
        start = time.perf_counter()
        index.nearest(image, 5)
        query_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        layer_views(loaded, image)
        view_times.append(time.perf_counter() - start)
    return {
        "images": len(index),
        "members": index.members,
        "width": index.vectors.shape[1],
        "build_s": build,
        "index_mb": index.nbytes / 1e6,
        "held_mb": held,
        "peak_mb": peak,
        "query_ms": 1000 * statistics.median(query_times),
        "views_ms": 1000 * statistics.median(view_times),
        "top1": float((found[:, 0] == labels).double().mean()),
        "top5": float((found == labels[:, None]).double().mean()),
        "digits": len(labels),
        "capability": torch.backends.cpu.get_cpu_capability(),
    }


def _mlp(folder: Path, data_dir: str | None) -> Path:
    """seed-b-fixed trained for 2 epochs into `folder`."""
    from mnistlab.config import load_config
    from mnistlab.train.loop import train

    config = load_config("seed-b-fixed").with_overrides({"training.epochs": 2})
    train(config, out_dir=folder, data_dir=data_dir, device="cpu", quiet=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mlp", help="a seed-B run directory (default: train seed-b-fixed for 2 epochs)")
    parser.add_argument("--digits", type=int, default=1000, help="test digits whose neighbours' labels are checked")
    parser.add_argument("--queries", type=int, default=50, help="single-image queries timed")
    parser.add_argument("--data-dir")
    parser.add_argument("--native-only", action="store_true", help="skip the AVX2 runs")
    parser.add_argument("--write", action="store_true", help="also write the section into docs/explain.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        path = None if args.child == "bundled" else args.child
        print(json.dumps(measure(path, args.data_dir, args.digits, args.queries)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        mlp = args.mlp or str(_mlp(Path(tmp) / "seed-b", args.data_dir))
        rows = []
        for name, model in (("bundled (3 CNNs)", "bundled"), ("seed-B MLP (784-512-10)", mlp)):
            for env in ({},) if args.native_only else ({}, AVX2):
                command = [sys.executable, __file__, "--child", model, "--digits", str(args.digits)]
                command += ["--queries", str(args.queries)] + (["--data-dir", args.data_dir] if args.data_dir else [])
                out = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, check=True)
                r = json.loads(out.stdout)
                rows.append(
                    f"| {name} | {r['capability']} | {r['images']:,} x {r['width']} | {r['build_s']:.1f} s | "
                    f"{r['index_mb']:.0f} MB ({r['held_mb']:.0f} MB held, {r['peak_mb']:.0f} MB peak) | "
                    f"{r['query_ms']:.1f} ms | {r['views_ms']:.1f} ms | "
                    f"{100 * r['top1']:.1f}% | {100 * r['top5']:.1f}% |"
                )
    prefix = "" if args.mlp is None else f" --mlp {args.mlp}"
    markdown = "\n".join(
        [
            "## The cost of looking inside: layer views and the nearest training digits",
            "",
            f"Command: `.venv/bin/python benchmarks/inside_cost.py{prefix} --digits {args.digits}`",
            f"Machine: {machine()}",
            "",
            "The index holds every training image's penultimate features (an ensemble: every member's), projected "
            "onto at most 256 directions each, L2-normalised, as float16, with the images and labels it shows "
            "(`mnistlab.infer.inside.NeighbourIndex`). Build: the forward passes over the 60,000 training images "
            "in batches of 128, once per model. Memory: the index's tensors; held: the process's resident memory "
            "after the build minus before it; peak: its highest resident memory during the build minus before. "
            "Query: `nearest(image, k=5)` for one test digit (its features, one float16 pass over the index, the "
            f"candidates ranked in float32), median of {args.queries}; views: `layer_views` for one digit, median. "
            f"Agreement: the share of the first {args.digits:,} test digits whose nearest training digit has their "
            "label, and the share of their 5 nearest that do. The MLP was trained for 2 epochs (seed-b-fixed). "
            "CPU: native, and held to AVX2 with `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`.",
            "",
            "| model | CPU | index | build | memory | query | views | nearest has the label | of the 5 nearest |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print(markdown)
    if args.write:
        write_section("inside-cost", markdown, DOC)


if __name__ == "__main__":
    main()
