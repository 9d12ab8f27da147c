"""Generated image sets for testing and benchmarking the digit classifiers' outlier flag ("this is not a digit").

- `write_nondigits` writes non-digits of the kinds people feed a digit classifier (`NONDIGIT_KINDS`): letters
  (handwritten-like and typeset), scribbles and doodles, geometric shapes, Fashion-MNIST garments, noise, and
  blank-ish pages.
- `write_real_digits` writes real-world-looking digits that must *not* be flagged (`REAL_DIGIT_KINDS`): MNIST
  test digits photographed, scanned or drawn on a canvas, and digits typeset in the DejaVu fonts.

These are generated from a seed with numpy and Pillow, not collected: stand-ins for what users send, not a sample
of it (only the garments and the MNIST digits are real, from the *test* files). Every image draws its canvas size
(28x28 to 640x480), position, size, rotation, stroke width, colours, polarity (dark on light, light on dark,
strokes on a transparent canvas), format (PNG, JPEG) and mode, so that a detector tuned on one seed's sets can be
judged on another's. Files are named `<kind>-<i>.png|.jpg` in the folder given.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from mnistlab.data.idx import read_images, read_labels

from . import mnist
from .digit_images import INKS, TINTS, TOUGH_KINDS, canvas_rgba, on_paper, realistic_image, restroke, save_as, scan

NONDIGIT_KINDS = ("letters", "scribbles", "shapes", "fashion", "noise", "blank")
REAL_DIGIT_KINDS = ("photos", "scans", "fonts", "canvas")

FONTS = tuple(sorted(Path("/usr/share/fonts/truetype/dejavu").glob("*.ttf")))  # empty where DejaVu is missing
# digit_images' kinds for photos of a page, with how often each is drawn: phones save JPEG, so the JPEG kinds weigh
# most (and the PNGs of noisy 640x480 pages and a 1600x1200 one take 3 to 6 times as long to write)
PHOTO_KINDS = (
    "paper-jpeg",
    "greyscale-jpeg",
    "exif-rotated-jpeg",
    "small-in-corner-jpeg",
    "paper-png",
    "palette-png",
    "light-on-dark-png",
)
PHOTO_WEIGHTS = (0.3, 0.16, 0.22, 0.08, 0.08, 0.04, 0.12)
# and for scans (tight crops, low resolutions, very thick and very thin pens), all alike
SCAN_KINDS = TOUGH_KINDS

DRAW = 384  # a figure's longer side in pixels while it is drawn, before rotating and scaling down
# Canvas sizes (width, height) that users' files have; a third of the canvases get a random size instead.
SIZES = ((28, 28), (32, 32), (48, 48), (64, 64), (100, 100), (128, 128), (200, 150), (280, 280), (300, 300))
SIZES += ((320, 240), (400, 300), (480, 640), (512, 512), (640, 480))
# How an ink mask becomes a picture (see _render), with how often non-digits and typeset digits get each.
STYLES = ("paper", "chalk", "print", "mnist", "colour", "canvas")
NONDIGIT_STYLES = (0.3, 0.12, 0.15, 0.15, 0.1, 0.18)
FONT_STYLES = (0.45, 0.15, 0.2, 0.1, 0.1, 0.0)
COLOURS = ((200, 30, 30), (30, 60, 200), (20, 130, 50), (120, 40, 160), (230, 120, 20), (0, 150, 170))
DARK_BOARDS = ((35, 45, 40), (20, 20, 25), (20, 40, 90), (70, 20, 20), (0, 0, 0))

Stroke = Sequence[Sequence[float]]  # a polyline: (x, y) points, y downwards
Maker = Callable[[np.random.Generator, Path], Path]  # writes one file: (its generator, stem) -> path
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------- drawing


def _arc(cx: float, cy: float, rx: float, ry: float, start: float, end: float) -> list[tuple[float, float]]:
    """Points on an elliptic arc from angle `start` to `end` (degrees; 0 is right, 90 is down)."""
    steps = max(2, math.ceil(abs(end - start) / 10))
    angles = np.radians(np.linspace(start, end, steps + 1))
    return [(cx + rx * math.cos(a), cy + ry * math.sin(a)) for a in angles]


def _spline(points: np.ndarray, per: int = 12) -> np.ndarray:
    """A smooth Catmull-Rom curve through `points` (N, 2)."""
    p = np.vstack([points[:1], points, points[-1:]])
    t = np.linspace(0, 1, per, endpoint=False)[:, None]
    pieces = [
        0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2 + (3 * p1 - p0 - 3 * p2 + p3) * t**3)
        for p0, p1, p2, p3 in zip(p[:-3], p[1:-2], p[2:-1], p[3:])
    ]
    return np.vstack([*pieces, points[-1:]])


def _draw(
    strokes: Sequence[Stroke],
    rng: np.random.Generator,
    pen: float,
    wobble: float = 0.0,
    slant: float = 0.0,
    fills: Sequence[Stroke] = (),
) -> Image.Image:
    """Polylines (and filled polygons) in any units drawn white on black ('L', longer side about DRAW), as a hand
    draws them: slanted (x moves `slant` times the height above the bottom), bent by a smooth random field of
    `wobble` times the figure's size, each stroke a little displaced, with a round pen `pen` times that size."""
    shapes = [np.asarray(s, dtype=np.float64).reshape(-1, 2) for s in [*strokes, *fills]]
    points = np.vstack(shapes)
    low, span = points.min(axis=0), max(float(np.ptp(points, axis=0).max()), 1e-9)
    direction = rng.normal(size=(2, 2, 2))
    frequency = rng.uniform(2, 6, size=(2, 2, 1)) * direction / np.linalg.norm(direction, axis=2, keepdims=True)
    phase = rng.uniform(0, 2 * np.pi, size=(2, 2))

    def bend(shape: np.ndarray, shift: np.ndarray) -> np.ndarray:
        unit = (shape - low) / span
        unit[:, 0] += slant * (1 - unit[:, 1])
        field = np.sin(unit @ frequency.reshape(4, 2).T + phase.ravel()).reshape(-1, 2, 2).sum(axis=2)
        return unit + wobble * field / 2 + shift

    moved = [bend(s, rng.normal(0, wobble / 3, 2)) for s in shapes[: len(strokes)]]
    moved += [bend(s, np.zeros(2)) for s in shapes[len(strokes) :]]
    every = np.vstack(moved)
    corner, extent = every.min(axis=0), np.ptp(every, axis=0)
    width = max(2.0, pen * DRAW)
    pad = width + 2
    scale = DRAW / max(float(extent.max()), 1e-9)
    size = np.ceil(extent * scale + 2 * pad).astype(int)
    image = Image.new("L", (int(size[0]), int(size[1])))
    draw = ImageDraw.Draw(image)
    to_pixels = [[tuple(p) for p in (s - corner) * scale + pad] for s in moved]
    for i, stroke in enumerate(to_pixels):
        if i >= len(strokes):
            draw.polygon(stroke, fill=255)
            continue
        w = width * rng.uniform(0.85, 1.15)
        if len(stroke) > 1:
            draw.line(stroke, fill=255, width=round(w), joint="curve")
        r = w / 2 if len(stroke) > 1 else w * 0.7  # round caps; a lone point is a dot
        for x, y in (stroke[0], stroke[-1]):
            draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    return image


