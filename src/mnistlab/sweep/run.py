"""Running a study: the sweep folder checked and locked, worker processes started on this machine and watched
(a killed one loses only its running trial), progress printed as trials finish, the report written at the end.
`sweep` runs one study per base config in turn.

A sweep folder holds:

    sweep.json        which study this folder belongs to (study name, storage), for --report and for resuming
    study.journal     the default storage: Optuna's append-only journal file, safe for parallel processes
    trials/<number>/  one run directory per trial (config.toml, metrics.json, model files) plus trial.json
    report.md         trials table, best settings, parameter importances, plots (objective.png, params.png)
    best.toml         the best trial's config, for `mnistlab train --config`

The storage is the whole truth: the space, base config and metric are stored with the study, each trial's
metrics with the trial, so the report can be redrawn from it on any machine. The objective is a validation
metric; test accuracy is recorded for the table and never chooses.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from mnistlab.devices import cpu_count
from mnistlab.errors import MnistlabError, plural
from mnistlab.files import FolderLock, Interrupts, check_output_dir, write_json
from mnistlab.progress import Progress
from mnistlab.sweep.plan import SWEEP_FILE, Plan, SweepOptions, make_plans
from mnistlab.sweep.report import metric_text, state_text, write_report, write_summary
from mnistlab.sweep.space import show_value
from mnistlab.sweep.storage import counts_as_finished, open_storage, open_study, result_of, safe_url
from mnistlab.sweep.workers import HOST, Job, ask_lock, fail_stale_local, remaining_trials, worker


def _check_folder(plan: Plan) -> None:
    """The sweep folder must be new, empty, or this study's folder (then the study is continued)."""
    marker = plan.out / SWEEP_FILE
    if marker.is_file():
        try:
            saved = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            saved = {}
        if saved.get("study") != plan.study or saved.get("storage") != _stored_storage(plan):
            raise MnistlabError(
                f"{plan.out} is the sweep folder of study {saved.get('study')!r} in {saved.get('storage')}; "
                "give the same --study and --storage to continue it, or another --out"
            )
        return
    check_output_dir(plan.out, force=False)


def _stored_storage(plan: Plan) -> str:
    """The storage as sweep.json keeps it: the journal relative to the folder when inside it, a URL without
    its password."""
    if plan.journal and Path(plan.storage).parent == plan.out:
        return Path(plan.storage).name
    return safe_url(plan.storage)


@dataclass
class Outcome:
    """What one invocation did to a study."""

    plan: Plan
    report: Path
    finished: int
    ran: int
    seconds: float
    stopped: str = ""  # why it stopped short of --trials, if it did
    notes: list[str] = dataclasses.field(default_factory=list)  # workers that were killed or crashed


