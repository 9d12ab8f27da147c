"""Confidence that means what it says: temperature scaling (Guo et al. 2017) fitted on a validation split, and the
measures of calibration that `evaluate` reports.

A network's softmax is rarely calibrated: label smoothing makes the bundled CNNs say 89% on digits they get right
99.6% of the time, and a plain MLP trained to zero loss says 100% on everything. Dividing the log-probabilities by
one temperature T (> 1 softens, < 1 sharpens) fixes most of it without changing a single prediction (the order
of the classes stays), and T is one number: fitted on held-out images by minimising the negative log-likelihood,
it cannot overfit them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ECE_BINS = 15  # equal-width bins over the top label's confidence, as in Guo et al.
_TINY = 1e-12  # floor of a probability before its log: a softmax-output network can say exactly 0


def log_probabilities(probs: torch.Tensor) -> torch.Tensor:
    """log(probs), finite: probabilities of exactly 0 become log(1e-12)."""
    return probs.double().clamp_min(_TINY).log()


def temper(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """`probs` (N, C) scaled by `temperature`: softmax(log(probs) / T), in the input's dtype. The same as
    softmax(logits / T) for the logits they came from (log-softmax only shifts each row by a constant)."""
    if temperature == 1.0:
        return probs
    return (log_probabilities(probs) / temperature).softmax(1).to(probs.dtype)


def fit_temperature(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature that minimises the negative log-likelihood of `labels` under `probs` scaled by it.

    The NLL is convex in 1/T (a log-sum-exp of a linear function of it, less a linear term), so a bisection on its
    derivative finds the one minimum; 1/T is searched in [1e-3, 1e3], in float64.
    """
    z = log_probabilities(probs)
    z = z - z.max(1, keepdim=True).values
    picked = z.gather(1, labels.long().view(-1, 1)).squeeze(1)

    def slope(beta: float) -> float:  # d/d(beta) of mean(logsumexp(beta z) - beta z_y)
        weights = (beta * z).softmax(1)
        return float(((weights * z).sum(1) - picked).mean())

    low, high = -3.0, 3.0  # log10 of beta = 1/T
    if slope(10**high) <= 0:  # every image right and sure: sharper is always better; stop at the bound
        return 10**-high
    if slope(10**low) >= 0:
        return 10**-low
    for _ in range(60):
        middle = (low + high) / 2
        if slope(10**middle) > 0:
            high = middle
        else:
            low = middle
    return float(10 ** -((low + high) / 2))


@dataclass(frozen=True)
class Calibration:
    """How well a model's confidences match its accuracy on a set of images."""

    ece: float  # expected calibration error: the mean |accuracy - confidence| over ECE_BINS bins, by their size
    nll: float  # negative log-likelihood of the true class
    brier: float  # mean squared distance of the probabilities from the one-hot truth, summed over classes

    def to_dict(self) -> dict[str, float]:
        return {"ece": self.ece, "nll": self.nll, "brier": self.brier}


def calibration(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> Calibration:
    """ECE, NLL and Brier score of probabilities `probs` (N, C) for `labels` (N,)."""
    probs, labels = probs.double().cpu(), labels.long().cpu()
    table = reliability(probs, labels, bins)
    ece = sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in table) / max(len(labels), 1)
    nll = float(-log_probabilities(probs).gather(1, labels.view(-1, 1)).mean())
    onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).double()
    brier = float(((probs - onehot) ** 2).sum(1).mean())
    return Calibration(float(ece), nll, brier)


def reliability(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> list[dict[str, float]]:
    """The reliability diagram's bins that hold images: each bin's bounds, image count, accuracy and mean
    confidence (the top label's probability)."""
    confidence, predicted = probs.double().cpu().max(1)
    correct = (predicted == labels.long().cpu()).double()
    index = (confidence * bins).long().clamp(max=bins - 1)  # a confidence of exactly 1 goes in the last bin
    table = []
    for b in range(bins):
        inside = index == b
        count = int(inside.sum())
        if count:
            table.append(
                {
                    "lower": b / bins,
                    "upper": (b + 1) / bins,
                    "count": count,
                    "accuracy": float(correct[inside].mean()),
                    "confidence": float(confidence[inside].mean()),
                }
            )
    return table


def fit_on_split(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, object]:
    """The `calibration` block of a model file: the temperature fitted on these held-out probabilities and
    labels (a validation split: never the test set), and the calibration before and after it."""
    temperature = fit_temperature(probs, labels)
    return {
        "temperature": temperature,
        "fitted_on": f"validation split ({len(labels)} images)",
        "before": calibration(probs, labels).to_dict(),
        "after": calibration(temper(probs.double(), temperature), labels).to_dict(),
    }
