"""Helpers shared by the training tests: small real-data subsets and an interrupted-then-resumed run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mnistlab.config import Config
from mnistlab.data import MnistData, Split
from mnistlab.training import Run, resume, train


def subset(data: MnistData, n_train: int, n_eval: int) -> MnistData:
    """The first images of each split, for tests that need real data but not all of it."""

    def head(s: Split, n: int) -> Split:
        return Split(s.images[:n], s.labels[:n])

    return MnistData(
        data.name, head(data.train, n_train), head(data.val, n_eval), head(data.test, n_eval), data.mean, data.std
    )


def without_time(epochs: list[dict]) -> list[dict]:
    """Per-epoch metrics without the timings, which differ from run to run."""
    return [{k: v for k, v in e.items() if "seconds" not in k} for e in epochs]


def interrupted_and_resumed(config: Config, run_dir: Path, data: MnistData, after: int) -> Run:
    """Train `config` into `run_dir`, interrupt it (as Ctrl-C would) after epoch `after`, then resume it."""

    def interrupt(record: dict) -> None:
        if record["epoch"] == after:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, run_dir, quiet=True, data=data, device="cpu", on_epoch_end=interrupt)
    assert len(json.loads((run_dir / "metrics.json").read_text())["epochs"]) == after
    assert not (run_dir / "model.safetensors").exists()  # only a finished run has a model
    return resume(run_dir, quiet=True, data=data, device="cpu")
