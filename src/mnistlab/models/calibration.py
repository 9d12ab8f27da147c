"""Confidence that means what it says: temperature scaling (Guo et al. 2017) and a top-label confidence map, both
fitted on a validation split, and the measures of calibration that `evaluate` reports.

A network's softmax is rarely calibrated: label smoothing makes the bundled CNNs say 89% on digits they get right
99.6% of the time, and a plain MLP trained to zero loss says 100% on everything. Dividing the log-probabilities by
one temperature T (> 1 softens, < 1 sharpens) fixes most of it without changing a single prediction (the order
of the classes stays), and T is one number: fitted on held-out images by minimising the negative log-likelihood,
it cannot overfit them.

One temperature rescales every answer alike, so it cannot mend a network far from trained, sure of some answers
and unsure of others (the report's network A, 38% accurate after 10 epochs of SGD: 8.4% ECE after its
temperature). So a second step maps the top label's probability through a monotone piecewise-linear curve fitted
on the same split (`ConfidenceMap`; top-label calibration, Gupta and Ramdas 2022), and moves the other classes so
that their order, and so every answer, stays: network A's test ECE falls to about 0.5% (docs/outliers.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch
from torch import nn

from mnistlab.errors import MnistlabError

ECE_BINS = 15  # equal-width bins over the top label's confidence, as in Guo et al.
_TINY = 1e-12  # floor of a probability before its log: a softmax-output network can say exactly 0
# The confidence map's pieces: knots at these many quantiles of the validation confidences. Measured on the seed
# MLPs (benchmarks/calibration_maps.py): 5 pieces bend too little for network A (1.3% test ECE), 20 follow the
# validation split's noise (0.8-1.0%), 10 give 0.5% on A and 0.8% on A-fixed.
PIECES = 10
_MAX_KNOTS = 64  # a model file's map with more knots than this is refused: not one mnistlab wrote


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


def _piecewise(x: torch.Tensor, knots: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The piecewise-linear curve through (knots, values) at `x` (N,): values[0] plus each piece's rise times how
    far along it x is (0 to 1). Plain tensor arithmetic, so that ONNX and torch.export carry it."""
    along = ((x[:, None] - knots[:-1]) / (knots[1:] - knots[:-1])).clamp(0, 1)
    return values[0] + (along * (values[1:] - values[:-1])).sum(1)


class ConfidenceMap(nn.Module):
    """The top label's probability c mapped to f(c), f piecewise linear through (knots, values) and
    non-decreasing; the other classes move so that their order stays: towards uniform where f(c) < c (a mix
    a p + (1 - a) / C, which keeps every order), scaled by (1 - f(c)) / (1 - c) where f(c) >= c. f(c) > 1 / C,
    so the top class stays on top: the answer never changes. Plain tensor arithmetic, so that the ONNX graph
    and torch.export carry it as PyTorch runs it."""

    def __init__(self, knots: list[float], values: list[float]):
        super().__init__()
        self.register_buffer("knots", torch.tensor(knots, dtype=torch.float64))
        self.register_buffer("values", torch.tensor(values, dtype=torch.float64))

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        knots, values = self.knots.to(probs.dtype), self.values.to(probs.dtype)
        classes = probs.shape[1]
        top, answer = probs.max(1)
        mapped = _piecewise(top, knots, values)
        mapped = torch.maximum(mapped, torch.full_like(mapped, 1 / classes + 1e-6))
        share = ((mapped - 1 / classes) / (top - 1 / classes).clamp_min(_TINY))[:, None]
        mixed = share * probs + (1 - share) / classes
        is_top = torch.arange(classes, device=probs.device)[None, :] == answer[:, None]
        scaled = probs * ((1 - mapped) / (1 - top).clamp_min(_TINY))[:, None]
        raised = torch.where(is_top, mapped[:, None], scaled)
        return torch.where((mapped < top)[:, None], mixed, raised)

    def to_dict(self) -> dict[str, list[float]]:
        return {"knots": self.knots.tolist(), "values": self.values.tolist()}

    @classmethod
    def from_dict(cls, block: Any, source: object) -> ConfidenceMap:
        """The map a model file describes (`calibration.confidence_map`), checked: knots increasing from 0 to 1,
        values non-decreasing within (0, 1], finite, as many of each."""
        knots = block.get("knots") if isinstance(block, dict) else None
        values = block.get("values") if isinstance(block, dict) else None
        numbers = all(
            isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
            for v in (knots, values)
        )
        if (
            not numbers
            or not 2 <= len(knots) <= _MAX_KNOTS
            or len(values) != len(knots)
            or not all(torch.isfinite(torch.tensor(v, dtype=torch.float64)).all() for v in (knots, values))
            or knots[0] != 0
            or knots[-1] != 1
            or any(b <= a for a, b in pairwise(knots))
            or any(b < a for a, b in pairwise(values))
            or not 0 < values[0] <= values[-1] <= 1
        ):
            raise MnistlabError(
                f"{source}: the calibration's confidence_map must be knots increasing from 0 to 1 and as many "
                "finite non-decreasing values in (0, 1]"
            )
        return cls([float(k) for k in knots], [float(v) for v in values])


