"""Experiment configs: plain dataclasses, read from and written to TOML.

A config is the whole truth about a run. The shipped ones live in `mnistlab/configs/*.toml` and load by name
(`seed-b`); a user's own file loads by path. Unknown keys and wrong types are errors, so a typo never silently
falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from mnistlab.datasets import DATASETS
from mnistlab.errors import MnistlabError
from mnistlab.layers import ACTIVATIONS, check_layers

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop", "adagrad", "adadelta")
LOSSES = ("cross-entropy", "nll", "mse", "hinge")
SCHEDULERS = ("none", "step", "cosine", "onecycle")
MONITORS = ("val_loss", "val_accuracy", "train_pgd_accuracy")  # the last: adversarial training's PGD check
PRUNERS = ("median", "hyperband", "none")  # for `mnistlab sweep`
DEVICES = ("auto", "cpu", "cuda", "mps")
ENGINES = ("auto", "torch", "onnxruntime")  # what `mnistlab serve` runs models with
ADVERSARIAL = ("none", "fgsm-rs", "pgd", "trades")


@dataclass
class ModelConfig:
    """The network.

    `kind = "mlp"`: Flatten, then Linear + activation per `hidden` size, then Linear to 10.
    `kind = "cnn"`: the `layers` list, one layer per string, e.g. "conv 32 3", "bn", "relu", "maxpool 2",
    "dropout 0.25", "flatten", "linear 128", "avgpool" (global); it must end with 10 outputs.
    """

    kind: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [512])
    activations: list[str] = field(default_factory=lambda: ["relu"])
    layers: list[str] = field(default_factory=list)
    # The original report's quirk: the network ends in a Softmax layer and its *probabilities* go into
    # CrossEntropyLoss, which applies log-softmax again. Off means logits go into the loss (correct usage).
    softmax_output: bool = False


@dataclass
class OptimizerConfig:
    name: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.0  # sgd and rmsprop
    nesterov: bool = False  # sgd, needs momentum
    weight_decay: float = 0.0


@dataclass
class TrainingConfig:
    epochs: int = 10
    batch_size: int = 64
    seed: int = 0
    loss: str = "cross-entropy"
    label_smoothing: float = 0.0  # cross-entropy only
    # Learning-rate schedule, stepped every batch. `warmup_epochs` ramps linearly from 0 (step, cosine) or is
    # OneCycle's rising phase. `step` multiplies by `gamma` every `step_size` epochs.
    scheduler: str = "none"
    warmup_epochs: float = 0.0
    step_size: int = 1
    gamma: float = 0.7
    # Early stopping: stop after `early_stopping` epochs without the monitored validation metric improving by
    # more than `min_delta` (0 = off), and always end with the best epoch's weights. With adversarial training,
    # `train_pgd_accuracy` stops at catastrophic overfitting as Wong et al. did (PGD on a training batch).
    early_stopping: int = 0
    monitor: str = "val_loss"
    min_delta: float = 0.0
    # Exponential moving average of the weights, updated every step and used for evaluation and the saved
    # model (0 = off). Typical: 0.999.
    ema_decay: float = 0.0
    # Memory layout for convolutions: channels_last is faster for CNNs on recent CPUs and GPUs.
    channels_last: bool = False
    # bfloat16 autocast where the device computes bf16 natively (CUDA, recent Xeons); float32 elsewhere.
    amp: bool = False
    # Outlier exposure (Hendrycks et al. 2019): the weight of a cross-entropy towards the uniform answer on
    # generated non-digits trained beside the digits (data/exposure.py; 0 = off). A model trained so flags
    # non-digits by its calibrated confidence, not by the density of its features (models/outliers.py).
    outlier_exposure: float = 0.0


@dataclass
class AugmentConfig:
    """Random affine (and optionally elastic) distortion of each training batch, on the device, all at once.
    Zeros turn a part off; all zeros (the default) means no augmentation."""

    rotate: float = 0.0  # degrees, uniform in [-rotate, rotate]
    scale: float = 0.0  # relative, uniform in [1 - scale, 1 + scale]
    shear: float = 0.0  # degrees
    translate: float = 0.0  # pixels
    elastic_alpha: float = 0.0  # elastic distortion strength in pixels (Simard et al. 2003); 0 = off
    elastic_sigma: float = 4.0  # smoothness of the elastic field in pixels
    flip: bool = False  # mirror left-right with probability 1/2 (for clothes, never for digits or characters)
    # The share of each batch drawn thicker, thinner, at low resolution, blurred or at another contrast, as
    # scanned digits are (data/exposure.py; 0 = off), and how many digits typeset in fonts join each batch.
    strokes: float = 0.0
    typeset_digits: int = 0


@dataclass
class AdversarialConfig:
    """Adversarial training: every training batch (after augmentation) is replaced by adversarial examples
    against the network being trained. `fgsm-rs` is fast adversarial training (Wong, Rice and Kolter 2020): one
    FGSM step of `step` from a uniformly random start in the L-infinity ball of radius `eps` (pixels in
    [0, 1]); Wong et al. use step = 1.25 * eps. `eps` grows linearly from 0 over the first `ramp_epochs`.
    `fraction` of each batch is attacked, the rest stays clean (1: all, as Wong et al.). `pgd` takes `steps`
    such steps from the random start (Madry et al. 2018 train with PGD), each projected.
    `trades` (Zhang et al. 2019) trains on the clean batch with the loss plus `beta` times the KL divergence
    between the network's answers on each image and on its perturbation, found by `steps` signed steps of
    `step` that push that divergence up; it keeps more clean accuracy than training on attacks alone."""

    method: str = "none"  # "none", "fgsm-rs", "pgd" or "trades"
    eps: float = 0.3
    step: float = 0.375
    ramp_epochs: float = 0.0
    fraction: float = 1.0
    steps: int = 10  # pgd and trades: attack steps per batch
    beta: float = 6.0  # trades: weight of the robustness term


@dataclass
class DataConfig:
    dataset: str = "mnist"
    # Images carved from the training set for model selection; the test set is never used for that.
    val_size: int = 5000
    # False: pixels in [0, 1] exactly as ToTensor gives them (the report). True: (x - mean) / std.
    normalize: bool = False


@dataclass
class Config:
    name: str = "custom"
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return _dump_toml(self.to_dict())

    def flat(self) -> dict[str, Any]:
        """Every setting as a dotted key (`optimizer.lr`), the name and description left out."""
        return {
            f"{section}.{key}": value
            for section, table in self.to_dict().items()
            if isinstance(table, dict)
            for key, value in table.items()
        }

    def with_overrides(self, overrides: Mapping[str, Any]) -> Config:
        """A copy with dotted keys replaced, e.g. `{"training.epochs": 3, "optimizer.lr": 0.01}` (None: keep); a
        section's name with a table sets several of its keys at once (`{"optimizer": {"name": "sgd"}}`).

        Where a setting changes, the description says so, so that a run's title never claims the settings it
        was loaded with when it trained with others (unless `overrides` sets the description itself).
        """
        data = self.to_dict()
        shown, changed = [], []
        for dotted, value in _dotted(overrides).items():
            if value is None:
                continue
            section, _, key = dotted.rpartition(".")
            target = data.get(section) if section else data
            if not isinstance(target, dict) or key not in target:
                raise MnistlabError(f"unknown config key {dotted!r} (see `mnistlab configs --keys`)")
            if section:
                shown.append(f"{dotted}={_shown(value)}")
                if target[key] != value:
                    changed.append(shown[-1])
            target[key] = value
        if changed and "description" not in overrides:
            data["description"] = f"{self.description} (changed: {', '.join(changed)})".strip()
        return config_from_dict(data, source=f"{self.name} with {', '.join(shown) or 'overrides'}")

    def summary(self, lr: str | None = None) -> str:
        """One line saying what this config trains, from its values (not its description); `lr` replaces the
        learning rate's value (lr-find sweeps it: "1e-07 to 3.2")."""
        m, o, t = self.model, self.optimizer, self.training
        if m.kind == "mlp":
            net = "-".join(map(str, [784, *m.hidden, 10])) + f" MLP ({', '.join(m.activations)})"
        else:
            net = f"CNN of {len(m.layers)} layers"
        output = "Softmax output into " if m.softmax_output else ""
        momentum = f" momentum {o.momentum:g}{' nesterov' if o.nesterov else ''}" if o.momentum else ""
        schedule = f", {t.scheduler} schedule" if t.scheduler != "none" else ""
        return f"{net}, {output}{t.loss}, {o.name} lr {lr or f'{o.lr:g}'}{momentum}{schedule}, batch {t.batch_size}"


