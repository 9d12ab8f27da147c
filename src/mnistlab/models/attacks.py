"""White-box L-infinity attacks in pixel space: FGSM, PGD, and adversarial training's one-batch step.

Every attack takes float images (B, 28, 28) with pixels in [0, 1] and a model that takes them as they are (a
`LoadedModel.model`, whose standardisation is built in, or a training network wrapped in `Standardized`), and
returns images that stay in [0, 1] and within `eps` of the originals. The loss attacked is the cross-entropy of
the model's probabilities; for an ensemble, of its averaged probabilities, computed from its members'
log-probabilities (logsumexp) so that a confident member does not round the gradient away.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mnistlab.config import AdversarialConfig
from mnistlab.models.losses import log_probabilities_of
from mnistlab.models.networks import Ensemble, Standardized


def log_probabilities(model: nn.Module, x: torch.Tensor, probabilities: bool) -> torch.Tensor:
    """log p(class | x) for a model returning logits, or probabilities where `probabilities` (an ensemble's
    average is taken in log space from its members, each at its own temperature)."""
    if isinstance(model, Ensemble):
        members = [
            log_probabilities(m, x, p) if t is None else (log_probabilities(m, x, p) / t).log_softmax(1)
            for m, p, t in zip(model.members, model.probabilities, model.temperatures)
        ]  # each member scaled by its temperature first, as the ensemble averages them
        return torch.logsumexp(torch.stack(members), 0) - math.log(len(members))
    return log_probabilities_of(model(x), probabilities)


def _gradient(
    model: nn.Module, x: torch.Tensor, labels: torch.Tensor, probabilities: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(gradient of the summed cross-entropy with respect to `x`, whether each image is classified correctly)."""
    x = x.detach().requires_grad_(True)
    log_p = log_probabilities(model, x, probabilities)
    # Only the input's gradient is asked for: autograd computes no weight gradients here.
    (grad,) = torch.autograd.grad(F.nll_loss(log_p, labels, reduction="sum"), x)
    return grad, log_p.detach().argmax(1) == labels


def fgsm(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, probabilities: bool = False
) -> torch.Tensor:
    """The fast gradient sign method (Goodfellow et al. 2015): one step of `eps` along the gradient's sign."""
    grad, _ = _gradient(model, images, labels, probabilities)
    return (images + eps * grad.sign()).clamp_(0, 1)


