"""`mnistlab calibrate`: a temperature for a model file that has none (or a new one), fitted on the validation split
it was trained beside: never the test set. A run trained now is calibrated when it finishes; this is for older
model files, and for ensembles, whose members are each calibrated on their own validation split (each member's
split is part of the others' training data, so no split is held out from all of them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mnistlab.config import load_config
from mnistlab.data.splits import Split, load_data
from mnistlab.devices import resolve_device
from mnistlab.errors import MnistlabError
from mnistlab.files import FileLock, write_json
from mnistlab.models.calibration import fit_on_split
from mnistlab.models.files import load_model, read_description
from mnistlab.models.metrics import predict_scores
from mnistlab.models.networks import as_probabilities


def calibrate(model_path: str | Path, data_dir: str | Path | None = None, device: str = "auto") -> dict[str, Any]:
    """Fit the temperature of the model at `model_path` (each member's, for an ensemble) on its validation split
    and write it into its model.json; returns the calibration written (an ensemble: one per member)."""
    weights, meta_path, meta = read_description(model_path)
    dev = resolve_device(device)
    loaded = load_model(model_path, dev)
    with FileLock(meta_path.with_name(meta_path.name + ".lock")):
        if "ensemble" in meta:
            fitted = []
            for i, (entry, member, config) in enumerate(zip(meta["ensemble"], loaded.model.members, loaded.configs)):
                source = Path(str(entry.get("source", "")))
                split = _validation(entry.get("split"), source, f"member {i}", loaded.dataset, data_dir)
                probs = as_probabilities(predict_scores(member, split.images.to(dev)), config.softmax_output)
                entry["temperature"] = fit_on_split(probs.cpu(), split.labels.cpu())["temperature"]
                fitted.append(entry["temperature"])
            meta.pop("calibration", None)  # members calibrated one by one: the average needs no temperature of its own
            write_json(meta_path, meta)
            return {"members": fitted}
        record = meta.get("metadata", {}).get("split")
        split = _validation(record, weights.parent, str(model_path), loaded.dataset, data_dir)
        probs = as_probabilities(predict_scores(loaded.model, split.images.to(dev)), loaded.probabilities)
        meta["calibration"] = fit_on_split(probs.cpu(), split.labels.cpu())
        write_json(meta_path, meta)
        return meta["calibration"]


def _validation(split: Any, run_dir: Path, name: str, dataset: str, data_dir: str | Path | None) -> Split:
    """The validation split a model was trained beside: from its file's record (`metadata.split`: seed and size),
    else from the config.toml of its run directory."""
    if not isinstance(split, dict):
        if not (run_dir / "config.toml").is_file():
            raise MnistlabError(
                f"{name}: its file does not say which validation split it was trained beside (no metadata.split, "
                "no config.toml beside it); calibrate it from its run directory"
            )
        config = load_config(run_dir / "config.toml")
        split = {"seed": config.training.seed, "val_size": config.data.val_size}
    seed, size = split.get("seed"), split.get("val_size")
    if not isinstance(seed, int) or not isinstance(size, int) or size < 0:
        raise MnistlabError(f"{name}: its validation split must be recorded as integers seed and val_size, got {split}")
    if size == 0:
        raise MnistlabError(
            f"{name}: trained without a validation split (data.val_size = 0): nothing was held out to calibrate on, "
            "and the test set never chooses"
        )
    data = load_data(dataset, data_dir, size, seed, torch.device("cpu"))
    return data.val
