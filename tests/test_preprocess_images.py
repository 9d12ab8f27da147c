"""mnistlab.data.preprocess on whole images built from real MNIST *test* digits (tests/support/digit_images.py):
blank ones refused, quality and speed on photos, tight, small, thick and thin digits, properties over generated
images, arrays and bytes, and the bundled model's accuracy on the tougher kinds."""

from __future__ import annotations

import functools
import io
from pathlib import Path

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from mnistlab.data import preprocess as pp
from mnistlab.data.idx import read_images
from mnistlab.data.preprocess import CENTRE, preprocess
from mnistlab.errors import MnistlabError
from mnistlab.infer.predict import classify
from mnistlab.models.files import load_model

from .support.digit_images import (
    CHALK,
    TOUGH_KINDS,
    assert_like,
    canvas_rgba,
    light_on_dark,
    on_paper,
    realistic_image,
    restroke,
    save_as,
    scan,
    similarity,
    tight_crop,
)
from .support.mnist import mnist_dir

# ---------------------------------------------------------------------------------------------- blank


@pytest.mark.parametrize(
    "image",
    [
        Image.new("L", (200, 150), 255),
        Image.new("RGB", (200, 150), (0, 0, 0)),
        Image.new("RGB", (1, 1), (128, 0, 0)),
        Image.new("L", (28, 28), 0),
        Image.new("RGBA", (280, 280), (0, 0, 0, 0)),
    ],
    ids=["white", "black", "1x1", "black-28x28", "transparent"],
)
def test_blank_images_are_refused(image: Image.Image) -> None:
    with pytest.raises(MnistlabError, match=r"^image: no digit found \(the image is blank\)$"):
        preprocess(image)


def test_a_photo_of_blank_paper_is_refused(tmp_path: Path) -> None:
    blank = np.zeros((28, 28), dtype=np.uint8)
    path = save_as(on_paper(blank, noise_sigma=8, seed=7), tmp_path / "blank.jpg")
    with pytest.raises(MnistlabError, match=f"^{path}: no digit found"):
        preprocess(str(path))


# ---------------------------------------------------------------------------------------------- quality, speed


def test_quality_on_photos_of_mnist_digits(tmp_path: Path, digits: np.ndarray) -> None:
    """Without any model: photos of MNIST test digits, preprocessed, come back close to the digits themselves."""
    rng = np.random.default_rng(0)
    mads, corrs = [], []
    for i in range(50):
        width = int(rng.choice([320, 640, 1000, 1600]))
        height = int(width * rng.uniform(0.6, 1.0))
        digit_height = int(rng.uniform(0.15, 0.7) * height)
        frame = round(28 * digit_height / 20)
        position = (
            "center"
            if rng.random() < 0.5
            else (int(rng.uniform(0, max(1, width - frame))), int(rng.uniform(0, max(1, height - frame))))
        )
        kwargs = {"size": (width, height), "position": position, "digit_height": digit_height, "seed": i}
        kwargs["noise_sigma"] = float(rng.uniform(1, 8))
        if rng.random() < 0.2:
            image = light_on_dark(digits[i], **kwargs)
        else:
            paper = tuple(int(v) for v in rng.uniform(150, 250, 3))
            ink = tuple(int(v) for v in rng.uniform(0, 80, 3))
            image = on_paper(digits[i], paper_rgb=paper, ink_rgb=ink, **kwargs)
        path = save_as(image, tmp_path / f"{i}.jpg", quality=75)
        mad, corr = similarity(preprocess(path).digit, digits[i])
        mads.append(mad)
        corrs.append(corr)
    summary = (
        f"mean abs diff {np.mean(mads):.4f} (worst {np.max(mads):.4f}), "
        f"correlation {np.mean(corrs):.4f} (worst {np.min(corrs):.4f})"
    )
    print(summary)
    # Measured: mean abs diff 0.027 (worst 0.045), correlation 0.953 (worst 0.852). Perfection is out of reach
    # even for a clean render: MNIST shifted by whole pixels, and the drawing's bicubic upscale blurs.
    assert np.mean(mads) < 0.04 and np.max(mads) < 0.07, summary
    assert np.mean(corrs) > 0.93 and np.min(corrs) > 0.8, summary


