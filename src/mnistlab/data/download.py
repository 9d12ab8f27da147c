"""Finding a data set's files on disk (ours or torchvision's layout), else downloading them with checksums."""

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
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from mnistlab.data.idx import GZIP_MAGIC
from mnistlab.datasets import DataFile, DatasetInfo, dataset_info
from mnistlab.errors import MnistlabError
from mnistlab.files import replacing


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
