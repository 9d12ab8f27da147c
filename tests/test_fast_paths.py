"""The training loop's fast paths against the slow paths they replace: hand-derived MLP gradients against
autograd, the direct fused optimizer step against `optimizer.step()`, and subnormal flushing on every
thread."""

from __future__ import annotations

import platform

import pytest
import torch

from mnistlab.config import ModelConfig, load_config
from mnistlab.data.splits import to_float
from mnistlab.devices import keep_freed_memory
from mnistlab.models.gradients import autograd_gradients, by_hand_supported, mlp_gradients
from mnistlab.models.losses import make_loss
from mnistlab.models.metrics import predict_scores
from mnistlab.models.networks import build_model
from mnistlab.models.optimizers import make_optimizer, make_scheduler, make_step
from mnistlab.subnormals import flush_subnormals
from mnistlab.train.loop import train

from .support.mnist import subset


@pytest.mark.parametrize("activations", [["relu"], ["tanh"], ["sigmoid"], ["relu", "tanh"], ["sigmoid", "relu"]])
@pytest.mark.parametrize("softmax_output", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_hand_derived_mlp_gradients_match_autograd(mnist_data, activations, softmax_output, label_smoothing):
    hidden = [96, 48][: len(activations)]
    config = ModelConfig(kind="mlp", hidden=hidden, activations=activations, softmax_output=softmax_output)
    torch.manual_seed(0)
    model = build_model(config)
    x, y = to_float(mnist_data.train.images[:64]), mnist_data.train.labels[:64]
    loss_fn = make_loss("cross-entropy", softmax_output, label_smoothing)

    loss, out = autograd_gradients(model, loss_fn)(x, y)
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    by_hand_loss, by_hand_out = mlp_gradients(model, activations, softmax_output, label_smoothing)(x, y)

    torch.testing.assert_close(by_hand_out, out)
    torch.testing.assert_close(by_hand_loss, loss)
    for name, p in model.named_parameters():
        assert p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-7, msg=name)


def test_gradients_by_hand_only_where_derived():
    seed_b = load_config("seed-b")
    assert by_hand_supported(seed_b) and by_hand_supported(load_config("seed-c"))
    assert not by_hand_supported(load_config("cnn-fast"))
    for override in ({"training.loss": "mse"}, {"training.amp": True}, {"model.activations": ["gelu"]}):
        assert not by_hand_supported(seed_b.with_overrides(override)), override


def test_hand_derived_training_learns_as_autograd_does(mnist_data):
    # "nll" on logits is the same loss as cross-entropy but goes through autograd: the two runs differ only
    # in floating-point rounding, so they must end within a whisker of each other.
    data = subset(mnist_data, 20_000, 5_000)
    config = load_config("seed-b-fixed").with_overrides({"training.epochs": 2})
    by_hand = train(config, quiet=True, data=data, device="cpu").final
    autograd = train(config.with_overrides({"training.loss": "nll"}), quiet=True, data=data, device="cpu").final
    assert by_hand["test_accuracy"] > 0.92
    assert abs(by_hand["test_accuracy"] - autograd["test_accuracy"]) < 0.003
    assert abs(by_hand["train_loss"] - autograd["train_loss"]) < 0.001


@pytest.mark.parametrize(
    "optimizer",
    [
        {"name": "adam", "lr": 0.01},
        {"name": "adamw", "lr": 0.01, "weight_decay": 0.05},
        {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
        {"name": "sgd", "lr": 0.1},
        {"name": "rmsprop", "lr": 0.01},
    ],
    ids=lambda o: "-".join(str(v) for v in o.values()),
)
def test_direct_fused_step_is_bit_identical_to_optimizer_step(optimizer):
    config = load_config("seed-b-fixed").with_overrides(
        {**{f"optimizer.{k}": v for k, v in optimizer.items()}, "training.scheduler": "onecycle"}
    )
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="mlp", hidden=[32], activations=["relu"]))
    models = [model, build_model(ModelConfig(kind="mlp", hidden=[32], activations=["relu"]))]
    models[1].load_state_dict(model.state_dict())
    optimizers = [make_optimizer(m.parameters(), config.optimizer) for m in models]
    schedules = [make_scheduler(o, config.training, steps_per_epoch=4) for o in optimizers]
    steps = [optimizers[0].step, make_step(optimizers[1])]
    generator = torch.Generator().manual_seed(1)
    for _ in range(6):  # across learning-rate changes from the schedule
        grads = [torch.randn(p.shape, generator=generator) for p in model.parameters()]
        for m, step, schedule in zip(models, steps, schedules, strict=True):
            for p, g in zip(m.parameters(), grads, strict=True):
                p.grad = g.clone()
            step()
            schedule.step()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(models[0][1].weight, model.state_dict()["1.weight"] * 0)  # they did move
    for a, b in zip(optimizers[0].state.values(), optimizers[1].state.values(), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key


def test_subnormals_flush_on_every_thread():
    subnormal = torch.full((4_000_000,), 1e-39)  # big enough to be split across PyTorch's threads
    (subnormal * 1.0).sum()  # the thread pool exists before the flag is set, as in any real session
    try:
        if not flush_subnormals(True):
            pytest.skip("this CPU cannot flush subnormals")
        assert torch.count_nonzero(subnormal * 1.0) == 0
    finally:
        flush_subnormals(False)
    assert torch.count_nonzero(subnormal * 1.0) == len(subnormal)


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_without_the_private_kernel_the_step_is_optimizer_step(name, monkeypatch):
    """The fused kernels `make_step` calls are private to PyTorch: where one is missing (another release), the
    step falls back to `optimizer.step()` and still trains."""
    from mnistlab.models.optimizers import _KERNELS

    config = load_config("seed-b-fixed").with_overrides({"optimizer.name": name, "optimizer.lr": 0.01})
    kind = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[name]
    # As a release where the kernel has another name: PyTorch's own fused path, which uses its name, still works.
    monkeypatch.setitem(_KERNELS, kind, _KERNELS[kind] + "_removed")
    model = build_model(ModelConfig(kind="mlp", hidden=[8], activations=["relu"]))
    optimizer = make_optimizer(model.parameters(), config.optimizer)
    step = make_step(optimizer)
    assert step == optimizer.step
    x, y = torch.rand(32, 28, 28), torch.arange(32) % 10
    losses = []
    for _ in range(20):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_evaluation_runs_a_folded_copy_and_gives_the_model_s_own_answers(mnist_data):
    """Evaluation folds BatchNorm into the convolutions of a channels-last copy in small batches: the same
    scores as the model itself in eval mode, and the model is left as it was (training mode, its own weights)."""
    torch.manual_seed(0)
    model = build_model(load_config("cnn-fast").model)
    model.train()
    with torch.no_grad():  # BatchNorm statistics away from their initial 0 and 1, so that folding matters
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = mnist_data.test.images[:300]
    scores = predict_scores(model, images)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()
    with torch.no_grad():
        expected = torch.cat([model(to_float(images[i : i + 100])) for i in range(0, 300, 100)])
    assert torch.allclose(scores, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(scores.argmax(1), expected.argmax(1))
    assert keep_freed_memory() == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
