"""Checkpoints and resume on the real MNIST: an interrupted run resumes to
exactly the metrics of an uninterrupted one; resume's mistakes are one-line errors."""

from __future__ import annotations

import pytest
import torch

from mnistlab.config import load_config
from mnistlab.train.loop import train

from .support.cli import assert_user_error, mnistlab
from .support.mnist import subset
from .support.runs import interrupted_and_resumed, without_time

# ---------------------------------------------------------------------------------------------- resume


def test_interrupted_run_resumes_to_identical_metrics(mnist_data, tmp_path):
    """Interrupted after epoch 2 of 4 and resumed == never interrupted, epoch by epoch, on the CPU."""
    data = subset(mnist_data, 8000, 1000)
    config = load_config("seed-b-fixed").with_overrides(
        {
            "training.epochs": 4,
            "optimizer.name": "sgd",
            "optimizer.lr": 0.05,
            "optimizer.momentum": 0.9,
            "optimizer.nesterov": True,
            "training.scheduler": "onecycle",
            "training.early_stopping": 10,
        }
    )
    whole = train(config, out_dir=tmp_path / "whole", quiet=True, data=data, device="cpu")
    resumed = interrupted_and_resumed(config, tmp_path / "cut", data, after=2)
    assert without_time(resumed.epochs) == without_time(whole.epochs)
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.slow  # 17 s on 2 busy cores
def test_resume_mistakes_are_one_line_errors(mnist_path, tmp_path):
    assert_user_error(mnistlab("train", "--resume", str(tmp_path / "nope")), "no such run directory")
    (tmp_path / "empty").mkdir()
    assert_user_error(mnistlab("train", "--resume", str(tmp_path / "empty")), "nothing to resume")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.toml").write_text(load_config("seed-a").to_toml())
    assert_user_error(mnistlab("train", "--resume", str(partial)), "nothing to resume")

    run = tmp_path / "run"
    trained = mnistlab(
        "train",
        "--config",
        "seed-a",
        "--epochs",
        "1",
        "--val-size",
        "0",
        "--out",
        str(run),
        "--data-dir",
        str(mnist_path),
    )
    assert trained.returncode == 0, trained.stderr
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert_user_error(mnistlab("train", "--resume", str(run), "--config", "seed-b"), "different config")
    assert_user_error(mnistlab("train", "--resume", str(run), "--lr", "0.1"), "only --epochs may change")
    assert_user_error(mnistlab("train", "--resume", str(run), "--data-dir", str(mnist_path)), "already complete")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert_user_error(mnistlab("train"), "--config")
