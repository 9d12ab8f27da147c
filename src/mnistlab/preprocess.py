"""From any image (photo, scan, drawing, MNIST digit) to the 28x28 float tensor an MNIST model expects.

MNIST was made from binary NIST scans: each digit was scaled, keeping its aspect ratio, to fit a 20x20 box
(the anti-aliasing made the grey levels), then placed in a 28x28 field so that its intensity-weighted centre
of mass lies at the centre, white ink on black. `preprocess` repeats that on an arbitrary image, after the
steps a scan never needed: flattening any mode to grey, choosing the ink's polarity, removing uneven
lighting, paper tint and noise, and finding the digit in a larger picture. Every intermediate is kept in
`Preprocessed` for display.
"""

from __future__ import annotations

import math
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageFilter, ImageOps

from mnistlab.errors import MnistlabError

SIZE = 28  # MNIST's field
FIT = 20  # the box the digit's longer side is scaled to
# Real MNIST puts the centre of mass at row/column *index* 14.0 (14.5 counting pixel centres as i + 0.5): over
# the test set the index-based centre is 14.0 on average, spread evenly over 13.5-14.5 by integer shifts.
CENTRE = 14.0
# Refused before decoding. Above the 48-64 megapixels of phone cameras at full resolution, well below the 400
# million of a 20000x20000 decompression bomb, and about where Pillow itself starts to warn.
MAX_PIXELS = 90_000_000
WORK_SIDE = 1024  # larger images are reduced to this longer side before any analysis, for speed
GRID_SIDE = 128  # the ink mask is searched for blobs on a grid of at most this many cells a side
MIN_CONTRAST = 0.08  # ink fainter than this against its background counts as no ink at all
MIN_FLOOR = 0.02  # the lowest threshold for ink, even in a noise-free image
# A blob joins the digit when it holds this share of the main blob's ink and lies within this fraction of the
# digit's longer side from it: the detached bar of a 5, not a speck across the page.
PART_SHARE = 0.02
PART_GAP = 0.25
BLOB_LEVEL = 0.35  # blobs are made of the pixels above this share of the strongest ink: clear of noise and haze
# The digit's box holds the ink above this level (its strong ink is 1): a blurred stroke's edge, as MNIST's box
# was that of a binary scan, is about where it is half as dark as its core. A little lower keeps the ends of
# thin strokes, whose cores never reach full strength.
BOX_LEVEL = 0.4
ABOVE_WEIGHT = 0.02  # the weight of a point above the background surface (ink) while fitting it
_MARGIN = 2  # field pixels rendered around the box for the soft edges outside it

_HIGH_DEPTH = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
# What Pillow raises for files that are corrupt or truncated in various ways.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)


@dataclass
class Preprocessed:
    """Every stage of `preprocess`, for display and debugging; `tensor` is what a model takes."""

    original: Image.Image  # upright (EXIF applied), flattened to RGB
    gray: np.ndarray  # float32 HxW in [0, 1], ink = 1, background removed; long side at most WORK_SIDE
    inverted: bool  # whether the image was dark ink on a light background
    box: tuple[int, int, int, int]  # (left, top, right, bottom) of the digit in `gray`, as for Image.crop
    digit: np.ndarray  # float32 28x28 in [0, 1], white ink on black
    tensor: torch.Tensor  # float32 (28, 28), the same values


# ---------------------------------------------------------------------------------------------- loading


def _check_size(image: Image.Image, name: str) -> None:
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise MnistlabError(
            f"{name}: image too large to open safely ({width}x{height} = {width * height:,} pixels, "
            f"the limit is {MAX_PIXELS:,}); downscale it first"
        )


