"""Hyperparameter sweeps on Optuna: search spaces as data, every trial an ordinary run directory, the study on an
Optuna storage that parallel processes (a journal file) or many machines (an SQL database) share.

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
import fcntl
import itertools
import json
import math
import os
import signal
import socket
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from mnistlab.config import PRUNERS, Config, config_from_dict, load_config
from mnistlab.errors import MnistlabError
from mnistlab.files import FolderLock, atomic_write_text, check_output_dir, make_dirs, write_json

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

try:
    import optuna
    from optuna.trial import TrialState
except ImportError:  # pragma: no cover - depends on the installation
    raise MnistlabError("mnistlab sweep needs Optuna: pip install 'mnistlab[sweep]'") from None

METRICS = {"val_accuracy": "maximize", "val_loss": "minimize"}
JOURNAL = "study.journal"
SWEEP_FILE = "sweep.json"
HOST = socket.gethostname()
# Every categorical combination of a space is checked against the config rules before any training; past this
# many combinations each value is checked on its own instead.
MAX_CHECKED_POINTS = 4096
ATTR = "mnistlab"  # the study's user attribute holding its space, base config and metric


# ---------------------------------------------------------------------------------------------- search spaces


def config_keys() -> dict[str, Any]:
    """Every key a sweep may set (`section.field`), mapped to its default, whose type a value must have."""
    base = Config()
    keys = {}
    for section in dataclasses.fields(Config):
        table = getattr(base, section.name)
        if dataclasses.is_dataclass(table):
            for f in dataclasses.fields(table):
                keys[f"{section.name}.{f.name}"] = getattr(table, f.name)
    return keys


def _sections() -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    for key in config_keys():
        section, field = key.split(".")
        sections.setdefault(section, []).append(field)
    return sections


def _type_name(default: Any) -> str:
    if isinstance(default, list):
        return "list"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[type(default)]


def _coerce(value: Any, default: Any, where: str) -> Any:
    """`value` as the type of `default` (an int where a float is expected becomes a float); else an error."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, list):
        ok = isinstance(value, list)
    else:
        ok = isinstance(value, str) and bool(value)
    if not ok:
        raise MnistlabError(f"{where}: {value!r} is not {_type_name(default)}")
    return value


def _parse_scalar(text: str, default: Any, where: str) -> Any:
    """A value written on the command line, parsed to the type of `default`."""
    text = text.strip()
    if isinstance(default, list):
        raise MnistlabError(
            f"{where}: list values (model.hidden, model.layers, model.activations) go in a --space-file TOML, "
            'e.g. "model.hidden" = [[512], [512, 64]]'
        )
    if isinstance(default, bool):
        if text in ("true", "false"):
            return text == "true"
    elif isinstance(default, (int, float)):
        try:
            return _coerce(int(text) if isinstance(default, int) else float(text), default, where)
        except ValueError:
            pass
    elif text:
        return text
    raise MnistlabError(f"{where}: {text!r} is not {_type_name(default)}")


def _label(choice: Any) -> Any:
    """How a categorical choice is stored in Optuna, which takes scalars only: lists and tables become JSON."""
    if isinstance(choice, (list, dict)):
        return json.dumps(choice, sort_keys=True)
    return choice


def show_value(value: Any) -> str:
    """A parameter value, short, for tables and progress lines."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={show_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(show_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass(frozen=True)
class Param:
    """One searched config key: a range (`log`, `int`, `float`) or a set of choices.

    The key is a dotted config key, or a section name whose choices are tables setting several of its keys at
    once (`optimizer` = [{name = "sgd", momentum = 0.9}, {name = "adam"}]).
    """

    key: str
    kind: str  # log, int, float or choice
    low: float | int | None = None
    high: float | int | None = None
    choices: tuple[Any, ...] = ()

    @property
    def integer(self) -> bool:
        return isinstance(self.low, int)

    def suggest(self, trial: optuna.trial.Trial) -> Any:
        """The value Optuna's sampler picks for this trial, as the config takes it."""
        if self.kind == "choice":
            return self.value_of(trial.suggest_categorical(self.key, [_label(c) for c in self.choices]))
        if self.integer:
            return trial.suggest_int(self.key, self.low, self.high, log=self.kind == "log")
        return trial.suggest_float(self.key, self.low, self.high, log=self.kind == "log")

    def value_of(self, stored: Any) -> Any:
        """A value as Optuna stored it (a trial's params), as the config takes it."""
        if self.kind != "choice":
            return stored
        labels = [_label(c) for c in self.choices]
        return self.choices[labels.index(stored)]

    def candidates(self) -> list[Any]:
        """The values checked against the config rules before any training: each choice, or both ends."""
        return list(self.choices) if self.kind == "choice" else [self.low, self.high]

    def spec(self) -> str:
        """The range as written on the command line, or the choices, for the report."""
        if self.kind == "choice":
            return ", ".join(show_value(c) for c in self.choices)
        return f"{self.kind}:{self.low!r}:{self.high!r}"

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "choice":
            return {"kind": "choice", "choices": list(self.choices)}
        return {"kind": self.kind, "low": self.low, "high": self.high}


