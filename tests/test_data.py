"""Tests for mnistlab.data: IDX reading, file resolution, downloading from a local HTTP server, splits, batches.

Everything runs against the real code. Small IDX files are written by the tests into tmp_path; downloads go to
an http.server on 127.0.0.1. Tests that need the real MNIST use conftest's `mnist_path` / `mnist_data` ($MNISTLAB_DATA,
else ../shared/data/mnist beside the checkout) and skip when the files are not there.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import socket
import sys
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from mnistlab.data import (
    DATASETS,
    IMAGES_MAGIC,
    LABELS_MAGIC,
    DataFile,
    MnistData,
    Split,
    batches,
    cache_dir,
    dataset_info,
    download_file,
    load_data,
    read_idx,
    read_images,
    read_labels,
    resolve_files,
    to_float,
)
from mnistlab.errors import MnistlabError

MNIST = DATASETS["mnist"]
GZ_NAMES = [f.name for f in MNIST.files]  # train images, train labels, test images, test labels
RAW_NAMES = [name.removesuffix(".gz") for name in GZ_NAMES]


# ---------------------------------------------------------------------------------------------- helpers


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


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No test sees the caller's MNISTLAB_DATA or writes to the user's cache; returns the test's XDG cache."""
    monkeypatch.delenv("MNISTLAB_DATA", raising=False)
    xdg = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    return xdg


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def _serve(folder: Path) -> Iterator[str]:
    """A real ThreadingHTTPServer on 127.0.0.1 (a free port) serving `folder`; yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(base URL, folder): a real HTTP server on 127.0.0.1 serving a fresh folder; unknown paths give 404."""
    folder = tmp_path / "www"
    folder.mkdir()
    with _serve(folder) as url:
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
    with _serve(real_dir) as url:
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


# ---------------------------------------------------------------------------------------------- IDX: valid


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
def test_read_images_round_trips(tmp_path: Path, compress: bool) -> None:
    images = random_images(5)
    images[0] = 0
    images[1] = 255
    path = write_images(tmp_path / "images.idx", images, compress)
    got = read_images(path)
    assert got.dtype == np.uint8
    assert got.shape == (5, 28, 28)
    np.testing.assert_array_equal(got, images)


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
def test_read_labels_round_trips(tmp_path: Path, compress: bool) -> None:
    labels = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 0], dtype=np.uint8)
    path = write_labels(tmp_path / "labels.idx", labels, compress)
    got = read_labels(path)
    assert got.dtype == np.uint8
    assert got.shape == (12,)
    np.testing.assert_array_equal(got, labels)


def test_read_accepts_str_paths(tmp_path: Path) -> None:
    images = write_images(tmp_path / "i", random_images(2))
    labels = write_labels(tmp_path / "l", random_labels(2))
    assert read_images(str(images)).shape == (2, 28, 28)
    assert read_labels(str(labels)).shape == (2,)


def test_gzip_is_detected_by_content_not_name(tmp_path: Path) -> None:
    images = random_images(3)
    gz_without_suffix = write_images(tmp_path / "images-idx3-ubyte", images, compress=True)
    raw_with_gz_suffix = write_images(tmp_path / "images-idx3-ubyte.gz", images, compress=False)
    np.testing.assert_array_equal(read_images(gz_without_suffix), images)
    np.testing.assert_array_equal(read_images(raw_with_gz_suffix), images)


def test_read_idx_returns_header_shape_without_checking_28x28(tmp_path: Path) -> None:
    data = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = write(tmp_path / "small.idx", idx_bytes(IMAGES_MAGIC, (2, 3, 4), data))
    got = read_idx(path, IMAGES_MAGIC)
    assert got.shape == (2, 3, 4)
    np.testing.assert_array_equal(got, data)


def test_zero_count_files_are_valid(tmp_path: Path) -> None:
    images = write(tmp_path / "i", idx_bytes(IMAGES_MAGIC, (0, 28, 28), b""))
    labels = write(tmp_path / "l", idx_bytes(LABELS_MAGIC, (0,), b""), compress=True)
    assert read_images(images).shape == (0, 28, 28)
    assert read_labels(labels).shape == (0,)


# ---------------------------------------------------------------------------------------------- IDX: errors


def test_images_file_passed_to_read_labels(tmp_path: Path) -> None:
    path = write_images(tmp_path / "train-images-idx3-ubyte", random_images(2))
    with pytest.raises(MnistlabError) as excinfo:
        read_labels(path)
    msg = error_text(excinfo)
    assert str(path) in msg
    assert "bad magic number 2051" in msg
    assert "labels file has 2049" in msg


