"""Loss functions by name. Each takes the model's outputs (B, 10) and integer labels (B,)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from mnistlab.errors import MnistlabError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_loss(name: str) -> LossFn:
    """The loss called `name`.

    `cross-entropy` treats the outputs as logits. Fed the probabilities of a Softmax output layer (the report's
    quirk), it applies softmax a second time: the loss can then never go below ln(1 + 9/e) ~ 1.46 and its
    gradient is squashed, which is why the report's SGD networks learn so slowly.
    """
    if name == "cross-entropy":
        return F.cross_entropy
    raise MnistlabError(f"unknown loss {name!r}")
