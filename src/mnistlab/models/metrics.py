"""Accuracy, loss, per-class accuracy and the confusion matrix of a model on a split."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mnistlab.data.splits import Split, batches, to_float
from mnistlab.datasets import DIGITS
from mnistlab.devices import keep_freed_memory
from mnistlab.models.networks import for_inference

# Images per forward pass when evaluating. Small enough that a CNN's activations stay below glibc's mmap
# threshold and in the CPU's caches: the bundled ensemble over the 10,000 test images took 23 s in batches
# of 2,000 (12 million page faults) and 6 s in batches of 128 (docs/benchmarks.md).
BATCH = 128


@dataclass
class Evaluation:
    accuracy: float
    loss: float
    # None for a class with no images: no accuracy to give (a folder of your own images may lack some classes).
    per_class_accuracy: list[float | None]
    confusion_matrix: list[list[int]]  # rows: true class, columns: predicted class
    # What each class index means (the model's dataset); shown in text output, not part of to_dict.
    classes: list[str] = field(default_factory=lambda: list(DIGITS))
    # How well the confidences match the accuracy, before and after the model's temperature (models/calibration);
    # set by `infer.evaluate.evaluate` on a test split.
    calibration: dict[str, Any] | None = None
    # The share of the images the model's outlier score flags ("not a digit?"), and of any folders of outliers
    # given: `infer.evaluate.outlier_report`; set by `infer.evaluate.evaluate` on a test split.
    outliers: dict[str, Any] | None = None

    @property
    def classes_without_images(self) -> list[int]:
        """The classes (indices) that had no image: their confusion-matrix rows are all zero, as nothing was
        counted, and their per-class accuracy is None."""
        return [c for c, row in enumerate(self.confusion_matrix) if not sum(row)]

    def to_dict(self) -> dict:
        report = {
            "accuracy": self.accuracy,
            "loss": self.loss,
            "per_class_accuracy": self.per_class_accuracy,
            "confusion_matrix": self.confusion_matrix,
        }
        if self.calibration is not None:
            report["calibration"] = self.calibration
        if self.outliers is not None:
            report["outliers"] = self.outliers
        return report


@torch.inference_mode()
def predict_scores(
    model: nn.Module,
    images: torch.Tensor,
    normalize: tuple[float, float] | None = None,
    batch_size: int = BATCH,
) -> torch.Tensor:
    """The model's outputs (in evaluation mode) for uint8 images (N, 28, 28), computed batch by batch."""
    keep_freed_memory()
    fast = for_inference(model)
    outputs = [fast(to_float(images[i : i + batch_size], normalize)) for i in range(0, len(images), batch_size)]
    return torch.cat(outputs) if outputs else torch.empty(0, 10)


@torch.inference_mode()
def predict_answers(
    answering: nn.Module, images: torch.Tensor, batch_size: int = BATCH
) -> tuple[torch.Tensor, torch.Tensor]:
    """A `LoadedModel.answering()` module's calibrated probabilities (N, 10) and outlier scores (N,) for uint8
    images (N, 28, 28), batch by batch, on the CPU."""
    keep_freed_memory()
    fast = for_inference(answering)
    answers = [fast(to_float(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    if not answers:
        return torch.empty(0, 10), torch.empty(0)
    return torch.cat([p for p, _ in answers]).float().cpu(), torch.cat([s for _, s in answers]).float().cpu()


@torch.inference_mode()
def loss_and_correct(
    model: nn.Module,
    split: Split,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    normalize: tuple[float, float] | None = None,
) -> torch.Tensor:
    """The summed loss and the number of correct predictions over a split, as one float64 tensor on its device
    (sums, so that shares of a split evaluated apart add up; read once, not per batch)."""
    keep_freed_memory()
    fast = for_inference(model)
    sums = torch.zeros(2, dtype=torch.float64, device=split.images.device)
    for batch in batches(split, BATCH):
        out = fast(to_float(batch.images, normalize))
        sums[0] += loss_fn(out, batch.labels) * len(batch)
        sums[1] += (out.argmax(1) == batch.labels).sum()
    return sums


def evaluate_model(
    model: nn.Module,
    split: Split,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    normalize: tuple[float, float] | None = None,
) -> Evaluation:
    """Full evaluation of a model on a split (one pass over the images)."""
    return evaluate_scores(predict_scores(model, split.images, normalize), split.labels, loss_fn)


@torch.inference_mode()
def evaluate_scores(
    scores: torch.Tensor, labels: torch.Tensor, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> Evaluation:
    """Accuracy, loss, per-class accuracy and confusion matrix from a model's outputs for a split."""
    scores, truth = scores.float().cpu(), labels.cpu()
    predicted = scores.argmax(1)
    confusion = torch.bincount(truth * 10 + predicted, minlength=100).reshape(10, 10)
    counts = confusion.sum(1)
    shares = (confusion.diagonal() / counts.clamp(min=1)).tolist()
    per_class = [a if n else None for a, n in zip(shares, counts.tolist())]  # no images, no accuracy (not 0)
    accuracy = (predicted == truth).sum().item() / max(len(truth), 1)
    return Evaluation(accuracy, loss_fn(scores, truth).item(), per_class, confusion.tolist())


def most_confused(confusion: list[list[int]], top: int = 10) -> list[tuple[int, int, int]]:
    """(true digit, predicted digit, count) of the commonest mistakes, most frequent first."""
    pairs = [(t, p, n) for t, row in enumerate(confusion) for p, n in enumerate(row) if t != p and n]
    return sorted(pairs, key=lambda x: (-x[2], x[0], x[1]))[:top]
