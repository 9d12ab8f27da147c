"""tests/support/nondigits.py: the generated sets for the outlier flag are image files, the same for a seed and
different across seeds, varied, and taken by preprocessing (all but some blank ones); the real digits carry their
true labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mnistlab.data.preprocess import preprocess
from mnistlab.errors import MnistlabError
from mnistlab.infer.predict import classify
from mnistlab.models.files import load_model

from .support import nondigits as nd
from .support.nondigits import FONTS, NONDIGIT_KINDS, REAL_DIGIT_KINDS, write_nondigits, write_real_digits


def nondigits(kind: str, count: int, folder: Path, seed: int, request: pytest.FixtureRequest) -> list[Path]:
    """write_nondigits, with the real Fashion-MNIST for "fashion" (skipped where it is missing)."""
    garments = request.getfixturevalue("fashion_path") if kind == "fashion" else None
    return write_nondigits(kind, count, folder, seed, fashion_dir=garments)


def real_digits(
    kind: str, count: int, folder: Path, seed: int, request: pytest.FixtureRequest
) -> list[tuple[Path, int]]:
    """write_real_digits, with the real MNIST for the kinds made from it (skipped where it is missing)."""
    if kind == "fonts" and not FONTS:
        pytest.skip("no DejaVu fonts")
    digits = None if kind == "fonts" else request.getfixturevalue("mnist_path")
    return write_real_digits(kind, count, folder, seed, mnist_dir=digits)


def assert_files_per_seed(first: list[Path], again: list[Path], other: list[Path], count: int) -> None:
    """`count` readable PNG or JPEG files, byte for byte the same for the same seed, mostly others for another."""
    assert len(first) == len(set(first)) == count
    for path in first:
        assert path.is_file() and path.suffix in (".png", ".jpg")
        with Image.open(path) as image:
            image.load()
    assert [p.name for p in first] == [p.name for p in again]
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in again]
    assert sum(a.read_bytes() != b.read_bytes() for a, b in zip(first, other, strict=True)) >= count * 3 // 4


@pytest.mark.parametrize("kind", NONDIGIT_KINDS)
def test_nondigits_are_image_files_fixed_by_the_seed(kind: str, tmp_path: Path, request) -> None:
    first, again, other = (nondigits(kind, 12, tmp_path / name, seed, request) for name, seed in zip("abc", (0, 0, 1)))
    assert_files_per_seed(first, again, other, 12)


@pytest.mark.parametrize("kind", NONDIGIT_KINDS)
def test_preprocessing_takes_nondigits_but_not_all_blank_ones(kind: str, tmp_path: Path, request) -> None:
    paths = nondigits(kind, 40, tmp_path, 3, request)
    sizes, refused = set(), []
    for path in paths:
        with Image.open(path) as image:
            sizes.add(image.size)
        try:
            preprocess(path)
        except MnistlabError as exc:
            assert "no digit found (the image is blank)" in str(exc)
            refused.append(path.name)
    assert {p.suffix for p in paths} == {".png", ".jpg"}
    assert len(sizes) >= 8
    if kind == "blank":
        assert 0 < len(refused) < len(paths)  # some have a speck, a line or a smudge that preprocessing finds
    else:
        assert len(refused) <= len(paths) // 10, refused


@pytest.fixture(scope="module")
def model():
    return load_model(None)


@pytest.mark.parametrize("kind", REAL_DIGIT_KINDS)
def test_real_digits_keep_their_labels(kind: str, tmp_path: Path, request, model) -> None:
    first, again, other = (
        real_digits(kind, 30, tmp_path / name, seed, request) for name, seed in zip("abc", (0, 0, 1))
    )
    assert_files_per_seed(*([path for path, _ in written] for written in (first, again, other)), 30)
    labels = [label for _, label in first]
    assert labels == [label for _, label in again]
    assert all(type(label) is int and 0 <= label <= 9 for label in labels)
    assert len(set(labels)) >= 6
    # Preprocessing takes every one, and the bundled model reads nearly all as their labels (it makes 1-3% of
    # mistakes on these kinds): the labels are those of the digits shown.
    predicted = classify(model, [preprocess(path).tensor for path, _ in first])[0].argmax(dim=1).numpy()
    assert np.mean(predicted == np.array(labels)) >= 0.85


@pytest.mark.parametrize("write", [write_nondigits, write_real_digits])
def test_unknown_kinds_are_refused(write, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown kind 'digits'"):
        write("digits", 1, tmp_path)


@pytest.mark.parametrize("kind", ["letters", "scribbles", "shapes"])
def test_figure_names_name_what_each_file_draws(kind: str, tmp_path: Path, monkeypatch) -> None:
    """figure_names replays each file's first draw; the figure its maker then draws (the doodle or outline, the
    letter's skeleton or typeset text) is the one named, for every file of a seed."""
    names = nd.figure_names(kind, 60, seed=5)
    assert names != nd.figure_names(kind, 60, seed=6)
    drawn: dict[int, str] = {}
    current = [-1]
    real = {f: getattr(nd, f) for f in ("_generator", "_doodle", "_outline", "_typeset", "_draw")}
    skeletons = {id(strokes): letter for letter, strokes in nd.LETTERS.items()}

    def generator(name: str, seed: int, i: int) -> np.random.Generator:
        current[0] = i
        return real["_generator"](name, seed, i)

    def naming(function: str):
        def wrapped(name, *args, **kwargs):
            drawn.setdefault(current[0], name)
            return real[function](name, *args, **kwargs)

        return wrapped

    def draw(strokes, *args, **kwargs):  # a letter drawn by hand: its skeleton's identity names it
        if id(strokes) in skeletons:
            drawn.setdefault(current[0], skeletons[id(strokes)])
        return real["_draw"](strokes, *args, **kwargs)

    monkeypatch.setattr(nd, "_generator", generator)
    monkeypatch.setattr(nd, "_draw", draw)
    for function in ("_doodle", "_outline", "_typeset"):
        monkeypatch.setattr(nd, function, naming(function))
    nd.write_nondigits(kind, 60, tmp_path, seed=5)
    assert {i: names[i] for i in drawn} == drawn
    assert all(names[i] in ("checkmark", "cross") for i in range(60) if i not in drawn)  # bare strokes: unnamed
    assert len(drawn) >= 50
