"""Digits drawn as the web page draws them: strokes of a round 24-pixel brush, black on an opaque white 280x280
canvas, saved as the RGBA PNG a browser's `canvas.toBlob` makes. The browser test draws the same strokes with
the mouse; the API tests and the speed benchmark send these PNGs."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw

SIZE, BRUSH = 280, 24
# Strokes in canvas pixels, each a polyline; simple enough that the bundled model's answer is certain.
STROKES: dict[str, list[list[tuple[float, float]]]] = {
    "1": [[(140, 40), (140, 240)]],
    "7": [[(80, 60), (200, 60)], [(200, 60), (130, 230)]],
    "0": [[(140, 40), (200, 80), (210, 150), (190, 220), (140, 245), (90, 220), (70, 150), (80, 80), (140, 40)]],
}


def drawing(strokes: list[list[tuple[float, float]]], size: int = SIZE) -> Image.Image:
    """The strokes drawn with round caps and joins on an opaque white RGBA canvas of `size` pixels."""
    image = Image.new("RGBA", (size, size), (255, 255, 255, 255))
    draw = ImageDraw.Draw(image)
    scale = size / SIZE
    for stroke in strokes:
        points = [(x * scale, y * scale) for x, y in stroke]
        draw.line(points, fill=(0, 0, 0, 255), width=round(BRUSH * scale), joint="curve")
        for x, y in (points[0], points[-1]):  # round caps
            r = BRUSH * scale / 2
            draw.ellipse((x - r, y - r, x + r, y + r), fill=(0, 0, 0, 255))
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def drawn_png(digit: str) -> bytes:
    """The PNG the page would send for one of the STROKES digits."""
    return png_bytes(drawing(STROKES[digit]))
