"""Realistic test images built from MNIST *test* digits: ink on tinted, unevenly lit, noisy paper; drawing
canvases with transparent backgrounds; files in several modes and formats; EXIF-rotated photos; digits cropped
tightly to their ink, at low resolution, and with very thick or very thin strokes.

The builders take a uint8 28x28 MNIST digit (white ink on black) and return a PIL image or a saved path;
`blank_png` writes a huge but tiny-on-disk PNG for decompression-bomb tests; `assert_like` checks what
preprocessing made of one against the digit itself.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

# The transposition that exif_transpose applies for each rotating orientation, undone to store the photo the
# way a camera held sideways would have written it.
_STORE_ROTATED = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def _upscale(digit: np.ndarray, digit_height: int) -> np.ndarray:
    """The digit's 28x28 frame scaled (bicubic) so that its ink is `digit_height` rows tall, in [0, 1]."""
    rows = np.flatnonzero(digit.any(axis=1))
    ink_rows = rows[-1] - rows[0] + 1 if rows.size else 20  # a blank "digit" scales like a typical one
    side = max(1, round(28 * digit_height / ink_rows))
    tile = Image.fromarray(digit).resize((side, side), Image.Resampling.BICUBIC)
    return np.asarray(tile, dtype=np.float32) / 255


def on_paper(
    digit: np.ndarray,
    size: tuple[int, int] = (640, 480),
    position: tuple[int, int] | str = "center",
    digit_height: int = 200,
    paper_rgb: tuple[int, int, int] = (240, 235, 220),
    ink_rgb: tuple[int, int, int] = (20, 20, 40),
    gradient: bool = True,
    noise_sigma: float = 4.0,
    seed: int = 0,
) -> Image.Image:
    """A photo-like RGB image of `digit` written in `ink_rgb` on `paper_rgb`.

    `position` is the top-left corner of the upscaled 28x28 frame, or "center". With `gradient` the light
    falls off by up to a third across the page in a random direction; `noise_sigma` is in 0-255 units.
    """
    rng = np.random.default_rng(seed)
    tile = _upscale(digit, digit_height)
    width, height = size
    x, y = ((width - tile.shape[1]) // 2, (height - tile.shape[0]) // 2) if position == "center" else position
    ink = np.zeros((height, width), dtype=np.float32)
    # Clip the tile to the page so a digit may hang over an edge.
    top, left = max(y, 0), max(x, 0)
    bottom, right = min(y + tile.shape[0], height), min(x + tile.shape[1], width)
    ink[top:bottom, left:right] = tile[top - y : bottom - y, left - x : right - x]
    ink = ink[..., None]
    rgb = np.asarray(paper_rgb, np.float32) * (1 - ink) + np.asarray(ink_rgb, np.float32) * ink
    if gradient:
        angle = rng.uniform(0, 2 * np.pi)
        xs = np.arange(width, dtype=np.float32) * np.float32(np.cos(angle) / width)
        ys = np.arange(height, dtype=np.float32) * np.float32(np.sin(angle) / height)
        ramp = ys[:, None] + xs[None, :]
        ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
        rgb *= (1 - np.float32(rng.uniform(0.2, 0.35)) * ramp)[..., None]
    rgb += rng.standard_normal(rgb.shape, dtype=np.float32) * np.float32(noise_sigma)
    return Image.fromarray(np.clip(rgb + 0.5, 0, 255).astype(np.uint8))


def light_on_dark(digit: np.ndarray, **kwargs: Any) -> Image.Image:
    """Chalk on a blackboard: `on_paper` with a dark green-grey board and off-white ink."""
    kwargs.setdefault("paper_rgb", (35, 45, 40))
    kwargs.setdefault("ink_rgb", (230, 230, 215))
    return on_paper(digit, **kwargs)


def canvas_rgba(digit: np.ndarray, size: int = 280, stroke_rgb: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """A drawing app's export: strokes of one colour, alpha = ink, and fully transparent pixels stored as
    (0, 0, 0, 0) as an HTML canvas does, so the colour hidden under them must not matter."""
    tile = Image.fromarray(digit).resize((size, size), Image.Resampling.BICUBIC)
    alpha = np.asarray(tile)
    rgba = np.zeros((size, size, 4), dtype=np.uint8)
    rgba[alpha > 0, :3] = stroke_rgb
    rgba[..., 3] = alpha
    return Image.fromarray(rgba)


UP = 4  # restroke works on the digit enlarged this many times, where a stroke is about 10 pixels wide


def restroke(digit: np.ndarray, change: int = 0) -> Image.Image:
    """The digit enlarged UP times (bicubic, white ink on black, 'L'), its strokes thickened (`change` > 0) or
    thinned (< 0) by `change` enlarged pixels on each side: a grey dilation or erosion with a square."""
    tile = Image.fromarray(digit).resize((28 * UP, 28 * UP), Image.Resampling.BICUBIC)
    if change > 0:
        return tile.filter(ImageFilter.MaxFilter(2 * change + 1))
    if change < 0:
        return tile.filter(ImageFilter.MinFilter(-2 * change + 1))
    return tile


def tight_crop(
    tile: Image.Image, longer_side: int, margin: float = 0.0, resample: Image.Resampling = Image.Resampling.BOX
) -> np.ndarray:
    """The ink's box in `tile` ('L', white ink on black) widened by `margin` times its longer side on every
    side, resampled so its longer side is `longer_side` pixels, keeping the aspect ratio; ink = 1, in [0, 1].

    The default BOX filter averages areas, as a low-resolution scanner does.
    """
    values = np.asarray(tile)
    rows, cols = np.flatnonzero((values > 25).any(axis=1)), np.flatnonzero((values > 25).any(axis=0))
    extra = margin * max(rows[-1] + 1 - rows[0], cols[-1] + 1 - cols[0])
    pad = int(extra) + 1  # Pillow's source box may not reach outside the image
    padded = Image.fromarray(np.pad(values, pad))
    left, top = cols[0] + pad - extra, rows[0] + pad - extra
    right, bottom = cols[-1] + 1 + pad + extra, rows[-1] + 1 + pad + extra
    scale = longer_side / max(right - left, bottom - top)
    size = (max(1, round((right - left) * scale)), max(1, round((bottom - top) * scale)))
    return np.asarray(padded.resize(size, resample, box=(left, top, right, bottom)), dtype=np.float32) / 255


def scan(
    ink: np.ndarray,
    paper_rgb: tuple[int, int, int] = (240, 235, 220),
    ink_rgb: tuple[int, int, int] = (20, 20, 40),
    noise_sigma: float = 3.0,
    seed: int = 0,
) -> Image.Image:
    """An evenly lit RGB scan of `ink` (in [0, 1], ink = 1) in `ink_rgb` on `paper_rgb`, with sensor noise."""
    rng = np.random.default_rng(seed)
    share = ink[..., None]
    rgb = np.asarray(paper_rgb, np.float32) * (1 - share) + np.asarray(ink_rgb, np.float32) * share
    rgb += rng.standard_normal(rgb.shape, dtype=np.float32) * np.float32(noise_sigma)
    return Image.fromarray(np.clip(rgb + 0.5, 0, 255).astype(np.uint8))


def save_as(image: Image.Image, path: Path, mode: str | None = None, quality: int = 75) -> Path:
    """Save `image` converted to `mode` (RGB, RGBA, L, or P for an adaptive palette, keeping transparency),
    in the format its suffix names."""
    if mode == "P":
        # An adaptive palette drops alpha; quantising keeps it as a PNG's per-entry transparency.
        rgba = image.mode == "RGBA"
        image = image.quantize(256) if rgba else image.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)
    elif mode is not None:
        image = image.convert(mode)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        image.save(path, quality=quality)
    else:
        image.save(path)
    return path


def with_exif_rotation(image: Image.Image, path: Path, orientation: int = 6) -> Path:
    """Save `image` as a JPEG stored sideways (or upside down) with the EXIF Orientation tag that rights it."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.transpose(_STORE_ROTATED[orientation]).save(path, exif=exif, quality=90)
    return path


def blank_png(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit all-black PNG of any size, written row by row so it never needs the pixels in memory."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte "none", then the packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, greyscale, no interlace
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


# The kinds of file a user brings, each built from one MNIST test digit; `index` varies paper tint, ink,
# size and position from one image to the next, deterministically.
TINTS = [(240, 235, 220), (250, 250, 250), (225, 230, 240), (235, 225, 200), (210, 210, 205)]
INKS = [(20, 20, 40), (10, 10, 10), (20, 40, 120), (60, 30, 30)]
KINDS = (
    "mnist-png",
    "paper-jpeg",
    "paper-png",
    "small-in-corner-jpeg",
    "canvas-rgba-png",
    "palette-png",
    "greyscale-jpeg",
    "exif-rotated-jpeg",
    "light-on-dark-png",
)
# Harder kinds (issue 13): digits cropped tightly to their ink, so strokes touch the frame and ink may cover
# most of it; low resolution, as-is or upsampled; very thick and very thin strokes.
TOUGH_KINDS = (
    "tight-crop-lowres-64",
    "tight-crop-dark-on-light",
    "tight-crop-light-on-dark",
    "lowres-8",
    "lowres-12",
    "lowres-16",
    "lowres-20",
    "thick-strokes",
    "thin-strokes",
)
CHALK = {"paper_rgb": (35, 45, 40), "ink_rgb": (230, 230, 215)}


def realistic_image(kind: str, digit: np.ndarray, index: int, folder: Path) -> Path:
    """Write one image of `kind` showing `digit` into `folder`; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"{index:04d}"
    rng = np.random.default_rng(index)
    paper = {
        "paper_rgb": TINTS[index % len(TINTS)],
        "ink_rgb": INKS[index % len(INKS)],
        "digit_height": int(rng.integers(80, 320)),
        "position": "center",
        "seed": index,
    }
    if paper["digit_height"] < 240 and index % 2:  # off-centre, somewhere on the page
        paper["position"] = (
            int(rng.integers(0, 640 - 28 * paper["digit_height"] // 20)),
            int(rng.integers(0, max(1, 480 - 28 * paper["digit_height"] // 20))),
        )
    if kind == "mnist-png":
        return save_as(Image.fromarray(digit), stem.with_suffix(".png"))
    if kind == "paper-jpeg":
        return save_as(on_paper(digit, **paper), stem.with_suffix(".jpg"))
    if kind == "paper-png":
        return save_as(on_paper(digit, **paper), stem.with_suffix(".png"))
    if kind == "small-in-corner-jpeg":
        corner = [(60, 60), (1350, 60), (60, 950), (1350, 950)][index % 4]
        image = on_paper(digit, size=(1600, 1200), position=corner, digit_height=90, seed=index)
        return save_as(image, stem.with_suffix(".jpg"))
    if kind == "canvas-rgba-png":
        return save_as(canvas_rgba(digit), stem.with_suffix(".png"))
    if kind == "palette-png":
        return save_as(on_paper(digit, **paper), stem.with_suffix(".png"), mode="P")
    if kind == "greyscale-jpeg":
        return save_as(on_paper(digit, **paper), stem.with_suffix(".jpg"), mode="L")
    if kind == "exif-rotated-jpeg":
        return with_exif_rotation(on_paper(digit, **paper), stem.with_suffix(".jpg"), orientation=(6, 8)[index % 2])
    if kind == "light-on-dark-png":
        return save_as(
            light_on_dark(digit, **{k: v for k, v in paper.items() if "rgb" not in k}), stem.with_suffix(".png")
        )
    if kind in TOUGH_KINDS:
        return save_as(tough_image(kind, digit, index), stem.with_suffix(".jpg" if "dark-on-light" in kind else ".png"))
    raise ValueError(f"unknown kind {kind!r}")


def tough_image(kind: str, digit: np.ndarray, index: int) -> Image.Image:
    """One image of a TOUGH_KINDS kind showing `digit`; `index` varies colours, sizes and filters."""
    rng = np.random.default_rng(index)
    colours = {"paper_rgb": TINTS[index % len(TINTS)], "ink_rgb": INKS[index % len(INKS)], "seed": index}
    if kind == "tight-crop-lowres-64":
        # A form's box scanned at low resolution in grey, cropped to the digit, enlarged for viewing: the
        # pen's width varies from MNIST's own to a quarter wider.
        small = scan(tight_crop(restroke(digit, int(rng.integers(0, 5))), int(rng.integers(10, 17))), **colours)
        scale = 64 / max(small.size)
        size = (max(1, round(small.width * scale)), max(1, round(small.height * scale)))
        resample = (Image.Resampling.NEAREST, Image.Resampling.BILINEAR)[index % 2]
        return small.convert("L").resize(size, resample)
    if kind.startswith("tight-crop-"):
        ink = tight_crop(restroke(digit), int(rng.integers(40, 201)), resample=Image.Resampling.BICUBIC)
        return scan(ink, noise_sigma=4, **(colours if kind.endswith("dark-on-light") else {**CHALK, "seed": index}))
    if kind.startswith("lowres-"):
        # As small as it was scanned, a little margin or none; every other one light on dark.
        ink = tight_crop(restroke(digit), int(kind.split("-")[1]), margin=float(rng.uniform(0, 0.15)))
        return scan(ink, noise_sigma=2, **(colours if index % 2 == 0 else {**CHALK, "seed": index})).convert("L")
    if kind in ("thick-strokes", "thin-strokes"):
        # Strokes about twice MNIST's width (up to 2.5 times), or about half (down to a third).
        change = int(rng.integers(4, 8)) if kind == "thick-strokes" else -int(rng.integers(2, 4))
        ink = tight_crop(restroke(digit, change), int(rng.integers(80, 201)), 0.2, Image.Resampling.BICUBIC)
        return scan(ink, **colours)
    raise ValueError(f"unknown kind {kind!r}")


# ---------------------------------------------------------------------------------------------- comparing


def similarity(out: np.ndarray, digit: np.ndarray) -> tuple[float, float]:
    """Mean absolute difference and correlation between a preprocessed digit and the MNIST original."""
    ref = digit / 255
    return float(np.abs(out - ref).mean()), float(np.corrcoef(out.ravel(), ref.ravel())[0, 1])


def assert_like(out: np.ndarray, digit: np.ndarray, corr: float = 0.85, most: float = 0.07) -> None:
    """What preprocessing made of a picture of `digit` is close to `digit` itself."""
    mad, r = similarity(out, digit)
    assert r > corr and mad < most, f"correlation {r:.3f}, mean abs diff {mad:.3f}"