def test_a_large_photo_is_fast(digits: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    # A 4000x3000 photo with the digit small in a corner; upscaling a small page is far cheaper than drawing one.
    # What keeps it fast (a fraction of a second where all 12 million pixels would take seconds) is that the ink
    # is sought on copies of at most WORK_SIDE a side; that, not a time a busy machine could stretch, is checked.
    seven = digits[0]
    small = on_paper(seven, size=(800, 600), position=(660, 470), digit_height=70, seed=8)
    photo = small.resize((4000, 3000), Image.Resampling.BICUBIC)
    seen: list[tuple[int, ...]] = []
    extract_ink = pp._extract_ink
    monkeypatch.setattr(pp, "_extract_ink", lambda gray, *args: seen.append(gray.shape) or extract_ink(gray, *args))
    result = preprocess(photo)
    assert seen and max(max(shape) for shape in seen) <= pp.WORK_SIDE, seen
    assert_like(result.digit, seven)


# ---------------------------------------------------------------------------------------------- tight, small, thick


def tight_digit(digit: np.ndarray, longer_side: int, dark_on_light: bool, change: int = 0) -> Image.Image:
    """`digit` cropped to its ink at `longer_side` pixels (area averaged), grey, in either polarity."""
    ink = tight_crop(restroke(digit, change), longer_side)
    colours = {} if dark_on_light else CHALK
    return scan(ink, noise_sigma=2, seed=longer_side, **colours).convert("L")


def test_a_digit_that_fills_its_frame_keeps_its_polarity_and_is_found(digits: np.ndarray) -> None:
    # Thick strokes cropped tightly at 16 pixels: ink covers over half of the picture and much of its border,
    # which once made the background fit bend through the strokes and refuse the digit as blank.
    filled = 0
    for i in range(12):
        for dark_on_light in (True, False):
            image = tight_digit(digits[i], 16, dark_on_light, change=6)
            ink_share = np.mean(np.asarray(image) < 128) if dark_on_light else np.mean(np.asarray(image) >= 128)
            filled += ink_share > 0.5
            result = preprocess(image)
            assert result.inverted == dark_on_light, i
            assert_like(result.digit, digits[i], corr=0.6, most=0.2)  # much thicker than the original
    assert filled >= 6  # really mostly ink, in half of them at least


def test_background_of_a_tight_blurred_crop_is_the_paper_not_the_strokes(digits: np.ndarray) -> None:
    # A digit cropped to 12 pixels and enlarged bilinearly: only a few percent of the pixels are clean paper,
    # the rest blurred stroke edges; the background is still the paper's level.
    image = tight_digit(digits[3], 12, True, change=2).resize((48, 64), Image.Resampling.BILINEAR)
    gray = 1 - pp._working_gray(image)
    paper = 1 - np.asarray(Image.new("RGB", (1, 1), (240, 235, 220)).convert("L"))[0, 0] / 255  # scan's default
    assert np.abs(pp._background(gray) - paper).max() < 0.01


@pytest.mark.parametrize("side", [8, 12, 20])
def test_low_resolution_digits_as_is(digits: np.ndarray, side: int) -> None:
    for i in range(10):
        result = preprocess(tight_digit(digits[i], side, i % 2 == 0))
        assert result.digit.shape == (28, 28)
        assert_like(result.digit, digits[i], corr=0.6 if side == 8 else 0.75, most=0.1)


def test_thin_strokes_are_widened_to_mnists_range(digits: np.ndarray) -> None:
    for i in range(10):
        thin = preprocess(scan(tight_crop(restroke(digits[i], -3), 150, 0.2, Image.Resampling.BICUBIC), seed=i))
        normal = preprocess(scan(tight_crop(restroke(digits[i]), 150, 0.2, Image.Resampling.BICUBIC), seed=i))
        # Measured in the field: strokes a third of MNIST's come out 1.1-2.0 wide (0.7-2.0 without widening,
        # mean 1.1), strokes of MNIST's width as wide as the digit itself (within 0.3).
        assert pp._stroke_width(thin.digit) > 1.05, i
        assert abs(pp._stroke_width(normal.digit) - pp._stroke_width(digits[i] / 255)) < 0.4, i


# ---------------------------------------------------------------------------------------------- properties


@functools.cache
def _test_digits() -> np.ndarray:
    """A spread of MNIST test digits for the properties below (hypothesis cannot take pytest's fixtures)."""
    folder = mnist_dir()
    if folder is None:
        pytest.skip("real MNIST not found: set MNISTLAB_DATA to a folder with the IDX files")
    return read_images(folder / "t10k-images-idx3-ubyte.gz")[::50]


@st.composite
def digit_images(draw: st.DrawFn) -> tuple[Image.Image, str]:
    """A test digit as a user might bring it: either polarity, 8-200 pixels on its longer side, cropped
    tightly or with a margin, thin to very thick strokes, some noise, maybe enlarged; with a description."""
    digits = _test_digits()
    index = draw(st.integers(0, len(digits) - 1))
    change = draw(st.integers(-3, 7))  # stroke change in pixels a side at 4x: a third to 2.5 times MNIST's
    side = draw(st.integers(8, 200))
    margin = draw(st.sampled_from([0.0, 0.05, 0.2, 0.5]))
    ink = tight_crop(restroke(digits[index], change), side, margin)
    paper, ink_level = draw(st.integers(170, 255)), draw(st.integers(0, 70))  # at least 100 levels apart
    dark_on_light = draw(st.booleans())
    noise = draw(st.floats(0, 6))
    enlarge = draw(st.sampled_from([None, Image.Resampling.NEAREST, Image.Resampling.BILINEAR]))
    about = f"digit {index}, change {change}, side {side}, margin {margin}, noise {noise:.1f}, {enlarge}"
    # Visible: the ink of some two neighbouring pixels stands at least half a pixel's coverage above that of
    # some other two (a thin stroke at 8 pixels may not, nor a stroke that fills a tiny frame edge to edge,
    # leaving no paper: seen as an 8x2 crop of a 1 at 40-60% ink throughout). Pairs, not single pixels, as
    # preprocess reads an image's extremes, so that a lone speck of noise never counts as a digit.
    pairs = [np.minimum(ink[:, 1:], ink[:, :-1]), np.maximum(ink[:, 1:], ink[:, :-1])]
    pairs += [np.minimum(ink[1:], ink[:-1]), np.maximum(ink[1:], ink[:-1])]
    strongest = max(float(p.max(initial=0)) for p in pairs[::2])  # `initial`: a crop one pixel wide has no
    faintest = min(float(p.min(initial=1)) for p in pairs[1::2])  # pairs across it
    assume(strongest - faintest >= 0.5)
    levels = (paper, ink_level) if dark_on_light else (255 - paper, 255 - ink_level)
    grey = levels[0] + (levels[1] - levels[0]) * ink
    grey += np.random.default_rng(index).standard_normal(grey.shape) * noise
    image = Image.fromarray(np.clip(grey + 0.5, 0, 255).astype(np.uint8))
    if enlarge is not None:
        scale = 64 / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), enlarge)
    return image, about


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(digit_images())
def test_any_visible_digit_is_found_and_centred(case: tuple[Image.Image, str]) -> None:
    image, about = case
    result = preprocess(image)  # never refused
    tensor = result.tensor
    assert tensor.shape == (28, 28) and tensor.dtype == torch.float32, about
    assert float(tensor.min()) >= 0 and float(tensor.max()) <= 1 and float(tensor.max()) > 0.5, about
    digit = result.digit.astype(np.float64)
    rows = np.arange(28) @ digit.sum(axis=1) / digit.sum()
    cols = np.arange(28) @ digit.sum(axis=0) / digit.sum()
    assert abs(rows - CENTRE) < 0.5 and abs(cols - CENTRE) < 0.5, (about, rows, cols)