def test_labels_file_passed_to_read_images(tmp_path: Path) -> None:
    path = write_labels(tmp_path / "train-labels-idx1-ubyte.gz", random_labels(2), compress=True)
    with pytest.raises(MnistlabError) as excinfo:
        read_images(path)
    msg = error_text(excinfo)
    assert str(path) in msg
    assert "bad magic number 2049" in msg
    assert "images file has 2051" in msg


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
def test_truncated_data(tmp_path: Path, compress: bool) -> None:
    full = idx_bytes(IMAGES_MAGIC, (3, 28, 28), random_images(3))
    path = write(tmp_path / "images", full[:-100], compress)
    with pytest.raises(MnistlabError) as excinfo:
        read_images(path)
    msg = error_text(excinfo)
    assert str(path) in msg
    assert f"{len(full) - 100} bytes" in msg
    assert "(3, 28, 28)" in msg
    assert f"says {len(full)}" in msg
    assert "truncated" in msg


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
def test_extra_trailing_bytes(tmp_path: Path, compress: bool) -> None:
    full = idx_bytes(LABELS_MAGIC, (4,), np.array([1, 2, 3, 4]))
    path = write(tmp_path / "labels", full + b"\x00\x00\x00", compress)
    with pytest.raises(MnistlabError) as excinfo:
        read_labels(path)
    msg = error_text(excinfo)
    assert str(path) in msg
    assert f"{len(full) + 3} bytes" in msg
    assert "(4,)" in msg
    assert f"says {len(full)}" in msg
    assert "padded" in msg


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
def test_header_too_short(tmp_path: Path, compress: bool) -> None:
    path = write(tmp_path / "short", b"\x00\x00\x08\x03\x00", compress)
    with pytest.raises(MnistlabError) as excinfo:
        read_images(path)
    msg = error_text(excinfo)
    assert str(path) in msg
    assert "too short to be an IDX file (5 bytes)" in msg


def test_header_with_missing_dimensions(tmp_path: Path) -> None:
    # The magic promises 3 dimensions (a 16-byte header) but only the first dimension follows it.
    path = write(tmp_path / "images", IMAGES_MAGIC.to_bytes(4, "big") + (1).to_bytes(4, "big") + b"\x00\x00")
    with pytest.raises(MnistlabError) as excinfo:
        read_images(path)
    msg = error_text(excinfo)
    assert str(path) in msg
    assert "header truncated" in msg


@pytest.mark.parametrize(
    "content",
    [
        b"\x1f\x8b" + b"this is not deflate data at all" * 4,
        b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + b"\xff\xfe\xfd garbage" * 8,
        gz(idx_bytes(LABELS_MAGIC, (50,), random_labels(50)))[:-20],  # a gzip stream cut short
    ],
    ids=["bad-method", "bad-deflate", "truncated-stream"],
)
def test_corrupt_gzip(tmp_path: Path, content: bytes) -> None:
    path = write(tmp_path / "labels.gz", content)
    with pytest.raises(MnistlabError) as excinfo:
        read_labels(path)
    msg = error_text(excinfo)
    assert str(path) in msg
    assert "corrupt gzip data" in msg


@pytest.mark.parametrize("bad", [10, 255])
def test_label_out_of_range(tmp_path: Path, bad: int) -> None:
    path = write_labels(tmp_path / "labels", np.array([0, 9, bad, 3], dtype=np.uint8), compress=True)
    with pytest.raises(MnistlabError) as excinfo:
        read_labels(path)
    msg = error_text(excinfo)
    assert str(path) in msg
    assert f"label {bad} is out of range 0-9" in msg


@pytest.mark.parametrize("dims", [(2, 28, 27), (2, 32, 32), (1, 1, 784)])
def test_image_dims_not_28x28(tmp_path: Path, dims: tuple[int, int, int]) -> None:
    path = write(tmp_path / "images", idx_bytes(IMAGES_MAGIC, dims, bytes(int(np.prod(dims)))))
    with pytest.raises(MnistlabError) as excinfo:
        read_images(path)
    msg = error_text(excinfo)
    assert str(path) in msg
    assert f"images are {dims[1:]}" in msg
    assert "expected 28x28" in msg


@pytest.mark.parametrize("name", ["empty", "empty.gz"])
def test_empty_file(tmp_path: Path, name: str) -> None:
    path = write(tmp_path / name, b"")
    for reader in (read_images, read_labels):
        with pytest.raises(MnistlabError) as excinfo:
            reader(path)
        msg = error_text(excinfo)
        assert str(path) in msg
        assert "too short to be an IDX file (0 bytes)" in msg


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "train-images-idx3-ubyte.gz"
    with pytest.raises(MnistlabError) as excinfo:
        read_images(path)
    msg = error_text(excinfo)
    assert str(path) in msg
    assert "cannot read" in msg
    assert "No such file or directory" in msg


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(MnistlabError) as excinfo:
        read_labels(tmp_path)
    msg = error_text(excinfo)
    assert str(tmp_path) in msg
    assert "cannot read" in msg


