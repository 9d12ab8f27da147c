"""From any image (photo, scan, drawing, MNIST digit) to the 28x28 float tensor an MNIST model expects.

MNIST was made from binary NIST scans: each digit was scaled, keeping its aspect ratio, to fit a 20x20 box
(the anti-aliasing made the grey levels), then placed in a 28x28 field so that its intensity-weighted centre
of mass lies at the centre, white ink on black. `preprocess` repeats that on an arbitrary image, after the
steps a scan never needed: flattening any mode to grey, choosing the ink's polarity, removing uneven
lighting, paper tint and noise, finding the digit in a larger picture, and widening strokes much thinner than
MNIST's. It holds for digits cropped tightly to their ink (strokes touching the frame, ink covering most of
it), for sources of a few pixels and for very thick strokes. Every intermediate is kept in `Preprocessed` for
display.
"""

from __future__ import annotations

import functools
import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import ExifTags, Image, ImageFilter, ImageOps

from mnistlab.errors import MnistlabError

if TYPE_CHECKING:
    import torch

SIZE = 28  # MNIST's field
FIT = 20  # the box the digit's longer side is scaled to
# Real MNIST puts the centre of mass at row/column *index* 14.0 (14.5 counting pixel centres as i + 0.5): over
# the test set the index-based centre is 14.0 on average, spread evenly over 13.5-14.5 by integer shifts.
CENTRE = 14.0
# Refused before decoding. Above the 48-64 megapixels of phone cameras at full resolution, well below the 400
# million of a 20000x20000 decompression bomb, and about where Pillow itself starts to warn.
MAX_PIXELS = 90_000_000
WORK_SIDE = 1024  # larger images are reduced to this longer side before any analysis, for speed
GLANCE_SIDE = 160  # and then looked at first on a copy of about this longer side
GRID_SIDE = 128  # the ink mask is searched for blobs on a grid of at most this many cells a side
MIN_CONTRAST = 0.08  # ink fainter than this against its background counts as no ink at all
MIN_FLOOR = 0.02  # the lowest threshold for ink, even in a noise-free image
# The noise is measured on the pixels on or below the background surface; with fewer than this many (a tiny
# image) it cannot be: in a 2x2 blank one the surface is its darkest pixel and the noise reads as none.
MIN_NOISE_PIXELS = 64
# An image at most this many pixels a side with a difference this large between its darkest and lightest
# levels (each held by two neighbouring pixels) holds a digit: a blank one's noise stays well below it.
TINY_SIDE = 32
TINY_CONTRAST = 0.2
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
_ORDERS = (1, 3, 6)  # terms of a flat level, a plane and a quadratic surface (1, x, y, x², xy, y²)
SIMPLER = 0.8  # a surface with more terms is kept only when it leaves this share of the simpler one's noise
QUIET = 0.002  # background noise below half an 8-bit grey level: flat, no other surface can do better
_MARGIN = 2  # field pixels rendered around the box for the soft edges outside it
FINE = 4  # the digit is measured, widened and rendered from a copy at this many times its size in the field
# MNIST's strokes, measured as 2 x area / perimeter of the pixels above 0.5 on the test set, are 1.3-2.9 field
# pixels wide (5th-95th percentile, median 2.0). Thinner strokes are widened to 1.3: on 500 test digits drawn
# with strokes a half to a third of MNIST's width that lifts the bundled model from 94.0% to 97.0%. Thinning
# wide strokes does not pay: it left strokes twice MNIST's width at 95.2% and cost blurred low-resolution
# digits 1 point, whose soft edges measure wide.
MIN_STROKE = 1.3

_HIGH_DEPTH = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
# What Pillow raises for files that are corrupt or truncated in various ways.
Box = tuple[float, float, float, float]  # (left, top, right, bottom), as for Image.crop


