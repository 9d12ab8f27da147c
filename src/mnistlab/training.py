"""The training loop: one config in, one run directory out.

Per epoch: shuffle by a seeded permutation, take batches by indexing the in-memory uint8 tensor, convert each
batch to float at once, step. Running loss and accuracy stay on the device and are read once per epoch, so
the loop never waits on a per-batch `.item()`. After every epoch a checkpoint (weights, optimizer, schedule,
RNG states, metrics) replaces the previous one atomically, so a run can be resumed exactly where it stopped.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from mnistlab import devices
from mnistlab.attacks import make_adversary
from mnistlab.augment import augment_batch, is_active
from mnistlab.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint, save_model
from mnistlab.config import Config, load_config
from mnistlab.data import DATASETS, MnistData, batches, load_data, standardize_, to_float
from mnistlab.errors import MnistlabError
from mnistlab.evaluation import loss_and_accuracy
from mnistlab.files import atomic_write_text, check_output_dir, clear_dir, write_json
from mnistlab.gradients import make_gradient_fn
from mnistlab.losses import make_loss
from mnistlab.models import build_model, count_parameters
from mnistlab.optimizers import make_optimizer, make_scheduler, make_step, optimizer_tensors, restore_optimizer
from mnistlab.plots import plot_curves
from mnistlab.subnormals import flush_subnormals


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


class _Improvement:
    """Tracks the best epoch by the monitored validation metric (lower loss or higher accuracy)."""

    def __init__(self, monitor: str, min_delta: float, state: dict | None = None):
        self.monitor, self.min_delta = monitor, min_delta
        self.sign = -1.0 if monitor.endswith("loss") else 1.0
        state = state or {}
        self.best_value: float | None = state.get("best_value")
        self.best_epoch: int | None = state.get("best_epoch")
        self.bad_epochs: int = state.get("bad_epochs", 0)

    def update(self, epoch: int, record: dict[str, Any]) -> bool:
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


def train(
    config: Config,
    out_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    device: str = "auto",
    quiet: bool = False,
    force: bool = False,
    data: MnistData | None = None,
    tensorboard: bool = False,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> Run:
    """Train `config`; with `out_dir`, write the run directory (and a checkpoint after every epoch) there.

    `data` lets callers that train several configs load the dataset once; `on_epoch_end` gets each epoch's
    metrics (raising KeyboardInterrupt from it stops the run as Ctrl-C would).
    """
    run_dir = check_output_dir(out_dir, force) if out_dir is not None else None
    return _fit(config, run_dir, None, data_dir, device, quiet, data, tensorboard, on_epoch_end)


def resume(
    run_dir: str | Path,
    epochs: int | None = None,
    data_dir: str | Path | None = None,
    device: str = "auto",
    quiet: bool = False,
    config: Config | None = None,
    tensorboard: bool = False,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
    data: MnistData | None = None,
) -> Run:
    """Continue the run in `run_dir` from its last checkpoint, to `epochs` in total when given.

    On the CPU the result is identical, epoch by epoch, to a run that was never interrupted. `data`, as for
    `train`, must then be the data the run started with.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MnistlabError(f"{run_dir}: no such run directory to resume")
    if not (run_dir / "config.toml").is_file():
        raise MnistlabError(f"{run_dir}: no config.toml, so this is not a run directory (or it is incomplete)")
    saved = load_config(run_dir / "config.toml")
    if config is not None and config.with_overrides({"training.epochs": saved.training.epochs}) != saved:
        raise MnistlabError(f"{run_dir} was trained with a different config ({saved.name}); resume it without --config")
    tensors, state = load_checkpoint(run_dir / CHECKPOINT)
    if epochs is not None and epochs != saved.training.epochs:
        if saved.training.scheduler in ("cosine", "onecycle"):
            raise MnistlabError(
                f"{run_dir} uses the {saved.training.scheduler} schedule, which is laid out for "
                f"{saved.training.epochs} epochs; it cannot be resumed with --epochs {epochs}"
            )
        saved = saved.with_overrides({"training.epochs": epochs})
    if state["epoch"] >= saved.training.epochs or state.get("stop_reason") == "early_stopping":
        raise MnistlabError(
            f"{run_dir} is already complete ({state['epoch']} epochs, stopped by {state.get('stop_reason')}); "
            "give a larger --epochs to train further"
        )
    return _fit(saved, run_dir, (tensors, state), data_dir, device, quiet, data, tensorboard, on_epoch_end)


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