def pgd(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    steps: int = 40,
    step_size: float = 0.01,
    probabilities: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected gradient descent (Madry et al. 2018) from a random start in the eps-ball: `steps` signed
    steps of `step_size`, each projected back onto the ball and [0, 1].

    Returns (adversarial images, fooled): an image counts as fooled when the clean image or any iterate is
    misclassified, and its search stops there, so the images the model already gets wrong cost nothing more.
    """
    was_training = model.training
    model.eval()
    x = images.detach().clone()
    with torch.no_grad():
        fooled = log_probabilities(model, images, probabilities).argmax(1) != labels
    noise = torch.rand(images.shape, generator=generator).to(images.device) * 2 - 1
    x = torch.where(fooled[:, None, None], x, (images + eps * noise).clamp(0, 1))
    low, high = (images - eps).clamp(0, 1), (images + eps).clamp(0, 1)
    for _ in range(steps):
        active = (~fooled).nonzero().flatten()
        if not len(active):
            break
        grad, correct = _gradient(model, x[active], labels[active], probabilities)
        fooled[active] = ~correct
        moving = active[correct]  # a misclassified iterate is kept as the adversarial image
        stepped = x[moving] + step_size * grad[correct].sign()
        x[moving] = torch.minimum(torch.maximum(stepped, low[moving]), high[moving])
    active = (~fooled).nonzero().flatten()
    if len(active):
        with torch.no_grad():
            fooled[active] = log_probabilities(model, x[active], probabilities).argmax(1) != labels[active]
    model.train(was_training)
    return x, fooled


def fgsm_random_start(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    step: float,
    probabilities: bool = False,
    steps: int = 1,
) -> torch.Tensor:
    """One FGSM step of size `step` from a uniformly random point of the eps-ball, projected back onto the ball
    and [0, 1] (Wong, Rice and Kolter 2020); with `steps` > 1, that many such steps, each projected: PGD as
    adversarial training uses it (every step taken, none stopped early). The start is drawn from torch's global
    generator, whose state training checkpoints keep, so a resumed run perturbs exactly as an uninterrupted one."""
    x = (images + (torch.rand_like(images) * 2 - 1) * eps).clamp_(0, 1)
    for _ in range(steps):
        grad, _ = _gradient(model, x, labels, probabilities)
        delta = (x - images + step * grad.sign()).clamp_(-eps, eps)
        x = (images + delta).clamp_(0, 1).detach()
    return x


def trades_perturbation(
    model: nn.Module, images: torch.Tensor, eps: float, step: float, steps: int, probabilities: bool = False
) -> torch.Tensor:
    """TRADES's inner maximisation (Zhang et al. 2019): from a tiny random start, `steps` signed steps of `step`
    that raise the KL divergence between the model's answers on the images and on the perturbed images, each
    projected onto the eps-ball and [0, 1]. No labels: it seeks where the answer changes, right or wrong. The
    model answers in eval mode (BatchNorm's running statistics), as the authors' code does."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        target = log_probabilities(model, images, probabilities).exp()
    low, high = (images - eps).clamp(0, 1), (images + eps).clamp(0, 1)
    x = torch.minimum(torch.maximum(images + 0.001 * torch.randn_like(images), low), high)
    for _ in range(steps):
        x.requires_grad_(True)
        # KL(target || p(x)) up to a constant that has no gradient: the cross-entropy of p(x) against target.
        (grad,) = torch.autograd.grad(-(target * log_probabilities(model, x, probabilities)).sum(), x)
        x = torch.minimum(torch.maximum(x.detach() + step * grad.sign(), low), high)
    model.train(was_training)
    return x.detach()


class TrainingAttack:
    """Adversarial training's per-batch step for the training loop: `adversary(x, labels)` returns the batch's
    adversarial examples against the network being trained: for `fgsm-rs`, in place of the batch (its share of
    it), attacked in the network's current mode as Wong et al. did; for `trades`, the clean batch followed by
    its perturbations (twice the rows), for `trades_gradients` to split.

    eps ramps up linearly from 0 over the first `ramp_epochs` (counted in batches), which keeps the early,
    still-fragile network from the single-step overfitting Wong et al. saw, where FGSM accuracy climbs while
    PGD accuracy collapses. On the first batch of every epoch it also measures PGD-10 accuracy at the full eps
    on that batch (`pgd_accuracy`), so a collapse shows in the run's metrics.
    """

    CHECK_STEPS = 10

    def __init__(
        self,
        config: AdversarialConfig,
        network: nn.Module,
        normalize: tuple[float, float] | None,
        probabilities: bool,
        steps_per_epoch: int,
        start_epoch: int = 1,
    ):
        self.config = config
        self.model = Standardized(network, normalize)
        self.probabilities = probabilities
        self.steps_per_epoch = steps_per_epoch
        self.calls = (start_epoch - 1) * steps_per_epoch  # batches perturbed so far, for the ramp
        self.pgd_accuracy: float | None = None

    def eps(self) -> float:
        """The eps of the next batch: the configured one, or less during the ramp."""
        ramp = self.config.ramp_epochs * self.steps_per_epoch
        return self.config.eps * min(1.0, (self.calls + 1) / ramp) if ramp else self.config.eps

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        c = self.config
        if self.calls % self.steps_per_epoch == 0:
            _, fooled = pgd(self.model, images, labels, c.eps, self.CHECK_STEPS, c.eps / 4, self.probabilities)
            self.pgd_accuracy = 1.0 - fooled.float().mean().item()
        eps = self.eps()
        step = c.step * eps / c.eps  # the step ramps with eps
        self.calls += 1
        if c.method == "trades":
            return torch.cat([images, trades_perturbation(self.model, images, eps, step, c.steps, self.probabilities)])
        k = round(c.fraction * len(images))  # batches are shuffled, so the first k are a random share
        steps = c.steps if c.method == "pgd" else 1
        attacked = fgsm_random_start(self.model, images[:k], labels[:k], eps, step, self.probabilities, steps)
        return torch.cat([attacked, images[k:]]) if k < len(images) else attacked


def make_training_attack(
    config: AdversarialConfig,
    network: nn.Module,
    normalize: tuple[float, float] | None,
    probabilities: bool,
    steps_per_epoch: int,
    start_epoch: int = 1,
) -> TrainingAttack | None:
    """The training loop's adversary for `config` (None when adversarial training is off)."""
    if config.method == "none":
        return None
    return TrainingAttack(config, network, normalize, probabilities, steps_per_epoch, start_epoch)
