"""Every picture the project writes stays legible with the longest labels it can get (Fashion-MNIST's class names,
40-character run names, long sweep choices, every corruption): drawn at its default size, no two texts overlap, no
text covers another panel's image, legends cover no bars or points, and all text lies inside the figure. Measured
with matplotlib's own text extents on the Agg renderer that saves the PNGs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PathCollection
from matplotlib.container import BarContainer
from matplotlib.image import AxesImage
from PIL import Image

from mnistlab import plots
from mnistlab.config import load_config, shipped_configs
from mnistlab.data.corruptions import CORRUPTIONS
from mnistlab.datasets import DATASETS
from mnistlab.models.calibration import reliability
from mnistlab.sweep.space import show_value

RUN = "fashion-cnn-augmented-long-run-name-seed7"  # 41 characters, as a user's config file may be named
TOLERANCE = 1.0  # pixels: anti-aliased edges may touch


def _epochs(count: int, seed: int) -> list[dict]:
    """Made-up but realistic metrics: accuracy rising towards 99%, loss falling, the three splits close."""
    rng = np.random.default_rng(seed)
    acc = 1 - 0.4 * np.exp(-np.arange(1, count + 1) / 3) - rng.uniform(0, 0.02, count)
    return [
        {"epoch": i + 1}
        | {f"{split}_accuracy": float(acc[i] - shift) for split, shift in (("train", -0.01), ("val", 0), ("test", 0))}
        | {f"{split}_loss": float(1 - acc[i] + shift) for split, shift in (("train", 0), ("val", 0.02), ("test", 0.03))}
        for i in range(count)
    ]


def _longest_pairs(classes: tuple[str, ...], count: int) -> list[tuple[int, int]]:
    """(true, predicted) pairs of class indices, longest names first, as many as asked."""
    by_length = sorted(range(len(classes)), key=lambda c: -len(classes[c]))
    pairs = [(t, p) for t in by_length for p in by_length if t != p]
    return [pairs[k % len(pairs)] for k in range(count)]


def _figures(dataset: str) -> dict:
    """Each picture drawn as the project draws it, from synthetic inputs with the longest labels."""
    rng = np.random.default_rng(0)
    classes = DATASETS[dataset].classes
    images = rng.integers(0, 256, (100, 28, 28), dtype=np.uint8)
    summary = max((f"{RUN}: {load_config(name).summary()}" for name in shipped_configs()), key=len)
    probabilities = rng.dirichlet(np.full(len(classes), 0.3))
    matrix = rng.integers(0, 99, (10, 10))
    np.fill_diagonal(matrix, 1135)
    pairs = _longest_pairs(classes, 100)
    trials = 40
    pruned = list(rng.random(trials) < 0.3)
    optimizers = [{"name": "sgd", "momentum": 0.9, "nesterov": True}, {"name": "adam"}, {"name": "adamw"}]
    hidden = [{"hidden": [512, 256], "activations": ["relu", "relu"]}, {"hidden": [1024], "activations": ["tanh"]}]
    axes = {
        "optimizer.lr": {"values": list(10 ** rng.uniform(-4, 0, trials)), "ticks": None, "log": True},
        "optimizer.weight_decay": {"values": list(rng.uniform(0, 0.01, trials)), "ticks": None, "log": False},
        "training.batch_size": {"values": list(rng.integers(0, 4, trials)), "ticks": ["32", "64", "128", "256"]},
        "optimizer": {"values": list(rng.integers(0, 3, trials)), "ticks": [show_value(o) for o in optimizers]},
        "model": {"values": list(rng.integers(0, 2, trials)), "ticks": [show_value(h) for h in hidden]},
    }
    for axis in axes.values():
        axis.setdefault("log", False)
    attacks = [
        {"attack": a, "eps": e, "accuracy": float(math.exp(-e * k))} for a, k in (("fgsm", 15), ("pgd", 40))
        for e in (0.0, 0.05, 0.1, 0.2, 0.3)
    ]  # fmt: skip
    examples = ["clean", *CORRUPTIONS]
    labels = rng.integers(0, 10, 2000)
    sure = np.eye(10)[labels] * 0.9 + 0.01 + rng.random((2000, 10)) * 0.05
    calibrations = {"as trained": sure / sure.sum(1, keepdims=True), "temperature 0.423": np.full((2000, 10), 0.1)}
    return {
        "curves": plots._figure_curves(_epochs(20, 0), summary),
        "overlay": plots._figure_overlay({f"{RUN}-{k}": _epochs(20, k) for k in range(8)}, "test"),
        "prediction": plots._figure_prediction(
            Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)),
            rng.random((28, 28), dtype=np.float32),
            list(probabilities),
            f"photos/2024-05-01/IMG_20240501_123456_HDR.jpg: {classes[int(np.argmax(probabilities))]}",
            classes,
        ),
        "confusion": plots._figure_confusion(matrix.tolist(), f"runs/{RUN}/model.pt: 91.23% correct", classes),
        "gallery": plots._figure_gallery(
            images,
            [  # inspect's caption, and a longer wording of it
                f"{classes[t]} → {classes[p]} ({99 - k % 50}%)"
                if k % 2
                else f"true {classes[t]}, said {classes[p]} 87%"
                for k, (t, p) in enumerate(pairs)
            ],
            "1234 misclassified test images (true → predicted, confidence), most confident first",
            10,
        ),
        "sweep objective": plots._figure_sweep_objective(
            list(range(trials)),
            list(rng.uniform(80, 92, trials)),
            pruned,
            1,
            f"{RUN}-sweep: val_accuracy by trial",
            "val_accuracy (%)",
        ),
        "sweep params": plots._figure_sweep_params(
            axes, list(rng.uniform(80, 92, trials)), pruned, f"{RUN}-sweep: validation accuracy against each parameter"
        ),
        "robustness corruptions": plots._figure_robustness(
            {name: float(rng.uniform(0.2, 0.95)) for name in CORRUPTIONS},
            0.9123,
            attacks,
            f"runs/{RUN}/model.pt ({dataset}): robustness",
        ),
        "robustness examples": plots._figure_gallery(
            images[: len(examples)],
            [f"{name.replace('_', ' ')}: {classes[pairs[k][1]]}" for k, name in enumerate(examples)],
            "the first test image under each corruption (caption: the model's prediction)",
            8,
        ),
        "reliability": plots._figure_reliability(
            {name: reliability(torch.from_numpy(p), torch.from_numpy(labels)) for name, p in calibrations.items()},
            f"{RUN}: test split",
        ),
    }


# ---------------------------------------------------------------------------------------------- geometry


def _corners(text, renderer) -> np.ndarray:
    """The four corners of a text's box as drawn, rotation included: the size of the upright box, turned by the
    text's angle about the centre of the drawn extent (a rotated box and its bounding box share their centre)."""
    drawn = text.get_window_extent(renderer)
    angle = text.get_rotation()
    text.set_rotation(0)
    upright = text.get_window_extent(renderer)
    text.set_rotation(angle)
    w, h = upright.width / 2, upright.height / 2
    turn = math.radians(angle)
    rotation = np.array([[math.cos(turn), -math.sin(turn)], [math.sin(turn), math.cos(turn)]])
    box = np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) @ rotation.T
    return box + np.array([(drawn.x0 + drawn.x1) / 2, (drawn.y0 + drawn.y1) / 2])