def parse_spec(key: str, spec: str) -> Param | Any:
    """`--space KEY=SPEC`: a Param for `log:LO:HI`, `int:LO:HI`, `float:LO:HI` or `A,B,C`; a single value
    (no comma) is returned as is, a fixed setting for every trial."""
    default = _default_of(key)
    where = f"--space {key}"
    head, _, rest = spec.partition(":")
    if head in ("log", "int", "float"):
        bounds = rest.split(":")
        if len(bounds) != 2:
            raise MnistlabError(f"{where}={spec}: a range is {head}:LOW:HIGH")
        if isinstance(default, bool) or not isinstance(default, (int, float)):
            raise MnistlabError(f"{where}={spec}: a range needs a numeric key ({key} is {_type_name(default)})")
        if head == "int" and not isinstance(default, int):
            raise MnistlabError(f"{where}={spec}: {key} takes a number; use float:LOW:HIGH or log:LOW:HIGH")
        if head == "float" and isinstance(default, int):
            raise MnistlabError(f"{where}={spec}: {key} takes an integer; use int:LOW:HIGH or log:LOW:HIGH")
        low, high = (_parse_scalar(b, default, where) for b in bounds)
        return _range(key, head, low, high)
    if not spec.strip():
        raise MnistlabError(f"{where}: empty spec (use log:LOW:HIGH, int:LOW:HIGH, float:LOW:HIGH or A,B,C)")
    if ":" in spec and not isinstance(default, str):
        raise MnistlabError(f"{where}={spec}: unknown range kind {head!r} (use log:, int: or float:, or A,B,C)")
    values = [_parse_scalar(v, default, where) for v in spec.split(",")]
    return values[0] if len(values) == 1 else _choice(key, values)


def _range(key: str, kind: str, low: Any, high: Any) -> Param:
    where = f"--space {key}"
    if not low < high:
        raise MnistlabError(f"{where}: empty range {kind}:{low}:{high} (LOW must be below HIGH)")
    if kind == "log" and low <= 0:
        raise MnistlabError(f"{where}: a log range needs positive bounds, got {kind}:{low}:{high}")
    return Param(key, kind, low, high)


def _choice(key: str, values: list[Any]) -> Param:
    labels = [_label(v) for v in values]
    if len(set(map(repr, labels))) != len(labels):
        raise MnistlabError(f"--space {key}: a choice is given twice ({', '.join(map(show_value, values))})")
    return Param(key, "choice", choices=tuple(values))


def _default_of(key: str) -> Any:
    keys = config_keys()
    if key in keys:
        return keys[key]
    section = key.split(".")[0]
    sections = _sections()
    if section in sections and "." in key:
        known = ", ".join(sections[section])
        raise MnistlabError(f"unknown config key {key!r} in the search space (keys of [{section}]: {known})")
    raise MnistlabError(
        f"unknown config key {key!r} in the search space (use section.key with a section of "
        f"{', '.join(sections)}, e.g. optimizer.lr)"
    )


def _file_choice(key: str, value: Any) -> Any:
    """One choice from a TOML file, typed: a scalar or list for a config key, a table for a section."""
    where = f"space {key}"
    if "." in key:
        default = _default_of(key)
        if isinstance(value, str) and not isinstance(default, str):
            return _parse_scalar(value, default, where)
        return _coerce(value, default, where)
    if not isinstance(value, dict) or not value:
        raise MnistlabError(f"{where}: each choice for a whole section is a table of its keys, e.g. {{name = 'sgd'}}")
    return {k: _file_choice(f"{key}.{k}", v) for k, v in value.items()}  # unknown keys: _default_of says so


def _file_entry(key: str, value: Any) -> Param | Any:
    """A `[space]` entry: a spec string, a list of choices, or a single value (fixed)."""
    if "." not in key and key not in _sections():
        _default_of(key)  # raises with the list of sections
    if "." in key and isinstance(value, str):
        return parse_spec(key, value)
    if isinstance(value, list):
        if "." in key and isinstance(_default_of(key), list) and not all(isinstance(v, list) for v in value):
            raise MnistlabError(f"space {key}: give a list of choices, each itself a list, e.g. [[512], [512, 64]]")
        values = [_file_choice(key, v) for v in value]
        if not values:
            raise MnistlabError(f"space {key}: no choices")
        return values[0] if len(values) == 1 else _choice(key, values)
    return _file_choice(key, value)


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested TOML tables (`optimizer.lr = ...` unquoted) as dotted keys; tables inside lists stay tables."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict) and not prefix and key in _sections():
            flat.update(_flatten(value, f"{key}."))
        else:
            flat[prefix + key] = value
    return flat


@dataclass
class Space:
    """What a sweep searches (`params`) and what it fixes for every trial (`fixed`), by dotted key."""

    params: dict[str, Param] = dataclasses.field(default_factory=dict)
    fixed: dict[str, Any] = dataclasses.field(default_factory=dict)

    def add(self, key: str, entry: Param | Any) -> None:
        self.params.pop(key, None)
        self.fixed.pop(key, None)
        if isinstance(entry, Param):
            self.params[key] = entry
        else:
            self.fixed[key] = entry


@dataclass
class SweepFile:
    """A space file (`--space-file`) or a shipped preset: the space, fixed settings and optional defaults."""

    space: Space
    description: str = ""
    configs: list[str] = dataclasses.field(default_factory=list)
    trials: int | None = None


