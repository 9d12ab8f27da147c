"""`mnistlab calibrate`: a temperature and an outlier detector for a model file that has none (or new ones), fitted
on the splits it was trained on: the density on its training split, the temperature and the outlier threshold on
its validation split, never the test set. The detector keeps the method the file records (models/outliers.py:
max-probability for a run trained with outlier exposure; the density for one without a detector). A run trained
now is calibrated when it finishes; this is for older model files, and for ensembles, whose members are each
calibrated on their own validation split (each member's split is part of the others' training data, so no split is
held out from all of them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from mnistlab.config import load_config
from mnistlab.data.splits import MnistData, load_data, to_float
from mnistlab.devices import resolve_device
from mnistlab.errors import MnistlabError
from mnistlab.files import FileLock, write_json
from mnistlab.models.calibration import ConfidenceMap, calibrated, fit_on_split, fit_temperature
from mnistlab.models.files import (
    FORMAT,
    ensemble_outliers,
    load_model,
    outlier_method,
    read_description,
    write_safetensors,
)
from mnistlab.models.metrics import predict_scores
from mnistlab.models.networks import as_probabilities
from mnistlab.models.outliers import MAX_PROBABILITY, FeatureDensity, fit_detector, fit_max_probability


def calibrate(model_path: str | Path, data_dir: str | Path | None = None, device: str = "auto") -> dict[str, Any]:
    """Fit the temperature and the outlier detector of the model at `model_path` (each member's, for an
    ensemble: the density on its training split, temperature and threshold on its validation split) and write
    them into its model files; returns what was fitted (an ensemble: the members' temperatures and thresholds)."""
    weights, meta_path, meta = read_description(model_path)
    dev = resolve_device(device)
    loaded = load_model(model_path, dev, outliers=False)  # a broken detector is replaced, not refused
    with FileLock(meta_path.with_name(meta_path.name + ".lock")):
        state = {k: v for k, v in load_file(str(weights)).items() if "outliers." not in k}
        if "ensemble" in meta:
            temperatures, thresholds, methods = [], [], []
            for i, (entry, member, config) in enumerate(zip(meta["ensemble"], loaded.model.members, loaded.configs)):
                source = Path(str(entry.get("source", "")))
                method = outlier_method(entry.get("outliers"), meta_path)
                data = _splits(entry.get("split"), source, f"member {i}", loaded.dataset, data_dir)
                outputs = predict_scores(member, data.val.images.to(dev)).cpu()
                probs = as_probabilities(outputs, config.softmax_output)
                # The temperature alone: an ensemble uses its members' temperatures, never a confidence map
                entry["temperature"] = fit_temperature(probs, data.val.labels.cpu())
                if method == MAX_PROBABILITY:  # the member's own probabilities in the ensemble: its temperature's
                    own = as_probabilities(outputs.double(), config.softmax_output)
                    block = fit_max_probability(calibrated(own, entry["temperature"], None))
                else:
                    density, block = _fit_outliers(member, data, dev)
                    state.update(density.tensors(f"m{i}."))
                entry["outliers"] = {"method": method, "threshold": block["threshold"]}
                temperatures.append(entry["temperature"])
                thresholds.append(block["threshold"])
                methods.append(method)
            meta.pop("calibration", None)  # members calibrated one by one: the average needs no temperature of its own
            meta["outliers"] = ensemble_outliers(methods)
            fitted: dict[str, Any] = {"members": temperatures, "thresholds": thresholds}
        else:
            record = meta.get("metadata", {}).get("split")
            data = _splits(record, weights.parent, str(model_path), loaded.dataset, data_dir)
            outputs = predict_scores(loaded.model, data.val.images.to(dev)).cpu()
            meta["calibration"] = fit_on_split(as_probabilities(outputs, loaded.probabilities), data.val.labels.cpu())
            if outlier_method(meta.get("outliers"), meta_path) == MAX_PROBABILITY:  # float64, as answering() has them
                calibration = meta["calibration"]
                confidence_map = ConfidenceMap.from_dict(calibration["confidence_map"], meta_path)
                probs = as_probabilities(outputs.double(), loaded.probabilities)
                meta["outliers"] = fit_max_probability(calibrated(probs, calibration["temperature"], confidence_map))
            else:
                density, meta["outliers"] = _fit_outliers(loaded.model, data, dev)
                state.update(density.tensors())
            fitted = {**meta["calibration"], "outliers": meta["outliers"]}
        # The weights first: density tensors without a description of them are ignored on loading, so a stop
        # between the two writes leaves a model that loads as before.
        write_safetensors(weights, state, {"format": FORMAT})
        write_json(meta_path, meta)
        return fitted


def _fit_outliers(network: torch.nn.Module, data: MnistData, device: torch.device) -> tuple[FeatureDensity, dict]:
    train = (to_float(data.train.images.to(device)), data.train.labels)
    return fit_detector(network, train, to_float(data.val.images.to(device)))


def _splits(split: Any, run_dir: Path, name: str, dataset: str, data_dir: str | Path | None) -> MnistData:
    """The training and validation splits a model was trained on: from its file's record (`metadata.split`:
    seed and size), else from the config.toml of its run directory."""
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
    return load_data(dataset, data_dir, size, seed, torch.device("cpu"))
