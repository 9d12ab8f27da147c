"""Reading IDX files: valid files round-trip, every kind of broken file is a one-line MnistlabError."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mnistlab.data.idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx, read_images, read_labels
from mnistlab.errors import MnistlabError

from .support.idx_files import (
    error_text,
    gz,
    idx_bytes,
    random_images,
    random_labels,
    write,
    write_images,
    write_labels,
)

pytestmark = pytest.mark.usefixtures("isolated_env")  # no test sees the caller's MNISTLAB_DATA or cache

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
