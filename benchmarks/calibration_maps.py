"""Which post-hoc map could bring the report's networks to ECE <= 1%, and at what price (issue 22).

For each run directory: its raw probabilities on its own validation split (the split it was trained beside) and
on the test split; maps fitted on the validation split by negative log-likelihood, then measured on the test
split: the shipped one temperature; a temperature then top-label isotonic regression (the top class's probability
mapped by a monotone fit of right/wrong on it; the others rescaled; floored so that the answer never changes);
vector scaling (a weight and a bias per class on the log-probabilities) and matrix scaling (a full 10x10 map and
a bias). The last two may change answers: the share changed and the test accuracy after them say how much.

Run: .venv/bin/python benchmarks/calibration_maps.py RUN_DIR... [--data-dir DIR] [--no-write]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from common import ROOT, machine, write_section

from mnistlab.data.splits import load_data, to_float
from mnistlab.models.calibration import calibration, fit_temperature, log_probabilities, temper
from mnistlab.models.files import LoadedModel, load_model
from mnistlab.models.networks import as_probabilities

DOC = ROOT / "docs" / "outliers.md"


@torch.inference_mode()
def raw_probabilities(loaded: LoadedModel, images: torch.Tensor) -> torch.Tensor:
    outputs = torch.cat([loaded.model(to_float(chunk)) for chunk in images.split(2048)])
    return as_probabilities(outputs.float(), loaded.probabilities).double()


def isotonic(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pool-adjacent-violators: knots (x, fitted y) of the non-decreasing fit of y on x."""
    order = np.argsort(x)
    means, weights, lows, highs = [], [], [], []
    for xi, yi in zip(x[order], y[order]):
        means.append(float(yi))
        weights.append(1.0)
        lows.append(xi)
        highs.append(xi)
        while len(means) > 1 and means[-2] > means[-1]:
            w = weights[-2] + weights[-1]
            means[-2:] = [(means[-2] * weights[-2] + means[-1] * weights[-1]) / w]
            weights[-2:], lows[-2:], highs[-2:] = [w], [lows[-2]], [highs[-1]]
    return (np.array(lows) + np.array(highs)) / 2, np.array(means)


def top_label(val: torch.Tensor, val_labels: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """`test` with its top probability mapped by the isotonic fit on `val`, the others rescaled, the answer kept."""
    confidence, label = val.max(1)
    knots = isotonic(confidence.numpy(), (label == val_labels).double().numpy())
    top, answer = test.max(1)
    mapped = torch.from_numpy(np.interp(top.numpy(), *knots)).clamp(1e-6, 1)
    second = test.topk(2, 1).values[:, 1]
    mapped = torch.maximum(mapped, second / (1 - top + second) + 1e-9)  # the top class stays on top
    out = test * ((1 - mapped) / (1 - top).clamp_min(1e-12))[:, None]
    out[torch.arange(len(test)), answer] = mapped
    return out


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
        maps = {
            "temperature": tempered,
            "temperature + top-label isotonic": top_label(temper(val, temperature), val_labels, tempered),
            "vector scaling": scaling(val, val_labels, test, full=False),
            "matrix scaling": scaling(val, val_labels, test, full=True),
        }
        answers = test.argmax(1)
        for name, probs in maps.items():
            changed = float((probs.argmax(1) != answers).double().mean())
            accuracy = float((probs.argmax(1) == test_labels).double().mean())
            ece = calibration(probs, test_labels).ece
            config = meta.get("config", run)
            rows.append(f"| {config} | {name} | {100 * ece:.2f}% | {100 * accuracy:.2f}% | {100 * changed:.1f}% |")
            print(rows[-1], flush=True)
    table = "\n".join(
        [
            f"Command: `.venv/bin/python benchmarks/calibration_maps.py {' '.join(args.runs)}` "
            f"({(time.perf_counter() - began) / 60:.1f} min)",
            f"Machine: {machine()}",
            "",
            "| model | map (fitted on the validation split) | test ECE | test accuracy | answers changed |",
            "|---|---|---:|---:|---:|",
            *rows,
        ]
    )
    if not args.no_write:
        write_section("calibration-maps", table, DOC)
    print(table)


if __name__ == "__main__":
    main()