def load_space_file(path: str | Path) -> SweepFile:
    """Read a space file: `[space]` (KEY = "SPEC" or a list of choices), `[set]` (fixed values) and, for presets,
    `description`, `configs` (one study per config) and `trials`."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise MnistlabError(f"{path}: cannot read the space file ({exc.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise MnistlabError(f"{path}: not valid TOML ({exc})") from None
    unknown = set(data) - {"space", "set", "description", "configs", "trials"}
    if unknown:
        raise MnistlabError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} (known: space, set, configs, trials)")
    space = Space()
    try:
        for key, value in _flatten(data.get("set", {})).items():
            space.add(key, _coerce(value, _default_of(key), f"set {key}"))
        for key, value in _flatten(data.get("space", {})).items():
            space.add(key, _file_entry(key, value))
        _overlaps(space)
    except MnistlabError as exc:
        raise MnistlabError(f"{path}: {exc}") from None
    configs, trials = data.get("configs", []), data.get("trials")
    if not (isinstance(configs, list) and all(isinstance(c, str) for c in configs)):
        raise MnistlabError(f"{path}: configs must be a list of config names or files")
    if trials is not None and (not isinstance(trials, int) or trials < 1):
        raise MnistlabError(f"{path}: trials must be a positive integer")
    return SweepFile(space, str(data.get("description", "")), configs, trials)


def presets() -> dict[str, Path]:
    """The shipped sweep presets (`mnistlab/sweeps/*.toml`), by name."""
    folder = resources.files("mnistlab") / "sweeps"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".toml")}


def apply(base: Config, values: Mapping[str, Any], name: str | None = None) -> Config:
    """`base` with dotted keys (and whole-section tables) replaced, validated like any config."""
    data = base.to_dict()
    for key, value in values.items():
        section, _, field = key.partition(".")
        if field:
            data[section][field] = value
        else:
            data[section].update(value)
    if name is not None:
        data["name"] = name
    shown = ", ".join(f"{k}={show_value(v)}" for k, v in values.items())
    return config_from_dict(data, source=f"{base.name} with {shown}" if shown else base.name)


def _overlaps(space: Space) -> None:
    keys = [*space.params, *space.fixed]
    for key in keys:
        if "." in key:
            continue
        values = space.params[key].choices if key in space.params else [space.fixed[key]]
        for other in keys:
            if other.startswith(key + ".") and any(other.split(".")[1] in v for v in values):
                raise MnistlabError(f"{other} is set both on its own and by the choices for [{key}]; keep one")


def check_space(base: Config, space: Space) -> None:
    """Refuse, before any training, a space with nothing to search or with a point the config rules reject
    (all categorical combinations with each range's ends; each value alone when there are too many)."""
    if not space.params:
        raise MnistlabError("nothing to search: give --space KEY=SPEC with a range or several choices")
    _overlaps(space)
    fixed = apply(base, space.fixed)
    options = [[(key, v) for v in p.candidates()] for key, p in space.params.items()]
    if math.prod(len(o) for o in options) <= MAX_CHECKED_POINTS:
        points = [dict(point) for point in itertools.product(*options)]
    else:
        first = {key: p.candidates()[0] for key, p in space.params.items()}
        points = [{**first, key: value} for option in options for key, value in option]
    for point in points:
        config = apply(fixed, point)
        if config.data.val_size < 1:
            raise MnistlabError(
                "a sweep chooses on the validation split: data.val_size must be above 0 (the test set never chooses)"
            )


# ---------------------------------------------------------------------------------------------- plans


@dataclass
class Plan:
    """One study: what it searches, over which base config, for which metric, where it is stored."""

    study: str
    config: Config  # the base config with the space's fixed values applied
    space: dict[str, Param]
    metric: str
    trials: int
    pruner: str
    storage: str  # an SQL database URL, or a journal file path
    out: Path
    description: str = ""  # what the sweep asks (a preset's description), for the report

    @property
    def direction(self) -> str:
        return METRICS[self.metric]

    @property
    def journal(self) -> bool:
        return "://" not in self.storage

    def attrs(self) -> dict[str, Any]:
        """What makes a study this study; stored with it and compared when the study is continued."""
        space = {key: p.to_dict() for key, p in self.space.items()}
        attrs = {"space": space, "config": self.config.to_dict(), "metric": self.metric}
        return json.loads(json.dumps({**attrs, "description": self.description}))


def make_plans(
    config: str | None = None,
    space: Sequence[str] = (),
    space_file: str | Path | None = None,
    preset: str | None = None,
    trials: int | None = None,
    metric: str = "val_accuracy",
    pruner: str = "median",
    storage: str | None = None,
    study: str | None = None,
    out: str | Path | None = None,
    epochs: int | None = None,
) -> list[Plan]:
    """Read and check everything a sweep needs, before any work: one Plan per base config.

    `space` holds `KEY=SPEC` strings, which add to (or replace keys of) the space file or preset.
    """
    if preset and space_file:
        raise MnistlabError("give --preset or --space-file, not both")
    if preset:
        known = presets()
        if preset not in known:
            raise MnistlabError(f"no sweep preset named {preset!r} (presets: {', '.join(sorted(known))})")
        spec = load_space_file(known[preset])
    else:
        spec = load_space_file(space_file) if space_file else SweepFile(Space())
    for item in space:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise MnistlabError(f"--space {item!r}: write KEY=SPEC, e.g. optimizer.lr=log:1e-4:1")
        spec.space.add(key.strip(), parse_spec(key.strip(), text))
    if epochs is not None:
        spec.space.add("training.epochs", epochs)
    if metric not in METRICS:
        extra = " (the test set never chooses)" if metric.startswith("test") else ""
        raise MnistlabError(f"unknown metric {metric!r}{extra}: choose from {', '.join(METRICS)}")
    if pruner not in PRUNERS:
        raise MnistlabError(f"unknown pruner {pruner!r}: choose from {', '.join(PRUNERS)}")
    names = [config] if config else spec.configs
    if not names:
        raise MnistlabError("give --config NAME|FILE (the base config every trial starts from), or --preset NAME")
    trials = trials if trials is not None else spec.trials or 20
    if trials < 1:
        raise MnistlabError("--trials must be at least 1")
    bases = [load_config(name) for name in names]
    for base in bases:
        check_space(base, spec.space)
    folder = Path(out) if out else Path("sweeps") / (preset or bases[0].name)
    study = study or folder.resolve().name
    plans = []
    for base in bases:
        part = folder / base.name if len(bases) > 1 else folder
        name = f"{study}-{base.name}" if len(bases) > 1 else study
        where = storage if storage and "://" in storage else str(Path(storage or part / JOURNAL).resolve())
        fixed = apply(base, spec.space.fixed)
        params = dict(spec.space.params)
        plans.append(Plan(name, fixed, params, metric, trials, pruner, where, part.resolve(), spec.description))
    return plans


# ---------------------------------------------------------------------------------------------- storage


def safe_url(storage: str) -> str:
    """A storage for display and for sweep.json: an SQL URL without its password (libpq finds it again in
    PGPASSWORD or ~/.pgpass), or a journal file's path."""
    if "://" not in storage:
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
    if "://" not in storage:
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
    for part, what in (("metric", "metric"), ("space", "search space"), ("config", "base config")):
        changed = _differences(stored[part], ours[part])
        if changed:
            raise MnistlabError(
                f"study {plan.study!r} in {safe_url(plan.storage)} exists with a different {what} "
                f"({', '.join(changed[:6]) or part} differ); give the same settings to continue it, or another --study"
            )
    return study


# ---------------------------------------------------------------------------------------------- interrupts


class _Interrupts:
    """Ctrl-C and SIGTERM become KeyboardInterrupt only inside `allow()` blocks (training, waiting); anywhere
    else, in the middle of a storage write, they are held back until the next such block, so an interrupt
    never leaves half a journal entry or a stale journal lock behind."""

    def __init__(self) -> None:
        self.allowed = False
        self.pending = False
        self._previous: dict[int, Any] = {}

    def install(self) -> _Interrupts:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        self.pending = True
        if self.allowed:
            self.allowed = False  # a second signal while this one unwinds only marks it pending
            raise KeyboardInterrupt

    @contextmanager
    def allow(self) -> Iterator[None]:
        if self.pending:
            raise KeyboardInterrupt
        self.allowed = True
        try:
            yield
        finally:
            self.allowed = False

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Inside an `allow()` block: hold interrupts back for a moment (a storage write)."""
        allowed, self.allowed = self.allowed, False
        try:
            yield
        finally:
            self.allowed = allowed
        if allowed and self.pending:
            raise KeyboardInterrupt


class _FileLock:
    """A blocking flock on a file: one process at a time counts the study's trials and asks for a new one."""

    def __init__(self, path: Path):
        self.fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# ---------------------------------------------------------------------------------------------- trials


def _worker_info(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    return trial.user_attrs.get("worker", {})


def _result(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    return trial.user_attrs.get("result", {})


def counts_as_finished(trial: optuna.trial.FrozenTrial) -> bool:
    """Complete, pruned, or failed by its own settings (training refused them): a result. A trial failed by an
    interrupt or a stopped worker is not one, and its place in `--trials` is run again."""
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        trial.state == TrialState.FAIL and "error" in _result(trial)
    )


def _running_here_or_beating(trial: optuna.trial.FrozenTrial, plan: Plan) -> bool:
    """A running trial that still holds its place: on a database every live one (stale ones are failed by the
    heartbeat), on a journal file those of this machine (stale ones are failed by `fail_stale_local`). Running
    trials of other machines sharing a journal are not counted, so such a study may end a trial or two past
    `--trials` rather than wait forever for a machine that stopped."""
    return trial.state == TrialState.RUNNING and (not plan.journal or _worker_info(trial).get("host") == HOST)


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
        info = _worker_info(trial)
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
        epochs = max([plan.config.training.epochs, *(_epoch_choices(plan))])
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs)
    return optuna.pruners.NopPruner()


def _epoch_choices(plan: Plan) -> list[int]:
    p = plan.space.get("training.epochs")
    return [int(v) for v in p.candidates()] if p else []


@dataclass
class _Job:
    """What a worker process needs (sent to it pickled)."""

    plan: Plan
    threads: int
    data_dir: str | None
    device: str
    deadline: float | None


class _Objective:
    """One trial: a config from the sampled values, trained as an ordinary run in `trials/<number>/`, reporting
    the validation metric after every epoch so the pruner can stop it."""

    def __init__(self, job: _Job, interrupts: _Interrupts):
        self.job, self.plan, self.interrupts = job, job.plan, interrupts
        self.ask_lock: _FileLock | None = None
        self.trial_lock: FolderLock | None = None
        self._data: dict[tuple, Any] = {}

    def data(self, config: Config) -> Any:
        from mnistlab.data.splits import load_data

        key = (config.data.dataset, config.data.val_size, config.training.seed)
        if key not in self._data:  # the validation split depends on the seed: one load per (dataset, size, seed)
            d = config.data
            self._data[key] = load_data(d.dataset, self.job.data_dir, d.val_size, config.training.seed, "cpu")
        return self._data[key]

    def __call__(self, trial: optuna.trial.Trial) -> float:
        from mnistlab.train.loop import train

        plan, number = self.plan, trial.number
        run_dir = plan.out / "trials" / str(number)
        self.trial_lock = FolderLock(run_dir).acquire()  # held until the trial's state is stored
        trial.set_user_attr("worker", {"host": HOST, "pid": os.getpid(), "run_dir": str(run_dir)})
        assert self.ask_lock is not None
        self.ask_lock.release()
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
                )
        except optuna.TrialPruned as exc:
            reason = str(exc) or "pruned"
            result = self._result(reports, start, pruned_at=len(reports), reason=reason)
            trial.set_user_attr("result", result)
            _write_marker(run_dir, plan.study, number, "pruned", **details, **result)
            raise
        except KeyboardInterrupt:
            result = self._result(reports, start, reason="interrupted")
            trial.set_user_attr("result", result)
            _write_marker(run_dir, plan.study, number, "failed", **details, **result)
            raise
        except MnistlabError as exc:
            result = self._result(reports, start, error=str(exc))
            trial.set_user_attr("result", result)
            _write_marker(run_dir, plan.study, number, "failed", **details, **result)
            raise
        saved = run.best if config.training.early_stopping else run.final
        result = self._result(run.epochs, start, saved_epoch=saved["epoch"], saved=saved)
        trial.set_user_attr("result", result)
        _write_marker(run_dir, plan.study, number, "complete", **details, **result, value=saved[plan.metric])
        return saved[plan.metric]

    @staticmethod
    def _result(epochs: list[dict], start: float, saved: dict | None = None, **extra: Any) -> dict[str, Any]:
        """What the report needs from a trial: metrics of the saved model (or the last epoch), epochs, time."""
        last = saved or (epochs[-1] if epochs else {})
        keys = ("val_accuracy", "val_loss", "test_accuracy", "test_loss")
        metrics = {k: last[k] for k in keys if k in last and math.isfinite(last[k])}
        return {**metrics, "epochs": len(epochs), "seconds": round(time.perf_counter() - start, 3), **extra}


