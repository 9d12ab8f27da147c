"""Shared fixtures: where the real MNIST lives (and a skip when it is not there), an isolated data environment,
and real HTTP servers on 127.0.0.1 for the download tests."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mnistlab.data.idx import read_images, read_labels
from mnistlab.data.splits import load_data

from .support.idx_files import GZ_NAMES, write_dataset
from .support.mnist import fashion_dir, mnist_dir, subset
from .support.servers import serve_folder


@pytest.fixture(scope="session")
def mnist_path() -> Path:
    path = mnist_dir()
    if path is None:
        pytest.skip("real MNIST not found: set MNISTLAB_DATA to a folder with the IDX files")
    return path


@pytest.fixture(scope="session")
def mnist_data(mnist_path):
    """The real MNIST, loaded once per test session (default 5,000-image validation split, seed 0)."""

    return load_data("mnist", mnist_path)


@pytest.fixture(scope="session")
def small_mnist(mnist_data):
    """8,000 real training images with the first 2,000 of the validation and test splits."""
    return subset(mnist_data, 8000, 2000)


@pytest.fixture(scope="session")
def small_run(small_mnist, tmp_path_factory) -> Path:
    """seed-b-fixed trained for one epoch on `small_mnist`: a calibrated MLP with its outlier detector. Shared by
    the session: tests that change a run copy it first."""
    from mnistlab.config import load_config
    from mnistlab.train.loop import train

    out = tmp_path_factory.mktemp("small") / "seed-b-small"
    train(load_config("seed-b-fixed").with_overrides({"training.epochs": 1}), out_dir=out, data=small_mnist, quiet=True)
    return out


@pytest.fixture(scope="session")
def fashion_path() -> Path:
    """The real Fashion-MNIST's folder; skipped where it is missing."""
    path = fashion_dir()
    if path is None:
        pytest.skip("real Fashion-MNIST not found beside the checkout")
    return path


@pytest.fixture(scope="session")
def fashion_data():
    """The real Fashion-MNIST (500-image validation split), loaded once per session; skipped where it is missing."""
    if fashion_dir() is None:
        pytest.skip("real Fashion-MNIST not found beside the checkout")
    return load_data("fashion-mnist", fashion_dir(), val_size=500)


@pytest.fixture(scope="session")
def fashion_run(fashion_data, tmp_path_factory) -> Path:
    """fashion-mlp trained for one epoch on 5,000 real Fashion-MNIST training images: a model whose classes are
    words, the longest of them "T-shirt/top" and "Ankle boot"."""
    from mnistlab.config import load_config
    from mnistlab.train.loop import train

    run = tmp_path_factory.mktemp("fashion") / "fashion-mlp"
    config = load_config("fashion-mlp").with_overrides({"training.epochs": 1, "data.val_size": 500})
    train(config, out_dir=run, data=subset(fashion_data, 5000, 500), device="cpu", quiet=True)
    return run


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium (tests/support/browser.py)."""
    from .support.browser import launch_browser

    yield from launch_browser()


@pytest.fixture
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No test sees the caller's MNISTLAB_DATA or writes to the user's cache; returns the test's XDG cache."""
    monkeypatch.delenv("MNISTLAB_DATA", raising=False)
    xdg = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    return xdg


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(base URL, folder): a real HTTP server on 127.0.0.1 serving a fresh folder; unknown paths give 404."""
    folder = tmp_path / "www"
    folder.mkdir()
    with serve_folder(folder) as url:
        yield url, folder


@pytest.fixture(scope="module")
def real_dir(mnist_path: Path) -> Path:
    """conftest's real MNIST folder, when it holds all four original .gz files (served and checksummed here)."""
    missing = [name for name in GZ_NAMES if not (mnist_path / name).is_file()]
    if missing:
        pytest.skip(f"{mnist_path} lacks the original gzipped files {', '.join(missing)}")
    return mnist_path


@pytest.fixture(scope="module")
def real_mirror(real_dir: Path) -> Iterator[str]:
    """A base URL serving the real MNIST .gz files (the shared folder itself, byte for byte)."""
    with serve_folder(real_dir) as url:
        yield url


@pytest.fixture
def dead_url() -> Iterator[str]:
    """A base URL whose port is bound but not listening, so every connection is refused at once."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    finally:
        sock.close()


@pytest.fixture
def not_http_url() -> Iterator[str]:
    """A base URL whose server answers every request with bytes that are not HTTP, then hangs up."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    sock.settimeout(0.2)
    stop = threading.Event()

    def answer() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(2)
                try:
                    conn.recv(65536)
                    conn.sendall(b"this is not HTTP\r\n\r\n")
                except OSError:
                    pass

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    finally:
        stop.set()
        thread.join(timeout=5)
        sock.close()


@pytest.fixture(scope="session")
def digits(mnist_path: Path) -> np.ndarray:
    """The real MNIST *test* digits straight from the file, in file order."""
    return read_images(mnist_path / "t10k-images-idx3-ubyte.gz")


@pytest.fixture(scope="module")
def real_train(real_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The real training images and labels straight from the files, in file order."""
    return read_images(real_dir / GZ_NAMES[0]), read_labels(real_dir / GZ_NAMES[1])


@pytest.fixture
def small_data_dir(tmp_path: Path) -> Path:
    """A data folder with small valid MNIST-named files: 20 training and 7 test samples."""
    folder = tmp_path / "small"
    write_dataset(folder / "mnist", n_train=20, n_test=7)
    return folder