@functools.cache
def _font(path: Path, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(path), size)


def _typeset(text: str, rng: np.random.Generator) -> Image.Image:
    """`text` in a random DejaVu face and weight, white on black ('L'), cropped to its ink."""
    font = _font(FONTS[int(rng.integers(len(FONTS)))], 160)
    image = Image.new("L", (480, 400))
    ImageDraw.Draw(image).text(
        (240, 200), text, font=font, fill=255, anchor="mm", stroke_width=int(rng.integers(0, 7)), stroke_fill=255
    )
    return image.crop(image.getbbox())


# ---------------------------------------------------------------------------------------------- pictures


def _canvas_size(rng: np.random.Generator) -> tuple[int, int]:
    """A canvas (width, height) from SIZES, or a third of the time any size up to 640x480, at most 3:1."""
    if rng.random() < 1 / 3:
        width = int(rng.integers(28, 641))
        return width, int(np.clip(width * np.exp(rng.uniform(-1.1, 1.1)), 28, 480))
    width, height = SIZES[int(rng.integers(len(SIZES)))]
    return width, height


def _place(figure: Image.Image, size: tuple[int, int], turn: float, rng: np.random.Generator) -> np.ndarray:
    """`figure` (white on black 'L') rotated up to `turn` degrees either way, scaled to a random share of the
    canvas and put somewhere on it: ink in [0, 1], (height, width)."""
    rotated = figure.rotate(rng.uniform(-turn, turn), Image.Resampling.BICUBIC, expand=True)
    rotated = rotated.crop(rotated.getbbox())
    width, height = size
    longer = rng.uniform(0.3 if min(size) >= 100 else 0.55, 0.92) * min(size)
    scale = longer / max(rotated.size)
    w, h = max(1, round(rotated.width * scale)), max(1, round(rotated.height * scale))
    small = np.asarray(rotated.resize((w, h), Image.Resampling.LANCZOS), dtype=np.float32) / 255
    x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    ink = np.zeros((height, width), dtype=np.float32)
    ink[y : y + h, x : x + w] = np.clip(small, 0, 1)
    return ink


