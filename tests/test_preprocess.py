"""mnistlab.preprocess: loading, then each step on its own, then whole images of every kind built from real
MNIST *test* digits (tests/digit_images.py), then blank and hostile inputs, quality and speed."""

from __future__ import annotations

import functools
import io
import time
from pathlib import Path

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from mnistlab.data import preprocess as pp
from mnistlab.data.idx import read_images
from mnistlab.data.preprocess import CENTRE, Preprocessed, load_image, preprocess
from mnistlab.errors import MnistlabError
from mnistlab.infer.predict import classify
from mnistlab.models.files import load_model

from .conftest import mnist_dir
from .digit_images import (
    CHALK,
    TOUGH_KINDS,
    blank_png,
    canvas_rgba,
    light_on_dark,
    on_paper,
    realistic_image,
    restroke,
    save_as,
    scan,
    tight_crop,
    with_exif_rotation,
)


@pytest.fixture(scope="module")
def digits(mnist_path: Path) -> np.ndarray:
    """The MNIST *test* digits (conftest's `mnist_path` skips when real MNIST is absent)."""
    return read_images(mnist_path / "t10k-images-idx3-ubyte.gz")


@pytest.fixture(scope="module")
def seven(digits: np.ndarray) -> np.ndarray:
    return digits[0]  # the test set's first digit, a 7


@pytest.fixture(scope="module")
def page(seven: np.ndarray) -> Image.Image:
    """Dark ink on tinted, unevenly lit, noisy paper."""
    return on_paper(seven, seed=1)


