"""MNIST-format data: IDX files, the dataset registry, finding or downloading files, and in-memory splits.

A split is one uint8 tensor (N, 28, 28) plus int64 labels, moved once to the training device. Training takes
batches by indexing with a seeded permutation and converts each whole batch to float at once, so no per-sample
Python runs in the hot loop.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import os
import sys
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mnistlab.errors import MnistlabError
from mnistlab.files import replacing

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


# ---------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class DataFile:
    name: str  # as served by the mirrors, gzipped
    sha256: str  # of the gzipped file
    raw_sha256: str = ""  # of the decompressed content, where known (accepts a re-compressed copy too)


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    torchvision_dir: str  # torchvision keeps files in <root>/<this>/raw/
    mirrors: tuple[str, ...]
    train_images: DataFile
    train_labels: DataFile
    test_images: DataFile
    test_labels: DataFile
    mean: float  # of training pixels in [0, 1], for optional normalisation
    std: float
    classes: tuple[str, ...] = tuple(str(d) for d in range(10))  # what each label means, in label order

    @property
    def files(self) -> tuple[DataFile, ...]:
        return (self.train_images, self.train_labels, self.test_images, self.test_labels)


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(
        name="mnist",
        torchvision_dir="MNIST",
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        train_images=DataFile(
            "train-images-idx3-ubyte.gz",
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        ),
        train_labels=DataFile(
            "train-labels-idx1-ubyte.gz",
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        ),
        test_images=DataFile(
            "t10k-images-idx3-ubyte.gz",
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        ),
        test_labels=DataFile(
            "t10k-labels-idx1-ubyte.gz",
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
            "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        ),
        mean=0.1307,
        std=0.3081,
    ),
    "fashion-mnist": DatasetInfo(
        name="fashion-mnist",
        torchvision_dir="FashionMNIST",
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        train_images=DataFile(
            "train-images-idx3-ubyte.gz",
            "08dc20ab1689590a0bcd66e874647b6ee8464e2d501b5a3f1f78831db19a3fdc",
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        ),
        train_labels=DataFile(
            "train-labels-idx1-ubyte.gz",
            "b0197879cbda89f3dc7b894f9fd52b858e68ea4182b6947c9d8c2b67e5f18dcc",
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        ),
        test_images=DataFile(
            "t10k-images-idx3-ubyte.gz",
            "78dcbbfb5a27efaf1b6c1d616caca68560be8766c5bffcb2791df9273a534229",
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        ),
        test_labels=DataFile(
            "t10k-labels-idx1-ubyte.gz",
            "42bd18137a62d5998cdeae52bf3a0676ac6b706f5cf8439b47bb5b151ae3dccf",
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        ),
        mean=0.2860,
        std=0.3530,
        classes=tuple(
            ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
        ),
    ),
    "kmnist": DatasetInfo(
        name="kmnist",
        torchvision_dir="KMNIST",
        mirrors=("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
        train_images=DataFile(
            "train-images-idx3-ubyte.gz", "51467d22d8cc72929e2a028a0428f2086b092bb31cfb79c69cc0a90ce135fde4"
        ),
        train_labels=DataFile(
            "train-labels-idx1-ubyte.gz", "e38f9ebcd0f3ebcdec7fc8eabdcdaef93bb0df8ea12bee65224341c8183d8e17"
        ),
        test_images=DataFile(
            "t10k-images-idx3-ubyte.gz", "edd7a857845ad6bb1d0ba43fe7e794d164fe2dce499a1694695a792adfac43c5"
        ),
        test_labels=DataFile(
            "t10k-labels-idx1-ubyte.gz", "20bb9a0ef54c7db3efc55a92eef5582c109615df22683c380526788f98e42a1c"
        ),
        mean=0.1918,
        std=0.3483,
        # Kuzushiji (cursive) hiragana, one per class, in KMNIST's label order.
        classes=("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
    ),
}


def dataset_info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise MnistlabError(f"unknown dataset {name!r} (known: {', '.join(DATASETS)})") from None


# ---------------------------------------------------------------------------------------------- finding files


def cache_dir() -> Path:
    """The per-user cache folder for downloads, following each platform's convention."""
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "mnistlab"


