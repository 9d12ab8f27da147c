""" "That is not a digit": an outlier score for every answer, from the density of the network's own features.

A classifier names one of its classes for anything it is shown, and its confidence does not tell a letter or a
shoe from a digit (the bundled model's calibrated confidence flags about half of Fashion-MNIST items at the
threshold that flags 1% of its validation digits; docs/outliers.md). The features the last layer reads do:
images of the training data fall in ten tight clusters there, and a shoe, noise or a star falls far from all of
them. So each model gets a Gaussian per class over those features with one covariance shared by the classes
(Lee et al. 2018; DDU, Mukhoti et al. 2021, fits one per class: with about 1,000 features and 5,500 images a
class, a shared one is better estimated and ten times smaller), fitted on the training split. The outlier score
of an image is its squared Mahalanobis distance to the nearest class centre, and the threshold is chosen on the
validation split so that at most FLAGGED (1%) of those held-out digits are flagged. The test set never chooses.

Measured against the alternatives the issue names (docs/outliers.md, "Choosing the score"): on the bundled
model's first member, energy and max-probability flag 33-83% of Fashion-MNIST test items at that threshold,
the feature distance 100%; earlier layers' features (pooled) did worse on letters, and adding confidence to the
distance did not help either by more than a few letters in a hundred.

A network trained with outlier exposure (`training.outlier_exposure`: the cross-entropy to the uniform answer on
generated non-digits) learns to be unsure of what is not a digit, and its features no longer set them apart
(docs/outliers.md, "Outlier exposure, second try": the density flags 1-12% of most non-digit kinds after it, the
confidence 83-96%). Such a run gets the method "max-probability" instead: the score is 1 - the top calibrated
probability (after temperature and confidence map: the probabilities the user sees), thresholded on the
validation split as the density is; it stores no tensors.

An ensemble's score is the mean over its members of each member's score divided by its own threshold (each
member is fitted on its own training split and thresholded on its own validation split), flagged above 1.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from mnistlab.models.calibration import ConfidenceMap

DENSITY = "feature-mahalanobis"
MAX_PROBABILITY = "max-probability"
METHODS = (DENSITY, MAX_PROBABILITY)
MIXED = "mixed"  # the method of an ensemble whose members use different ones
FLAGGED = 0.01  # the share of validation images a threshold may flag
SHRINK = 1e-2  # covariance + SHRINK * its mean variance * I: keeps directions no training image varies in finite
# Directions of the covariance kept one by one (the rest share one variance): for the bundled model's members, 256
# of 1,152 flag the same shares of every kind of image within 2 points as all of them (docs/outliers.md), in a
# fifth of the file and of the time.
RANK = 256
_CHUNK = 512  # images per pass when computing features: (chunk, classes, features) float32 stays small


def head_index(network: nn.Sequential) -> int:
    """The index of the network's last linear layer: what comes before it makes the features it reads."""
    for i in range(len(network) - 1, -1, -1):
        if isinstance(network[i], nn.Linear):
            return i
    raise ValueError("the network has no linear layer")


class FeatureDensity(nn.Module):
    """Class-conditional Gaussians with one shared covariance over penultimate features, the covariance kept as
    probabilistic PCA (Tipping and Bishop 1999): its RANK largest directions (`basis`, D x k) with their
    `variances`, and one `residual` variance for every other direction. The squared Mahalanobis distance to class
    c is then sum_i (u_i . (f - mean_c))^2 / variance_i + |the rest of f - mean_c|^2 / residual."""

    def __init__(self, means: torch.Tensor, basis: torch.Tensor, variances: torch.Tensor, residual: torch.Tensor):
        super().__init__()
        self.register_buffer("means", means.float())
        self.register_buffer("basis", basis.float())
        self.register_buffer("variances", variances.float())
        self.register_buffer("residual", residual.float().reshape(1))
        self.register_buffer("projected_means", self.means @ self.basis)

    @classmethod
    def fit(cls, features: torch.Tensor, labels: torch.Tensor) -> FeatureDensity:
        """Fitted on `features` (N, D) of images with `labels` (N,); classes with no image get no centre."""
        f = features.double().cpu()
        labels = labels.long().cpu()
        present = labels.unique()
        means = torch.stack([f[labels == c].mean(0) for c in present])
        centred = f - means[torch.searchsorted(present, labels)]
        covariance = centred.T @ centred / max(len(f), 1)
        covariance += SHRINK * max(float(covariance.diagonal().mean()), 1e-12) * torch.eye(f.shape[1], dtype=f.dtype)
        values, vectors = torch.linalg.eigh(covariance)  # ascending
        values, vectors = values.flip(0).clamp_min(1e-12), vectors.flip(1)
        k = min(RANK, len(values))
        residual = values[k:].mean() if k < len(values) else values[-1:]  # (with k = D: no direction is left)
        return cls(means, vectors[:, :k], values[:k], residual)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """The squared Mahalanobis distance (N,) of each feature vector to its nearest class centre."""
        f = features.float()
        inside = (f @ self.basis)[:, None, :] - self.projected_means[None]  # (N, classes, k)
        total = (f[:, None, :] - self.means[None]).pow(2).sum(-1)  # |f - mean_c|^2 over every direction
        outside = (total - inside.pow(2).sum(-1)).clamp_min(0)
        return ((inside.pow(2) / self.variances).sum(-1) + outside / self.residual).min(1).values

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The tensors a model file stores for it."""
        kept = ("means", "basis", "variances", "residual")
        return {f"{prefix}outliers.{name}": getattr(self, name) for name in kept}


def flagging_threshold(scores: torch.Tensor, share: float = FLAGGED) -> float:
    """The smallest score above which at most `share` of `scores` lie (flagged means strictly above it)."""
    ordered = scores.double().sort().values
    allowed = math.floor(share * len(ordered))
    return float(ordered[len(ordered) - allowed - 1]) if len(ordered) else math.inf


def flagged(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Which outlier scores are flagged: those above the threshold, and any that is no number (NaN), which
    nothing vouches for."""
    return ~(scores <= threshold)


