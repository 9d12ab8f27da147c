"""Why did the model say 7? Attribution maps: how much each pixel of the 28x28 view counted for or against a
class, by integrated gradients, occlusion, gradient saliency or Grad-CAM.

Every map explains one network's score for one class: its output before the softmax (its log-probability where
the network ends in the report's Softmax layer), so maps of different images and models share a scale, and
integrated gradients' attributions add up to the score's difference from a black image (completeness). An
ensemble's map is the mean of its members' maps. All methods are batched: one forward (and backward) pass per
chunk of images, no per-pixel Python.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from mnistlab.errors import MnistlabError
from mnistlab.models.files import LoadedModel
from mnistlab.models.networks import Ensemble, Standardized, for_inference

METHODS = ("integrated-gradients", "occlusion", "saliency", "grad-cam")
SHORT = {"ig": "integrated-gradients", "gradcam": "grad-cam"}
PATCH, STRIDE = 4, 2  # occlusion: a 4x4 black patch every 2 pixels (13 x 13 positions, each pixel under 1-4)
# Images (times IG steps or occlusion positions) per forward pass: bounds memory, big enough to keep the cores busy.
_CHUNK = 1024
# Integrated gradients' points between black and the image. The bundled networks' score stays flat along the path
# and then rises steeply (outlier exposure), so 32 points leave a median completeness error of 13.7% over 1,000
# test digits and 128 points 1.5% (docs/explain.md); 128 points explain the answer in 32 ms on 2 AVX-512 EPYC cores.
STEPS = 128


@dataclass
class Attribution:
    """One class's map: > 0 where a pixel is evidence for `target`, < 0 against (Grad-CAM: >= 0)."""

    target: int
    map: torch.Tensor  # (28, 28) float32, on the CPU
    completeness_error: float | None = None  # integrated gradients only (`attribute`)


@dataclass
class Explanation:
    """One image explained: the calibrated probabilities every face shows and a map per class asked."""

    method: str
    label: int  # the model's answer
    probabilities: torch.Tensor  # (classes,)
    attributions: list[Attribution]
    members: int  # 1, or the ensemble's size: its maps are the members' mean

    def role(self, target: int) -> str:
        """What a map's class is to this answer: "answer", "runner-up" or "asked" (a target of the user's)."""
        if target == self.label:
            return "answer"
        return "runner-up" if target == int(self.probabilities.topk(2).indices[1]) else "asked"


def target_of(raw: str | None, classes: list[str], name: str = "target") -> int | None:
    """The class a user's `name` names: its number or one of the model's class names; None for None."""
    if raw is None:
        return None
    if raw in classes:
        return classes.index(raw)
    if raw.isascii() and raw.isdigit() and int(raw) < len(classes):
        return int(raw)
    shown = ", ".join(classes) if classes != [str(d) for d in range(10)] else "0-9"
    raise MnistlabError(f"{name} {raw[:40]}: not one of the model's classes ({shown})")


def method_of(name: str) -> str:
    """The method a user named ("ig" and "gradcam" also answer), or a one-line error listing them."""
    method = SHORT.get(name, name)
    if method not in METHODS:
        raise MnistlabError(f"unknown explanation method {name!r}: choose one of {', '.join(METHODS)}")
    return method


def check_method(model: LoadedModel, name: str) -> str:
    """The method a user named, if it can explain `model` (Grad-CAM needs a convolution), else a one-line error:
    for the faces to refuse before any work."""
    method = method_of(name)
    if method == "grad-cam" and not all(_last_convolution(n.network) is not None for n, _ in _networks(model)):
        raise MnistlabError(
            "grad-cam needs a convolutional network and this model is an MLP: "
            "use integrated-gradients, occlusion or saliency"
        )
    return method


def explain(
    model: LoadedModel,
    image: torch.Tensor,
    method: str = "integrated-gradients",
    target: int | None = None,
    steps: int = STEPS,
) -> Explanation:
    """Explain one preprocessed image (28, 28) in [0, 1]: maps for the model's answer, `target` if given, and the
    runner-up (each class once, in that order)."""
    with torch.no_grad():
        probabilities = model.answering()(image[None].to(_device(model)))[0][0].float().cpu()
    answer, runner_up = probabilities.topk(2).indices.tolist()
    asked = torch.tensor(list(dict.fromkeys([answer, *([] if target is None else [target]), runner_up])))
    maps, errors = attribute(model, image[None].expand(len(asked), -1, -1), asked, method, steps)
    attributions = [
        Attribution(int(t), maps[i], None if errors is None else float(errors[i])) for i, t in enumerate(asked)
    ]
    return Explanation(method_of(method), answer, probabilities, attributions, len(_networks(model)))


