"""The training loop: one config in, one run directory out.

A run is set up (the data on the device, a `RunState` holding everything that changes as it trains, a `Steps`
holding what does not), then each epoch is three named steps: `train_epoch` (a seeded permutation, batches by
indexing the in-memory uint8 tensor, whole-batch conversion and augmentation, one optimizer step per batch),
`evaluate_epoch` (validation and test loss and accuracy) and `RunDirectory.save_epoch` (one checkpoint,
replaced atomically, so a run resumes exactly where it stopped). Running loss and accuracy stay on the device
and are read once per epoch, so the loop never waits on a per-batch `.item()`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from mnistlab import devices
from mnistlab.config import Config, config_from_dict, load_config
from mnistlab.data.augment import augment_batch, is_active
from mnistlab.data.exposure import Exposure
from mnistlab.data.splits import MnistData, batch_indices, load_data, standardize_, take, to_float
from mnistlab.errors import MnistlabError, plural
from mnistlab.models.attacks import TrainingAttack, make_training_attack
from mnistlab.models.gradients import GradientFn, autograd_gradients, bypasses_autograd, make_gradient_fn
from mnistlab.models.losses import LossFn, log_probabilities_of, make_loss
from mnistlab.models.metrics import loss_and_correct
from mnistlab.models.networks import count_parameters
from mnistlab.models.optimizers import make_step
from mnistlab.progress import Progress
from mnistlab.subnormals import flush_subnormals
from mnistlab.train import distributed
from mnistlab.train.checkpoint import CHECKPOINT, Checkpoint
from mnistlab.train.run_dir import RunDirectory, epoch_line
from mnistlab.train.state import Run, RunState

FINISH_TIMEOUT_S = 600.0  # how long the other ranks wait for rank 0 to write the finished run

EpochCallback = Callable[[dict[str, Any]], None]
ProgressCallback = Callable[[dict[str, Any]], None]
# How often `on_progress` hears of the epoch under way, in training images: a few times a second for an MLP on a
# CPU, enough for a live curve; each report reads the running sums (one device sync), so not every batch.
PROGRESS_IMAGES = 512


def train(
    config: Config,
    *,
    out_dir: str | Path | None = None,
    data: MnistData | None = None,
    data_dir: str | Path | None = None,
    device: str = "auto",
    force: bool = False,
    quiet: bool = False,
    tensorboard: bool = False,
    on_epoch_end: EpochCallback | None = None,
    on_progress: ProgressCallback | None = None,
    resume_hint: bool = True,
) -> Run:
    """Train `config`; with `out_dir`, write the run directory (and a checkpoint after every epoch) there.

    `data` lets callers that train several configs load the dataset once; `on_epoch_end` gets each epoch's
    metrics (raising KeyboardInterrupt from it stops the run as Ctrl-C would); `on_progress` gets a "start"
    event, then a "progress" event about every PROGRESS_IMAGES training images (what `train --events` prints).
    Interrupted, the run says how to resume it, unless `resume_hint` is off (a sweep continues its trials its own
    way). Started by torchrun, each process trains its share of every batch (`mnistlab.distributed`) and rank 0
    writes the run directory.
    """
    if tensorboard and out_dir is None:
        raise MnistlabError("--tensorboard needs a run directory to write its logs into")
    cluster, dev = distributed.join(devices.resolve_device(device))
    outputs = None
    try:
        if out_dir is not None:
            outputs = _on_main(cluster, lambda: RunDirectory(out_dir, force=force, tensorboard=tensorboard))
        return _fit(
            config,
            outputs=outputs,
            checkpoint=None,
            data=data,
            data_dir=data_dir,
            device=dev,
            cluster=cluster,
            quiet=quiet,
            on_epoch_end=on_epoch_end,
            on_progress=on_progress,
            resume_hint=resume_hint,
        )
    except BaseException:
        if outputs is not None:  # stopped before _fit took the folder over (it closes it itself): unlock it
            outputs.close()
        raise
    finally:
        distributed.leave(cluster)


def resume(
    run_dir: str | Path,
    *,
    epochs: int | None = None,
    config: Config | None = None,
    data: MnistData | None = None,
    data_dir: str | Path | None = None,
    device: str = "auto",
    quiet: bool = False,
    tensorboard: bool = False,
    on_epoch_end: EpochCallback | None = None,
    on_progress: ProgressCallback | None = None,
) -> Run:
    """Continue the run in `run_dir` from its last checkpoint, to `epochs` in total when given.

    On the CPU the result is identical, epoch by epoch, to a run that was never interrupted. `data`, as for
    `train`, must then be the data the run started with. A run that early stopping ended trains on when given
    more epochs, with a fresh patience. Under torchrun, rank 0 reads the checkpoint and sends it to the others.
    """
    cluster, dev = distributed.join(devices.resolve_device(device))
    try:
        opened = _on_main(cluster, lambda: _open_for_resume(Path(run_dir), epochs, config, tensorboard))
        outputs = opened[0] if cluster.main else None
        checkpoint, saved = cluster.from_main(opened[1:] if cluster.main else None)
        return _fit(
            saved,
            outputs=outputs,
            checkpoint=checkpoint,
            data=data,
            data_dir=data_dir,
            device=dev,
            cluster=cluster,
            quiet=quiet,
            on_epoch_end=on_epoch_end,
            on_progress=on_progress,
        )
    finally:
        distributed.leave(cluster)


def _open_for_resume(
    run_dir: Path, epochs: int | None, config: Config | None, tensorboard: bool
) -> tuple[RunDirectory, Checkpoint, Config]:
    """The locked run directory, its checkpoint and the config to train on to, after every check."""
    if not run_dir.is_dir():
        raise MnistlabError(f"{run_dir}: no such run directory to resume")
    outputs = RunDirectory(run_dir, resuming=True, tensorboard=tensorboard)
    try:
        checkpoint = Checkpoint.load(run_dir / CHECKPOINT)
        saved = _checkpoint_config(checkpoint, run_dir)
        if config is not None and _differences(
            saved, config.with_overrides({"training.epochs": saved.training.epochs})
        ):
            raise MnistlabError(
                f"{run_dir} was trained with a different config ({saved.name}); resume it without --config"
            )
        done = checkpoint.state["epoch"]
        early_stopped = checkpoint.state.get("stop_reason") == "early_stopping"
        if epochs is not None and epochs != saved.training.epochs:
            if saved.training.scheduler in ("cosine", "onecycle"):
                raise MnistlabError(
                    f"{run_dir} uses the {saved.training.scheduler} schedule, which is laid out for "
                    f"{plural(saved.training.epochs, 'epoch')}; it cannot be resumed with --epochs {epochs}"
                )
            if epochs < done:
                raise MnistlabError(
                    f"{run_dir} has trained {plural(done, 'epoch')} already; --epochs {epochs} is fewer"
                )
            saved = saved.with_overrides({"training.epochs": epochs})
        train_on = done < saved.training.epochs and (not early_stopped or epochs is not None)
        if not train_on and (run_dir / "model.safetensors").is_file():
            how = "by early stopping" if early_stopped else f"after {plural(done, 'epoch')}"
            raise MnistlabError(
                f"{run_dir} is already complete (stopped {how}, {plural(done, 'epoch')} trained); "
                f"give --epochs with a total above {done} to train further"
            )
        if train_on and early_stopped:  # asked for more epochs after early stopping: train on, with a fresh patience
            checkpoint.state["stop_reason"] = "epoch_limit"
            checkpoint.state["tracker"]["bad_epochs"] = 0
    except BaseException:
        outputs.close()
        raise
    return outputs, checkpoint, saved


def _on_main(cluster: distributed.Cluster, make: Callable[[], Any]) -> Any:
    """`make()` on rank 0 only (what touches the run directory); its user error stops every rank."""
    result, error = None, None
    if cluster.main:
        try:
            result = make()
        except MnistlabError as exc:
            error = exc
    message = cluster.from_main(str(error) if error else None)
    if error is not None:
        raise error
    if message is not None:
        raise MnistlabError(f"rank {cluster.rank}: stopped with rank 0, which said: {message}")
    return result


def _checkpoint_config(checkpoint: Checkpoint, run_dir: Path) -> Config:
    """The config a checkpoint was trained with; config.toml, a copy for people to read, must still agree."""
    on_disk = load_config(run_dir / "config.toml") if (run_dir / "config.toml").is_file() else None
    stored = checkpoint.state.get("config")
    if stored is None:  # written by mnistlab 0.1, which kept the config in config.toml only
        if on_disk is None:
            raise MnistlabError(f"{run_dir}: no config.toml, so this is not a run directory (or it is incomplete)")
        return on_disk
    config = config_from_dict(stored, source=f"{run_dir / CHECKPOINT}")
    if on_disk is not None:
        ignore = {"training.epochs": config.training.epochs}
        edited = _differences(config, on_disk.with_overrides(ignore))
        if edited:
            raise MnistlabError(
                f"{run_dir}/config.toml was edited after training started ({', '.join(edited[:3])}); a run resumes "
                "with the settings it started with: undo the edit, or start a new run with the edited config"
            )
    return config


def _differences(a: Config, b: Config) -> list[str]:
    """`key: old -> new` for each config value that differs, as dotted keys."""
    flat_a, flat_b = a.flat(), b.flat()
    return [f"{k}: {flat_a[k]!r} -> {flat_b.get(k)!r}" for k in flat_a if flat_a[k] != flat_b.get(k)]


@dataclass
class Steps:
    """What stays fixed while a run trains: how a batch is prepared, its gradients computed, the step taken."""

    loss_fn: LossFn
    gradients: distributed.BatchGradients  # (x, labels, this rank's share, the batch) -> loss, outputs
    step: Callable[[], None]
    normalize: tuple[float, float] | None
    autocast: contextlib.AbstractContextManager
    augmenting: bool
    adversary: TrainingAttack | None  # adversarial training ([adversarial] in the config), else None
    exposure: Exposure | None  # typeset digits, stroke variations, non-digits (data/exposure.py), else None

    @classmethod
    def for_state(cls, state: RunState, data: MnistData, log: Progress | None = None) -> Steps:
        config, t = state.config, state.config.training
        loss_fn = make_loss(t.loss, config.model.softmax_output, t.label_smoothing)
        autocast = devices.autocast(state.device, t.amp)
        normalize = (data.mean, data.std) if config.data.normalize else None
        steps_per_epoch = (len(data.train) + t.batch_size - 1) // t.batch_size

        def gradient_fn(model: nn.Module) -> GradientFn:
            if t.outlier_exposure:  # through autograd: the hand-derived MLP gradients know the digits' loss only
                exposed = _with_exposure(loss_fn, t.outlier_exposure, config.model.softmax_output)
                return autograd_gradients(model, exposed, autocast)
            return make_gradient_fn(model, config, loss_fn, autocast)

        return cls(
            loss_fn=loss_fn,
            gradients=distributed.BatchGradients(
                state.cluster, state.model, gradient_fn, by_hand=bypasses_autograd(config) and not t.outlier_exposure
            ),
            step=make_step(state.optimizer),
            normalize=normalize,
            autocast=autocast,
            augmenting=is_active(config.augment),
            adversary=make_training_attack(
                config.adversarial,
                state.model,
                normalize,
                config.model.softmax_output,
                steps_per_epoch,
                state.epoch + 1,
            ),
            exposure=Exposure(config, len(data.train), state.device, log) if Exposure.wanted(config) else None,
        )


def _with_exposure(loss_fn: LossFn, weight: float, probabilities: bool) -> LossFn:
    """Outlier exposure's loss: `loss_fn` on the rows that have labels (the digits) plus `weight` times the
    cross-entropy to the uniform answer on the rows after them (the non-digits), i.e. their mean negative
    log-probability over the classes (Hendrycks et al. 2019)."""

    def loss(out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n = len(labels)
        return loss_fn(out[:n], labels) + weight * -log_probabilities_of(out[n:], probabilities).mean()

    return loss


def train_epoch(
    state: RunState, steps: Steps, data: MnistData, bar: tqdm, on_progress: ProgressCallback | None = None
) -> dict[str, float]:
    """One pass over the training split in a seeded random order; returns its mean loss and accuracy, and tells
    `on_progress` the running means about every PROGRESS_IMAGES images.

    In a distributed run each rank takes its share of every batch, and the shares' gradients are combined into
    the batch's before the step (`distributed.BatchGradients`), so every rank takes the step a single process would.
    """
    config, cluster = state.config, state.cluster
    state.model.train()
    sums = torch.zeros(2, dtype=torch.float64, device=state.device)  # loss, correct
    order = batch_indices(len(data.train), config.training.batch_size, state.shuffle, state.device)
    every = max(1, PROGRESS_IMAGES // config.training.batch_size) if on_progress is not None else 0
    seen = mine = 0  # images of the epoch so far: all ranks', this rank's
    for step, index in enumerate(order, 1):
        rows = cluster.share(len(index))
        batch = take(data.train, index[rows])
        x, labels = to_float(batch.images), batch.labels
        share = (rows.start, len(index))
        if steps.exposure is not None:  # typeset digits and non-digits join the batch (in one process: `_fit`)
            x, labels = steps.exposure(x, labels, state.warp)
            share = None
        if steps.augmenting:
            x = augment_batch(x, config.augment, state.warp, share)
        if steps.adversary is not None:  # adversarial training: attacks on the current model join or replace the batch
            x = steps.adversary(x, labels)
        loss, out = steps.gradients(standardize_(x, steps.normalize), labels, len(batch), len(index))
        steps.step()
        if state.scheduler:
            state.scheduler.step()
        if state.ema:
            state.ema.update()
        if len(out) > len(batch):  # the metrics are the training split's: its digits' loss, not the added rows'
            out = out[: len(batch)]
            with torch.no_grad():
                loss = steps.loss_fn(out, batch.labels)
        sums[0] += loss * len(batch)
        sums[1] += (out.argmax(1) == batch.labels).sum()
        bar.update()
        seen, mine = seen + len(index), mine + len(batch)
        if every and step % every == 0 and on_progress is not None:
            loss_sum, correct = sums.tolist()  # this rank's share: the lab trains in one process
            on_progress(
                {
                    "event": "progress",
                    "epoch": state.epoch + 1,
                    "images": seen,
                    "train_size": len(data.train),
                    "train_loss": loss_sum / mine,
                    "train_accuracy": correct / mine,
                }
            )
    cluster.broadcast_buffers(state.model)  # BatchNorm's running statistics: rank 0's, before anything evaluates
    if state.ema:
        state.ema.copy_buffers()
    loss_sum, correct = cluster.sum_(sums).tolist()
    n = len(data.train)
    return {"train_loss": loss_sum / n, "train_accuracy": correct / n}


def evaluate_epoch(state: RunState, steps: Steps, data: MnistData) -> dict[str, float]:
    """Validation (when there is a split) and test loss and accuracy of the evaluated network; in a distributed
    run each rank evaluates its share and the sums are combined, so the figures are one process's."""
    cluster, record = state.cluster, {}
    with steps.autocast:
        for name, split in (("val", data.val), ("test", data.test)):
            if split is not None:
                sums = loss_and_correct(
                    state.evaluated, split[cluster.share(len(split))], steps.loss_fn, steps.normalize
                )
                loss_sum, correct = cluster.sum_(sums).tolist()
                record[f"{name}_loss"], record[f"{name}_accuracy"] = loss_sum / len(split), correct / len(split)
    return record


