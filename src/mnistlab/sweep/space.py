"""Search spaces as data: what a sweep searches (ranges and choices of config keys) and what it fixes, read from
`--space KEY=SPEC`, a space file or a shipped preset, and checked against the config rules before any training.

Every value is read by the config's one rule (`read_value` for text, `check_value` against the key's type), the
same as `--set` and config files.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mnistlab.config import Config, ModelConfig, check_value, read_value, type_name
from mnistlab.errors import MnistlabError

if TYPE_CHECKING:
    import optuna

# Every categorical combination of a space is checked against the config rules before any training; past this
# many combinations each value is checked on its own instead.
MAX_CHECKED_POINTS = 4096


def choice_label(choice: Any) -> Any:
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
            return self.value_of(trial.suggest_categorical(self.key, [choice_label(c) for c in self.choices]))
        if self.integer:
            return trial.suggest_int(self.key, self.low, self.high, log=self.kind == "log")
        return trial.suggest_float(self.key, self.low, self.high, log=self.kind == "log")

    def value_of(self, stored: Any) -> Any:
        """A value as Optuna stored it (a trial's params), as the config takes it."""
        if self.kind != "choice":
            return stored
        labels = [choice_label(c) for c in self.choices]
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

    @classmethod
    def from_dict(cls, key: str, d: dict[str, Any]) -> Param:
        """A Param as `to_dict` stored it with the study."""
        if d["kind"] == "choice":
            return cls(key, "choice", choices=tuple(d["choices"]))
        return cls(key, d["kind"], d["low"], d["high"])


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
            raise MnistlabError(f"{where}={spec}: a range needs a numeric key ({key} takes {type_name(default)})")
        if head == "int" and not isinstance(default, int):
            raise MnistlabError(f"{where}={spec}: {key} takes a number; use float:LOW:HIGH or log:LOW:HIGH")
        if head == "float" and isinstance(default, int):
            raise MnistlabError(f"{where}={spec}: {key} takes an integer; use int:LOW:HIGH or log:LOW:HIGH")
        low, high = (_text_value(b, default, where) for b in bounds)
        return _range(key, head, low, high)
    if not spec.strip():
        raise MnistlabError(f"{where}: empty spec (use log:LOW:HIGH, int:LOW:HIGH, float:LOW:HIGH or A,B,C)")
    if ":" in spec and not isinstance(default, str):
        raise MnistlabError(f"{where}={spec}: unknown range kind {head!r} (use log:, int: or float:, or A,B,C)")
    values = [_text_value(v, default, where) for v in spec.split(",")]
    return values[0] if len(values) == 1 else _choice(key, values)


def _text_value(text: str, default: Any, where: str) -> Any:
    """One value of a spec on the command line, read and checked by the config's rule."""
    if isinstance(default, list):
        raise MnistlabError(
            f"{where}: list values (model.hidden, model.layers, model.activations) go in a --space-file TOML, "
            'e.g. "model.hidden" = [[512], [512, 64]]'
        )
    return check_value(read_value(text), default, where)


def _range(key: str, kind: str, low: Any, high: Any) -> Param:
    where = f"--space {key}"
    if not low < high:
        raise MnistlabError(f"{where}: empty range {kind}:{low}:{high} (LOW must be below HIGH)")
    if kind == "log" and low <= 0:
        raise MnistlabError(f"{where}: a log range needs positive bounds, got {kind}:{low}:{high}")
    return Param(key, kind, low, high)


def _choice(key: str, values: list[Any]) -> Param:
    labels = [choice_label(v) for v in values]
    if len(set(map(repr, labels))) != len(labels):
        raise MnistlabError(f"--space {key}: a choice is given twice ({', '.join(map(show_value, values))})")
    return Param(key, "choice", choices=tuple(values))


def _sections() -> dict[str, list[str]]:
    """The config's sections, each with its keys."""
    sections: dict[str, list[str]] = {}
    for key in Config().flat():
        section, field = key.split(".")
        sections.setdefault(section, []).append(field)
    return sections


def _default_of(key: str) -> Any:
    """The default of a dotted config key, whose type a value must have; an error naming the known keys."""
    keys = Config().flat()
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
    """One choice from a TOML file, typed: a value of a config key, or a table for a section."""
    where = f"space {key}"
    if "." in key:
        return check_value(value, _default_of(key), where)
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
        nested = isinstance(value, dict) and not prefix and key in _sections()
        for dotted, entry in (_flatten(value, f"{key}.") if nested else {prefix + key: value}).items():
            if dotted in flat:  # `"optimizer.lr"` quoted and `optimizer.lr` dotted: TOML allows both
                raise MnistlabError(f"{dotted} is given twice (quoted and dotted); give it once")
            flat[dotted] = entry
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
            space.add(key, check_value(value, _default_of(key), f"set {key}"))
        for key, value in _flatten(data.get("space", {})).items():
            if key in space.fixed or key in space.params:
                raise MnistlabError(f"{key} is given twice, in [set] and in [space]; give it once")
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
    """`base` with dotted keys (and whole-section tables) replaced, validated like any config; its description
    stays (the report and best.toml say what was searched). Activations follow a new `model.hidden`
    (`following_activations`)."""
    overrides = {"description": base.description, **values, **following_activations(base, values)}
    if name is not None:
        overrides["name"] = name
    return base.with_overrides(overrides)


def following_activations(base: Config, values: Mapping[str, Any]) -> dict[str, Any]:
    """A `model.hidden` value of another length than the config's activations, given without
    `model.activations`: the activations follow it, so a hidden-layer choice needs no activations of its own.
    Each layer keeps the config's activation at its position and layers past the last take the last one
    (["relu", "tanh"] for 3 layers: relu, tanh, tanh); with the activations given too, nothing follows."""
    model = values.get("model")
    model = model if isinstance(model, Mapping) else {}
    hidden = values.get("model.hidden", model.get("hidden"))
    if hidden is None or "model.activations" in values or "activations" in model:
        return {}
    have = base.model.activations or ModelConfig().activations
    if len(hidden) == len(base.model.activations):
        return {}
    return {"model.activations": [have[min(i, len(have) - 1)] for i in range(len(hidden))]}


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
    kept = space.fixed.get("model.activations")
    for point in points:
        config = apply(fixed, point)
        if kept is not None and config.model.activations != kept:  # fixed on purpose: not to be followed
            raise MnistlabError(
                f"model.activations is fixed at {show_value(kept)} but a model.hidden choice has "
                f"{len(config.model.hidden)} layers; search them together (model = [{{hidden = ..., activations = "
                "...}, ...]) or leave model.activations out, so that it follows model.hidden"
            )
        if config.data.val_size < 1:
            raise MnistlabError(
                "a sweep chooses on the validation split: data.val_size must be above 0 (the test set never chooses)"
            )
