"""Model files: weights in safetensors beside a small JSON of architecture and metadata. Never pickle.

A model is `<stem>.safetensors` plus `<stem>.json`; a run directory holds `model.safetensors` and `model.json`.
Loading checks the JSON against the weights (names and shapes) before anything runs, and refuses pickles
(`torch.save` files) outright: unpickling a file someone hands you can run arbitrary code.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from mnistlab.config import ModelConfig, config_from_dict
from mnistlab.errors import MnistlabError
from mnistlab.models import build_model

FORMAT = "mnistlab-model"
FORMAT_VERSION = 1


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


@dataclass
class LoadedModel:
    """A model ready for inference, with what it needs to see images the way it was trained."""

    model: nn.Module
    model_config: ModelConfig
    normalize: tuple[float, float] | None
    metadata: dict[str, Any]
    path: Path


def save_model(
    model: nn.Module,
    model_config: ModelConfig,
    folder: Path,
    normalize: tuple[float, float] | None,
    metadata: dict[str, Any],
    stem: str = "model",
) -> Path:
    """Write `<stem>.safetensors` and `<stem>.json` into `folder`; returns the safetensors path."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / f"{stem}.safetensors"
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{weights.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": FORMAT})
        os.replace(tmp, weights)
    finally:
        Path(tmp).unlink(missing_ok=True)
    write_json(
        folder / f"{stem}.json",
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": {f.name: getattr(model_config, f.name) for f in fields(model_config)},
            "normalize": list(normalize) if normalize else None,
            "metadata": metadata,
        },
    )
    return weights


def model_paths(path: str | Path) -> tuple[Path, Path]:
    """(weights, json) for a run directory, a `.safetensors` file or a `.json` file."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    weights, meta = path.with_suffix(".safetensors"), path.with_suffix(".json")
    if not path.exists():
        raise MnistlabError(f"{path}: no such model file or run directory")
    for p in (weights, meta):
        if not p.is_file():
            raise MnistlabError(f"{p}: missing (a model is a .safetensors file with a .json beside it)")
    return weights, meta


def _refuse_pickle(path: Path) -> None:
    head = path.open("rb").read(8)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise MnistlabError(
            f"{path}: this is a pickle / torch.save file; mnistlab only opens safetensors model files, "
            "because unpickling can run arbitrary code"
        )


def load_model(path: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Load a model from a run directory or model file, checking architecture against the weights."""
    weights, meta_path = model_paths(path)
    _refuse_pickle(weights)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MnistlabError(f"{meta_path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise MnistlabError(f"{meta_path}: not an mnistlab model description")
    model_config = config_from_dict({"model": meta.get("model", {})}, source=str(meta_path)).model
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise MnistlabError(f"{weights}: not a valid safetensors file ({exc})") from None
    model = build_model(model_config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        diff = sorted(set(expected.items()) ^ set(found.items()))[:3]
        raise MnistlabError(
            f"{weights}: weights do not match the architecture in {meta_path.name} (first differences: {diff})"
        )
    model.load_state_dict(state)
    model.to(device).eval()
    normalize = tuple(meta["normalize"]) if meta.get("normalize") else None
    return LoadedModel(model, model_config, normalize, meta.get("metadata", {}), weights)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- checkpoints

CHECKPOINT = "checkpoint.safetensors"


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """One file holding tensors and a JSON state (in the safetensors header), replaced atomically.

    Keeping both in one file means a crash can never pair new weights with an old state.
    """
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "mnistlab-checkpoint", "state": json.dumps(state)})
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, state) from a checkpoint written by `save_checkpoint`."""
    if not path.is_file():
        raise MnistlabError(f"{path.parent}: no {path.name}, so there is nothing to resume (incomplete run?)")
    _refuse_pickle(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        state = json.loads(metadata["state"])
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as exc:
        raise MnistlabError(f"{path}: not a valid mnistlab checkpoint ({exc})") from None
    return tensors, state
