"""Model files: weights in safetensors beside a small JSON of architecture and metadata. Never pickle.

A model is `<stem>.safetensors` plus `<stem>.json`; a run directory holds `model.safetensors` and `model.json`.
Loading checks the JSON against the weights (names and shapes) before anything runs, and refuses pickles
(`torch.save` files) outright: unpickling a file someone hands you can run arbitrary code.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from mnistlab.config import ModelConfig, config_from_dict
from mnistlab.datasets import DATASETS, DIGITS
from mnistlab.errors import MnistlabError
from mnistlab.files import LOCK, replacing, write_json
from mnistlab.models.calibration import ConfidenceMap, calibrated
from mnistlab.models.losses import LossFn, make_loss
from mnistlab.models.networks import Ensemble, Standardized, as_probabilities, build_model
from mnistlab.models.outliers import (
    DENSITY,
    MAX_PROBABILITY,
    METHODS,
    MIXED,
    FeatureDensity,
    MaxProbability,
    OutlierDetector,
    head_index,
)

FORMAT = "mnistlab-model"
FORMAT_VERSION = 1


@dataclass
class LoadedModel:
    """A model ready for inference: it takes float images (B, 28, 28) with pixels in [0, 1] (its own
    standardisation built in) and returns logits, or probabilities where `probabilities` is true."""

    model: nn.Module
    probabilities: bool
    configs: list[ModelConfig]
    metadata: dict[str, Any]
    path: Path
    # Temperature scaling of the model's probabilities (models/calibration.py), fitted on a validation split;
    # None: not calibrated (an ensemble may still have calibrated members: `calibrated`).
    temperature: float | None = None
    members_calibrated: bool = False
    # The outlier score ("not a digit": models/outliers.py) and its threshold; None: the file has none.
    outliers: OutlierDetector | None = None
    # The top label's confidence map after the temperature (models/calibration.py); None: the temperature alone
    # (an ensemble, or a file from before the map).
    confidence_map: ConfidenceMap | None = None

    def loss_fn(self) -> LossFn:
        """The loss the model was trained with (an ensemble: cross-entropy of its averaged probabilities)."""
        if len(self.configs) > 1:
            return make_loss("nll", probabilities=True)
        meta = self.metadata
        return make_loss(meta.get("loss", "cross-entropy"), self.probabilities, meta.get("label_smoothing", 0.0))

    def probabilities_of(self, outputs: torch.Tensor) -> torch.Tensor:
        """The calibrated probabilities of the network's outputs: what mnistlab prints, returns and shows."""
        return calibrated(as_probabilities(outputs, self.probabilities), self.temperature, self.confidence_map)

    def answering(self) -> Answering:
        """A module answering float images (B, 28, 28) in [0, 1] with the calibrated probabilities (B, 10) and
        the outlier scores (B,) in one forward pass (scores of 0 where the model has no outlier detector)."""
        return Answering(self)

    @property
    def outlier_threshold(self) -> float | None:
        """The score above which an image is flagged as unlike the training data; None: no detector."""
        return self.outliers.threshold if self.outliers is not None else None

    @property
    def calibrated(self) -> bool:
        """Whether the probabilities are calibrated: a temperature of its own, or every member's."""
        return self.temperature is not None or self.members_calibrated

    @property
    def dataset(self) -> str:
        """The dataset the model was trained on, whose test split it is measured on."""
        return self.metadata.get("dataset", "mnist")

    @property
    def item(self) -> str:
        """What one of its images shows ("digit", "garment"): the flagged say "not a digit?"."""
        info = DATASETS.get(self.dataset)
        return info.item if info else "digit"

    @property
    def classes(self) -> list[str]:
        """What each output means ("0".."9" for digits, "Trouser" ... for Fashion-MNIST): from the model file,
        else from the registry entry of its dataset."""
        names = self.metadata.get("classes")
        if isinstance(names, list) and len(names) == 10 and all(isinstance(n, str) for n in names):
            return names
        info = DATASETS.get(self.dataset)
        return list(info.classes) if info else list(DIGITS)


