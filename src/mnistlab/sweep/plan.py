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
    if trials < 1:
        raise MnistlabError("--trials must be at least 1")
    bases = [load_config(name) for name in names]
    for base in bases:
        check_space(base, spec.space)
    folder = Path(options.out) if options.out else Path("sweeps") / (options.preset or bases[0].name)
    study = options.study or folder.resolve().name
    plans = []
    for base in bases:
        part = folder / base.name if len(bases) > 1 else folder
        name = f"{study}-{base.name}" if len(bases) > 1 else study
        if options.storage and is_database(options.storage):
            storage = options.storage
        else:
            storage = str(Path(options.storage or part / JOURNAL).resolve())
        fixed = apply(base, spec.space.fixed)
        params = dict(spec.space.params)
        plans.append(
            Plan(name, fixed, params, options.metric, trials, options.pruner, storage, part.resolve(), spec.description)
        )
    return plans


def _sweep_file(options: SweepOptions) -> SweepFile:
    """The preset or space file, with `--space` and `--epochs` added."""
    if options.preset and options.space_file:
        raise MnistlabError("give --preset or --space-file, not both")
    if options.preset:
        known = presets()
        if options.preset not in known:
            raise MnistlabError(f"no sweep preset named {options.preset!r} (presets: {', '.join(sorted(known))})")
        spec = load_space_file(known[options.preset])
    else:
        spec = load_space_file(options.space_file) if options.space_file else SweepFile(Space())
    for item in options.space:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise MnistlabError(f"--space {item!r}: write KEY=SPEC, e.g. optimizer.lr=log:1e-4:1")
        spec.space.add(key.strip(), parse_spec(key.strip(), text))
    if options.epochs is not None:
        spec.space.add("training.epochs", options.epochs)
    return spec