def _falloff(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Light falling off by up to a third across a page in a random direction: a factor per pixel."""
    height, width = shape
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.arange(height)[:, None] * (np.sin(angle) / height) + np.arange(width)[None, :] * (np.cos(angle) / width)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    return (1 - rng.uniform(0.03, 0.35) * ramp).astype(np.float32)


def _pick(rng: np.random.Generator, options: Sequence[T], weights: Sequence[float] | None = None) -> T:
    """One of `options`, with the probabilities `weights` (default: all alike)."""
    return options[int(rng.choice(len(options), p=weights))]


def _paper_rgb(rng: np.random.Generator) -> tuple[int, int, int]:
    base = np.asarray(_pick(rng, TINTS)) + rng.integers(-12, 6, 3)
    return tuple(int(v) for v in np.clip(base, 0, 255))


def _photo(ink: np.ndarray, paper: tuple, ink_rgb: tuple, rng: np.random.Generator, light: bool) -> Image.Image:
    """`ink` in `ink_rgb` on `paper`, with sensor noise, light falling off when `light`, sometimes out of focus."""
    image = scan(ink, paper, ink_rgb, noise_sigma=rng.uniform(0.5, 8), seed=int(rng.integers(2**31)))
    if light:
        rgb = np.asarray(image, dtype=np.float32) * _falloff(ink.shape, rng)[..., None]
        image = Image.fromarray(np.clip(rgb + 0.5, 0, 255).astype(np.uint8))
    if min(ink.shape) >= 200 and rng.random() < 0.4:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    return image


def _render(ink: np.ndarray, style: str, rng: np.random.Generator) -> Image.Image:
    """A picture of `ink` (in [0, 1]) in one of STYLES: dark ink on lit, noisy paper; chalk on a board; black
    on white print; MNIST's white on black; coloured ink or a coloured board; strokes on a transparent canvas."""
    if style == "canvas":
        rgba = np.zeros((*ink.shape, 4), dtype=np.uint8)
        alpha = np.round(ink * 255).astype(np.uint8)
        rgba[alpha > 0, :3] = (0, 0, 0) if rng.random() < 0.75 else _pick(rng, (*COLOURS, (255, 255, 255)))
        rgba[..., 3] = alpha
        return Image.fromarray(rgba)
    if style == "mnist":
        return Image.fromarray(np.round(ink * 255).astype(np.uint8))
    if style == "print":
        return Image.fromarray(np.round(255 - ink * 255).astype(np.uint8))
    if style == "paper":
        return _photo(ink, _paper_rgb(rng), _pick(rng, INKS), rng, light=True)
    if style == "chalk":
        return _photo(ink, _pick(rng, DARK_BOARDS), (230, 230, 215), rng, light=True)
    if rng.random() < 0.7:  # coloured ink on light paper
        return _photo(ink, _paper_rgb(rng), _pick(rng, COLOURS), rng, light=False)
    return _photo(ink, _pick(rng, COLOURS), _pick(rng, ((255, 255, 255), (250, 240, 120))), rng, light=False)


def _save(image: Image.Image, stem: Path, rng: np.random.Generator) -> Path:
    """`image` as a PNG (RGBA ones always; others also as greyscale, palette or opaque RGBA) or a JPEG."""
    if image.mode != "RGBA" and rng.random() < 0.4:
        mode = "L" if rng.random() < 0.25 else "RGB"
        return save_as(image, stem.with_suffix(".jpg"), mode=mode, quality=int(rng.integers(50, 96)))
    mode = None if image.mode == "RGBA" else _pick(rng, (None, "L", "P", "RGBA"), (0.55, 0.2, 0.1, 0.15))
    return save_as(image, stem.with_suffix(".png"), mode=mode)


def _figure_file(figure: Image.Image, turn: float, weights: Sequence[float], rng: np.random.Generator) -> Image.Image:
    """`figure` placed on a canvas of a random size (280x280 for a drawing canvas) and rendered in a random style."""
    style = _pick(rng, STYLES, weights)
    size = (280, 280) if style == "canvas" else _canvas_size(rng)
    return _render(_place(figure, size, turn, rng), style, rng)


# ---------------------------------------------------------------------------------------------- letters


def _s(x: float = 0, y: float = 0, w: float = 1, h: float = 1) -> list[tuple[float, float]]:
    """The spine of an S in the box at (x, y) of size (w, h)."""
    unit = [*_arc(0.5, 0.25, 0.43, 0.25, -20, -270), *_arc(0.5, 0.75, 0.43, 0.25, -90, 160)]
    return [(x + px * w, y + py * h) for px, py in unit]


def _skeletons() -> dict[str, list[Stroke]]:
    """Hand-made pen paths for every Latin letter: capitals 1 high, lower case with x-height 0.45..1."""
    bowl = _arc(0.22, 0.725, 0.22, 0.275, 0, 360)  # lower case o, the bowl of a, b, d, g, p, q
    hump = _arc(0.22, 0.65, 0.22, 0.2, -180, 0)  # n, h
    p_bowl = [(0, 0), (0.35, 0), *_arc(0.35, 0.27, 0.27, 0.27, -90, 90), (0, 0.54)]
    big_o = _arc(0.4, 0.5, 0.4, 0.5, -90, 270)
    return {
        "A": [[(0, 1), (0.35, 0), (0.7, 1)], [(0.14, 0.6), (0.56, 0.6)]],
        "B": [
            [(0, 0), (0, 1)],
            [(0, 0), (0.33, 0), *_arc(0.33, 0.25, 0.25, 0.25, -90, 90), (0, 0.5)],
            [(0, 0.5), (0.38, 0.5), *_arc(0.38, 0.75, 0.3, 0.25, -90, 90), (0, 1)],
        ],
        "C": [_arc(0.4, 0.5, 0.4, 0.5, -45, -315)],
        "D": [[(0, 0), (0, 1)], [(0, 0), (0.3, 0), *_arc(0.3, 0.5, 0.4, 0.5, -90, 90), (0, 1)]],
        "E": [[(0.6, 0), (0, 0), (0, 1), (0.6, 1)], [(0, 0.5), (0.5, 0.5)]],
        "F": [[(0.6, 0), (0, 0), (0, 1)], [(0, 0.5), (0.5, 0.5)]],
        "G": [[*_arc(0.4, 0.5, 0.4, 0.5, -45, -360), (0.45, 0.5)]],
        "H": [[(0, 0), (0, 1)], [(0.7, 0), (0.7, 1)], [(0, 0.5), (0.7, 0.5)]],
        "I": [[(0.2, 0), (0.2, 1)], [(0, 0), (0.4, 0)], [(0, 1), (0.4, 1)]],
        "J": [[(0.15, 0), (0.65, 0)], [(0.5, 0), (0.5, 0.72), *_arc(0.28, 0.72, 0.22, 0.28, 0, 160)]],
        "K": [[(0, 0), (0, 1)], [(0.6, 0), (0, 0.55)], [(0.2, 0.42), (0.65, 1)]],
        "L": [[(0, 0), (0, 1), (0.55, 1)]],
        "M": [[(0, 1), (0.05, 0), (0.4, 0.6), (0.75, 0), (0.8, 1)]],
        "N": [[(0, 1), (0, 0), (0.65, 1), (0.65, 0)]],
        "O": [big_o],
        "P": [[(0, 1), *p_bowl]],
        "Q": [big_o, [(0.45, 0.7), (0.85, 1.05)]],
        "R": [[(0, 1), *p_bowl], [(0.3, 0.54), (0.65, 1)]],
        "S": [_s(0, 0, 0.7, 1)],
        "T": [[(0, 0), (0.7, 0)], [(0.35, 0), (0.35, 1)]],
        "U": [[(0, 0), *_arc(0.35, 0.65, 0.35, 0.35, 180, 0), (0.7, 0)]],
        "V": [[(0, 0), (0.35, 1), (0.7, 0)]],
        "W": [[(0, 0), (0.2, 1), (0.45, 0.3), (0.7, 1), (0.9, 0)]],
        "X": [[(0, 0), (0.7, 1)], [(0.7, 0), (0, 1)]],
        "Y": [[(0, 0), (0.35, 0.5), (0.7, 0)], [(0.35, 0.5), (0.35, 1)]],
        "Z": [[(0, 0), (0.7, 0), (0, 1), (0.7, 1)]],
        "a": [bowl, [(0.44, 0.45), (0.44, 1)]],
        "b": [[(0, 0), (0, 1)], bowl],
        "c": [_arc(0.22, 0.725, 0.22, 0.275, -40, -320)],
        "d": [bowl, [(0.44, 0), (0.44, 1)]],
        "e": [[(0, 0.725), (0.44, 0.725), *_arc(0.22, 0.725, 0.22, 0.275, 0, -320)]],
        "f": [[*_arc(0.32, 0.15, 0.12, 0.15, -20, -180), (0.2, 1)], [(0.05, 0.45), (0.38, 0.45)]],
        "g": [bowl, [(0.44, 0.45), (0.44, 1.15), *_arc(0.22, 1.15, 0.22, 0.2, 0, 160)]],
        "h": [[(0, 0), (0, 1)], [*hump, (0.44, 1)]],
        "i": [[(0.1, 0.45), (0.1, 1)], [(0.1, 0.25)]],
        "j": [[(0.3, 0.45), (0.3, 1.15), *_arc(0.15, 1.15, 0.15, 0.2, 0, 160)], [(0.3, 0.25)]],
        "k": [[(0, 0), (0, 1)], [(0.4, 0.45), (0, 0.75), (0.42, 1)]],
        "l": [[(0.1, 0), (0.1, 0.9), (0.2, 1)]],
        "m": [
            [(0, 0.45), (0, 1)],
            [*_arc(0.15, 0.62, 0.15, 0.14, -180, 0), (0.3, 1)],
            [*_arc(0.45, 0.62, 0.15, 0.14, -180, 0), (0.6, 1)],
        ],
        "n": [[(0, 0.45), (0, 1)], [*hump, (0.44, 1)]],
        "o": [bowl],
        "p": [[(0, 0.45), (0, 1.35)], bowl],
        "q": [bowl, [(0.44, 0.45), (0.44, 1.35)]],
        "r": [[(0, 0.45), (0, 1)], _arc(0.22, 0.65, 0.22, 0.18, -180, -50)],
        "s": [_s(0, 0.45, 0.42, 0.55)],
        "t": [[(0.15, 0.1), (0.15, 0.9), *_arc(0.25, 0.9, 0.1, 0.1, 180, 60)], [(0, 0.45), (0.35, 0.45)]],
        "u": [[(0, 0.45), *_arc(0.22, 0.8, 0.22, 0.2, 180, 0)], [(0.44, 0.45), (0.44, 1)]],
        "v": [[(0, 0.45), (0.25, 1), (0.5, 0.45)]],
        "w": [[(0, 0.45), (0.15, 1), (0.3, 0.65), (0.45, 1), (0.6, 0.45)]],
        "x": [[(0, 0.45), (0.45, 1)], [(0.45, 0.45), (0, 1)]],
        "y": [[(0, 0.45), (0.25, 1)], [(0.5, 0.45), (0.1, 1.35)]],
        "z": [[(0, 0.45), (0.45, 0.45), (0, 1), (0.45, 1)]],
    }


LETTERS = _skeletons()


def _letter(rng: np.random.Generator, stem: Path) -> Path:
    """One letter, handwritten-like (jittered, slanted strokes of a random pen) or, half the time, typeset."""
    letter = _pick(rng, FIGURES["letters"])
    if FONTS and rng.random() < 0.5:
        figure = _typeset(letter, rng)
    else:
        strokes = LETTERS[letter]
        figure = _draw(strokes, rng, rng.uniform(0.05, 0.16), rng.uniform(0.01, 0.05), rng.uniform(-0.15, 0.35))
    return _save(_figure_file(figure, 15, NONDIGIT_STYLES, rng), stem, rng)


# ---------------------------------------------------------------------------------------------- scribbles


def _circle(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    return _arc(cx, cy, r, r, 0, 360)


def _doodle(name: str, rng: np.random.Generator) -> list[Stroke]:
    """The pen paths of one doodle or scribble, in any units."""
    u = rng.uniform
    if name == "curve":
        return [_spline(u(0, 1, (int(rng.integers(4, 9)), 2)))]
    if name == "strokes":
        return [_spline(u(0, 1, (int(rng.integers(3, 7)), 2))) for _ in range(int(rng.integers(2, 6)))]
    if name == "zigzag":
        n = int(rng.integers(4, 13))
        return [[(i + u(-0.2, 0.2), (i % 2) * u(1.5, 4)) for i in range(n)]]
    if name == "spiral":
        theta = np.linspace(0, u(2, 4.5) * 2 * np.pi, 200)
        return [np.column_stack([theta * np.cos(theta), theta * np.sin(theta)])]
    if name == "loops":
        theta = np.linspace(0, int(rng.integers(3, 7)) * 2 * np.pi, 300)
        b = u(1.5, 3)
        return [np.column_stack([theta - b * np.sin(theta), -b * np.cos(theta) * u(1, 2)])]
    if name == "hatching":
        n, angle = int(rng.integers(4, 12)), u(0, np.pi)
        lines = [[(0, i / n), (1, i / n + u(-0.05, 0.05))] for i in range(n)]
        if rng.random() < 0.5:  # cross-hatched
            lines += [[(i / n, 0), (i / n + u(-0.05, 0.05), 1)] for i in range(n)]
        turn = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        return [np.asarray(line) @ turn.T for line in lines]
    if name == "smiley":
        eyes = [[(0.35, 0.38)], [(0.65, 0.38)]] if rng.random() < 0.5 else [_circle(0.35, 0.38, 0.06)]
        eyes = eyes if len(eyes) == 2 else [*eyes, _circle(0.65, 0.38, 0.06)]
        return [_circle(0.5, 0.5, 0.5), *eyes, _arc(0.5, 0.5, 0.3, 0.28, 20, 160)]
    if name == "stick figure":
        arms = u(0.3, 0.5)
        return [
            _circle(0.5, 0.13, 0.13),
            [(0.5, 0.26), (0.5, 0.65)],
            [(0.15, arms), (0.5, 0.38), (0.85, arms + u(-0.1, 0.1))],
            [(0.25, 1), (0.5, 0.65), (0.75, 1)],
        ]
    if name == "house":
        door = u(0.1, 0.5)
        return [
            [(0, 0.45), (0, 1), (0.8, 1), (0.8, 0.45), (0, 0.45)],
            [(-0.05, 0.47), (0.4, u(0, 0.15)), (0.85, 0.47)],
            [(door, 1), (door, 0.7), (door + 0.18, 0.7), (door + 0.18, 1)],
        ]
    if name == "tree":
        theta = np.linspace(0, 2 * np.pi, 120)
        r = 0.35 * (1 + 0.12 * np.abs(np.sin(int(rng.integers(4, 8)) * theta)))
        crown = np.column_stack([0.5 + r * np.cos(theta), 0.38 + r * np.sin(theta)])
        return [crown, [(0.44, 0.72), (0.44, 1.1)], [(0.56, 0.72), (0.56, 1.1)]]
    if name == "cloud":
        theta = np.linspace(0, 2 * np.pi, 160)
        r = 1 + 0.2 * np.abs(np.sin(int(rng.integers(5, 9)) * theta / 2))
        return [np.column_stack([r * np.cos(theta), 0.6 * r * np.sin(theta)])]
    if name == "sun":
        rays = int(rng.integers(6, 13))
        angles = np.linspace(0, 2 * np.pi, rays, endpoint=False) + u(0, 1)
        return [_circle(0, 0, 0.45)] + [[(0.6 * np.cos(a), 0.6 * np.sin(a)), (np.cos(a), np.sin(a))] for a in angles]
    if name == "heart":
        t = np.linspace(0, 2 * np.pi, 120)
        x = 16 * np.sin(t) ** 3
        return [np.column_stack([x, -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))])]
    if name == "wave":
        x = np.linspace(0, u(1.5, 4) * 2 * np.pi, 150)
        return [np.column_stack([x, u(0.5, 1.5) * np.sin(x)])]
    if name == "crossed box":
        w = u(0.6, 1.4)
        return [[(0, 0), (w, 0), (w, 1), (0, 1), (0, 0)], [(0, 0), (w, 1)], [(w, 0), (0, 1)]]
    raise ValueError(f"unknown doodle {name!r}")


