"""Trials and the worker processes that run them. A worker asks the study for a trial (one process at a time,
under the ask lock, so that `--trials` is never overrun), trains it as an ordinary run in `trials/<number>/`
with the folder locked, and stores how it ended, until `--trials` are taken, time is up, or it is interrupted.

Ctrl-C and SIGTERM stop a worker only where that is safe (`files.Interrupts`): inside training, or between
trials, never in the middle of a storage write. A trial interrupted while training is marked failed and the
study runs another in its place when the sweep is rerun; one whose epochs were all saved is complete (its model
written if the signal came first), and one that is pruned while a signal waits stays pruned (a result); the
worker then stops.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from mnistlab.config import Config
from mnistlab.errors import MnistlabError
from mnistlab.files import FileLock, FolderLock, Interrupts, write_json
from mnistlab.sweep.plan import Plan
from mnistlab.sweep.space import apply
from mnistlab.sweep.storage import counts_as_finished, open_storage, worker_of

HOST = socket.gethostname()
ASK_LOCK = ".ask.lock"


def ask_lock(plan: Plan) -> FileLock:
    """The lock held, one process at a time, to count the study's trials and ask for a new one, or to fail the
    stale ones: no trial is then between being asked for and having its folder locked."""
    return FileLock(plan.out / ASK_LOCK, wait=True)


def _running_here_or_beating(trial: optuna.trial.FrozenTrial, plan: Plan) -> bool:
    """A running trial that still holds its place: on a database every live one (stale ones are failed by the
    heartbeat), on a journal file those of this machine (stale ones are failed by `fail_stale_local`). Running
    trials of other machines sharing a journal are not counted, so such a study may end a trial or two past
    `--trials` rather than wait forever for a machine that stopped."""
    return trial.state == TrialState.RUNNING and (not plan.journal or worker_of(trial).get("host") == HOST)


def remaining_trials(study: optuna.Study, plan: Plan) -> int:
    trials = study.get_trials(deepcopy=False)
    taken = sum(counts_as_finished(t) or _running_here_or_beating(t, plan) for t in trials)
    return max(0, plan.trials - taken)


def _write_marker(run_dir: Path, study: str, number: int, state: str, **details: Any) -> None:
    """`trial.json` in a trial folder: which study and trial it is and how it ended. A pruned or failed trial
    leaves a checkpoint and metrics.json (resumable with `mnistlab train --resume`) but no model."""
    write_json(run_dir / "trial.json", {"study": study, "trial": number, "state": state, **details})


def fail_stale_local(study: optuna.Study, plan: Plan) -> list[int]:
    """Mark failed the running trials of this machine whose worker is gone (its trial folder is unlocked).
    Call it holding the ask lock, so no trial is between being asked for and having its folder locked."""
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        info = worker_of(trial)
        if info.get("host") != HOST or "run_dir" not in info:
            continue
        run_dir = Path(info["run_dir"])
        try:
            lock = FolderLock(run_dir).acquire()
        except MnistlabError:
            continue  # its worker is alive
        try:
            study.tell(trial.number, state=TrialState.FAIL)
            _write_marker(run_dir, plan.study, trial.number, "failed", reason="its worker stopped")
            failed.append(trial.number)
        except (ValueError, RuntimeError):
            pass  # another process finished it just now
        finally:
            lock.release()
    return failed


def _make_pruner(plan: Plan) -> optuna.pruners.BasePruner:
    if plan.pruner == "median":
        return optuna.pruners.MedianPruner()
    if plan.pruner == "hyperband":
        p = plan.space.get("training.epochs")
        epochs = max([plan.config.training.epochs, *(int(v) for v in (p.candidates() if p else []))])
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs)
    return optuna.pruners.NopPruner()


@dataclass
class Job:
    """What a worker process needs (sent to it pickled)."""

    plan: Plan
    threads: int
    data_dir: str | None
    device: str
    deadline: float | None


def worker(job: Job, errors: Any) -> None:
    """A worker process: runs trials until `--trials` are taken, time is up, or it is interrupted. Its torch
    threads are the machine's share for one worker. A user's error goes to `errors`, and the exit code is 2."""
    import torch

    # Imported before any trial, not by its first run's end: a signal in the middle of an import leaves the module
    # half-imported, and a trial interrupted once its epochs are done is still finished (its model and curves).
    from mnistlab import plots  # noqa: F401

    with Interrupts() as interrupts:
        torch.set_num_threads(job.threads)
        # A trial that training refused (a MnistlabError) is a result stored with the trial, not a warning to log.
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # Optuna expects heartbeats only from `study.optimize`; asking ourselves, we beat as it does (`_heartbeat`).
        warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with Study.optimize")
        try:
            _run_trials(job, interrupts)
        except KeyboardInterrupt:
            sys.exit(130)
        except MnistlabError as exc:
            errors.put(str(exc))
            sys.exit(2)


def _run_trials(job: Job, interrupts: Interrupts) -> None:
    plan = job.plan
    storage = open_storage(plan.storage, heartbeat=not plan.journal)
    study = optuna.load_study(
        study_name=plan.study, storage=storage, sampler=optuna.samplers.TPESampler(), pruner=_make_pruner(plan)
    )
    trials = _Trials(job, study, storage, interrupts)
    while not interrupts.pending and (job.deadline is None or time.time() < job.deadline):
        with ExitStack() as held:
            with ask_lock(plan):
                if not plan.journal:
                    optuna.storages.fail_stale_trials(study)
                if remaining_trials(study, plan) == 0:
                    return
                trial = study.ask()
                run_dir = plan.out / "trials" / str(trial.number)
                try:
                    held.enter_context(FolderLock(run_dir))  # until the trial's state is stored
                except MnistlabError:
                    study.tell(trial, state=TrialState.FAIL)
                    raise
                trial.set_user_attr("worker", {"host": HOST, "pid": os.getpid(), "run_dir": str(run_dir)})
            trials.run(trial, run_dir)


@contextmanager
def _heartbeat(storage: optuna.storages.BaseStorage, study: str, number: int) -> Iterator[None]:
    """While a trial trains on a database with heartbeats (as `study.optimize` does it): a beat every interval,
    so that the trial of a worker that stopped is failed by the next worker that asks for one."""
    interval = storage.get_heartbeat_interval() if isinstance(storage, optuna.storages.RDBStorage) else None
    if not interval:
        yield
        return
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study), number)
    stop = threading.Event()

    def beat() -> None:
        while True:
            storage.record_heartbeat(trial_id)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


class _Trials:
    """Runs one trial at a time: a config from the sampled values, trained as an ordinary run in its folder,
    reporting the validation metric after every epoch so the pruner can stop it; then its state is stored."""

    def __init__(
        self, job: Job, study: optuna.Study, storage: optuna.storages.BaseStorage, interrupts: Interrupts
    ) -> None:
        self.job, self.plan, self.study, self.storage, self.interrupts = job, job.plan, study, storage, interrupts
        self._data: dict[tuple, Any] = {}

    def data(self, config: Config) -> Any:
        from mnistlab.data.splits import load_data

        key = (config.data.dataset, config.data.val_size, config.training.seed)
        if key not in self._data:  # the validation split depends on the seed: one load per (dataset, size, seed)
            d = config.data
            self._data[key] = load_data(d.dataset, self.job.data_dir, d.val_size, config.training.seed, "cpu")
        return self._data[key]

    def run(self, trial: optuna.trial.Trial, run_dir: Path) -> None:
        """Train the trial and store how it ended: its value, pruned, or failed. A failure of its own settings
        (a MnistlabError) is its result; an interrupt or a bug goes on once the trial is marked failed."""
        try:
            with _heartbeat(self.storage, self.plan.study, trial.number):
                value = self._train(trial, run_dir)
        except optuna.TrialPruned:
            self.study.tell(trial, state=TrialState.PRUNED)
        except (Exception, KeyboardInterrupt) as exc:
            self.study.tell(trial, state=TrialState.FAIL)
            if not isinstance(exc, MnistlabError):
                raise
        else:
            self.study.tell(trial, value)

    def _train(self, trial: optuna.trial.Trial, run_dir: Path) -> float:
        from mnistlab.train.loop import train

        plan, number = self.plan, trial.number
        values = {key: p.suggest(trial) for key, p in plan.space.items()}
        reports: list[dict[str, Any]] = []
        epochs = 0

        def on_epoch_end(record: dict[str, Any]) -> None:
            reports.append(record)
            with self.interrupts.hold():
                value = record.get(plan.metric)
                if not math.isfinite(record.get("val_loss", 0.0)) or value is None or not math.isfinite(value):
                    raise optuna.TrialPruned("diverged")
                trial.report(value, record["epoch"])
                if record["epoch"] < epochs and trial.should_prune():
                    raise optuna.TrialPruned()

        start = time.perf_counter()
        details = {"params": values, "metric": plan.metric}
        try:
            # A combination the config rules refuse (possible in spaces too large to check every point) is a
            # result of this trial, like an error training raises.
            config = apply(plan.config, values, name=f"{plan.config.name}-trial{number}")
            epochs = config.training.epochs
            with self.interrupts.allow():
                run = train(
                    config,
                    out_dir=run_dir,
                    data=self.data(config),
                    device=self.job.device,
                    quiet=True,
                    on_epoch_end=on_epoch_end,
                    resume_hint=False,  # an interrupted trial runs again when the sweep is rerun, not by resuming it
                )
        except optuna.TrialPruned as exc:
            result = _result(reports, start, pruned_at=len(reports), reason=str(exc) or "pruned")
            self._store(trial, run_dir, "pruned", details, result)
            raise
        except KeyboardInterrupt:
            finished = self._finish(run_dir, config)
            if finished is None:
                self._store(trial, run_dir, "failed", details, _result(reports, start, reason="interrupted"))
                raise
            epochs_done, saved = finished  # the signal stays pending: the worker stops after storing the trial
        except MnistlabError as exc:
            self._store(trial, run_dir, "failed", details, _result(reports, start, error=str(exc)))
            raise
        else:
            epochs_done, saved = run.epochs, run.saved
        result = _result(epochs_done, start, saved, saved_epoch=saved["epoch"])
        self._store(trial, run_dir, "complete", details, result, value=saved[plan.metric])
        return saved[plan.metric]

    def _finish(self, run_dir: Path, config: Config) -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
        """After an interrupt (signals now held): a run whose epochs were all saved is complete, so its model is
        written if the interrupt came first (a resume with no epoch left to train), and its epochs' metrics and
        the saved epoch's are returned; None for a run with epochs still to train."""
        from mnistlab.train.loop import resume

        try:
            metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None  # interrupted in its first epoch
        epochs = metrics["epochs"]
        if len(epochs) < config.training.epochs and metrics["stop_reason"] != "early_stopping":
            return None
        if not (run_dir / "model.safetensors").is_file():
            resume(run_dir, data=self.data(config), device=self.job.device, quiet=True)
        return epochs, next(r for r in epochs if r["epoch"] == metrics["saved_model_epoch"])

    def _store(
        self, trial: optuna.trial.Trial, run_dir: Path, state: str, details: dict, result: dict, **more: Any
    ) -> None:
        """How a trial ended, with the trial (for the report) and in its folder's trial.json."""
        trial.set_user_attr("result", result)
        _write_marker(run_dir, self.plan.study, trial.number, state, **details, **result, **more)


def _result(epochs: list[dict], start: float, saved: dict | None = None, **extra: Any) -> dict[str, Any]:
    """What the report needs from a trial: metrics of the saved model (or the last epoch), epochs, time."""
    last = saved or (epochs[-1] if epochs else {})
    keys = ("val_accuracy", "val_loss", "test_accuracy", "test_loss")
    metrics = {k: last[k] for k in keys if k in last and math.isfinite(last[k])}
    return {**metrics, "epochs": len(epochs), "seconds": round(time.perf_counter() - start, 3), **extra}