def test_a_tiny_tight_crop_on_pure_white_or_black_paper_is_found() -> None:
    """Found by the property above: a test digit cropped to its ink at 12 pixels, on paper that reads exactly 255
    (or 0, light on dark), was refused as blank for some ink levels. The noise between neighbours there is the
    digit's own stroke edges, which put the level just under its one brightest pixel; the tiny digit's own
    measure must then take over."""
    ink = tight_crop(restroke(_test_digits()[29], 0), 12, 0.0)
    for ink_level in range(0, 71):
        for levels in ((255, ink_level), (0, 255 - ink_level)):
            grey = levels[0] + (levels[1] - levels[0]) * ink
            image = Image.fromarray(np.clip(grey + 0.5, 0, 255).astype(np.uint8))
            assert float(preprocess(image).tensor.max()) > 0.5, (ink_level, levels)


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 300), st.integers(2, 300), st.integers(0, 255), st.floats(0, 6), st.integers(0, 2**32 - 1))
# Blank images once taken for digits: too few pixels to measure the noise on, noise cut off by white paper,
# noise on black in MNIST's own 28x28 format.
@example(width=2, height=2, level=8, sigma=6.0, seed=2861)
@example(width=3, height=4, level=10, sigma=6.0, seed=2862)
@example(width=13, height=17, level=248, sigma=6.0, seed=5725)
@example(width=28, height=28, level=0, sigma=1.0, seed=0)
def test_blank_noisy_images_are_refused(width: int, height: int, level: int, sigma: float, seed: int) -> None:
    grey = level + np.random.default_rng(seed).standard_normal((height, width)) * sigma  # a scan of nothing
    image = Image.fromarray(np.clip(grey + 0.5, 0, 255).astype(np.uint8))
    with pytest.raises(MnistlabError, match="no digit found"):
        preprocess(image)