# ---------------------------------------------------------------------------------------------- registry


def test_dataset_info() -> None:
    assert dataset_info("mnist") is MNIST
    assert [f.name for f in MNIST.files] == [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ]
    for name, info in DATASETS.items():
        assert info.name == name
        assert all(len(f.sha256) == 64 for f in info.files)
        assert 0 < info.mean < 1 and 0 < info.std < 1


def test_unknown_dataset_lists_the_known_ones() -> None:
    with pytest.raises(MnistlabError) as excinfo:
        dataset_info("cifar")
    msg = error_text(excinfo)
    assert "'cifar'" in msg
    for name in DATASETS:
        assert name in msg


def test_registry_checksums_match_the_real_files(real_dir: Path) -> None:
    for file in MNIST.files:
        content = (real_dir / file.name).read_bytes()
        assert sha256(content) == file.sha256, file.name
        assert sha256(gzip.decompress(content)) == file.raw_sha256, file.name


# ---------------------------------------------------------------------------------------------- finding files


@pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="XDG_CACHE_HOME is only used on other platforms")
def test_cache_dir_honours_xdg_cache_home(isolated_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cache_dir() == isolated_env / "mnistlab"
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "mnistlab"


def test_explicit_data_dir_beats_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = write_dataset(tmp_path / "explicit" / "mnist")
    from_env = write_dataset(tmp_path / "env" / "mnist")
    monkeypatch.setenv("MNISTLAB_DATA", str(tmp_path / "env"))
    assert resolve_files("mnist", tmp_path / "explicit", download=False) == explicit
    assert resolve_files("mnist", str(tmp_path / "explicit"), download=False) == explicit
    assert resolve_files("mnist", download=False) == from_env


def test_env_var_beats_cache(isolated_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cached = write_dataset(isolated_env / "mnistlab" / "mnist")
    from_env = write_dataset(tmp_path / "env" / "mnist")
    assert resolve_files("mnist", download=False) == cached
    monkeypatch.setenv("MNISTLAB_DATA", str(tmp_path / "env"))
    assert resolve_files("mnist", download=False) == from_env


def test_empty_env_var_counts_as_unset(isolated_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cached = write_dataset(isolated_env / "mnistlab" / "mnist")
    monkeypatch.setenv("MNISTLAB_DATA", "")
    assert resolve_files("mnist", download=False) == cached


@pytest.mark.parametrize(
    ("sub", "compress"),
    [("mnist", True), ("mnist", False), ("MNIST/raw", False), ("MNIST/raw", True)],
    ids=["dataset-subfolder-gz", "dataset-subfolder-raw", "torchvision-raw", "torchvision-gz"],
)
def test_layouts(tmp_path: Path, sub: str, compress: bool) -> None:
    root = tmp_path / "data"
    expected = write_dataset(root / sub, compress=compress)
    assert resolve_files("mnist", root, download=False) == expected


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "raw"])
def test_files_directly_in_the_folder_need_a_matching_checksum(tmp_path: Path, compress: bool) -> None:
    """All three datasets share file names: a file lying loose in the folder is taken only if its hash fits."""
    write_dataset(tmp_path, compress=compress)
    with pytest.raises(MnistlabError, match="not found"):
        resolve_files("mnist", tmp_path, download=False)


def test_real_files_directly_in_the_folder_are_found(mnist_path: Path) -> None:
    paths = resolve_files("mnist", mnist_path, download=False)
    assert [p.parent for p in paths] == [mnist_path] * 4
    with pytest.raises(MnistlabError):
        resolve_files("fashion-mnist", mnist_path, download=False)


def test_torchvision_layout_uses_each_datasets_folder_name(tmp_path: Path) -> None:
    expected = write_dataset(tmp_path / "FashionMNIST" / "raw", compress=False)
    assert resolve_files("fashion-mnist", tmp_path, download=False) == expected
    with pytest.raises(MnistlabError):
        resolve_files("mnist", tmp_path, download=False)


def test_resolved_files_are_in_registry_order(tmp_path: Path) -> None:
    write_dataset(tmp_path / "mnist")
    paths = resolve_files("mnist", tmp_path, download=False)
    assert [p.name for p in paths] == GZ_NAMES


def test_data_dir_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "folder"
    with pytest.raises(MnistlabError) as excinfo:
        resolve_files("mnist", missing, download=True, mirrors=["http://127.0.0.1:9/"])
    msg = error_text(excinfo)
    assert "data directory" in msg
    assert str(missing) in msg
    assert "does not exist" in msg
    assert not missing.exists()  # never created, never downloaded into


def test_data_dir_that_is_a_file(tmp_path: Path) -> None:
    a_file = write(tmp_path / "file", b"x")
    with pytest.raises(MnistlabError) as excinfo:
        resolve_files("mnist", a_file, download=False)
    assert str(a_file) in error_text(excinfo)


def test_env_var_folder_that_does_not_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "gone"
    monkeypatch.setenv("MNISTLAB_DATA", str(missing))
    with pytest.raises(MnistlabError) as excinfo:
        resolve_files("mnist", download=True, mirrors=["http://127.0.0.1:9/"])
    msg = error_text(excinfo)
    assert "MNISTLAB_DATA" in msg
    assert str(missing) in msg
    assert "does not exist" in msg


def test_missing_files_with_download_off(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(MnistlabError) as excinfo:
        resolve_files("mnist", root, download=False)
    msg = error_text(excinfo)
    assert str(root) in msg
    assert "download is off" in msg
    for name in GZ_NAMES:
        assert name in msg
    assert listing(root) == []


def test_one_missing_file_with_download_off(tmp_path: Path) -> None:
    root = tmp_path / "partial"
    write_dataset(root)[3].unlink()
    with pytest.raises(MnistlabError) as excinfo:
        resolve_files("mnist", root, download=False)
    assert "download is off" in error_text(excinfo)


def test_missing_cache_with_download_off(isolated_env: Path) -> None:
    with pytest.raises(MnistlabError) as excinfo:
        resolve_files("mnist", download=False)
    msg = error_text(excinfo)
    assert str(isolated_env / "mnistlab") in msg
    assert "download is off" in msg


def test_unknown_dataset_in_resolve_files(tmp_path: Path) -> None:
    with pytest.raises(MnistlabError) as excinfo:
        resolve_files("nope", tmp_path, download=False)
    assert "unknown dataset 'nope'" in error_text(excinfo)


# ---------------------------------------------------------------------------------------------- download_file


@pytest.fixture
def small_gz() -> tuple[bytes, bytes]:
    """(decompressed, gzipped) bytes of a small valid labels file."""
    content = idx_bytes(LABELS_MAGIC, (100,), random_labels(100, seed=7))
    return content, gz(content)


@pytest.mark.parametrize("slash", ["/", ""], ids=["trailing-slash", "no-trailing-slash"])
def test_download_good_file(served: tuple[str, Path], tmp_path: Path, small_gz, slash: str) -> None:
    url, www = served
    content, packed = small_gz
    (www / "labels.gz").write_bytes(packed)
    folder = tmp_path / "dl" / "nested"  # created on demand
    got = download_file(DataFile("labels.gz", sha256(packed)), folder, [url.rstrip("/") + slash])
    assert got == folder / "labels.gz"
    assert got.read_bytes() == packed
    assert listing(folder) == ["labels.gz"]  # no .part (or any other) temporary file left behind
    np.testing.assert_array_equal(read_labels(got), np.frombuffer(content, np.uint8, offset=8))


def test_download_replaces_a_stale_file(served: tuple[str, Path], tmp_path: Path, small_gz) -> None:
    url, www = served
    _, packed = small_gz
    (www / "labels.gz").write_bytes(packed)
    folder = tmp_path / "dl"
    write(folder / "labels.gz", b"stale")
    download_file(DataFile("labels.gz", sha256(packed)), folder, [url])
    assert (folder / "labels.gz").read_bytes() == packed
    assert listing(folder) == ["labels.gz"]


def test_download_corrupt_file_on_the_only_mirror(served: tuple[str, Path], tmp_path: Path, small_gz) -> None:
    url, www = served
    _, packed = small_gz
    (www / "labels.gz").write_bytes(packed[:-10] + b"corrupted!")
    folder = tmp_path / "dl"
    with pytest.raises(MnistlabError) as excinfo:
        download_file(DataFile("labels.gz", sha256(packed)), folder, [url])
    msg = error_text(excinfo)
    assert "could not download labels.gz" in msg
    assert f"{url}labels.gz" in msg
    assert "checksum mismatch" in msg
    assert listing(folder) == []  # no target, no partial, no temporary file


def test_download_corrupt_first_mirror_then_good(served: tuple[str, Path], tmp_path: Path, small_gz) -> None:
    url, www = served
    _, packed = small_gz
    write(www / "bad" / "labels.gz", b"\x1f\x8b not the file")
    write(www / "good" / "labels.gz", packed)
    folder = tmp_path / "dl"
    got = download_file(DataFile("labels.gz", sha256(packed)), folder, [url + "bad/", url + "good/"])
    assert got.read_bytes() == packed
    assert listing(folder) == ["labels.gz"]


def test_download_refused_first_mirror_then_good(
    served: tuple[str, Path], dead_url: str, tmp_path: Path, small_gz
) -> None:
    url, www = served
    _, packed = small_gz
    (www / "labels.gz").write_bytes(packed)
    folder = tmp_path / "dl"
    got = download_file(DataFile("labels.gz", sha256(packed)), folder, [dead_url, url], timeout=5)
    assert got.read_bytes() == packed
    assert listing(folder) == ["labels.gz"]


def test_download_404_first_mirror_then_good(served: tuple[str, Path], tmp_path: Path, small_gz) -> None:
    url, www = served
    _, packed = small_gz
    write(www / "good" / "labels.gz", packed)
    folder = tmp_path / "dl"
    got = download_file(DataFile("labels.gz", sha256(packed)), folder, [url + "missing/", url + "good/"])
    assert got.read_bytes() == packed
    assert listing(folder) == ["labels.gz"]


def test_download_all_mirrors_dead(served: tuple[str, Path], dead_url: str, tmp_path: Path) -> None:
    url, _ = served
    folder = tmp_path / "dl"
    with pytest.raises(MnistlabError) as excinfo:
        download_file(DataFile("labels.gz", "0" * 64), folder, [dead_url, url + "missing/"], timeout=5)
    msg = error_text(excinfo)
    assert "could not download labels.gz" in msg
    assert f"{dead_url}labels.gz" in msg
    assert "refused" in msg.lower()
    assert f"{url}missing/labels.gz" in msg
    assert "not found" in msg.lower()
    assert listing(folder) == []


def test_download_no_mirrors(tmp_path: Path) -> None:
    with pytest.raises(MnistlabError) as excinfo:
        download_file(DataFile("labels.gz", "0" * 64), tmp_path / "dl", [])
    assert "could not download labels.gz" in error_text(excinfo)


def test_recompressed_copy_accepted_with_raw_sha256(served: tuple[str, Path], tmp_path: Path, small_gz) -> None:
    url, www = served
    content, packed = small_gz
    recompressed = gz(content, level=1, mtime=123456)
    assert recompressed != packed
    (www / "labels.gz").write_bytes(recompressed)
    folder = tmp_path / "dl"
    got = download_file(DataFile("labels.gz", sha256(packed), sha256(content)), folder, [url])
    assert got.read_bytes() == recompressed
    assert gzip.decompress(got.read_bytes()) == content
    assert listing(folder) == ["labels.gz"]


def test_recompressed_copy_rejected_without_raw_sha256(served: tuple[str, Path], tmp_path: Path, small_gz) -> None:
    url, www = served
    content, packed = small_gz
    (www / "labels.gz").write_bytes(gz(content, level=1, mtime=123456))
    folder = tmp_path / "dl"
    with pytest.raises(MnistlabError) as excinfo:
        download_file(DataFile("labels.gz", sha256(packed)), folder, [url])
    assert "checksum mismatch" in error_text(excinfo)
    assert listing(folder) == []


@pytest.mark.parametrize("served_as", ["other-content"])
def test_raw_sha256_still_rejects_wrong_content(
    served: tuple[str, Path], tmp_path: Path, small_gz, served_as: str
) -> None:
    url, www = served
    content, packed = small_gz
    body = content if served_as == "uncompressed" else gz(content[:-1] + b"\x00")
    (www / "labels.gz").write_bytes(body)
    folder = tmp_path / "dl"
    with pytest.raises(MnistlabError) as excinfo:
        download_file(DataFile("labels.gz", sha256(packed), sha256(content)), folder, [url])
    assert "checksum mismatch" in error_text(excinfo)
    assert listing(folder) == []


def test_download_non_http_first_mirror_then_good(
    served: tuple[str, Path], not_http_url: str, tmp_path: Path, small_gz
) -> None:
    url, www = served
    _, packed = small_gz
    (www / "labels.gz").write_bytes(packed)
    folder = tmp_path / "dl"
    got = download_file(DataFile("labels.gz", sha256(packed)), folder, [not_http_url, url], timeout=5)
    assert got.read_bytes() == packed


# ------------------------------------------------------------------------------------------ resolve_files + download


def test_resolve_downloads_real_mnist_into_empty_data_dir(real_mirror: str, dead_url: str, tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    paths = resolve_files("mnist", root, mirrors=[dead_url, real_mirror])
    assert paths == [root / "mnist" / name for name in GZ_NAMES]
    assert listing(root / "mnist") == sorted(GZ_NAMES)  # exactly the four files, no temporaries
    for path, file in zip(paths, MNIST.files, strict=True):
        assert sha256(path.read_bytes()) == file.sha256

    # Found now, so nothing is fetched again: only dead mirrors are offered.
    mtimes = [p.stat().st_mtime_ns for p in paths]
    assert resolve_files("mnist", root, mirrors=[dead_url]) == paths
    assert [p.stat().st_mtime_ns for p in paths] == mtimes

    data = load_data("mnist", data_dir=root, val_size=1000, download=False)
    assert (len(data.train), len(data.val), len(data.test)) == (59000, 1000, 10000)


def test_resolve_downloads_into_the_cache(isolated_env: Path, real_mirror: str) -> None:
    paths = resolve_files("mnist", mirrors=[real_mirror])
    target = isolated_env / "mnistlab" / "mnist"
    assert paths == [target / name for name in GZ_NAMES]
    assert listing(target) == sorted(GZ_NAMES)
    assert resolve_files("mnist", download=False) == paths


def test_resolve_downloads_into_env_var_folder(tmp_path: Path, real_mirror: str, monkeypatch) -> None:
    root = tmp_path / "env"
    root.mkdir()
    monkeypatch.setenv("MNISTLAB_DATA", str(root))
    assert resolve_files("mnist", mirrors=[real_mirror]) == [root / "mnist" / name for name in GZ_NAMES]


def test_resolve_download_failure_leaves_data_dir_clean(served: tuple[str, Path], tmp_path: Path) -> None:
    url, www = served
    for name in GZ_NAMES:
        (www / name).write_bytes(gz(b"not MNIST"))
    root = tmp_path / "data"
    root.mkdir()
    with pytest.raises(MnistlabError) as excinfo:
        resolve_files("mnist", root, mirrors=[url])
    msg = error_text(excinfo)
    assert f"could not download {GZ_NAMES[0]}" in msg
    assert "checksum mismatch" in msg
    assert listing(root) == []


def test_datasets_sharing_a_data_dir_do_not_mix(real_mirror: str, tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    mnist_paths = resolve_files("mnist", root, mirrors=[real_mirror])
    try:
        fashion_paths = resolve_files("fashion-mnist", root, download=False)
    except MnistlabError:
        return  # "not found, download is off" is a correct answer too
    assert set(fashion_paths).isdisjoint(mnist_paths)


# ---------------------------------------------------------------------------------------------- load_data: small files


def test_load_small_data(small_data_dir: Path) -> None:
    data = load_data("mnist", data_dir=small_data_dir, val_size=5, download=False)
    assert isinstance(data, MnistData)
    assert data.name == "mnist"
    assert (data.mean, data.std) == (MNIST.mean, MNIST.std)
    assert data.val is not None
    assert (len(data.train), len(data.val), len(data.test)) == (15, 5, 7)
    for split in (data.train, data.val, data.test):
        assert split.images.dtype == torch.uint8
        assert split.labels.dtype == torch.int64
        assert split.images.shape == (len(split), 28, 28)
        assert split.images.device.type == "cpu"
    np.testing.assert_array_equal(data.test.images.numpy(), random_images(7, 3))
    np.testing.assert_array_equal(data.test.labels.numpy(), random_labels(7, 4))
    # train and val together are exactly the training file, each sample once, images paired with labels.
    all_images = torch.cat([data.train.images, data.val.images])
    all_labels = torch.cat([data.train.labels, data.val.labels])
    np.testing.assert_array_equal(
        row_fingerprints(all_images, all_labels),
        row_fingerprints(random_images(20, 1), random_labels(20, 2)),
    )


def test_load_small_data_seeds(small_data_dir: Path) -> None:
    def val_and_train_images(seed: int) -> tuple[np.ndarray, np.ndarray]:
        data = load_data("mnist", data_dir=small_data_dir, val_size=10, seed=seed, download=False)
        return data.val.images.numpy(), data.train.images.numpy()

    a, b, c = val_and_train_images(3), val_and_train_images(3), val_and_train_images(4)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_load_small_data_without_val(small_data_dir: Path) -> None:
    data = load_data("mnist", data_dir=small_data_dir, val_size=0, download=False)
    assert data.val is None
    np.testing.assert_array_equal(data.train.images.numpy(), random_images(20, 1))
    np.testing.assert_array_equal(data.train.labels.numpy(), random_labels(20, 2))
    assert data.to("cpu").val is None


@pytest.mark.parametrize("val_size", [20, 21, -1])
def test_load_small_data_bad_val_size(small_data_dir: Path, val_size: int) -> None:
    with pytest.raises(MnistlabError) as excinfo:
        load_data("mnist", data_dir=small_data_dir, val_size=val_size, download=False)
    assert f"validation size {val_size} must be between 0 and 19" in error_text(excinfo)


def test_load_largest_val_size(small_data_dir: Path) -> None:
    data = load_data("mnist", data_dir=small_data_dir, val_size=19, download=False)
    assert (len(data.train), len(data.val)) == (1, 19)


def test_load_images_and_labels_of_different_length(tmp_path: Path) -> None:
    root = tmp_path / "data"
    paths = write_dataset(root / "mnist", n_train=6)
    write_labels(paths[1], random_labels(5), compress=True)
    with pytest.raises(MnistlabError) as excinfo:
        load_data("mnist", data_dir=root, download=False)
    msg = error_text(excinfo)
    assert f"{paths[0]} has 6 images" in msg
    assert f"{paths[1]} has 5 labels" in msg


def test_load_reports_a_bad_file(tmp_path: Path) -> None:
    root = tmp_path / "data"
    paths = write_dataset(root / "mnist")
    write_labels(paths[3], np.array([1, 2, 11, 3], dtype=np.uint8), compress=True)
    with pytest.raises(MnistlabError) as excinfo:
        load_data("mnist", data_dir=root, download=False)
    assert str(paths[3]) in error_text(excinfo)
    assert "label 11 is out of range" in error_text(excinfo)


def test_split_to_and_len() -> None:
    split = Split(torch.zeros(3, 28, 28, dtype=torch.uint8), torch.arange(3))
    assert len(split) == 3
    moved = split.to("cpu")
    assert isinstance(moved, Split)
    assert torch.equal(moved.labels, split.labels)


# ---------------------------------------------------------------------------------------------- load_data: real MNIST


def test_real_mnist_shapes_and_types(mnist_data: MnistData) -> None:
    assert mnist_data.name == "mnist"
    assert mnist_data.val is not None
    assert mnist_data.train.images.shape == (55000, 28, 28)
    assert mnist_data.val.images.shape == (5000, 28, 28)
    assert mnist_data.test.images.shape == (10000, 28, 28)
    for split in (mnist_data.train, mnist_data.val, mnist_data.test):
        assert split.images.dtype == torch.uint8
        assert split.labels.dtype == torch.int64
        assert split.labels.shape == (len(split.images),)
        assert int(split.labels.min()) == 0 and int(split.labels.max()) == 9
    assert (mnist_data.mean, mnist_data.std) == (0.1307, 0.3081)


def test_real_mnist_pixel_statistics_match_the_registry(real_train: tuple[np.ndarray, np.ndarray]) -> None:
    pixels = real_train[0].ravel()
    counts = np.bincount(pixels, minlength=256)  # exact integer statistics, without a float copy of 47M pixels
    values = np.arange(256) / 255.0
    mean = (counts * values).sum() / pixels.size
    std = np.sqrt((counts * (values - mean) ** 2).sum() / pixels.size)
    assert mean == pytest.approx(MNIST.mean, abs=1e-4)
    assert std == pytest.approx(MNIST.std, abs=1e-4)


def test_real_mnist_train_and_val_partition_the_training_file(
    mnist_data: MnistData, real_train: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = real_train
    assert len(mnist_data.train) + len(mnist_data.val) == 60000
    joined_labels = torch.cat([mnist_data.train.labels, mnist_data.val.labels]).numpy()
    np.testing.assert_array_equal(np.bincount(joined_labels, minlength=10), np.bincount(labels, minlength=10))
    # Stronger: the multiset of (image, label) pairs is the file's, so every sample is used exactly once.
    joined = row_fingerprints(
        torch.cat([mnist_data.train.images, mnist_data.val.images]),
        torch.cat([mnist_data.train.labels, mnist_data.val.labels]),
    )
    np.testing.assert_array_equal(joined, row_fingerprints(images, labels))


def test_real_mnist_seeds(mnist_data: MnistData, real_dir: Path) -> None:
    same = load_data("mnist", data_dir=real_dir, seed=0, download=False)
    assert torch.equal(same.val.images, mnist_data.val.images)
    assert torch.equal(same.val.labels, mnist_data.val.labels)
    assert torch.equal(same.train.labels, mnist_data.train.labels)
    other = load_data("mnist", data_dir=real_dir, seed=1, download=False)
    assert not torch.equal(other.val.labels, mnist_data.val.labels)
    assert not torch.equal(other.val.images, mnist_data.val.images)
    assert torch.equal(other.test.images, mnist_data.test.images)  # the test split never depends on the seed


def test_real_mnist_without_val(real_dir: Path, real_train: tuple[np.ndarray, np.ndarray]) -> None:
    data = load_data("mnist", data_dir=real_dir, val_size=0, download=False)
    assert data.val is None
    assert data.train.images.shape == (60000, 28, 28)
    assert data.test.images.shape == (10000, 28, 28)
    np.testing.assert_array_equal(data.train.images.numpy(), real_train[0])  # file order, untouched
    np.testing.assert_array_equal(data.train.labels.numpy(), real_train[1])


def test_real_mnist_val_size_too_large(real_dir: Path) -> None:
    with pytest.raises(MnistlabError) as excinfo:
        load_data("mnist", data_dir=real_dir, val_size=60000, download=False)
    assert "validation size 60000 must be between 0 and 59999" in error_text(excinfo)


# ---------------------------------------------------------------------------------------------- batches


def indexed_split(n: int) -> Split:
    """A split whose image i holds i in its first two pixels (and whose label is i), to track every sample."""
    index = torch.arange(n)
    images = torch.zeros(n, 28, 28, dtype=torch.uint8)
    images[:, 0, 0] = (index // 256).to(torch.uint8)
    images[:, 0, 1] = (index % 256).to(torch.uint8)
    return Split(images, index.clone())


def image_index(images: torch.Tensor) -> torch.Tensor:
    return images[:, 0, 0].long() * 256 + images[:, 0, 1].long()


def order_of(split: Split, batch_size: int, generator: torch.Generator | None) -> list[int]:
    order: list[int] = []
    for batch in batches(split, batch_size, generator):
        assert torch.equal(image_index(batch.images), batch.labels)  # images stay paired with their labels
        order += batch.labels.tolist()
    return order


def test_batches_in_order_without_generator() -> None:
    split = indexed_split(103)
    got = list(batches(split, 10))
    assert all(isinstance(b, Split) for b in got)
    assert [len(b) for b in got] == [10] * 10 + [3]  # the last batch is the remainder
    assert order_of(split, 10, None) == list(range(103))


@pytest.mark.parametrize(("n", "batch_size", "sizes"), [(100, 10, [10] * 10), (5, 8, [5]), (0, 4, []), (1, 1, [1])])
def test_batch_sizes(n: int, batch_size: int, sizes: list[int]) -> None:
    split = indexed_split(n)
    assert [len(b) for b in batches(split, batch_size)] == sizes
    assert [len(b) for b in batches(split, batch_size, torch.Generator().manual_seed(0))] == sizes


def test_batches_with_generator_cover_every_index_once_per_epoch() -> None:
    split = indexed_split(300)  # more than 256, so both index bytes matter
    generator = torch.Generator().manual_seed(0)
    epochs = []
    for _ in range(3):
        got = list(batches(split, 32, generator))
        assert [len(b) for b in got] == [32] * 9 + [12]
        order = [i for b in got for i in image_index(b.images).tolist()]
        assert sorted(order) == list(range(300))
        epochs.append(order)
    assert epochs[0] != list(range(300))  # actually shuffled
    assert epochs[0] != epochs[1]  # a fresh permutation every epoch


def test_batches_seeded_generators_reproduce_the_order() -> None:
    split = indexed_split(250)
    g1, g2, g3 = (torch.Generator().manual_seed(s) for s in (42, 42, 43))
    first = [order_of(split, 16, g1) for _ in range(2)]
    second = [order_of(split, 16, g2) for _ in range(2)]
    assert first == second
    assert order_of(split, 16, g3) != first[0]


def test_batches_do_not_change_the_split() -> None:
    split = indexed_split(50)
    before = split.images.clone(), split.labels.clone()
    list(batches(split, 7, torch.Generator().manual_seed(0)))
    assert torch.equal(split.images, before[0]) and torch.equal(split.labels, before[1])


# ---------------------------------------------------------------------------------------------- to_float


def test_to_float_scales_to_unit_range() -> None:
    images = torch.tensor([[0, 255], [128, 1]], dtype=torch.uint8)
    x = to_float(images)
    assert x.dtype == torch.float32
    assert x.shape == images.shape
    assert x[0, 0].item() == 0.0 and x[0, 1].item() == 1.0
    assert x[1, 0].item() == pytest.approx(128 / 255)
    assert images.dtype == torch.uint8 and images.tolist() == [[0, 255], [128, 1]]  # input untouched


def test_to_float_normalizes() -> None:
    images = torch.tensor([0, 51, 255], dtype=torch.uint8)
    mean, std = MNIST.mean, MNIST.std
    x = to_float(images, (mean, std))
    assert x.dtype == torch.float32
    expected = (torch.tensor([0, 51, 255], dtype=torch.float32) / 255 - mean) / std
    torch.testing.assert_close(x, expected)
    torch.testing.assert_close(to_float(images, (0.5, 0.5)), torch.tensor([-1.0, 51 / 255 * 2 - 1, 1.0]))


def test_to_float_on_a_batch() -> None:
    split = indexed_split(10)
    batch = next(batches(split, 4))
    x = to_float(batch.images, (0.0, 1.0))
    assert x.shape == (4, 28, 28)
    torch.testing.assert_close(x, batch.images.float() / 255)
