"""Uploaded image bytes to the 28x28 digit the models see: opened with the checks `mnistlab predict` makes for
files, preprocessed by the very same `preprocess`, refusals typed by HTTP status. Nothing here needs torch, so
the server's preprocessing processes (`workers.Preparers`) load only numpy and Pillow."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image, ImageDraw

from mnistlab.data.preprocess import CorruptImage, ImageTooLarge, NotAnImage, Preprocessed, load_image, preprocess
from mnistlab.errors import MnistlabError


class RequestError(MnistlabError):
    """A request the server refuses, with the HTTP status that says why (4xx) and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(" ".join(message.split()))
        self.status = status

    def __reduce__(self):  # raised in a preprocessing process, it travels back pickled
        return RequestError, (self.status, str(self))


# How the server answers each kind of image `load_image` refuses.
_STATUS = {NotAnImage: 415, ImageTooLarge: 413, CorruptImage: 422}


def open_image(data: bytes) -> Image.Image:
    """Decode uploaded bytes with `preprocess.load_image`, the checks `mnistlab predict` makes for files, its
    refusals turned into HTTP statuses: empty 400, too many pixels 413, not an image 415, corrupt 422."""
    try:
        return load_image(data)
    except MnistlabError as exc:
        status = 400 if not data else _STATUS.get(type(exc), 422)
        raise RequestError(status, str(exc)) from None


def png_base64(digit: np.ndarray) -> str:
    """A float image in [0, 1] as a greyscale PNG, base64-encoded."""
    buffer = io.BytesIO()
    Image.fromarray(np.round(np.clip(digit, 0, 1) * 255).astype(np.uint8)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def prepare(data: bytes) -> Preprocessed:
    """Decode and preprocess (the same `preprocess` as `mnistlab predict`); a blank image is refused."""
    image = open_image(data)
    try:
        return preprocess(image)
    except MnistlabError as exc:
        raise RequestError(422, str(exc)) from None


def prepare_digit(data: bytes) -> np.ndarray:
    """`prepare`'s 28x28 digit alone: what a preprocessing process sends back (a few kB, not the image)."""
    return prepare(data).digit


def sample_drawing() -> bytes:
    """A drawing of a 1 as the page sends it (black on a white 280x280 RGBA canvas): the server's warm-up."""
    image = Image.new("RGBA", (280, 280), "white")
    ImageDraw.Draw(image).line([(140, 40), (140, 240)], fill="black", width=24)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()
