"""Storage: a study on an Optuna storage (a journal file that parallel processes share, or an SQL database that
many machines share), opened, checked against its plan, and read back: the trials' results and workers, and a
sweep folder's study for the report."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from mnistlab.config import config_from_dict
from mnistlab.errors import MnistlabError
from mnistlab.files import make_dirs
from mnistlab.sweep.plan import JOURNAL, SWEEP_FILE, Plan, is_database
from mnistlab.sweep.space import Param

ATTR = "mnistlab"  # the study's user attribute holding its space, base config and metric


def safe_url(storage: str) -> str:
    """A storage for display and for sweep.json: an SQL URL without its password (libpq finds it again in
    PGPASSWORD or ~/.pgpass), or a journal file's path."""
    if not is_database(storage):
        return storage
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(storage)._replace(password=None).render_as_string(hide_password=False)
    except (ArgumentError, ValueError):
        return storage.split("://", 1)[0] + "://..."


def open_storage(storage: str, heartbeat: bool = False) -> optuna.storages.BaseStorage:
    """An Optuna storage: a journal file (made if missing) or an SQL database URL, checked by connecting.

    With `heartbeat` (workers on an SQL database), each running trial records a heartbeat, and a trial whose
    worker stopped beating for `grace_period` seconds is marked failed by the next worker that asks for one.
    """
    if not is_database(storage):
        path = Path(storage)
        make_dirs(path.parent)
        try:
            return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
        except OSError as exc:
            raise MnistlabError(f"{path}: cannot open the journal file ({exc.strerror})") from None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    shown = safe_url(storage)
    try:
        backend = make_url(storage).get_backend_name()
    except (ArgumentError, ValueError):
        raise MnistlabError(f"--storage {shown}: not a database URL (e.g. postgresql://user@host/db)") from None
    # Without a timeout, an unreachable host keeps a connection attempt waiting for minutes.
    connect = {"connect_timeout": 10} if backend in ("postgresql", "mysql") else {}
    beats = {"heartbeat_interval": 30, "grace_period": 120} if heartbeat else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(storage, engine_kwargs={"connect_args": connect}, **beats)
    except (SQLAlchemyError, ImportError, OSError, ValueError) as exc:
        reason = " ".join(str(getattr(exc, "orig", None) or exc).split())
        if isinstance(exc, ImportError):
            reason += f" (no Python driver for {backend} is installed)"
        raise MnistlabError(f"cannot open storage {shown}: {reason[:300]}") from None


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


def open_study(plan: Plan, storage: optuna.storages.BaseStorage) -> optuna.Study:
    """Create the plan's study, or load it when it exists with the same space, base config and metric."""
    try:
        study = optuna.create_study(
            storage=storage, study_name=plan.study, direction=plan.direction, load_if_exists=True
        )
    except (ValueError, optuna.exceptions.OptunaError) as exc:
        raise MnistlabError(f"study {plan.study!r}: {' '.join(str(exc).split())}") from None
    stored, ours = study.user_attrs.get(ATTR), plan.attrs()
    if stored is None:
        if study.get_trials(deepcopy=False):
            raise MnistlabError(f"study {plan.study!r} already holds trials not made by mnistlab; use another --study")
        study.set_user_attr(ATTR, ours)
        return study
    # A sweep folder holds one study's trials, so a new study needs a new folder; on the folder's own journal
    # that is all (the study is named after its folder), on a shared storage it needs a name of its own too.
    own = plan.journal and Path(plan.storage) == plan.out / JOURNAL
    new = "another --out" if own else "another --study and another --out"
    for part, what in (("metric", "metric"), ("space", "search space"), ("config", "base config")):
        changed = _differences(stored[part], ours[part])
        if changed:
            raise MnistlabError(
                f"study {plan.study!r} in {safe_url(plan.storage)} exists with a different {what} "
                f"({', '.join(changed[:6]) or part} differ); give the same settings to continue it, or {new} to "
                "start a new study"
            )
    return study


def load_sweep(folder: str | Path, storage: str | None = None) -> tuple[optuna.Study, Plan]:
    """A sweep folder's study, opened on the storage its sweep.json names (or `storage`), and its plan."""
    folder = Path(folder)
    marker = folder / SWEEP_FILE
    try:
        saved = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        raise MnistlabError(f"{folder}: no sweep here ({SWEEP_FILE} missing or unreadable)") from None
    where = storage or saved["storage"]
    database = is_database(where)
    if not database and not Path(where).is_absolute():
        where = str(folder / where)
    if not database and not Path(where).is_file():
        raise MnistlabError(f"{where}: the sweep's journal file is missing")
    try:
        opened = open_storage(where)
    except MnistlabError as exc:
        if storage is None and database:  # sweep.json keeps the URL without its password
            raise MnistlabError(f"{exc} (give --storage with the full URL, or set PGPASSWORD)") from None
        raise
    try:
        study = optuna.load_study(study_name=saved["study"], storage=opened)
    except KeyError:
        raise MnistlabError(f"no study {saved['study']!r} in {safe_url(where)}") from None
    attrs = study.user_attrs.get(ATTR)
    if attrs is None:
        raise MnistlabError(f"study {saved['study']!r} was not made by mnistlab sweep")
    space = {key: Param.from_dict(key, d) for key, d in attrs["space"].items()}
    config = config_from_dict(attrs["config"], source=f"study {saved['study']}")
    description = attrs.get("description", "")
    plan = Plan(saved["study"], config, space, attrs["metric"], 0, "", where, folder.resolve(), description)
    return study, plan


# What the storage holds about each trial, as the workers store it.


def worker_of(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """Which worker ran a trial: host, pid and run directory."""
    return trial.user_attrs.get("worker", {})


def result_of(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """How a trial ended: the saved model's metrics, epochs, seconds, and why it was pruned or failed."""
    return trial.user_attrs.get("result", {})


def counts_as_finished(trial: optuna.trial.FrozenTrial) -> bool:
    """Complete, pruned, or failed by its own settings (training refused them): a result. A trial failed by an
    interrupt or a stopped worker is not one, and its place in `--trials` is run again."""
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        trial.state == TrialState.FAIL and "error" in result_of(trial)
    )
