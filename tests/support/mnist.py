"""Where the real MNIST (and Fashion-MNIST) lives, and slices of it for tests that need real data but not all of it."""

from __future__ import annotations

import os
from pathlib import Path

from mnistlab.data.splits import MnistData, Split

REPO = Path(__file__).resolve().parents[2]


def mnist_dir() -> Path | None:
    """The real MNIST files: $MNISTLAB_DATA when set, else the shared copy beside the checkout."""
    for candidate in (os.environ.get("MNISTLAB_DATA"), REPO.parent / "shared" / "data" / "mnist"):
        if candidate and (Path(candidate) / "t10k-images-idx3-ubyte.gz").is_file():
            return Path(candidate)
    return None


FASHION_DIR = REPO.parent / "shared" / "data" / "fashion-mnist"


def fashion_dir() -> Path | None:
    """The real Fashion-MNIST files beside the checkout (a set of non-digits for the MNIST models, and a data set
    of its own), or None."""
    return FASHION_DIR if (FASHION_DIR / "t10k-images-idx3-ubyte.gz").is_file() else None


def subset(data: MnistData, n_train: int, n_eval: int) -> MnistData:
    """The first images of each split."""

    def head(s: Split, n: int) -> Split:
        return Split(s.images[:n], s.labels[:n])

    return MnistData(
        data.name, head(data.train, n_train), head(data.val, n_eval), head(data.test, n_eval), data.mean, data.std
    )


def write_mnist_folder(root: Path, data: MnistData, n_train: int, n_test: int) -> Path:
    """A data folder (`root`, holding `mnist/`) whose IDX files, under the registry's names, hold the first
    `n_train` training and `n_test` test images of `data`: real digits for a command or server that reads its
    training data from disk (--data-dir, MNISTLAB_DATA), small enough to train or index in seconds."""
    from .idx_files import GZ_NAMES, write_images, write_labels

    folder = root / "mnist"
    write_images(folder / GZ_NAMES[0], data.train.images[:n_train].numpy(), compress=True)
    write_labels(folder / GZ_NAMES[1], data.train.labels[:n_train].numpy(), compress=True)
    write_images(folder / GZ_NAMES[2], data.test.images[:n_test].numpy(), compress=True)
    write_labels(folder / GZ_NAMES[3], data.test.labels[:n_test].numpy(), compress=True)
    return root
