"""The lab: trainings started from the web page, one at a time on the machine, each an ordinary run directory.

A run is `mnistlab train ... --events --until-stdin-closes` in a process of its own (a crash or a kill of it never
takes the server down), at lower priority than serving (niceness +10, one OpenMP thread: with two torch threads
on two busy cores a training batch took 30-230 ms instead of 7 ms, and predictions must stay first). Its stdout
is read in a thread: JSON lines (start, progress, epoch, finished) kept in memory per run (`Live`), so that a
page that connects late gets what happened so far. Its stdin is a pipe the server never writes and never closes
while it lives: a server that dies, even killed, closes it, and the run stops as after Ctrl-C, resumable.

On disk, under RUNS: each run's directory RUNS/<id>/ (written by `train` alone), and the lab's records
RUNS/.lab/<id>.json (config name, status, reason, creation time) with RUNS/.lab/<id>.toml, the fully resolved
config the run trains. RUNS/.lab/.lock is held by the server whose lab uses RUNS (the kernel releases it when
that server dies), so that a restarted server knows a record saying "running" or "queued" is stale: it becomes
"stopped", resumable from its checkpoint. Run directories trained from the terminal (config.toml and
metrics.json) are listed too.

Statuses: queued, running, finished, stopped, failed (with a one-line reason: the child's `mnistlab: error:` line,
or its last lines on stderr).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, get_args

from mnistlab.config import Config, config_from_dict, load_config, read_value, shipped_configs
from mnistlab.data.download import cache_dir
from mnistlab.errors import MnistlabError, warn
from mnistlab.files import (
    LOCK,
    FileLock,
    Locked,
    atomic_write_text,
    finite_json,
    is_empty_output,
    make_dirs,
    write_json,
)
from mnistlab.serve.images import RequestError
from mnistlab.serve.schemas import RunStatus
from mnistlab.train.checkpoint import CHECKPOINT

RECORDS = ".lab"  # the lab's own folder under RUNS
STOP_WAIT_S = 10.0  # after SIGINT, how long a training may take to stop before it is killed
STDERR_LINES = 20  # the child's last stderr lines kept for a failure's reason
NICENESS = 10
LR_FIND_TIMEOUT_S = 600.0
KEEP_ALIVE_S = 15.0  # an SSE comment this often keeps proxies from closing a quiet stream
MODEL_FILE = "model.safetensors"
# One lab training at a time on this machine, whichever server started it: a lock file in the user's cache folder,
# held by the server while its training runs (released by the kernel if the server dies); a queue that finds it
# taken looks again every MACHINE_RETRY_S.
MACHINE_LOCK = "lab-training.lock"
MACHINE_RETRY_S = 2.0

Frame = tuple[str, dict[str, Any]]  # an SSE event: its name and its data
STATUSES: tuple[str, ...] = get_args(RunStatus)  # queued, running, finished, stopped, failed


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from `path`, or None where there is none (missing, being replaced, not an object)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_toml(path: Path) -> dict[str, Any] | None:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def checked_config(name: str, values: Mapping[str, Any]) -> Config:
    """A shipped config with the form's values: a string read as `--set` reads it (`config.read_value`), a JSON
    number, boolean or list taken as it is, None kept at the config's value; refused (422) with the CLI's
    message naming the key. Only dotted keys (`optimizer.lr`): a run's name and folder come from the config."""
    shipped = shipped_configs()
    if name not in shipped:
        raise RequestError(422, f"no shipped config named {name[:60]!r} (shipped: {', '.join(sorted(shipped))})")
    overrides = {}
    for key, value in values.items():
        if "." not in key:  # `name` would choose the run's folder
            raise RequestError(422, f"unknown config key {key[:60]!r} (see `mnistlab configs --keys`)")
        overrides[key] = read_value(value) if isinstance(value, str) else value
    try:
        return load_config(name).with_overrides(overrides)
    except MnistlabError as exc:
        raise RequestError(422, str(exc)) from None


# ---------------------------------------------------------------------------------------------- records