_DTYPES = [np.uint8, np.uint16, np.int32, np.float32, np.bool_]


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(_DTYPES).flatmap(
        lambda dtype: hnp.arrays(
            dtype,
            st.tuples(st.integers(1, 40), st.integers(1, 40))
            | st.tuples(st.integers(1, 40), st.integers(1, 40), st.just(3)),
            elements=hnp.from_dtype(np.dtype(dtype), allow_nan=True, allow_infinity=True),
        )
    )
)
def test_any_array_gives_a_digit_or_a_user_error(values: np.ndarray) -> None:
    if values.ndim == 3 and values.dtype != np.uint8:
        values = values[..., 0]  # Pillow takes three channels as 8-bit RGB only
    image = Image.fromarray(values)
    try:
        result = preprocess(image)
    except MnistlabError as exc:
        assert "\n" not in str(exc)
        return
    assert result.tensor.shape == (28, 28) and float(result.tensor.min()) >= 0 and float(result.tensor.max()) <= 1


@functools.cache
def _valid_files() -> list[bytes]:
    """A PNG and a JPEG of a digit on paper, and a transparent canvas PNG, as bytes to corrupt."""
    digit = np.zeros((28, 28), dtype=np.uint8)
    digit[6:22, 12:16] = 255
    files = []
    for image, fmt in ((on_paper(digit, size=(64, 48), digit_height=30), "PNG"), (on_paper(digit), "JPEG")):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        files.append(buffer.getvalue())
    buffer = io.BytesIO()
    canvas_rgba(digit, size=56).save(buffer, format="PNG")
    return [*files, buffer.getvalue()]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(
        st.binary(max_size=200),
        st.tuples(
            st.integers(0, 2),
            st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
            st.integers(8, 10**6),
        ),
    )
)
def test_any_bytes_give_a_digit_or_a_user_error(tmp_path: Path, data: bytes | tuple) -> None:
    if isinstance(data, tuple):  # a valid file with a few bytes changed and maybe cut short
        which, changes, length = data
        corrupt = bytearray(_valid_files()[which])
        for position, value in changes:
            corrupt[position % len(corrupt)] = value
        data = bytes(corrupt[:length])
    path = tmp_path / "upload.img"
    path.write_bytes(data)
    try:
        result = preprocess(path)
    except MnistlabError as exc:
        assert str(exc).startswith(str(path)) and "\n" not in str(exc)
        return
    assert result.tensor.shape == (28, 28)


# ---------------------------------------------------------------------------------------------- accuracy


# The least accuracy the bundled model must keep on each tougher kind of image (issue 13), on every 100th
# test digit; measured values in the comments (one image is one point), floors a few points under them.
TOUGH_FLOORS = {
    "tight-crop-lowres-64": 0.95,  # measured 0.98
    "tight-crop-dark-on-light": 0.97,  # 1.00
    "tight-crop-light-on-dark": 0.97,  # 1.00
    "lowres-8": 0.91,  # 0.95
    "lowres-12": 0.97,  # 1.00
    "lowres-16": 0.97,  # 1.00
    "lowres-20": 0.97,  # 1.00
    "thick-strokes": 0.86,  # 0.90
    "thin-strokes": 0.93,  # 0.97
}


@pytest.mark.slow  # 15 s on 2 busy cores
def test_accuracy_on_tight_small_thick_and_thin_digits(tmp_path: Path, mnist_data) -> None:
    """About 10 s: 900 images through preprocess and the bundled model, none refused."""
    model = load_model(None, "cpu")
    index = torch.arange(0, 10000, 100)
    images, labels = mnist_data.test.images[index].numpy(), mnist_data.test.labels[index]
    measured = {}
    for kind in TOUGH_KINDS:
        paths = [realistic_image(kind, digit, i, tmp_path / kind) for i, digit in enumerate(images)]
        tensors = [preprocess(path).tensor for path in paths]  # a refusal fails the test
        measured[kind] = float((classify(model, tensors)[0].argmax(dim=1) == labels).float().mean())
    print(measured)
    assert set(TOUGH_FLOORS) == set(TOUGH_KINDS)
    for kind, floor in TOUGH_FLOORS.items():
        assert measured[kind] >= floor, (kind, measured[kind])