DOODLES = ("curve", "strokes", "zigzag", "spiral", "loops", "hatching", "smiley", "stick figure", "house", "tree")
DOODLES += ("cloud", "sun", "heart", "wave", "crossed box")


def _scribble(rng: np.random.Generator, stem: Path) -> Path:
    strokes = _doodle(_pick(rng, FIGURES["scribbles"]), rng)
    figure = _draw(strokes, rng, rng.uniform(0.015, 0.07), rng.uniform(0, 0.03), rng.uniform(-0.1, 0.1))
    return _save(_figure_file(figure, 25, NONDIGIT_STYLES, rng), stem, rng)


# ---------------------------------------------------------------------------------------------- shapes


def _polygon(corners: int, inner: float = 1.0) -> np.ndarray:
    """A regular polygon (a star when `inner` < 1: every other corner at that radius), closed."""
    n = corners * (2 if inner < 1 else 1)
    angles = np.linspace(0, 2 * np.pi, n, endpoint=False) - np.pi / 2
    radius = np.where(np.arange(n) % 2, inner, 1.0) if inner < 1 else np.ones(n)
    points = np.column_stack([radius * np.cos(angles), radius * np.sin(angles)])
    return np.vstack([points, points[:1]])


def _outline(name: str, rng: np.random.Generator) -> np.ndarray:
    """The closed outline of one geometric shape."""
    u = rng.uniform
    box = np.array([(0, 0), (1, 0), (1, 1), (0, 1), (0, 0)], dtype=np.float64)
    if name == "square":
        return box
    if name == "rectangle":
        return box * (1, u(0.25, 0.7))
    if name == "triangle":
        return np.array([(0, 1), (u(0, 1), u(0, 0.2)), (1, 1), (0, 1)])
    if name == "diamond":
        return np.array([(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5), (0.5, 0)]) * (u(0.5, 1), 1)
    if name == "hexagon":
        return _polygon(6)
    if name == "pentagon":
        return _polygon(5)
    if name in ("star-5", "star-6"):
        return _polygon(int(name[-1]), inner=u(0.35, 0.55))
    if name in ("circle", "ellipse", "ring"):
        return np.asarray(_arc(0, 0, 1, 1 if name != "ellipse" else u(0.3, 0.75), 0, 360))
    if name == "arrow":
        shaft, head = u(0.1, 0.25), u(0.3, 0.5)
        corners = [(0, -shaft), (0.6, -shaft), (0.6, -head), (1, 0), (0.6, head), (0.6, shaft), (0, shaft)]
        return np.array([*corners, corners[0]])
    if name == "plus":
        t = u(0.12, 0.3)
        arm = [(t, t), (t, 1), (-t, 1), (-t, t)]
        corners = [(r * x - s * y, s * x + r * y) for r, s in ((1, 0), (0, 1), (-1, 0), (0, -1)) for x, y in arm]
        return np.array([*corners, corners[0]])
    raise ValueError(f"unknown shape {name!r}")


