"""A saved model measured: on its data set's test split, or on a folder of your own labelled images, and inspected."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from mnistlab.data.preprocess import preprocess
from mnistlab.data.splits import Split, load_data
from mnistlab.datasets import are_digits
from mnistlab.devices import resolve_device
from mnistlab.errors import MnistlabError, plural
from mnistlab.files import write_json
from mnistlab.infer.predict import images_in, no_detector, no_images, predict_images
from mnistlab.models.calibration import calibrated, calibration, reliability
from mnistlab.models.files import LoadedModel, load_model
from mnistlab.models.losses import make_loss
from mnistlab.models.metrics import Evaluation, evaluate_scores, predict_answers, predict_scores
from mnistlab.models.networks import ShiftAveraged, as_probabilities, members_as_trained
from mnistlab.models.outliers import auroc, flagged


def evaluate(
    model_path: str | Path | None = None,
    data_dir: str | Path | None = None,
    device: str = "auto",
    tta: bool = False,
    outliers: Sequence[str | Path] = (),
) -> Evaluation:
    """Evaluate a saved model (default: the bundled one) on the test split of the dataset it was trained on.

    With `tta`, each image's probabilities are averaged with those of its four one-pixel shifts
    (`ShiftAveraged`); the loss is then the cross-entropy of the averaged probabilities. The share of the test
    split the outlier score flags is in `outliers`, with that of each folder of images in `outliers` (images
    unlike the training data: `outlier_report`).
    """
    dev = resolve_device(device)
    loaded = load_model(model_path, dev)
    if outliers and loaded.outliers is None:
        raise MnistlabError(no_detector(model_path, "--outliers has no score to measure"))
    folders = {Path(folder): outlier_images(folder) for folder in outliers}  # checked before any work
    split = evaluation_split(loaded, data_dir, dev)
    if tta:
        network, probabilities = ShiftAveraged(loaded.model, loaded.probabilities), True
        loss_fn = make_loss("nll", probabilities=True)
    else:
        network, probabilities, loss_fn = loaded.model, loaded.probabilities, loaded.loss_fn()
    scores = predict_scores(network, split.images)
    result = evaluate_scores(scores, split.labels, loss_fn)
    probs = as_probabilities(scores, probabilities)  # an ensemble's: with its members' temperatures
    final = calibrated(probs, loaded.temperature, loaded.confidence_map)
    raw = probs
    if loaded.members_calibrated:  # "before" is the ensemble as its members were trained
        with members_as_trained(loaded.model):
            raw = as_probabilities(predict_scores(network, split.images), probabilities)
    report = calibration_report(loaded, raw, final, split.labels)
    found = outlier_report(loaded, split.images, folders)
    return replace(result, classes=loaded.classes, calibration=report, outliers=found)


def outlier_images(folder: str | Path) -> list[Path]:
    """The image files of a folder given as images unlike the training data (walked as `predict` walks it)."""
    root = Path(folder)
    if not root.is_dir():
        what = "not a folder" if root.exists() else "no such folder"
        raise MnistlabError(f"{root}: {what}; give a folder of images that are not what the model was trained on")
    files = images_in(root)
    if not files:
        raise MnistlabError(no_images(root))
    return files


def outlier_report(loaded: LoadedModel, test_images: torch.Tensor, folders: dict[Path, list[Path]]) -> dict[str, Any]:
    """The model's outlier threshold, the share of its test split (uint8 images) flagged, and for each folder
    (its image files, preprocessed as `predict` does) the share flagged and the AUROC of the outlier score
    between the test split's images and the folder's. An image preprocessing refuses (no digit found) counts
    as flagged, and apart (`refused`); a file that is no image is left out (`skipped`). Without a detector the
    threshold and the share are None."""
    threshold = loaded.outlier_threshold
    report: dict[str, Any] = {
        "threshold": threshold,
        "test_images": len(test_images),
        "test_flagged": None,
        "folders": [],
    }
    if threshold is None:
        return report
    _, test_scores = predict_answers(loaded.answering(), test_images)
    report["test_flagged"] = float(flagged(test_scores, threshold).double().mean())
    for folder, files in folders.items():
        predictions = list(predict_images(files, loaded))
        scored = [p for p in predictions if p.error is None]
        refused = sum(p.no_digit for p in predictions)
        skipped = [p.error for p in predictions if p.error is not None and not p.no_digit]
        if not scored and not refused:
            files_read = f"none of its {plural(len(files), 'image file')} could be read"
            raise MnistlabError(f"{folder}: {files_read} (first: {skipped[0]})")
        # The scores as predict gives them (6 significant digits; None, not finite, ranks above every number).
        scores = torch.tensor([math.nan if p.outlier_score is None else p.outlier_score for p in scored])
        count = len(scored) + refused
        report["folders"].append(
            {
                "folder": str(folder),
                "images": count,
                "refused": refused,
                "flagged": (sum(bool(p.outlier) for p in scored) + refused) / count,
                "auroc": auroc(test_scores, scores),
                "skipped": skipped,
            }
        )
    return report


def calibration_report(loaded: LoadedModel, raw: torch.Tensor, calibrated: torch.Tensor, labels: torch.Tensor) -> dict:
    """ECE, NLL and Brier score before (as trained) and after the model's calibration (its temperature, then its
    confidence map where it has one), and the bins of both reliability diagrams."""
    labels = labels.cpu()
    return {
        "calibrated": loaded.calibrated,
        "temperature": loaded.temperature,
        "confidence_map": loaded.confidence_map is not None,
        "before": calibration(raw.cpu(), labels).to_dict(),
        "after": calibration(calibrated.cpu(), labels).to_dict(),
        "bins": {"before": reliability(raw.cpu(), labels), "after": reliability(calibrated.cpu(), labels)},
    }


def evaluation_split(loaded: LoadedModel, data_dir: str | Path | None, device: torch.device | str = "cpu") -> Split:
    """The test split of the dataset `loaded` was trained on."""
    return load_data(loaded.dataset, data_dir, val_size=0, device=device).test


@dataclass
class FolderEvaluation:
    """A model measured on a folder of labelled images (`evaluate_images`)."""

    evaluation: Evaluation
    count: int  # images counted
    skipped: list[str]  # why each image that could not be used was left out

    def to_dict(self) -> dict:
        """The evaluation's report, with the images counted and skipped, and the classes (indices) that had no
        image: their per-class accuracy is null and their confusion-matrix row all zero."""
        return self.evaluation.to_dict() | {
            "classes_without_images": self.evaluation.classes_without_images,
            "images": self.count,
            "skipped": self.skipped,
        }


def image_folder(folder: str | Path, classes: list[str]) -> list[tuple[Path, int]]:
    """(image, class index) in torchvision's ImageFolder layout: FOLDER/<class>/<images>, each subfolder named
    by a class number (0-9) or a class name of the model. Files lying in FOLDER itself are ignored, as there."""
    root = Path(folder)
    if not root.is_dir():
        raise MnistlabError(f"{root}: not a folder (give a folder with one subfolder of images per class)")
    index = {name.lower(): i for i, name in enumerate(classes)} | {str(i): i for i in range(len(classes))}
    found = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if sub.name.lower() not in index:
            raise MnistlabError(
                f"{sub}: not a class of this model; name each folder by a class number 0-{len(classes) - 1} "
                f"or name ({', '.join(classes)})"
            )
        found += [(p, index[sub.name.lower()]) for p in images_in(sub)]
    if not found:
        raise MnistlabError(f"{root}: no images in class folders ({root}/<class>/*.png, ...)")
    return found


def evaluate_images(
    folder: str | Path,
    model_path: str | Path | None = None,
    device: str = "auto",
    tta: bool = False,
    invert: bool | None = None,
    chunk: int = 256,
) -> FolderEvaluation:
    """Accuracy, loss, per-class accuracy and confusion matrix of a model (default: the bundled one) on a
    folder of images named by class (`image_folder`), each prepared by `preprocess` as `predict` does.
    Images that cannot be read or hold no digit are left out and listed in `skipped`."""
    dev = resolve_device(device)
    loaded = load_model(model_path, dev)
    files = image_folder(folder, loaded.classes)
    model, loss_fn = loaded.model, loaded.loss_fn()
    if tta:
        model, loss_fn = ShiftAveraged(loaded.model, loaded.probabilities), make_loss("nll", True)
    batch: list[torch.Tensor] = []
    scores: list[torch.Tensor] = []
    labels: list[int] = []
    skipped: list[str] = []
    for i, (path, label) in enumerate(files):
        try:
            batch.append(preprocess(path, invert=invert).tensor)
            labels.append(label)
        except MnistlabError as exc:
            skipped.append(str(exc))
        if batch and (len(batch) == chunk or i == len(files) - 1):
            with torch.inference_mode():
                scores.append(model(torch.stack(batch).to(dev)).float().cpu())
            batch.clear()
    if not labels:
        raise MnistlabError(f"{folder}: none of its {plural(len(files), 'image')} could be used (first: {skipped[0]})")
    evaluation = evaluate_scores(torch.cat(scores), torch.tensor(labels), loss_fn)
    return FolderEvaluation(replace(evaluation, classes=loaded.classes), len(labels), skipped)


def inspect(
    model_path: str | Path | None, out_dir: str | Path, data_dir: str | Path | None = None, device: str = "auto"
) -> dict:
    """Where a model goes wrong on the test set: confusion-matrix figure, the most-confused class pairs, and a
    gallery of misclassified images with true class, prediction and confidence. Returns a summary."""
    from mnistlab.models.metrics import evaluate_scores, most_confused, predict_scores
    from mnistlab.plots import plot_confusion, plot_gallery

    dev = resolve_device(device)
    loaded = load_model(model_path, dev)
    test = evaluation_split(loaded, data_dir, dev)
    scores = predict_scores(loaded.model, test.images)
    result = evaluate_scores(scores, test.labels, loaded.loss_fn())
    probs = loaded.probabilities_of(scores).float().cpu()
    confidence, predicted = probs.max(1)
    wrong = (predicted != test.labels.cpu()).nonzero().flatten()
    wrong = wrong[confidence[wrong].argsort(descending=True)]  # the most confident mistakes first
    out = Path(out_dir)
    name = str(model_path) if model_path else "bundled model"
    classes = loaded.classes
    title = f"{name}: {100 * result.accuracy:.2f}% correct"
    plot_confusion(result.confusion_matrix, out / "confusion.png", title, classes)
    shown = wrong[:100]
    mistakes = [(int(test.labels[i]), int(predicted[i]), float(confidence[i])) for i in shown]
    heading, captions = gallery_text(classes, len(wrong), mistakes)
    plot_gallery(test.images.cpu()[shown].numpy(), captions, out / "misclassified.png", heading)
    summary = {
        "accuracy": result.accuracy,
        "classes": classes,
        "errors": len(wrong),
        "most_confused": [
            {"true": t, "predicted": p, "count": n} for t, p, n in most_confused(result.confusion_matrix)
        ],
        "misclassified": [
            {
                "index": int(i),
                "true": int(test.labels[i]),
                "predicted": int(predicted[i]),
                "confidence": float(confidence[i]),
            }
            for i in wrong
        ],
    }
    write_json(out / "inspection.json", summary)
    return summary


def gallery_text(classes: list[str], count: int, mistakes: list[tuple[int, int, float]]) -> tuple[str, list[str]]:
    """The title of inspect's gallery of `count` mistakes, and a caption for each shown (true class, predicted
    class, confidence), in the words of the model's dataset."""
    noun = "misclassified test digit" if are_digits(classes) else "misclassified test image"
    title = f"{plural(count, noun)} (true → predicted, confidence), most confident first"
    return title, [f"{classes[t]} → {classes[p]} ({100 * c:.0f}%)" for t, p, c in mistakes]  # plots wraps them
