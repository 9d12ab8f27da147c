"""The robustness tables of docs/robustness.md, from `mnistlab robustness` output folders.

Each argument is LABEL=FOLDER, a folder written by `mnistlab robustness` (its robustness.json holds the command,
the device and every figure). The script writes a summary table and a per-corruption table between the
`<!-- begin robustness -->` markers of docs/robustness.md, copies each folder's chart to docs/img/robustness/,
and draws the first test digit under each corruption.

Run: .venv/bin/python benchmarks/robustness_table.py bundled=runs/rob-bundled cnn-robust=runs/rob-cnn-robust ...
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from common import write_section

from mnistlab.data.corruptions import CORRUPTIONS, corrupt
from mnistlab.data.splits import load_data
from mnistlab.plots import plot_gallery

DOCS = Path(__file__).resolve().parents[1] / "docs"
IMAGES = DOCS / "img" / "robustness"


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def attack(result: dict, name: str, eps: float) -> str:
    rows = result.get("adversarial", {}).get("results", [])
    found = [r["accuracy"] for r in rows if r["attack"] == name and r["eps"] == eps]
    return pct(found[0]) if found else "-"


def tables(results: dict[str, dict]) -> str:
    eps = (0.1, 0.2, 0.3)
    lines = [
        "| model | clean | mean over the 15 corruptions | mean error / clean error | "
        + " | ".join(f"FGSM {e:g}" for e in eps)
        + " | "
        + " | ".join(f"PGD-40 {e:g}" for e in eps)
        + " |",
        "|---|---|---|---|" + "---|" * 6,
    ]
    for label, r in results.items():
        relative = r.get("mean_relative_error")
        lines.append(
            f"| {label} | {pct(r['clean_accuracy'])} | **{pct(r.get('mean_corruption_accuracy'))}** | "
            + ("n/a" if relative is None else f"{relative:.1f}x")
            + " | "
            + " | ".join(attack(r, "fgsm", e) for e in eps)
            + " | "
            + " | ".join(f"**{attack(r, 'pgd', e)}**" if e == 0.3 else attack(r, "pgd", e) for e in eps)
            + " |"
        )
    lines += ["", "Accuracy per corruption (all 10,000 test images):", ""]
    lines.append("| corruption | " + " | ".join(results) + " |")
    lines.append("|---|" + "---|" * len(results))
    for name in CORRUPTIONS:
        cells = [pct(r["corruptions"][name]["accuracy"]) if name in r["corruptions"] else "-" for r in results.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "How each row was measured:", ""]
    for label, r in results.items():
        seconds = sum(r["seconds"].values())
        lines.append(f"- {label}: `{r['command']}` ({seconds:.0f} s on {r['device']}, torch {r['torch']})")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    results = {}
    IMAGES.mkdir(parents=True, exist_ok=True)
    for arg in argv:
        label, _, folder = arg.partition("=")
        results[label] = json.loads((Path(folder) / "robustness.json").read_text())
        shutil.copyfile(Path(folder) / "corruptions.png", IMAGES / f"{label}.png")
    write_section("robustness", tables(results), DOCS / "robustness.md")
    test = load_data("mnist", val_size=0).test.images[:1]
    images = [test[0].numpy()] + [corrupt(test, name)[0].numpy() for name in CORRUPTIONS]
    names = ["clean"] + [name.replace("_", " ") for name in CORRUPTIONS]
    plot_gallery(images, names, IMAGES / "corruptions.png", "MNIST-C's corruptions of the first test digit", 8)


if __name__ == "__main__":
    main(sys.argv[1:])
