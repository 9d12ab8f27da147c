"""Figures: per-run curves, overlays of several runs, confusion matrices and galleries.

Drawn on `matplotlib.figure.Figure` objects, which need no display and never touch pyplot's global state, so
importing mnistlab in a notebook leaves its plotting backend alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.figure import Figure

from mnistlab.files import replacing

_SPLITS = (("train", "-"), ("val", "--"), ("test", ":"))


def plot_curves(epochs: Sequence[Mapping], path: Path, title: str) -> Path:
    """Accuracy and loss per epoch, train vs validation vs test (the report's Figures 5-7)."""
    fig, (acc_ax, loss_ax) = _subplots(1, 2, figsize=(10, 4))
    xs = [e["epoch"] for e in epochs]
    for split, style in _SPLITS:
        if epochs and epochs[0].get(f"{split}_accuracy") is not None:
            acc_ax.plot(xs, [100 * e[f"{split}_accuracy"] for e in epochs], style, marker="o", label=split)
            loss_ax.plot(xs, [e[f"{split}_loss"] for e in epochs], style, marker="o", label=split)
    _finish(fig, acc_ax, loss_ax, title)
    return _save(fig, path)


def plot_overlay(runs: Mapping[str, Sequence[Mapping]], path: Path, split: str = "test") -> Path:
    """One figure with every run's accuracy and loss on `split`, for side-by-side comparison."""
    fig, (acc_ax, loss_ax) = _subplots(1, 2, figsize=(11, 4.5))
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
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=100, format=path.suffix.lstrip(".") or "png")
    return path


