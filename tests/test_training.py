"""Training on the real MNIST: sane accuracy, seeded determinism, and the run directory it writes."""

from __future__ import annotations

import json

import pytest
import torch

from mnistlab.checkpoint import load_model
from mnistlab.config import load_config
from mnistlab.evaluation import evaluate_model
from mnistlab.training import train

from .helpers import subset


def test_one_epoch_of_seed_b_fixed_reaches_95_percent(mnist_data, tmp_path):
    config = load_config("seed-b-fixed").with_overrides({"training.epochs": 1})
    run = train(config, tmp_path / "run", quiet=True, data=mnist_data)
    assert run.final["test_accuracy"] >= 0.95
    assert run.final["val_accuracy"] >= 0.95

    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"config.toml", "metrics.json", "model.safetensors", "model.json", "curves.png"} <= files
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    epoch = metrics["epochs"][0]
    keys = [
        "epoch",
        "train_loss",
        "train_accuracy",
        "val_loss",
        "val_accuracy",
        "test_loss",
        "test_accuracy",
        "seconds",
    ]
    assert all(k in epoch for k in keys)
    assert all(0 <= epoch[k] <= 1 for k in keys if k.endswith("accuracy"))
    assert load_config(tmp_path / "run" / "config.toml") == config

    # The saved model is the trained one: evaluating it reproduces the recorded test metrics.
    loaded = load_model(tmp_path / "run")
    result = evaluate_model(loaded.model, mnist_data.test, loaded.loss_fn())
    assert result.accuracy == epoch["test_accuracy"]
    assert result.loss == pytest.approx(epoch["test_loss"], rel=1e-5)
    assert sum(map(sum, result.confusion_matrix)) == 10000


def test_same_seed_same_metrics_on_cpu(mnist_data):
    data = subset(mnist_data, 6000, 1000)
    config = load_config("seed-b-fixed").with_overrides({"training.epochs": 2})

    def metrics(c):
        run = train(c, quiet=True, data=data, device="cpu")
        return [{k: v for k, v in e.items() if "seconds" not in k} for e in run.epochs], run.model

    first, model_a = metrics(config)
    second, model_b = metrics(config)
    assert first == second
    for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values()):
        assert torch.equal(a, b)
    third, _ = metrics(config.with_overrides({"training.seed": 1}))
    assert third != first


def test_softmax_quirk_keeps_loss_above_its_floor(mnist_data):
    """With a Softmax output layer feeding cross-entropy, no loss can go below ln(1 + 9/e)."""
    from mnistlab.reports import SOFTMAX_LOSS_FLOOR

    config = load_config("seed-b").with_overrides({"training.epochs": 1})
    run = train(config, quiet=True, data=subset(mnist_data, 10000, 2000))
    assert pytest.approx(1.4612, abs=1e-4) == SOFTMAX_LOSS_FLOOR
    assert run.final["train_loss"] > SOFTMAX_LOSS_FLOOR
    assert run.final["test_loss"] > SOFTMAX_LOSS_FLOOR
    assert run.final["test_accuracy"] > 0.8  # Adam still learns despite the quirk
