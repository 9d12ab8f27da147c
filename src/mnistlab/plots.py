"""Figures: per-run curves, overlays of several runs, confusion matrices and galleries.

Drawn on `matplotlib.figure.Figure` objects, which need no display and never touch pyplot's global state, so
importing mnistlab in a notebook leaves its plotting backend alone. Each `plot_*` saves what its `_figure_*`
draws; labels of any length (Fashion-MNIST's class names, long run names) are wrapped or given room so that no
text overlaps another, an image or the figure's edge, and legends sit outside the data (tests/test_pictures.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib import rcParams
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.textpath import text_to_path

from mnistlab.datasets import DIGITS, are_digits
from mnistlab.files import replacing

_SPLITS = (("train", "-"), ("val", "--"), ("test", ":"))
_CAPTION = 7  # points: gallery captions


def plot_curves(epochs: Sequence[Mapping], path: Path, title: str) -> Path:
    """Accuracy and loss per epoch, train vs validation vs test (the report's Figures 5-7)."""
    return _save(_figure_curves(epochs, title), path)


def plot_lr_find(
    points: Sequence[tuple[float, float]], raw: Sequence[float], suggested: float, how: str, path: Path, title: str
) -> Path:
    """The learning-rate range test: the smoothed loss against the rate (log scale) over each batch's own loss,
    with the suggested rate marked and `how` it was chosen in its label."""
    return _save(_figure_lr_find(points, raw, suggested, how, title), path)


def plot_overlay(runs: Mapping[str, Sequence[Mapping]], path: Path, split: str = "test") -> Path:
    """One figure with every run's accuracy and loss on `split`, for side-by-side comparison."""
    return _save(_figure_overlay(runs, split), path)


def plot_prediction(
    original, digit, probabilities, path: Path, title: str, classes: Sequence[str] | None = None
) -> Path:
    """The image as given, the 28x28 the model saw (`digit`), and the probabilities as a bar chart labelled
    by `classes` (default: the digits)."""
    return _save(_figure_prediction(original, digit, probabilities, title, classes), path)


def plot_confusion(
    matrix: Sequence[Sequence[int]], path: Path, title: str, classes: Sequence[str] | None = None
) -> Path:
    """The confusion matrix with counts; the diagonal is left pale so the mistakes stand out. `classes` names
    the rows and columns (default: the digits)."""
    return _save(_figure_confusion(matrix, title, classes), path)


def plot_gallery(images, captions: Sequence[str], path: Path, title: str, columns: int = 10) -> Path:
    """A grid of 28x28 images, each with a caption (wrapped to its column)."""
    return _save(_figure_gallery(images, captions, title, columns), path)


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
    return _save(_figure_sweep_objective(numbers, values, pruned, sign, title, ylabel), path)


def plot_sweep_params(
    axes: Mapping[str, Mapping], accuracies: Sequence[float], pruned: Sequence[bool], path: Path, title: str
) -> Path:
    """Validation accuracy against each searched parameter, one panel per parameter. `axes` maps a parameter
    to {"values": x per trial, "ticks": labels of categorical positions or None, "log": log scale}."""
    return _save(_figure_sweep_params(axes, accuracies, pruned, title), path)


def plot_robustness(
    corruptions: Mapping[str, float], clean: float, adversarial: Sequence[Mapping], path: Path, title: str
) -> Path:
    """Accuracy per corruption as bars (clean accuracy and the corruptions' mean as lines) and, where given,
    accuracy against eps for each attack."""
    return _save(_figure_robustness(corruptions, clean, adversarial, title), path)


# ---------------------------------------------------------------------------------------------- helpers


def _save(fig: Figure, path: Path) -> Path:
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=100, format=path.suffix.lstrip(".") or "png")
    return path


def _subplots(rows: int = 1, columns: int = 1, figsize: tuple[float, float] = (6.4, 4.8), **kwargs):
    """A figure and its axes, as `pyplot.subplots` gives them, without pyplot; constrained layout makes room
    for titles, tick labels, colorbars and outside legends."""
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.subplots(rows, columns, **kwargs)


def _points(size: float | str) -> float:
    return FontProperties(size=size).get_size_in_points()


def _width(text: str, size: float | str) -> float:
    """How wide `text` is drawn at font size `size`, in points."""
    return text_to_path.get_text_width_height_descent(text, FontProperties(size=size), ismath=False)[0]


