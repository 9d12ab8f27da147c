"""What changes as a run trains (weights, optimizer, RNG states, best epoch, averaged weights), as one object that
becomes a checkpoint and back."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mnistlab.config import Config
from mnistlab.models.networks import build_model
from mnistlab.models.optimizers import make_optimizer, make_scheduler, optimizer_tensors, restore_optimizer
from mnistlab.train import distributed
from mnistlab.train.checkpoint import Checkpoint


@dataclass
class Run:
    """What a training run produced: the model (the best epoch's with early stopping), per-epoch metrics,
    and where it was saved."""

    config: Config
    model: nn.Module
    epochs: list[dict[str, Any]] = field(default_factory=list)
    run_dir: Path | None = None
    best_epoch: int | None = None
    stop_reason: str = "epoch_limit"

    @property
    def final(self) -> dict[str, Any]:
        return self.epochs[-1]

    @property
    def best(self) -> dict[str, Any]:
        return self.epochs[(self.best_epoch or len(self.epochs)) - 1]

    @property
    def saved(self) -> dict[str, Any]:
        """The metrics of the epoch whose weights the run ends with (the best one with early stopping)."""
        return self.best if self.config.training.early_stopping else self.final


class Tracker:
    """Tracks the best epoch by the monitored validation metric (lower loss or higher accuracy)."""

    def __init__(self, monitor: str, min_delta: float, state: dict[str, Any] | None = None):
        self.monitor, self.min_delta = monitor, min_delta
        self.sign = -1.0 if monitor.endswith("loss") else 1.0
        state = state or {}
        self.best_value: float | None = state.get("best_value")
        self.best_epoch: int | None = state.get("best_epoch")
        self.bad_epochs: int = state.get("bad_epochs", 0)

    def update(self, epoch: int, record: dict[str, Any]) -> bool:
        """Whether `record` improves on the best so far (and becomes the best)."""
        value = record.get(self.monitor)
        if value is None:
            return False
        if self.best_value is None or self.sign * (value - self.best_value) > self.min_delta:
            self.best_value, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    def state(self) -> dict[str, Any]:
        return {"best_value": self.best_value, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}


class Ema:
    """An exponential moving average of a model's weights, updated after every optimizer step.

    The decay ramps up from about 0.1 over the first steps ((1 + n) / (10 + n)), so early weights do not
    linger. BatchNorm statistics are copied from the live model rather than averaged.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.steps = decay, 0
        self._live = model
        self._params = list(model.parameters())
        self._averaged = list(self.model.parameters())

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        torch._foreach_lerp_(self._averaged, self._params, 1 - decay)

    @torch.no_grad()
    def copy_buffers(self) -> None:
        for averaged, live in zip(self.model.buffers(), self._live.buffers()):
            averaged.copy_(live)


class RunState:
    """Everything about a run in progress that changes as it trains, and so goes into its checkpoint: the
    model, optimizer, schedule, weight average, random generators, best-epoch tracker and per-epoch metrics."""

    def __init__(
        self,
        config: Config,
        device: torch.device,
        steps_per_epoch: int,
        cluster: distributed.Cluster = distributed.SINGLE,
    ):
        t = config.training
        self.config, self.device, self.cluster = config, device, cluster
        torch.manual_seed(t.seed)  # model initialisation: the same weights on every rank
        self.model = build_model(config.model).to(device)
        if t.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if cluster.active:
            torch.manual_seed(t.seed + 1_000_003 * cluster.rank)  # each rank its own dropout masks
            if device.type == "cuda":
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.optimizer = make_optimizer(self.model.parameters(), config.optimizer, device)
        self.scheduler = make_scheduler(self.optimizer, t, steps_per_epoch)
        self.ema = Ema(self.model, t.ema_decay) if t.ema_decay else None
        self.shuffle = torch.Generator().manual_seed(t.seed)  # batch order
        self.warp = torch.Generator(device=device).manual_seed(t.seed + 1)  # augmentation
        self.tracker = Tracker(t.monitor, t.min_delta)
        self.epochs: list[dict[str, Any]] = []
        self.best_weights: dict[str, torch.Tensor] = {}
        self.stop_reason = "epoch_limit"

    @property
    def evaluated(self) -> nn.Module:
        """The network that is evaluated, selected and saved: the weight average when there is one."""
        return self.ema.model if self.ema else self.model

    @property
    def epoch(self) -> int:
        """Epochs finished so far."""
        return len(self.epochs)

    def end_epoch(self, record: dict[str, Any]) -> bool:
        """Record an epoch's metrics, keep the best weights for early stopping; True when training should stop."""
        t = self.config.training
        self.epochs.append(record)
        if self.tracker.update(record["epoch"], record) and t.early_stopping:
            self.best_weights = {k: v.detach().clone() for k, v in self.evaluated.state_dict().items()}
        stop = bool(t.early_stopping) and self.tracker.bad_epochs >= t.early_stopping
        self.stop_reason = "early_stopping" if stop else "epoch_limit"
        return stop

    def finish(self) -> Run:
        """The run's result, ending on the best epoch's weights where early stopping is on."""
        if self.config.training.early_stopping and self.best_weights:
            self.evaluated.load_state_dict(self.best_weights)
        return Run(self.config, self.evaluated, self.epochs, None, self.tracker.best_epoch, self.stop_reason)

    def rank_rng(self) -> dict[str, torch.Tensor]:
        """This process's own generator states (dropout's, CUDA's): each rank of a distributed run has its own."""
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def to_checkpoint(self, ranks_rng: list[dict[str, torch.Tensor]] | None = None) -> Checkpoint:
        """The checkpoint of this state; `ranks_rng` are every rank's `rank_rng()` (rank 0's alone by default)."""
        optimizer, optimizer_state = optimizer_tensors(self.optimizer)
        ranks_rng = ranks_rng or [self.rank_rng()]
        rng = {"shuffle": self.shuffle.get_state(), "warp": self.warp.get_state(), **ranks_rng[0]}
        for rank, states in enumerate(ranks_rng[1:], start=1):
            rng.update({f"{name}.{rank}": value for name, value in states.items()})
        return Checkpoint(
            model=self.model.state_dict(),
            optimizer=optimizer,
            rng=rng,
            ema=self.ema.model.state_dict() if self.ema else {},
            best=self.best_weights,
            state={
                "epoch": self.epoch,
                "epochs": self.epochs,
                "config": self.config.to_dict(),
                "optimizer": optimizer_state,
                "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                "tracker": self.tracker.state(),
                "stop_reason": self.stop_reason,
                "ema_steps": self.ema.steps if self.ema else 0,
                "world_size": self.cluster.world_size,
            },
        )

    @classmethod
    def from_checkpoint(
        cls,
        config: Config,
        device: torch.device,
        steps_per_epoch: int,
        checkpoint: Checkpoint,
        cluster: distributed.Cluster = distributed.SINGLE,
    ) -> RunState:
        """The state a checkpoint holds, for `config` (its own, or the same with more epochs). A rank whose own
        generator states are not in it (resumed with more ranks than it was saved with) keeps fresh ones."""
        self = cls(config, device, steps_per_epoch, cluster)
        state = checkpoint.state
        self.model.load_state_dict(checkpoint.model)
        restore_optimizer(self.optimizer, checkpoint.optimizer, state["optimizer"])
        if self.scheduler:
            self.scheduler.load_state_dict(state["scheduler"])
        suffix = f".{cluster.rank}" if cluster.rank else ""
        if "torch" + suffix in checkpoint.rng:
            torch.set_rng_state(checkpoint.rng["torch" + suffix])
        self.shuffle.set_state(checkpoint.rng["shuffle"])
        self.warp.set_state(checkpoint.rng["warp"])
        if device.type == "cuda" and "cuda" + suffix in checkpoint.rng:
            torch.cuda.set_rng_state(checkpoint.rng["cuda" + suffix], device)
        if self.ema:
            self.ema.model.load_state_dict(checkpoint.ema)
            self.ema.steps = state["ema_steps"]
        self.best_weights = {k: v.to(device) for k, v in checkpoint.best.items()}
        self.tracker = Tracker(config.training.monitor, config.training.min_delta, state["tracker"])
        self.epochs = state["epochs"]
        self.stop_reason = state["stop_reason"]
        return self
