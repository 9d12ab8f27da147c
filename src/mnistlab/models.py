"""Networks built from a ModelConfig. Nothing about training lives here.

Every network takes float images (B, 28, 28) and returns (B, 10): logits, or probabilities when the config
keeps the report's Softmax output layer.
"""

from __future__ import annotations

import torch
from torch import nn

from mnistlab.config import ModelConfig
from mnistlab.errors import MnistlabError

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
}


def build_model(config: ModelConfig) -> nn.Sequential:
    """The network a config describes, with PyTorch's default initialisation."""
    layers = _cnn_layers(config.layers) if config.kind == "cnn" else _mlp_layers(config)
    if config.softmax_output:
        layers.append(nn.Softmax(dim=1))
    return nn.Sequential(*layers)


def _mlp_layers(config: ModelConfig) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Flatten()]
    width = 28 * 28
    for size, activation in zip(config.hidden, config.activations, strict=True):
        layers += [nn.Linear(width, size), _ACTIVATIONS[activation]()]
        width = size
    layers.append(nn.Linear(width, 10))
    return layers


class _Unflatten(nn.Module):
    """(B, 28, 28) -> (B, 1, 28, 28): the image as one channel for the convolutions."""

    def forward(self, x):
        return x.unsqueeze(1)


def _cnn_layers(spec: list[str]) -> list[nn.Module]:
    """Layers from strings, tracking the shape so that each layer's input size is known.

    A convolution followed by "bn" has no bias (BatchNorm's shift replaces it).
    """
    layers: list[nn.Module] = [_Unflatten()]
    shape: tuple[int, ...] = (1, 28, 28)
    for i, line in enumerate(spec):
        name, *args = line.split()
        next_is_bn = i + 1 < len(spec) and spec[i + 1].split()[0] == "bn"
        if name == "conv":
            out, kernel = int(args[0]), int(args[1])
            padding = int(args[2]) if len(args) > 2 else 0
            stride = int(args[3]) if len(args) > 3 else 1
            layers.append(nn.Conv2d(shape[0], out, kernel, stride, padding, bias=not next_is_bn))
            size = [(s + 2 * padding - kernel) // stride + 1 for s in shape[1:]]
            shape = (out, *size)
        elif name == "bn":
            layers.append(nn.BatchNorm2d(shape[0]) if len(shape) == 3 else nn.BatchNorm1d(shape[0]))
        elif name in _ACTIVATIONS:
            layers.append(_ACTIVATIONS[name]())
        elif name == "maxpool":
            k = int(args[0])
            layers.append(nn.MaxPool2d(k))
            shape = (shape[0], shape[1] // k, shape[2] // k)
        elif name == "avgpool":
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
            shape = (shape[0],)
        elif name == "dropout":
            layers.append(nn.Dropout(float(args[0])))
        elif name == "flatten":
            layers.append(nn.Flatten())
            shape = (shape[0] * shape[1] * shape[2],)
        elif name == "linear":
            out = int(args[0])
            layers.append(nn.Linear(shape[0], out, bias=not next_is_bn))
            shape = (out,)
        else:
            raise MnistlabError(f"model.layers: unknown layer {line!r}")
        if len(shape) == 3 and min(shape[1:]) < 1:
            raise MnistlabError(f"model.layers: {line!r} leaves nothing of the image ({shape})")
    return layers


def check_layers(spec: list[str]) -> list[str]:
    """Problems with a CNN layer list (empty when it builds and ends with 10 outputs)."""
    if not spec:
        return ["model.layers must list the CNN's layers when model.kind = 'cnn'"]
    try:
        layers = _cnn_layers(spec)
    except (MnistlabError, ValueError, IndexError, ZeroDivisionError) as exc:
        return [f"model.layers: cannot build {spec} ({exc})"]
    last = [m for m in layers if isinstance(m, nn.Linear)]
    if not last or last[-1].out_features != 10 or not isinstance(layers[-1], nn.Linear):
        return ["model.layers must end with 'linear 10' (one output per digit)"]
    return []


class Standardized(nn.Module):
    """A trained network with its input standardisation built in, for inference: takes pixels in [0, 1]."""

    def __init__(self, network: nn.Module, normalize: tuple[float, float] | None):
        super().__init__()
        self.network = network
        self.mean, self.std = normalize if normalize else (0.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network((x - self.mean) / self.std if (self.mean, self.std) != (0.0, 1.0) else x)


def as_probabilities(outputs: torch.Tensor, probabilities: bool) -> torch.Tensor:
    """A network's outputs as probabilities: softmax of logits, unchanged where they are probabilities already
    (a network with the report's Softmax output layer)."""
    return outputs if probabilities else outputs.softmax(1)


class Ensemble(nn.Module):
    """Averages its members' probabilities (members output logits, or probabilities where `probabilities`)."""

    def __init__(self, members: list[nn.Module], probabilities: list[bool]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.probabilities = probabilities

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [as_probabilities(m(x), p) for m, p in zip(self.members, self.probabilities)]
        return torch.stack(outs).mean(0)


class ShiftAveraged(nn.Module):
    """Test-time augmentation: averages the probabilities for each image and its copies shifted by one pixel
    up, down, left and right (zeros shifted in), so a prediction does not hang on the exact centring."""

    SHIFTS = ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1))

    def __init__(self, model: nn.Module, probabilities: bool):
        super().__init__()
        self.model, self.probabilities = model, probabilities

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        padded = nn.functional.pad(x, (1, 1, 1, 1))
        views = torch.cat([padded[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy, dx in self.SHIFTS])
        probs = as_probabilities(self.model(views), self.probabilities)  # one batch for all five views
        return probs.view(len(self.SHIFTS), len(x), -1).mean(0)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