@pytest.fixture(scope="session")
def bomb_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 20000x20000 PNG (400 million pixels) that is only about 50 kB on disk."""
    return blank_png(tmp_path_factory.mktemp("bomb") / "bomb.png", 20000, 20000)


def similarity(out: np.ndarray, digit: np.ndarray) -> tuple[float, float]:
    """Mean absolute difference and correlation between a preprocessed digit and the MNIST original."""
    ref = digit / 255
    return float(np.abs(out - ref).mean()), float(np.corrcoef(out.ravel(), ref.ravel())[0, 1])


def assert_like(out: np.ndarray, digit: np.ndarray, corr: float = 0.85, most: float = 0.07) -> None:
    mad, r = similarity(out, digit)
    assert r > corr and mad < most, f"correlation {r:.3f}, mean abs diff {mad:.3f}"


def mean_diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float)).mean())


def frame_side(digit: np.ndarray, digit_height: int) -> int:
    """The side of the upscaled 28x28 frame that digit_images draws for `digit_height`."""
    rows = np.flatnonzero(digit.any(axis=1))
    return round(28 * digit_height / (rows[-1] - rows[0] + 1))


def ink_bbox(values: np.ndarray, level: float = 0.1) -> tuple[int, int]:
    """Height and width of the box around pixels above `level`."""
    rows, cols = np.flatnonzero((values > level).any(axis=1)), np.flatnonzero((values > level).any(axis=0))
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


# ---------------------------------------------------------------------------------------------- load_image


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.png"
    with pytest.raises(MnistlabError, match=f"^{path}: cannot read \\(No such file"):
        load_image(path)


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(MnistlabError, match="not a file"):
        load_image(tmp_path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.touch()
    with pytest.raises(MnistlabError, match=f"^{path}: empty file"):
        load_image(path)


def test_text_named_png(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("not a picture\n")
    with pytest.raises(MnistlabError, match=f"^{path}: not an image"):
        load_image(path)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_file(tmp_path: Path, page: Image.Image, suffix: str) -> None:
    path = save_as(page, tmp_path / f"page{suffix}")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(MnistlabError, match=f"^{path}: corrupt or truncated image") as info:
        load_image(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("pillow_limit", ["default", "switched off"])
def test_decompression_bomb_refused_before_decoding(
    bomb_png: Path, monkeypatch: pytest.MonkeyPatch, pillow_limit: str
) -> None:
    if pillow_limit == "switched off":  # then our own check of the header's size must hold alone
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    start = time.perf_counter()
    with pytest.raises(MnistlabError, match=f"^{bomb_png}: image too large to open safely"):
        load_image(bomb_png)
    with pytest.raises(MnistlabError, match="too large"):
        preprocess(bomb_png)
    assert time.perf_counter() - start < 0.5  # decoding 400 million pixels would take seconds and 400 MB


def test_a_small_image_of_the_same_kind_loads(tmp_path: Path) -> None:
    image = load_image(blank_png(tmp_path / "small.png", 300, 200))
    assert image.size == (300, 200) and image.mode == "1"


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied(tmp_path: Path, page: Image.Image, orientation: int) -> None:
    path = with_exif_rotation(page, tmp_path / f"photo-{orientation}.jpg", orientation)
    with Image.open(path) as stored:
        raw = stored.copy()
    assert raw.size != page.size or mean_diff(raw, page) > 3  # really stored turned
    upright = load_image(path)
    assert upright.size == page.size
    right = mean_diff(upright, page)  # JPEG noise only
    wrong = [
        mean_diff(upright.transpose(t), page) for t in (Image.Transpose.ROTATE_180, Image.Transpose.FLIP_TOP_BOTTOM)
    ]
    assert right < 5 and min(wrong) > 2 * right, (right, wrong)


def test_preprocess_turns_a_rotated_photo_upright(tmp_path: Path, page: Image.Image, seven: np.ndarray) -> None:
    path = with_exif_rotation(page, tmp_path / "photo.jpg", 6)
    from_path = preprocess(path)
    assert_like(from_path.digit, seven)
    assert from_path.original.size == page.size
    with Image.open(path) as opened:  # an image opened by the caller is turned upright too
        np.testing.assert_array_equal(preprocess(opened).digit, from_path.digit)


# ---------------------------------------------------------------------------------------------- 1. modes


def test_high_depth_modes_are_stretched_to_their_range() -> None:
    twelve_bit = np.array([[100, 2100], [4095, 100]], dtype=np.uint16)
    for image in (
        Image.fromarray(twelve_bit),  # I;16
        Image.fromarray(twelve_bit.astype(np.int32) - 3000),  # I, negative values too
        Image.fromarray(twelve_bit.astype(np.float32) / 7),  # F
    ):
        flat = pp._flatten(image)
        assert flat.mode == "L", image.mode
        np.testing.assert_array_equal(np.asarray(flat), [[0, 128], [255, 0]])


def test_transparent_canvas_background_contrasts_with_strokes(seven: np.ndarray) -> None:
    black = np.asarray(pp._flatten(canvas_rgba(seven, stroke_rgb=(0, 0, 0))).convert("L"))
    white = np.asarray(pp._flatten(canvas_rgba(seven, stroke_rgb=(255, 255, 255))).convert("L"))
    assert black[0, 0] == 255 and black.min() == 0  # black strokes on white
    assert white[0, 0] == 0 and white.max() == 255  # white strokes on black


@pytest.mark.parametrize("stroke", [(0, 0, 0), (255, 255, 255), (30, 60, 200)])
@pytest.mark.parametrize("mode", ["RGBA", "P"])
def test_transparent_canvas(tmp_path: Path, seven: np.ndarray, stroke: tuple[int, int, int], mode: str) -> None:
    path = save_as(canvas_rgba(seven, stroke_rgb=stroke), tmp_path / "canvas.png", mode)
    with Image.open(path) as saved:
        assert saved.mode == mode and saved.has_transparency_data
    result = preprocess(path)
    assert result.inverted == (stroke != (255, 255, 255))
    assert_like(result.digit, seven, corr=0.88)


def test_transparent_margins_take_the_picture_background(page: Image.Image, seven: np.ndarray) -> None:
    rgba = np.array(page.convert("RGBA"))
    rgba[:40, :, :] = 0  # transparent margins above and below, hiding black
    rgba[-40:, :, :] = 0
    image = Image.fromarray(rgba)
    flat = np.asarray(pp._flatten(image).convert("L"), dtype=float)
    assert abs(flat[5, 320] - np.median(flat[40:-40])) < 3  # the margin is paper, not black
    assert_like(preprocess(image).digit, seven)


@pytest.mark.parametrize(
    ("mode", "suffix"),
    [("RGB", ".jpg"), ("L", ".jpg"), ("L", ".png"), ("P", ".png"), ("RGBA", ".png"), ("CMYK", ".jpg")],
)
def test_saved_modes(tmp_path: Path, page: Image.Image, seven: np.ndarray, mode: str, suffix: str) -> None:
    path = save_as(page, tmp_path / f"page{suffix}", mode)
    with Image.open(path) as saved:
        assert saved.mode == mode
    assert_like(preprocess(path).digit, seven)


@pytest.mark.parametrize("mode", ["1", "1-dithered", "LA", "I;16", "I", "F"])
def test_in_memory_modes(page: Image.Image, seven: np.ndarray, mode: str) -> None:
    grey = np.asarray(page.convert("L"))
    image = {
        "1": page.convert("L").point(lambda v: 255 if v > 128 else 0).convert("1"),  # a black-and-white scan
        "1-dithered": page.convert("1"),  # grey as a density of black dots
        "LA": page.convert("LA"),
        "I;16": Image.fromarray(grey.astype(np.uint16) * 16),  # 12-bit data in a 16-bit image
        "I": Image.fromarray(grey.astype(np.int32) * 1000),
        "F": Image.fromarray(grey.astype(np.float32) / 255),
    }[mode]
    assert image.mode == mode.split("-")[0]
    assert_like(preprocess(image).digit, seven)


# ---------------------------------------------------------------------------------------------- 2. polarity


def test_polarity_is_decided_from_the_image(page: Image.Image, seven: np.ndarray) -> None:
    assert preprocess(page).inverted is True
    chalk = preprocess(light_on_dark(seven, seed=2))
    assert chalk.inverted is False
    assert_like(chalk.digit, seven)


def test_dark_ink_on_dim_grey_paper_is_inverted(seven: np.ndarray) -> None:
    # The paper is darker than mid-grey, so "is the background light?" alone would get this wrong.
    image = on_paper(seven, paper_rgb=(105, 100, 95), ink_rgb=(10, 10, 10), noise_sigma=3, seed=3)
    assert np.median(np.asarray(image.convert("L"))) < 100
    result = preprocess(image)
    assert result.inverted is True
    assert_like(result.digit, seven)


def test_decide_invert_on_plain_arrays() -> None:
    background, ink = np.full((50, 50), 0.9), np.full((50, 50), 0.9)
    ink[20:30, 10:40] = 0.1
    assert pp._decide_invert(ink)
    assert not pp._decide_invert(1 - ink)
    assert not pp._decide_invert(background)  # nothing to go by: leave it alone


def test_invert_override_is_obeyed(page: Image.Image, seven: np.ndarray) -> None:
    assert preprocess(page, invert=True).inverted is True
    # Forced the wrong way, dark ink lies below its light background: there is no bright ink to find.
    with pytest.raises(MnistlabError, match="no digit found"):
        preprocess(page, invert=False)
    with pytest.raises(MnistlabError, match="no digit found"):
        preprocess(light_on_dark(seven, seed=4), invert=True)


# ---------------------------------------------------------------------------------------------- 3. background


def test_background_follows_the_lighting_not_the_ink(seven: np.ndarray) -> None:
    yy, xx = np.mgrid[0:300, 0:400] / 300
    lighting = (0.15 + 0.25 * xx - 0.1 * yy + 0.08 * yy * yy).astype(np.float32)
    tile = np.asarray(Image.fromarray(seven).resize((280, 280), Image.Resampling.BICUBIC)) / 255
    gray = lighting.copy()
    gray[10:290, 60:340] += 0.6 * tile  # a large digit covering most of the picture
    assert np.abs(pp._background(gray) - lighting).max() < 0.01


def test_extract_ink_clears_the_background_and_keeps_soft_edges(tmp_path: Path, seven: np.ndarray) -> None:
    image = on_paper(seven, size=(640, 480), position=(100, 80), digit_height=200, noise_sigma=6, seed=5)
    path = save_as(image, tmp_path / "noisy.jpg", quality=60)  # plenty of JPEG artefacts
    gray = 1 - pp._working_gray(load_image(path))
    ink = pp._extract_ink(gray, inverted=True)
    tile = frame_side(seven, 200)  # the upscaled frame around the digit, placed at (100, 80)
    outside = np.ones_like(ink, dtype=bool)
    outside[80 - 10 : 80 + tile + 10, 100 - 10 : 100 + tile + 10] = False
    assert ink[outside].max() == 0
    assert ink.max() == 1
    inked = ink[ink > 0]
    assert np.mean(inked < 0.9) > 0.15  # edges stay graded, not binarised


# ---------------------------------------------------------------------------------------------- 4. crop


def test_label_finds_eight_connected_components() -> None:
    cells = np.array(
        [
            [1, 0, 1, 0, 0, 0],
            [1, 0, 1, 0, 0, 1],
            [1, 1, 1, 0, 1, 0],  # a U, and a diagonal pair touching only at corners
            [0, 0, 0, 0, 0, 0],
            [0, 0, 0, 1, 1, 0],
        ],
        dtype=bool,
    )
    labels = pp._label(cells)
    assert set(np.unique(labels[cells]).tolist()) == {0, 11, 27}
    assert (labels[~cells] == cells.size).all()


def test_digit_region_keeps_detached_parts_and_drops_far_specks() -> None:
    mask = np.zeros((400, 400), dtype=bool)
    mask[100:300, 100:120] = True  # the main stroke
    mask[80:90, 100:180] = True  # a detached bar close above it, as in a 5
    mask[380:386, 380:386] = True  # a speck in the far corner
    mask[10:60, 330:380] = True  # a big blot, but far away and smaller than the digit
    region = pp._digit_region(mask, mask.astype(float))
    assert region[100:300, 100:120].all() and region[80:90, 100:180].all()
    assert not region[380:386, 380:386].any() and not region[10:60, 330:380].any()


def test_crop_finds_a_small_digit_in_the_corner_of_a_large_photo(seven: np.ndarray) -> None:
    image = on_paper(seven, size=(2400, 1800), position=(2100, 1550), digit_height=150, seed=6)
    ImageDraw.Draw(image).ellipse((300, 300, 318, 316), fill=(40, 40, 40))  # a blot of dirt elsewhere
    result = preprocess(image)
    assert result.ink.shape == (600, 800)  # reduced by 3 to fit WORK_SIDE
    # Where the digit's ink lies in the photo, from how it was drawn, in the reduced picture's pixels.
    scale = frame_side(seven, 150) / 28
    rows, cols = np.flatnonzero(seven.any(axis=1)), np.flatnonzero(seven.any(axis=0))
    left, top = 2100 + cols[0] * scale, 1550 + rows[0] * scale
    right, bottom = 2100 + (cols[-1] + 1) * scale, 1550 + (rows[-1] + 1) * scale
    expected = np.array([left, top, right, bottom]) / 3
    np.testing.assert_allclose(result.box, expected, atol=3)
    assert_like(result.digit, seven)


def test_a_tightly_cropped_digit(digits: np.ndarray) -> None:
    # Cropped close around the ink, the digit is a third of the picture and crosses most of its border.
    for i in (100, 108, 110, 123, 141):
        digit = digits[i]
        rows, cols = np.flatnonzero(digit.any(axis=1)), np.flatnonzero(digit.any(axis=0))
        scale = frame_side(digit, 200) / 28
        size = (round((cols[-1] - cols[0] + 1) * scale) + 20, round((rows[-1] - rows[0] + 1) * scale) + 20)
        position = (10 - round(cols[0] * scale), 10 - round(rows[0] * scale))
        result = preprocess(on_paper(digit, size=size, position=position, digit_height=200, seed=i))
        assert result.inverted
        assert_like(result.digit, digit)


# ---------------------------------------------------------------------------------------------- 5. fit


@pytest.mark.parametrize(
    ("size", "fitted"),
    [((40, 100), (8, 20)), ((100, 40), (20, 8)), ((300, 300), (20, 20)), ((7, 13), (11, 20)), ((3, 500), (1, 20))],
)
def test_fit_size_keeps_the_aspect(size: tuple[int, int], fitted: tuple[int, int]) -> None:
    assert pp._fit_size(*size) == fitted


def test_place_fits_a_box_into_20x20(seven: np.ndarray) -> None:
    ink = np.zeros((300, 400), dtype=np.float32)
    ink[50:250, 100:180] = 1  # a 80x200 bar
    out = pp._place(ink, (100, 50, 180, 250))
    assert out.sum() == pytest.approx(20 * 8, rel=0.02)  # its area, scaled
    height, width = ink_bbox(out, 0.5)  # placed at a fraction of a pixel, an edge may straddle two
    assert height in (20, 21) and width in (8, 9)
    assert np.abs(out[8:20, 13:16] - 1).max() < 0.02  # the inside stays flat: the resampler keeps levels


def test_fitted_digits_keep_their_aspect_ratio(digits: np.ndarray) -> None:
    for i in range(10, 30):
        image = on_paper(digits[i], size=(500, 400), digit_height=int(150 + 7 * i), seed=i)
        result = preprocess(image)
        left, top, right, bottom = result.box
        height, width = ink_bbox(result.digit)
        assert max(height, width) in (19, 20, 21), i
        source = (bottom - top) / (right - left)
        assert abs(height / width - source) < 0.12 * source + 1 / 20, (i, height, width, source)


# ---------------------------------------------------------------------------------------------- 6. centre


def test_centre_of_mass_is_at_the_centre(digits: np.ndarray) -> None:
    images = [on_paper(digits[i], digit_height=80 + 10 * i, position=(20 * i, 7 * i), seed=i) for i in range(12)]
    images += [light_on_dark(digits[i], seed=i) for i in range(12, 16)]
    images += [canvas_rgba(digits[i], stroke_rgb=(0, 0, 0)) for i in range(16, 20)]
    images.append(canvas_rgba(digits[2]).resize((60, 280)))  # squeezed thin: a tall narrow digit
    images.append(canvas_rgba(digits[3]).resize((280, 70)))  # squashed flat: a wide one
    for k, image in enumerate(images):
        digit = preprocess(image).digit
        rows = np.arange(28) @ digit.sum(axis=1) / digit.sum()
        cols = np.arange(28) @ digit.sum(axis=0) / digit.sum()
        assert abs(rows - CENTRE) < 0.05 and abs(cols - CENTRE) < 0.05, (k, rows, cols)


def test_centre_convention_is_mnists_own(digits: np.ndarray) -> None:
    # MNIST shifted each digit by whole pixels to put its centre of mass nearest index 14, so the centres
    # spread over 13.5-14.5 around CENTRE; in "pixel centre" units (index + 0.5) that is 14.5, not 14.0.
    x = digits[:2000].astype(np.float64)
    rows = (x.sum(axis=2) @ np.arange(28)) / x.sum(axis=(1, 2))
    cols = (x.sum(axis=1) @ np.arange(28)) / x.sum(axis=(1, 2))
    assert abs(rows.mean() - CENTRE) < 0.03 and abs(cols.mean() - CENTRE) < 0.03
    assert rows.min() > CENTRE - 0.51 and rows.max() < CENTRE + 0.51


# ---------------------------------------------------------------------------------------------- 7. MNIST itself


def test_mnist_digits_pass_through_unchanged(digits: np.ndarray) -> None:
    for i, digit in enumerate(digits[:200]):
        result = preprocess(Image.fromarray(digit))
        assert not result.inverted
        assert np.abs(result.digit - digit / 255).max() < 1e-6, i


def test_inverted_mnist_digits_pass_through(digits: np.ndarray) -> None:
    for digit in digits[:20]:
        result = preprocess(Image.fromarray(255 - digit))
        assert result.inverted
        assert np.abs(result.digit - digit / 255).max() < 1e-6


# ---------------------------------------------------------------------------------------------- the result


def test_preprocessed_fields(page: Image.Image) -> None:
    result = preprocess(page)
    assert isinstance(result, Preprocessed)
    assert result.original.mode == "RGB" and result.original.size == page.size
    assert result.ink.dtype == np.float32 and result.ink.shape == page.size[::-1]
    assert result.ink.min() >= 0 and result.ink.max() == 1
    left, top, right, bottom = result.box
    strong = result.ink > pp.BOX_LEVEL
    assert strong[top:bottom, left:right].sum() == strong.sum()
    assert strong[top, left:right].any() and strong[bottom - 1, left:right].any()
    assert result.digit.dtype == np.float32 and result.digit.shape == (28, 28)
    assert result.digit.min() >= 0 and result.digit.max() <= 1
    assert result.tensor.dtype == torch.float32 and result.tensor.shape == (28, 28)
    np.testing.assert_array_equal(result.tensor.numpy(), result.digit)


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


def test_a_large_photo_is_fast(seven: np.ndarray) -> None:
    # A 4000x3000 photo with the digit small in a corner; upscaling a small page is far cheaper than drawing one.
    small = on_paper(seven, size=(800, 600), position=(660, 470), digit_height=70, seed=8)
    photo = small.resize((4000, 3000), Image.Resampling.BICUBIC)
    best = np.inf
    for _ in range(2):
        start = time.perf_counter()
        result = preprocess(photo)
        best = min(best, time.perf_counter() - start)
    assert best < 1.0, f"{best:.2f} s"
    assert_like(result.digit, seven)


# ---------------------------------------------------------------------------------------------- the file's name


def test_no_digit_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "white.png"
    Image.new("L", (200, 150), 255).save(path)
    for image in (path, str(path), load_image(path)):  # as predict passes it: load_image, then preprocess
        with pytest.raises(MnistlabError, match=f"^{path}: no digit found"):
            preprocess(image)


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


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 300), st.integers(2, 300), st.integers(0, 255), st.floats(0, 6), st.integers(0, 2**32 - 1))
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


def test_accuracy_on_tight_small_thick_and_thin_digits(tmp_path: Path, mnist_data) -> None:
    """About 10 s: 900 images through preprocess and the bundled model, none refused."""
    model = load_model(None, "cpu")
    index = torch.arange(0, 10000, 100)
    images, labels = mnist_data.test.images[index].numpy(), mnist_data.test.labels[index]
    measured = {}
    for kind in TOUGH_KINDS:
        paths = [realistic_image(kind, digit, i, tmp_path / kind) for i, digit in enumerate(images)]
        tensors = [preprocess(path).tensor for path in paths]  # a refusal fails the test
        measured[kind] = float((classify(model, tensors).argmax(dim=1) == labels).float().mean())
    print(measured)
    assert set(TOUGH_FLOORS) == set(TOUGH_KINDS)
    for kind, floor in TOUGH_FLOORS.items():
        assert measured[kind] >= floor, (kind, measured[kind])
