"""Outlier exposure's training material (`training.outlier_exposure`, `augment.strokes`,
`augment.typeset_digits`): generated non-digits, digits typeset in fonts, and whole-batch stroke variations.

Deliberately independent of tests/support/nondigits.py, the generator of the *measuring* sets: a recipe trained on
the measuring generator would prove nothing about non-digits it has not seen. Never Fashion-MNIST either (it is a
measuring set for MNIST models). docs/outliers.md ("outlier exposure") has the measured recipe.

- `render_nondigits`: drawn with Pillow (white on black, SIDE x SIDE) and put through `preprocess`, the path
  `mnistlab predict` takes, so that each is cropped, scaled into MNIST's 20x20 box and centred by mass as a
  user's image would be. Kinds: curves and strokes, polygons and stars, crosses and arrows, grids and hatching,
  blobs, noise, blank-ish pages, typeset letters, words and symbols. `render_typeset_digits` does the same for
  digits in the DejaVu fonts. Both are made once per (count, seed, GENERATOR) and cached (`cached_pool`).
- `from_digits`, `vary_strokes`: whole-batch tensor operations on the device, for the training loop.
- `Exposure`: what the three config keys add to each training batch.

Letters left out because some digit is drawn just like them in DejaVu or by hand: O o Q D (0), I l i j J (1),
Z z (2), S s (5), b G (6), T (7), B (8), g q a (9), A (4 in some hands), y (4), and the symbols $ | ! ( ) [ ]
(5 and 1).
"""

from __future__ import annotations

import math
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from mnistlab.config import Config
from mnistlab.data.download import cache_dir
from mnistlab.data.preprocess import preprocess
from mnistlab.data.splits import to_float
from mnistlab.errors import MnistlabError, warn
from mnistlab.files import replacing
from mnistlab.progress import Progress

# Bump whenever the drawings change: the cached pools are keyed by it, so no run trains on a stale one.
# 2: outlined polygons of at most 5 corners (6 to 8 are round enough to be a drawn 0), and plain strokes as 1s
# among the typeset digits (cnn-fast-oe, trained without, flagged a straight line drawn as a 1: 53-58%).
# 3: a third of those strokes exactly upright (a pixel-straight column: the one still flagged at some widths).
GENERATOR = 3
STROKE_ONES = 0.2  # the share of the typeset digits drawn instead as a 1 of one to three straight strokes
POOL_SIZE = 30_000  # non-digits drawn once (about 1.5 minutes on one core), capped by the training split's size
TYPESET_SIZE = 5_000  # typeset digits drawn once
# One seed for every run, so that every run shares one cached pool; the training seed still picks the draws.
POOL_SEED = 100
MIX_SHARE = 1 / 3  # the share of each batch's non-digits made from its own digits (`from_digits`)

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
EXCLUDED = set("OoQDIliJjZzSsbGTBgqaAy")
LETTERS = "".join(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz" if c not in EXCLUDED)
SYMBOLS = "#%&*+=?@<>{}~^"
SIDE = 112  # drawing canvas; preprocess scales it into the 20x20 box
KINDS = ("curves", "polygons", "marks", "grids", "blobs", "noise", "blank", "letters", "words")
WEIGHTS = (0.16, 0.14, 0.1, 0.08, 0.08, 0.06, 0.04, 0.2, 0.14)


def _fonts() -> list[Path]:
    """The DejaVu text fonts (MathTeX's glyph set differs); a one-line error where they are not installed."""
    fonts = [p for p in sorted(FONT_DIR.glob("DejaVu*.ttf")) if "MathTeX" not in p.name]
    if not fonts:
        raise MnistlabError(
            f"outlier exposure draws letters and digits in the DejaVu fonts, and {FONT_DIR} has none: install them "
            "(Debian and Ubuntu: fonts-dejavu-core)"
        )
    return fonts


def _font(fonts: list[Path], rng: np.random.Generator) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(fonts[int(rng.integers(len(fonts)))]), int(rng.integers(50, 90)))


def _curve(rng: np.random.Generator, low: int = 3) -> list[tuple[float, float]]:
    """A random smooth curve: a quadratic Bezier chain through `low` to 7 random points."""
    points = rng.uniform(8, SIDE - 8, size=(int(rng.integers(low, 8)), 2))
    out = []
    for a, b, c in zip(points[:-2], points[1:-1], points[2:], strict=False):
        start, end = (a + b) / 2, (b + c) / 2
        for t in np.linspace(0, 1, 10):
            p = (1 - t) ** 2 * start + 2 * (1 - t) * t * b + t**2 * end
            out.append((float(p[0]), float(p[1])))
    return out or [tuple(p) for p in points]