def _find_file(root: Path, info: DatasetInfo, file: DataFile) -> Path | None:
    """A file in `root/<dataset>/` or torchvision's `root/<Name>/raw/` (gz or not), else in `root` itself.

    MNIST, Fashion-MNIST and KMNIST share file names, so a file lying directly in `root` is taken only when
    its checksum says it belongs to this dataset.
    """
    names = (file.name, file.name.removesuffix(".gz"))
    for folder in (root / info.name, root / info.torchvision_dir / "raw"):
        for name in names:
            if (folder / name).is_file():
                return folder / name
    for name in names:
        if (root / name).is_file() and _checksum_ok(root / name, file):
            return root / name
    return None


def resolve_files(
    dataset: str = "mnist",
    data_dir: str | Path | None = None,
    download: bool = True,
    mirrors: Sequence[str] | None = None,
) -> list[Path]:
    """The four files of `dataset`, in the order train images, train labels, test images, test labels.

    Looks in `data_dir` when given, else in `$MNISTLAB_DATA` when set, else in the user cache; files missing
    there are downloaded into its `<dataset>/` folder (unless `download` is false). A named folder that does
    not exist is an error, never silently replaced by another.
    """
    info = dataset_info(dataset)
    env = os.environ.get("MNISTLAB_DATA")
    if data_dir is not None:
        root, origin = Path(data_dir), "data directory"
    elif env:
        root, origin = Path(env), "MNISTLAB_DATA"
    else:
        root, origin = cache_dir(), ""
    if origin and root.is_file():
        raise MnistlabError(f"{origin} {root} is a file; point it at the folder that holds the {dataset} files")
    if origin and not root.is_dir():
        raise MnistlabError(f"{origin} {root} does not exist (point it at a folder with the {dataset} files)")
    found = [_find_file(root, info, f) for f in info.files]
    missing = [f for f, path in zip(info.files, found) if path is None]
    if missing and not download:
        names = ", ".join(f.name for f in missing)
        raise MnistlabError(f"{dataset} files not found in {root} (missing {names}) and download is off")
    sources = info.mirrors if mirrors is None else mirrors
    paths = []
    for file, path in zip(info.files, found):
        if path is None:
            try:
                path = download_file(file, root / info.name, sources)
            except MnistlabError as exc:
                raise MnistlabError(f"{exc}. {_where_files_go(root, info, file)}") from None
        paths.append(path)
    return paths


def _where_files_go(root: Path, info: DatasetInfo, file: DataFile) -> str:
    """What to do when a file is neither found nor downloadable: where it was looked for, and what was there."""
    names = (file.name, file.name.removesuffix(".gz"))
    near = [root / n for n in names if (root / n).is_file()]
    found = (
        f"{near[0]} is there but is not {info.name}'s {file.name} (checksum differs: truncated, or another dataset?). "
        if near
        else ""
    )
    return (
        f"{found}Without a network, put the four {info.name} files ({', '.join(f.name for f in info.files)}; "
        f"gzipped or not) in {root / info.name}/ or torchvision's {root / info.torchvision_dir / 'raw'}/, "
        "and give that root with --data-dir or MNISTLAB_DATA"
    )


def _checksum_ok(path: Path, file: DataFile) -> bool:
    """Whether `path` holds `file`: its bytes match the gzip's SHA-256, or its (decompressed) content the raw one."""
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() == file.sha256:
        return True
    if not file.raw_sha256:
        return False
    if data[:2] == GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error):
            return False
    return hashlib.sha256(data).hexdigest() == file.raw_sha256


# ---------------------------------------------------------------------------------------------- download


class _ChecksumMismatch(Exception):
    pass


def _fetch(url: str, out: Path, timeout: float, label: str) -> None:
    """Stream `url` into `out`, with a progress bar on a terminal."""
    with out.open("wb") as f, urllib.request.urlopen(url, timeout=timeout) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=label, disable=not sys.stderr.isatty()) as bar:
            while chunk := response.read(1 << 16):
                f.write(chunk)
                bar.update(len(chunk))


