"""Losses, optimizers and learning-rate schedules: each means what it says and trains on the real MNIST."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F

from mnistlab.config import load_config
from mnistlab.models.losses import make_loss
from mnistlab.models.optimizers import make_optimizer, make_scheduler
from mnistlab.train.loop import train

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