@dataclass
class Preprocessed:
    """Every stage of `preprocess`, for display and debugging; `tensor` is what a model takes."""

    original: Image.Image  # upright (EXIF applied), flattened to RGB
    ink: np.ndarray  # float32 HxW in [0, 1]: the ink (1) with the background removed; long side at most WORK_SIDE
    inverted: bool  # whether the image was dark ink on a light background
    box: tuple[int, int, int, int]  # (left, top, right, bottom) of the digit in `ink`, as for Image.crop
    digit: np.ndarray  # float32 28x28 in [0, 1], white ink on black

    @property
    def tensor(self) -> torch.Tensor:
        """The digit as a model takes it: float32 (28, 28), sharing `digit`'s memory."""
        import torch  # here, not at the top: preprocessing alone (the web server's workers) needs no torch

        return torch.from_numpy(self.digit)


# ---------------------------------------------------------------------------------------------- loading


class ImageTooLarge(MnistlabError):
    """More pixels than preprocessing takes (decided from the header, before decoding)."""


class NotAnImage(MnistlabError):
    """Empty, or in no format Pillow reads."""


class CorruptImage(MnistlabError):
    """An image format whose data is corrupt or truncated."""


def _check_size(image: Image.Image, prefix: str) -> None:
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageTooLarge(
            f"{prefix}image too large to open safely ({width}x{height} = {width * height:,} pixels, "
            f"the limit is {MAX_PIXELS:,}); downscale it first"
        )


def load_image(source: str | Path | bytes, name: str | None = None) -> Image.Image:
    """Open an image file (a path) or an image's bytes (an upload), refusing what is missing, empty, not an
    image, corrupt, or too large to decode safely, and turn it upright by its EXIF orientation.

    Errors start with `name` (default: the path; for bytes, none) and are typed by cause (ImageTooLarge,
    NotAnImage, CorruptImage), which the web server turns into HTTP statuses.
    """
    if isinstance(source, bytes):
        label, prefix = name or "", f"{name}: " if name else ""
        if not source:
            raise NotAnImage(f"{prefix}empty image (0 bytes): send a PNG, JPEG or other image file")
        opened: str | Path | io.BytesIO = io.BytesIO(source)
    else:
        path = Path(source)
        label = name or str(path)
        prefix = f"{label}: "
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise MnistlabError(f"{prefix}cannot read ({exc.strerror})") from None
        if not path.is_file():
            raise MnistlabError(f"{prefix}not a file")
        if size == 0:
            raise NotAnImage(f"{prefix}empty file (0 bytes), not an image")
        opened = path
    try:
        # Pillow's own bomb check warns from its limit and raises from twice that; both become refusals, and
        # ours still holds where a caller has switched Pillow's off (Image.MAX_IMAGE_PIXELS = None).
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(opened) as image:
                _check_size(image, prefix)  # from the header, before a single pixel is decoded
                image.load()
                upright = ImageOps.exif_transpose(image)
    except ImageTooLarge:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ImageTooLarge(f"{prefix}image too large to open safely ({exc})") from None
    except Image.UnidentifiedImageError:
        raise NotAnImage(f"{prefix}not an image (or in a format Pillow cannot read)") from None
    except Exception as exc:
        # Whatever a decoder raises is the file's fault, not ours: Pillow's plugins raise OSError, SyntaxError,
        # ValueError, EOFError, struct.error, zlib.error and more on corrupt data.
        raise CorruptImage(f"{prefix}corrupt or truncated image ({type(exc).__name__}: {exc})") from None
    # The upright copy has lost the name Image.open gave the file; preprocess's errors name it.
    upright.filename = label  # type: ignore[attr-defined]
    return upright


def _flatten(image: Image.Image, name: str = "image") -> Image.Image:
    """Any mode as 8-bit 'L' or 'RGB' without alpha: what a person sees, transparency filled with background.

    High-depth modes (16-bit, 32-bit, float) have no fixed white point (a 12-bit sensor's white is 4095), so
    their actual range is stretched to 0-255.
    """
    if image.mode in _HIGH_DEPTH:
        values = np.asarray(image, dtype=np.float32)
        finite = values[np.isfinite(values)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)  # a float image may hold NaN or inf
        scaled = (values - low) * (255 / (high - low)) if high > low else np.zeros_like(values)
        return Image.fromarray(np.round(scaled).astype(np.uint8))
    if image.mode == "1":
        # A bilevel image may stand for grey by the density of its dots (Pillow dithers by default): averaging
        # a small neighbourhood turns that back into grey, and only softens the edges of a plain thresholded scan.
        return image.convert("L").filter(ImageFilter.GaussianBlur(1.5))
    try:
        if image.mode in ("RGBA", "LA") and image.getchannel("A").getextrema()[0] == 255:
            # Fully opaque, as a browser canvas painted white is: nothing to fill (compositing costs 1 ms).
            return image.convert("RGB" if image.mode == "RGBA" else "L")
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
    # Statistics need no more than 256 pixels a side; reducing a small image costs more than it saves.
    sample = rgba if max(rgba.size) <= 512 else rgba.reduce(math.ceil(max(rgba.size) / 256))
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


