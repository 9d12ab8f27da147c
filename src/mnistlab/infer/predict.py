"""Classifying image files (photos, scans, drawings) with a saved model."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from mnistlab.data.preprocess import Preprocessed, load_image, preprocess
from mnistlab.errors import MnistlabError
from mnistlab.models.files import LoadedModel
from mnistlab.models.outliers import verdict

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm"}


@dataclass
class Prediction:
    """What the model made of one image file (or why it could not)."""

    path: str
    label: int | None = None
    class_name: str | None = None  # what the label means for the model's dataset ("7", "Trouser")
    confidence: float | None = None
    probabilities: list[float] | None = None
    # Flagged as unlike the model's training data ("not a digit?"): its outlier score is above the model's
    # threshold. Both None where the model has no outlier detector.
    outlier: bool | None = None
    outlier_score: float | None = None
    error: str | None = None
    # With `error`: the file is an image, but preprocessing refused it (no digit found: it is blank).
    no_digit: bool = False
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
            "outlier": self.outlier,
            "outlier_score": self.outlier_score,
        }


def calibrate_command(model_path: str | Path | None) -> str:
    """The command that fits a model file's temperature and outlier detector (a file from before them has none)."""
    return f"mnistlab calibrate {model_path or 'MODEL'}"


def no_detector(model_path: str | Path | None, consequence: str) -> str:
    """Why a model flags nothing as unlike its training data (`consequence`: what that means here), and the fix."""
    name, fix = model_path or "the model", calibrate_command(model_path)
    return f"{name} has no outlier detector (an older model file), so {consequence}; add one with: {fix}"


def no_images(folder: Path) -> str:
    """What is wrong with a folder that holds no image files."""
    return f"{folder}: no image files in this folder ({', '.join(sorted(IMAGE_SUFFIXES))})"


def images_in(folder: Path) -> list[Path]:
    """The image files in a folder and its subfolders, by their suffix (IMAGE_SUFFIXES), sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def image_files(paths: list[str | Path]) -> Iterator[tuple[str, str | None]]:
    """(path, problem) for each image named or found in a named folder (walked recursively, sorted)."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = images_in(path)
            if not found:
                yield str(path), no_images(path)
            for p in found:
                yield str(p), None
        else:
            yield str(path), None  # a named file is tried whatever its suffix; load_image says what is wrong


@torch.inference_mode()
def classify(model: LoadedModel, images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibrated probabilities (N, 10) and outlier scores (N,) for preprocessed images (each (28, 28) in
    [0, 1]), from one forward pass; the scores are 0 where the model has no outlier detector."""
    device = next(model.model.parameters()).device
    probabilities, scores = model.answering()(torch.stack(images).to(device))
    return probabilities.float().cpu(), scores.float().cpu()


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
            probabilities, scores = classify(model, tensors)
            for prediction, probs, score in zip([p for p in pending if p.error is None], probabilities, scores):
                prediction.label = int(probs.argmax())
                prediction.class_name = model.classes[prediction.label]
                prediction.confidence = round(float(probs.max()), 6)
                prediction.probabilities = [round(float(p), 6) for p in probs]
                prediction.outlier, prediction.outlier_score = verdict(float(score), model.outlier_threshold)
        yield from pending
        pending.clear()
        tensors.clear()

    for path, problem in image_files(paths):
        read = False
        if problem is None:
            try:
                image = load_image(path)
                read = True
                pre = preprocess(image, invert=invert)
            except MnistlabError as exc:
                problem = str(exc)
        if problem is not None:
            pending.append(Prediction(path, error=problem, no_digit=read))
            continue
        pending.append(Prediction(path, preprocessed=pre if keep_preprocessed else None))
        tensors.append(pre.tensor)
        if len(tensors) >= chunk:
            yield from flush()
    yield from flush()