def _wrap(text: str, width: float, size: float | str) -> str:
    """`text` in lines no wider than `width` points at font size `size`: broken between words, and inside a
    word only when the word alone is wider than a line."""
    lines: list[str] = []
    for word in text.split():
        if lines and _width(f"{lines[-1]} {word}", size) <= width:
            lines[-1] += f" {word}"
            continue
        while len(word) > 1 and _width(word, size) > width:
            cut = next(k for k in range(len(word) - 1, 0, -1) if _width(word[:k], size) <= width or k == 1)
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    return "\n".join(lines)


def _title(fig: Figure, title: str) -> None:
    """The figure's title, wrapped to its width."""
    size = rcParams["figure.titlesize"]
    fig.suptitle(_wrap(title, 72 * fig.get_figwidth() - 20, size), fontsize=size)


def _outside_legend(ax) -> None:
    """The axes' legend beside it, top right, where it covers no data."""
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)


def _figure_legend(fig: Figure, ax) -> int:
    """The lines of `ax` named once below the figure, in as many columns as fit its width; the rows it takes."""
    handles, labels = ax.get_legend_handles_labels()
    if not labels:
        return 0
    size = _points("small")
    column = max(_width(label, size) for label in labels) + 5 * size  # the line sample and the gaps
    columns = max(1, min(len(labels), int((72 * fig.get_figwidth() - 20) // column)))
    fig.legend(handles, labels, fontsize=size, loc="outside lower center", ncols=columns)
    return -(-len(labels) // columns)


def _class_ticks(ax, names: Sequence[str]) -> None:
    """Class names along the x axis: digits upright, words ("T-shirt/top") slanted so they do not overlap."""
    if max(map(len, names)) < 3:
        ax.set_xticks(range(len(names)), names)
    else:  # turned about the label's end, which stays under its tick
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", rotation_mode="anchor")


def plot_reliability(tables: Mapping[str, Sequence[Mapping]], path: Path, title: str) -> Path:
    """A reliability diagram: accuracy against confidence, one line per set of bins (`models.calibration.
    reliability`), e.g. as trained and after temperature scaling; on the diagonal a model means what it says.
    Below, how many images each bin holds (log scale)."""
    return _save(_figure_reliability(tables, title), path)


# ---------------------------------------------------------------------------------------------- figures


def _figure_curves(epochs: Sequence[Mapping], title: str) -> Figure:
    fig, (acc_ax, loss_ax) = _subplots(1, 2, figsize=(10, 4.4))
    xs = [e["epoch"] for e in epochs]
    for split, style in _SPLITS:
        if epochs and epochs[0].get(f"{split}_accuracy") is not None:
            acc_ax.plot(xs, [100 * e[f"{split}_accuracy"] for e in epochs], style, marker="o", label=split)
            loss_ax.plot(xs, [e[f"{split}_loss"] for e in epochs], style, marker="o", label=split)
    _finish(fig, acc_ax, loss_ax, title)
    return fig


def _figure_lr_find(
    points: Sequence[tuple[float, float]], raw: Sequence[float], suggested: float, how: str, title: str
) -> Figure:
    import math

    fig, ax = _subplots(figsize=(8, 4.5))
    lrs = [lr for lr, _ in points]
    smoothed = [loss for _, loss in points]
    ax.plot(lrs[: len(raw)], raw[: len(lrs)], color="tab:blue", alpha=0.25, linewidth=0.8, label="batch loss")
    ax.plot(lrs, smoothed, color="tab:blue", label="smoothed loss")
    label = _wrap(f"suggested {suggested:.3g}: {how}", 200, "small")
    ax.axvline(suggested, color="tab:orange", linestyle="--", label=label)
    if lrs:  # the suggestion lies between two batches' rates: marked on the curve at the nearer one
        near = min(range(len(lrs)), key=lambda i: abs(math.log(lrs[i] / suggested)))
        ax.plot([suggested], [smoothed[near]], "o", color="tab:orange")
        # a blow-up at the end would squash the rest: the axis ends a little above the first half's highest loss
        low, high = min([*smoothed, *raw[: len(lrs)]]), max(smoothed[: max(1, len(lrs) // 2)])
        pad = 0.05 * (high - low) or 0.05
        ax.set_ylim(low - pad, high + 10 * pad)
    ax.set(xscale="log", xlabel="learning rate (log scale)", ylabel="training loss")
    ax.grid(alpha=0.3, which="both")
    _outside_legend(ax)
    _title(fig, title)
    return fig


def _figure_overlay(runs: Mapping[str, Sequence[Mapping]], split: str) -> Figure:
    fig, (acc_ax, loss_ax) = _subplots(1, 2, figsize=(11, 4.5))
    for name, epochs in runs.items():
        xs = [e["epoch"] for e in epochs]
        acc_ax.plot(xs, [100 * e[f"{split}_accuracy"] for e in epochs], marker=".", label=name)
        loss_ax.plot(xs, [e[f"{split}_loss"] for e in epochs], marker=".", label=name)
    _finish(fig, acc_ax, loss_ax, f"{split} accuracy and loss per epoch")
    return fig


def _finish(fig: Figure, acc_ax, loss_ax, title: str) -> None:
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
    rows = _figure_legend(fig, acc_ax)  # both panels draw the same lines: one legend, below both
    fig.set_figheight(fig.get_figheight() + rows * 1.5 * _points("small") / 72)
    _title(fig, title)


def _figure_prediction(original, digit, probabilities, title: str, classes: Sequence[str] | None = None) -> Figure:
    names = list(classes) if classes else list(DIGITS)
    fig, (a, b, c) = _subplots(1, 3, figsize=(10, 3.6), gridspec_kw={"width_ratios": [1.3, 1, 1.6]})
    a.imshow(original)
    a.set_title("original")
    b.imshow(digit, cmap="gray", vmin=0, vmax=1)
    b.set_title("what the model saw (28x28)")
    for ax in (a, b):
        ax.axis("off")
    shown = range(len(names))
    best = max(shown, key=lambda d: probabilities[d])
    c.bar(shown, [probabilities[d] for d in shown], color=["tab:orange" if d == best else "tab:blue" for d in shown])
    _class_ticks(c, names)
    c.set(ylim=(0, 1), xlabel="digit" if are_digits(names) else "class", ylabel="probability")
    _title(fig, title)
    return fig


def _figure_confusion(matrix: Sequence[Sequence[int]], title: str, classes: Sequence[str] | None) -> Figure:
    import numpy as np

    counts = np.array(matrix)
    off = counts.copy()
    np.fill_diagonal(off, 0)
    fig, ax = _subplots(figsize=(6.5, 5.5))
    image = ax.imshow(off, cmap="Reds")
    for (i, j), v in np.ndenumerate(counts):
        if v:
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="black" if i != j else "grey")
    names = list(classes) if classes else list(DIGITS)
    _class_ticks(ax, names)
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="predicted", ylabel="true")
    fig.colorbar(image, ax=ax, label="mistakes")
    _title(fig, title)
    return fig


def _figure_gallery(images, captions: Sequence[str], title: str, columns: int) -> Figure:
    """Placed by hand, in inches: each row as tall as its image plus its longest caption, so a caption never
    reaches into the row above, and each column as wide as the longest word of any caption."""
    cell = max([1.1, *(_width(w, _CAPTION) / 72 + 0.1 for c in captions for w in c.split())])
    wrapped = [_wrap(c, 72 * (cell - 0.1), _CAPTION) for c in captions]
    line = 1.25 * _CAPTION / 72
    caption = line * max([1, *(c.count("\n") + 1 for c in wrapped)]) + 0.06
    side, gap = cell - 0.15, 0.08
    rows = max(1, -(-len(images) // columns))
    width = columns * cell + 0.2
    heading = _wrap(title, 72 * width - 20, rcParams["figure.titlesize"])
    top = (heading.count("\n") + 1) * 1.3 * _points(rcParams["figure.titlesize"]) / 72 + 0.15
    height = top + rows * (caption + side + gap) + 0.05
    fig = Figure(figsize=(width, height))
    fig.suptitle(heading, y=1 - 0.08 / height, va="top", fontsize=rcParams["figure.titlesize"])
    for k, (image, text) in enumerate(zip(images, wrapped)):
        row, column = divmod(k, columns)
        left = 0.1 + column * cell + (cell - side) / 2
        bottom = height - top - (row + 1) * (caption + side + gap) + gap
        ax = fig.add_axes((left / width, bottom / height, side / width, side / height))
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        ax.set_title(text, fontsize=_CAPTION, pad=3)
        ax.axis("off")
    return fig


def _figure_sweep_objective(
    numbers: Sequence[int], values: Sequence[float], pruned: Sequence[bool], sign: int, title: str, ylabel: str
) -> Figure:
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
    ax.set(xlabel="trial", ylabel=ylabel)
    ax.grid(alpha=0.3)
    _outside_legend(ax)
    _title(fig, title)
    return fig


def _figure_sweep_params(
    axes: Mapping[str, Mapping], accuracies: Sequence[float], pruned: Sequence[bool], title: str
) -> Figure:
    """Choices are labelled upright, each wrapped to its share of the panel; panels widen for many long choices
    and rows grow with the labels' lines."""
    columns = min(3, max(1, len(axes)))
    rows = -(-len(axes) // columns)
    size = _points("small")
    # each choice gets up to 1.4 inches where its label needs it; 1 inch of a panel goes to its y axis
    slots = {n: min(100.0, max(_width(t, size) + 10 for t in a["ticks"])) for n, a in axes.items() if a["ticks"]}
    panel = max([4.2, *(1.0 + len(axes[n]["ticks"]) * s / 72 for n, s in slots.items())])
    ticks = {
        n: [_wrap(t, 72 * (panel - 1.0) / len(axes[n]["ticks"]) - 6, size) for t in axes[n]["ticks"]] for n in slots
    }
    lines = max([1, *(t.count("\n") + 1 for labels in ticks.values() for t in labels)])
    height = (3.4 + (lines - 1) * 1.2 * size / 72) * rows + 0.4
    fig, grid = _subplots(rows, columns, figsize=(max(6.0, panel * columns), height), squeeze=False)
    for ax in grid.flat[len(axes) :]:
        ax.axis("off")
    for ax, (name, axis) in zip(grid.flat, axes.items()):
        for hollow in (False, True):
            points = [(x, a) for x, a, p in zip(axis["values"], accuracies, pruned) if p == hollow and x is not None]
            if points:
                style = {"facecolors": "none", "edgecolors": "tab:gray"} if hollow else {"color": "tab:blue"}
                ax.scatter(*zip(*points), label="pruned" if hollow else "complete", **style)
        if name in ticks:
            ax.set_xticks(range(len(ticks[name])), ticks[name], fontsize=size)
            ax.set_xlim(-0.5, len(ticks[name]) - 0.5)
        if axis["log"]:
            ax.set_xscale("log")
        ax.set(xlabel=name, ylabel="val accuracy (%)")
        ax.grid(alpha=0.3)
    _title(fig, title)
    return fig


def _figure_robustness(
    corruptions: Mapping[str, float], clean: float, adversarial: Sequence[Mapping], title: str
) -> Figure:
    panels = [p for p in ("corruptions", "attacks") if (corruptions if p == "corruptions" else adversarial)]
    panels = panels or ["corruptions"]
    widths = [2.0 if p == "corruptions" else 1.0 for p in panels]
    fig, axes = _subplots(
        1, len(panels), figsize=(4.5 * sum(widths) + 1.5, 4.8), squeeze=False, gridspec_kw={"width_ratios": widths}
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
        _outside_legend(ax)
    _title(fig, title)
    return fig


def _figure_reliability(tables: Mapping[str, Sequence[Mapping]], title: str) -> Figure:
    fig, (ax, counts) = _subplots(2, 1, figsize=(6.4, 6.4), height_ratios=(3, 1), sharex=True)
    ax.plot([0, 100], [0, 100], color="0.6", linewidth=1, label="calibrated")
    for (name, table), marker in zip(tables.items(), "os^v"):
        confidence = [100 * b["confidence"] for b in table]
        ax.plot(confidence, [100 * b["accuracy"] for b in table], marker=marker, label=name)
        counts.plot(confidence, [b["count"] for b in table], marker=marker, linewidth=0.8)
    ax.set(ylabel="accuracy (%)", xlim=(0, 100), ylim=(0, 100))
    counts.set(xlabel="confidence: the top class's probability (%)", ylabel="images", yscale="log")
    for a in (ax, counts):
        a.grid(alpha=0.3)
    _outside_legend(ax)
    _title(fig, title)
    return fig


# ---------------------------------------------------------------------------------------------- explanations

_TILES = 8  # feature maps (or units' weights) shown per layer


def plot_explanation(
    digit,
    maps: Sequence[tuple[str, object]],
    probabilities: Sequence[float],
    path: Path,
    title: str,
    classes: Sequence[str] | None = None,
    layers: Sequence | None = None,
    neighbours: Sequence | None = None,
) -> Path:
    """Why a model answered as it did: the 28x28 view it saw (`digit`), each (caption, 28x28 map) of `maps` on
    one diverging scale centred at 0 (red: evidence for the class, blue: against) with the digit's outline over
    it, and the top-3 probabilities. `layers` (infer/inside.py LayerViews) adds a row per layer: feature maps as
    greyscale tiles, or a layer's units as bars (with the first layer's most active units' weights as 28x28
    images); `neighbours` (Neighbours) adds the nearest training images with their labels and distances."""
    return _save(_figure_explanation(digit, maps, probabilities, title, classes, layers, neighbours), path)


def _figure_explanation(digit, maps, probabilities, title, classes, layers, neighbours) -> Figure:
    import numpy as np

    names = list(classes) if classes else list(DIGITS)
    rows = 1 + len(layers or ()) + (1 if neighbours else 0)
    width = max(10.0, 2.2 * (len(maps) + 2))
    fig = Figure(figsize=(width, 3.2 + 1.9 * (rows - 1)), layout="constrained")
    parts = fig.subfigures(rows, 1, height_ratios=[3.2] + [1.9] * (rows - 1), squeeze=False)[:, 0]
    axes = parts[0].subplots(1, len(maps) + 2, width_ratios=[1] * (len(maps) + 1) + [1.3])
    axes[0].imshow(digit, cmap="gray", vmin=0, vmax=1)
    axes[0].set_title("what the model saw", fontsize="small")
    values = [np.asarray(m, dtype=float) for _, m in maps]
    scale = max([1e-12, *(float(np.abs(v).max()) for v in values)])  # one scale: the maps compare
    image = None
    for ax, (caption, _), v in zip(axes[1:], maps, values):
        image = ax.imshow(v, cmap="RdBu_r", vmin=-scale, vmax=scale)
        ax.contour(np.asarray(digit), levels=[0.5], colors="0.35", linewidths=0.6)
        # each map gets about 1 / (maps + 3) of the width: the view, the probabilities (1.3) and the colour bar
        ax.set_title(_wrap(caption, 72 * width / (len(maps) + 3) - 10, "small"), fontsize="small")
    for ax in axes[:-1]:
        ax.set(xticks=[], yticks=[])
    if image is not None:
        bar = parts[0].colorbar(image, ax=list(axes[1:-1]), shrink=0.8, ticks=[-scale, 0, scale])
        bar.ax.set_yticklabels(["against", "0", "for"], fontsize="small")
    top = sorted(range(len(names)), key=lambda d: -probabilities[d])[:3]
    chart = axes[-1]
    chart.barh(range(3), [probabilities[d] for d in top], color=["tab:orange", "tab:blue", "tab:blue"])
    chart.set_yticks(range(3), [names[d] for d in top])
    chart.invert_yaxis()
    chart.set(xlim=(0, 1), xlabel="probability")
    for k, d in enumerate(top):
        chart.text(min(probabilities[d], 0.62) + 0.02, k, f"{100 * probabilities[d]:.1f}%", va="center", fontsize=8)
    for part, view in zip(parts[1:], layers or ()):
        _layer_row(part, view)
    if neighbours:
        _neighbour_row(parts[-1], neighbours, names)
    _title(fig, title)
    return fig


def _layer_row(part, view) -> None:
    """One layer of a network: its feature maps as greyscale tiles, or its units as bars (and, where given, the
    weights of its most active units as 28x28 images)."""
    import numpy as np

    values = np.asarray(view.values, dtype=float)
    weights = getattr(view, "unit_weights", None)
    if view.kind == "maps":
        shown = values[:_TILES]
        axes = np.atleast_1d(part.subplots(1, _TILES))
        for ax, tile in zip(axes, shown):
            ax.imshow(tile, cmap="gray")
        for ax in axes:
            ax.axis("off")
        part.suptitle(f"{view.name}: the {len(shown)} most active", fontsize="small")
        return
    tiles = 0 if weights is None else min(len(weights), _TILES - 2)
    axes = np.atleast_1d(part.subplots(1, 1 + tiles, width_ratios=[3] + [1] * tiles))
    top = list(getattr(view, "top_units", None) or [])
    axes[0].bar(range(len(values)), values, width=1.0, color="0.5")
    if top:
        axes[0].bar(top, values[top], width=1.0, color="tab:orange")
    axes[0].set(xlabel="unit", ylabel="activation")
    for ax, unit, w in zip(axes[1:], top, weights[:tiles] if tiles else ()):
        w = np.asarray(w, dtype=float)
        limit = max(1e-12, float(np.abs(w).max()))
        ax.imshow(w, cmap="RdBu_r", vmin=-limit, vmax=limit)
        ax.set_title(f"unit {unit}", fontsize=_CAPTION)
        ax.axis("off")
    part.suptitle(f"{view.name}: {len(values)} units (most active in orange)", fontsize="small")


def _neighbour_row(part, neighbours: Sequence, names: Sequence[str]) -> None:
    """The training images nearest the input, each with its label and distance."""
    import numpy as np

    axes = np.atleast_1d(part.subplots(1, len(neighbours)))
    for ax, n in zip(axes, neighbours):
        pixels = np.asarray(n.image, dtype=float)
        ax.imshow(pixels, cmap="gray", vmin=0, vmax=255 if pixels.max() > 1 else 1)
        ax.set_title(f"{names[n.label]}, distance {n.distance:.3g}", fontsize=_CAPTION)
        ax.axis("off")
    part.suptitle("nearest training images (in the model's penultimate features)", fontsize="small")
