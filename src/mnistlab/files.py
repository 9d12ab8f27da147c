"""Files and folders: atomic writes (a crash or a failed check leaves the old file, or none, never half of a new
one), JSON that is always valid JSON, output folders checked and locked before any work, and Ctrl-C or SIGTERM
held back while a write must finish."""

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
from typing import Any, ClassVar, Self

from mnistlab.errors import MnistlabError

LOCK = ".lock"


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


class Terminated(KeyboardInterrupt):
    """SIGTERM, or SIGHUP (a closed terminal), handled like Ctrl-C: the command stops at once and keeps what it
    saved; it exits with 128 + the signal's number, as a shell reports a process killed by it."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        return f"terminated ({signal.Signals(self.signum).name})"


def interrupt_of(signum: int) -> KeyboardInterrupt:
    """The exception a caught signal becomes: KeyboardInterrupt for Ctrl-C, Terminated for any other."""
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


# The signals that stop a command, keeping what it saved: Ctrl-C, SIGTERM, and SIGHUP (its terminal closed).
STOPPING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupts:
    """Ctrl-C, SIGTERM and SIGHUP (or the given signals) caught while installed: they raise (`interrupt_of`) only inside
    `allow()` blocks; anywhere else they are held, pending, until the next `allow()` or for the holder to act on.
    Installing another set inside (a write held by `signals_held`) takes them over until it is restored. Signals
    reach only the main thread; in any other, installing does nothing."""

    def __init__(self, signals: tuple[int, ...] = STOPPING):
        self.signals = signals
        self.allowed = False
        self.caught: list[int] = []  # in the order they came
        self._previous: dict[int, Any] = {}

    @property
    def pending(self) -> bool:
        return bool(self.caught)

    def interrupt(self) -> KeyboardInterrupt:
        """The exception for the first signal caught."""
        return interrupt_of(self.caught[0])

    def install(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.signals}
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def __enter__(self) -> Self:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def _handle(self, signum: int, frame: Any) -> None:
        self.caught.append(signum)
        if self.allowed:
            self.allowed = False  # a second signal while this one unwinds is only held
            raise interrupt_of(signum)

    @contextmanager
    def allow(self) -> Iterator[None]:
        """A block that a signal may interrupt (training, waiting); one held before it interrupts it at once."""
        if self.caught:
            raise self.interrupt()
        self.allowed = True
        try:
            yield
        finally:
            self.allowed = False

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Inside an `allow()` block: hold signals back for a moment (a storage write). One that came meanwhile
        interrupts once the block has finished; if the block raised, its exception goes on and the signal stays
        pending."""
        allowed, self.allowed = self.allowed, False
        try:
            yield
        finally:
            self.allowed = allowed
        if allowed and self.caught:
            raise self.interrupt()


@contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP arriving inside the block take effect only once it is done, as they would have then:
    for writes of several files that must agree (a checkpoint and the metrics that describe it)."""
    held = Interrupts().install()
    try:
        yield
    finally:
        held.restore()
        for sig in dict.fromkeys(held.caught):
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


class Locked(MnistlabError):
    """A lock refused because another process holds it; `holder` says which (as its lock file does: "pid N")."""

    def __init__(self, message: str, holder: str):
        super().__init__(message)
        self.holder = holder


class FileLock:
    """An exclusive lock on a file, held for as long as a block must be the only one doing something.

    The file is locked with `flock`: the kernel releases it when the process ends however it ends, so a crashed
    command never leaves a stale lock. With `wait`, a second holder waits its turn; without, it is refused at
    once. Released, the lock file is removed. Within one process the lock nests.
    """

    _held: ClassVar[dict[tuple[int, Path], int]] = {}  # (pid, file) -> depth, for the locks this process holds

    def __init__(self, path: Path, wait: bool = False):
        self.path = Path(path)
        self.wait = wait
        self._fd: int | None = None
        self._nested = False

    def _key(self) -> tuple[int, Path]:
        return os.getpid(), self.path.resolve()

    def acquire(self) -> Self:
        key = self._key()
        if key in FileLock._held:
            FileLock._held[key] += 1
            self._nested = True
            return self
        self._lock()
        FileLock._held[key] = 1
        return self

    def _lock(self) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
            except OSError as exc:
                raise describe_os_error(self.path, exc) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise self._refusal(holder) from None
            # The last holder removes the file on release: if it did so between our open and our flock, we
            # hold a lock on a file no one else will open, so try again on the new one.
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}".encode())
        self._fd = fd

    def _refusal(self, holder: str) -> Locked:
        return Locked(f"{self.path} is locked by {holder}; wait for it to finish", holder)

    def release(self) -> None:
        if self._nested:
            FileLock._held[self._key()] -= 1
            self._nested = False
            return
        if self._fd is None:
            return
        FileLock._held.pop(self._key(), None)
        self._unlock()

    def _unlock(self) -> None:
        with suppress(OSError):
            self.path.unlink()
        assert self._fd is not None
        os.close(self._fd)  # closing the descriptor releases the flock
        self._fd = None

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class FolderLock(FileLock):
    """An exclusive lock on an output folder, held by whatever writes it, for as long as it writes: its lock
    file (`.lock`) inside it. A second writer is refused at once. Released, the folder is removed too if the lock
    made it and nothing was written. A sweep holds its trial's folder while `train` writes it (the lock nests).
    """

    def __init__(self, folder: Path):
        super().__init__(Path(folder) / LOCK)
        self.folder = Path(folder)
        self._created = False

    def _lock(self) -> None:
        self._created = not self.folder.exists()
        make_dirs(self.folder)
        super()._lock()

    def _refusal(self, holder: str) -> Locked:
        return Locked(
            f"{self.folder} is being written by another mnistlab command ({holder}); wait for it to finish, or "
            "choose another --out",
            holder,
        )

    def _unlock(self) -> None:
        super()._unlock()
        if self._created:
            with suppress(OSError):
                self.folder.rmdir()  # only succeeds when nothing was written