SHAPES = ("square", "rectangle", "triangle", "diamond", "hexagon", "pentagon", "star-5", "star-6", "circle")
SHAPES += ("ellipse", "ring", "arrow", "plus", "cross", "checkmark")
# The figures each named kind draws from (the first draw of each file's generator picks one: figure_names).
FIGURES = {"letters": tuple(LETTERS), "scribbles": DOODLES, "shapes": SHAPES}
# Figures that are written as a digit is: the letters of the usual OCR confusions (O and 0, l and 1, Z and 2, S and
# 5, G and 6, B and 8, g and 9, ...) and the round shapes (a 0). Chosen by their glyphs, not by any model's answers:
# a reader cannot tell them from digits either, so a detector that flags them would flag those digits too.
DIGIT_LOOKALIKES = {
    "letters": frozenset("ODoIliZzSsGbBgq"),
    "shapes": frozenset({"circle", "ellipse", "ring"}),
    "scribbles": frozenset(),
}


def _shape(rng: np.random.Generator, stem: Path) -> Path:
    """A geometric shape, outlined or filled, drawn exactly or a little by hand, at any angle."""
    name = _pick(rng, FIGURES["shapes"])
    wobble = 0.0 if rng.random() < 0.6 else rng.uniform(0.005, 0.03)
    if name == "checkmark":
        strokes, fills, pen = [[(0, 0.55), (0.35, 1), (1, 0)]], [], rng.uniform(0.04, 0.14)
    elif name == "cross":  # an X of two bars
        strokes, fills, pen = [[(0, 0), (1, 1)], [(1, 0), (0, 1)]], [], rng.uniform(0.06, 0.2)
    elif name == "ring":
        strokes, fills, pen = [_outline(name, rng)], [], rng.uniform(0.08, 0.22)
    elif rng.random() < 0.5:
        strokes, fills, pen = [], [_outline(name, rng)], 0.0
    else:
        strokes, fills, pen = [_outline(name, rng)], [], rng.uniform(0.015, 0.09)
    figure = _draw(strokes, rng, pen, wobble, fills=fills)
    return _save(_figure_file(figure, 180, NONDIGIT_STYLES, rng), stem, rng)