def _worker(job: _Job, errors: Any) -> None:
    """A worker process: asks the study for trials and runs them until `--trials` are taken, time is up, or
    it is interrupted. Its torch threads are the machine's share for one worker."""
    import torch

    interrupts = _Interrupts().install()
    torch.set_num_threads(job.threads)
    # A trial that training refused (a MnistlabError) is a result stored with the trial, not a warning to log.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    plan = job.plan
    try:
        storage = open_storage(plan.storage, heartbeat=not plan.journal)
        study = optuna.load_study(
            study_name=plan.study, storage=storage, sampler=optuna.samplers.TPESampler(), pruner=_make_pruner(plan)
        )
        objective = _Objective(job, interrupts)
        while not interrupts.pending and (job.deadline is None or time.time() < job.deadline):
            objective.ask_lock = _FileLock(plan.out / ".ask.lock")
            try:
                if not plan.journal:
                    optuna.storages.fail_stale_trials(study)
                if remaining_trials(study, plan) == 0:
                    break
                study.optimize(objective, n_trials=1, catch=(MnistlabError,), gc_after_trial=False)
            finally:
                objective.ask_lock.release()
                if objective.trial_lock is not None:
                    objective.trial_lock.release()
                    objective.trial_lock = None
    except KeyboardInterrupt:
        sys.exit(130)
    except MnistlabError as exc:
        errors.put(str(exc))
        sys.exit(2)
    finally:
        interrupts.restore()