_SECTIONS = {
    "model": ModelConfig,
    "optimizer": OptimizerConfig,
    "training": TrainingConfig,
    "augment": AugmentConfig,
    "adversarial": AdversarialConfig,
    "data": DataConfig,
}


def _dotted(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Overrides by dotted key: a section's table (`{"optimizer": {"name": "sgd"}}`) becomes one key per entry."""
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        if key in _SECTIONS and isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


# ---------------------------------------------------------------------------------------------- reading values
# One rule for every way a setting is given: a TOML file's values are already typed; a value written as text
# (`--set KEY=VALUE`, a sweep's `--space KEY=A,B`) is read by `read_value`; either way `check_value` holds it to
# the type of the key's default.


def read_value(text: str) -> Any:
    """A setting written as text: a TOML value (`true`, `0.1`, `["conv 8 3"]`, `"x"`), else the text itself
    (`sgd`), surrounding spaces left out. `check_value` then checks it against the key's type."""
    text = text.strip()
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_set(items: Iterable[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` strings as overrides by dotted key, each VALUE read by `read_value`."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise MnistlabError(f"--set {item!r}: expected KEY=VALUE, e.g. --set optimizer.lr=0.01")
        overrides[key.strip()] = read_value(text)
    return overrides


def type_name(default: Any) -> str:
    """What a setting whose default is `default` takes, in words."""
    if isinstance(default, list):
        return "a list of integers" if default and isinstance(default[0], int) else "a list of strings"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[type(default)]


def check_value(value: Any, default: Any, where: str) -> Any:
    """`value` as a setting whose default is `default` takes it, else a MnistlabError naming `where`: the same
    type (an integer where a number is expected becomes a float), numbers finite, lists of the default's items
    (strings for model.layers, the only list whose default is empty)."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
            if not math.isfinite(value):
                what = "a number" if math.isnan(value) else "finite"
                raise MnistlabError(f"{where} must be a finite number ({value!r} is not {what})")
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, list):
        item = type(default[0]) if default else str
        ok = isinstance(value, list) and all(isinstance(v, item) and not isinstance(v, bool) for v in value)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise MnistlabError(f"{where}: expected {type(default).__name__} ({value!r} is not {type_name(default)})")
    return value


# The keys whose values are one of a few names, with those names (for a form's choices).
_CHOICES: dict[str, tuple[str, ...]] = {
    "model.kind": ("mlp", "cnn"),
    "optimizer.name": OPTIMIZERS,
    "training.loss": LOSSES,
    "training.scheduler": SCHEDULERS,
    "training.monitor": MONITORS,
    "adversarial.method": ADVERSARIAL,
    "data.dataset": tuple(DATASETS),
}
_HELP = {
    "model.hidden": "mlp: the hidden layers' sizes, such as [512, 256]",
    "model.layers": "cnn: one layer a line, such as conv 32 3, bn, relu, maxpool 2, dropout 0.25, flatten, linear 10",
    "model.activations": f"one per hidden layer: {', '.join(ACTIVATIONS)}",
    "model.softmax_output": "the report's quirk: probabilities into a cross-entropy loss (off: logits, correct)",
    "training.early_stopping": "patience in epochs (0: off)",
    "training.ema_decay": "moving average of the weights (0: off; typical 0.999)",
    "training.outlier_exposure": "weight of the uniform answer on generated non-digits (0: off; typical 1)",
    "augment.strokes": "share of each batch with thicker, thinner, blurred or low-resolution strokes (0: off)",
    "augment.typeset_digits": "digits typeset in fonts added to each batch (0: none)",
    "data.val_size": "training images held out for validation (0: none)",
}


def key_schema() -> list[dict[str, Any]]:
    """Every dotted key a run can set, for a form: its type (float, int, bool, str or list), its choices where it
    takes one of a few names, and a line of help where the name does not say it all."""
    kinds = {bool: "bool", int: "int", float: "float", str: "str", list: "list"}
    return [
        {"key": key, "type": kinds[type(default)], "choices": list(_CHOICES[key]) if key in _CHOICES else None}
        | {"help": _HELP.get(key)}
        for key, default in Config().flat().items()
    ]


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    """Build and validate a Config; unknown keys and wrong types raise MnistlabError naming `source`."""
    top = Config()
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise MnistlabError(f"{source}: [{key}] must be a table")
            cls = _SECTIONS[key]
            defaults = cls()
            names = {f.name for f in dataclasses.fields(cls)}
            section = {}
            for k, v in value.items():
                if k not in names:
                    raise MnistlabError(f"{source}: unknown key {key}.{k} (known: {', '.join(sorted(names))})")
                section[k] = check_value(v, getattr(defaults, k), f"{source}: {key}.{k}")
            kwargs[key] = cls(**section)
        elif key in ("name", "description"):
            kwargs[key] = check_value(value, getattr(top, key), f"{source}: {key}")
        else:
            raise MnistlabError(f"{source}: unknown key {key!r}")
    config = Config(**kwargs)
    _validate(config, source)
    return config


def _validate(config: Config, source: str) -> None:
    """Refuse settings that cannot train together, naming every problem at once."""
    problems = [
        *_model_problems(config.model),
        *_optimizer_problems(config.optimizer),
        *_training_problems(config),
        *_augment_problems(config.augment, config.data.dataset),
        *_adversarial_problems(config.adversarial, config.training),
        *_data_problems(config.data),
    ]
    if problems:
        raise MnistlabError(f"{source}: " + "; ".join(problems))


def _unknown(key: str, value: str, known: tuple[str, ...] | dict[str, Any]) -> list[str]:
    return [] if value in known else [f"{key}: unknown {value!r} (choose from {', '.join(known)})"]


def _model_problems(m: ModelConfig) -> list[str]:
    problems = []
    if m.kind == "cnn":
        problems += check_layers(m.layers)
    elif m.kind != "mlp":
        problems.append(f"model.kind must be 'mlp' or 'cnn', got {m.kind!r}")
    if len(m.hidden) != len(m.activations):
        problems.append("model.hidden and model.activations must have the same length")
    if any(h <= 0 for h in m.hidden):
        problems.append("model.hidden sizes must be positive")
    return problems + [p for a in m.activations for p in _unknown("model.activations", a, ACTIVATIONS)]


def _optimizer_problems(o: OptimizerConfig) -> list[str]:
    problems = _unknown("optimizer.name", o.name, OPTIMIZERS)
    if o.lr <= 0:
        problems.append("optimizer.lr must be positive")
    if o.nesterov and (o.name != "sgd" or o.momentum <= 0):
        problems.append("optimizer.nesterov needs optimizer.name = 'sgd' and a positive momentum")
    if o.momentum < 0 or o.weight_decay < 0:
        problems.append("optimizer.momentum and optimizer.weight_decay must be 0 or more")
    if o.momentum >= 1:
        problems.append("optimizer.momentum must be below 1")
    return problems


def _training_problems(config: Config) -> list[str]:
    t = config.training
    problems = _unknown("training.loss", t.loss, LOSSES) + _unknown("training.scheduler", t.scheduler, SCHEDULERS)
    if not 0 <= t.label_smoothing < 1:
        problems.append("training.label_smoothing must be in [0, 1)")
    if t.label_smoothing and t.loss != "cross-entropy":
        problems.append("training.label_smoothing applies to the cross-entropy loss only")
    if t.warmup_epochs < 0 or t.warmup_epochs >= max(t.epochs, 1):  # a bad epoch count is reported below
        problems.append("training.warmup_epochs must be at least 0 and less than training.epochs")
    if t.early_stopping < 0:
        problems.append("training.early_stopping (patience in epochs) must be 0 (off) or more")
    if t.monitor.startswith("test"):
        problems.append(
            f"training.monitor: refusing to monitor {t.monitor!r}: the test set must never choose the model "
            "(use val_loss or val_accuracy)"
        )
    else:
        problems += _unknown("training.monitor", t.monitor, MONITORS)
    if t.early_stopping and config.data.val_size == 0 and t.monitor.startswith("val_"):
        problems.append("early stopping needs a validation split (data.val_size > 0)")
    if t.monitor == "train_pgd_accuracy" and config.adversarial.method == "none":
        problems.append("training.monitor = 'train_pgd_accuracy' needs adversarial training ([adversarial] method)")
    if t.epochs < 1 or t.batch_size < 1:
        problems.append("training.epochs and training.batch_size must be at least 1")
    if not 0 <= t.ema_decay < 1:
        problems.append("training.ema_decay must be in [0, 1)")
    if t.outlier_exposure < 0:
        problems.append("training.outlier_exposure must be 0 or more")
    if t.outlier_exposure and config.data.dataset != "mnist":
        problems.append("training.outlier_exposure trains beside generated non-digits: for digit models only")
    if t.outlier_exposure and config.adversarial.method != "none":
        problems.append("training.outlier_exposure and adversarial training ([adversarial] method) go one at a time")
    if t.min_delta < 0 or t.gamma <= 0 or t.step_size < 1:
        problems.append("training.min_delta must be 0 or more, training.gamma positive, training.step_size at least 1")
    return problems


def _augment_problems(a: AugmentConfig, dataset: str) -> list[str]:
    if min(a.rotate, a.scale, a.shear, a.translate, a.elastic_alpha) < 0 or a.elastic_sigma <= 0 or a.scale >= 1:
        return ["augment values must be 0 or more (scale below 1, elastic_sigma positive)"]
    if not 0 <= a.strokes <= 1 or a.typeset_digits < 0:
        return ["augment.strokes must be in [0, 1] and augment.typeset_digits 0 or more"]
    if a.typeset_digits and dataset != "mnist":
        return ["augment.typeset_digits adds digits typeset in fonts: for digit models only"]
    return []


def _adversarial_problems(v: AdversarialConfig, t: TrainingConfig) -> list[str]:
    problems = _unknown("adversarial.method", v.method, ADVERSARIAL)
    if not 0 < v.eps <= 1 or v.step <= 0:
        problems.append("adversarial.eps must be in (0, 1] and adversarial.step positive (pixels are in [0, 1])")
    if not 0 < v.fraction <= 1:
        problems.append("adversarial.fraction (the share of each batch attacked) must be in (0, 1]")
    if v.method in ("pgd", "trades") and v.steps < 1:
        problems.append(f"adversarial.steps must be at least 1 for {v.method}")
    if v.method == "trades" and (v.beta < 0 or v.fraction != 1):
        problems.append("adversarial: trades needs beta >= 0 and fraction = 1 (it always keeps the clean batch)")
    if v.ramp_epochs < 0 or v.ramp_epochs > max(t.epochs, 1):
        problems.append("adversarial.ramp_epochs must be between 0 and training.epochs")
    return problems


def _data_problems(d: DataConfig) -> list[str]:
    problems = [] if d.val_size >= 0 else ["data.val_size must be 0 or more"]
    return problems + _unknown("data.dataset", d.dataset, DATASETS)


def shipped_configs() -> dict[str, Path]:
    """Names of the configs shipped with mnistlab, mapped to their files."""
    folder = resources.files("mnistlab") / "configs"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".toml")}


def load_config(name_or_path: str | Path) -> Config:
    """Load a shipped config by name (`seed-b`) or a TOML file by path."""
    path = Path(name_or_path)
    shipped = shipped_configs()
    if str(name_or_path) in shipped:
        path = shipped[str(name_or_path)]
    elif not path.is_file():
        raise MnistlabError(
            f"no config named {str(name_or_path)!r} and no such file "
            f"(shipped configs: {', '.join(sorted(shipped))}; see `mnistlab configs`)"
        )
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise MnistlabError(f"{path}: not valid TOML ({exc})") from None
    data.setdefault("name", path.stem)
    return config_from_dict(data, source=str(path))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _shown(value: Any) -> str:
    """A value as TOML writes it, for messages; a value TOML cannot hold (a table, a date) as Python shows it."""
    try:
        return _toml_value(value)
    except TypeError:
        return repr(value)


def _dump_toml(data: dict[str, Any]) -> str:
    """TOML for a config: top-level scalars, then one table per section (all a config needs)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for key, table in data.items():
        if isinstance(table, dict):
            lines += ["", f"[{key}]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"