def _rectangle(bbox) -> np.ndarray:
    return np.array([[bbox.x0, bbox.y0], [bbox.x1, bbox.y0], [bbox.x1, bbox.y1], [bbox.x0, bbox.y1]])


def _overlap(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two convex quadrilaterals overlap by more than TOLERANCE (separating axis test)."""
    if (a.max(0) - b.min(0)).min() <= TOLERANCE or (b.max(0) - a.min(0)).min() <= TOLERANCE:
        return False  # apart along x or y already (most pairs: quick)
    for polygon in (a, b):
        for k in range(4):
            edge = polygon[(k + 1) % 4] - polygon[k]
            normal = np.array([-edge[1], edge[0]]) / (np.hypot(*edge) or 1)
            pa, pb = a @ normal, b @ normal
            if min(pa.max(), pb.max()) - max(pa.min(), pb.min()) <= TOLERANCE:
                return False  # a separating axis: no overlap
    return True


def _drawn_texts(fig):
    """Draw `fig` as `savefig` does and return the renderer and every text it drew (visible, non-empty)."""
    canvas = FigureCanvasAgg(fig)
    renderer = canvas.get_renderer()
    drawn = []
    draw_text = renderer.draw_text

    def recording(gc, x, y, s, prop, angle, ismath=False, mtext=None):
        if mtext is not None and mtext.get_text().strip() and all(mtext is not t for t in drawn):
            drawn.append(mtext)
        return draw_text(gc, x, y, s, prop, angle, ismath, mtext)

    renderer.draw_text = recording
    canvas.draw()
    return renderer, drawn


def _marks(ax) -> list[tuple[str, np.ndarray]]:
    """What an axes plots that a legend must not hide: bars (as rectangles) and points (as pixel positions)."""
    marks = []
    for container in ax.containers:
        if isinstance(container, BarContainer):
            marks += [("bar", _rectangle(bar.get_window_extent())) for bar in container]
    for line in ax.get_lines():
        if line.get_marker() not in (None, "", " ", "None"):
            marks += [("point", p) for p in line.get_transform().transform(line.get_xydata())]
    for collection in ax.collections:
        if isinstance(collection, PathCollection):
            marks += [("point", p) for p in collection.get_offset_transform().transform(collection.get_offsets())]
    return marks


def _problems(fig) -> list[str]:
    renderer, texts = _drawn_texts(fig)
    boxes = [(t, _corners(t, renderer)) for t in texts]
    problems = []
    for i, (a, box_a) in enumerate(boxes):
        for b, box_b in boxes[i + 1 :]:
            if _overlap(box_a, box_b):
                problems.append(f"text {a.get_text()!r} overlaps text {b.get_text()!r}")
    images = [im for im in fig.findobj(AxesImage) if im.get_visible()]
    for text, box in boxes:
        for image in images:
            if text.axes is not image.axes and _overlap(box, _rectangle(image.get_window_extent(renderer))):
                problems.append(f"text {text.get_text()!r} covers an image of another panel")
        inside = fig.bbox
        if box[:, 0].min() < inside.x0 - TOLERANCE or box[:, 0].max() > inside.x1 + TOLERANCE:
            problems.append(f"text {text.get_text()!r} runs past the figure's side")
        if box[:, 1].min() < inside.y0 - TOLERANCE or box[:, 1].max() > inside.y1 + TOLERANCE:
            problems.append(f"text {text.get_text()!r} runs past the figure's top or bottom")
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]
    for legend in legends:
        frame = legend.get_window_extent(renderer)
        for ax in fig.axes:
            for kind, mark in _marks(ax):
                hit = _overlap(_rectangle(frame), mark) if kind == "bar" else frame.contains(*mark)
                if hit:
                    problems.append(f"a legend ({legend.texts[0].get_text()!r}, ...) covers a {kind}")
                    break
    return problems


PICTURES = [
    "curves",
    "overlay",
    "prediction",
    "confusion",
    "gallery",
    "sweep objective",
    "sweep params",
    "robustness corruptions",
    "robustness examples",
    "reliability",
]


@pytest.fixture(scope="module", params=["mnist", "fashion-mnist"])
def figures(request) -> dict:
    return _figures(request.param)


@pytest.mark.parametrize("picture", PICTURES)
def test_picture_text_is_legible(figures, picture):
    assert _problems(figures[picture]) == []


def test_the_checks_see_overlaps():
    """The checker is not blind: two captions on one spot, a caption over the next image and a legend on a bar
    are all reported."""
    fig, (left, right) = plots._subplots(1, 2)
    left.bar([0, 1], [1, 1], label="bars")
    left.legend(loc="center")
    left.set_title("one caption")
    right.imshow(np.zeros((28, 28)))
    fig.text(0.5, 0.5, "one caption over the image")
    fig.text(0.5, 0.5, "another on top")
    found = "\n".join(_problems(fig))
    assert "overlaps text" in found and "covers an image" in found and "covers a bar" in found


def test_prediction_axis_names_the_classes():
    """predict --show labels bars with the model's classes: "digit" only for the digits, "class" otherwise."""
    rng = np.random.default_rng(0)
    for dataset, label in (("mnist", "digit"), ("fashion-mnist", "class")):
        classes = DATASETS[dataset].classes
        image = rng.random((28, 28))
        fig = plots._figure_prediction(image, image, [0.1] * 10, "t", classes)
        chart = fig.axes[2]
        assert chart.get_xlabel() == label
        assert [t.get_text() for t in chart.get_xticklabels()] == list(classes)
    default = plots._figure_prediction(image, image, [0.1] * 10, "t").axes[2]
    assert default.get_xlabel() == "digit" and default.get_xticklabels()[9].get_text() == "9"


@settings(max_examples=60, deadline=None)
@given(st.text(st.characters(codec="ascii", categories=["L", "N", "P", "Zs"]), max_size=80), st.floats(20, 300))
def test_wrapped_lines_fit_and_keep_every_word(text, width):
    """Each wrapped line fits the width (a line of one character may not: nothing is left to break), and the
    lines hold the text's words in order."""
    lines = plots._wrap(text, width, 7).split("\n")
    assert all(plots._width(line, 7) <= width or len(line) == 1 for line in lines)
    assert "".join("".join(lines).split()) == "".join(text.split())
