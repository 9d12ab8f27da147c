"""Finding and downloading dataset files: the registry, the data folder's layouts, mirrors served by a real HTTP
server on 127.0.0.1, checksums, and what is left behind when a download fails."""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import numpy as np
import pytest

from mnistlab.data.download import cache_dir, download_file, resolve_files
from mnistlab.data.idx import LABELS_MAGIC, read_labels
from mnistlab.data.splits import load_data
from mnistlab.datasets import DATASETS, DataFile, dataset_info
from mnistlab.errors import MnistlabError

from .support.idx_files import (
    GZ_NAMES,
    MNIST,
    error_text,
    gz,
    idx_bytes,
    listing,
    random_labels,
    sha256,
    write,
    write_dataset,
)

pytestmark = pytest.mark.usefixtures("isolated_env")  # no test sees the caller's MNISTLAB_DATA or cache

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
