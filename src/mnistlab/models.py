"""Networks built from a ModelConfig. Nothing about training lives here.

Every network takes float images (B, 28, 28) and returns (B, 10): logits, or probabilities when the config
keeps the report's Softmax output layer.
"""

from __future__ import annotations

from torch import nn

from mnistlab.config import ModelConfig

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
}


def build_model(config: ModelConfig) -> nn.Sequential:
    """The network a config describes, with PyTorch's default initialisation."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = 28 * 28
    for size, activation in zip(config.hidden, config.activations, strict=True):
        layers += [nn.Linear(width, size), _ACTIVATIONS[activation]()]
        width = size
    layers.append(nn.Linear(width, 10))
    if config.softmax_output:
        layers.append(nn.Softmax(dim=1))
    return nn.Sequential(*layers)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
