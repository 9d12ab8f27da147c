"""Small trainings on real data, and a run interrupted (as Ctrl-C would) then resumed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mnistlab.config import Config, load_config
from mnistlab.data.splits import MnistData
from mnistlab.train.loop import Run, resume, train

from .mnist import subset


def without_time(epochs: list[dict]) -> list[dict]:
    """Per-epoch metrics without the timings, which differ from run to run."""
    return [{k: v for k, v in e.items() if "seconds" not in k} for e in epochs]


def interrupted_and_resumed(config: Config, run_dir: Path, data: MnistData, after: int) -> Run:
    """Train `config` into `run_dir`, interrupt it (as Ctrl-C would) after epoch `after`, then resume it."""

    def interrupt(record: dict) -> None:
        if record["epoch"] == after:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, out_dir=run_dir, quiet=True, data=data, device="cpu", on_epoch_end=interrupt)
    assert len(json.loads((run_dir / "metrics.json").read_text())["epochs"]) == after
    assert not (run_dir / "model.safetensors").exists()  # only a finished run has a model
    return resume(run_dir, quiet=True, data=data, device="cpu")


def train_small(out: Path, mnist_data: MnistData, images: int) -> Path:
    """seed-b-fixed trained for one epoch on the first `images` training images (well under a second)."""
    threads = torch.get_num_threads()
    # One thread: this small MLP gains nothing from a second, and two spin badly when the cores are busy
    # (20,000 images: 0.5 s with one thread, 6 s with two while another process ran).
    torch.set_num_threads(1)
    try:
        config = load_config("seed-b-fixed").with_overrides({"training.epochs": 1})
        train(config, out_dir=out, data=subset(mnist_data, images, 1000), device="cpu", quiet=True)
    finally:
        torch.set_num_threads(threads)
    return out