def _check_finite(record: dict[str, Any], config: Config, epoch: int) -> None:
    """Stop at the first epoch whose loss is not a number: nothing after it could be trusted or saved."""
    bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        o = config.optimizer
        raise MnistlabError(
            f"training diverged in epoch {epoch}: {bad[0]} is {record[bad[0]]} (not finite); lower the learning "
            f"rate (optimizer.lr = {o.lr:g} with {o.name}, --lr) and train again. "
            + ("The run directory keeps the last good epoch." if epoch > 1 else "Nothing was saved.")
        )


def refuse_exposure_across_processes(config: Config, processes: int) -> None:
    """Refuse a run of `config` in more than one process if it turns exposure on: each rank would add its own
    typeset digits and non-digits and pair digits only within its share, not the step one process takes, which is
    what distributed training promises. `train --nproc` asks before torchrun starts, each rank again (for a
    torchrun started by hand)."""
    if processes > 1 and Exposure.wanted(config):
        raise MnistlabError(
            "training.outlier_exposure, augment.strokes and augment.typeset_digits train in one process; "
            "leave out --nproc (or torchrun)"
        )


def _fit(
    config: Config,
    *,
    outputs: RunDirectory | None,
    checkpoint: Checkpoint | None,
    data: MnistData | None,
    data_dir: str | Path | None,
    device: torch.device,
    cluster: distributed.Cluster,
    quiet: bool,
    on_epoch_end: EpochCallback | None,
    on_progress: ProgressCallback | None = None,
    resume_hint: bool = True,
) -> Run:
    log = Progress(quiet or not cluster.main)  # in a distributed run, rank 0 alone prints
    dev = device
    try:
        t = config.training
        refuse_exposure_across_processes(config, cluster.world_size)
        if data is None:
            data = _load_data_once_per_machine(config, data_dir, dev, cluster)
        data = data.to(dev)
        steps_per_epoch = (len(data.train) + t.batch_size - 1) // t.batch_size
        if checkpoint is None:
            state = RunState(config, dev, steps_per_epoch, cluster)
        else:
            state = RunState.from_checkpoint(config, dev, steps_per_epoch, checkpoint, cluster)
        steps = Steps.for_state(state, data, log)
        log.line(
            f"{'resuming' if checkpoint else 'training'} {config.name} on {data.name} ({len(data.train)} train, "
            f"{len(data.val) if data.val else 0} val, {len(data.test)} test) on {_describe_device(dev, t.amp)}"
            + (f", {cluster.world_size} processes ({cluster.backend})" if cluster.active else "")
            + f", {count_parameters(state.model):,} parameters"
            + (f", from epoch {state.epoch + 1}" if checkpoint else "")
        )
        if on_progress is not None:
            on_progress(_start_event(state, data, steps_per_epoch))
        # Subnormal floats are slow on x86 CPUs, and Adam's moments reach them within an epoch: flushing them to
        # zero keeps every epoch as fast as the first, with the same accuracy (docs/benchmarks.md).
        flush_subnormals(True)
        last = state.epoch if state.stop_reason == "early_stopping" else t.epochs  # resumed only to be finished
        for epoch in range(state.epoch + 1, last + 1):
            start = time.perf_counter()
            bar = log.bar(steps_per_epoch, f"epoch {epoch}/{t.epochs}")
            record: dict[str, Any] = {"epoch": epoch, **train_epoch(state, steps, data, bar, on_progress)}
            bar.close()
            record["train_seconds"] = time.perf_counter() - start
            record.update(evaluate_epoch(state, steps, data))
            if steps.adversary is not None:  # PGD accuracy on the epoch's first batch: shows catastrophic overfitting
                record["train_pgd_accuracy"] = steps.adversary.pgd_accuracy
            record["lr"] = state.optimizer.param_groups[0]["lr"]
            record["seconds"] = time.perf_counter() - start
            _check_finite(record, config, epoch)
            stop = cluster.from_main(state.end_epoch(record))  # rank 0 decides; every rank stops with it
            log.line(epoch_line(record, t.epochs))
            ranks_rng = cluster.gather(state.rank_rng())
            if outputs is not None:
                outputs.save_epoch(state, dev, ranks_rng)
            if on_epoch_end is not None:
                on_epoch_end(record)
            if stop:
                tracker = state.tracker
                log.line(
                    f"early stopping: {t.monitor} has not improved for {plural(t.early_stopping, 'epoch')} "
                    f"(best {tracker.best_value:.4f} at epoch {tracker.best_epoch})"
                )
                break
        return _finish(state, steps, data, outputs, cluster, log)
    except KeyboardInterrupt:
        if outputs is not None and outputs.saved and resume_hint:
            log.line(
                f"interrupted; {plural(outputs.saved, 'epoch')} saved. "
                f"Resume with: mnistlab train --resume {outputs.path}",
                force=True,
            )
        raise
    finally:
        flush_subnormals(False)  # PyTorch's default, for whatever the caller does next
        if outputs is not None:
            outputs.close()


