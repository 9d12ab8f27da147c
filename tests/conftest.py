"""Shared fixtures: where the real MNIST lives, and a skip when it is not there."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def mnist_dir() -> Path | None:
    """The real MNIST files: $MNISTLAB_DATA when set, else the shared copy beside the checkout."""
    for candidate in (os.environ.get("MNISTLAB_DATA"), REPO.parent / "shared" / "data" / "mnist"):
        if candidate and (Path(candidate) / "t10k-images-idx3-ubyte.gz").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def mnist_path() -> Path:
    path = mnist_dir()
    if path is None:
        pytest.skip("real MNIST not found: set MNISTLAB_DATA to a folder with the IDX files")
    return path


@pytest.fixture(scope="session")
def mnist_data(mnist_path):
    """The real MNIST, loaded once per test session (default 5,000-image validation split, seed 0)."""
    from mnistlab.data import load_data

    return load_data("mnist", mnist_path)
