"""The training toolkit on the real MNIST: early stopping, checkpoints and exact resume, losses, optimizers,
schedules, comparison and TensorBoard logging."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F

from mnistlab.checkpoint import load_model
from mnistlab.config import load_config
from mnistlab.evaluation import evaluate_model
from mnistlab.losses import make_loss
from mnistlab.optimizers import make_optimizer, make_scheduler
from mnistlab.reports import compare
from mnistlab.training import train

from .helpers import interrupted_and_resumed, subset, without_time
from .test_cli import assert_user_error, mnistlab

# ---------------------------------------------------------------------------------------------- early stopping


def test_early_stopping_ends_early_and_keeps_the_best_epoch(mnist_data, tmp_path):
    # A small training set and a high learning rate overfit within a few epochs, so validation loss turns up.
    data = subset(mnist_data, 3000, 2000)
    config = load_config("seed-b-fixed").with_overrides(
        {"training.epochs": 30, "training.early_stopping": 2, "optimizer.lr": 0.003}
    )
    run = train(config, tmp_path / "run", quiet=True, data=data)
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
    with pytest.raises(Exception, match="refusing to monitor 'test_accuracy'"):
        load_config("seed-b-fixed").with_overrides({"training.monitor": "test_accuracy"})
    with pytest.raises(Exception, match="needs a validation split"):
        load_config("seed-b-fixed").with_overrides({"training.early_stopping": 3, "data.val_size": 0})


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
    whole = train(config, tmp_path / "whole", quiet=True, data=data, device="cpu")
    resumed = interrupted_and_resumed(config, tmp_path / "cut", data, after=2)
    assert without_time(resumed.epochs) == without_time(whole.epochs)
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_ctrl_c_saves_and_resume_continues_identically(mnist_path, tmp_path):
    """A real SIGINT to the CLI mid-run, then `train --resume`: the metrics match an uninterrupted run."""
    args = ["--config", "seed-b-fixed", "--epochs", "4", "--data-dir", str(mnist_path)]
    whole = mnistlab("train", *args, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr

    cut = tmp_path / "cut"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mnistlab", "train", *args, "--out", str(cut)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
        # A shell that starts jobs in the background makes them ignore SIGINT, and Python then never turns
        # Ctrl-C into KeyboardInterrupt; give the child the default, as a terminal would.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 300
    while not (cut / "checkpoint.safetensors").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    done = json.loads((cut / "metrics.json").read_text())["epochs"]
    if len(done) == 4:
        pytest.skip("the run finished before the interrupt arrived")
    assert proc.returncode == 130
    assert "Traceback" not in stderr
    assert f"mnistlab train --resume {cut}" in stderr

    resumed = mnistlab("train", "--resume", str(cut), "--data-dir", str(mnist_path))
    assert resumed.returncode == 0, resumed.stderr
    assert f"from epoch {len(done) + 1}" in resumed.stderr
    a = json.loads((tmp_path / "whole" / "metrics.json").read_text())["epochs"]
    b = json.loads((cut / "metrics.json").read_text())["epochs"]
    assert without_time(a) == without_time(b)


def test_resume_mistakes_are_one_line_errors(mnist_path, tmp_path):
    assert_user_error(mnistlab("train", "--resume", str(tmp_path / "nope")), "no such run directory")
    (tmp_path / "empty").mkdir()
    assert_user_error(mnistlab("train", "--resume", str(tmp_path / "empty")), "no config.toml")
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


# ---------------------------------------------------------------------------------------------- losses


def test_losses_mean_what_they_say():
    torch.manual_seed(0)
    logits, labels = torch.randn(32, 10), torch.randint(0, 10, (32,))
    probs = logits.softmax(1)
    ce = F.cross_entropy(logits, labels)
    torch.testing.assert_close(make_loss("nll")(logits, labels), ce)
    torch.testing.assert_close(make_loss("nll", probabilities=True)(probs, labels), ce)  # the quirk undone
    quirk = make_loss("cross-entropy", probabilities=True)(probs, labels)
    torch.testing.assert_close(quirk, F.cross_entropy(probs, labels))  # the quirk kept, as named
    perfect = F.one_hot(labels, 10).float()
    assert make_loss("cross-entropy")(perfect, labels).item() == pytest.approx(math.log(1 + 9 / math.e), abs=1e-6)
    mse = make_loss("mse")(logits, labels)
    torch.testing.assert_close(mse, ((probs - F.one_hot(labels, 10)) ** 2).mean())
    torch.testing.assert_close(make_loss("mse", probabilities=True)(probs, labels), mse)
    margins = (1 - logits.gather(1, labels[:, None]) + logits).clamp_min(0)
    manual = (margins.sum(1) - 1) / 10  # the true class contributes max(0, 1) = 1, excluded
    torch.testing.assert_close(make_loss("hinge")(logits, labels), manual.mean())
    smoothed = make_loss("cross-entropy", label_smoothing=0.1)(logits, labels)
    torch.testing.assert_close(smoothed, 0.9 * ce + 0.1 * (-logits.log_softmax(1).mean(1)).mean())


@pytest.mark.parametrize(("loss", "minimum"), [("cross-entropy", 0.95), ("nll", 0.95), ("mse", 0.93), ("hinge", 0.95)])
def test_each_loss_trains_in_one_epoch(mnist_data, loss, minimum):
    config = load_config("seed-b-fixed").with_overrides({"training.epochs": 1, "training.loss": loss})
    run = train(config, quiet=True, data=mnist_data)
    assert run.final["test_accuracy"] >= minimum


OPTIMIZERS = {
    "sgd": {"optimizer.lr": 0.05, "optimizer.momentum": 0.9, "optimizer.nesterov": True},
    "adam": {"optimizer.lr": 0.001},
    "adamw": {"optimizer.lr": 0.001, "optimizer.weight_decay": 0.01},
    "rmsprop": {"optimizer.lr": 0.001},
    "adagrad": {"optimizer.lr": 0.01},
    "adadelta": {"optimizer.lr": 1.0},
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_each_optimizer_trains_in_one_epoch(mnist_data, name):
    overrides = {"training.epochs": 1, "optimizer.name": name, **OPTIMIZERS[name]}
    run = train(load_config("seed-b-fixed").with_overrides(overrides), quiet=True, data=mnist_data)
    assert run.final["test_accuracy"] >= 0.94


def test_schedules_shape_the_learning_rate():
    def lrs(**overrides):
        config = load_config("seed-b-fixed").with_overrides({f"training.{k}": v for k, v in overrides.items()})
        opt = make_optimizer(torch.nn.Linear(2, 2).parameters(), config.optimizer)
        sched = make_scheduler(opt, config.training, steps_per_epoch=10)
        seen = []
        for _ in range(config.training.epochs * 10):
            seen.append(opt.param_groups[0]["lr"])
            opt.step()
            if sched:
                sched.step()
        return seen

    assert set(lrs(epochs=3)) == {0.001}
    step = lrs(epochs=3, scheduler="step", gamma=0.5)
    assert step[0] == step[9] == 0.001 and step[10] == 0.0005 and step[29] == 0.00025
    cosine = lrs(epochs=4, scheduler="cosine", warmup_epochs=1)
    assert cosine[0] == pytest.approx(0.0001) and cosine[9] == pytest.approx(0.001)
    assert cosine[10] == pytest.approx(0.001) and cosine[-1] < 0.00001
    assert all(a >= b for a, b in pairwise(cosine[10:]))
    one = lrs(epochs=4, scheduler="onecycle", warmup_epochs=1)
    assert max(one) == pytest.approx(0.001) and one.index(max(one)) == 9 and one[-1] < 1e-6


# ---------------------------------------------------------------------------------------------- compare


def test_compare_reports_runs_side_by_side(mnist_data, tmp_path):
    data = subset(mnist_data, 4000, 1000)
    base = load_config("seed-b-fixed").with_overrides({"training.epochs": 2})
    train(base, tmp_path / "adam", quiet=True, data=data)
    train(base.with_overrides({"training.loss": "mse"}), tmp_path / "mse", quiet=True, data=data)
    report = compare([tmp_path / "adam", tmp_path / "mse"], tmp_path / "cmp").read_text()
    assert "| adam | loss=cross-entropy |" in report
    assert "| mse | loss=mse |" in report
    assert (tmp_path / "cmp" / "test-curves.png").is_file() and (tmp_path / "cmp" / "val-curves.png").is_file()

    cli = mnistlab("compare", str(tmp_path / "adam"), str(tmp_path / "mse"), "--out", str(tmp_path / "cli"))
    assert cli.returncode == 0, cli.stderr
    assert "| adam |" in (tmp_path / "cli" / "report.md").read_text()
    assert_user_error(mnistlab("compare", str(tmp_path), "--out", str(tmp_path / "x")), "not a run directory")


def test_tensorboard_logs_every_epoch(mnist_data, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is an optional extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = load_config("seed-b-fixed").with_overrides({"training.epochs": 2})
    train(config, tmp_path / "run", quiet=True, data=subset(mnist_data, 2000, 500), tensorboard=True)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [s.step for s in events.Scalars("val/accuracy")] == [1, 2]
    assert "train/loss" in events.Tags()["scalars"]
