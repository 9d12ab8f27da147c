"""mnistlab.data.preprocess step by step: loading, then each step on its own (modes, polarity, background, crop,
fit, centre, MNIST's own digits), the result, and the file's name in its errors. Whole images of every kind are
in test_preprocess_images.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFile

from mnistlab.data import preprocess as pp
from mnistlab.data.preprocess import CENTRE, Preprocessed, load_image, preprocess
from mnistlab.errors import MnistlabError

from .support.digit_images import (
    assert_like,
    blank_png,
    canvas_rgba,
    light_on_dark,
    on_paper,
    save_as,
    with_exif_rotation,
)


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
    decoded = []  # decoding 400 million pixels would take seconds and 400 MB
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda image: decoded.append(image.size) or load(image))
    with pytest.raises(MnistlabError, match=f"^{bomb_png}: image too large to open safely"):
        load_image(bomb_png)
    with pytest.raises(MnistlabError, match="too large"):
        preprocess(bomb_png)
    assert decoded == []


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


# ---------------------------------------------------------------------------------------------- the file's name


def test_no_digit_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "white.png"
    Image.new("L", (200, 150), 255).save(path)
    for image in (path, str(path), load_image(path)):  # as predict passes it: load_image, then preprocess
        with pytest.raises(MnistlabError, match=f"^{path}: no digit found"):
            preprocess(image)
