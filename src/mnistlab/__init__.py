"""mnistlab: train, compare, explain and use handwritten-digit classifiers on MNIST and MNIST-like data.

The straight line, one subpackage each: data -> models -> train -> infer -> analysis (docs/architecture.md).

    >>> import mnistlab
    >>> config = mnistlab.load_config("seed-b-fixed")
    >>> run = mnistlab.train(config, out_dir="runs/b")
    >>> mnistlab.evaluate("runs/b").accuracy
    >>> mnistlab.find_lr(mnistlab.load_config("seed-a")).suggested_lr

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
    "load_data": "mnistlab.data.splits",
    "corrupt": "mnistlab.data.corruptions",
    "preprocess": "mnistlab.data.preprocess",
    "build_model": "mnistlab.models.networks",
    "load_model": "mnistlab.models.files",
    "save_model": "mnistlab.models.files",
    "train": "mnistlab.train.loop",
    "resume": "mnistlab.train.loop",
    "find_lr": "mnistlab.train.lr_find",
    "evaluate": "mnistlab.infer.evaluate",
    "predict_images": "mnistlab.infer.predict",
    "explain": "mnistlab.infer.explain",
    "layer_views": "mnistlab.infer.inside",
    "NeighbourIndex": "mnistlab.infer.inside",
    "reproduce": "mnistlab.analysis.reports",
    "compare": "mnistlab.analysis.reports",
}
__all__ = [
    "Config",
    "MnistlabError",
    "NeighbourIndex",
    "build_model",
    "compare",
    "corrupt",
    "evaluate",
    "explain",
    "find_lr",
    "layer_views",
    "load_config",
    "load_data",
    "load_model",
    "predict_images",
    "preprocess",
    "reproduce",
    "resume",
    "save_model",
    "train",
]

if TYPE_CHECKING:
    from mnistlab.analysis.reports import compare, reproduce
    from mnistlab.config import Config, load_config
    from mnistlab.data.corruptions import corrupt
    from mnistlab.data.preprocess import preprocess
    from mnistlab.data.splits import load_data
    from mnistlab.errors import MnistlabError
    from mnistlab.infer.evaluate import evaluate
    from mnistlab.infer.explain import explain
    from mnistlab.infer.inside import NeighbourIndex, layer_views
    from mnistlab.infer.predict import predict_images
    from mnistlab.models.files import load_model, save_model
    from mnistlab.models.networks import build_model
    from mnistlab.train.loop import resume, train
    from mnistlab.train.lr_find import find_lr


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'mnistlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
