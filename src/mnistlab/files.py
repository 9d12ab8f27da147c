"""Files and folders: atomic writes (a crash or a failed check leaves the old file, or none, never half of a new
one), JSON that is always valid JSON, and output folders checked and locked before any work."""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, ClassVar

from mnistlab.errors import MnistlabError

LOCK = ".lock"
_HELD = (signal.SIGINT, signal.SIGTERM)  # what signals_held defers


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def describe_os_error(path: Path | str, exc: OSError) -> MnistlabError:
    """A one-line error for a failed write or folder creation, naming the path and the reason."""
    reason = {
        errno.EROFS: "read-only file system",
        errno.ENOSPC: "no space left on the device",
        errno.EFBIG: "file too large for this file system or process limit",
        errno.EACCES: "permission denied",
        errno.ENOTDIR: "a part of this path is a file, not a folder",
        errno.EEXIST: "exists and is not a folder",
    }.get(exc.errno or 0, exc.strerror or str(exc))
    return MnistlabError(f"{path}: cannot write ({reason})")


def make_dirs(path: Path) -> Path:
    """`mkdir -p`, with a one-line error where it cannot be made (read-only mount, a file in the way)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise MnistlabError(f"{path}: exists and is not a folder") from None
    except OSError as exc:
        raise describe_os_error(path, exc) from None
    return path


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; when the block ends without an exception it becomes
    `path` (one rename, with the permissions a plain new file gets), otherwise it is removed.

    Failures of the file system (read-only, full, over a size limit) become one-line MnistlabErrors.
    """
    make_dirs(path.parent)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise describe_os_error(path, exc) from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private; these are ordinary outputs
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.ENOSPC, errno.EFBIG, errno.EACCES, errno.EDQUOT):
            raise describe_os_error(path, exc) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM arriving inside the block take effect only once it is done, as they would have then:
    for writes of several files that must agree (a checkpoint and the metrics that describe it). Signals reach
    only the main thread; in any other the block just runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _: caught.append(signum)) for sig in _HELD}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        for sig in dict.fromkeys(caught):
            signal.raise_signal(sig)


def atomic_write_text(path: Path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def finite_json(data: Any) -> Any:
    """`data` with every non-finite float replaced by None: NaN and infinity are not JSON."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_json(v) for v in data]
    return data


def to_json(data: Any, indent: int | None = None) -> str:
    """Strict JSON (non-finite floats as null), as any JSON reader accepts it."""
    return json.dumps(finite_json(data), indent=indent, allow_nan=False)


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, to_json(data, indent=2) + "\n")


def is_empty_output(path: Path) -> bool:
    """Whether `path` is missing or an empty folder (a folder holding only a lock file counts as empty)."""
    if not path.exists():
        return True
    return path.is_dir() and all(p.name == LOCK for p in path.iterdir())


def check_output_dir(out_dir: str | Path, force: bool) -> Path:
    """Refuse, before any work, to overwrite an existing non-empty folder (or a file) without `force`, or to
    write under a file."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir() and not force:
        raise MnistlabError(f"{out} exists and is a file (use --force to replace it, or another --out)")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise MnistlabError(f"{out}: cannot write under {parent}, which is a file")
    if not is_empty_output(out) and not force:
        raise MnistlabError(f"{out} already exists and is not empty (use --force to overwrite, or another --out)")
    return out


def clear_dir(out: Path) -> Path:
    """An empty folder at `out`, replacing what was there but its lock file (checked by `check_output_dir`)."""
    try:
        if out.exists() and not out.is_dir():
            out.unlink()
        out.mkdir(parents=True, exist_ok=True)
        for child in out.iterdir():
            if child.name == LOCK:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    except OSError as exc:
        raise describe_os_error(out, exc) from None
    return out


class FolderLock:
    """An exclusive lock on an output folder, held by whatever writes it, for as long as it writes.

    A lock file (`.lock`) inside the folder is locked with `flock`: the kernel releases it when the process
    ends however it ends, so a crashed command never leaves a stale lock. A second writer is refused at once.
    Released, the lock file is removed, and so is the folder if the lock made it and nothing was written.
    Within one process the lock nests: a sweep holds its trial's folder while `train` writes it.
    """

    _held: ClassVar[dict[tuple[int, Path], int]] = {}  # (pid, folder) -> depth, for the locks this process holds

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._fd: int | None = None
        self._created = False
        self._nested = False

    def _key(self) -> tuple[int, Path]:
        return os.getpid(), self.folder.resolve()

    def acquire(self) -> FolderLock:
        key = self._key()
        if key in FolderLock._held:
            FolderLock._held[key] += 1
            self._nested = True
            return self
        self._created = not self.folder.exists()
        make_dirs(self.folder)
        path = self.folder / LOCK
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
            except OSError as exc:
                raise describe_os_error(path, exc) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise MnistlabError(
                    f"{self.folder} is being written by another mnistlab command ({holder}); wait for it to "
                    "finish, or choose another --out"
                ) from None
            # The last holder removes the file on release: if it did so between our open and our flock, we
            # hold a lock on a file no one else will open, so try again on the new one.
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}".encode())
        self._fd = fd
        FolderLock._held[key] = 1
        return self

    def release(self) -> None:
        if self._nested:
            FolderLock._held[self._key()] -= 1
            self._nested = False
            return
        if self._fd is None:
            return
        FolderLock._held.pop(self._key(), None)
        with suppress(OSError):
            (self.folder / LOCK).unlink()
        os.close(self._fd)  # closing the descriptor releases the flock
        self._fd = None
        if self._created:
            with suppress(OSError):
                self.folder.rmdir()  # only succeeds when nothing was written

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
