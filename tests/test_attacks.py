"""Tests for mnistlab.attacks and adversarial training, on small models trained here on real MNIST.

FGSM, PGD and TRADES's perturbation stay within eps and [0, 1] (properties over many eps, step and seed
choices), PGD breaks a real trained network, ensembles are attacked through their averaged probabilities, and
the `[adversarial]` training hook perturbs batches as configured, resumes exactly and makes a network measurably
harder to attack, with FGSM-RS and with TRADES.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mnistlab.config import AdversarialConfig, load_config
from mnistlab.data.splits import to_float
from mnistlab.errors import MnistlabError
from mnistlab.infer.ensemble import make_ensemble
from mnistlab.models.attacks import TrainingAttack, fgsm, fgsm_random_start, log_probabilities, pgd, trades_perturbation
from mnistlab.models.files import LoadedModel, load_model
from mnistlab.models.gradients import autograd_gradients, trades_gradients
from mnistlab.models.losses import make_loss
from mnistlab.models.networks import Standardized
from mnistlab.train.loop import train

from .support.mnist import subset
from .support.runs import interrupted_and_resumed, without_time


def tiny(epochs: int = 2, seed: int = 0, **overrides):
    """Network B shrunk to 64 hidden units, standardised inputs (so attacks must go through the model's own
    standardisation), a few seconds of training."""
    return load_config("seed-b-fixed").with_overrides(
        {
            "training.epochs": epochs,
            "training.seed": seed,
            "model.hidden": [64],
            "data.normalize": True,
            "data.val_size": 500,
            **overrides,
        }
    )


@pytest.fixture(scope="module")
def small(mnist_data):
    return subset(mnist_data, 5000, 500)


@pytest.fixture(scope="module")
def trained(small, tmp_path_factory) -> tuple[LoadedModel, Path]:
    run_dir = tmp_path_factory.mktemp("attacks") / "tiny"
    train(tiny(), out_dir=run_dir, data=small, device="cpu", quiet=True)
    return load_model(run_dir), run_dir


@pytest.fixture(scope="module")
def batch(mnist_data) -> tuple[torch.Tensor, torch.Tensor]:
    return to_float(mnist_data.test.images[:200]), mnist_data.test.labels[:200]


def accuracy(model: LoadedModel, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model.model(x).argmax(1) == y).float().mean().item()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    eps=st.floats(0.001, 0.6),
    steps=st.integers(1, 4),
    step_size=st.floats(0.001, 0.5),
    seed=st.integers(0, 2**16),
    start=st.integers(0, 190),
)
def test_attacks_stay_within_eps_and_the_pixel_range(trained, batch, eps, steps, step_size, seed, start) -> None:
    model, _ = trained
    x, y = batch[0][start : start + 10], batch[1][start : start + 10]
    torch.manual_seed(seed)
    for adversarial in (
        fgsm(model.model, x, y, eps),
        pgd(model.model, x, y, eps, steps, step_size, generator=torch.Generator().manual_seed(seed))[0],
        fgsm_random_start(model.model, x, y, eps, step_size),
        fgsm_random_start(model.model, x, y, eps, step_size, steps=steps),
        trades_perturbation(model.model, x, eps, step_size, steps),
    ):
        assert adversarial.shape == x.shape and adversarial.dtype == x.dtype and not adversarial.requires_grad
        assert (adversarial - x).abs().max() <= eps + 1e-6
        assert adversarial.min() >= 0 and adversarial.max() <= 1


def test_pgd_breaks_a_trained_network(trained, batch) -> None:
    model, _ = trained
    x, y = batch
    clean = accuracy(model, x, y)
    assert clean > 0.85
    after_fgsm = accuracy(model, fgsm(model.model, x, y, 0.2), y)
    adversarial, fooled = pgd(model.model, x, y, 0.2, 20, 0.02, generator=torch.Generator().manual_seed(0))
    assert after_fgsm < clean - 0.3
    assert 1 - fooled.float().mean().item() < min(0.05, after_fgsm)  # PGD is the stronger attack
    # `fooled` tells the truth about the images returned: fooled ones are misclassified, the others are not.
    with torch.no_grad():
        wrong = model.model(adversarial).argmax(1) != y
    assert torch.equal(wrong, fooled)
    # The same generator seed gives the same attack.
    again, _ = pgd(model.model, x, y, 0.2, 20, 0.02, generator=torch.Generator().manual_seed(0))
    assert torch.equal(adversarial, again)
    # Adversarial training's PGD (every step taken from a random start) is stronger than its one FGSM step.
    torch.manual_seed(0)
    single = accuracy(model, fgsm_random_start(model.model, x, y, 0.1, 0.125), y)
    several = accuracy(model, fgsm_random_start(model.model, x, y, 0.1, 0.025, steps=10), y)
    assert several < single - 0.05


def test_ensembles_are_attacked_through_their_averaged_probabilities(
    small, trained, batch, mnist_path, tmp_path
) -> None:
    _, first = trained
    second = tmp_path / "second"
    train(tiny(seed=1), out_dir=second, data=small, device="cpu", quiet=True)
    make_ensemble([first, second], tmp_path / "ensemble", mnist_path, device="cpu")
    ensemble = load_model(tmp_path / "ensemble")
    x, y = batch
    with torch.no_grad():
        averaged = ensemble.model(x)  # the ensemble's averaged probabilities
        torch.testing.assert_close(log_probabilities(ensemble.model, x, True).exp(), averaged, atol=1e-6, rtol=1e-5)
    _, fooled = pgd(ensemble.model, x, y, 0.2, 20, 0.02, ensemble.probabilities, torch.Generator().manual_seed(0))
    assert accuracy(ensemble, x, y) > 0.85 and fooled.float().mean() > 0.9


def test_fast_adversary_ramps_eps_and_attacks_its_share(trained, batch) -> None:
    model, _ = trained
    network = model.model.network  # the raw network, as the training loop holds it
    config = AdversarialConfig(method="fgsm-rs", eps=0.3, step=0.375, ramp_epochs=2.0, fraction=0.5)
    adversary = TrainingAttack(config, network, (model.model.mean, model.model.std), False, steps_per_epoch=10)
    assert adversary.eps() == pytest.approx(0.3 / 20)
    x, y = batch[0][:20], batch[1][:20]
    out = adversary(x, y)
    assert adversary.pgd_accuracy is not None  # measured on the first batch of the epoch
    assert torch.equal(out[10:], x[10:]) and not torch.equal(out[:10], x[:10])
    assert (out - x).abs().max() <= 0.3 / 20 + 1e-6
    for _ in range(30):
        adversary(x, y)
    assert adversary.eps() == 0.3  # the ramp is over after 2 epochs of 10 batches
    resumed = TrainingAttack(config, network, None, False, steps_per_epoch=10, start_epoch=2)
    assert resumed.eps() == pytest.approx(0.3 * 11 / 20)  # a resumed run continues the ramp where it was


def test_trades_perturbation_moves_the_answer(trained, batch) -> None:
    """It climbs the KL divergence from the clean answer: far above what random noise of the same size does."""
    model, _ = trained
    x = batch[0]
    torch.manual_seed(0)
    noisy = (x + (torch.rand_like(x) * 2 - 1) * 0.15).clamp(0, 1)
    perturbed = trades_perturbation(model.model, x, 0.15, 0.04, 10)

    def divergence(other: torch.Tensor) -> float:
        with torch.no_grad():
            clean, moved = log_probabilities(model.model, x, False), log_probabilities(model.model, other, False)
        return torch.nn.functional.kl_div(moved, clean, reduction="batchmean", log_target=True).item()

    assert divergence(perturbed) > 1.0 and divergence(perturbed) > 20 * divergence(noisy)


def test_trades_loss_is_the_clean_loss_plus_beta_times_the_divergence(trained, batch) -> None:
    model, _ = trained
    network = model.model.network
    x, y = batch[0][:32], batch[1][:32]
    loss_fn = make_loss("cross-entropy", False, 0.0)
    params = [p for p in network.parameters()]
    plain_loss, plain_out = autograd_gradients(network, loss_fn)(x, y)
    plain = [p.grad.clone() for p in params]
    # Perturbations equal to the images: the divergence and its gradient are 0, the loss is the plain one.
    loss, out = trades_gradients(network, loss_fn, 6.0, False)(torch.cat([x, x]), y)
    torch.testing.assert_close(loss, plain_loss)
    torch.testing.assert_close(out, plain_out)
    for p, g in zip(params, plain, strict=True):
        torch.testing.assert_close(p.grad, g)
    moved = (x + 0.3).clamp(0, 1)
    with torch.no_grad():
        divergence = torch.nn.functional.kl_div(
            network(moved).log_softmax(1), network(x).log_softmax(1), reduction="batchmean", log_target=True
        )
    loss, _ = trades_gradients(network, loss_fn, 2.0, False)(torch.cat([x, moved]), y)
    torch.testing.assert_close(loss, plain_loss + 2.0 * divergence)


def test_trades_adversary_returns_the_clean_batch_then_its_perturbation(trained, batch) -> None:
    model, _ = trained
    config = AdversarialConfig(method="trades", eps=0.2, step=0.05, steps=3, ramp_epochs=0.0)
    adversary = TrainingAttack(config, model.model.network, (model.model.mean, model.model.std), False, 10)
    x, y = batch[0][:20], batch[1][:20]
    out = adversary(x, y)
    assert out.shape == (40, 28, 28) and torch.equal(out[:20], x) and not torch.equal(out[20:], x)
    assert (out[20:] - x).abs().max() <= 0.2 + 1e-6


def test_adversarial_config_is_validated() -> None:
    base = tiny()
    for overrides in (
        {"adversarial.method": "trades", "adversarial.fraction": 0.5},
        {"adversarial.method": "trades", "adversarial.steps": 0},
        {"adversarial.method": "pgd", "adversarial.steps": 0},
        {"adversarial.method": "trades", "adversarial.beta": -1.0},
    ):
        with pytest.raises(MnistlabError, match=overrides["adversarial.method"]):
            base.with_overrides(overrides)
    for key, value in (
        ("adversarial.method", "free"),
        ("adversarial.eps", 0.0),
        ("adversarial.eps", 1.5),
        ("adversarial.step", -0.1),
        ("adversarial.fraction", 0.0),
        ("adversarial.ramp_epochs", 5.0),
        ("training.monitor", "train_pgd_accuracy"),
    ):
        with pytest.raises(MnistlabError, match="adversarial"):
            base.with_overrides({key: value})


@pytest.mark.parametrize(
    "method",
    [
        {"adversarial.method": "fgsm-rs", "adversarial.step": 0.125},
        {"adversarial.method": "pgd", "adversarial.step": 0.05, "adversarial.steps": 3, "adversarial.fraction": 0.5},
        {"adversarial.method": "trades"},
    ],
)
@pytest.mark.slow  # 5-8 s each on 2 busy cores
def test_adversarial_training_makes_a_network_harder_to_attack(small, trained, batch, tmp_path, method) -> None:
    """The same network and data, trained with FGSM-RS, PGD on half of each batch, or TRADES at eps 0.1: PGD at
    eps 0.1 goes from breaking nearly everything to breaking far less, and each epoch records its PGD check."""
    standard, _ = trained
    trades = {"adversarial.step": 0.03, "adversarial.steps": 5, "adversarial.beta": 6.0}
    config = tiny(
        epochs=3, **{"adversarial.eps": 0.1, **(trades if method["adversarial.method"] == "trades" else {}), **method}
    )
    train(config, out_dir=tmp_path / "robust", data=small, device="cpu", quiet=True)
    robust = load_model(tmp_path / "robust")
    x, y = batch
    gen = torch.Generator().manual_seed(0)
    before = 1 - pgd(standard.model, x, y, 0.1, 10, 0.02, generator=gen)[1].float().mean().item()
    after = 1 - pgd(robust.model, x, y, 0.1, 10, 0.02, generator=gen)[1].float().mean().item()
    assert before < 0.3 and after > before + 0.3
    epochs = json.loads((tmp_path / "robust" / "metrics.json").read_text())["epochs"]
    assert all(0 <= e["train_pgd_accuracy"] <= 1 for e in epochs)


def test_early_stopping_on_the_pgd_check_keeps_the_most_robust_epoch(small, tmp_path) -> None:
    """Wong et al.'s guard against catastrophic overfitting: monitor PGD accuracy, keep the best epoch."""
    config = tiny(
        epochs=4,
        **{"adversarial.method": "fgsm-rs", "adversarial.eps": 0.1, "adversarial.step": 0.125},
        **{"training.early_stopping": 1, "training.monitor": "train_pgd_accuracy", "data.val_size": 0},
    )
    run = train(config, out_dir=tmp_path / "stopped", data=subset(small, 2000, 200), device="cpu", quiet=True)
    checks = [e["train_pgd_accuracy"] for e in run.epochs]
    assert run.best_epoch == 1 + checks.index(max(checks))
    metrics = json.loads((tmp_path / "stopped" / "metrics.json").read_text())
    assert metrics["saved_model_epoch"] == run.best_epoch


@pytest.mark.parametrize("method", ["fgsm-rs", "pgd", "trades"])
def test_adversarial_training_resumes_exactly(small, tmp_path, method) -> None:
    config = tiny(
        epochs=2,
        **{"adversarial.method": method, "adversarial.eps": 0.1, "adversarial.step": 0.125},
        **{"adversarial.ramp_epochs": 1.5, "adversarial.steps": 2},
    )
    data = subset(small, 1000, 200)
    straight = train(config, out_dir=tmp_path / "straight", data=data, device="cpu", quiet=True)
    resumed = interrupted_and_resumed(config, tmp_path / "resumed", data, after=1)
    assert without_time(resumed.epochs) == without_time(straight.epochs)


def test_standardized_wrapper_is_what_the_adversary_attacks(trained, batch) -> None:
    """The training loop's network takes standardised pixels; wrapped, it matches the saved model exactly."""
    model, _ = trained
    wrapped = Standardized(model.model.network, (model.model.mean, model.model.std))
    x = batch[0][:8]
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), model.model(x))
