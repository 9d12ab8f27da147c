"""Classifying image files (photos, scans, drawings) with a saved model."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from mnistlab.data.preprocess import Preprocessed, load_image, preprocess
from mnistlab.errors import MnistlabError
from mnistlab.models.files import LoadedModel

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm"}


@dataclass
class Prediction:
    """What the model made of one image file (or why it could not)."""

    path: str
    label: int | None = None
    class_name: str | None = None  # what the label means for the model's dataset ("7", "Trouser")
    confidence: float | None = None
    probabilities: list[float] | None = None
    error: str | None = None
    preprocessed: Preprocessed | None = None

    def to_dict(self) -> dict:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        return {
            "path": self.path,
            "label": self.label,
            "class": self.class_name,
            "confidence": self.confidence,
            "probabilities": self.probabilities,
        }


def image_files(paths: list[str | Path]) -> Iterator[tuple[str, str | None]]:
    """(path, problem) for each image named or found in a named folder (walked recursively, sorted)."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                yield str(path), f"{path}: no image files in this folder ({', '.join(sorted(IMAGE_SUFFIXES))})"
            for p in found:
                yield str(p), None
        else:
            yield str(path), None  # a named file is tried whatever its suffix; load_image says what is wrong


@torch.inference_mode()
def classify(model: LoadedModel, images: list[torch.Tensor]) -> torch.Tensor:
    """Probabilities (N, 10) for preprocessed images (each (28, 28) in [0, 1])."""
    device = next(model.model.parameters()).device
    batch = torch.stack(images).to(device)
    return model.probabilities_of(model.model(batch)).float().cpu()


def predict_images(
    paths: list[str | Path],
    model: LoadedModel,
    invert: bool | None = None,
    keep_preprocessed: bool = False,
    chunk: int = 256,
) -> Iterator[Prediction]:
    """Classify image files (and folders of them), in order; a file that cannot be used yields its error."""
    pending: list[Prediction] = []
    tensors: list[torch.Tensor] = []

    def flush() -> Iterator[Prediction]:
        if tensors:
            for prediction, probs in zip([p for p in pending if p.error is None], classify(model, tensors)):
                prediction.label = int(probs.argmax())
                prediction.class_name = model.classes[prediction.label]
                prediction.confidence = round(float(probs.max()), 6)
                prediction.probabilities = [round(float(p), 6) for p in probs]
        yield from pending
        pending.clear()
        tensors.clear()

    for path, problem in image_files(paths):
        if problem is None:
            try:
                pre = preprocess(load_image(path), invert=invert)
            except MnistlabError as exc:
                problem = str(exc)
        if problem is not None:
            pending.append(Prediction(path, error=problem))
            continue
        pending.append(Prediction(path, preprocessed=pre if keep_preprocessed else None))
        tensors.append(pre.tensor)
        if len(tensors) >= chunk:
            yield from flush()
    yield from flush()