def attribute(
    model: LoadedModel, images: torch.Tensor, targets: torch.Tensor, method: str, steps: int = STEPS
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Maps (B, 28, 28) for images (B, 28, 28) in [0, 1] and their targets (B,), on the CPU; with integrated
    gradients also each map's relative completeness error (B,): |sum of the map - (score(image) -
    score(black))| over |score(image) - score(black)|."""
    method = check_method(model, method)
    classes = len(model.classes)
    if len(targets) and not 0 <= int(targets.min()) <= int(targets.max()) < classes:
        bad = next(int(t) for t in targets if not 0 <= int(t) < classes)
        raise MnistlabError(f"target class {bad} is not one of the model's classes (0 to {classes - 1})")
    if steps < 1:
        raise MnistlabError(f"integrated gradients needs at least 1 step, not {steps}")
    if not len(images):
        return torch.zeros(0, *images.shape[1:]), torch.zeros(0) if method == "integrated-gradients" else None
    networks = _folded(model)
    device = _device(model)
    images, targets = images.to(device, torch.float32), targets.to(device)
    maps, gaps = torch.zeros(images.shape, device=device), torch.zeros(len(images), device=device)
    for network, softmax_output in networks:
        score = _Score(network, softmax_output)
        if method == "integrated-gradients":
            member_maps, gap = _integrated_gradients(score, images, targets, steps)
            gaps += gap
        elif method == "occlusion":
            member_maps = _occlusion(score, images, targets)
        elif method == "saliency":
            member_maps = _gradients(score, images, targets)
        else:
            member_maps = _grad_cam(score, images, targets)
        maps += member_maps
    maps, gaps = maps / len(networks), gaps / len(networks)
    errors = None
    if method == "integrated-gradients":
        errors = ((maps.sum((1, 2)) - gaps).abs() / gaps.abs().clamp_min(1e-6)).cpu()
    return maps.detach().float().cpu(), errors


class _Score(nn.Module):
    """A network's score for each image's target class: its output before the softmax."""

    def __init__(self, network: Standardized, softmax_output: bool):
        super().__init__()
        self.network, self.softmax_output = network, softmax_output

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.of(self.network(images), targets)

    def of(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The targets' scores from the network's outputs (the log of a Softmax layer's probabilities)."""
        chosen = outputs.gather(1, targets[:, None])[:, 0]
        return chosen.clamp_min(torch.finfo(chosen.dtype).tiny).log() if self.softmax_output else chosen


def _networks(model: LoadedModel) -> list[tuple[Standardized, bool]]:
    """The networks whose maps are averaged, each with whether it ends in a Softmax layer."""
    if isinstance(model.model, Ensemble):
        return list(zip(model.model.members, model.model.probabilities, strict=True))
    return [(model.model, model.probabilities)]


# Each model's networks as `for_inference` copies (BatchNorm folded, channels-last), made on its first explanation.
# The same maps (to float rounding), faster: integrated gradients of one image's answer with the bundled model, 32
# steps, 85 -> 58 ms (median, 2-core AMD EPYC, AVX-512).
_FOLDED: weakref.WeakKeyDictionary[nn.Module, list[tuple[Standardized, bool]]] = weakref.WeakKeyDictionary()


def _folded(model: LoadedModel) -> list[tuple[Standardized, bool]]:
    found = _FOLDED.get(model.model)
    if found is None:
        found = _FOLDED[model.model] = [(for_inference(n), p) for n, p in _networks(model)]
    return found


def _device(model: LoadedModel) -> torch.device:
    return next(model.model.parameters()).device


