"""How one batch's gradients are computed: autograd for any network, or by hand for plain MLPs.

Both kinds of function take float images and labels, leave the gradients in each parameter's `.grad` and
return the batch's mean loss and the network's outputs (detached). The report's networks are a chain of
Linear layers and elementwise activations under a cross-entropy loss, whose gradients are a few matrix
products. Written out, they skip autograd's graph, saved tensors and fresh gradient buffers at every step,
about a sixth of a seed-B epoch on a CPU (benchmarks/epoch_speed.py). tests/test_fast_paths.py checks
them against autograd for every activation, with and without the Softmax output and label smoothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mnistlab.config import Config
from mnistlab.models.losses import LossFn, log_probabilities_of

GradientFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

# Each activation in place on its input, and its derivative from its *output* (all three allow that).
_FORWARD: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu_,
    "tanh": torch.tanh_,
    "sigmoid": torch.sigmoid_,
}
_BACKWARD: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "relu": lambda grad, out: torch.ops.aten.threshold_backward(grad, out, 0),
    "tanh": torch.ops.aten.tanh_backward,
    "sigmoid": torch.ops.aten.sigmoid_backward,
}


def by_hand_supported(config: Config) -> bool:
    """Whether `config` trains an MLP whose gradients `mlp_gradients` computes: activations it knows, the
    cross-entropy loss (on logits or, with the report's quirk, on probabilities) and no autocast."""
    m, t = config.model, config.training
    return m.kind == "mlp" and set(m.activations) <= _FORWARD.keys() and t.loss == "cross-entropy" and not t.amp


def bypasses_autograd(config: Config) -> bool:
    """Whether `make_gradient_fn` computes `config`'s gradients by hand, outside autograd (and so outside the
    hooks of DistributedDataParallel, which then cannot sum them across processes)."""
    return config.adversarial.method != "trades" and by_hand_supported(config)


def make_gradient_fn(
    model: nn.Module, config: Config, loss_fn: LossFn, autocast: contextlib.AbstractContextManager
) -> GradientFn:
    """The gradient function for training `model` (a network, or one under DistributedDataParallel where it goes
    through autograd): TRADES's for `[adversarial] method = "trades"`, by hand where `by_hand_supported`, else
    autograd."""
    if config.adversarial.method == "trades":
        return trades_gradients(model, loss_fn, config.adversarial.beta, config.model.softmax_output, autocast)
    if not bypasses_autograd(config):
        return autograd_gradients(model, loss_fn, autocast)
    m = config.model
    return mlp_gradients(model, m.activations, m.softmax_output, config.training.label_smoothing)


def autograd_gradients(
    model: nn.Module, loss_fn: LossFn, autocast: contextlib.AbstractContextManager | None = None
) -> GradientFn:
    """Forward, loss and backward through autograd (under `autocast` if given); works for every network."""
    autocast = autocast or contextlib.nullcontext()
    params = [p for p in model.parameters() if p.requires_grad]

    def gradients(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast:
            out = model(x)
            loss = loss_fn(out, y)
        _store_gradients(loss, params, model)
        return loss.detach(), out.detach()

    return gradients


def _store_gradients(loss: torch.Tensor, params: list[nn.Parameter], model: nn.Module) -> None:
    """Each parameter's gradient of `loss` as its `.grad`: autograd.grad hands them back without accumulating
    them into .grad first. Under DistributedDataParallel, backward() instead: DDP's all-reduce hooks run as
    gradients accumulate into .grad, which autograd.grad skips."""
    if isinstance(model, DistributedDataParallel):
        for param in params:
            param.grad = None  # so that backward() stores the gradient rather than adding to the last one
        loss.backward()
        return
    for param, grad in zip(params, torch.autograd.grad(loss, params), strict=True):
        param.grad = grad


def trades_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    beta: float,
    probabilities: bool,
    autocast: contextlib.AbstractContextManager | None = None,
) -> GradientFn:
    """TRADES's loss (Zhang et al. 2019) on a batch of clean images followed by their perturbations (twice the
    labels' rows): the loss on the clean half plus `beta` times the mean KL divergence from the network's answer
    on each clean image to its answer on the perturbed one. The halves go through the network apart, so
    BatchNorm normalises each by its own statistics, as the authors' code does. Returns the clean half's outputs.
    """
    autocast = autocast or contextlib.nullcontext()
    params = [p for p in model.parameters() if p.requires_grad]

    def gradients(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        clean, perturbed = x.chunk(2)
        with autocast:
            out, out_perturbed = model(clean), model(perturbed)
            log_p, log_q = (log_probabilities_of(o, probabilities) for o in (out, out_perturbed))
            loss = loss_fn(out, y) + beta * F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
        _store_gradients(loss, params, model)
        return loss.detach(), out.detach()

    return gradients


def mlp_gradients(
    model: nn.Module, activations: list[str], softmax_output: bool, label_smoothing: float = 0.0
) -> GradientFn:
    """Hand-derived forward and backward for an MLP built by `build_model` under cross-entropy loss.

    With `softmax_output` the loss is taken on the Softmax's probabilities, as the report did, and its
    gradient goes back through that Softmax too. Gradients are written into preallocated `.grad` tensors.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if len(linears) != len(activations) + 1:
        raise ValueError(f"{len(linears)} Linear layers do not fit {len(activations)} activations")
    for layer in linears:
        for param in (layer.weight, layer.bias):
            param.grad = torch.zeros_like(param)
    classes = linears[-1].out_features
    weight = linears[-1].weight
    # Row y is the smoothed one-hot target for label y, as F.cross_entropy(label_smoothing=...) defines it.
    targets = torch.full((classes, classes), label_smoothing / classes, device=weight.device)
    targets += torch.eye(classes, device=weight.device) * (1 - label_smoothing)

    @torch.no_grad()
    def gradients(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x.flatten(1)
        inputs = []  # each Linear's input, kept for its weight gradient and the activation's derivative
        for layer, activation in zip(linears[:-1], activations, strict=True):
            inputs.append(h)
            h = _FORWARD[activation](torch.addmm(layer.bias, h, layer.weight.t()))
        inputs.append(h)
        out = torch.addmm(linears[-1].bias, h, linears[-1].weight.t())
        if softmax_output:
            out = out.softmax(1)
        # Cross-entropy on `out`: the loss is -sum(target * log_softmax(out)), its gradient softmax(out) - target.
        log_probs = out.log_softmax(1)
        target = targets[y]
        batch = len(y)
        loss = (log_probs * target).sum().div_(-batch)
        grad = log_probs.exp_().sub_(target).div_(batch)
        if softmax_output:  # back through the Softmax layer: p * (g - sum(g * p))
            grad = out * (grad - (grad * out).sum(1, keepdim=True))
        for i in range(len(linears) - 1, -1, -1):
            layer = linears[i]
            torch.mm(grad.t(), inputs[i], out=layer.weight.grad)
            torch.sum(grad, 0, out=layer.bias.grad)
            if i:  # no gradient for the images themselves
                grad = _BACKWARD[activations[i - 1]](grad @ layer.weight, inputs[i])
        return loss, out

    return gradients
