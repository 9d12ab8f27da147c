"""A training run in progress as one safetensors file (weights, optimizer, RNG states, metrics): resumes exactly."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from mnistlab.errors import MnistlabError
from mnistlab.files import to_json
from mnistlab.models.files import check_safetensors, write_safetensors

CHECKPOINT = "checkpoint.safetensors"
_CHECKPOINT_FORMAT = "mnistlab-checkpoint"


@dataclass
class Checkpoint:
    """A run in progress as one file: its tensors in groups, and its JSON-able state in the safetensors header.

    One file means a crash can never pair new weights with an old state. The groups are stored under the
    prefixes `model.`, `optim.`, `rng.`, `ema.` and `best.`; this class is the only place that knows them
    (training's `RunState` turns itself into one and back).
    """

    model: dict[str, torch.Tensor]  # the live weights
    optimizer: dict[str, torch.Tensor]  # the optimizer's per-parameter tensors, as `optimizers.optimizer_tensors`
    rng: dict[str, torch.Tensor]  # random generator states by name
    state: dict[str, Any]  # epochs so far, their metrics, the config, optimizer and schedule settings ...
    ema: dict[str, torch.Tensor] = field(default_factory=dict)  # the averaged weights, when EMA is on
    best: dict[str, torch.Tensor] = field(default_factory=dict)  # the best epoch's weights, with early stopping

    _GROUPS = (("model", "model."), ("optimizer", "optim."), ("rng", "rng."), ("ema", "ema."), ("best", "best."))

    def save(self, path: Path) -> None:
        """Write the checkpoint, replacing `path` atomically."""
        tensors = {prefix + k: v for name, prefix in self._GROUPS for k, v in getattr(self, name).items()}
        write_safetensors(path, tensors, {"format": _CHECKPOINT_FORMAT, "state": to_json(self.state)})

    @classmethod
    def load(cls, path: Path) -> Checkpoint:
        """Read a checkpoint written by `save`; anything else is a one-line error."""
        if not path.is_file():
            raise MnistlabError(f"{path.parent}: no {path.name}, so there is nothing to resume (incomplete run?)")
        check_safetensors(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
            if metadata.get("format") != _CHECKPOINT_FORMAT:
                raise KeyError("format")
            state = json.loads(metadata["state"])
            if not isinstance(state, dict) or not isinstance(state.get("epoch"), int):
                raise KeyError("state")
        except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as exc:
            raise MnistlabError(f"{path}: not a valid mnistlab checkpoint ({exc})") from None
        groups: dict[str, dict[str, torch.Tensor]] = {name: {} for name, _ in cls._GROUPS}
        for key, value in tensors.items():
            name = next((n for n, prefix in cls._GROUPS if key.startswith(prefix)), None)
            if name is None:
                raise MnistlabError(f"{path}: not a valid mnistlab checkpoint (unknown tensor {key!r})")
            groups[name][key.split(".", 1)[1]] = value
        return cls(state=state, **groups)
