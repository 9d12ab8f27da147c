"""Training on the real MNIST: sane accuracy, seeded determinism, the run directory it writes, early stopping and
TensorBoard logs."""

from __future__ import annotations

import json

import pytest
import torch

from mnistlab.config import load_config
from mnistlab.devices import mps_available, resolve_device
from mnistlab.errors import MnistlabError
from mnistlab.models.files import load_model
from mnistlab.models.losses import make_loss
from mnistlab.models.metrics import evaluate_model, predict_scores
from mnistlab.train.loop import train

from .support.mnist import subset


def test_one_epoch_of_seed_b_fixed_reaches_95_percent(mnist_data, tmp_path):
    config = load_config("seed-b-fixed").with_overrides({"training.epochs": 1})
    run = train(config, out_dir=tmp_path / "run", quiet=True, data=mnist_data)
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
    from mnistlab.analysis.reports import SOFTMAX_LOSS_FLOOR

    config = load_config("seed-b").with_overrides({"training.epochs": 1})
    run = train(config, quiet=True, data=subset(mnist_data, 10000, 2000))
    assert pytest.approx(1.4612, abs=1e-4) == SOFTMAX_LOSS_FLOOR
    assert run.final["train_loss"] > SOFTMAX_LOSS_FLOOR
    assert run.final["test_loss"] > SOFTMAX_LOSS_FLOOR
    assert run.final["test_accuracy"] > 0.8  # Adam still learns despite the quirk


# ---------------------------------------------------------------------------------------------- early stopping


def test_early_stopping_ends_early_and_keeps_the_best_epoch(mnist_data, tmp_path):
    # A small training set and a high learning rate overfit within a few epochs, so validation loss turns up.
    data = subset(mnist_data, 3000, 2000)
    config = load_config("seed-b-fixed").with_overrides(
        {"training.epochs": 30, "training.early_stopping": 2, "optimizer.lr": 0.003}
    )
    run = train(config, out_dir=tmp_path / "run", quiet=True, data=data)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["stop_reason"] == "early_stopping"
    assert len(metrics["epochs"]) < 30
    best = metrics["best_epoch"]
    assert len(metrics["epochs"]) == best + 2  # patience 2: two epochs without improvement after the best
    assert metrics["monitor"] == "val_loss"
    assert metrics["best_value"] == min(e["val_loss"] for e in metrics["epochs"])
    assert metrics["saved_model_epoch"] == best

    # The saved model is the best epoch's, not the last one's.
    loaded = load_model(tmp_path / "run")
    result = evaluate_model(loaded.model, data.test, loaded.loss_fn())
    recorded = metrics["epochs"][best - 1]
    assert result.accuracy == recorded["test_accuracy"]
    assert result.loss == pytest.approx(recorded["test_loss"], rel=1e-5)
    assert result.loss != pytest.approx(metrics["epochs"][-1]["test_loss"], rel=1e-5)
    assert loaded.metadata["epoch"] == best == run.best_epoch


def test_best_weights_restored_when_the_epoch_limit_ends_the_run(mnist_data):
    data = subset(mnist_data, 1000, 2000)
    config = load_config("seed-b-fixed").with_overrides(
        {"training.epochs": 6, "training.early_stopping": 100, "optimizer.lr": 0.003}
    )
    run = train(config, quiet=True, data=data)
    assert run.stop_reason == "epoch_limit"
    best = min(run.epochs, key=lambda e: e["val_loss"])
    assert best["epoch"] < 6  # this setting overfits; otherwise the test would prove nothing
    result = evaluate_model(run.model, data.val, make_loss("cross-entropy"))
    assert result.loss == pytest.approx(best["val_loss"], rel=1e-5)


def test_early_stopping_refuses_the_test_set_and_needs_validation():
    with pytest.raises(MnistlabError, match="refusing to monitor 'test_accuracy'"):
        load_config("seed-b-fixed").with_overrides({"training.monitor": "test_accuracy"})
    with pytest.raises(MnistlabError, match="needs a validation split"):
        load_config("seed-b-fixed").with_overrides({"training.early_stopping": 3, "data.val_size": 0})


def test_tensorboard_logs_every_epoch(mnist_data, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is an optional extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = load_config("seed-b-fixed").with_overrides({"training.epochs": 2})
    train(config, out_dir=tmp_path / "run", quiet=True, data=subset(mnist_data, 2000, 500), tensorboard=True)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [s.step for s in events.Scalars("val/accuracy")] == [1, 2]
    assert "train/loss" in events.Tags()["scalars"]


@pytest.mark.skipif(not mps_available(), reason="no Apple MPS here: runs on Apple-silicon Macs")
@pytest.mark.parametrize("name", ["seed-b-fixed", "cnn-fast"])
def test_training_on_apple_mps_learns_and_saves_a_model_the_cpu_reads(name, mnist_data, tmp_path):
    """On a Mac with MPS, `--device auto` picks it, and what MPS lacks (fused optimizer kernels, bfloat16
    autocast) falls back: the run learns, and its model file reads on the CPU with the same predictions."""
    assert resolve_device("auto").type == "mps"
    config = load_config(name).with_overrides({"training.epochs": 1})
    run = train(config, out_dir=tmp_path / "run", data=subset(mnist_data, 5000, 1000), device="auto", quiet=True)
    assert run.final["test_accuracy"] > 0.85
    on_cpu = load_model(tmp_path / "run", torch.device("cpu"))
    test = subset(mnist_data, 10, 1000).test
    accuracy = (predict_scores(on_cpu.model, test.images).argmax(1) == test.labels).float().mean().item()
    assert abs(accuracy - run.final["test_accuracy"]) < 0.005


def test_asking_for_a_device_this_machine_lacks_is_a_one_line_error():
    for device, missing in (("cuda", torch.cuda.is_available()), ("mps", mps_available())):
        if not missing:
            with pytest.raises(MnistlabError, match=f"device '{device}' asked for, but PyTorch"):
                resolve_device(device)