def run_plan(plan: Plan, options: SweepOptions, deadline: float | None = None) -> Outcome:
    """Run (or continue) one study to `plan.trials` finished trials with `options.workers` processes on this
    machine, then write its report. Safe to run again: it continues where the study stands."""
    from mnistlab.data.download import resolve_files
    from mnistlab.devices import describe_cpu, resolve_device

    threads = options.threads or max(1, cpu_count() // options.workers)
    _check_folder(plan)
    resolve_device(options.device)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(plan, open_storage(plan.storage))  # before the folder is made: a bad URL leaves nothing
    for dataset in {plan.config.data.dataset, *_dataset_choices(plan)}:
        resolve_files(dataset, options.data_dir)  # downloads once here, not in every worker
    with Interrupts() as interrupts, FolderLock(plan.out):
        _check_trial_folders(study, plan)
        write_json(plan.out / SWEEP_FILE, {"study": plan.study, "storage": _stored_storage(plan)})
        study.set_user_attr(f"cpu {HOST}", describe_cpu())
        with ask_lock(plan):
            fail_stale_local(study, plan)
        outcome = _run_workers(plan, study, options, threads, deadline, interrupts)
        outcome.report = write_report(plan.out, study, plan)
    if interrupts.pending:  # Ctrl-C: the running trials are marked failed and the report is written
        raise interrupts.interrupt()
    if outcome.stopped == "workers stopped":
        raise MnistlabError(
            f"study {plan.study}: {outcome.finished} of {plural(plan.trials, 'trial')} finished when its workers "
            f"stopped ({'; '.join(outcome.notes) or 'see above'}); run the same command to continue"
        )
    return outcome


def _dataset_choices(plan: Plan) -> list[str]:
    p = plan.space.get("data.dataset")
    return [str(v) for v in p.candidates()] if p else []


def _check_trial_folders(study: optuna.Study, plan: Plan) -> None:
    """trials/ may only hold this study's trials: a folder left by a deleted study would collide by number."""
    folder = plan.out / "trials"
    numbers = {t.number for t in study.get_trials(deepcopy=False)}
    strays = (
        [p.name for p in folder.iterdir() if not (p.name.isdigit() and int(p.name) in numbers)]
        if (folder.is_dir())
        else []
    )
    if strays:
        raise MnistlabError(
            f"{folder} holds folders that are not trials of study {plan.study!r} ({', '.join(sorted(strays)[:5])}); "
            "remove them or choose another --out"
        )


def _run_workers(
    plan: Plan, study: optuna.Study, options: SweepOptions, threads: int, deadline: float | None, interrupts: Interrupts
) -> Outcome:
    """Start the workers, watch them until they have all stopped, and record this invocation with the study."""
    start = time.time()
    before = {t.number for t in study.get_trials(deepcopy=False) if t.state != TrialState.RUNNING}
    remaining = remaining_trials(study, plan)
    progress = _TrialProgress(plan, study, before, options.quiet)
    if remaining == 0:
        progress.line(f"study {plan.study}: {plural(plan.trials, 'trial')} already finished; nothing to run")
        return Outcome(plan, Path(), progress.finished(), 0, 0.0)
    workers = min(options.workers, remaining)
    progress.line(
        f"study {plan.study}: {remaining} of {plural(plan.trials, 'trial')} to run, {plural(workers, 'worker')} x "
        f"{plural(threads, 'thread')}, storage {safe_url(plan.storage)}"
    )
    data_dir = None if options.data_dir is None else str(options.data_dir)
    procs, errors = _start_workers(Job(plan, threads, data_dir, options.device, deadline), workers)
    stopped, notes = _watch_workers(procs, plan, study, progress, interrupts)
    for p in procs:
        p.join()
    progress.update()
    progress.close()
    session = {"host": HOST, "workers": workers, "threads": threads, "start": start}
    session["seconds"] = round(time.time() - start, 1)
    session["trials"] = len(progress.seen - before)
    study.set_user_attr(f"session {HOST} {os.getpid()} {start:.0f}", session)
    messages = []
    while not errors.empty():
        messages.append(errors.get())
    if messages:
        raise MnistlabError(messages[0])
    left = remaining_trials(study, plan)
    if stopped:
        lost = [t.number for t in study.get_trials(deepcopy=False) if t.number not in before and _lost(t)]
        again = f": new trials take the places of interrupted {_trials_text(lost)}" if lost else ""
        progress.line(
            f"interrupted: {progress.finished()} of {plural(plan.trials, 'trial')} finished; rerun the same "
            f"mnistlab sweep command to continue the study{again}"
        )
    elif left:
        stopped = "timeout" if deadline is not None and time.time() >= deadline else "workers stopped"
    return Outcome(plan, Path(), progress.finished(), session["trials"], session["seconds"], stopped, notes)


def _lost(trial: optuna.trial.FrozenTrial) -> bool:
    """A trial that ended without a result (interrupted, or its worker stopped): the study runs another instead."""
    return trial.state == TrialState.FAIL and not counts_as_finished(trial)


def _trials_text(numbers: list[int]) -> str:
    """Trial numbers in words: "trial 3", "trials 3, 4", or "" for none."""
    return f"{'trial' if len(numbers) == 1 else 'trials'} {', '.join(map(str, numbers))}" if numbers else ""


def _start_workers(job: Job, workers: int) -> tuple[list[Any], Any]:
    """The worker processes, started, and the queue they report a user's error on."""
    import multiprocessing

    # Spawned, not forked: a forked copy of a process that already started OpenMP threads can deadlock.
    context = multiprocessing.get_context("spawn")
    errors = context.Queue()
    procs = [context.Process(target=worker, args=(job, errors), name=f"sweep-worker-{i}") for i in range(workers)]
    # The workers start with Ctrl-C ignored and take it once their own handler is in place: a Ctrl-C during
    # their start-up (importing torch) is then resent by `_stop_workers` instead of leaving a traceback.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for p in procs:
            p.start()
    finally:
        signal.signal(signal.SIGINT, previous)
    return procs, errors


def _watch_workers(
    procs: list[Any], plan: Plan, study: optuna.Study, progress: _TrialProgress, interrupts: Interrupts
) -> tuple[str, list[str]]:
    """Print trials as they finish until the workers have stopped; a killed or crashed worker loses only its
    trial. Returns why the study stopped early ("interrupted" on Ctrl-C) and a note per lost worker."""
    notes: list[str] = []
    handled: set[int] = set()
    try:
        while any(p.is_alive() for p in procs):
            with interrupts.allow():
                time.sleep(0.5)
            progress.update()
            for p in procs:
                if p.exitcode not in (None, 0, 2, 130) and p.pid not in handled:
                    handled.add(p.pid)  # killed or crashed: its trial is lost, the others go on
                    with ask_lock(plan):
                        lost = fail_stale_local(study, plan)
                    progress.update()
                    how = f"killed by signal {-p.exitcode}" if p.exitcode < 0 else f"crashed (exit {p.exitcode})"
                    notes.append(f"{p.name} {how}; {_trials_text(lost) or 'no trial'} marked failed")
                    progress.line(notes[-1])
    except KeyboardInterrupt:
        _stop_workers(procs)
        with ask_lock(plan):
            fail_stale_local(study, plan)
        return "interrupted", notes
    return "", notes


def _stop_workers(procs: list[Any]) -> None:
    """Pass Ctrl-C on (to workers a SIGTERM to this process alone did not reach, or still starting) until they
    have all stopped; terminate any still running after two minutes."""
    give_up = time.monotonic() + 120
    while any(p.is_alive() for p in procs) and time.monotonic() < give_up:
        for p in procs:
            if p.is_alive() and p.pid:
                os.kill(p.pid, signal.SIGINT)
        time.sleep(0.5)
    for p in procs:
        if p.is_alive():
            p.terminate()


class _TrialProgress:
    """One line per finished trial (from the storage, so other machines' trials too), and a bar on a terminal."""

    def __init__(self, plan: Plan, study: optuna.Study, before: set[int], quiet: bool):
        self.plan, self.study = plan, study
        self.seen = set(before)
        self.sign = 1 if plan.direction == "maximize" else -1
        self.out = Progress(quiet)
        self.bar = self.out.bar(plan.trials, plan.study, initial=min(self.finished(), plan.trials), unit="trial")

    def finished(self) -> int:
        return sum(counts_as_finished(t) for t in self.study.get_trials(deepcopy=False))

    def line(self, text: str) -> None:
        self.out.line(text)

    def update(self) -> None:
        trials = self.study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        best = max(complete, key=lambda t: self.sign * t.value) if complete else None
        done = sum(counts_as_finished(t) for t in trials if t.number in self.seen)
        for t in sorted(trials, key=lambda t: t.number):
            if t.number in self.seen or t.state in (TrialState.RUNNING, TrialState.WAITING):
                continue
            self.seen.add(t.number)
            done += counts_as_finished(t)
            self.line(self._describe(t, best, done))
            self.bar.n = min(self.plan.trials, done)
            self.bar.refresh()

    def _describe(self, t: optuna.trial.FrozenTrial, best: Any, done: int) -> str:
        r = result_of(t)
        params = " ".join(f"{k}={show_value(self.plan.space[k].value_of(v))}" for k, v in t.params.items())
        acc = f"val acc {100 * r['val_accuracy']:.2f}%" if "val_accuracy" in r else ""
        loss = f"val loss {r['val_loss']:.4f}" if self.plan.metric == "val_loss" and "val_loss" in r else ""
        took = f"{r['epochs']} ep {r['seconds']:.1f}s" if "seconds" in r else ""
        parts = [f"trial {t.number} {state_text(t)}", acc, loss, params, took]
        if best is not None:
            parts.append(f"{done}/{self.plan.trials}, best #{best.number} {metric_text(self.plan.metric, best.value)}")
        return " | ".join(p for p in parts if p)

    def close(self) -> None:
        self.bar.close()


def sweep(options: SweepOptions) -> Path:
    """Run a sweep (or continue it) and return its report's path. With several base configs (a preset such
    as `seed-lr`), one study per config runs in turn, each in its own sub-folder, plus a summary report."""
    plans = make_plans(options)
    deadline = time.time() + options.timeout if options.timeout else None
    if len(plans) == 1:
        outcome = run_plan(plans[0], options, deadline)
        _say_stopped(outcome, options.quiet)
        return outcome.report
    folder = plans[0].out.parent
    marker = folder / SWEEP_FILE
    parts = [p.out.name for p in plans]
    if not marker.is_file():
        check_output_dir(folder, force=False)
    elif json.loads(marker.read_text()).get("parts") != parts:
        raise MnistlabError(f"{folder} is the folder of another sweep; choose another --out")
    write_json(marker, {"parts": parts})
    for plan in plans:
        if deadline is not None and time.time() >= deadline:
            if not options.quiet:
                print(f"time is up: study {plan.study} not started; run the same command to continue", file=sys.stderr)
            continue
        _say_stopped(run_plan(plan, options, deadline), options.quiet)
    return write_summary(folder)


def _say_stopped(outcome: Outcome, quiet: bool) -> None:
    if outcome.stopped and not quiet:
        print(
            f"study {outcome.plan.study} stopped ({outcome.stopped}) at {outcome.finished} of "
            f"{plural(outcome.plan.trials, 'trial')}; run the same command to continue",
            file=sys.stderr,
        )
