"""Figures: per-run curves and overlays of several runs (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

_SPLITS = (("train", "-"), ("val", "--"), ("test", ":"))


def plot_curves(epochs: Sequence[Mapping], path: Path, title: str) -> Path:
    """Accuracy and loss per epoch, train vs validation vs test (the report's Figures 5-7)."""
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4))
    xs = [e["epoch"] for e in epochs]
    for split, style in _SPLITS:
        if epochs and epochs[0].get(f"{split}_accuracy") is not None:
            acc_ax.plot(xs, [100 * e[f"{split}_accuracy"] for e in epochs], style, marker="o", label=split)
            loss_ax.plot(xs, [e[f"{split}_loss"] for e in epochs], style, marker="o", label=split)
    _finish(fig, acc_ax, loss_ax, title)
    return _save(fig, path)


def plot_overlay(runs: Mapping[str, Sequence[Mapping]], path: Path, split: str = "test") -> Path:
    """One figure with every run's accuracy and loss on `split`, for side-by-side comparison."""
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, epochs in runs.items():
        xs = [e["epoch"] for e in epochs]
        acc_ax.plot(xs, [100 * e[f"{split}_accuracy"] for e in epochs], marker=".", label=name)
        loss_ax.plot(xs, [e[f"{split}_loss"] for e in epochs], marker=".", label=name)
    _finish(fig, acc_ax, loss_ax, f"{split} accuracy and loss per epoch")
    return _save(fig, path)


def _finish(fig, acc_ax, loss_ax, title: str) -> None:
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
