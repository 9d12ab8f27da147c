"""IDX files (MNIST's format), gzipped or not: read, checked against their magic numbers and shapes."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from mnistlab.errors import MnistlabError

IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
GZIP_MAGIC = b"\x1f\x8b"


# ---------------------------------------------------------------------------------------------- IDX files


def _read_bytes(path: Path) -> bytes:
    """The file's content, decompressed when it is gzip (decided by its first bytes, not its name)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise MnistlabError(f"{path}: cannot read ({exc.strerror})") from None
    if raw[:2] == GZIP_MAGIC:
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise MnistlabError(f"{path}: corrupt gzip data ({exc})") from None
    return raw


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes (.gz or raw), checking magic number, dimensions and length."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 8:
        raise MnistlabError(f"{path}: too short to be an IDX file ({len(data)} bytes)")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        kind = "images" if magic == IMAGES_MAGIC else "labels"
        raise MnistlabError(f"{path}: bad magic number {found} (an IDX {kind} file has {magic})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise MnistlabError(f"{path}: header truncated")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        raise MnistlabError(
            f"{path}: {len(data)} bytes, but its header {tuple(dims)} says {expected} (truncated or padded)"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_images(path: str | Path) -> np.ndarray:
    """An IDX images file as a uint8 array (N, 28, 28)."""
    images = read_idx(path, IMAGES_MAGIC)
    if images.shape[1:] != (28, 28):
        raise MnistlabError(f"{path}: images are {images.shape[1:]}, expected 28x28")
    return images


def read_labels(path: str | Path) -> np.ndarray:
    """An IDX labels file as a uint8 array (N,), every label a digit 0-9."""
    labels = read_idx(path, LABELS_MAGIC)
    if labels.size and labels.max() > 9:
        raise MnistlabError(f"{path}: label {int(labels.max())} is out of range 0-9")
    return labels