@dataclass
class Record:
    """The lab's record of a run: RUNS/.lab/<id>.json."""

    id: str
    config: str
    status: str
    reason: str | None = None
    created: str = field(default_factory=_now)

    def save(self, folder: Path) -> None:
        write_json(folder / f"{self.id}.json", asdict(self))

    @classmethod
    def load(cls, path: Path) -> Record | None:
        data = _read_json(path)
        try:
            return cls(**data) if data is not None else None
        except TypeError:  # not a record of ours
            return None


class Live:
    """One training process's events as they came (seeded with the epochs of an earlier process, on resume), the
    end once there is one, and the SSE clients waiting for more (each woken on its own event loop)."""

    def __init__(self, epochs: list[dict[str, Any]]):
        self.frames: list[Frame] = [("epoch", record) for record in epochs]
        self.epochs = list(epochs)
        self.progress: list[dict[str, Any]] = []
        self.end: dict[str, Any] | None = None
        self.target: int | None = None  # the epochs the run trains to (its "start" event)
        self.best_epoch: int | None = None
        self.started: float | None = None  # when the process started (time.monotonic)
        self.epoch_began: float | None = None
        self.epoch_seconds: list[float] = []  # wall time of each epoch of this process
        self._lock = threading.Lock()
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    def add(self, name: str, data: dict[str, Any]) -> None:
        with self._lock:
            self.frames.append((name, data))
        self._wake()

    def finish(self, end: dict[str, Any]) -> None:
        with self._lock:
            self.end = end
        self._wake()

    def since(self, sent: int) -> tuple[list[Frame], dict[str, Any] | None]:
        """The frames after the first `sent`, and the end if it has come."""
        with self._lock:
            return self.frames[sent:], self.end

    @contextlib.contextmanager
    def watching(self, event: asyncio.Event) -> Iterator[None]:
        """While the block runs, `event` is set when a frame or the end arrives."""
        waiter = (asyncio.get_running_loop(), event)
        with self._lock:
            self._waiters.add(waiter)
        try:
            yield
        finally:
            with self._lock:
                self._waiters.discard(waiter)

    def _wake(self) -> None:
        with self._lock:
            waiters = list(self._waiters)
        for loop, event in waiters:
            with contextlib.suppress(RuntimeError):  # that loop has closed: its client is gone
                loop.call_soon_threadsafe(event.set)

    def eta(self) -> float | None:
        """Seconds left, from this process's epochs (or, within its first, its progress so far)."""
        if self.target is None or self.epoch_began is None:
            return None
        fraction = 0.0
        if self.progress and self.progress[-1]["epoch"] == len(self.epochs) + 1:
            last = self.progress[-1]
            fraction = last["images"] / max(last["train_size"], 1)
        if self.epoch_seconds:
            per_epoch = sum(self.epoch_seconds) / len(self.epoch_seconds)
        elif fraction:
            per_epoch = (time.monotonic() - self.epoch_began) / fraction
        else:
            return None
        return max(0.0, per_epoch * (self.target - len(self.epochs) - fraction))


@dataclass
class Job:
    """The training process of one run."""

    id: str
    process: subprocess.Popen
    live: Live
    stopping: bool = False  # the server asked it to stop
    finished: dict[str, Any] | None = None  # its "finished" event
    stderr: deque[str] = field(default_factory=lambda: deque(maxlen=STDERR_LINES))
    thread: threading.Thread | None = None


# ---------------------------------------------------------------------------------------------- the lab


