"""Small IDX files written by the data tests, and helpers to compare what they read back."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from mnistlab.data.idx import IMAGES_MAGIC, LABELS_MAGIC
from mnistlab.datasets import DATASETS
from mnistlab.errors import MnistlabError

MNIST = DATASETS["mnist"]
GZ_NAMES = [f.name for f in MNIST.files]  # train images, train labels, test images, test labels
RAW_NAMES = [name.removesuffix(".gz") for name in GZ_NAMES]


def idx_bytes(magic: int, dims: tuple[int, ...], payload: bytes | np.ndarray) -> bytes:
    """An IDX file's bytes: big-endian magic, one big-endian u32 per dimension, then the payload as given."""
    if isinstance(payload, np.ndarray):
        payload = payload.astype(np.uint8).tobytes()
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    return header + payload


def gz(data: bytes, level: int = 9, mtime: int = 0) -> bytes:
    return gzip.compress(data, compresslevel=level, mtime=mtime)


def write(path: Path, data: bytes, compress: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gz(data) if compress else data)
    return path


def write_images(path: Path, images: np.ndarray, compress: bool = False) -> Path:
    return write(path, idx_bytes(IMAGES_MAGIC, images.shape, images), compress)


def write_labels(path: Path, labels: np.ndarray, compress: bool = False) -> Path:
    return write(path, idx_bytes(LABELS_MAGIC, labels.shape, labels), compress)


def random_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


def random_labels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 10, size=n, dtype=np.uint8)


def write_dataset(folder: Path, n_train: int = 6, n_test: int = 4, compress: bool = True) -> list[Path]:
    """Small valid files under the registry's names (gz or not) in `folder`, in resolve_files' order."""
    names = GZ_NAMES if compress else RAW_NAMES
    return [
        write_images(folder / names[0], random_images(n_train, 1), compress),
        write_labels(folder / names[1], random_labels(n_train, 2), compress),
        write_images(folder / names[2], random_images(n_test, 3), compress),
        write_labels(folder / names[3], random_labels(n_test, 4), compress),
    ]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def error_text(excinfo: pytest.ExceptionInfo[MnistlabError]) -> str:
    return str(excinfo.value)


def listing(folder: Path) -> list[str]:
    """Every entry under `folder`, hidden ones included, relative and sorted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def row_fingerprints(images: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> np.ndarray:
    """Each (image, label) pair as one opaque 785-byte value, sorted: equal results mean equal multisets."""
    images, labels = np.asarray(images), np.asarray(labels)
    rows = np.concatenate([images.reshape(len(images), -1), labels.astype(np.uint8)[:, None]], axis=1)
    return np.sort(np.ascontiguousarray(rows).view(np.dtype((np.void, rows.shape[1]))).ravel())