def _chunks(count: int, per_image: int) -> list[slice]:
    """Slices of the batch with at most _CHUNK images times `per_image` copies of each in one pass."""
    size = max(1, _CHUNK // per_image)
    return [slice(i, i + size) for i in range(0, count, size)]


def _input_gradients(score: _Score, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """d score / d input for each input (their scores do not depend on each other: eval mode)."""
    with torch.enable_grad():
        inputs = inputs.detach().requires_grad_(True)
        (gradients,) = torch.autograd.grad(score(inputs, targets).sum(), inputs)
    return gradients


def _gradients(score: _Score, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Gradient saliency: how fast the score changes with each pixel, signed."""
    return torch.cat([_input_gradients(score, images[s], targets[s]) for s in _chunks(len(images), 1)])


def _integrated_gradients(
    score: _Score, images: torch.Tensor, targets: torch.Tensor, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integrated gradients from a black baseline (Sundararajan et al. 2017): the pixel times the mean gradient
    along the straight path from black to the image (midpoint rule, `steps` points, one pass for all of them);
    and each image's score minus the black image's, which the map should add up to."""
    alphas = (torch.arange(steps, device=images.device, dtype=images.dtype) + 0.5) / steps
    maps = []
    for s in _chunks(len(images), steps):
        batch, wanted = images[s], targets[s]
        path = (alphas[:, None, None, None] * batch[None]).reshape(-1, *batch.shape[1:])
        gradients = _input_gradients(score, path, wanted.repeat(steps)).view(steps, *batch.shape)
        maps.append(batch * gradients.mean(0))
    with torch.no_grad():
        gaps = score(images, targets) - score(torch.zeros_like(images), targets)
    return torch.cat(maps), gaps


def _occlusion(score: _Score, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Occlusion (Zeiler and Fergus 2014): each pixel's mean drop in the score when a black patch covering it
    hides part of the image. Needs only forward passes, so it explains any model."""
    size = images.shape[-1]
    starts = range(0, size - PATCH + 1, STRIDE)
    patches = torch.zeros(len(starts) ** 2, size, size, device=images.device)
    for i, (y, x) in enumerate((y, x) for y in starts for x in starts):
        patches[i, y : y + PATCH, x : x + PATCH] = 1
    maps = []
    with torch.no_grad():
        for s in _chunks(len(images), len(patches) + 1):
            batch, wanted = images[s], targets[s]
            # the image first, then its occluded copies, in one pass: a patch over black pixels changes nothing
            shown = torch.cat([batch[:, None], batch[:, None] * (1 - patches)], 1).reshape(-1, size, size)
            scores = score(shown, wanted.repeat_interleave(len(patches) + 1)).view(len(batch), -1)
            drops = scores[:, :1] - scores[:, 1:]
            maps.append(torch.einsum("bp,phw->bhw", drops, patches) / patches.sum(0))
    return torch.cat(maps)


def _last_convolution(network: nn.Sequential) -> int | None:
    """The index of the last layer of the network's last convolution block (the convolution and the
    normalisation and activation right after it), or None when it has no convolution."""
    convolutions = [i for i, layer in enumerate(network) if isinstance(layer, nn.Conv2d)]
    if not convolutions:
        return None
    end = convolutions[-1]
    while end + 1 < len(network) and not isinstance(
        network[end + 1], (nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout, nn.Conv2d)
    ):
        end += 1
    return end


# Per-channel maps that never decrease, so that max-pooling before them equals max-pooling after them.
_MONOTONE = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.ELU)


def _commutes_with_max(layer: nn.Module) -> bool:
    """Whether `layer` maps each channel by a non-decreasing function (a BatchNorm's: while its scales are > 0)."""
    if isinstance(layer, nn.BatchNorm2d):
        return layer.weight is None or bool((layer.weight > 0).all())
    return isinstance(layer, _MONOTONE)


def _cam_split(network: nn.Sequential) -> tuple[nn.Module, nn.Module]:
    """(body, head) of a network around its last convolution block, for Grad-CAM. A block pooled before its
    normalisation and activation (conv, maxpool, bn, relu: the bundled members) is split as (conv, bn, relu |
    maxpool, ...), the same function while the BatchNorm's scales are positive, since max-pooling commutes with
    non-decreasing per-channel maps: the maps are then those the next layer reads, at the convolution's 7x7 rather
    than the raw convolution's output (on the bundled model's first 300 test digits, the deletion area falls from
    0.88 of a random order's to 0.69)."""
    end = _last_convolution(network)
    after = end + 2
    while after < len(network) and _commutes_with_max(network[after]):
        after += 1
    if end + 1 < len(network) and isinstance(network[end + 1], nn.MaxPool2d) and after > end + 2:
        return nn.Sequential(*network[: end + 1], *network[end + 2 : after]), nn.Sequential(
            network[end + 1], *network[after:]
        )
    return network[: end + 1], network[end + 1 :]


def _grad_cam(score: _Score, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017): the last convolution block's maps weighted by the score's mean
    gradient over each, summed, kept where positive and scaled up to 28 x 28."""
    body, head = _cam_split(score.network.network)
    maps = []
    for s in _chunks(len(images), 1):
        with torch.enable_grad():
            activations = body(score.network.standardize(images[s])).detach().requires_grad_(True)
            (gradients,) = torch.autograd.grad(score.of(head(activations), targets[s]).sum(), activations)
        cam = (gradients.mean((2, 3), keepdim=True) * activations).sum(1, keepdim=True).relu()
        maps.append(nn.functional.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0])
    return torch.cat(maps)


# ---------------------------------------------------------------------------------------------- as numbers
# What the CLI's --json and the web API write: maps as lists of short floats, never a NaN.


class NotFinite(MnistlabError):
    """A map or score that is NaN or infinite: the model's outputs overflowed (a bug to report, not a number)."""


def finite(values: Any, what: str) -> Any:
    """`values` (an array, tensor or number), or NotFinite naming `what`."""
    if not np.isfinite(np.asarray(values)).all():
        raise NotFinite(f"the {what} is not finite (NaN or infinity): the model's outputs overflowed")
    return values


def rounded(values: Any, digits: int = 4, what: str = "attribution map") -> Any:
    """An array or tensor as (nested) lists of floats with `digits` significant digits, after `finite`."""
    array = np.asarray(finite(values, what), dtype=np.float64)
    return np.vectorize(lambda v: float(f"{v:.{digits}g}"), otypes=[float])(array).tolist()