def load_image(path: str | Path) -> Image.Image:
    """Open an image file, refusing what is missing, empty, not an image, corrupt, or too large to decode
    safely, and turn it upright by its EXIF orientation."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise MnistlabError(f"{path}: cannot read ({exc.strerror})") from None
    if not path.is_file():
        raise MnistlabError(f"{path}: not a file")
    if size == 0:
        raise MnistlabError(f"{path}: empty file (0 bytes), not an image")
    try:
        # Pillow's own bomb check warns from its limit and raises from twice that; both become refusals, and
        # ours still holds where a caller has switched Pillow's off (Image.MAX_IMAGE_PIXELS = None).
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                _check_size(image, str(path))  # from the header, before a single pixel is decoded
                image.load()
                return ImageOps.exif_transpose(image)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise MnistlabError(f"{path}: image too large to open safely ({exc})") from None
    except Image.UnidentifiedImageError:
        raise MnistlabError(f"{path}: not an image (or in a format Pillow cannot read)") from None
    except _DECODE_ERRORS as exc:
        raise MnistlabError(f"{path}: corrupt or truncated image ({exc})") from None


# ---------------------------------------------------------------------------------------------- 1. grey


def _flatten(image: Image.Image, name: str = "image") -> Image.Image:
    """Any mode as 8-bit 'L' or 'RGB' without alpha: what a person sees, transparency filled with background.

    High-depth modes (16-bit, 32-bit, float) have no fixed white point (a 12-bit sensor's white is 4095), so
    their actual range is stretched to 0-255.
    """
    if image.mode in _HIGH_DEPTH:
        values = np.asarray(image, dtype=np.float32)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) * (255 / (high - low)) if high > low else np.zeros_like(values)
        return Image.fromarray(np.round(scaled).astype(np.uint8))
    if image.mode == "1":
        # A bilevel image may stand for grey by the density of its dots (Pillow dithers by default): averaging
        # a small neighbourhood turns that back into grey, and only softens the edges of a plain thresholded scan.
        return image.convert("L").filter(ImageFilter.GaussianBlur(1.5))
    try:
        if image.has_transparency_data:
            return _composite(image.convert("RGBA"))
        return image if image.mode in ("L", "RGB") else image.convert("RGB")
    except ValueError as exc:
        raise MnistlabError(f"{name}: unsupported image mode {image.mode} ({exc})") from None


def _composite(rgba: Image.Image) -> Image.Image:
    """Fill the transparent part of an RGBA image with the colour that will read as background.

    Strokes drawn on a transparent canvas (the opaque part is the minority) get a background that contrasts
    with them: black strokes go on white, white strokes on black. A picture with transparent margins gets its
    own background colour, the median of its opaque pixels.
    """
    sample = rgba.reduce(math.ceil(max(rgba.size) / WORK_SIDE))  # statistics need no more pixels than that
    alpha = np.asarray(sample.getchannel("A"), dtype=np.float32) / 255
    luma = np.asarray(sample.convert("L"), dtype=np.float32) / 255
    coverage = float(alpha.mean())
    if coverage == 0:
        level = 0.0
    elif coverage < 0.5:
        level = 1.0 if float((alpha * luma).sum()) / float(alpha.sum()) < 0.5 else 0.0
    else:
        level = float(np.median(luma[alpha >= 0.5]))
    grey = round(level * 255)
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (grey, grey, grey, 255)), rgba).convert("RGB")


def _working_gray(flat: Image.Image) -> np.ndarray:
    """Luminance as float32 in [0, 1], reduced by an integer factor (area averaging) to at most WORK_SIDE."""
    grey = flat.convert("L")
    factor = math.ceil(max(grey.size) / WORK_SIDE)
    if factor > 1:
        grey = grey.reduce(factor)
    return np.asarray(grey, dtype=np.float32) / 255


# ---------------------------------------------------------------------------------------------- 2. polarity


def _frame(shape: tuple[int, int]) -> np.ndarray:
    """A mask of the frame 2% of the shorter side wide (at least one pixel) around an image of `shape`."""
    band = max(1, min(shape) // 50)
    frame = np.ones(shape, dtype=bool)
    frame[band:-band, band:-band] = False
    return frame


def _extremes(gray: np.ndarray) -> tuple[float, float]:
    """The darkest and lightest levels held by two neighbouring pixels, so a lone noisy pixel cannot set them."""
    if min(gray.shape) < 2:
        return float(gray.min()), float(gray.max())
    pairs = (gray[:, 1:], gray[:, :-1]), (gray[1:], gray[:-1])
    darkest = min(float(np.maximum(a, b).min()) for a, b in pairs)
    lightest = max(float(np.minimum(a, b).max()) for a, b in pairs)
    return darkest, lightest


def _decide_invert(gray: np.ndarray) -> bool:
    """Whether the ink is darker than the background: the background is the median of the border, and the ink
    is whichever extreme lies further from it. That also reads dark ink on mid-grey paper in a dim photo,
    where asking only "is the background light?" would fail."""
    background = float(np.median(gray[_frame(gray.shape)]))
    darkest, lightest = _extremes(gray)
    return background - darkest > lightest - background


# ---------------------------------------------------------------------------------------------- 3. background


def _background(gray: np.ndarray) -> np.ndarray:
    """The background under bright ink, as a smooth quadratic surface fitted robustly to the non-ink pixels.

    Uneven lighting and paper tint vary slowly across a page, so a low-order surface follows them but can never
    follow a stroke: no hole is dug in a digit however large it is, and a digit filling most of a tightly
    cropped picture does not lift it. The fit runs on a copy reduced to 64 pixels a side.
    """
    height, width = gray.shape
    scale = min(1.0, 64 / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = np.asarray(Image.fromarray(gray).resize(size, Image.Resampling.BOX), dtype=np.float64)
    design = np.stack([np.broadcast_to(t, small.shape).ravel() for t in _quadratic(*small.shape)], axis=1)
    values = small.ravel()
    # Asymmetric least squares: points above the surface (ink) count little, points below count fully, so the
    # surface settles under the ink onto the background however much ink there is.
    weight = np.ones_like(values)
    for _ in range(10):
        coef = _weighted_fit(design, values, weight)
        weight = np.where(values > design @ coef, ABOVE_WEIGHT, 1 - ABOVE_WEIGHT)
    # The little weight left on the ink still bends the surface a little; refit to the background alone.
    for _ in range(2):
        residual = values - design @ coef
        coef = _weighted_fit(design, values, residual <= 2.5 * _noise(residual) + 0.01)
    surface = sum(c * t for c, t in zip(coef, _quadratic(height, width), strict=True))
    return np.broadcast_to(surface, gray.shape).astype(np.float32)


def _weighted_fit(design: np.ndarray, values: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Weighted least squares by the normal equations, a 6x6 system far cheaper than lstsq's SVD, with a
    whisper of ridge so that a tiny or degenerate image still has exactly one solution."""
    weighted = design * weight[:, None]
    return np.linalg.solve(weighted.T @ design + 1e-9 * np.eye(design.shape[1]), weighted.T @ values)


def _quadratic(rows: int, cols: int) -> list[np.ndarray]:
    """The terms 1, x, y, x², xy, y² over a rows x cols grid spanning [-1, 1], as broadcastable arrays."""
    y = ((np.arange(rows) + 0.5) / rows * 2 - 1)[:, None]
    x = ((np.arange(cols) + 0.5) / cols * 2 - 1)[None, :]
    return [np.ones((1, 1)), x, y, x * x, x * y, y * y]


def _noise(residual: np.ndarray) -> float:
    """The noise of the background around a surface fitted to it, from the pixels below the surface only: ink
    lies above it, so however much ink there is, this half is pure background (a robust standard deviation,
    from the median absolute deviation of a half-normal)."""
    below = residual[residual < 0]
    return 1.4826 * float(np.median(-below)) if below.size else 0.0


# ---------------------------------------------------------------------------------------------- 4. the digit


def _label(cells: np.ndarray) -> np.ndarray:
    """8-connected components of a small boolean grid: every set cell gets the smallest flat index in its
    component, every clear cell the grid's size. Minimum propagation with pointer jumping, all in numpy."""
    height, width = cells.shape
    off = height * width
    labels = np.where(cells, np.arange(off).reshape(height, width), off)
    while True:
        padded = np.pad(labels, 1, constant_values=off)
        neighbours = np.min([padded[dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3)], axis=0)
        neighbours = np.where(cells, neighbours, off)
        # Jump: a cell takes its label's label, so labels travel across a component in few rounds.
        jumped = np.append(neighbours.ravel(), off)[neighbours]
        if np.array_equal(jumped, labels):
            return labels
        labels = jumped


def _digit_region(mask: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The pixels near the digit: the blob of `mask` holding most ink `weight`, plus the nearby blobs big
    enough to be part of it, found on a coarse grid and widened by one cell for the strokes' soft edges."""
    height, width = mask.shape
    cell = max(1, math.ceil(max(height, width) / GRID_SIDE))
    rows, cols = math.ceil(height / cell), math.ceil(width / cell)

    def pool(a: np.ndarray) -> np.ndarray:
        padded = np.zeros((rows * cell, cols * cell), dtype=a.dtype)
        padded[:height, :width] = a
        return padded.reshape(rows, cell, cols, cell)

    cells = pool(mask).any(axis=(1, 3))
    mass = pool(np.where(mask, weight, 0)).sum(axis=(1, 3))
    labels = _label(cells)
    ys, xs = np.nonzero(cells)
    ids, blob = np.unique(labels[ys, xs], return_inverse=True)
    blob_mass = np.bincount(blob, weights=mass[ys, xs])
    boxes = np.full((len(ids), 4), [rows, cols, -1, -1])  # top, left, bottom, right (inclusive)
    np.minimum.at(boxes[:, 0], blob, ys)
    np.minimum.at(boxes[:, 1], blob, xs)
    np.maximum.at(boxes[:, 2], blob, ys)
    np.maximum.at(boxes[:, 3], blob, xs)

    main = int(np.argmax(blob_mass))
    chosen = {main}
    group = boxes[main].copy()
    candidates = [int(b) for b in np.flatnonzero(blob_mass >= PART_SHARE * blob_mass[main]) if b != main]
    grown = True
    while grown:
        grown = False
        for b in candidates:
            top, left, bottom, right = boxes[b]
            gap = max(top - group[2], group[0] - bottom, left - group[3], group[1] - right)
            if b not in chosen and gap <= PART_GAP * max(group[2] - group[0], group[3] - group[1]) + 1:
                chosen.add(b)
                group = np.concatenate([np.minimum(group[:2], boxes[b, :2]), np.maximum(group[2:], boxes[b, 2:])])
                grown = True

    keep = np.zeros(rows * cols, dtype=bool)
    keep[ys * cols + xs] = np.isin(blob, list(chosen))
    keep = np.pad(keep.reshape(rows, cols), 1)
    keep = np.max([keep[dy : dy + rows, dx : dx + cols] for dy in range(3) for dx in range(3)], axis=0)
    return np.repeat(np.repeat(keep, cell, axis=0), cell, axis=1)[:height, :width]


def _extract_ink(gray: np.ndarray, inverted: bool, name: str = "image") -> np.ndarray:
    """Bright ink on black, background removed: subtract the background, find the digit, zero everything
    else and everything within the noise, and stretch so the digit's strong ink reaches 1.

    The threshold sits just above the noise, and above it intensities stay proportional to the ink rather than
    binarised, so anti-aliased and blurred stroke edges keep their share of the stroke.
    """
    background = _background(gray)
    residual = gray - background
    if inverted:
        # On paper, light falls on ink and paper alike, so the ink's contrast scales with the paper's
        # brightness (1 - background here): dividing by it makes the ink as strong in shadow as in light.
        residual = residual / np.maximum(1 - background, 0.05)
    floor = max(4 * _noise(residual), MIN_FLOOR)
    above = residual[residual > floor]
    peak = float(np.percentile(above, 99)) if above.size else 0.0
    if peak < max(MIN_CONTRAST, 2 * floor):  # no ink, or none standing clear of the noise
        raise MnistlabError(f"{name}: no digit found (the image is blank)")
    mask = residual > max(floor, BLOB_LEVEL * peak)
    region = _digit_region(mask, residual)
    strong = float(np.percentile(residual[mask & region], 90))
    return np.where(region, np.clip((residual - floor) / (strong - floor), 0, 1), 0).astype(np.float32)


def _ink_box(ink: np.ndarray, level: float) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of the pixels with ink above `level`, or None when there are none."""
    rows, cols = np.flatnonzero((ink > level).any(axis=1)), np.flatnonzero((ink > level).any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


# ---------------------------------------------------------------------------------------------- 5-6. fit, centre


def _fit_size(width: int, height: int) -> tuple[int, int]:
    """The (width, height) a box gets when its longer side is scaled to FIT, keeping the aspect ratio."""
    scale = FIT / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _centre_of_mass(values: np.ndarray) -> tuple[float, float]:
    """Intensity-weighted mean (row, column) index."""
    total = float(values.sum())
    rows = float(values.sum(axis=1) @ np.arange(values.shape[0])) / total
    cols = float(values.sum(axis=0) @ np.arange(values.shape[1])) / total
    return rows, cols


def _paste(target: np.ndarray, values: np.ndarray, row: int, col: int) -> None:
    """Copy `values` into `target` with its top-left corner at (row, col), dropping what falls outside."""
    y0, x0 = max(row, 0), max(col, 0)
    y1, x1 = min(row + values.shape[0], target.shape[0]), min(col + values.shape[1], target.shape[1])
    if y0 < y1 and x0 < x1:
        target[y0:y1, x0:x1] = values[y0 - row : y1 - row, x0 - col : x1 - col]


def _place(ink: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The digit in `box` scaled to fit FIT x FIT and placed in a SIZE x SIZE field with its centre of mass at
    CENTRE, anti-aliased, in [0, 1].

    The ink just outside the box (the soft edges below the box's level) comes along at the same scale, as the
    partly covered pixels at the edge of MNIST's binary strokes did. The position is found by rendering,
    measuring the centre of mass and rendering again: the resampler's overshoot, clipped, moves it a little.
    """
    left, top, right, bottom = box
    fit_w, fit_h = _fit_size(right - left, bottom - top)
    scale_x, scale_y = fit_w / (right - left), fit_h / (bottom - top)
    pad = math.ceil((_MARGIN + 2) / min(scale_x, scale_y))
    crop = np.zeros((bottom - top + 2 * pad, right - left + 2 * pad), dtype=np.float32)
    _paste(crop, ink, pad - top, pad - left)
    source_image = Image.fromarray(crop)

    def render(row: float, col: float) -> np.ndarray:
        """The box's top-left corner at field position (row, col): whole pixels by where the patch goes, the
        fraction by shifting the source box, so that sub-pixel placement costs no extra blur."""
        row0, col0 = math.floor(row) - _MARGIN, math.floor(col) - _MARGIN
        rows, cols = fit_h + 2 * _MARGIN + 1, fit_w + 2 * _MARGIN + 1
        source_left, source_top = pad + (col0 - col) / scale_x, pad + (row0 - row) / scale_y
        source = (source_left, source_top, source_left + cols / scale_x, source_top + rows / scale_y)
        patch = source_image.resize((cols, rows), Image.Resampling.LANCZOS, box=source)
        out = np.zeros((SIZE, SIZE), dtype=np.float32)
        # A lopsided digit may reach past the field after centring, as in MNIST itself: that part is cut.
        _paste(out, np.asarray(patch), row0, col0)
        return np.clip(out, 0, 1)

    row, col = CENTRE + 0.5 - fit_h / 2, CENTRE + 0.5 - fit_w / 2  # the box centred, to begin with
    out = render(row, col)
    for _ in range(2):
        com_row, com_col = _centre_of_mass(out)
        row, col = row + CENTRE - com_row, col + CENTRE - com_col
        out = render(row, col)
    return out


# ---------------------------------------------------------------------------------------------- preprocess


def preprocess(image: Image.Image | str | Path, invert: bool | None = None) -> Preprocessed:
    """Turn a photo, scan, drawing or MNIST digit into MNIST's format: white ink on black, the digit scaled to
    fit 20x20 and centred by mass in 28x28.

    `invert` says whether the image is dark ink on a light background; None decides from the image. An image
    already in MNIST's format (28x28 on a black border) passes through unchanged but for scaling to [0, 1].
    """
    if isinstance(image, (str, Path)):
        name = str(image)
        image = load_image(image)
    else:
        name = getattr(image, "filename", "") or "image"
        _check_size(image, name)
        if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
            image = ImageOps.exif_transpose(image)
    flat = _flatten(image, name)
    gray = _working_gray(flat)
    inverted = _decide_invert(gray) if invert is None else invert
    if inverted:
        gray = 1 - gray
    # MNIST's own digits have a black border: redoing their crop and fit would only blur them.
    mnist_like = gray.shape == (SIZE, SIZE) and float(np.median(gray[_frame(gray.shape)])) <= 0.1
    ink = gray if mnist_like else _extract_ink(gray, inverted, name)
    box = _ink_box(ink, 0 if mnist_like else BOX_LEVEL)
    if box is None:
        raise MnistlabError(f"{name}: no digit found (the image is blank)")
    digit = ink if mnist_like else _place(ink, box)
    return Preprocessed(flat.convert("RGB"), ink, inverted, box, digit, torch.from_numpy(digit))