def _subplots(rows: int = 1, columns: int = 1, figsize: tuple[float, float] = (6.4, 4.8), **kwargs):
    """A figure and its axes, as `pyplot.subplots` gives them, without pyplot."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(rows, columns, **kwargs)


def plot_prediction(original, digit, probabilities, path: Path, title: str) -> Path:
    """The image as given, the 28x28 the model saw, and the probabilities as a bar chart."""
    fig, (a, b, c) = _subplots(1, 3, figsize=(10, 3.2), gridspec_kw={"width_ratios": [1.3, 1, 1.6]})
    a.imshow(original)
    a.set_title("original")
    b.imshow(digit, cmap="gray", vmin=0, vmax=1)
    b.set_title("what the model saw (28x28)")
    for ax in (a, b):
        ax.axis("off")
    best = max(range(10), key=lambda d: probabilities[d])
    c.bar(range(10), probabilities, color=["tab:orange" if d == best else "tab:blue" for d in range(10)])
    c.set(xticks=range(10), ylim=(0, 1), xlabel="digit", ylabel="probability")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion(
    matrix: Sequence[Sequence[int]], path: Path, title: str, classes: Sequence[str] | None = None
) -> Path:
    """The confusion matrix with counts; the diagonal is left pale so the mistakes stand out. `classes` names
    the rows and columns (default: the digits)."""
    import numpy as np

    counts = np.array(matrix)
    off = counts.copy()
    np.fill_diagonal(off, 0)
    fig, ax = _subplots(figsize=(6.5, 5.5))
    image = ax.imshow(off, cmap="Reds")
    for (i, j), v in np.ndenumerate(counts):
        if v:
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="black" if i != j else "grey")
    names = list(classes) if classes else [str(d) for d in range(10)]
    short = max(map(len, names)) < 3  # digits stay upright; words ("T-shirt/top") are slanted to fit
    ax.set_xticks(range(10), names, rotation=0 if short else 45, ha="center" if short else "right")
    ax.set_yticks(range(10), names)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.colorbar(image, ax=ax, label="mistakes")
    fig.tight_layout()
    return _save(fig, path)


def plot_gallery(images, captions: Sequence[str], path: Path, title: str, columns: int = 10) -> Path:
    """A grid of 28x28 digits, each with a caption."""
    rows = max(1, -(-len(images) // columns))
    fig, axes = _subplots(rows, columns, figsize=(columns * 1.1, rows * 1.35), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, captions):
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        ax.set_title(caption, fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_sweep_objective(
    numbers: Sequence[int],
    values: Sequence[float],
    pruned: Sequence[bool],
    sign: int,
    path: Path,
    title: str,
    ylabel: str,
) -> Path:
    """A sweep's objective by trial number: complete trials filled, pruned ones hollow (at the epoch they
    stopped), and the best complete value so far as a step line (`sign` +1 when higher is better)."""
    fig, ax = _subplots(figsize=(8, 4.5))
    done = [(n, v) for n, v, p in zip(numbers, values, pruned) if not p]
    cut = [(n, v) for n, v, p in zip(numbers, values, pruned) if p]
    if done:
        ax.scatter(*zip(*done), color="tab:blue", label="complete", zorder=3)
        best, xs, ys = None, [], []
        for n, v in sorted(done):
            best = v if best is None or sign * v > sign * best else best
            xs.append(n)
            ys.append(best)
        last = max(numbers)
        ax.step([*xs, last], [*ys, ys[-1]], where="post", color="tab:orange", label="best so far")
    if cut:
        ax.scatter(*zip(*cut), facecolors="none", edgecolors="tab:gray", label="pruned", zorder=2)
    ax.set(xlabel="trial", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return _save(fig, path)


def plot_sweep_params(
    axes: Mapping[str, Mapping], accuracies: Sequence[float], pruned: Sequence[bool], path: Path, title: str
) -> Path:
    """Validation accuracy against each searched parameter, one panel per parameter. `axes` maps a parameter
    to {"values": x per trial, "ticks": labels of categorical positions or None, "log": log scale}."""
    columns = min(3, max(1, len(axes)))
    rows = -(-len(axes) // columns)
    fig, grid = _subplots(rows, columns, figsize=(max(6.0, 4.2 * columns), 3.4 * rows + 0.4), squeeze=False)
    for ax in grid.flat[len(axes) :]:
        ax.axis("off")
    for ax, (name, axis) in zip(grid.flat, axes.items()):
        for hollow in (False, True):
            points = [(x, a) for x, a, p in zip(axis["values"], accuracies, pruned) if p == hollow and x is not None]
            if points:
                style = {"facecolors": "none", "edgecolors": "tab:gray"} if hollow else {"color": "tab:blue"}
                ax.scatter(*zip(*points), label="pruned" if hollow else "complete", **style)
        if axis["ticks"] is not None:
            ax.set_xticks(range(len(axis["ticks"])), axis["ticks"], rotation=20, fontsize="small")
            ax.set_xlim(-0.5, len(axis["ticks"]) - 0.5)
        if axis["log"]:
            ax.set_xscale("log")
        ax.set(xlabel=name, ylabel="val accuracy (%)")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_robustness(
    corruptions: Mapping[str, float], clean: float, adversarial: Sequence[Mapping], path: Path, title: str
) -> Path:
    """Accuracy per corruption as bars (clean accuracy and the corruptions' mean as lines) and, where given,
    accuracy against eps for each attack."""
    panels = [p for p in ("corruptions", "attacks") if (corruptions if p == "corruptions" else adversarial)]
    panels = panels or ["corruptions"]
    widths = [2.0 if p == "corruptions" else 1.0 for p in panels]
    fig, axes = _subplots(
        1, len(panels), figsize=(4.5 * sum(widths), 4.8), squeeze=False, gridspec_kw={"width_ratios": widths}
    )
    for ax, panel in zip(axes[0], panels):
        if panel == "corruptions":
            names = list(corruptions)
            values = [100 * corruptions[n] for n in names]
            ax.bar(range(len(names)), values, color="tab:blue")
            ax.axhline(100 * clean, color="tab:green", linestyle="--", label=f"clean {100 * clean:.2f}%")
            if values:
                mean = sum(values) / len(values)
                ax.axhline(mean, color="tab:orange", linestyle=":", label=f"mean {mean:.2f}%")
            ax.set_xticks(range(len(names)), [n.replace("_", " ") for n in names], rotation=60, ha="right")
            ax.set(ylabel="accuracy (%)", ylim=(0, 100), title="corruptions (MNIST-C)")
        else:
            for attack, marker in (("fgsm", "o"), ("pgd", "s")):
                rows = sorted((r["eps"], 100 * r["accuracy"]) for r in adversarial if r["attack"] == attack)
                if rows:
                    ax.plot(*zip(*rows), marker=marker, label=attack.upper())
            ax.set(
                xlabel="eps (L-infinity, pixels in [0, 1])",
                ylabel="accuracy (%)",
                ylim=(0, 100),
                title="white-box attacks",
            )
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize="small", loc="lower left")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)