class Answering(nn.Module):
    """What every face shows for a batch: a model's calibrated probabilities and its outlier scores."""

    def __init__(self, loaded: LoadedModel):
        super().__init__()
        self.model, self.detector = loaded.model, loaded.outliers
        self.softmax_output, self.temperature = loaded.probabilities, loaded.temperature
        self.confidence_map = loaded.confidence_map
        # A max-probability score reads the probabilities in float64: in float32, 1 - p of a sure answer is lost to
        # rounding (1 - 1e-6 is within a few steps of 1), and the ONNX copy's scores would not agree with these.
        self.precise = loaded.outliers is not None and loaded.outliers.reads_probabilities

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.model, Ensemble):  # each member's own probabilities too: a max-probability score reads them
            features, own = self.model.member_answers(images, self.precise)
            probs = calibrated(torch.stack(own).mean(0), self.temperature, self.confidence_map)  # as Ensemble averages
        else:
            feature, outputs = self.model.features_and_outputs(images)
            features = [feature]
            outputs = outputs.double() if self.precise else outputs
            probs = calibrated(as_probabilities(outputs, self.softmax_output), self.temperature, self.confidence_map)
            own = [probs]
        if self.detector is None:  # shape[0], not len(): torch.export would fix len() at its example's batch size
            return probs, torch.zeros(images.shape[0], device=images.device)
        return probs.float(), self.detector(features, own)


