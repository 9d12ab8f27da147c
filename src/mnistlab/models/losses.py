"""Loss functions by name. Each takes the model's outputs (B, 10) and integer labels (B,).

`probabilities` says whether the outputs are probabilities (a model with the report's Softmax output layer)
or logits. What each combination means:

- cross-entropy: on logits, the usual softmax cross-entropy. On probabilities, the report's quirk: they are
  softmaxed again, the loss can't go below ln(1 + 9/e) and its gradient is squashed.
- nll: on logits, log-softmax then NLL, identical to cross-entropy. On probabilities, their log then NLL:
  proper cross-entropy, the quirk undone.
- mse: on logits, softmax first; either way the mean squared error of probabilities against one-hot targets.
- hinge: the multi-class margin loss (margin 1) on whatever the outputs are; on probabilities the gaps can
  never exceed 1, so it never reaches 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from mnistlab.errors import MnistlabError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def log_probabilities_of(out: torch.Tensor, probabilities: bool) -> torch.Tensor:
    """log p(class) from a model's outputs: logits, or probabilities where `probabilities` (floored at 1e-30, so
    that a certain answer's zeros stay finite). In float32, whatever autocast computed the outputs in."""
    out = out.float()
    return out.clamp_min(1e-30).log() if probabilities else out.log_softmax(1)


def make_loss(name: str, probabilities: bool = False, label_smoothing: float = 0.0) -> LossFn:
    """The loss called `name`, for outputs that are logits or (with `probabilities`) probabilities."""
    if name == "cross-entropy":
        # Deliberately the same call for both: with probabilities this *is* the report's quirk.
        return lambda out, y: F.cross_entropy(out, y, label_smoothing=label_smoothing)
    if name == "nll":
        return lambda out, y: F.nll_loss(log_probabilities_of(out, probabilities), y)
    if name == "mse":
        to_probs = (lambda out: out) if probabilities else (lambda out: F.softmax(out, dim=1))
        return lambda out, y: F.mse_loss(to_probs(out), F.one_hot(y, out.shape[1]).to(out.dtype))
    if name == "hinge":
        return F.multi_margin_loss
    raise MnistlabError(f"unknown loss {name!r}")