def _star(rng: np.random.Generator, corners: int, inner: float) -> list[tuple[float, float]]:
    centre, radius, turn = SIDE / 2, rng.uniform(30, 50), rng.uniform(0, 2 * math.pi)
    points = []
    for i in range(corners * (2 if inner < 1 else 1)):
        r = radius * (inner if i % 2 else 1.0) if inner < 1 else radius
        angle = turn + 2 * math.pi * i / (corners * (2 if inner < 1 else 1))
        points.append((centre + r * math.cos(angle), centre + r * math.sin(angle)))
    return points


def _diameter(c: float, r: float, a: float) -> list[tuple[float, float]]:
    """The ends of a line through (c, c) of half-length r at angle a."""
    return [(c - r * math.cos(a), c - r * math.sin(a)), (c + r * math.cos(a), c + r * math.sin(a))]


def _draw(kind: str, rng: np.random.Generator, fonts: list[Path]) -> Image.Image:
    """One non-digit of `kind`, white on black, SIDE x SIDE."""
    image = Image.new("L", (SIDE, SIDE), 0)
    draw = ImageDraw.Draw(image)
    width = int(rng.integers(3, 14))
    if kind == "curves":
        # One stroke through few points can be a 1, 2, 7 or 0: a lone stroke is made to wander (5-7 points).
        strokes = int(rng.integers(1, 5))
        for _ in range(strokes):
            draw.line(_curve(rng, 3 if strokes > 1 else 5), fill=255, width=width, joint="curve")
    elif kind == "polygons":
        corners = int(rng.integers(3, 9))
        star, filled = rng.random() < 0.4, rng.random() < 0.4
        if not (star or filled):  # an outline of many corners is a circle, a 0 as people draw it
            corners = min(corners, 5)
        points = _star(rng, corners, rng.uniform(0.3, 0.6) if star else 1.0)
        if filled:
            draw.polygon(points, fill=255)
        else:
            draw.line([*points, points[0]], fill=255, width=width, joint="curve")
        if rng.random() < 0.3:  # a second shape beside or inside it
            other = [(x * 0.5 + rng.uniform(0, 50), y * 0.5 + rng.uniform(0, 50)) for x, y in _star(rng, 4, 1.0)]
            draw.line([*other, other[0]], fill=255, width=width)
    elif kind == "marks":  # crosses, plus signs, arrows, ticks, asterisks
        c, r = SIDE / 2, rng.uniform(30, 50)
        mark = rng.integers(4)
        if mark == 0:  # x or +
            turn = rng.uniform(0, math.pi / 2)
            for k in range(2):
                a = turn + k * math.pi / 2
                draw.line(_diameter(c, r, a), 255, width)
        elif mark == 1:  # arrow
            a = rng.uniform(0, 2 * math.pi)
            tip = (c + r * math.cos(a), c + r * math.sin(a))
            draw.line([(c - r * math.cos(a), c - r * math.sin(a)), tip], 255, width)
            for side in (-1, 1):
                b = a + math.pi + side * 0.5
                draw.line([tip, (tip[0] + 0.5 * r * math.cos(b), tip[1] + 0.5 * r * math.sin(b))], 255, width)
        elif mark == 2:  # asterisk of 3-6 lines
            n, turn = int(rng.integers(3, 7)), rng.uniform(0, math.pi)
            for k in range(n):
                a = turn + k * math.pi / n
                draw.line(_diameter(c, r, a), 255, width)
        else:  # tick marks or dashes in a row
            for k in range(int(rng.integers(2, 6))):
                x = 15 + k * 20
                draw.line([(x, rng.uniform(20, 50)), (x + rng.uniform(-10, 10), rng.uniform(60, 95))], 255, width)
    elif kind == "grids":
        n, m = int(rng.integers(2, 6)), int(rng.integers(1, 6))
        for k in range(n):
            x = 10 + k * (SIDE - 20) / max(n - 1, 1)
            draw.line([(x, 10), (x + rng.uniform(-8, 8), SIDE - 10)], 255, max(2, width // 2))
        for k in range(m if rng.random() < 0.7 else 0):
            y = 10 + k * (SIDE - 20) / max(m - 1, 1)
            draw.line([(10, y), (SIDE - 10, y + rng.uniform(-8, 8))], 255, max(2, width // 2))
    elif kind == "blobs":
        for _ in range(int(rng.integers(1, 5))):
            x, y, rx, ry = rng.uniform(20, 90), rng.uniform(20, 90), rng.uniform(5, 30), rng.uniform(5, 30)
            draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=int(rng.integers(120, 256)))
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(1, 5)))
    elif kind == "noise":
        cell = int(rng.choice([1, 2, 4, 8, 16]))
        small = rng.random((SIDE // cell, SIDE // cell)) ** rng.uniform(0.5, 3)
        image = Image.fromarray((255 * small).astype(np.uint8)).resize((SIDE, SIDE), Image.BILINEAR)
    elif kind == "blank":  # a few specks or one short faint line on an empty page
        for _ in range(int(rng.integers(1, 8))):
            x, y, r = rng.uniform(5, 105), rng.uniform(5, 105), rng.uniform(1, 4)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=int(rng.integers(80, 256)))
    else:  # letters or words
        text = (
            str(rng.choice(list(LETTERS)))
            if kind == "letters"
            else "".join(rng.choice(list(LETTERS + SYMBOLS), size=int(rng.integers(2, 5))))
        )
        if kind == "letters" and rng.random() < 0.2:
            text = str(rng.choice(list(SYMBOLS)))
        draw.text((SIDE / 2, SIDE / 2), text, fill=255, font=_font(fonts, rng), anchor="mm")
        if rng.random() < 0.3:  # slanted like handwriting
            image = image.rotate(rng.uniform(-20, 20), resample=Image.BILINEAR)
    return image


def _as_mnist(image: Image.Image) -> torch.Tensor | None:
    """A drawing as `predict` would see it, uint8 (28, 28); None where preprocessing refuses it (blank, faint
    noise: `predict` flags those anyway)."""
    try:
        view = preprocess(image, invert=False).tensor
    except MnistlabError:
        return None
    return (view * 255).round().to(torch.uint8)


def render_nondigits(count: int, seed: int) -> torch.Tensor:
    """`count` non-digits as uint8 (N, 28, 28), the same for the same seed. Drawings that preprocessing refuses
    are drawn again."""
    rng, fonts = np.random.default_rng(seed), _fonts()
    views: list[torch.Tensor] = []
    while len(views) < count:
        view = _as_mnist(_draw(str(rng.choice(KINDS, p=WEIGHTS)), rng, fonts))
        if view is not None:
            views.append(view)
    return torch.stack(views)


def _stroke_one(rng: np.random.Generator) -> Image.Image:
    """A 1 as people draw it with a pen or a mouse: one straight stroke within 15 degrees of upright, of any
    width, sometimes with a flag at the top and a base at the bottom."""
    image = Image.new("L", (SIDE, SIDE), 0)
    draw = ImageDraw.Draw(image)
    turn = 0.0 if rng.random() < 1 / 3 else math.radians(rng.uniform(-15, 15))  # ruler-straight, or slanted
    width, half = int(rng.integers(2, 16)), rng.uniform(30, 50)
    c = SIDE / 2
    top = (c + half * math.sin(turn), c - half * math.cos(turn))
    bottom = (c - half * math.sin(turn), c + half * math.cos(turn))
    draw.line([top, bottom], 255, width)
    if rng.random() < 0.4:  # the flag
        flag = rng.uniform(0.25, 0.45) * half
        draw.line([top, (top[0] - flag, top[1] + flag * rng.uniform(0.5, 1.0))], 255, width)
        if rng.random() < 0.4:  # and the base
            draw.line([(bottom[0] - 0.4 * half, bottom[1]), (bottom[0] + 0.4 * half, bottom[1])], 255, width)
    return image


def render_typeset_digits(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` digits typeset in the DejaVu fonts (random font, size and slant), uint8 (N, 28, 28), and their
    labels (int64): in-distribution examples beside the typeset letters among the non-digits, so that
    "typeset" does not become the cue for "not a digit". A share STROKE_ONES are 1s drawn as plain strokes
    instead: the straight lines among the non-digits must not teach that a 1 drawn as one is not a digit."""
    rng, fonts = np.random.default_rng(seed), _fonts()
    views: list[torch.Tensor] = []
    labels: list[int] = []
    while len(views) < count:
        if rng.random() < STROKE_ONES:
            view = _as_mnist(_stroke_one(rng))
            if view is not None:
                views.append(view)
                labels.append(1)
            continue
        digit = int(rng.integers(10))
        image = Image.new("L", (SIDE, SIDE), 0)
        ImageDraw.Draw(image).text((SIDE / 2, SIDE / 2), str(digit), fill=255, font=_font(fonts, rng), anchor="mm")
        if rng.random() < 0.3:
            image = image.rotate(rng.uniform(-15, 15), resample=Image.BILINEAR)
        view = _as_mnist(image)
        if view is not None:
            views.append(view)
            labels.append(digit)
    return torch.stack(views), torch.tensor(labels)


def cached_pool(
    name: str, count: int, seed: int, make: Callable[[], dict[str, np.ndarray]], log: Progress | None = None
) -> dict[str, np.ndarray]:
    """`make()`'s arrays, kept in mnistlab's cache folder under (name, count, seed, GENERATOR) as one .npz (no
    pickle); `name` says what they are in the progress lines. Written atomically: two trainings making it at
    once each write a whole file, and the last rename wins. A cache file that cannot be read is made again; one that
    cannot be written is a warning."""
    path = cache_dir() / "exposure" / f"{name.replace(' ', '-')}-g{GENERATOR}-{count}-{seed}.npz"
    try:
        with np.load(path, allow_pickle=False) as stored:
            return {key: stored[key] for key in stored.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        pass  # missing, or cut short by a full disk: made again below
    log = log or Progress()
    log.line(f"making {count:,} {name} for outlier exposure, once (about {count / 20_000:.1f} min on one core)")
    start = time.perf_counter()
    arrays = make()
    try:
        with replacing(path) as tmp, tmp.open("wb") as f:
            np.savez(f, **arrays)
    except MnistlabError as exc:  # an unwritable cache costs the next run the drawing, never this one its work
        warn(f"{exc}: the {name} are not cached, and will be made again next time")
    else:
        log.line(f"made {count:,} {name} in {time.perf_counter() - start:.0f} s; cached in {path}")
    return arrays


def nondigit_pool(count: int, seed: int = POOL_SEED, log: Progress | None = None) -> torch.Tensor:
    """`render_nondigits(count, seed)`, cached."""

    def make() -> dict[str, np.ndarray]:
        return {"images": render_nondigits(count, seed).numpy()}

    return torch.from_numpy(cached_pool("non-digits", count, seed, make, log)["images"])


def typeset_pool(count: int, seed: int = POOL_SEED, log: Progress | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`render_typeset_digits(count, seed)`, cached."""

    def make() -> dict[str, np.ndarray]:
        images, labels = render_typeset_digits(count, seed)
        return {"images": images.numpy(), "labels": labels.numpy()}

    arrays = cached_pool("typeset digits", count, seed, make, log)
    return torch.from_numpy(arrays["images"]), torch.from_numpy(arrays["labels"])


def _pooled(x: torch.Tensor, sign: float) -> torch.Tensor:
    """Dilation (sign 1) or erosion (sign -1) of a float batch (B, 28, 28) by a 3x3 square: the maximum of
    shifted copies, rows then columns (max_pool2d with stride 1 is about 10x slower on a CPU)."""
    p = F.pad(sign * x, (1, 1, 1, 1), value=-math.inf)
    rows = torch.maximum(torch.maximum(p[:, :, :-2], p[:, :, 1:-1]), p[:, :, 2:])
    return sign * torch.maximum(torch.maximum(rows[:, :-2], rows[:, 1:-1]), rows[:, 2:])


def _to_full_ink(x: torch.Tensor) -> torch.Tensor:
    return x / x.amax((1, 2), keepdim=True).clamp_min(1e-6)


LOW_SIDES = (10, 12, 14)  # the low resolutions a digit is taken down to and back up from (one pass each)


def vary_strokes(x: torch.Tensor, share: float, generator: torch.Generator) -> torch.Tensor:
    """A random `share` of a float batch (B, 28, 28) in [0, 1] drawn thicker (3x3 dilation), thinner (3x3
    erosion), at low resolution (down to 10, 12 or 14 pixels and back up, bilinear), blurred (mildly) or at another
    contrast (a gamma of 0.5-2), one of these per image; the rest unchanged. What scanned digits look like.
    Whole-batch operations, no host sync (`generator` lives on x's device)."""
    n, dev = len(x), x.device
    op = torch.randint(0, 5, (n,), generator=generator, device=dev)
    chosen = torch.rand(n, generator=generator, device=dev) < share
    thin = _pooled(x, -1.0)
    # An erosion can wipe out a thin digit: such an image keeps its strokes; the rest are brought back to full ink.
    thin = torch.where(thin.amax((1, 2), keepdim=True) > 0.3, _to_full_ink(thin), x)
    side = torch.randint(0, len(LOW_SIDES), (n,), generator=generator, device=dev)
    low = torch.zeros_like(x)
    for k, s in enumerate(LOW_SIDES):  # each side for the whole batch, each image keeping its own
        small = F.interpolate(x[:, None], size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        back = F.interpolate(small, size=x.shape[1:], mode="bilinear", align_corners=False)[:, 0]
        low = torch.where((side == k)[:, None, None], back, low)
    kernel = torch.tensor([[0.05, 0.1, 0.05], [0.1, 0.4, 0.1], [0.05, 0.1, 0.05]], device=dev)
    blur = F.conv2d(x[:, None], kernel[None, None], padding=1)[:, 0]
    gamma = torch.empty(n, 1, 1, device=dev).uniform_(math.log(0.5), math.log(2.0), generator=generator).exp_()
    views = (_pooled(x, 1.0), thin, _to_full_ink(low.clamp(0, 1)), _to_full_ink(blur), x.clamp_min(0) ** gamma)
    out = x
    for k, view in enumerate(views):
        out = torch.where((chosen & (op == k))[:, None, None], view, out)
    return out


def from_digits(x: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-digits made from a float batch of digits (B, 28, 28) in [0, 1]: each paired with another of the batch,
    overlaid (pixel max, the other shifted by up to 3 pixels sideways) or side by side (the left half of one, the
    right half of the other, which reads as neither), half each. Returns them and whether each is a non-digit:
    a pair of the same class may still read as that digit, so the caller puts something else in its place
    (a mask rather than a selection: no host sync)."""
    n, dev = len(x), x.device
    other = torch.randperm(n, generator=generator, device=dev)
    b = x[other]
    shift = torch.randint(-3, 4, (n, 1, 1), generator=generator, device=dev)
    columns = (torch.arange(x.shape[2], device=dev) - shift) % x.shape[2]
    overlay = torch.maximum(x, b.gather(2, columns.expand(-1, x.shape[1], -1)))
    halves = torch.cat([x[:, :, : x.shape[2] // 2], b[:, :, x.shape[2] // 2 :]], dim=2)
    pick = torch.rand(n, generator=generator, device=dev) < 0.5
    return torch.where(pick[:, None, None], overlay, halves), labels != labels[other]


class Exposure:
    """What `training.outlier_exposure`, `augment.strokes` and `augment.typeset_digits` add to each training
    batch, its pools on the training device as uint8."""

    def __init__(self, config: Config, train_size: int, device: torch.device, log: Progress | None = None):
        self.weight = config.training.outlier_exposure
        self.strokes = config.augment.strokes
        self.typeset = config.augment.typeset_digits
        self.pool = nondigit_pool(min(POOL_SIZE, train_size), log=log).to(device) if self.weight else None
        self.typeset_images, self.typeset_labels = (
            [t.to(device) for t in typeset_pool(min(TYPESET_SIZE, train_size), log=log)]
            if self.typeset
            else (None, None)
        )

    @staticmethod
    def wanted(config: Config) -> bool:
        """Whether `config` turns any of the three on."""
        return bool(config.training.outlier_exposure or config.augment.strokes or config.augment.typeset_digits)

    def __call__(
        self, x: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A float batch of digits (B, 28, 28) and its labels -> the digits, `typeset` typeset ones after them,
        `strokes` of them varied, followed (with exposure) by as many non-digits as there are digits, a third
        made from these digits, the rest from the pool, all varied alike; and the digits' labels (the rows
        after them are the non-digits)."""
        dev = x.device
        if self.typeset:
            pick = torch.randint(0, len(self.typeset_labels), (self.typeset,), generator=generator, device=dev)
            x = torch.cat([x, to_float(self.typeset_images.index_select(0, pick))])
            labels = torch.cat([labels, self.typeset_labels.index_select(0, pick)])
        if self.strokes:
            x = vary_strokes(x, self.strokes, generator)
        if self.pool is None:
            return x, labels
        n = len(x)
        drawn = to_float(
            self.pool.index_select(0, torch.randint(0, len(self.pool), (n,), generator=generator, device=dev))
        )
        made, usable = from_digits(x, labels, generator)
        mixed = torch.arange(n, device=dev) < round(MIX_SHARE * n)
        nondigits = torch.where((mixed & usable)[:, None, None], made, drawn)
        if self.strokes:  # the same variations as the digits, so that stroke width and blur are no cue either way
            nondigits = vary_strokes(nondigits, self.strokes, generator)
        return torch.cat([x, nondigits]), labels