# ---------------------------------------------------------------------------------------------- running a study


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


def cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS and Windows
        return os.cpu_count() or 1


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


def run_plan(
    plan: Plan,
    workers: int = 1,
    threads: int | None = None,
    data_dir: str | Path | None = None,
    device: str = "auto",
    deadline: float | None = None,
    quiet: bool = False,
) -> Outcome:
    """Run (or continue) one study to `plan.trials` finished trials with `workers` processes on this machine,
    then write its report. Safe to run again: it continues where the study stands."""
    from mnistlab.data.download import resolve_files
    from mnistlab.devices import describe_cpu, resolve_device

    if workers < 1:
        raise MnistlabError("--workers must be at least 1")
    threads = threads or max(1, cores() // workers)
    _check_folder(plan)
    resolve_device(device)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(plan, open_storage(plan.storage))  # before the folder is made: a bad URL leaves nothing
    for dataset in {plan.config.data.dataset, *_dataset_choices(plan)}:
        resolve_files(dataset, data_dir)  # downloads once here, not in every worker
    interrupts = _Interrupts().install()
    try:
        with FolderLock(plan.out):
            _check_trial_folders(study, plan)
            write_json(plan.out / SWEEP_FILE, {"study": plan.study, "storage": _stored_storage(plan)})
            study.set_user_attr(f"cpu {HOST}", describe_cpu())
            lock = _FileLock(plan.out / ".ask.lock")
            try:
                fail_stale_local(study, plan)
            finally:
                lock.release()
            outcome = _run_workers(plan, study, workers, threads, data_dir, device, deadline, quiet, interrupts)
            outcome.report = write_report(plan.out, study, plan)
    finally:
        interrupts.restore()
    if interrupts.pending:  # Ctrl-C: the running trials are marked failed and the report is written
        raise KeyboardInterrupt
    if outcome.stopped == "workers stopped":
        raise MnistlabError(
            f"study {plan.study}: {outcome.finished} of {plan.trials} trials finished when its workers stopped "
            f"({'; '.join(outcome.notes) or 'see above'}); run the same command to continue"
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
    plan: Plan,
    study: optuna.Study,
    workers: int,
    threads: int,
    data_dir: str | Path | None,
    device: str,
    deadline: float | None,
    quiet: bool,
    interrupts: _Interrupts,
) -> Outcome:
    import multiprocessing

    start = time.time()
    before = {t.number for t in study.get_trials(deepcopy=False) if t.state != TrialState.RUNNING}
    remaining = remaining_trials(study, plan)
    progress = _Progress(plan, study, before, quiet)
    if remaining == 0:
        progress.line(f"study {plan.study}: {plan.trials} trials already finished; nothing to run")
        return Outcome(plan, Path(), progress.finished(), 0, 0.0)
    workers = min(workers, remaining)
    progress.line(
        f"study {plan.study}: {remaining} of {plan.trials} trials to run, {workers} worker(s) x {threads} "
        f"thread(s), storage {safe_url(plan.storage)}"
    )
    # Spawned, not forked: a forked copy of a process that already started OpenMP threads can deadlock.
    context = multiprocessing.get_context("spawn")
    errors = context.Queue()
    job = _Job(plan, threads, None if data_dir is None else str(data_dir), device, deadline)
    procs = [context.Process(target=_worker, args=(job, errors), name=f"sweep-worker-{i}") for i in range(workers)]
    # The workers start with Ctrl-C ignored and take it once their own handler is in place: a Ctrl-C during
    # their start-up (importing torch) is then resent below instead of leaving a traceback from an import.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for p in procs:
            p.start()
    finally:
        signal.signal(signal.SIGINT, previous)
    session = {"host": HOST, "workers": workers, "threads": threads, "start": start}
    stopped, notes = "", []
    try:
        handled: set[int] = set()
        while any(p.is_alive() for p in procs):
            with interrupts.allow():
                time.sleep(0.5)
            progress.update()
            for p in procs:
                if p.exitcode not in (None, 0, 2, 130) and p.pid not in handled:
                    handled.add(p.pid)  # killed or crashed: its trial is lost, the others go on
                    lock = _FileLock(plan.out / ".ask.lock")
                    try:
                        lost = fail_stale_local(study, plan)
                    finally:
                        lock.release()
                    progress.update()
                    how = f"killed by signal {-p.exitcode}" if p.exitcode < 0 else f"crashed (exit {p.exitcode})"
                    notes.append(f"{p.name} {how}; trial(s) {', '.join(map(str, lost)) or 'none'} marked failed")
                    progress.line(notes[-1])
    except KeyboardInterrupt:
        stopped = "interrupted"
        # Pass it on (a SIGTERM to this process alone, or workers still starting), until they have all stopped.
        give_up = time.monotonic() + 120
        while any(p.is_alive() for p in procs) and time.monotonic() < give_up:
            for p in procs:
                if p.is_alive() and p.pid:
                    os.kill(p.pid, signal.SIGINT)
            time.sleep(0.5)
        for p in procs:
            if p.is_alive():
                p.terminate()
        lock = _FileLock(plan.out / ".ask.lock")
        try:
            fail_stale_local(study, plan)
        finally:
            lock.release()
    for p in procs:
        p.join()
    progress.update()
    progress.close()
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
        progress.line(f"interrupted: {progress.finished()} of {plan.trials} trials finished; run it again to continue")
    elif left:
        stopped = "timeout" if deadline is not None and time.time() >= deadline else "workers stopped"
    return Outcome(plan, Path(), progress.finished(), session["trials"], session["seconds"], stopped, notes)


class _Progress:
    """One line per finished trial (from the storage, so other machines' trials too), and a bar on a terminal."""

    def __init__(self, plan: Plan, study: optuna.Study, before: set[int], quiet: bool):
        from tqdm import tqdm

        self.plan, self.study, self.quiet = plan, study, quiet
        self.seen = set(before)
        self.sign = 1 if plan.direction == "maximize" else -1
        done = self.finished()
        self.bar = tqdm(
            total=plan.trials,
            initial=min(done, plan.trials),
            desc=plan.study,
            unit="trial",
            file=sys.stderr,
            disable=quiet or not sys.stderr.isatty(),
            leave=False,
        )

    def finished(self) -> int:
        return sum(counts_as_finished(t) for t in self.study.get_trials(deepcopy=False))

    def line(self, text: str) -> None:
        if self.quiet:
            return
        if self.bar.disable:
            print(text, file=sys.stderr, flush=True)
        else:
            self.bar.write(text, file=sys.stderr)

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
        r = _result(t)
        state = state_text(t)
        params = " ".join(f"{k}={show_value(self.plan.space[k].value_of(v))}" for k, v in t.params.items())
        acc = f"val acc {100 * r['val_accuracy']:.2f}%" if "val_accuracy" in r else ""
        loss = f"val loss {r['val_loss']:.4f}" if self.plan.metric == "val_loss" and "val_loss" in r else ""
        took = f"{r['epochs']} ep {r['seconds']:.1f}s" if "seconds" in r else ""
        parts = [f"trial {t.number} {state}", acc, loss, params, took]
        if best is not None:
            parts.append(f"{done}/{self.plan.trials}, best #{best.number} {_metric_text(self.plan.metric, best.value)}")
        return " | ".join(p for p in parts if p)

    def close(self) -> None:
        self.bar.close()


def state_text(t: optuna.trial.FrozenTrial) -> str:
    r = _result(t)
    if t.state == TrialState.PRUNED:
        why = " (diverged)" if r.get("reason") == "diverged" else ""
        return f"pruned at epoch {r.get('pruned_at', '?')}{why}"
    if t.state == TrialState.FAIL:
        if "error" in r:
            return f"failed: {r['error']}"
        return f"failed ({r.get('reason', 'its worker stopped')})"
    return t.state.name.lower()


def _metric_text(metric: str, value: float) -> str:
    return f"{100 * value:.2f}%" if metric.endswith("accuracy") else f"{value:.4f}"


def sweep(
    config: str | None = None,
    space: Sequence[str] = (),
    space_file: str | Path | None = None,
    preset: str | None = None,
    trials: int | None = None,
    metric: str = "val_accuracy",
    pruner: str = "median",
    workers: int = 1,
    threads: int | None = None,
    storage: str | None = None,
    study: str | None = None,
    out: str | Path | None = None,
    epochs: int | None = None,
    timeout: float | None = None,
    data_dir: str | Path | None = None,
    device: str = "auto",
    quiet: bool = False,
) -> Path:
    """Run a sweep (or continue it) and return its report's path. With several base configs (a preset such
    as `seed-lr`), one study per config runs in turn, each in its own sub-folder, plus a summary report."""
    plans = make_plans(config, space, space_file, preset, trials, metric, pruner, storage, study, out, epochs)
    deadline = time.time() + timeout if timeout else None
    if len(plans) == 1:
        outcome = run_plan(plans[0], workers, threads, data_dir, device, deadline, quiet)
        _say_stopped(outcome, quiet)
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
            if not quiet:
                print(f"time is up: study {plan.study} not started; run the same command to continue", file=sys.stderr)
            continue
        _say_stopped(run_plan(plan, workers, threads, data_dir, device, deadline, quiet), quiet)
    return write_summary(folder)


def _say_stopped(outcome: Outcome, quiet: bool) -> None:
    if outcome.stopped and not quiet:
        print(
            f"study {outcome.plan.study} stopped ({outcome.stopped}) at {outcome.finished} of {outcome.plan.trials} "
            "trials; run the same command to continue",
            file=sys.stderr,
        )


# ---------------------------------------------------------------------------------------------- reports


def load_sweep(folder: str | Path, storage: str | None = None) -> tuple[optuna.Study, Plan]:
    """A sweep folder's study, opened on the storage its sweep.json names (or `storage`), and its plan."""
    folder = Path(folder)
    marker = folder / SWEEP_FILE
    try:
        saved = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        raise MnistlabError(f"{folder}: no sweep here ({SWEEP_FILE} missing or unreadable)") from None
    where = storage or saved["storage"]
    if "://" not in where and not Path(where).is_absolute():
        where = str(folder / where)
    if "://" not in where and not Path(where).is_file():
        raise MnistlabError(f"{where}: the sweep's journal file is missing")
    try:
        opened = open_storage(where)
    except MnistlabError as exc:
        if storage is None and "://" in where:  # sweep.json keeps the URL without its password
            raise MnistlabError(f"{exc} (give --storage with the full URL, or set PGPASSWORD)") from None
        raise
    try:
        study = optuna.load_study(study_name=saved["study"], storage=opened)
    except KeyError:
        raise MnistlabError(f"no study {saved['study']!r} in {safe_url(where)}") from None
    attrs = study.user_attrs.get(ATTR)
    if attrs is None:
        raise MnistlabError(f"study {saved['study']!r} was not made by mnistlab sweep")
    space = {key: _param_from(key, d) for key, d in attrs["space"].items()}
    config = config_from_dict(attrs["config"], source=f"study {saved['study']}")
    description = attrs.get("description", "")
    plan = Plan(saved["study"], config, space, attrs["metric"], 0, "", where, folder.resolve(), description)
    return study, plan


def _param_from(key: str, d: dict[str, Any]) -> Param:
    if d["kind"] == "choice":
        return Param(key, "choice", choices=tuple(d["choices"]))
    return Param(key, d["kind"], d["low"], d["high"])


def report(folder: str | Path, storage: str | None = None) -> Path:
    """Redraw a sweep folder's report (and best.toml, plots) from its storage; a folder of several studies
    (a preset) gets each study's report and the summary."""
    folder = Path(folder)
    marker = folder / SWEEP_FILE
    if marker.is_file() and "parts" in json.loads(marker.read_text()):
        for part in json.loads(marker.read_text())["parts"]:
            if (folder / part / SWEEP_FILE).is_file():
                report(folder / part, storage)
        return write_summary(folder)
    with FolderLock(folder):
        study, plan = load_sweep(folder, storage)
        return write_report(folder, study, plan)


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best complete trial by the study's validation metric (pruned and failed ones never are)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    sign = 1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1
    return max(complete, key=lambda t: (sign * t.value, -t.number))


def best_config(study: optuna.Study, plan: Plan, trial: optuna.trial.FrozenTrial) -> Config:
    values = {key: plan.space[key].value_of(v) for key, v in trial.params.items()}
    config = apply(plan.config, values, name=f"{plan.study}-best")
    config.description = (
        f"Best of sweep {plan.study} (trial {trial.number}, {plan.metric} {_metric_text(plan.metric, trial.value)}): "
        + ", ".join(f"{k}={show_value(v)}" for k, v in values.items())
    )
    return config


def _importances(study: optuna.Study) -> tuple[dict[str, float], str]:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 3:
        return {}, f"Too few complete trials ({len(complete)}) to estimate parameter importances; 3 at least."
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError, ZeroDivisionError) as exc:
        return {}, f"Optuna could not estimate parameter importances from these trials ({' '.join(str(exc).split())})."
    return dict(values), ""


