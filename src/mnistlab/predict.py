"""Using a trained model: evaluate it on a test set (and, later, classify images)."""

from __future__ import annotations

from pathlib import Path

from mnistlab.checkpoint import load_model
from mnistlab.data import load_data
from mnistlab.evaluation import Evaluation, evaluate_model
from mnistlab.losses import make_loss
from mnistlab.training import resolve_device


def evaluate(model_path: str | Path, data_dir: str | Path | None = None, device: str = "auto") -> Evaluation:
    """Evaluate a saved model on the test split of the dataset it was trained on."""
    dev = resolve_device(device)
    loaded = load_model(model_path, dev)
    data = load_data(loaded.metadata.get("dataset", "mnist"), data_dir, val_size=0, device=dev)
    meta = loaded.metadata
    loss_fn = make_loss(
        meta.get("loss", "cross-entropy"), loaded.model_config.softmax_output, meta.get("label_smoothing", 0.0)
    )
    return evaluate_model(loaded.model, data.test, loss_fn, loaded.normalize)