def _start_event(state: RunState, data: MnistData, steps_per_epoch: int) -> dict[str, Any]:
    """What `on_progress` hears first: the run's config, the epochs done and to do, and the epoch's size."""
    return {
        "event": "start",
        "config": state.config.name,
        "epoch": state.epoch,
        "epochs": state.config.training.epochs,
        "train_size": len(data.train),
        "steps_per_epoch": steps_per_epoch,
    }


def _finish(
    state: RunState,
    steps: Steps,
    data: MnistData,
    outputs: RunDirectory | None,
    cluster: distributed.Cluster,
    log: Progress,
) -> Run:
    """The finished run, its model and files written by rank 0, once every rank is done."""
    run = state.finish()
    if outputs is not None:
        run.run_dir = outputs.path
        written = outputs.finish(run, steps.normalize, data)
        log.line(f"wrote {outputs.path}/ ({', '.join(written)})")
    # Every rank leaves together, after rank 0 has written the run: a rank that ends its process group while a
    # peer still holds connections to it can abort in gloo's teardown ("terminate called without an active
    # exception", exit -6, once in a CI run), and torchrun then stops the others mid-write. Writing takes longer
    # than the usual timeout on a small CPU (cnn-best's features over the training split: about a minute).
    cluster.barrier(timeout_s=FINISH_TIMEOUT_S)
    return run


def _load_data_once_per_machine(
    config: Config, data_dir: str | Path | None, device: torch.device, cluster: distributed.Cluster
) -> MnistData:
    """The dataset, downloaded (where missing) by one process per machine while the others wait for it."""
    if cluster.local_rank:
        cluster.barrier()
    data = load_data(config.data.dataset, data_dir, config.data.val_size, config.training.seed, device)
    if not cluster.local_rank:
        cluster.barrier()
    return data


def _describe_device(device: torch.device, amp: bool) -> str:
    """The device and its number format, for the log: results differ by CPU and precision, so say which."""
    precision = "bfloat16 autocast" if amp and devices.bf16_native(device) else "float32"
    if amp and precision == "float32":
        precision += " (amp is on, but this device has no native bfloat16)"
    if device.type == "cpu":
        return f"cpu, {plural(torch.get_num_threads(), 'thread')}, {precision} [{devices.describe_cpu()}]"
    return f"{device}, {precision}"