def write_report(folder: Path, study: optuna.Study, plan: Plan) -> Path:
    """report.md, best.toml, objective.png and params.png in `folder`, from the study's storage alone."""
    from mnistlab.plots import plot_sweep_objective, plot_sweep_params

    folder = Path(folder)
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    best = best_trial(study)
    percent = plan.metric.endswith("accuracy")
    lines = [f"# Sweep {plan.study}", ""] + ([plan.description + ".", ""] if plan.description else [])
    counts = {s: sum(t.state == s for t in trials) for s in TrialState}
    sessions = [v for k, v in study.user_attrs.items() if k.startswith("session ")]
    trial_seconds = sum(_result(t).get("seconds", 0.0) for t in trials)
    wall = sum(s.get("seconds", 0.0) for s in sessions)
    lines += [
        f"Base config **{plan.config.name}** ({plan.config.description or 'no description'}), "
        f"{plan.config.training.epochs} epochs per trial unless searched. Objective: "
        f"{plan.direction} **{plan.metric}** on the validation split ({plan.config.data.val_size} images held out "
        "of the training set); test accuracy is only reported, it never chooses.",
        "",
        f"Storage `{safe_url(plan.storage)}`, study `{plan.study}`. Trials: "
        f"{counts[TrialState.COMPLETE]} complete, {counts[TrialState.PRUNED]} pruned, "
        f"{counts[TrialState.FAIL]} failed, {counts[TrialState.RUNNING]} running. Time: "
        f"{wall / 60:.1f} min of wall clock over {len(sessions)} invocation(s), {trial_seconds / 60:.1f} min of "
        "trial time in total.",
        "",
    ]
    hosts = {s["host"]: s for s in sessions}
    for host, s in hosts.items():
        cpu = study.user_attrs.get(f"cpu {host}", "")
        lines.append(f"- `{host}`: {s['workers']} worker(s) x {s['threads']} thread(s){'; ' + cpu if cpu else ''}")
    lines += ["", "## Search space", "", "| key | searched over |", "|---|---|"]
    lines += [f"| `{key}` | {p.spec()} |" for key, p in plan.space.items()]
    lines += ["", "## Best trial", ""]
    if best is None:
        lines.append("No complete trial yet.")
        (folder / "best.toml").unlink(missing_ok=True)
    else:
        config = best_config(study, plan, best)
        atomic_write_text(folder / "best.toml", config.to_toml())
        r = _result(best)
        lines += [
            f"Trial {best.number}: {plan.metric} **{_metric_text(plan.metric, best.value)}**"
            + (f", test accuracy {100 * r['test_accuracy']:.2f}%" if "test_accuracy" in r else "")
            + f", after {r.get('epochs', '?')} epochs ({r.get('seconds', 0):.0f} s).",
            "",
            "| key | value |",
            "|---|---|",
            *[f"| `{k}` | {show_value(plan.space[k].value_of(v))} |" for k, v in best.params.items()],
            "",
            f"Its config is [best.toml](best.toml): `mnistlab train --config {folder}/best.toml`. Its run directory "
            f"is `{_worker_info(best).get('run_dir', '?')}` (on `{_worker_info(best).get('host', '?')}`).",
        ]
    importances, why_not = _importances(study)
    lines += ["", "## Parameter importances", ""]
    if importances:
        lines += [
            f"Optuna's estimate (its default evaluator) from {counts[TrialState.COMPLETE]} complete trials: the share "
            f"of the variation in {plan.metric} each parameter explains. Few trials make it a rough guide.",
            "",
            "| parameter | importance |",
            "|---|---|",
            *[f"| `{k}` | {v:.3f} |" for k, v in importances.items()],
        ]
    else:
        lines.append(why_not)
    drawn = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and t.value is not None]
    lines += ["", "## Plots", ""]
    if drawn:
        sign = 1 if plan.direction == "maximize" else -1
        scale = 100 if percent else 1
        plot_sweep_objective(
            [t.number for t in drawn],
            [scale * t.value for t in drawn],
            [t.state == TrialState.PRUNED for t in drawn],
            sign,
            folder / "objective.png",
            f"{plan.study}: {plan.metric} by trial",
            f"{plan.metric}{' (%)' if percent else ''}",
        )
        with_acc = [t for t in drawn if "val_accuracy" in _result(t)]
        plot_sweep_params(
            {key: _axis(p, [t.params.get(key) for t in with_acc]) for key, p in plan.space.items()},
            [100 * _result(t)["val_accuracy"] for t in with_acc],
            [t.state == TrialState.PRUNED for t in with_acc],
            folder / "params.png",
            f"{plan.study}: validation accuracy against each parameter",
        )
        lines += [
            f"![objective by trial](objective.png)\n\n{plan.metric} of each trial (pruned ones at their last epoch) "
            "and the best so far.",
            "",
            "![accuracy against each parameter](params.png)\n\nValidation accuracy against each parameter "
            "(hollow: pruned, at the epoch it stopped).",
        ]
    else:
        lines.append("Nothing to draw yet.")
    lines += ["", "## Trials", "", *_trials_table(trials, plan, best, len(hosts) > 1)]
    path = folder / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _axis(param: Param, stored: list[Any]) -> dict[str, Any]:
    """One parameter's values as the plot takes them: numbers (log scale or not), or choice positions."""
    if param.kind == "choice":
        labels = [_label(c) for c in param.choices]
        return {
            "values": [labels.index(v) if v in labels else None for v in stored],
            "ticks": [show_value(c) for c in param.choices],
            "log": False,
        }
    return {"values": stored, "ticks": None, "log": param.kind == "log"}