def download_file(file: DataFile, folder: Path, mirrors: Sequence[str], timeout: float = 30.0) -> Path:
    """Fetch `file` from the first mirror that serves it intact, into `folder`, atomically.

    Streams to a temporary file in `folder` with a progress bar, checks SHA-256, then renames into place. A
    checksum mismatch tries the next mirror; nothing partial or corrupt is ever left behind.
    """
    created = not folder.exists()
    target = folder / file.name
    failures = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + file.name
        try:
            with replacing(target) as tmp:
                _fetch(url, tmp, timeout, file.name)
                if not _checksum_ok(tmp, file):
                    raise _ChecksumMismatch
            return target
        except _ChecksumMismatch:
            failures.append(f"{url}: checksum mismatch")
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
            failures.append(f"{url}: {getattr(exc, 'reason', exc)}")
    if created:
        with contextlib.suppress(OSError):  # leave no trace of a failed download (unless another process wrote there)
            folder.rmdir()
    raise MnistlabError(f"could not download {file.name}: " + "; ".join(failures))


# ---------------------------------------------------------------------------------------------- splits


@dataclass
class Split:
    """One split held in memory: uint8 images (N, 28, 28) and int64 labels (N,), on one device."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, rows: slice) -> Split:
        """A contiguous part of the split, as views (no copy)."""
        return Split(self.images[rows], self.labels[rows])

    def to(self, device: torch.device | str) -> Split:
        return Split(self.images.to(device), self.labels.to(device))


@dataclass
class MnistData:
    """Train, validation (possibly empty) and test splits of one dataset, plus its pixel statistics."""

    name: str
    train: Split
    val: Split | None
    test: Split
    mean: float
    std: float

    def to(self, device: torch.device | str) -> MnistData:
        val = self.val.to(device) if self.val is not None else None
        return MnistData(self.name, self.train.to(device), val, self.test.to(device), self.mean, self.std)


def load_data(
    dataset: str = "mnist",
    data_dir: str | Path | None = None,
    val_size: int = 5000,
    seed: int = 0,
    device: torch.device | str = "cpu",
    download: bool = True,
) -> MnistData:
    """Load a dataset's splits onto `device`, carving a seeded validation split from the training set."""
    train_images, train_labels, test_images, test_labels = resolve_files(dataset, data_dir, download)
    train = _split(train_images, train_labels)
    test = _split(test_images, test_labels)
    if not 0 <= val_size < len(train):
        raise MnistlabError(f"validation size {val_size} must be between 0 and {len(train) - 1}")
    val = None
    if val_size:
        # The validation split depends on `seed` only, so every config with the same seed sees the same one.
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
        val = Split(train.images[order[:val_size]], train.labels[order[:val_size]])
        train = Split(train.images[order[val_size:]], train.labels[order[val_size:]])
    info = DATASETS[dataset]
    return MnistData(dataset, train, val, test, info.mean, info.std).to(device)


def _split(images_path: Path, labels_path: Path) -> Split:
    images, labels = read_images(images_path), read_labels(labels_path)
    if len(images) != len(labels):
        raise MnistlabError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    return Split(torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)))


def to_float(images: torch.Tensor, normalize: tuple[float, float] | None = None) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1] (ToTensor's scaling), optionally standardised by (mean, std)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"to_float takes uint8 images, got {images.dtype}")
    x = images.to(torch.float32).div_(255.0)  # a new tensor, so the in-place steps are safe
    return standardize_(x, normalize)


def standardize_(x: torch.Tensor, normalize: tuple[float, float] | None) -> torch.Tensor:
    """(x - mean) / std in place when `normalize` is given; x unchanged otherwise."""
    if normalize is not None:
        mean, std = normalize
        x.sub_(mean).div_(std)
    return x


def batch_indices(
    n: int, batch_size: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> Iterator[torch.Tensor]:
    """The indices of each batch of `n` items: shuffled by a permutation drawn from `generator`, in order without
    it. Every process of a distributed training draws the same permutation and takes its share of each batch."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    order = order.to(device)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def take(split: Split, index: torch.Tensor) -> Split:
    """The rows `index` of `split`. index_select rather than images[idx]: the same rows, about 6x faster on a CPU
    for a batch of 64."""
    return Split(split.images.index_select(0, index), split.labels.index_select(0, index))


def batches(split: Split, batch_size: int, generator: torch.Generator | None = None) -> Iterator[Split]:
    """Batches of `split` by index: shuffled by a permutation drawn from `generator`, in order without it."""
    if generator is None:
        for start in range(0, len(split), batch_size):
            yield Split(split.images[start : start + batch_size], split.labels[start : start + batch_size])
        return
    for index in batch_indices(len(split), batch_size, generator, split.images.device):
        yield take(split, index)
