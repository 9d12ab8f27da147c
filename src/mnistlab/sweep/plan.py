"""Plans: everything a sweep needs, read and checked before any work. `SweepOptions` holds what `mnistlab sweep`
takes (its command line is built from the dataclass's fields and defaults); `make_plans` turns them into one
`Plan` per base config: the study's name, its space, base config, metric, storage and folder."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mnistlab.config import PRUNERS, Config, load_config
from mnistlab.errors import MnistlabError
from mnistlab.sweep.space import Param, Space, SweepFile, apply, check_space, load_space_file, parse_spec, presets

METRICS = {"val_accuracy": "maximize", "val_loss": "minimize"}
JOURNAL = "study.journal"
SWEEP_FILE = "sweep.json"
DEFAULT_TRIALS = 20  # where neither --trials nor the preset says


def is_database(storage: str) -> bool:
    """Whether a storage is an SQL database URL (`postgresql://...`) rather than a journal file's path."""
    return "://" in storage


@dataclass(frozen=True)
class SweepOptions:
    """What `mnistlab sweep` takes, one field per option (the same name), with the command's defaults."""

    config: str | None = None  # the base config every trial starts from (a preset may name several)
    space: Sequence[str] = ()  # KEY=SPEC strings, adding to (or replacing keys of) the space file or preset
    space_file: str | Path | None = None
    preset: str | None = None
    trials: int | None = None  # finished trials the study should have (default: the preset's, else DEFAULT_TRIALS)
    epochs: int | None = None  # training.epochs for every trial
    metric: str = "val_accuracy"
    pruner: str = "median"
    workers: int = 1  # worker processes on this machine
    threads: int | None = None  # torch threads per worker (default: the cores shared out)
    storage: str | None = None  # an SQL database URL or a journal file (default: OUT/study.journal)
    study: str | None = None  # the study's name (default: the sweep folder's name)
    out: str | Path | None = None  # the sweep folder (default: sweeps/<preset or config name>)
    timeout: float | None = None  # seconds after which no new trial starts
    data_dir: str | Path | None = None
    device: str = "auto"
    quiet: bool = False


@dataclass
class Plan:
    """One study: what it searches, over which base config, for which metric, where it is stored."""

    study: str
    config: Config  # the base config with the space's fixed values applied
    space: dict[str, Param]
    metric: str
    trials: int
    pruner: str
    storage: str  # an SQL database URL, or a journal file's absolute path
    out: Path
    description: str = ""  # what the sweep asks (a preset's description), for the report

    @property
    def direction(self) -> str:
        return METRICS[self.metric]

    @property
    def journal(self) -> bool:
        """Whether the study is on a journal file (else on an SQL database)."""
        return not is_database(self.storage)

    def attrs(self) -> dict[str, Any]:
        """What makes a study this study; stored with it and compared when the study is continued."""
        space = {key: p.to_dict() for key, p in self.space.items()}
        attrs = {"space": space, "config": self.config.to_dict(), "metric": self.metric}
        return json.loads(json.dumps({**attrs, "description": self.description}))


def make_plans(options: SweepOptions) -> list[Plan]:
    """Read and check everything a sweep needs, before any work: one Plan per base config."""
    spec = _sweep_file(options)
    if options.metric not in METRICS:
        extra = " (the test set never chooses)" if options.metric.startswith("test") else ""
        raise MnistlabError(f"unknown metric {options.metric!r}{extra}: choose from {', '.join(METRICS)}")
    if options.pruner not in PRUNERS:
        raise MnistlabError(f"unknown pruner {options.pruner!r}: choose from {', '.join(PRUNERS)}")
    names = [options.config] if options.config else spec.configs
    if not names:
        raise MnistlabError("give --config NAME|FILE (the base config every trial starts from), or --preset NAME")
    trials = options.trials if options.trials is not None else spec.trials or DEFAULT_TRIALS
    _check_numbers(options, trials)
    if not spec.space.params:
        raise MnistlabError(_nothing_to_search(options, spec))
    bases = [load_config(name) for name in names]
    for base in bases:
        check_space(base, spec.space)
    folder = Path(options.out) if options.out else Path("sweeps") / (options.preset or bases[0].name)
    study = options.study or folder.resolve().name
    plans = []
    for base in bases:
        part = folder / base.name if len(bases) > 1 else folder
        name = f"{study}-{base.name}" if len(bases) > 1 else study
        storage = options.storage if options.storage and is_database(options.storage) else _journal(options, part)
        fixed = apply(base, spec.space.fixed)
        params = dict(spec.space.params)
        plans.append(
            Plan(name, fixed, params, options.metric, trials, options.pruner, storage, part.resolve(), spec.description)
        )
    return plans


