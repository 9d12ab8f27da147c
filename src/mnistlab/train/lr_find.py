"""The learning-rate range test (Smith 2015, 2017; fastai's `lr_find`): which learning rate should a config use?

A fresh copy of the config's network is trained on its own training split, batch size, augmentation, loss and
optimizer while the learning rate rises exponentially, one batch at a time, from `start` to `end`. The loss
falls where the rate is large enough to learn and blows up where it is too large; the suggestion is read off the
smoothed loss (an exponential moving average with bias correction, as fastai smooths it) between the two. The
test ends after `max_batches` batches or one epoch, whichever is fewer, or as soon as the smoothed loss passes
4x its minimum or stops being a number. Nothing is kept: the network is thrown away and no run directory is made.

The batches go through the training loop's own step (`loop.train_epoch` with the run's `Steps`): the same
gradients (the hand-derived ones for the report's MLPs, autograd otherwise), the same fused optimizer step.
Only the rate is set here, before each batch's step, and each batch's loss read; the config's own schedule and
weight average are set aside, since the test is about the constant rate (or OneCycle's peak) to train with.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mnistlab import devices
from mnistlab.config import Config
from mnistlab.data.splits import MnistData, load_data
from mnistlab.errors import MnistlabError
from mnistlab.subnormals import flush_subnormals
from mnistlab.train.loop import Steps, train_epoch
from mnistlab.train.state import RunState

# At most this many batches: 100 (fastai's default) leaves about 12 batches per decade of rate between 1e-7 and
# 10, fewer than the ~50 batches the smoothing averages over, so the smoothed curve lags the loss by several
# decades; 300 gives the curve time to follow, and still takes seconds for the report's networks (a third of a
# seed-A epoch: docs/training.md, "Finding a learning rate").
MAX_BATCHES = 300
SMOOTHING = 0.98  # the moving average's weight of the past, as fastai's
DIVERGED = 4.0  # stop when the smoothed loss passes this multiple of its minimum
METHOD = "minimum/10"  # the rule `suggest` uses; "steepest" is measured beside it (docs/training.md)
METHODS = ("minimum/10", "steepest")

Progress = Callable[[int, int], None]  # (batches done, batches planned), after each batch


@dataclass
class LrFindResult:
    """One range test: the (rate, smoothed loss) of every batch, the suggested rate and the rule that chose it."""

    config: str
    start: float
    end: float
    planned: int  # batches the schedule spans
    points: list[tuple[float, float]]  # (learning rate, smoothed loss) per batch, all finite
    suggested_lr: float
    method: str  # "minimum/10" or "steepest"
    candidates: dict[str, float]  # what each rule of METHODS suggests, for comparison
    stopped_early: bool  # the loss blew up (passed 4x its minimum, or not finite) before the schedule ended
    stop_reason: str  # "diverged", "not finite" or "end of schedule"
    seconds: float  # the batches alone, not loading the data
    raw_losses: list[float] = field(default_factory=list)  # each batch's loss before smoothing

    @property
    def how(self) -> str:
        """How the suggestion was chosen, in words."""
        lrs, losses = zip(*self.points)
        low = losses.index(min(losses))
        if self.method == "steepest":
            return "where the smoothed loss falls fastest against the log of the rate"
        how = f"a tenth of the rate where the smoothed loss is lowest ({lrs[low]:.3g}, loss {losses[low]:.4f})"
        if low == len(lrs) - 1 and not self.stopped_early:
            how += "; the loss was still falling at the end of the range"
        return how

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON takes it (every number finite)."""
        return {
            "config": self.config,
            "suggested_lr": self.suggested_lr,
            "method": self.method,
            "how": self.how,
            "candidates": self.candidates,
            "start": self.start,
            "end": self.end,
            "planned_batches": self.planned,
            "batches": len(self.points),
            "stopped_early": self.stopped_early,
            "stop_reason": self.stop_reason,
            "seconds": self.seconds,
            "points": [[lr, loss] for lr, loss in self.points],
        }


def lr_schedule(start: float, end: float, steps: int) -> list[float]:
    """`steps` rates rising exponentially from `start` to `end` (both included): each the last times the same
    factor."""
    if steps < 2:
        raise MnistlabError(f"the range test needs at least 2 batches, not {steps}")
    ratio = math.log(end / start)
    rates = [start * math.exp(ratio * i / (steps - 1)) for i in range(steps)]
    rates[-1] = end  # exactly, whatever the rounding
    return rates


def check_range(start: float, end: float, max_batches: int, method: str = METHOD) -> None:
    """Refuse a test that cannot run or suggest, naming the setting."""
    if method not in METHODS:
        raise MnistlabError(f"unknown rule {method!r} for the suggestion (choose from {', '.join(METHODS)})")
    if not (math.isfinite(start) and math.isfinite(end)):
        raise MnistlabError(f"--start and --end must be finite numbers (got {start!r} and {end!r})")
    if start <= 0:
        raise MnistlabError(f"--start must be a positive learning rate (got {start:g}); the rates rise exponentially")
    if start >= end:
        raise MnistlabError(f"--start ({start:g}) must be below --end ({end:g})")
    if method == "minimum/10" and end < 10 * start:
        raise MnistlabError(
            f"--start {start:g} to --end {end:g} spans less than a decade: the suggestion, a tenth of a rate in the "
            "range, would fall outside it (widen the range)"
        )
    if max_batches < 2:
        raise MnistlabError(f"--max-batches must be at least 2 (got {max_batches})")


