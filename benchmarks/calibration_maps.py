"""Which post-hoc map brings the report's networks to ECE <= 1%, and at what price (issue 22).

For each run directory: its raw probabilities on its own validation split (the split it was trained beside) and
on the test split; maps fitted on the validation split, then measured on the test split: one temperature; the
temperature then the shipped confidence map (models/calibration.py: the top class's probability through a
monotone piecewise-linear curve, the others moved so that no class changes place), with 5, 10 (shipped) and 20
pieces; vector scaling (a weight and a bias per class on the log-probabilities) and matrix scaling (a full 10x10
map and a bias). The last two may change answers: the share changed and the test accuracy after them say how
much. Beside each: |test accuracy - mean confidence|, a floor under the ECE that no map fitted on the validation
split can pass where the test split is easier or harder than the validation split for the model.

Run: .venv/bin/python benchmarks/calibration_maps.py RUN_DIR... [--data-dir DIR] [--no-write]
"""

from __future__ import annotations

import argparse
import time

import torch
from common import ROOT, machine, write_section

from mnistlab.data.splits import load_data, to_float
from mnistlab.models.calibration import (
    PIECES,
    calibration,
    fit_confidence_map,
    fit_temperature,
    log_probabilities,
    temper,
)
from mnistlab.models.files import LoadedModel, load_model
from mnistlab.models.networks import as_probabilities

DOC = ROOT / "docs" / "outliers.md"


@torch.inference_mode()
def raw_probabilities(loaded: LoadedModel, images: torch.Tensor) -> torch.Tensor:
    outputs = torch.cat([loaded.model(to_float(chunk)) for chunk in images.split(2048)])
    return as_probabilities(outputs.float(), loaded.probabilities).double()


def scaling(val: torch.Tensor, val_labels: torch.Tensor, test: torch.Tensor, full: bool) -> torch.Tensor:
    """Vector (a weight and bias per class) or matrix scaling of the log-probabilities, fitted by L-BFGS."""
    classes = val.shape[1]
    weight = torch.eye(classes, dtype=torch.float64) if full else torch.ones(classes, dtype=torch.float64)
    bias = torch.zeros(classes, dtype=torch.float64)
    weight.requires_grad_(), bias.requires_grad_()

    def mapped(probs: torch.Tensor) -> torch.Tensor:
        z = log_probabilities(probs)
        return (z @ weight if full else z * weight) + bias

    optimizer = torch.optim.LBFGS([weight, bias], max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(mapped(val), val_labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return mapped(test).softmax(1).detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories (trained as shipped)")
    parser.add_argument("--data-dir", help="where the data sets are (default: as the CLI finds them)")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave docs/outliers.md alone")
    args = parser.parse_args()
    began = time.perf_counter()
    rows = []
    for run in args.runs:
        loaded = load_model(run)
        meta = loaded.metadata
        split = meta.get("split") or {}
        data = load_data(meta["dataset"], args.data_dir, split.get("val_size", 5000), split.get("seed", 0))
        val, test = raw_probabilities(loaded, data.val.images), raw_probabilities(loaded, data.test.images)
        val_labels, test_labels = data.val.labels.long(), data.test.labels.long()
        temperature = fit_temperature(val, val_labels)
        tempered = temper(test, temperature)
        maps = {"temperature": tempered}
        for pieces in (5, PIECES, 20):
            confidence_map = fit_confidence_map(temper(val, temperature), val_labels, pieces)
            shipped = " (shipped)" if pieces == PIECES else ""
            maps[f"temperature + confidence map, {pieces} pieces{shipped}"] = confidence_map(tempered)
        maps |= {
            "vector scaling": scaling(val, val_labels, test, full=False),
            "matrix scaling": scaling(val, val_labels, test, full=True),
        }
        answers = test.argmax(1)
        for name, probs in maps.items():
            changed = float((probs.argmax(1) != answers).double().mean())
            accuracy = float((probs.argmax(1) == test_labels).double().mean())
            ece = calibration(probs, test_labels).ece
            floor = abs(accuracy - float(probs.max(1).values.mean()))
            config = meta.get("config", run)
            rows.append(
                f"| {config} | {name} | {100 * ece:.2f}% | {100 * floor:.2f}% | {100 * accuracy:.2f}% | "
                f"{100 * changed:.1f}% |"
            )
            print(rows[-1], flush=True)
    table = "\n".join(
        [
            f"Command: `.venv/bin/python benchmarks/calibration_maps.py {' '.join(args.runs)}` "
            f"({(time.perf_counter() - began) / 60:.1f} min)",
            f"Machine: {machine()}",
            "",
            "| model | map (fitted on the validation split) | test ECE | \\|accuracy - mean confidence\\| | "
            "test accuracy | answers changed |",
            "|---|---|---:|---:|---:|---:|",
            *rows,
        ]
    )
    if not args.no_write:
        write_section("calibration-maps", table, DOC)
    print(table)


if __name__ == "__main__":
    main()
