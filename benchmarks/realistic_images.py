"""Accuracy on a user's kind of images: MNIST *test* digits rendered as photos, scans and drawings.

Each kind (ink on tinted, unevenly lit, noisy paper as JPEG and PNG; a small digit in the corner of a large
photo; a transparent drawing canvas; palette, greyscale and EXIF-rotated files; chalk on a board; and the
untouched 28x28 digits), and the tougher kinds of issue 13 (digits cropped tightly to their ink, low
resolution as-is or enlarged, very thick and very thin strokes), is built from the same test digits by
tests/support/digit_images.py, then classified through `mnistlab.predict.predict_images`, exactly as `mnistlab
predict` does.

Run: .venv/bin/python benchmarks/realistic_images.py [--model RUN_DIR] [--count 500] [--data-dir DIR]
     [--kinds KIND ...] (a subset prints its table without writing docs/benchmarks.md)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import machine, write_section

from mnistlab.data.splits import load_data
from mnistlab.infer.predict import predict_images
from mnistlab.models.files import load_model
from tests.support.digit_images import KINDS, TOUGH_KINDS, realistic_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the bundled model")
    parser.add_argument("--count", type=int, default=500, help="test digits per kind")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--kinds", nargs="+", choices=KINDS + TOUGH_KINDS, default=None, help="default: all")
    args = parser.parse_args()

    test = load_data("mnist", args.data_dir, val_size=0).test
    index = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[: args.count]
    images, labels = test.images[index].numpy(), test.labels[index].tolist()
    model = load_model(args.model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds or KINDS + TOUGH_KINDS:
            folder = Path(tmp) / kind
            for i, digit in enumerate(images):
                realistic_image(kind, digit, i, folder)
            start = time.perf_counter()
            found = list(predict_images([folder], model))
            seconds = time.perf_counter() - start
            correct = sum(p.label == labels[i] for i, p in enumerate(found))
            failed = sum(p.error is not None for p in found)
            rows.append(
                f"| {kind} | {len(found)} | {100 * correct / len(found):.1f}% | {failed} "
                f"| {1000 * seconds / len(found):.0f} |"
            )
            print(rows[-1], flush=True)
    name = args.model or "the bundled model"
    command = "benchmarks/realistic_images.py" + (f" --model {args.model}" if args.model else "")
    section = f"""## Accuracy on realistic images

Command: `.venv/bin/python {command} --count {args.count}`
Machine: {machine()}
Model: {name}. Each kind renders the same {args.count} randomly chosen MNIST *test* digits (seed 0); ms/image
covers reading, preprocessing and classifying.

| kind of image | images | accuracy | refused | ms/image |
|---|---|---|---|---|
{chr(10).join(rows)}
"""
    print(section)
    if args.kinds is None:
        write_section("realistic-images", section)


if __name__ == "__main__":
    main()