def _trials_table(trials: list, plan: Plan, best: Any, hosts: bool) -> list[str]:
    keys = list(plan.space)
    head = ["trial", "state", *[f"`{k}`" for k in keys], "val acc", "test acc", "epochs", "seconds"]
    head += ["host"] if hosts else []
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in trials:
        r = _result(t)
        number = f"**{t.number}** (best)" if best is not None and t.number == best.number else str(t.number)
        values = [show_value(plan.space[k].value_of(t.params[k])) if k in t.params else "" for k in keys]
        cells = [
            number,
            state_text(t).replace("|", "/"),
            *values,
            f"{100 * r['val_accuracy']:.2f}%" if "val_accuracy" in r else "",
            f"{100 * r['test_accuracy']:.2f}%" if "test_accuracy" in r else "",
            str(r.get("epochs", "")),
            f"{r['seconds']:.1f}" if "seconds" in r else "",
        ]
        cells += [_worker_info(t).get("host", "")] if hosts else []
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def write_summary(folder: Path) -> Path:
    """The summary of a sweep over several base configs: each study's best, side by side."""
    parts = json.loads((folder / SWEEP_FILE).read_text())["parts"]
    lines = [
        f"# Sweep {folder.name}",
        "",
        "One study per base config; each links to its full report. The best trial is the best by validation "
        "accuracy; its test accuracy is shown, never used to choose.",
        "",
        "| config | trials (complete / pruned / failed) | best val acc | its test acc | its epochs | best settings "
        "| minutes (wall / trial time) | report |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for part in parts:
        if not (folder / part / SWEEP_FILE).is_file():
            lines.append(f"| {part} | not started | | | | | | |")
            continue
        study, plan = load_sweep(folder / part, None)
        trials = study.get_trials(deepcopy=False)
        n = {s: sum(t.state == s for t in trials) for s in TrialState}
        best = best_trial(study)
        wall = sum(v.get("seconds", 0.0) for k, v in study.user_attrs.items() if k.startswith("session "))
        busy = sum(_result(t).get("seconds", 0.0) for t in trials)
        cells = [plan.config.name, f"{n[TrialState.COMPLETE]} / {n[TrialState.PRUNED]} / {n[TrialState.FAIL]}"]
        if best is None:
            cells += ["", "", "", ""]
        else:
            r = _result(best)
            settings = ", ".join(f"{k}={show_value(plan.space[k].value_of(v))}" for k, v in best.params.items())
            cells += [
                f"{100 * r['val_accuracy']:.2f}%",
                f"{100 * r['test_accuracy']:.2f}%",
                str(r.get("epochs", "")),
                settings,
            ]
        cells += [f"{wall / 60:.1f} / {busy / 60:.1f}", f"[report]({part}/report.md)"]
        lines.append("| " + " | ".join(cells) + " |")
    path = folder / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