def _describe(model_config: ModelConfig, normalize: tuple[float, float] | None) -> dict[str, Any]:
    return {
        "model": {f.name: getattr(model_config, f.name) for f in fields(model_config)},
        "normalize": list(normalize) if normalize else None,
    }


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Tensors (moved to the CPU, made contiguous) into a safetensors file, replaced atomically.

    Serialised in memory and written by Python, so that a failing write (full disk, size limit, read-only
    folder) is an OSError that `replacing` reports in one line.
    """
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def _save(tensors: dict[str, torch.Tensor], folder: Path, stem: str, description: dict[str, Any]) -> Path:
    weights = folder / f"{stem}.safetensors"
    write_safetensors(weights, tensors, {"format": FORMAT})
    write_json(folder / f"{stem}.json", {"format": FORMAT, "format_version": FORMAT_VERSION, **description})
    return weights


def save_model(
    model: nn.Module,
    model_config: ModelConfig,
    folder: Path,
    normalize: tuple[float, float] | None,
    metadata: dict[str, Any],
    stem: str = "model",
    calibration: dict[str, Any] | None = None,
    outliers: tuple[FeatureDensity | None, dict[str, Any]] | None = None,
) -> Path:
    """Write `<stem>.safetensors` and `<stem>.json` into `folder`; returns the safetensors path. `calibration`:
    the temperature fitted on validation data and how it was fitted; `outliers`: the feature density (None for the
    max-probability method, which has no tensors) and the `outliers` block (models/outliers.fit_detector,
    fit_max_probability)."""
    description = {**_describe(model_config, normalize), "metadata": metadata}
    tensors = dict(model.state_dict())
    if calibration is not None:
        description["calibration"] = calibration
    if outliers is not None:
        if outliers[0] is not None:
            tensors.update(outliers[0].tensors())
        description["outliers"] = outliers[1]
    return _save(tensors, folder, stem, description)


def save_ensemble(members: list[Path], folder: Path, metadata: dict[str, Any], stem: str = "model") -> Path:
    """One model file holding several single models (run directories or model files); returns its path."""
    tensors: dict[str, torch.Tensor] = {}
    described = []
    for i, member in enumerate(members):
        weights, _, meta = read_description(member)
        if "ensemble" in meta:
            raise MnistlabError(f"{member}: is an ensemble already; give its members instead")
        tensors.update({f"m{i}.{k}": v for k, v in load_file(str(weights)).items()})
        entry = {"model": meta["model"], "normalize": meta.get("normalize"), "source": str(member)}
        split = meta.get("metadata", {}).get("split")
        if isinstance(split, dict):  # so that `mnistlab calibrate` finds the member's validation split anywhere
            entry["split"] = split
        temperature = _temperature(meta.get("calibration"), member)
        if temperature is not None:  # calibrated on its own validation split, it stays so in the ensemble
            entry["temperature"] = temperature
        if "outliers" in meta:  # a density came along with its tensors ("m{i}.outliers.*")
            entry["outliers"] = _member_outliers(meta, member)
        described.append(entry)
    description: dict[str, Any] = {"ensemble": described, "metadata": metadata}
    if all("outliers" in entry for entry in described):
        description["outliers"] = ensemble_outliers([entry["outliers"]["method"] for entry in described])
    else:  # a member without a density: the ensemble has no score, and keeps no member's tensors for one
        tensors = {k: v for k, v in tensors.items() if ".outliers." not in k}
        for entry in described:
            entry.pop("outliers", None)
    return _save(tensors, folder, stem, description)


def ensemble_outliers(methods: list[str]) -> dict[str, Any]:
    """The `outliers` block of an ensemble whose members have detectors of these methods (OutlierDetector)."""
    return {
        "method": methods[0] if len(set(methods)) == 1 else MIXED,
        "threshold": 1.0,
        "combined": "the mean of the members' scores, each divided by its own threshold",
    }


def _member_outliers(meta: dict[str, Any], source: Path) -> dict[str, Any]:
    """A member's `outliers` block in an ensemble: its method and threshold, and for max-probability its
    confidence map (the ensemble tempers each member's probabilities, and maps none)."""
    block = meta["outliers"]
    method = outlier_method(block, source)
    entry = {"method": method, "threshold": _threshold(block, source, method)}
    calibration = meta.get("calibration")
    if method == MAX_PROBABILITY and isinstance(calibration, dict) and "confidence_map" in calibration:
        entry["confidence_map"] = ConfidenceMap.from_dict(calibration["confidence_map"], source).to_dict()
    return entry


def model_paths(path: str | Path) -> tuple[Path, Path]:
    """(weights, json) for a run directory, a `.safetensors` file or a `.json` file."""
    path = Path(path)
    if path.is_dir():
        _check_finished(path)
        path = path / "model.safetensors"
    weights, meta = path.with_suffix(".safetensors"), path.with_suffix(".json")
    if not path.exists():
        raise MnistlabError(f"{path}: no such model file or run directory")
    for p in (weights, meta):
        if not p.is_file():
            raise MnistlabError(f"{p}: missing (a model is a .safetensors file with a .json beside it)")
    return weights, meta


def _check_finished(folder: Path) -> None:
    """A run directory whose run has not written its model yet is named as such, with how to go on."""
    if (folder / "model.safetensors").exists() or (folder / "model.json").exists():
        return
    # A run writes metrics.json beside its checkpoint after every epoch (train/run_dir.py), the model at its end.
    if (folder / "metrics.json").is_file():
        raise MnistlabError(
            f"{folder}: the run has not finished (its model is written at its end): it is still training, or it "
            f"stopped; finish it with: mnistlab train --resume {folder}"
        )
    if (folder / LOCK).exists():  # a run locked it and has not saved an epoch: training now, or killed
        raise MnistlabError(
            f"{folder}: the run has no finished epoch (it is in its first, or it stopped there), so there is nothing "
            f"to load or resume; start it again with: mnistlab train --config NAME --out {folder}"
        )


def check_safetensors(path: Path) -> None:
    """Decide what `path` holds by parsing it, and refuse anything but a safetensors file.

    A safetensors file is an 8-byte little-endian header length, then that many bytes of JSON, then the data.
    Only when that does not parse is the file checked for the signatures of a pickle or a `torch.save` zip, to
    say why it is refused: a first byte alone cannot decide (a header length of 128 + 256k starts with the
    pickle protocol byte 0x80).
    """
    try:
        with path.open("rb") as f:
            head = f.read(9)
            size = path.stat().st_size
    except OSError as exc:
        raise MnistlabError(f"{path}: cannot read ({exc.strerror})") from None
    header = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
    if 2 <= header <= size - 8 and head[8:9] == b"{":
        return
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise MnistlabError(
            f"{path}: this is a pickle / torch.save file; mnistlab only opens safetensors model files, "
            "because unpickling can run arbitrary code"
        )
    raise MnistlabError(f"{path}: not a safetensors file (truncated or another format)")


def read_description(path: str | Path) -> tuple[Path, Path, dict[str, Any]]:
    """(weights path, description path, description) of a model, both files checked by parsing them."""
    weights, meta_path = model_paths(path)
    check_safetensors(weights)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MnistlabError(f"{meta_path}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise MnistlabError(f"{meta_path}: cannot read ({exc.strerror})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise MnistlabError(f"{meta_path}: not an mnistlab model description")
    return weights, meta_path, meta


def _build(description: dict[str, Any], state: dict[str, torch.Tensor], source: Path) -> tuple[nn.Module, ModelConfig]:
    """The network a description names, with `state` loaded after checking names and shapes."""
    model_config = config_from_dict({"model": description.get("model", {})}, source=str(source)).model
    network = build_model(model_config)
    expected = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        diff = sorted(set(expected.items()) ^ set(found.items()))[:3]
        raise MnistlabError(f"{source}: weights do not match the architecture described (first differences: {diff})")
    network.load_state_dict(state)
    normalize = description.get("normalize")
    if normalize is not None and not (
        isinstance(normalize, list)
        and len(normalize) == 2
        and all(isinstance(v, (int, float)) and math.isfinite(v) for v in normalize)
        and normalize[1] > 0
    ):
        raise MnistlabError(f"{source}: 'normalize' must be null or [mean, std] with std > 0, got {normalize!r}")
    return Standardized(network, (float(normalize[0]), float(normalize[1])) if normalize else None), model_config


def load_model(
    path: str | Path | None = None, device: torch.device | str = "cpu", outliers: bool = True
) -> LoadedModel:
    """Load a model (or ensemble) from a run directory or model file; None loads the bundled pretrained model.

    The architecture in the JSON is checked against the weights before anything runs. `outliers=False` leaves
    its outlier detector unread (`mnistlab calibrate`, which fits a new one, also mends a broken one).
    """
    if path is None:
        path = bundled_model_path()
    weights, meta_path, meta = read_description(path)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise MnistlabError(f"{weights}: not a valid safetensors file ({exc})") from None
    broken = [
        k for k, v in state.items() if "outliers." not in k and v.is_floating_point() and not torch.isfinite(v).all()
    ]
    if broken:
        raise MnistlabError(
            f"{weights}: weights are not finite (NaN or infinity in {broken[0]}): the model diverged in training; "
            "train it again with a lower learning rate"
        )
    if "ensemble" in meta:
        members = meta["ensemble"]
        if not isinstance(members, list) or not all(isinstance(m, dict) for m in members):
            raise MnistlabError(f"{meta_path}: 'ensemble' must be a list of member descriptions")
        states = [
            _without_outliers({k[len(f"m{i}.") :]: v for k, v in state.items() if k.startswith(f"m{i}.")})
            for i in range(len(members))
        ]
        built = [_build(member, kept, meta_path) for member, (kept, _) in zip(members, states)]
        outputs_probs = [c.softmax_output for _, c in built]
        temperatures = [
            _temperature({"temperature": m["temperature"]}, meta_path) if "temperature" in m else None for m in members
        ]
        model: nn.Module = Ensemble([m for m, _ in built], outputs_probs, temperatures)
        configs, probabilities = [c for _, c in built], True
        members_calibrated = all(t is not None for t in temperatures)
        detector = _detector(
            meta.get("outliers") if outliers else None,
            [(m, s, e.get("outliers")) for (m, _), (_, s), e in zip(built, states, members)],
            meta_path,
        )
    else:
        kept, found = _without_outliers(state)
        model, config = _build(meta, kept, meta_path)
        configs, probabilities, members_calibrated = [config], config.softmax_output, False
        detector = _detector(meta.get("outliers") if outliers else None, [(model, found, None)], meta_path)
    metadata = meta.get("metadata", {})
    if not isinstance(metadata, dict):
        raise MnistlabError(f"{meta_path}: 'metadata' must be an object")
    calibration = meta.get("calibration")
    temperature = _temperature(calibration, meta_path)
    confidence_map = None
    if isinstance(calibration, dict) and "confidence_map" in calibration:
        confidence_map = ConfidenceMap.from_dict(calibration["confidence_map"], meta_path).to(device)
    return LoadedModel(
        model.to(device).eval(),
        probabilities,
        configs,
        metadata,
        weights,
        temperature,
        members_calibrated,
        detector.to(device) if detector is not None else None,
        confidence_map,
    )


def _without_outliers(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A network's weights, and the tensors of its outlier density ("outliers.*"), apart."""
    kept = {k: v for k, v in state.items() if not k.startswith("outliers.")}
    return kept, {k[len("outliers.") :]: v for k, v in state.items() if k.startswith("outliers.")}


def _detector(
    block: Any, members: list[tuple[nn.Module, dict[str, torch.Tensor], Any]], source: Path
) -> OutlierDetector | None:
    """The outlier detector a model file describes (its `outliers` block, and each network's density tensors
    with, in an ensemble, the member's own `outliers` block), checked; None where it has none."""
    if block is None:  # (density tensors it does not describe are ignored: see infer/calibrate.py)
        return None
    if len(members) == 1:
        method = outlier_method(block, source)
        network, tensors, _ = members[0]
        scorer = _scorer(method, network, tensors, None, source)
        return OutlierDetector([scorer], [1.0], _threshold(block, source, method))
    outlier_method(block, source, (*METHODS, MIXED))  # checked only: each member's block names its own
    threshold = _threshold(block, source)
    scorers, scales = [], []
    for network, tensors, member_block in members:
        method = outlier_method(member_block, source)
        scorers.append(_scorer(method, network, tensors, member_block, source))
        scales.append(_threshold(member_block, source, method))
    return OutlierDetector(scorers, scales, threshold)


def _scorer(
    method: str, network: nn.Module, tensors: dict[str, torch.Tensor], member_block: Any, source: Path
) -> FeatureDensity | MaxProbability:
    """One network's outlier score of `method`: its density (from its tensors), or its max probability (with an
    ensemble member's own confidence map, where its block has one)."""
    if method == MAX_PROBABILITY:
        confidence_map = member_block.get("confidence_map") if isinstance(member_block, dict) else None
        return MaxProbability(ConfidenceMap.from_dict(confidence_map, source) if confidence_map is not None else None)
    if not tensors:
        raise MnistlabError(f"{source}: 'outliers' is described but the weights hold no outlier density for it")
    return _density(tensors, network.network[head_index(network.network)].in_features, source)


def outlier_method(block: Any, source: Path | str, known: tuple[str, ...] = METHODS) -> str:
    """The method of an `outliers` block, checked: one mnistlab knows (no method: the feature density, as every
    file had before the method was recorded)."""
    method = block.get("method", DENSITY) if isinstance(block, dict) else DENSITY
    if method not in known:
        raise MnistlabError(f"{source}: unknown outlier method {method!r} (this mnistlab knows {', '.join(known)})")
    return method


def _density(tensors: dict[str, torch.Tensor], features: int, source: Path) -> FeatureDensity:
    """The outlier density of a network with `features` penultimate features, from its tensors, checked."""
    means, basis = tensors.get("means"), tensors.get("basis")
    variances, residual = tensors.get("variances"), tensors.get("residual")
    if (
        set(tensors) != {"means", "basis", "variances", "residual"}
        or means.dim() != 2
        or means.shape[1] != features
        or basis.dim() != 2
        or basis.shape[0] != features
        or tuple(variances.shape) != (basis.shape[1],)
        or residual.numel() != 1
    ):
        raise MnistlabError(f"{source}: the outlier density does not fit the network ({features} features)")
    if not all(torch.isfinite(t).all() for t in (means, basis, variances, residual)):
        raise MnistlabError(f"{source}: the outlier density is not finite (NaN or infinity)")
    if not (variances > 0).all() or not (residual > 0).all():
        raise MnistlabError(f"{source}: the outlier density's variances must be positive")
    return FeatureDensity(means, basis, variances, residual)


def _threshold(block: Any, source: Path | str, method: str = DENSITY) -> float:
    """The threshold of an `outliers` block, checked: a positive finite number, at most 1 for max-probability
    (a score of 1 - a probability)."""
    value = block.get("threshold") if isinstance(block, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise MnistlabError(f"{source}: the outlier threshold must be a positive finite number, got {value!r}")
    if method == MAX_PROBABILITY and value > 1:
        raise MnistlabError(f"{source}: a max-probability outlier threshold must be in (0, 1], got {value!r}")
    return float(value)


def _temperature(calibration: Any, source: Path | str) -> float | None:
    """The temperature of a model description's `calibration` (None: none), checked: a positive finite number."""
    if calibration is None:
        return None
    value = calibration.get("temperature") if isinstance(calibration, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise MnistlabError(f"{source}: the calibration temperature must be a positive finite number, got {value!r}")
    return float(value)


def bundled_model_path() -> Path:
    """The pretrained model shipped inside the package."""
    path = Path(str(resources.files("mnistlab") / "pretrained" / "model.safetensors"))
    if not path.is_file():
        raise MnistlabError("no bundled pretrained model in this installation; give a model (run directory or file)")
    return path