# ---------------------------------------------------------------------------------------------- fashion


@functools.cache
def _test_set(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels of an MNIST-format folder's *test* files."""
    return read_images(folder / "t10k-images-idx3-ubyte.gz"), read_labels(folder / "t10k-labels-idx1-ubyte.gz")


def _fashion(garments: np.ndarray, rng: np.random.Generator, stem: Path) -> Path:
    """A Fashion-MNIST test image as it is (28x28 PNG, white on black), or half the time photographed dark on
    light paper."""
    garment = garments[int(rng.integers(len(garments)))]
    if rng.random() < 0.5:
        return save_as(Image.fromarray(garment), stem.with_suffix(".png"))
    width, height = _canvas_size(rng)
    rows = np.flatnonzero(garment.any(axis=1))
    ink_rows = rows[-1] - rows[0] + 1 if rows.size else 28
    side = rng.uniform(0.45, 1.0) * min(width, height)  # the 28x28 frame's side on the page
    x, y = int(rng.integers(0, max(1, width - side))), int(rng.integers(0, max(1, height - side)))
    image = on_paper(
        garment,
        size=(width, height),
        position=(x, y),
        digit_height=max(1, round(side * ink_rows / 28)),
        paper_rgb=_paper_rgb(rng),
        ink_rgb=_pick(rng, INKS),
        noise_sigma=rng.uniform(1, 7),
        seed=int(rng.integers(2**31)),
    )
    return _save(image, stem, rng)


# ---------------------------------------------------------------------------------------------- noise


def _smooth_noise(shape: tuple[int, int], cell: float, rng: np.random.Generator) -> np.ndarray:
    """Noise in [0, 1] that varies over about `cell` pixels (random values on a coarse grid, bicubic)."""
    height, width = shape
    coarse = rng.random((max(2, round(height / cell)) + 1, max(2, round(width / cell)) + 1)).astype(np.float32)
    return np.clip(np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)), 0, 1)


def _pixel_noise(name: str, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """Noise of every pixel on its own: uniform, Gaussian, or salt and pepper on a plain level; grey or colour."""
    width, height = size
    channels = (height, width, 3) if rng.random() < 0.5 else (height, width)
    if name == "uniform":
        return Image.fromarray(rng.integers(0, 256, channels, dtype=np.uint8))
    if name == "gaussian":
        values = rng.normal(rng.uniform(50, 200), rng.uniform(15, 70), channels)
        return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8))
    values = np.full((height, width), rng.choice([0, 128, 255, int(rng.integers(256))]), dtype=np.uint8)
    roll = rng.random((height, width))
    density = rng.uniform(0.01, 0.3)
    values[roll < density / 2] = 0
    values[roll > 1 - density / 2] = 255
    return Image.fromarray(values)


