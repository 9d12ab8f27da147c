"""Which non-digits pass the outlier flag: the share flagged of each letter, doodle and shape, and of the digit
lookalikes among them (O, l, Z, S, G, B, g, a circle: figures written as a digit is written) against the rest.

The letters, scribbles and shapes of tests/support/nondigits.py, `--count` of each kind generated with `--seed`
(default 1, as trust_table.py), each file named by the figure it shows (`figure_names`); every image goes through
the preprocessing `mnistlab predict` uses, and one that preprocessing refuses counts as flagged. The lookalikes
(`DIGIT_LOOKALIKES`) were chosen by their glyphs, not by any model's answers.

Run: .venv/bin/python benchmarks/nondigit_figures.py [--models RUN_DIR ...] [--bundled] [--count 1040] [--seed 1]
     [--no-write] [--section NAME]
"""

from __future__ import annotations

import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from common import machine, write_section
from trust_table import DOC, flagged, model_parser, models_of

from mnistlab.models.files import load_model
from tests.support.nondigits import DIGIT_LOOKALIKES, FIGURES, figure_names, write_nondigits

KINDS = tuple(FIGURES)


def share(flags: list[bool]) -> str:
    return f"{100 * sum(flags) / len(flags):.1f}%" if flags else "-"


def measure(path: str | None, sets: dict[str, tuple[list[Path], list[str]]]) -> tuple[list[str], list[str]]:
    """One model's rows: per kind, the shares flagged (all, lookalikes, the rest), and each figure's share."""
    model = load_model(path)
    name = Path(path).name if path else "bundled"
    rows, lines = [], []
    for kind, (paths, names) in sets.items():
        flags = flagged(model, paths)[0].tolist()
        looks = DIGIT_LOOKALIKES[kind]
        lookalike = [f for f, n in zip(flags, names) if n in looks]
        rest = [f for f, n in zip(flags, names) if n not in looks]
        rows.append(f"| {name} | {kind} | {share(flags)} | {share(lookalike)} | {share(rest)} |")
        per: dict[str, list[bool]] = defaultdict(list)
        for f, n in zip(flags, names):
            per[n].append(f)
        ordered = sorted(per, key=lambda n: (sum(per[n]) / len(per[n]), n))
        figures = ", ".join(f"{n}{' (lookalike)' if n in looks else ''} {share(per[n])}" for n in ordered)
        lines.append(f"- {name}, {kind}, least flagged first: {figures}")
    return rows, lines


def main() -> None:
    parser = model_parser(__doc__, 1040, "images per kind (1040: 20 of each letter)")
    parser.add_argument("--section", default="nondigit-figures", help="the section of docs/outliers.md written")
    args = parser.parse_args()
    models, shown = models_of(args)

    start = time.perf_counter()
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        sets = {
            kind: (
                write_nondigits(kind, args.count, Path(tmp) / kind, args.seed),
                figure_names(kind, args.count, args.seed),
            )
            for kind in KINDS
        }
        measured = [measure(path, sets) for path in models]
    minutes = (time.perf_counter() - start) / 60
    shown = shown + ([f"--count {args.count}"] if args.count != 1040 else [])
    text = f"""Command: `.venv/bin/python {" ".join(["benchmarks/nondigit_figures.py", *shown])}` ({minutes:.0f} min;
{args.count} images of each kind, generated with seed {args.seed}). Machine: {machine()}.

Share flagged of each kind, of its digit lookalikes (letters {"".join(sorted(DIGIT_LOOKALIKES["letters"]))}; the
shapes {", ".join(sorted(DIGIT_LOOKALIKES["shapes"]))}) and of its other figures.

| model | kind | flagged | lookalikes flagged | others flagged |
|---|---|---|---|---|
""" + "\n".join(row for rows, _ in measured for row in rows)
    text += "\n\n" + "\n".join(line for _, lines in measured for line in lines)
    print(text)
    if not args.no_write:
        write_section(args.section, text, DOC)


if __name__ == "__main__":
    main()