def find_lr(
    config: Config,
    *,
    data: MnistData | None = None,
    data_dir: str | Path | None = None,
    device: str = "auto",
    start: float = 1e-7,
    end: float = 10.0,
    max_batches: int = MAX_BATCHES,
    method: str = METHOD,
    progress: Progress | None = None,
) -> LrFindResult:
    """Run the range test on `config` (its training split from `data`, or loaded from `data_dir`) and suggest a
    learning rate by `method` ("minimum/10" or "steepest"). Nothing is written; the network is not kept."""
    check_range(start, end, max_batches, method)
    dev = devices.resolve_device(device)
    if data is None:
        data = load_data(config.data.dataset, data_dir, config.data.val_size, config.training.seed, dev)
    data = data.to(dev)
    batch_size = config.training.batch_size
    steps_per_epoch = (len(data.train) + batch_size - 1) // batch_size
    if steps_per_epoch < 2:
        raise MnistlabError(
            f"{config.name}: the training split ({len(data.train)} images) makes {steps_per_epoch} batch of "
            f"{batch_size}; the range test needs at least 2 (lower training.batch_size)"
        )
    rates = lr_schedule(start, end, min(max_batches, steps_per_epoch))
    state = RunState(config, dev, steps_per_epoch)
    state.scheduler = None  # the test sets the rate itself, batch by batch
    state.ema = None  # nothing is evaluated, so no average is needed
    steps = Steps.for_state(state, data)
    recorder = _Recorder(rates, state.optimizer, steps.gradients, progress)
    steps.gradients = recorder
    flush_subnormals(True)  # as the training loop does (Adam's moments reach them)
    began = time.perf_counter()
    try:
        train_epoch(state, steps, data, _NoBar())
    except _Stop:
        pass
    finally:
        flush_subnormals(False)
    seconds = time.perf_counter() - began
    points = list(zip(rates, recorder.smoothed))
    if len(points) < 2:
        raise MnistlabError(
            f"the loss of {config.name} stopped being a number within {len(points) + 1} batches, from lr "
            f"{start:g}: nothing to suggest from (lower --start)"
        )
    candidates = {name: suggest(points, name) for name in METHODS}
    if candidates["minimum/10"] < start:
        lowest = min(points, key=lambda point: point[1])[0]
        raise MnistlabError(
            f"{config.name}: the smoothed loss was lowest at lr {lowest:.3g}, less than a decade above --start "
            f"{start:g}: the rates of the test only made it worse; run it again from a lower --start"
        )
    return LrFindResult(
        config=config.name,
        start=start,
        end=end,
        planned=len(rates),
        points=points,
        suggested_lr=candidates[method],
        method=method,
        candidates=candidates,
        stopped_early=recorder.stop_reason != "end of schedule",
        stop_reason=recorder.stop_reason,
        seconds=seconds,
        raw_losses=recorder.raw,
    )


def suggest(points: list[tuple[float, float]], method: str = METHOD) -> float:
    """The suggested rate from (rate, smoothed loss) points: "minimum/10", a tenth of the rate at the lowest
    smoothed loss (fastai's `minimum`), or "steepest", the rate where the smoothed loss falls fastest per decade
    (fastai's `steep`, Smith's choice), over the points fastai looks at (the first tenth and the last five,
    where the average is still settling or the loss blows up, left out when enough points remain)."""
    lrs = [lr for lr, _ in points]
    losses = [loss for _, loss in points]
    if method == "minimum/10":
        return lrs[losses.index(min(losses))] / 10
    first, last = len(points) // 10, len(points) - 5
    if last - first < 2:
        first, last = 0, len(points)
    slopes = [(losses[i + 1] - losses[i]) / math.log(lrs[i + 1] / lrs[i]) for i in range(first, last - 1)]
    return lrs[first + slopes.index(min(slopes))]


class _Stop(Exception):
    """Ends the pass over the training split: the schedule is done or the loss blew up."""


class _NoBar:
    """What `train_epoch` updates after each batch; progress is reported by `_Recorder` instead."""

    def update(self) -> None:
        pass


class _Recorder:
    """The run's gradient function, wrapped: sets each batch's rate before its step, reads its loss, smooths it,
    and stops the pass when the schedule ends or the loss blows up."""

    def __init__(self, rates: list[float], optimizer: torch.optim.Optimizer, gradients, progress: Progress | None):
        self.rates, self.optimizer, self.gradients, self.progress = rates, optimizer, gradients, progress
        self.raw: list[float] = []
        self.smoothed: list[float] = []
        self.average, self.lowest = 0.0, math.inf
        self.stop_reason = "end of schedule"

    def __call__(self, x: torch.Tensor, y: torch.Tensor, local: int, total: int) -> tuple[torch.Tensor, torch.Tensor]:
        done = len(self.smoothed)
        if done == len(self.rates):
            raise _Stop
        for group in self.optimizer.param_groups:
            group["lr"] = self.rates[done]
        loss, out = self.gradients(x, y, local, total)
        value = loss.item()  # one sync per batch: the test must see each loss to know when to stop
        self.average = SMOOTHING * self.average + (1 - SMOOTHING) * value
        smoothed = self.average / (1 - SMOOTHING ** (done + 1))  # bias correction: the average starts at 0
        if not math.isfinite(smoothed):
            self.stop_reason = "not finite"
            raise _Stop
        self.raw.append(value)
        self.smoothed.append(smoothed)
        self.lowest = min(self.lowest, smoothed)
        if self.progress is not None:
            self.progress(done + 1, len(self.rates))
        if smoothed > DIVERGED * self.lowest:
            self.stop_reason = "diverged"
            raise _Stop
        return loss, out
