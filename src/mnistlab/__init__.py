"""mnistlab: train, compare, explain and use handwritten-digit classifiers on MNIST and MNIST-like data.

The straight line: data -> model -> training -> evaluation -> prediction.

    >>> import mnistlab
    >>> config = mnistlab.load_config("seed-b-fixed")
    >>> run = mnistlab.train(config, out_dir="runs/b")
    >>> mnistlab.evaluate("runs/b").accuracy

Importing the package is cheap: each name below loads its module (and torch) on first use, so the command
line answers `--help` at once and a notebook pays only for what it touches.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

_EXPORTS = {
    "Config": "mnistlab.config",
    "load_config": "mnistlab.config",
    "MnistlabError": "mnistlab.errors",
    "load_data": "mnistlab.data",
    "build_model": "mnistlab.models",
    "load_model": "mnistlab.checkpoint",
    "save_model": "mnistlab.checkpoint",
    "train": "mnistlab.training",
    "resume": "mnistlab.training",
    "evaluate": "mnistlab.predict",
    "reproduce": "mnistlab.reports",
    "compare": "mnistlab.reports",
    "corrupt": "mnistlab.corruptions",
}
__all__ = [
    "Config",
    "MnistlabError",
    "build_model",
    "compare",
    "corrupt",
    "evaluate",
    "load_config",
    "load_data",
    "load_model",
    "reproduce",
    "resume",
    "save_model",
    "train",
]

if TYPE_CHECKING:
    from mnistlab.checkpoint import load_model, save_model
    from mnistlab.config import Config, load_config
    from mnistlab.corruptions import corrupt
    from mnistlab.data import load_data
    from mnistlab.errors import MnistlabError
    from mnistlab.models import build_model
    from mnistlab.predict import evaluate
    from mnistlab.reports import compare, reproduce
    from mnistlab.training import resume, train


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'mnistlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
