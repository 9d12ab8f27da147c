"""mnistlab: train, compare, explain and use handwritten-digit classifiers on MNIST and MNIST-like data.

The straight line: data -> model -> training -> evaluation -> prediction.

    >>> import mnistlab
    >>> config = mnistlab.load_config("seed-b-fixed")
    >>> run = mnistlab.train(config, out_dir="runs/b")
    >>> mnistlab.evaluate("runs/b").accuracy
"""

from mnistlab.checkpoint import load_model, save_model
from mnistlab.config import Config, load_config
from mnistlab.data import load_data
from mnistlab.errors import MnistlabError
from mnistlab.models import build_model
from mnistlab.predict import evaluate
from mnistlab.reports import reproduce
from mnistlab.training import train

__all__ = [
    "Config",
    "MnistlabError",
    "build_model",
    "evaluate",
    "load_config",
    "load_data",
    "load_model",
    "reproduce",
    "save_model",
    "train",
]
__version__ = "0.1.0"