class Lab:
    """The runs under `runs`: a queue, at most one training process at a time, their events, lr-find.

    `device`: "cuda" trains on the GPU, anything else on the CPU. `on_finished(run_dir)` is called in a thread
    when a run started here finishes (the server adds its model to those it serves), before the run's SSE clients
    are told it ended. Methods that start or stop processes may block briefly; the routes call them in a thread.
    """

    def __init__(
        self,
        runs: str | Path,
        data_dir: str | Path | None = None,
        device: str = "cpu",
        on_finished: Callable[[Path], None] | None = None,
    ):
        self.runs = Path(runs)
        self.folder = self.runs / RECORDS
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.device = device
        self.on_finished = on_finished
        self.queue: list[str] = []
        self.job: Job | None = None
        self.records: dict[str, Record] = {}
        self.lives: dict[str, Live] = {}
        self.closed = False
        self._lock = threading.RLock()
        self._folder_lock: FileLock | None = None
        self._finding = threading.Lock()  # one lr-find at a time
        self._machine = FileLock(cache_dir() / MACHINE_LOCK)  # held while this server's training runs
        self._retry: threading.Timer | None = None  # the next look at a machine lock another server holds
        self._finder: subprocess.Popen | None = None
        if self.folder.is_dir():
            self._hold_folder()
            self._recover()

    # -- the folder, and a restart

    def _hold_folder(self) -> None:
        """Hold RUNS/.lab/.lock for this server's life (made on the first write when it is not there yet)."""
        if self._folder_lock is None:
            make_dirs(self.folder)
            held = FileLock(self.folder / LOCK)
            try:
                held.acquire()
            except Locked as exc:
                raise MnistlabError(
                    f"{self.runs} is the lab of another server ({exc.holder}): give this one --runs DIR"
                ) from None
            self._folder_lock = held

    def _recover(self) -> None:
        """Read the records; those a server that died left queued or running become stopped."""
        for path in sorted(self.folder.glob("*.json")):
            record = Record.load(path)
            if record is None or record.id != path.stem:
                continue
            if record.status in ("queued", "running"):
                record.status, record.reason = "stopped", "the server stopped during the run"
                record.save(self.folder)
            self.records[record.id] = record

    # -- starting runs

    def submit(self, config: Config) -> dict[str, str]:
        """Queue a run of `config` (checked: `checked_config`); it starts at once when nothing trains."""
        with self._lock:
            self._open()
            self._claim()
            n = 1
            while self._known(f"{config.name}-{n}"):
                n += 1
            run_id = f"{config.name}-{n}"
            atomic_write_text(self.folder / f"{run_id}.toml", config.to_toml())
            record = self.records[run_id] = Record(run_id, config.name, "queued")
            record.save(self.folder)
            return self._enqueue(run_id, [])

    def resume(self, run_id: str) -> dict[str, str]:
        """Queue a stopped or failed run again: from its checkpoint, or from the start where it has none."""
        with self._lock:
            self._open()
            status = self._status(run_id)
            if status in ("running", "queued"):
                raise RequestError(409, f"run {run_id} is {status} already")
            run_dir = self.runs / run_id
            epochs, metrics = self._epochs(run_id)
            if status == "finished":
                raise RequestError(409, f"run {run_id} has finished all its epochs; start a new run to train more")
            if not (run_dir / CHECKPOINT).is_file() and not (
                (self.folder / f"{run_id}.toml").is_file() and is_empty_output(run_dir)
            ):
                raise RequestError(409, f"run {run_id} has no checkpoint to resume from")
            self._claim()
            record = self.records.get(run_id)
            if record is None:  # a run trained from the terminal
                name = str((metrics or {}).get("config") or run_id)
                record = self.records[run_id] = Record(run_id, name, "queued")
            record.status, record.reason = "queued", None
            record.save(self.folder)
            return self._enqueue(run_id, epochs if (run_dir / CHECKPOINT).is_file() else [])

    def _open(self) -> None:
        if self.closed:
            raise RequestError(503, "the server is stopping")

    def _claim(self) -> None:
        """Hold RUNS/.lab before writing there; 409 where another server's lab holds it."""
        try:
            self._hold_folder()
        except MnistlabError as exc:
            raise RequestError(409, str(exc)) from None

    def _known(self, run_id: str) -> bool:
        return run_id in self.records or (self.runs / run_id).exists()

    def _enqueue(self, run_id: str, epochs: list[dict[str, Any]]) -> dict[str, str]:
        self.lives[run_id] = Live(epochs)
        self.queue.append(run_id)
        self._next()
        return {"id": run_id, "status": self._status(run_id)}

    def _next(self) -> None:
        """Start the first queued run when nothing trains."""
        with self._lock:
            if self.closed or self.job is not None or not self.queue or not self._take_machine():
                return
            run_id = self.queue.pop(0)
            live = self.lives[run_id]
            try:
                process = self._spawn(self._command(run_id))
            except OSError as exc:
                self._machine.release()
                self._settle(run_id, live, "failed", f"could not start the training process ({exc})")
                self._next()
                return
            live.started = live.epoch_began = time.monotonic()
            self.job = Job(run_id, process, live)
            self.records[run_id].status, self.records[run_id].reason = "running", None
            self.records[run_id].save(self.folder)
            self.job.thread = threading.Thread(target=self._watch, args=(self.job,), name=f"lab-{run_id}", daemon=True)
            self.job.thread.start()

    def _take_machine(self) -> bool:
        """Take the machine's training lock; where another server holds it, say so on the first queued run and
        look again in MACHINE_RETRY_S."""
        try:
            make_dirs(self._machine.path.parent)
            self._machine.acquire()
        except Locked as exc:
            self.records[self.queue[0]].reason = f"waiting for another server's training on this machine ({exc.holder})"
            if self._retry is None:
                self._retry = threading.Timer(MACHINE_RETRY_S, self._look_again)
                self._retry.daemon = True
                self._retry.start()
            return False
        return True

    def _look_again(self) -> None:
        with self._lock:
            self._retry = None
        self._next()

    def _command(self, run_id: str) -> list[str]:
        run_dir = self.runs / run_id
        if (run_dir / CHECKPOINT).is_file():
            what = ["--resume", str(run_dir)]
        else:
            what = ["--config", str(self.folder / f"{run_id}.toml"), "--out", str(run_dir)]
        return [sys.executable, "-m", "mnistlab", "train", *what, "--events", "--until-stdin-closes", *self._where()]

    def _where(self) -> list[str]:
        """The data folder and device flags the lab's processes share."""
        flags = ["--data-dir", str(self.data_dir)] if self.data_dir is not None else []
        return flags + ([] if self.device == "cuda" else ["--device", "cpu"])

    @staticmethod
    def _spawn(command: list[str]) -> subprocess.Popen:
        """A child in a session of its own (a Ctrl-C at the server's terminal is the server's to pass on), with one
        OpenMP thread, its niceness raised once it runs (its threads, made later, inherit it: Linux counts it per
        thread). stdin is a pipe never written: it closes when the server dies, however it dies."""
        process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            start_new_session=True,
        )
        with contextlib.suppress(OSError):  # it may be gone already; a lower priority is a courtesy
            os.setpriority(os.PRIO_PROCESS, process.pid, os.getpriority(os.PRIO_PROCESS, 0) + NICENESS)
        return process

    # -- watching a run

    def _watch(self, job: Job) -> None:
        """Read the child's events until it exits; then settle its status and start the next run."""
        assert job.process.stdout is not None and job.process.stderr is not None
        errors = threading.Thread(target=job.stderr.extend, args=(job.process.stderr,), daemon=True)
        errors.start()
        for line in job.process.stdout:
            try:
                event = json.loads(line)
            except ValueError:  # not ours: nothing but events is printed there
                continue
            if isinstance(event, dict):
                self._handle(job, event)
        code = job.process.wait()
        errors.join(5)
        for pipe in (job.process.stdin, job.process.stdout, job.process.stderr):  # a server lives for many runs
            with contextlib.suppress(OSError):
                pipe.close()
        run_dir = self.runs / job.id
        if job.finished is not None and (run_dir / MODEL_FILE).is_file():
            # The model files are written before "finished" is printed: the run is done, whatever the exit.
            status, reason = "finished", None
            if self.on_finished is not None:
                try:
                    self.on_finished(run_dir)
                except Exception as exc:  # the run stays finished; only the page's column is missing
                    reason = f"finished, but the server cannot serve its model ({exc})"
                    warn(f"{run_dir}: {reason}")
        elif job.stopping or code in (130, -signal.SIGINT):
            status, reason = "stopped", None
        else:
            status, reason = "failed", self._failure(code, job.stderr)
        with self._lock:
            self.job = None
            self._machine.release()
            self._settle(job.id, job.live, status, reason)
            self._next()

    @staticmethod
    def _handle(job: Job, event: dict[str, Any]) -> None:
        live, kind = job.live, event.get("event")
        data = {k: v for k, v in event.items() if k != "event"}
        if kind == "start":  # the data is loaded: the first epoch begins
            live.target = data.get("epochs")
            live.epoch_began = time.monotonic()
        elif kind == "progress":
            live.progress.append(data)
            live.add("progress", data)
        elif kind == "epoch" and isinstance(data.get("record"), dict):
            now = time.monotonic()
            live.epoch_seconds.append(now - (live.epoch_began or now))
            live.epoch_began = now
            live.best_epoch = data.get("best_epoch")
            live.epochs.append(data["record"])
            live.add("epoch", data["record"])
        elif kind == "finished":
            job.finished = data

    @staticmethod
    def _failure(code: int, stderr: deque[str]) -> str:
        """A failed run's one line: its own error, else its last lines on stderr, else how it ended."""
        lines = [line.strip() for line in stderr if line.strip()]
        errors = [line for line in lines if line.startswith("mnistlab: error:")]
        if errors:
            return errors[-1].removeprefix("mnistlab: error:").strip()
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        last = " | ".join(lines[-3:])
        return f"the training process ended ({how})" + (f": {last[-300:]}" if last else "")

    def _settle(self, run_id: str, live: Live, status: str, reason: str | None) -> None:
        record = self.records[run_id]
        record.status, record.reason = status, reason
        record.save(self.folder)
        live.finish(self._end(run_id, status, reason, self._epochs(run_id)[1]))

    def _end(self, run_id: str, status: str, reason: str | None, metrics: dict[str, Any] | None) -> dict[str, Any]:
        return finite_json(
            {
                "status": status,
                "reason": reason,
                "best_epoch": (metrics or {}).get("best_epoch"),
                "test_accuracy": self._test_accuracy(run_id, metrics) if status == "finished" else None,
            }
        )

    # -- stopping

    def stop(self, run_id: str) -> None:
        """Stop a queued or running run (a running one as Ctrl-C would: its last finished epoch is kept); waits
        for its process to end, killing it after STOP_WAIT_S."""
        with self._lock:
            if run_id in self.queue:
                self.queue.remove(run_id)
                self._settle(run_id, self.lives[run_id], "stopped", None)
                return
            job = self.job
            if job is None or job.id != run_id:
                status = self._status(run_id)
                raise RequestError(409, f"run {run_id} is {status}: only a queued or running run can be stopped")
            job.stopping = True
        self._end_process(job)

    def _end_process(self, job: Job) -> None:
        with contextlib.suppress(ProcessLookupError):
            job.process.send_signal(signal.SIGINT)
        try:
            job.process.wait(STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            job.process.kill()
        assert job.thread is not None
        job.thread.join()

    def close(self) -> None:
        """The server stops: no new runs; the queue's become stopped, the running one is stopped (killed after
        STOP_WAIT_S); an lr-find is killed. Every SSE stream ends."""
        with self._lock:
            self.closed = True
            if self._retry is not None:
                self._retry.cancel()
            for run_id in self.queue:
                self._settle(run_id, self.lives[run_id], "stopped", "the server stopped")
            self.queue.clear()
            job = self.job
            if job is not None:
                job.stopping = True
            if self._finder is not None:
                with contextlib.suppress(ProcessLookupError):
                    self._finder.kill()
        if job is not None:
            self._end_process(job)
        if self._folder_lock is not None:
            self._folder_lock.release()
            self._folder_lock = None

    # -- reading runs

    def ids(self) -> list[str]:
        """Every run: the lab's records and the run directories under RUNS (config.toml and metrics.json)."""
        found = set(self.records)
        if self.runs.is_dir():
            found.update(path.name for path in self.runs.iterdir() if _is_run_dir(path))
        return sorted(found)

    def _epochs(self, run_id: str) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        metrics = _read_json(self.runs / run_id / "metrics.json")
        epochs = metrics.get("epochs") if metrics else None
        return ([e for e in epochs if isinstance(e, dict)] if isinstance(epochs, list) else []), metrics

    def _config_data(self, run_id: str) -> dict[str, Any]:
        """The run's config as written (the lab's resolved copy, else the run directory's), or {}."""
        for path in (self.folder / f"{run_id}.toml", self.runs / run_id / "config.toml"):
            data = _read_toml(path)
            if data is not None:
                return data
        return {}

    def _status(self, run_id: str) -> str:
        """The run's status; 404 for anything but a run of the lab's or a run directory right under RUNS."""
        plain = not run_id.startswith(".") and "/" not in run_id and "\\" not in run_id
        if not plain or not (run_id in self.records or _is_run_dir(self.runs / run_id)):
            raise RequestError(404, f"no run {run_id[:80]!r} under {self.runs} (GET /api/runs lists them)")
        job = self.job
        if job is not None and job.id == run_id:
            return "running"
        if run_id in self.queue:
            return "queued"
        record = self.records.get(run_id)
        if record is not None:
            return record.status
        run_dir = self.runs / run_id
        if _writer_alive(run_dir):
            return "running"
        return "finished" if self._complete(run_id) else "stopped"

    def _complete(self, run_id: str) -> bool:
        """Whether a run directory holds a model trained to the end (all its epochs, or stopped early)."""
        if not (self.runs / run_id / MODEL_FILE).is_file():
            return False
        epochs, metrics = self._epochs(run_id)
        target = self._config_data(run_id).get("training", {}).get("epochs")
        early = (metrics or {}).get("stop_reason") == "early_stopping"
        return early or not isinstance(target, int) or len(epochs) >= target

    def _test_accuracy(self, run_id: str, metrics: dict[str, Any] | None) -> float | None:
        """The saved model's test accuracy (of the epoch it keeps)."""
        epochs = (metrics or {}).get("epochs") or []
        saved = (metrics or {}).get("saved_model_epoch")
        for record in epochs:
            if isinstance(record, dict) and record.get("epoch") == saved:
                return record.get("test_accuracy")
        return None

    def info(self, run_id: str, served: set[str], detail: bool = False) -> dict[str, Any]:
        """A run as GET /api/runs lists it (`detail`: with its values, epochs and progress); 404 if unknown."""
        with self._lock:
            status = self._status(run_id)
            record = self.records.get(run_id)
            live = self.lives.get(run_id)  # this server's life of the run, if it trained here
        running = status == "running" and live is not None and live.started is not None
        epochs, metrics = self._epochs(run_id)
        data = self._config_data(run_id)
        run_dir = self.runs / run_id
        if running:
            epochs = list(live.epochs)  # what the process said, maybe ahead of metrics.json being read
        accuracies = [e["val_accuracy"] for e in epochs if isinstance(e.get("val_accuracy"), (int, float))]
        if record is not None:
            created = record.created
        else:
            stamp = (run_dir / "config.toml").stat().st_mtime if (run_dir / "config.toml").exists() else time.time()
            created = datetime.datetime.fromtimestamp(stamp, datetime.UTC).isoformat(timespec="seconds")
        target = live.target if running and live.target is not None else data.get("training", {}).get("epochs")
        best = live.best_epoch if running and live.best_epoch is not None else (metrics or {}).get("best_epoch")
        info: dict[str, Any] = {
            "id": run_id,
            "config": record.config if record is not None else str(data.get("name") or run_id),
            "description": str(data.get("description") or ""),
            "status": status,
            "reason": record.reason if record is not None else None,
            "epoch": len(epochs),
            "epochs": target if isinstance(target, int) else None,
            "best_epoch": best,
            "best_val_accuracy": max(accuracies) if accuracies else None,
            "test_accuracy": self._test_accuracy(run_id, metrics) if status == "finished" else None,
            "created": created,
            "seconds": round(sum(e.get("seconds", 0.0) for e in epochs), 3),
            "elapsed": round(time.monotonic() - live.started, 3) if running else None,
            "eta": round(live.eta(), 1) if running and live.eta() is not None else None,
            "served": run_id in served,
            "resumable": status in ("stopped", "failed") and (run_dir / CHECKPOINT).is_file(),
        }
        if detail:
            try:
                values = config_from_dict(data).flat() if data else {}
            except MnistlabError:
                values = {}
            # As the API promises: here "epochs" is the epoch records so far (the target is training.epochs).
            info.update(values=values, epochs=epochs, progress=list(live.progress) if live is not None else [])
        return finite_json(info)

    def history(self, run_id: str) -> Live:
        """What an SSE client of the run is sent: the live events of its process (seeded with the epochs before),
        or, for a run that trains nowhere now, its epochs from metrics.json and its end."""
        with self._lock:
            status = self._status(run_id)
            live = self.lives.get(run_id)
            if live is not None and (status in ("queued", "running") or live.end is not None):
                return live
            record = self.records.get(run_id)
        epochs, metrics = self._epochs(run_id)
        past = Live(epochs)
        reason = record.reason if record is not None else None
        if status == "running":  # by a `train` in a terminal: its epochs so far; this server cannot watch it
            reason = "trained by another process: this server does not see its events"
        past.finish(self._end(run_id, status, reason, metrics))
        return past

    def counts(self) -> dict[str, int]:
        """How many runs have each status, every status named (0 where none: a series that vanished would read
        as a gap in the operator's graph)."""
        counts = dict.fromkeys(STATUSES, 0)
        with self._lock:
            for run_id in self.ids():
                with contextlib.suppress(RequestError):  # a folder removed meanwhile
                    counts[self._status(run_id)] += 1
        return counts

    @property
    def running(self) -> str | None:
        job = self.job
        return job.id if job is not None else None

    # -- the learning-rate finder

    def lr_find(self, config: Config) -> dict[str, Any]:
        """`mnistlab lr-find --json` on `config` in a process of its own (at the training's priority); 409 while
        another runs, 422 with its error where it fails."""
        if not self._finding.acquire(blocking=False):
            raise RequestError(409, "a learning-rate search is running already; wait for it to finish")
        try:
            with tempfile.TemporaryDirectory(prefix="mnistlab-lr-find-") as tmp:
                toml = Path(tmp) / f"{config.name}.toml"
                atomic_write_text(toml, config.to_toml())
                command = [sys.executable, "-m", "mnistlab", "lr-find", "--config", str(toml), "--json", "--quiet"]
                with self._lock:
                    self._open()
                    self._finder = process = self._spawn([*command, "--out", tmp, *self._where()])
                try:
                    out, err = process.communicate(timeout=LR_FIND_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.communicate()
                    raise RequestError(504, f"the learning-rate search took over {LR_FIND_TIMEOUT_S:g} s") from None
                finally:
                    self._finder = None
        finally:
            self._finding.release()
        result = None
        with contextlib.suppress(ValueError):
            result = json.loads(out)
        if process.returncode != 0 or not isinstance(result, dict):
            raise RequestError(422, self._failure(process.returncode, deque(err.splitlines(), STDERR_LINES)))
        return {"suggested_lr": result["suggested_lr"], "method": result["method"], "points": result["points"]}


def _is_run_dir(path: Path) -> bool:
    return not path.name.startswith(".") and (path / "config.toml").is_file() and (path / "metrics.json").is_file()


def _writer_alive(run_dir: Path) -> bool:
    """Whether a process holds the run directory's lock (a `train` in a terminal): its lock file names its pid."""
    try:
        match = re.fullmatch(r"pid (\d+)", (run_dir / LOCK).read_text().strip())
    except OSError:  # no lock: nothing writes it
        return False
    if match is None:
        return False
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True