def _check_numbers(options: SweepOptions, trials: int) -> None:
    for option, value in (("--trials", trials), ("--workers", options.workers), ("--threads", options.threads)):
        if value is not None and value < 1:
            raise MnistlabError(f"{option} must be at least 1, got {value}")
    if options.timeout is not None and not options.timeout > 0:  # also NaN
        raise MnistlabError(f"--timeout must be above 0 seconds, got {options.timeout:g}")


def _journal(options: SweepOptions, folder: Path) -> str:
    """The journal file's absolute path: OUT/study.journal, or `--storage FILE` in a folder that exists. Only
    folders inside the sweep folder are made: a mistyped shared path must not start a study of its own."""
    path = Path(options.storage or folder / JOURNAL).expanduser().resolve()
    if not path.parent.is_dir() and not path.parent.is_relative_to(folder.resolve()):
        raise MnistlabError(
            f"--storage {options.storage}: the folder {path.parent} does not exist (only folders inside --out are "
            "made); check the path, or create the folder first"
        )
    return str(path)


def _nothing_to_search(options: SweepOptions, spec: SweepFile) -> str:
    """Why a space searches nothing, worded for where its fixed values came from."""
    given = {key.strip(): text for key, _, text in (item.partition("=") for item in options.space)}
    on_command_line = [key for key in spec.space.fixed if key in given]
    if on_command_line:
        key = on_command_line[0]
        return (
            f"nothing to search: --space {key}={given[key]} is one value, which fixes {key} for every trial; give a "
            "range (log:LOW:HIGH, int:LOW:HIGH, float:LOW:HIGH) or several choices (A,B,C)"
        )
    source = options.space_file or (f"preset {options.preset}" if options.preset else None)
    if source is None:
        return "nothing to search: give --space KEY=SPEC with a range or several choices, or --space-file FILE"
    fixed = [key for key in spec.space.fixed if key != "training.epochs" or options.epochs is None]
    what = f"only fixes {', '.join(fixed)} (a single value is not searched)" if fixed else "has no [space] entries"
    return (
        f'nothing to search: {source} {what}; give its [space] a range ("optimizer.lr" = "log:1e-4:1") or a '
        'list of several choices ("model.hidden" = [[512], [512, 64]])'
    )


def _sweep_file(options: SweepOptions) -> SweepFile:
    """The preset or space file, with `--space` and `--epochs` added: a key given by `--space` replaces the file's
    (as `--set` replaces a config's); a key given twice on the command line is refused."""
    if options.preset and options.space_file:
        raise MnistlabError("give --preset or --space-file, not both")
    if options.preset:
        known = presets()
        if options.preset not in known:
            raise MnistlabError(f"no sweep preset named {options.preset!r} (presets: {', '.join(sorted(known))})")
        spec = load_space_file(known[options.preset])
    else:
        spec = load_space_file(options.space_file) if options.space_file else SweepFile(Space())
    given: dict[str, str] = {}
    for item in options.space:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise MnistlabError(f"--space {item!r}: write KEY=SPEC, e.g. optimizer.lr=log:1e-4:1")
        if key in given:
            raise MnistlabError(f"--space {key} is given twice ({key}={given[key]} and {key}={text}); give it once")
        given[key] = text
        spec.space.add(key, parse_spec(key, text))
    if options.epochs is not None:
        if "training.epochs" in given:
            raise MnistlabError("give --epochs or --space training.epochs, not both")
        spec.space.add("training.epochs", options.epochs)
    return spec