def _reduced(gray: np.ndarray, factor: int) -> np.ndarray:
    """`gray` reduced by an integer factor (area averaging); itself when the factor is 1."""
    return gray if factor <= 1 else np.asarray(Image.fromarray(gray).reduce(factor))


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


def _paired(mask: np.ndarray) -> bool:
    """Whether two neighbouring pixels of `mask` are set (a lone speck of noise is no stroke)."""
    return bool((mask[:, 1:] & mask[:, :-1]).any() or (mask[1:] & mask[:-1]).any())


def _stands_clear(residual: np.ndarray, peak: float, level: float) -> bool:
    """Whether ink stands clear of `level`: its peak above it, held by two neighbouring pixels."""
    return peak >= level and _paired(residual >= level)


def _spread(gray: np.ndarray) -> float:
    """How much lighter the lightest level is than the darkest, each held by two neighbouring pixels."""
    darkest, lightest = _extremes(gray)
    return lightest - darkest


@functools.lru_cache(maxsize=64)
def _border(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The flat indices of the frame of an image of `shape` (see _frame) and a weight for each of its pixels,
    growing towards the corners (cached per shape, read-only): a digit cropped tightly to its ink touches the
    middle of every side, and a thick one may cover most of the frame, but it seldom fills the corners."""
    rows, cols = shape
    band = max(1, min(shape) // 50)
    on_edge = [np.flatnonzero((np.arange(n) < band) | (np.arange(n) >= n - band)) for n in shape]
    inner_rows = np.flatnonzero((np.arange(rows) >= band) & (np.arange(rows) < rows - band))
    row = np.concatenate([np.repeat(on_edge[0], cols), np.repeat(inner_rows, len(on_edge[1]))])
    col = np.concatenate([np.tile(np.arange(cols), len(on_edge[0])), np.tile(on_edge[1], len(inner_rows))])
    y, x = np.abs((row + 0.5) / rows * 2 - 1), np.abs((col + 0.5) / cols * 2 - 1)
    return _frozen(row * cols + col), _frozen(x * y + 1e-3)  # + a floor for images one pixel wide


def _frozen(array: np.ndarray) -> np.ndarray:
    """`array` made read-only, as a cached array must be."""
    array.setflags(write=False)
    return array


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    cumulative = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cumulative, cumulative[-1] / 2)])


def _decide_invert(gray: np.ndarray) -> bool:
    """Whether the ink is darker than the background: the background is the level of the border (its median,
    weighted towards the corners), and the ink is whichever extreme lies further from it. That also reads dark
    ink on mid-grey paper in a dim photo, where asking only "is the background light?" would fail.

    (On 800 digits cropped to 12-16 pixels with strokes 1-4 MNIST pixels wider a side than MNIST's own, the
    plain median of the frame got 174 wrong, the corner-weighted one 54.)
    """
    frame, weights = _border(gray.shape)
    background = _weighted_median(gray.ravel()[frame], weights)
    darkest, lightest = _extremes(gray)
    return background - darkest > lightest - background


# ---------------------------------------------------------------------------------------------- 3. background


def _background(gray: np.ndarray) -> np.ndarray:
    """The background under bright ink, as a smooth surface fitted robustly to the non-ink pixels.

    Uneven lighting and paper tint vary slowly across a page, so a low-order surface follows them but can never
    follow a stroke: no hole is dug in a digit however large it is. A flat level, a plane and a quadratic are
    fitted in turn, and the simplest that leaves the background about as quiet as the next is kept: where ink
    fills most of a tightly cropped picture, the few background pixels left cannot pin a quadratic down, which
    then bends through the strokes. The fit runs on a copy reduced to at most 64 pixels a side.
    """
    height, width = gray.shape
    small = np.asarray(Image.fromarray(gray).reduce(math.ceil(max(height, width) / 64)), dtype=np.float64)
    design = _design(small.shape)
    values = small.ravel()
    border = _border(small.shape)
    best: tuple[float, np.ndarray, float, float] | None = None
    for order in _ORDERS:
        fit = _fit_surface(design[:, :order], values, border)
        if best is None or fit[0] < SIMPLER * best[0] - 1e-4:
            best = fit
        if best[0] < QUIET:  # already as flat as 8-bit levels go (a drawing app's canvas): nothing to gain
            break
    _, coef, low, high = best
    if len(coef) == 1:
        return np.full(gray.shape, np.clip(coef[0], low, high), dtype=np.float32)
    surface = sum(c * t for c, t in zip(coef, _quadratic(height, width), strict=False))
    # Under the ink the surface is extrapolated: it may not leave the range it takes on the background.
    return np.clip(surface, low, high).astype(np.float32)


def _fit_surface(
    design: np.ndarray, values: np.ndarray, border: tuple[np.ndarray, np.ndarray]
) -> tuple[float, np.ndarray, float, float]:
    """A surface with the terms in `design` fitted under `values`: the noise of the background around it, its
    coefficients, and the lowest and highest it is on the background. `border` is the frame's indices in
    `values` and its pixels' weights (see _border)."""
    coef = np.zeros(design.shape[1])
    if design.shape[1] > 1:
        # Asymmetric least squares: points above the surface (ink) count little, points below count fully, so
        # a tilted or curved surface settles under the ink onto the background however much ink there is.
        weight, above = np.ones_like(values), np.zeros(values.shape, dtype=bool)
        for _ in range(10):
            coef = _weighted_fit(design, values, weight)
            now_above = values > design @ coef
            if np.array_equal(now_above, above):  # the same weights again: converged
                break
            above = now_above
            weight = np.where(above, ABOVE_WEIGHT, 1 - ABOVE_WEIGHT)
    # The little weight left on the ink still bends the surface a little, and where blurred stroke edges
    # outnumber the clean background (a small, tightly cropped digit) it sits above the background: move it
    # onto the background's densest level and refit to the pixels within the noise of that.
    for _ in range(2):
        residual = values - design @ coef
        level, noise = _background_level(residual, border)
        coef = _weighted_fit(design, values, np.abs(residual - level) <= 2.5 * noise + 0.01)
    fitted = design @ coef
    noise = _noise(values - fitted)
    on_background = fitted[values - fitted <= 2.5 * noise + 0.01]
    if on_background.size == 0:
        on_background = fitted
    return noise, coef, float(on_background.min()), float(on_background.max())


def _background_level(residual: np.ndarray, border: tuple[np.ndarray, np.ndarray]) -> tuple[float, float]:
    """The densest level of the residuals in the background's class, and the noise around it from the
    residuals below it (pure background, however much ink lies above).

    Otsu's split divides background from ink, and the background's class is the one the border lies in: the
    lower one, unless the caller forced the polarity the wrong way round.
    """
    bins = np.clip(((residual + 1) * 256).astype(np.intp), 0, 511)  # 1/256 wide over [-1, 1]
    counts = np.bincount(bins, minlength=512)
    split = _otsu(counts)
    frame, weights = border
    start, stop = (0, split + 1) if _weighted_median(bins[frame], weights) <= split else (split + 1, 512)
    peak = start + int(np.argmax(np.convolve(counts[start:stop], [1, 2, 3, 2, 1], mode="same")))
    level = (peak + 0.5) / 256 - 1
    below = residual[bins < peak]
    return level, 1.4826 * float(np.median(level - below)) if below.size else 0.0


def _otsu(counts: np.ndarray) -> int:
    """Otsu's threshold on a histogram: the last bin of the lower of the two classes with the most different
    means (the last bin when there is nothing to split)."""
    index = np.arange(len(counts))
    weight, mass = np.cumsum(counts)[:-1], np.cumsum(counts * index)[:-1]
    total, total_mass = int(counts.sum()), int((counts * index).sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total_mass * weight - total * mass).astype(np.float64) ** 2 / (weight * (total - weight))
    return int(np.nanargmax(between)) if np.isfinite(between).any() else len(counts) - 1


def _weighted_fit(design: np.ndarray, values: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Weighted least squares by the normal equations, a 6x6 system far cheaper than lstsq's SVD, with a
    whisper of ridge so that a tiny or degenerate image still has exactly one solution."""
    weighted = design * weight[:, None]
    return np.linalg.solve(weighted.T @ design + 1e-9 * np.eye(design.shape[1]), weighted.T @ values)


@functools.lru_cache(maxsize=64)
def _design(shape: tuple[int, int]) -> np.ndarray:
    """(Cached per shape, read-only.) The quadratic's terms over a grid of `shape`, one column per term."""
    return _frozen(np.stack([np.broadcast_to(t, shape).ravel() for t in _quadratic(*shape)], axis=1))


def _quadratic(rows: int, cols: int) -> list[np.ndarray]:
    """The terms 1, x, y, x², xy, y² over a rows x cols grid spanning [-1, 1], as broadcastable arrays."""
    y = ((np.arange(rows) + 0.5) / rows * 2 - 1)[:, None]
    x = ((np.arange(cols) + 0.5) / cols * 2 - 1)[None, :]
    return [np.ones((1, 1)), x, y, x * x, x * y, y * y]


def _local_noise(gray: np.ndarray) -> float:
    """The noise as the robust spread of the differences between neighbouring pixels (strokes' edges are too
    few to move a median), over the square root of 2 that a difference of two noisy pixels adds."""
    if min(gray.shape) < 2:
        return 0.0
    steps = np.concatenate([np.diff(gray, axis=0).ravel(), np.diff(gray, axis=1).ravel()])
    return 1.4826 * float(np.median(np.abs(steps))) / math.sqrt(2)


def _noise(residual: np.ndarray) -> float:
    """The noise of the background around a surface fitted to it, from the pixels below the surface only: ink
    lies above it, so however much ink there is, this half is pure background (a robust standard deviation,
    from the median absolute deviation of a half-normal)."""
    below = residual[residual < 0]
    return 1.4826 * float(np.median(-below)) if below.size else 0.0


# ---------------------------------------------------------------------------------------------- 4. the digit


def _label(cells: np.ndarray) -> np.ndarray:
    """8-connected components of a small boolean grid: every set cell gets the smallest flat index in its
    component, every clear cell the grid's size.

    The runs of set cells along each row are joined to the runs they touch in the next row (sharing a column
    or a corner), and each run takes the least first cell among the runs it is joined to, by pointer jumping:
    a few rounds over a few hundred runs in numpy, where spreading labels cell by cell took twenty over the
    whole grid (1 ms for a drawing).
    """
    height, width = cells.shape
    edges = np.diff(np.pad(cells, ((0, 0), (1, 1))).astype(np.int8), axis=1)
    rows, starts = np.nonzero(edges == 1)
    ends = np.nonzero(edges == -1)[1]  # one past each run's last cell; runs in row-major order
    # Runs a (row r) and b (row r + 1) touch when b starts at most where a ends and ends at least where a
    # starts. With rows spaced wider than the grid, both ends sort in run order and the runs b of each a
    # are a contiguous range.
    span = width + 2
    key_start, key_end = rows * span + starts, rows * span + ends
    first = np.searchsorted(key_end, key_start + span)
    counts = np.maximum(np.searchsorted(key_start, key_end + span, side="right") - first, 0)
    upper = np.repeat(np.arange(len(rows)), counts)
    lower = np.repeat(first - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
    origin = rows * width + starts  # each run's first cell: its own label, in increasing order
    label = origin
    while True:
        joined = label.copy()
        np.minimum.at(joined, upper, label[lower])
        np.minimum.at(joined, lower, label[upper])
        joined = joined[np.searchsorted(origin, joined)]  # jump: take the label of the run it points to
        if np.array_equal(joined, label):
            break
        label = joined
    out = np.full(height * width, height * width)
    out[np.flatnonzero(cells)] = np.repeat(label, ends - starts)
    return out.reshape(height, width)


def _digit_region(mask: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The pixels near the digit: the blob of `mask` holding most ink `weight`, plus the nearby blobs big
    enough to be part of it, found on a coarse grid and widened by one cell for the strokes' soft edges."""
    height, width = mask.shape
    cell = max(1, math.ceil(max(height, width) / GRID_SIDE))
    # The ink in each cell (a mean, by Pillow's reduce: three times faster than numpy's reshape and sum).
    mass = np.asarray(Image.fromarray(np.where(mask, weight, 0).astype(np.float32)).reduce(cell))
    cells = mass > 0
    rows, cols = cells.shape
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

    keep = np.zeros((rows + 2, cols + 2), dtype=bool)  # with a margin of one cell
    keep[ys + 1, xs + 1] = np.isin(blob, list(chosen))
    keep = np.logical_or.reduce([keep[dy : dy + rows, dx : dx + cols] for dy in range(3) for dx in range(3)])
    return np.repeat(np.repeat(keep, cell, axis=0), cell, axis=1)[:height, :width]


def _extract_ink(gray: np.ndarray, inverted: bool, name: str = "image") -> np.ndarray:
    """Bright ink on black, background removed: subtract the background, find the digit, zero everything
    else and everything within the noise, and stretch so the digit's strong ink reaches 1.

    The threshold sits just above the noise, and above it intensities stay proportional to the ink rather than
    binarised, so anti-aliased and blurred stroke edges keep their share of the stroke.
    """
    background = _background(gray)
    residual = gray - background
    contrast = MIN_CONTRAST
    if inverted:
        # On paper, light falls on ink and paper alike, so the ink's contrast scales with the paper's
        # brightness (1 - background here): dividing by it makes the ink as strong in shadow as in light.
        # The least contrast for ink is still counted in grey levels, so that noise on black "paper" is not
        # magnified into ink.
        paper = np.maximum(1 - background, 0.05)
        residual = residual / paper
        contrast = MIN_CONTRAST / float(paper.mean())
    # The noise from a quarter of the pixels, evenly spread, once there are plenty (as precise, 4 times faster).
    sample, gray_sample = (residual[::2, ::2], gray[::2, ::2]) if residual.size > 40_000 else (residual, gray)
    noise = _noise(sample)
    on_background = gray_sample[sample <= 0]
    if np.count_nonzero(on_background <= 0) * 2 > on_background.size:
        # Black paper (or white, inverted) cuts the noise off below it: the pixels there all read 0 and their
        # spread says nothing of the noise. The noise between neighbours still shows it (none on a drawing
        # app's canvas).
        noise = max(noise, _local_noise(gray_sample))
    floor, peak = _floor_and_peak(residual, noise)
    if peak < max(contrast, 2 * floor):
        # No ink, or a small or blurred digit that fills its frame, leaving no clean background to measure the
        # noise on (what lies below the background surface is then partly ink): try the noise between
        # neighbouring pixels.
        floor, peak = _floor_and_peak(residual, _local_noise(gray))
    if max(gray.shape) <= TINY_SIDE and not _stands_clear(residual, peak, max(contrast, 2 * floor)):
        # A digit of a few pixels, nearly all of them part ink and part paper, leaves too few for any
        # estimate of the noise: the paper is its darkest level, and a clear difference from it is ink. (On
        # paper that reads exactly white or black, the noise between neighbours is a tiny digit's own stroke
        # edges, and can put the level just under its one brightest pixel: as blank as no ink at all.)
        darkest, lightest = _extremes(gray)
        if lightest - darkest >= TINY_CONTRAST:
            residual, floor, contrast = gray - darkest, MIN_FLOOR, MIN_CONTRAST
            peak = float(residual.max())
    # No ink, or none standing clear of the noise: the ink must be held by two neighbouring pixels (a lone speck
    # of noise is no stroke), and where there are too few pixels to measure the noise on, must also make a tiny
    # digit's difference (which keeps the floor, and so the strokes, of the small scans that do). Of 500 runs of
    # test_blank_noisy_images_are_refused (100 images each), 15 found a blank image taken for a digit before
    # these two checks, the passthrough's below and the black paper's above; none after.
    if not _stands_clear(residual, peak, max(contrast, 2 * floor)) or (
        np.count_nonzero(sample <= 0) < MIN_NOISE_PIXELS and _spread(gray) < TINY_CONTRAST
    ):
        raise MnistlabError(f"{name}: no digit found (the image is blank)")
    mask = residual > max(floor, BLOB_LEVEL * peak)
    region = _digit_region(mask, residual)
    strong = float(np.percentile(residual[mask & region], 90))
    return np.where(region, np.clip((residual - floor) / (strong - floor), 0, 1), 0).astype(np.float32)


def _floor_and_peak(residual: np.ndarray, noise: float) -> tuple[float, float]:
    """The level below which a residual is noise, and the level of the strongest ink above it."""
    floor = max(4 * noise, MIN_FLOOR)
    above = residual[residual > floor]
    return floor, float(np.percentile(above, 99)) if above.size else 0.0


def _ink_box(ink: np.ndarray, level: float) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of the pixels with ink above `level`, or None when there are none."""
    rows, cols = np.flatnonzero((ink > level).any(axis=1)), np.flatnonzero((ink > level).any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


# ---------------------------------------------------------------------------------------------- 5-6. fit, centre


def _fit_size(width: float, height: float) -> tuple[int, int]:
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


def _fine_copy(ink: np.ndarray, box: tuple[int, int, int, int]) -> tuple[np.ndarray, Box]:
    """The ink in and around `box`, resampled so that the box's longer side is FINE x FIT pixels (area
    averaging when it shrinks, bicubic when a small source grows), and where the box lies in it."""
    left, top, right, bottom = box
    scale = FINE * FIT / max(right - left, bottom - top)
    pad = math.ceil((_MARGIN + 2) * FINE / scale)
    crop = np.zeros((bottom - top + 2 * pad, right - left + 2 * pad), dtype=np.float32)
    _paste(crop, ink, pad - top, pad - left)
    # Whole pixels of the copy over a slightly smaller source, so that the scale is exactly `scale`.
    size = (max(1, math.floor(crop.shape[1] * scale)), max(1, math.floor(crop.shape[0] * scale)))
    resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BICUBIC
    fine = Image.fromarray(crop).resize(size, resample, box=(0, 0, size[0] / scale, size[1] / scale))
    fine_box = (pad * scale, pad * scale, (pad + right - left) * scale, (pad + bottom - top) * scale)
    return np.clip(np.asarray(fine), 0, 1), fine_box


def _stroke_width(ink: np.ndarray) -> float:
    """The strokes' mean width in pixels: twice the area above half strength over the length of its edge."""
    strong = ink > 0.5
    edge = (strong[:, 1:] != strong[:, :-1]).sum() + (strong[1:] != strong[:-1]).sum()
    edge += strong[0].sum() + strong[-1].sum() + strong[:, 0].sum() + strong[:, -1].sum()
    return 2 * float(strong.sum()) / max(int(edge), 1)


def _widen(fine: np.ndarray, box: Box) -> tuple[np.ndarray, Box | None]:
    """Strokes thinner than MIN_STROKE in the field widened one pixel a side at a time (a grey dilation,
    alternating a cross and a square so that the step is round), with the box of the result."""
    rows, cols = fine.shape
    for step in range(2 * FINE):
        if box is None or _stroke_width(fine) * FIT / max(box[2] - box[0], box[3] - box[1]) >= MIN_STROKE:
            break
        padded = np.pad(fine, 1)
        shifts = [(1, 1), (0, 1), (2, 1), (1, 0), (1, 2)] + ([(0, 0), (0, 2), (2, 0), (2, 2)] if step % 2 else [])
        fine = np.maximum.reduce([padded[dy : dy + rows, dx : dx + cols] for dy, dx in shifts])
        box = _ink_box(fine, BOX_LEVEL)
    return fine, box


def _place(ink: np.ndarray, box: Box) -> np.ndarray:
    """The digit in `box` scaled to fit FIT x FIT and placed in a SIZE x SIZE field with its centre of mass at
    CENTRE, anti-aliased, in [0, 1].

    The ink just outside the box (the soft edges below the box's level) comes along at the same scale, as the
    partly covered pixels at the edge of MNIST's binary strokes did. The position is the source's centre of
    mass, corrected by rendering once and measuring: the resampler's overshoot, clipped, moves it a little.
    """
    left, top, right, bottom = box
    fit_w, fit_h = _fit_size(right - left, bottom - top)
    scale_x, scale_y = fit_w / (right - left), fit_h / (bottom - top)
    pad = math.ceil((_MARGIN + 2) / min(scale_x, scale_y))
    x0, y0 = math.floor(left) - pad, math.floor(top) - pad  # the crop's corner in `ink`
    crop = np.zeros((math.ceil(bottom) + pad - y0, math.ceil(right) + pad - x0), dtype=np.float32)
    _paste(crop, ink, -y0, -x0)
    source_image = Image.fromarray(crop)

    def render(row: float, col: float) -> np.ndarray:
        """The box's top-left corner at field position (row, col): whole pixels by where the patch goes, the
        fraction by shifting the source box, so that sub-pixel placement costs no extra blur."""
        row0, col0 = math.floor(row) - _MARGIN, math.floor(col) - _MARGIN
        rows, cols = fit_h + 2 * _MARGIN + 1, fit_w + 2 * _MARGIN + 1
        source_left, source_top = left - x0 + (col0 - col) / scale_x, top - y0 + (row0 - row) / scale_y
        source = (source_left, source_top, source_left + cols / scale_x, source_top + rows / scale_y)
        patch = source_image.resize((cols, rows), Image.Resampling.LANCZOS, box=source)
        out = np.zeros((SIZE, SIZE), dtype=np.float32)
        # A lopsided digit may reach past the field after centring, as in MNIST itself: that part is cut.
        _paste(out, np.asarray(patch), row0, col0)
        return np.clip(out, 0, 1)

    # To begin with, the source's own centre of mass (pixel centres at index + 0.5) brought to CENTRE.
    com_row, com_col = _centre_of_mass(crop)
    row = CENTRE + 0.5 - (com_row + 0.5 - (top - y0)) * scale_y
    col = CENTRE + 0.5 - (com_col + 0.5 - (left - x0)) * scale_x
    out = render(row, col)
    com_row, com_col = _centre_of_mass(out)
    return render(row + CENTRE - com_row, col + CENTRE - com_col)


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
        _check_size(image, f"{name}: ")
        if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
            image = ImageOps.exif_transpose(image)
    flat = _flatten(image, name)
    gray = _working_gray(flat)
    # A first look at a copy reduced to about GLANCE_SIDE: when the digit there is still as large as the fine
    # copy it is rendered from, that look is all it takes (a drawing app's canvas: 4 times fewer pixels).
    glance = _reduced(gray, math.ceil(max(gray.shape) / GLANCE_SIDE))
    inverted = _decide_invert(glance) if invert is None else invert
    if inverted:
        gray, glance = 1 - gray, 1 - glance
    # MNIST's own digits have a black border: redoing their crop and fit would only blur them. (And some ink:
    # faint noise on black is no digit.)
    mnist_like = (
        gray.shape == (SIZE, SIZE)
        and float(np.median(gray[_frame(gray.shape)])) <= 0.1
        and _spread(gray) >= MIN_CONTRAST
    )
    if mnist_like:
        ink, box = gray, _ink_box(gray, 0)
    else:
        ink = _extract_ink(glance, inverted, name)
        box = _ink_box(ink, BOX_LEVEL)
        if glance is not gray and (box is None or max(box[2] - box[0], box[3] - box[1]) < FINE * FIT):
            ink = _extract_ink(gray, inverted, name)  # a small digit: look again at full size
            box = _ink_box(ink, BOX_LEVEL)
    if box is None:
        raise MnistlabError(f"{name}: no digit found (the image is blank)")
    if mnist_like:
        digit = ink
    else:
        fine, fine_box = _widen(*_fine_copy(ink, box))
        if fine_box is None:
            raise MnistlabError(f"{name}: no digit found (the image is blank)")
        digit = _place(fine, fine_box)
    original = flat if flat.mode == "RGB" and flat is not image else flat.convert("RGB")  # never the caller's
    return Preprocessed(original, ink, inverted, box, digit)