class _Ema:
    """An exponential moving average of a model's weights, updated after every optimizer step.

    The decay ramps up from about 0.1 over the first steps ((1 + n) / (10 + n)), so early weights do not
    linger. BatchNorm statistics are copied from the live model rather than averaged.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.steps = decay, 0
        self._live = model
        self._params = [p for p in model.parameters()]
        self._averaged = [p for p in self.model.parameters()]

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        torch._foreach_lerp_(self._averaged, self._params, 1 - decay)

    @torch.no_grad()
    def copy_buffers(self) -> None:
        for averaged, live in zip(self.model.buffers(), self._live.buffers()):
            averaged.copy_(live)


def _fit(
    config: Config,
    run_dir: Path | None,
    checkpoint: tuple[dict[str, torch.Tensor], dict[str, Any]] | None,
    data_dir: str | Path | None,
    device: str,
    quiet: bool,
    data: MnistData | None,
    tensorboard: bool,
    on_epoch_end: Callable[[dict[str, Any]], None] | None,
) -> Run:
    dev = devices.resolve_device(device)
    t = config.training
    if data is None:
        data = load_data(config.data.dataset, data_dir, config.data.val_size, t.seed, dev)
    data = data.to(dev)
    if run_dir is not None and checkpoint is None:
        clear_dir(run_dir)  # only now: a failed start leaves no half-made run directory
        atomic_write_text(run_dir / "config.toml", config.to_toml())  # first, so an interrupted run can resume
    normalize = (data.mean, data.std) if config.data.normalize else None
    steps = (len(data.train) + t.batch_size - 1) // t.batch_size

    torch.manual_seed(t.seed)  # model initialisation
    model = build_model(config.model).to(dev)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model.parameters(), config.optimizer)
    scheduler = make_scheduler(optimizer, t, steps)
    loss_fn = make_loss(t.loss, config.model.softmax_output, t.label_smoothing)
    shuffle = torch.Generator().manual_seed(t.seed)
    augmenting = is_active(config.augment)
    warp = torch.Generator(device=dev).manual_seed(t.seed + 1)
    ema = _Ema(model, t.ema_decay) if t.ema_decay else None
    evaluated = ema.model if ema else model  # what is evaluated, selected and saved
    autocast = devices.autocast(dev, t.amp)
    tracker = _Improvement(t.monitor, t.min_delta)
    run = Run(config, evaluated, run_dir=run_dir)
    best_weights: dict[str, torch.Tensor] | None = None
    if checkpoint is not None:
        tensors, state = checkpoint
        model.load_state_dict(_prefixed(tensors, "model."))
        restore_optimizer(optimizer, tensors, state["optimizer"])
        if scheduler:
            scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(tensors["rng.torch"])
        shuffle.set_state(tensors["rng.shuffle"])
        warp.set_state(tensors["rng.warp"])
        if dev.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], dev)
        if ema:
            ema.model.load_state_dict(_prefixed(tensors, "ema."))
            ema.steps = state["ema_steps"]
        best_weights = {k: v.to(dev) for k, v in _prefixed(tensors, "best.").items()} or None
        tracker = _Improvement(t.monitor, t.min_delta, state["tracker"])
        run.epochs = state["epochs"]

    gradients = make_gradient_fn(model, config, loss_fn, autocast)
    step = make_step(optimizer)
    log = _Logger(quiet)
    writer = _tensorboard_writer(run_dir) if tensorboard else None
    # Subnormal floats are slow on x86 CPUs, and Adam's moments reach them within an epoch: flushing them to
    # zero keeps every epoch as fast as the first, with the same accuracy (docs/benchmarks.md).
    flush_subnormals(True)
    start_epoch = len(run.epochs) + 1
    # Adversarial training ([adversarial] in the config; None when off): see attacks.FastAdversary.
    adversary = make_adversary(config.adversarial, model, normalize, config.model.softmax_output, steps, start_epoch)
    log.line(
        f"{'resuming' if checkpoint else 'training'} {config.name} on {data.name} ({len(data.train)} train, "
        f"{len(data.val) if data.val else 0} val, {len(data.test)} test) on {dev}, "
        f"{count_parameters(model):,} parameters" + (f", from epoch {start_epoch}" if checkpoint else "")
    )
    try:
        for epoch in range(start_epoch, t.epochs + 1):
            start = time.perf_counter()
            model.train()
            loss_sum = torch.zeros((), device=dev)
            correct = torch.zeros((), dtype=torch.int64, device=dev)
            bar = log.bar(steps, f"epoch {epoch}/{t.epochs}")
            for batch in batches(data.train, t.batch_size, shuffle):
                x = to_float(batch.images)
                if augmenting:
                    x = augment_batch(x, config.augment, warp)
                if adversary is not None:  # adversarial training: the batch becomes attacks on the current model
                    x = adversary(x, batch.labels)
                loss, out = gradients(standardize_(x, normalize), batch.labels)
                step()
                if scheduler:
                    scheduler.step()
                if ema:
                    ema.update()
                loss_sum += loss * len(batch)
                correct += (out.argmax(1) == batch.labels).sum()
                bar.update()
            bar.close()
            if ema:
                ema.copy_buffers()
            train_seconds = time.perf_counter() - start
            record: dict[str, Any] = {
                "epoch": epoch,
                "train_loss": loss_sum.item() / len(data.train),
                "train_accuracy": correct.item() / len(data.train),
            }
            with autocast:
                if data.val is not None:
                    record["val_loss"], record["val_accuracy"] = loss_and_accuracy(
                        evaluated, data.val, loss_fn, normalize
                    )
                record["test_loss"], record["test_accuracy"] = loss_and_accuracy(
                    evaluated, data.test, loss_fn, normalize
                )
            if adversary is not None:  # PGD accuracy on the epoch's first batch: shows catastrophic overfitting
                record["train_pgd_accuracy"] = adversary.pgd_accuracy
            record["lr"] = optimizer.param_groups[0]["lr"]
            record["train_seconds"] = train_seconds
            record["seconds"] = time.perf_counter() - start
            run.epochs.append(record)
            if tracker.update(epoch, record) and t.early_stopping:
                best_weights = {k: v.detach().clone() for k, v in evaluated.state_dict().items()}
            stop = bool(t.early_stopping) and tracker.bad_epochs >= t.early_stopping
            run.stop_reason = "early_stopping" if stop else "epoch_limit"
            log.line(_epoch_line(record, t.epochs))
            if writer is not None:
                for key, value in record.items():
                    if key != "epoch":
                        writer.add_scalar(key.replace("_", "/", 1), value, epoch)
            if run_dir is not None:
                tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
                tensors.update({f"best.{k}": v for k, v in (best_weights or {}).items()})
                if ema:
                    tensors.update({f"ema.{k}": v for k, v in ema.model.state_dict().items()})
                opt_tensors, opt_state = optimizer_tensors(optimizer)
                tensors.update(opt_tensors)
                tensors["rng.torch"] = torch.get_rng_state()
                tensors["rng.shuffle"] = shuffle.get_state()
                tensors["rng.warp"] = warp.get_state()
                if dev.type == "cuda":
                    tensors["rng.cuda"] = torch.cuda.get_rng_state(dev)
                state = {
                    "epoch": epoch,
                    "epochs": run.epochs,
                    "optimizer": opt_state,
                    "scheduler": scheduler.state_dict() if scheduler else None,
                    "tracker": tracker.state(),
                    "stop_reason": run.stop_reason,
                    "ema_steps": ema.steps if ema else 0,
                }
                save_checkpoint(run_dir / CHECKPOINT, tensors, state)
                write_json(run_dir / "metrics.json", _metrics(run, tracker, dev))
            if on_epoch_end is not None:
                on_epoch_end(record)
            if stop:
                log.line(
                    f"early stopping: {t.monitor} has not improved for {t.early_stopping} epochs "
                    f"(best {tracker.best_value:.4f} at epoch {tracker.best_epoch})"
                )
                break
    except KeyboardInterrupt:
        if run_dir is not None and run.epochs:
            log.line(
                f"interrupted; {len(run.epochs)} epochs are saved. Resume with: mnistlab train --resume {run_dir}",
                force=True,
            )
        raise
    finally:
        flush_subnormals(False)  # PyTorch's default, for whatever the caller does next
        if writer is not None:
            writer.close()

    if t.early_stopping and best_weights is not None:
        evaluated.load_state_dict(best_weights)  # always end on the best epoch, however the run ended
    run.best_epoch = tracker.best_epoch
    if run_dir is not None:
        _write_run(run, run_dir, normalize, tracker, dev)
        log.line(f"wrote {run_dir}/ (model.safetensors, model.json, metrics.json, curves.png, config.toml)")
    return run


def _tensorboard_writer(run_dir: Path | None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise MnistlabError(
            "--tensorboard needs the tensorboard package: pip install 'mnistlab[tensorboard]'"
        ) from None
    if run_dir is None:
        raise MnistlabError("--tensorboard needs a run directory to write its logs into")
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def _metrics(run: Run, tracker: _Improvement, device: torch.device) -> dict[str, Any]:
    restored = bool(run.config.training.early_stopping)
    return {
        "config": run.config.name,
        "device": str(device),
        "torch": torch.__version__,
        "epochs": run.epochs,
        "final": run.epochs[-1] if run.epochs else None,
        "monitor": tracker.monitor,
        "best_epoch": tracker.best_epoch,
        "best_value": tracker.best_value,
        "stop_reason": run.stop_reason,
        "saved_model_epoch": tracker.best_epoch if restored else len(run.epochs),
    }


def _write_run(
    run: Run, run_dir: Path, normalize: tuple[float, float] | None, tracker: _Improvement, device: torch.device
) -> None:
    atomic_write_text(run_dir / "config.toml", run.config.to_toml())  # with the epochs it was resumed to
    saved = run.best if run.config.training.early_stopping else run.final
    save_model(
        run.model,
        run.config.model,
        run_dir,
        normalize,
        metadata={
            "config": run.config.name,
            "dataset": run.config.data.dataset,
            "classes": list(DATASETS[run.config.data.dataset].classes),
            "loss": run.config.training.loss,
            "label_smoothing": run.config.training.label_smoothing,
            "epoch": saved["epoch"],
            "test_accuracy": saved["test_accuracy"],
        },
    )
    write_json(run_dir / "metrics.json", _metrics(run, tracker, device))
    plot_curves(run.epochs, run_dir / "curves.png", f"{run.config.name}: {run.config.description}")


def _epoch_line(r: dict[str, Any], total: int) -> str:
    parts = [f"epoch {r['epoch']}/{total}", f"train loss {r['train_loss']:.4f} acc {100 * r['train_accuracy']:.2f}%"]
    if "val_loss" in r:
        parts.append(f"val loss {r['val_loss']:.4f} acc {100 * r['val_accuracy']:.2f}%")
    parts.append(f"test loss {r['test_loss']:.4f} acc {100 * r['test_accuracy']:.2f}%")
    parts.append(f"{r['seconds']:.1f}s")
    return " | ".join(parts)


class _Logger:
    """A progress bar per epoch on a terminal; one plain line per epoch otherwise (logs, CI, pipes)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.tty = sys.stderr.isatty()

    def line(self, text: str, force: bool = False) -> None:
        if force or not self.quiet:
            tqdm.write(text, file=sys.stderr)

    def bar(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, desc=desc, leave=False, disable=self.quiet or not self.tty, file=sys.stderr)
