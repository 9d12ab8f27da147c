"""How long one canvas drawing takes in-process: PNG decoding, preprocessing, and the bundled model's forward
pass, each timed apart (issue 10's budget: 5 ms for the whole of it on the 2-core CPU).

The drawings are MNIST *test* digits drawn as a 280x280 drawing app's export (black strokes on a transparent
canvas, about 20 px wide, tests/support/digit_images.py's `canvas_rgba`), half of them flattened onto white. Each stage
is timed on every drawing in turn, several rounds, and the median is reported. The model's forward pass is
also timed with torch held to AVX2 (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2, as on an AMD EPYC without
AVX-512), in a child process since the setting is read at start-up.

Run: .venv/bin/python benchmarks/preprocess_speed.py [--count 100] [--rounds 5] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from common import machine, write_section
from PIL import Image

from mnistlab.data.preprocess import preprocess
from mnistlab.data.splits import load_data
from mnistlab.infer.predict import classify
from mnistlab.models.files import LoadedModel, load_model
from tests.support.digit_images import canvas_rgba


def drawings(count: int, data_dir: str | None) -> list[bytes]:
    """`count` canvas PNGs of test digits, every other one flattened onto white."""
    test = load_data("mnist", data_dir, val_size=0).test
    files = []
    for i, digit in enumerate(test.images[:count].numpy()):
        image = canvas_rgba(digit)
        if i % 2:
            image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        files.append(buffer.getvalue())
    return files


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def median_ms(step, inputs: list, rounds: int) -> float:
    """The median over every input and round of one call of `step`, in milliseconds."""
    times = []
    for _ in range(rounds):
        for item in inputs:
            start = time.perf_counter()
            step(item)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def forward_ms(model: LoadedModel, tensors: list[torch.Tensor], rounds: int) -> float:
    classify(model, tensors[:1])  # warm-up
    return median_ms(lambda t: classify(model, [t]), tensors, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100, help="drawings")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--forward-only", action="store_true", help=argparse.SUPPRESS)  # the AVX2 child
    args = parser.parse_args()

    files = drawings(args.count, args.data_dir)
    images = [decode(data) for data in files]
    tensors = [preprocess(image).tensor for image in images]
    model = load_model(None, "cpu")
    if args.forward_only:
        print(json.dumps({"forward": forward_ms(model, tensors, args.rounds)}))
        return
    for image in images[:5]:
        preprocess(image)  # warm-up
    timings = {
        "decode": median_ms(decode, files, args.rounds),
        "preprocess": median_ms(preprocess, images, args.rounds),
        "decode + preprocess": median_ms(lambda data: preprocess(decode(data)), files, args.rounds),
        "forward": forward_ms(model, tensors, args.rounds),
        "all": median_ms(lambda data: classify(model, [preprocess(decode(data)).tensor]), files, args.rounds),
    }
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    child = [sys.executable, __file__, "--forward-only", "--count", str(args.count), "--rounds", str(args.rounds)]
    if args.data_dir:
        child += ["--data-dir", args.data_dir]
    result = subprocess.run(child, env=env, capture_output=True, text=True, check=True)
    avx2 = json.loads(result.stdout.strip().splitlines()[-1])["forward"]
    isa = torch.backends.cpu.get_cpu_capability()
    rows = [
        f"| PNG decode (280x280 RGBA) | {timings['decode']:.2f} |",
        f"| preprocess | {timings['preprocess']:.2f} |",
        f"| decode + preprocess | {timings['decode + preprocess']:.2f} |",
        f"| bundled model, forward of one image ({isa}) | {timings['forward']:.2f} |",
        f"| bundled model, forward of one image (AVX2 only) | {avx2:.2f} |",
        f"| decode + preprocess + forward | {timings['all']:.2f} |",
    ]
    section = f"""## One drawing in-process: decode, preprocess, classify

Command: `.venv/bin/python benchmarks/preprocess_speed.py --count {args.count} --rounds {args.rounds}`
Machine: {machine()}
{args.count} canvas drawings of MNIST test digits (280x280 RGBA PNG, black strokes about 20 px wide, half on a
transparent canvas, half on white); median milliseconds per drawing over {args.rounds} rounds of each.

| stage | median ms |
|---|---|
{chr(10).join(rows)}
"""
    print(section)
    write_section("preprocess-speed", section)


if __name__ == "__main__":
    main()
