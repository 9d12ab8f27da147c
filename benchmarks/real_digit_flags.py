"""Which real digits the outlier flag stops, and whether they are the ones the model gets wrong: for each kind of
real-world digit image (photos, scans, fonts, canvas drawings) and each kind of scan apart (tight crops, low
resolutions, very thick and very thin pens), the share flagged, the answers that are wrong, how many of those
are flagged, and the accuracy on the images let through.

The images come from tests/support (digit_images.py, nondigits.py; MNIST *test* digits for all but the fonts),
`--count` of each, generated with `--seed` (default 1, as trust_table.py); each goes through the preprocessing
`mnistlab predict` uses, and one that preprocessing refuses counts as flagged (and as wrong).

Run: .venv/bin/python benchmarks/real_digit_flags.py [--models RUN_DIR ...] [--bundled] [--count 300] [--seed 1]
     [--data-dir DIR] [--no-write]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import machine, write_section
from trust_table import DOC, flagged, model_parser, models_of

from mnistlab.data.splits import load_data
from mnistlab.models.files import LoadedModel, load_model
from tests.support.digit_images import TOUGH_KINDS, realistic_image
from tests.support.nondigits import REAL_DIGIT_KINDS, write_real_digits


def scans_by_kind(count: int, seed: int, folder: Path, data_dir: str | None) -> dict[str, list[tuple[Path, int]]]:
    """`count` scans of each of digit_images' TOUGH_KINDS, of random MNIST test digits: {kind: [(path, label)]}."""
    test = load_data("mnist", data_dir, val_size=0).test
    rng = np.random.default_rng(seed)
    sets = {}
    for kind in TOUGH_KINDS:
        picks = rng.integers(len(test.labels), size=count)
        sets[f"scans: {kind}"] = [
            (
                realistic_image(kind, test.images[i].numpy(), int(rng.integers(2**31)), folder / kind),
                int(test.labels[i]),
            )
            for i in picks
        ]
    return sets


def row(name: str, model_name: str, model: LoadedModel, written: list[tuple[Path, int]]) -> tuple[str, dict]:
    """One table row (markdown) and its figures: images, flagged, wrong, wrong and flagged, accuracy let through."""
    paths, labels = [p for p, _ in written], torch.tensor([label for _, label in written])
    flags, probabilities, _, kept = flagged(model, paths)
    said = torch.full((len(paths),), -1)  # a file preprocessing refuses: flagged, and no answer
    said[kept] = probabilities.argmax(1)
    wrong = said != labels
    passed = ~flags
    figures = {
        "images": len(paths),
        "flagged": int(flags.sum()),
        "wrong": int(wrong.sum()),
        "wrong_flagged": int((wrong & flags).sum()),
        "passed_accuracy": float((~wrong[passed]).float().mean()) if passed.any() else None,
    }
    accuracy = "-" if figures["passed_accuracy"] is None else f"{100 * figures['passed_accuracy']:.2f}%"
    line = (
        f"| {model_name} | {name} | {figures['images']} | {100 * figures['flagged'] / len(paths):.1f}% | "
        f"{figures['wrong']} | {figures['wrong_flagged']} | {accuracy} |"
    )
    return line, figures


def main() -> None:
    parser = model_parser(__doc__, 300, "images of each kind and of each kind of scan")
    parser.add_argument("--data-dir", default=None, help="MNIST's folder")
    args = parser.parse_args()
    models, shown = models_of(args)

    start = time.perf_counter()
    lines = [
        "| model | kind | images | flagged | wrong answers | wrong and flagged | accuracy of the rest |",
        "|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        mnist_dir = Path(args.data_dir) if args.data_dir else None
        sets = {
            kind: write_real_digits(kind, args.count, Path(tmp) / kind, args.seed, mnist_dir)
            for kind in REAL_DIGIT_KINDS
        }
        sets |= scans_by_kind(args.count, args.seed, Path(tmp) / "by-kind", args.data_dir)
        for path in models:
            model = load_model(path)
            name = "bundled" if path is None else Path(path).name
            for kind, written in sets.items():
                line, _ = row(kind, name, model, written)
                lines.append(line)
                print(line, flush=True)
    command = " ".join(["benchmarks/real_digit_flags.py", *shown, "--count", str(args.count), "--seed", str(args.seed)])
    minutes = (time.perf_counter() - start) / 60
    section = "\n".join(
        [
            f"Command: `.venv/bin/python {command}` ({minutes:.0f} min). Machine: {machine()}.",
            "",
            f"Real-world digit images: photos, scans, fonts and canvas drawings as trust_table.py makes them "
            f"({args.count} of each), then {args.count} of each kind of scan apart. A file preprocessing refuses "
            "counts as flagged and wrong.",
            "",
            *lines,
        ]
    )
    if not args.no_write:
        write_section("real-digit-flags", section, DOC)
        print(f"wrote {DOC.relative_to(DOC.parents[1])} (section real-digit-flags)")


if __name__ == "__main__":
    main()