def fit_confidence_map(probs: torch.Tensor, labels: torch.Tensor, pieces: int = PIECES) -> ConfidenceMap:
    """The confidence map that best predicts whether the top label of `probs` is right (least binary cross-entropy
    on these held-out images): knots at 0, 1 and `pieces` - 1 quantiles of the top probabilities between, values
    kept non-decreasing by fitting their first value and positive rises (log space), by L-BFGS in float64."""
    probs = probs.double().cpu()
    top, answer = probs.max(1)
    right = (answer == labels.long().cpu()).double()
    inner = torch.quantile(top, torch.linspace(0, 1, pieces + 1, dtype=torch.float64)[1:-1])
    knots = torch.unique(torch.cat([torch.zeros(1, dtype=torch.float64), inner, torch.ones(1, dtype=torch.float64)]))
    start = torch.logit(knots.clamp(0.02, 0.98))  # start from the identity (values = knots), in logit space
    first = start[:1].clone().requires_grad_()
    rises = (start[1:] - start[:-1]).clamp_min(1e-3).expm1().log().requires_grad_()  # softplus^-1

    def values() -> torch.Tensor:
        return torch.cat([first, first + nn.functional.softplus(rises).cumsum(0)]).sigmoid()

    def curve(v: torch.Tensor) -> torch.Tensor:
        return _piecewise(top, knots, v).clamp(_TINY, 1 - _TINY)

    optimizer = torch.optim.LBFGS([first, rises], max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.binary_cross_entropy(curve(values()), right)
        loss.backward()
        return loss

    optimizer.step(closure)
    # The map's floor is 1 / classes anyway (the answer stays on top), and a sigmoid far out rounds to exactly 0
    # (a split with no right answer at low confidence), which a model file may not hold.
    fitted = values().detach().clamp(1 / probs.shape[1], 1)
    fitted = torch.cummax(fitted, 0).values  # exact non-decrease against rounding
    return ConfidenceMap(knots.tolist(), fitted.tolist())


def calibrated(probs: torch.Tensor, temperature: float | None, confidence_map: ConfidenceMap | None) -> torch.Tensor:
    """A model's probabilities as trained, calibrated: scaled by its temperature, then through its confidence map
    (each where it has one)."""
    if temperature is not None:
        probs = temper(probs, temperature)
    return confidence_map(probs) if confidence_map is not None else probs


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


def fit_on_split(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """The `calibration` block of a model file: the temperature and then the confidence map fitted on these
    held-out probabilities and labels (a validation split: never the test set), and the calibration before and
    after them."""
    probs, labels = probs.double().cpu(), labels.long().cpu()
    temperature = fit_temperature(probs, labels)
    tempered = temper(probs, temperature)
    confidence_map = fit_confidence_map(tempered, labels)
    return {
        "temperature": temperature,
        "confidence_map": confidence_map.to_dict(),
        "fitted_on": f"validation split ({len(labels)} images)",
        "before": calibration(probs, labels).to_dict(),
        "after": calibration(confidence_map(tempered), labels).to_dict(),
    }