def verdict(score: float, threshold: float | None) -> tuple[bool | None, float | None]:
    """What a face shows for one image's outlier score: whether it is flagged, and the score to 6 significant
    digits (None where it is not finite); both None where the model has no detector (`threshold` None)."""
    if threshold is None:
        return None, None
    shown = float(f"{score:.6g}") if math.isfinite(score) else None
    return bool(flagged(torch.tensor(score, dtype=torch.float64), threshold)), shown


def auroc(negatives: torch.Tensor, positives: torch.Tensor) -> float | None:
    """The area under the ROC curve of a score that should be higher for `positives` than for `negatives`: the
    share of (negative, positive) pairs the score orders rightly, ties counting half (the Mann-Whitney U over
    the pairs, from mid-ranks). 1: perfectly apart, 0.5: chance. A NaN score ranks above every number (it is
    flagged); None where either side is empty."""
    if not len(negatives) or not len(positives):
        return None
    scores = torch.cat([negatives.double().flatten(), positives.double().flatten()])
    scores = scores.masked_fill(scores.isnan(), math.inf)
    _, group, counts = torch.unique(scores, return_inverse=True, return_counts=True)  # sorted: ties share a group
    below = counts.cumsum(0) - counts  # how many scores lie below each group
    ranks = (below + (counts + 1) / 2)[group]  # 1-based mid-ranks
    n, m = len(negatives), len(positives)
    pairs_won = float(ranks[n:].sum()) - m * (m + 1) / 2
    return pairs_won / (n * m)


class MaxProbability(nn.Module):
    """The max-probability score: 1 - the top calibrated probability. It reads the probabilities `Answering` gives
    it; an ensemble member's are its temperature's alone, so it brings the member's own confidence map, if any."""

    def __init__(self, confidence_map: ConfidenceMap | None = None):
        super().__init__()
        self.confidence_map = confidence_map

    def forward(self, probabilities: torch.Tensor) -> torch.Tensor:
        if self.confidence_map is not None:
            probabilities = self.confidence_map(probabilities)
        return 1 - probabilities.max(1).values


class OutlierDetector(nn.Module):
    """The outlier score of a model (one scorer: a density or the max probability) or an ensemble (one per member):
    each member's score over its `scale` (1 for a single model, the member's threshold in an ensemble), averaged;
    flagged above `threshold`."""

    def __init__(self, members: list[FeatureDensity | MaxProbability], scales: list[float], threshold: float):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.scales = scales
        self.threshold = threshold

    @property
    def reads_probabilities(self) -> bool:
        """Whether a member's score is its calibrated probabilities' (max-probability) rather than its features'."""
        return any(isinstance(m, MaxProbability) for m in self.members)

    def forward(self, features: list[torch.Tensor], probabilities: list[torch.Tensor]) -> torch.Tensor:
        """Scores (N,) from each member's penultimate features and its own calibrated probabilities."""
        scores = [
            (m(p) if isinstance(m, MaxProbability) else m(f)).float() / s
            for m, f, p, s in zip(self.members, features, probabilities, self.scales)
        ]
        return torch.stack(scores).mean(0)


@torch.inference_mode()
def features_of(network: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Penultimate features (N, D) of a network that has `features_and_outputs` (networks.Standardized) for
    float images (N, 28, 28) in [0, 1], computed in chunks."""
    chunks = [network.features_and_outputs(images[i : i + _CHUNK])[0] for i in range(0, len(images), _CHUNK)]
    return torch.cat(chunks).cpu() if chunks else torch.empty(0, 0)


def fit_detector(
    network: nn.Module, train: tuple[torch.Tensor, torch.Tensor], val: torch.Tensor
) -> tuple[FeatureDensity, dict[str, Any]]:
    """The density of `network`'s features over the training images and labels `train` (float images in
    [0, 1]), and the `outliers` block of its model file: the threshold that flags at most FLAGGED of the
    validation images `val`, and how it was fitted."""
    density = FeatureDensity.fit(features_of(network, train[0]), train[1])
    with torch.inference_mode():
        scores = density(features_of(network, val))
    threshold = flagging_threshold(scores)
    return density, {
        "method": DENSITY,
        "threshold": threshold,
        "fitted_on": f"training split ({len(train[1])} images); threshold on the validation split ({len(val)} images)",
        "validation_flagged": float(flagged(scores, threshold).double().mean()),
    }


def fit_max_probability(probabilities: torch.Tensor) -> dict[str, Any]:
    """The `outliers` block of the max-probability method for the calibrated probabilities (N, C) of the
    validation images (float64, as `Answering` computes them): the threshold that flags at most FLAGGED of them."""
    scores = MaxProbability()(probabilities).float()
    threshold = flagging_threshold(scores)
    return {
        "method": MAX_PROBABILITY,
        "threshold": threshold,
        "fitted_on": f"validation split ({len(scores)} images): 1 - the top calibrated probability",
        "validation_flagged": float(flagged(scores, threshold).double().mean()),
    }