def _noise_patch(name: str, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """Pixel noise where a digit would be: in a rectangle or an ellipse on a plain or paper background, or a quarter
    of the time in the middle of a 28x28 MNIST-format image with a black border.

    (Noise filling the whole frame is refused by preprocessing as blank: always beyond 64 pixels a side, mostly
    below, as no ink stands clear of it.)
    """
    if rng.random() < 0.25:
        side = int(rng.integers(12, 25))
        image = Image.new("L", (28, 28))
        image.paste(_pixel_noise(name, (side, side), rng).convert("L"), (14 - side // 2, 14 - side // 2))
        return image
    width, height = size
    w, h = (max(4, round(side * rng.uniform(0.2, 0.9))) for side in size)
    mask = Image.new("L", (w, h), 0 if rng.random() < 0.5 else 255)
    ImageDraw.Draw(mask).ellipse((0, 0, w - 1, h - 1), fill=255)
    if rng.random() < 0.5:
        background = _blank_paper((height, width), rng)
    else:
        background = Image.new("RGB", size, (int(rng.choice([0, 255, int(rng.integers(256))])),) * 3)
    background.paste(
        _pixel_noise(name, (w, h), rng).convert("RGB"),
        (int(rng.integers(width - w + 1)), int(rng.integers(height - h + 1))),
        mask,
    )
    return background


def _folded_paper(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A photo of textured paper with no ink: grain, uneven light, one to three folds and sometimes a coffee ring."""
    width, height = size
    page = _blank_paper((height, width), rng, texture=rng.uniform(0.03, 0.12))
    shade = Image.new("L", size)
    draw = ImageDraw.Draw(shade)
    reach = 2 * max(size)
    for _ in range(int(rng.integers(1, 4))):
        angle, x, y = rng.uniform(0, np.pi), rng.uniform(0, width), rng.uniform(0, height)
        dx, dy = reach * np.cos(angle), reach * np.sin(angle)
        draw.line((x - dx, y - dy, x + dx, y + dy), fill=255, width=max(1, round(min(size) / 60)))
    if rng.random() < 0.3:
        x, y, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.15, 0.4) * min(size)
        draw.ellipse((x - r, y - r, x + r, y + r), outline=180, width=max(1, round(r / 12)))
    shade = shade.filter(ImageFilter.GaussianBlur(max(0.7, min(size) / 150)))
    darkening = np.asarray(shade, dtype=np.float32) / 255 * rng.uniform(0.15, 0.35)
    rgb = np.asarray(page, dtype=np.float32) * (1 - darkening[..., None])
    return Image.fromarray(np.clip(rgb + 0.5, 0, 255).astype(np.uint8))


def _noise_image(name: str, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """One picture of nothing but noise or texture, `size` (width, height) or smaller."""
    width, height = size
    if name in ("uniform", "gaussian", "salt and pepper"):
        return _noise_patch(name, size, rng)
    if name == "blotches":  # low-frequency noise, thresholded
        field = _smooth_noise((height, width), min(size) / rng.uniform(3, 12), rng)
        level = float(np.quantile(field, rng.uniform(0.6, 0.9)))
        return _render(np.clip((field - level) / 0.05, 0, 1), _pick(rng, STYLES, NONDIGIT_STYLES), rng)
    if name == "dots":
        ink = Image.new("L", (width * 2, height * 2))
        draw = ImageDraw.Draw(ink)
        for _ in range(int(rng.integers(5, 150))):
            x, y, r = rng.uniform(0, 2 * width), rng.uniform(0, 2 * height), rng.uniform(1.5, 0.04 * min(size) + 2)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
        small = np.asarray(ink.resize(size, Image.Resampling.BOX), dtype=np.float32) / 255
        return _render(small, _pick(rng, STYLES, NONDIGIT_STYLES), rng)
    if name == "paper":
        return _folded_paper(size, rng)
    if name == "jpeg artefacts":  # noise through a JPEG of very low quality
        source = _noise_image(_pick(rng, ("uniform", "gaussian", "blotches")), size, rng).convert("RGB")
        buffer = io.BytesIO()
        source.save(buffer, "JPEG", quality=int(rng.integers(2, 15)))
        return Image.open(buffer).convert("RGB")
    raise ValueError(f"unknown noise {name!r}")


NOISES = ("uniform", "gaussian", "salt and pepper", "blotches", "dots", "paper", "jpeg artefacts")


def _noise(rng: np.random.Generator, stem: Path) -> Path:
    return _save(_noise_image(_pick(rng, NOISES), _canvas_size(rng), rng), stem, rng)


# ---------------------------------------------------------------------------------------------- blank


def _blank_paper(shape: tuple[int, int], rng: np.random.Generator, texture: float = 0.0) -> Image.Image:
    """An empty sheet of tinted paper under uneven light, with sensor noise and `texture` (fibres, grain)."""
    paper = np.asarray(_paper_rgb(rng), dtype=np.float32)
    grain = 1 + texture * (_smooth_noise(shape, rng.uniform(1.5, 6), rng) - 0.5)
    rgb = paper * (grain * _falloff(shape, rng))[..., None]
    rgb += rng.normal(0, rng.uniform(0.5, 4), rgb.shape).astype(np.float32)
    return Image.fromarray(np.clip(rgb + 0.5, 0, 255).astype(np.uint8))


def _blank_image(name: str, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """One nearly empty picture: nothing, or so little ink (a speck, a smudge, a ruled line) that it is no digit."""
    width, height = size
    if name == "empty canvas":  # a cleared drawing canvas: transparent, or opaque white
        colour = (0, 0, 0, 0) if rng.random() < 0.5 else (255, 255, 255, 255)
        return Image.new("RGBA", (280, 280), colour)
    if name == "grey":
        level = rng.uniform(30, 230)
        values = level + rng.normal(0, rng.uniform(0.3, 2), (height, width))
        return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8))
    page = _blank_paper((height, width), rng)
    draw = ImageDraw.Draw(page)
    ink = tuple(int(v) for v in _pick(rng, INKS))
    if name in ("specks", "dot"):
        count = int(rng.integers(1, 3)) if name == "specks" else 1
        for _ in range(count):
            x, y = rng.uniform(0, width), rng.uniform(0, height)
            r = rng.uniform(0.6, 1.6) if name == "specks" else rng.uniform(1, max(1.5, min(size) / 40))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=ink)
        return page
    if name == "smudge":
        smudge = _smooth_noise((height, width), min(size) / rng.uniform(2, 5), rng)
        share = np.clip((smudge - np.quantile(smudge, 0.85)) * 4, 0, 1) * rng.uniform(0.05, 0.25)
        rgb = np.asarray(page, dtype=np.float32) * (1 - share[..., None]) + np.asarray(ink) * share[..., None]
        return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    if name == "ruled":
        gap = rng.uniform(12, 40) * max(1, min(size) / 300)
        line = _pick(rng, ((150, 180, 220), (170, 170, 170), (120, 150, 210)))
        for y in np.arange(rng.uniform(0, gap), height, gap):
            draw.line((0, y, width, y), fill=line, width=1)
        if rng.random() < 0.5:  # the margin
            x = width * rng.uniform(0.08, 0.2)
            draw.line((x, 0, x, height), fill=(220, 120, 120), width=1)
        return page
    if name == "frame":
        inset = rng.uniform(0, 0.1) * min(size)
        draw.rectangle(
            (inset, inset, width - 1 - inset, height - 1 - inset), outline=ink, width=int(rng.integers(1, 4))
        )
        return page
    if name == "page":
        return page
    raise ValueError(f"unknown blank {name!r}")


BLANKS = ("page", "specks", "smudge", "ruled", "dot", "frame", "grey", "empty canvas")


def _blank(rng: np.random.Generator, stem: Path) -> Path:
    return _save(_blank_image(_pick(rng, BLANKS), _canvas_size(rng), rng), stem, rng)


# ---------------------------------------------------------------------------------------------- writing


def _generator(name: str, seed: int, i: int) -> np.random.Generator:
    """The generator of file `name`-<i> of the sets made with `seed`: its own, whatever else is written."""
    return np.random.default_rng([seed, (*NONDIGIT_KINDS, *REAL_DIGIT_KINDS).index(name), i])


def _write(make: Callable[[np.random.Generator, Path], T], name: str, count: int, folder: Path, seed: int) -> list[T]:
    """`make` called for each file `name`-<i> in `folder` (created), with a generator of its own for each."""
    folder.mkdir(parents=True, exist_ok=True)
    return [make(_generator(name, seed, i), folder / f"{name}-{i:04d}") for i in range(count)]


def figure_names(kind: str, count: int, seed: int = 0) -> list[str]:
    """What each file of `write_nondigits(kind, count, folder, seed)` shows, for the kinds in FIGURES: the letter,
    doodle or shape, which each maker picks with its generator's first draw (so replaying that draw names it)."""
    return [_pick(_generator(kind, seed, i), FIGURES[kind]) for i in range(count)]


def write_nondigits(kind: str, count: int, folder: Path, seed: int = 0, fashion_dir: Path | None = None) -> list[Path]:
    """Write `count` non-digit images of `kind` (one of NONDIGIT_KINDS) into `folder` (created); their paths.

    The same seed writes the same files, another seed others. "fashion" reads the Fashion-MNIST test images from
    `fashion_dir`, by default the shared copy beside the checkout.
    """
    if kind not in NONDIGIT_KINDS:
        raise ValueError(f"unknown kind {kind!r}: one of {', '.join(NONDIGIT_KINDS)}")
    if kind == "fashion":
        source = fashion_dir or mnist.fashion_dir()
        if source is None:
            raise ValueError("no Fashion-MNIST folder found: pass fashion_dir")
        make: Maker = functools.partial(_fashion, _test_set(Path(source))[0])
    else:
        make = {"letters": _letter, "scribbles": _scribble, "shapes": _shape, "noise": _noise, "blank": _blank}[kind]
    return _write(make, kind, count, folder, seed)


# ---------------------------------------------------------------------------------------------- real digits


def _mnist_kinds(
    sub_kinds: Sequence[str], weights: Sequence[float] | None, digit: np.ndarray, rng: np.random.Generator, stem: Path
) -> Path:
    """`digit` as one of digit_images' `sub_kinds` (drawn with `weights`), moved to `stem` with its suffix."""
    path = realistic_image(_pick(rng, sub_kinds, weights), digit, int(rng.integers(2**31)), stem.parent)
    return path.replace(stem.with_suffix(path.suffix))


def _canvas(digit: np.ndarray, rng: np.random.Generator, stem: Path) -> Path:
    """`digit` drawn on a web page's canvas, as an RGBA PNG: anywhere on it, with a wider or narrower brush,
    black (or coloured) strokes on a transparent canvas or on an opaque white one."""
    if rng.random() < 0.5:
        digit = np.asarray(restroke(digit, int(rng.integers(-2, 6))).resize((28, 28), Image.Resampling.BOX))
    side = int(rng.integers(28, 48))  # a margin beyond MNIST's, the digit anywhere within it
    x, y = (int(v) for v in rng.integers(0, side - 27, 2))
    frame = np.zeros((side, side), dtype=np.uint8)
    frame[y : y + 28, x : x + 28] = digit
    size = 280 if rng.random() < 0.7 else _pick(rng, (200, 300, 400))
    colour = (0, 0, 0) if rng.random() < 0.8 else _pick(rng, COLOURS)
    image = canvas_rgba(frame, size, colour)
    if rng.random() < 0.4:
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
    return save_as(image, stem.with_suffix(".png"))


def _font_digit(rng: np.random.Generator, stem: Path) -> tuple[Path, int]:
    """A digit typeset in a random DejaVu face, turned up to 10 degrees, mostly dark on light paper."""
    label = int(rng.integers(10))
    return _save(_figure_file(_typeset(str(label), rng), 10, FONT_STYLES, rng), stem, rng), label


def write_real_digits(
    kind: str, count: int, folder: Path, seed: int = 0, mnist_dir: Path | None = None
) -> list[tuple[Path, int]]:
    """Write `count` real-world-looking digits of `kind` (one of REAL_DIGIT_KINDS) into `folder` (created);
    (path, true label) for each. The same seed writes the same files, another seed others.

    "photos" (digit_images' PHOTO_KINDS), "scans" (its TOUGH_KINDS) and "canvas" show random MNIST *test* digits,
    read with their labels from `mnist_dir` (by default the folder tests/support/mnist.py finds); "fonts"
    typesets digits in every DejaVu face and needs no data.
    """
    if kind not in REAL_DIGIT_KINDS:
        raise ValueError(f"unknown kind {kind!r}: one of {', '.join(REAL_DIGIT_KINDS)}")
    if kind == "fonts":
        if not FONTS:
            raise ValueError("no DejaVu fonts in /usr/share/fonts/truetype/dejavu")
        return _write(_font_digit, kind, count, folder, seed)
    source = mnist_dir or mnist.mnist_dir()
    if source is None:
        raise ValueError("no MNIST folder found: pass mnist_dir")
    images, labels = _test_set(Path(source))
    draw = {
        "photos": functools.partial(_mnist_kinds, PHOTO_KINDS, PHOTO_WEIGHTS),
        "scans": functools.partial(_mnist_kinds, SCAN_KINDS, None),
        "canvas": _canvas,
    }[kind]

    def make(rng: np.random.Generator, stem: Path) -> tuple[Path, int]:
        index = int(rng.integers(len(images)))
        return draw(images[index], rng, stem), int(labels[index])

    return _write(make, kind, count, folder, seed)
