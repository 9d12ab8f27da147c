"""Writes the check figures of docs/explain.md: whether the attribution maps of `mnistlab explain` mean something,
over the first N MNIST test digits (default 1,000) with the bundled model (three CNNs averaged), and how fast one
image is explained.

- completeness: integrated gradients' relative error (sum of the map against the score's difference from black)
  for the predicted class, at 32 steps and more;
- sanity (Adebayo et al. 2018): mean Spearman correlation between each method's map with the trained weights and
  with every layer re-initialised, and cascading from the top layer down (on the first --cascade images);
- deletion: the predicted class's calibrated probability as its digit's inked pixels are set to black, the most
  attributed first, against a random order; area under the curve (lower is better);
- speed: one image, integrated gradients with 32 steps, median of --repeats, in a fresh process with the CPU's
  own kernels and held to AVX2.

Run: .venv/bin/python benchmarks/explain_checks.py [--images 1000] [--cascade 100] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from common import AVX2, ROOT, machine, median_time, write_section

DOC = ROOT / "docs" / "explain.md"
STEP_COUNTS = (32, 64, 128, 256)


def speed(repeats: int, data_dir: str | None) -> dict[str, float]:
    """Seconds for one image explained by integrated gradients: the answer alone (`attribute`) with 32 steps (the
    goal's) and with the default, and the answer and the runner-up with the default (`explain`, what the CLI and
    the page ask), median of `repeats`."""
    import torch

    from mnistlab.data.splits import load_data
    from mnistlab.infer.explain import STEPS, attribute, explain
    from mnistlab.models.files import load_model

    model = load_model(None)
    image = load_data("mnist", data_dir, val_size=0).test.images[0].float() / 255
    target = torch.tensor([7])
    for _ in range(3):  # warm up
        attribute(model, image[None], target, "integrated-gradients", 32)
    one, _ = median_time(lambda: attribute(model, image[None], target, "integrated-gradients", 32), repeats)
    default, _ = median_time(lambda: attribute(model, image[None], target, "integrated-gradients"), repeats)
    two, _ = median_time(lambda: explain(model, image, "integrated-gradients"), repeats)
    return {"one": one, "default": default, "two": two, "steps": STEPS, "threads": torch.get_num_threads()}


def checks(count: int, cascade: int, data_dir: str | None) -> tuple[list[str], dict]:
    """The completeness, sanity and deletion tables (markdown lines) and their figures."""
    import torch

    from mnistlab.data.splits import load_data
    from mnistlab.infer.explain import METHODS, STEPS, attribute
    from mnistlab.models.files import load_model
    from tests.test_explain import (
        area,
        deletion_curves,
        deletion_orders,
        layers_of,
        networks_of,
        random_orders,
        reinitialised,
        spearman,
    )

    model = load_model(None)
    test = load_data("mnist", data_dir, val_size=0).test
    images = test.images[:count].float() / 255
    with torch.no_grad():
        targets = model.answering()(images)[0].argmax(1)
    figures: dict = {"images": count}
    lines = ["### Completeness of integrated gradients", ""]
    lines += ["| steps | median error | 95th percentile | worst | images within 1% |", "|---|---|---|---|---|"]
    maps = {}
    for steps in STEP_COUNTS:
        found, errors = attribute(model, images, targets, "integrated-gradients", steps)
        if steps == STEPS:  # the other checks read the maps users get
            maps["integrated-gradients"] = found
        q = torch.quantile(errors, torch.tensor([0.5, 0.95]))
        within = float((errors <= 0.01).float().mean())
        figures[f"completeness-{steps}"] = {"median": float(q[0]), "p95": float(q[1]), "within": within}
        lines.append(
            f"| {steps} | {100 * q[0]:.2f}% | {100 * q[1]:.2f}% | {100 * errors.max():.1f}% | {100 * within:.1f}% |"
        )
    for method in METHODS[1:]:
        maps[method] = attribute(model, images, targets, method)[0]

    lines += ["", "### Sanity: re-initialised weights", ""]
    blocks = len(layers_of(networks_of(model)[0]))
    head = " | ".join(f"top {k}" for k in range(1, blocks))
    lines += [
        f"Mean Spearman correlation between the trained map and the map after re-initialising: every layer "
        f"({count} digits), and the top k of the {blocks} weighted layers (cascading, first {cascade} digits). "
        "Below 0.5 passes; |map|: the same on absolute values.",
        "",
        f"| method | all layers | all layers, \\|map\\| | {head} |",
        "|---|---|---|" + "---|" * (blocks - 1),
    ]
    fresh = reinitialised(model)
    for method in METHODS:
        new = attribute(fresh, images, targets, method)[0]
        signed, absolute = spearman(maps[method], new).mean(), spearman(maps[method].abs(), new.abs()).mean()
        cells = []
        for top in range(1, blocks):
            part = attribute(reinitialised(model, top), images[:cascade], targets[:cascade], method)[0]
            cells.append(f"{spearman(maps[method][:cascade], part).mean():.2f}")
        figures[f"sanity-{method}"] = {"signed": float(signed), "absolute": float(absolute), "cascade": cells}
        lines.append(f"| {method} | {signed:.2f} | {absolute:.2f} | {' | '.join(cells)} |")

    lines += ["", "### Deletion curves", ""]
    lines += [
        "The predicted class's calibrated probability as its digit's inked pixels are set to black, 0% to 100% in "
        "steps of 5%, the most attributed first; area under the curve (lower is better) against a random order.",
        "",
        "| order | area under the curve | against random | probability after 10% deleted |",
        "|---|---|---|---|",
    ]
    random = deletion_curves(model, images, targets, random_orders(images))
    rows = {
        "random": random,
        **{m: deletion_curves(model, images, targets, deletion_orders(maps[m], images)) for m in METHODS},
    }
    for name, curves in rows.items():
        auc = float(area(curves).mean())
        figures[f"deletion-{name}"] = auc
        ratio = auc / float(area(random).mean())
        lines.append(f"| {name} | {auc:.3f} | {ratio:.2f} | {100 * curves[:, 2].mean():.1f}% |")
    return lines, figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000, help="test digits for the checks")
    parser.add_argument("--cascade", type=int, default=100, help="test digits for the cascading re-initialisation")
    parser.add_argument("--repeats", type=int, default=30, help="timed explanations per CPU kind")
    parser.add_argument("--data-dir")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # a timing in a fresh process
    args = parser.parse_args()
    if args.child:
        print(json.dumps(speed(args.repeats, args.data_dir)))
        return
    start = time.perf_counter()
    command = [sys.executable, __file__, "--child", "--repeats", str(args.repeats)]
    command += ["--data-dir", args.data_dir] if args.data_dir else []
    timed = {}
    for kind, env in (("native", {}), ("AVX2", AVX2)):
        out = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, check=True)
        timed[kind] = json.loads(out.stdout)
    lines, figures = checks(args.images, args.cascade, args.data_dir)
    run = f".venv/bin/python benchmarks/explain_checks.py --images {args.images} --cascade {args.cascade}"
    section = [
        "## Checks and speed",
        "",
        f"Command: `{run}` ({(time.perf_counter() - start) / 60:.0f} minutes)",
        f"Machine: {machine()}",
        f"Model: the bundled model (three CNNs; maps are the members' mean). Digits: the first {args.images} of the "
        "MNIST test split, each explained for its predicted class.",
        "",
        "### Speed",
        "",
        f"One image, integrated gradients, median of {args.repeats} in a fresh process "
        f"({timed['native']['threads']} threads); {timed['native']['steps']} steps is the default:",
        "",
        f"| kernels | the answer, 32 steps (`attribute`, the goal's) | the answer, {timed['native']['steps']} steps "
        f"| the answer and the runner-up, {timed['native']['steps']} steps (`explain`, as the CLI) |",
        "|---|---|---|---|",
        *(
            f"| {k} | {1000 * t['one']:.0f} ms | {1000 * t['default']:.0f} ms | {1000 * t['two']:.0f} ms |"
            for k, t in timed.items()
        ),
        "",
        *lines,
    ]
    write_section("explain-checks", "\n".join(section), DOC)
    print(json.dumps({**figures, "speed": timed}, indent=1))
    print(f"wrote docs/explain.md (section explain-checks); command: {run}")


if __name__ == "__main__":
    main()
