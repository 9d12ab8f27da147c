"""The training loop: one config in, one run directory out.

Per epoch: shuffle by a seeded permutation, take batches by indexing the in-memory uint8 tensor, convert each
batch to float at once, step. Running loss and accuracy stay on the device and are read once per epoch, so
the loop never waits on a per-batch `.item()`.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from mnistlab.checkpoint import atomic_write_text, save_model, write_json
from mnistlab.config import Config, OptimizerConfig
from mnistlab.data import MnistData, batches, load_data, to_float
from mnistlab.errors import MnistlabError
from mnistlab.evaluation import loss_and_accuracy
from mnistlab.losses import make_loss
from mnistlab.models import build_model, count_parameters
from mnistlab.plots import plot_curves


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` picks CUDA when available, else the CPU; `cuda` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise MnistlabError(f"unknown device {device!r} (choose auto, cpu or cuda)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MnistlabError("device 'cuda' asked for, but PyTorch sees no CUDA GPU here (use --device cpu)")
    return torch.device(device)


def make_optimizer(params, config: OptimizerConfig, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer a config names, in its fused form: one kernel for all parameters instead of a Python
    loop over them (on this CPU that halves the seed-B epoch)."""
    if config.name == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, fused=True
        )
    if config.name == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    raise MnistlabError(f"unknown optimizer {config.name!r}")


@dataclass
class Run:
    """What a training run produced: the trained model, its per-epoch metrics, and where it was saved."""

    config: Config
    model: nn.Module
    epochs: list[dict[str, Any]] = field(default_factory=list)
    run_dir: Path | None = None

    @property
    def final(self) -> dict[str, Any]:
        return self.epochs[-1]


def check_run_dir(out_dir: str | Path, force: bool) -> Path:
    """Refuse, before any work, to overwrite an existing non-empty run directory without `force`."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise MnistlabError(f"{out} already exists and is not empty (use --force to overwrite, or --out)")
    return out


def make_run_dir(out: Path) -> Path:
    """An empty run directory, replacing what was there (checked by `check_run_dir` first)."""
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
    out.mkdir(parents=True)
    return out


def train(
    config: Config,
    out_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    device: str = "auto",
    quiet: bool = False,
    force: bool = False,
    data: MnistData | None = None,
) -> Run:
    """Train `config`; when `out_dir` is given, write the run directory there.

    `data` lets callers that train several configs (reproduce) load the dataset once.
    """
    dev = resolve_device(device)
    run_dir = check_run_dir(out_dir, force) if out_dir is not None else None
    t = config.training
    if data is None:
        data = load_data(config.data.dataset, data_dir, config.data.val_size, t.seed, dev)
    data = data.to(dev)
    if run_dir is not None:
        make_run_dir(run_dir)  # only now: a failed start leaves no half-made run directory
    normalize = (data.mean, data.std) if config.data.normalize else None

    torch.manual_seed(t.seed)  # model initialisation
    model = build_model(config.model).to(dev)
    optimizer = make_optimizer(model.parameters(), config.optimizer, dev)
    loss_fn = make_loss(t.loss)
    shuffle = torch.Generator().manual_seed(t.seed)
    run = Run(config, model, run_dir=run_dir)
    log = _Logger(quiet)
    log.line(
        f"training {config.name} on {data.name} ({len(data.train)} train, "
        f"{len(data.val) if data.val else 0} val, {len(data.test)} test) on {dev}, "
        f"{count_parameters(model):,} parameters"
    )
    steps = (len(data.train) + t.batch_size - 1) // t.batch_size
    for epoch in range(1, t.epochs + 1):
        start = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), device=dev)
        correct = torch.zeros((), dtype=torch.int64, device=dev)
        bar = log.bar(steps, f"epoch {epoch}/{t.epochs}")
        for batch in batches(data.train, t.batch_size, shuffle):
            out = model(to_float(batch.images, normalize))
            loss = loss_fn(out, batch.labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(batch)
            correct += (out.detach().argmax(1) == batch.labels).sum()
            bar.update()
        bar.close()
        train_seconds = time.perf_counter() - start
        record: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": loss_sum.item() / len(data.train),
            "train_accuracy": correct.item() / len(data.train),
        }
        if data.val is not None:
            record["val_loss"], record["val_accuracy"] = loss_and_accuracy(model, data.val, loss_fn, normalize)
        record["test_loss"], record["test_accuracy"] = loss_and_accuracy(model, data.test, loss_fn, normalize)
        record["train_seconds"] = train_seconds
        record["seconds"] = time.perf_counter() - start
        run.epochs.append(record)
        log.line(_epoch_line(record, t.epochs))
        if run_dir is not None:
            write_json(run_dir / "metrics.json", _metrics(run, dev))  # progress survives a crash

    if run_dir is not None:
        _write_run(run, run_dir, normalize, dev)
        log.line(f"wrote {run_dir}/ (model.safetensors, model.json, metrics.json, curves.png, config.toml)")
    return run


def _metrics(run: Run, device: torch.device) -> dict[str, Any]:
    return {
        "config": run.config.name,
        "device": str(device),
        "torch": torch.__version__,
        "epochs": run.epochs,
        "final": run.epochs[-1] if run.epochs else None,
    }


def _write_run(run: Run, run_dir: Path, normalize: tuple[float, float] | None, device: torch.device) -> None:
    atomic_write_text(run_dir / "config.toml", run.config.to_toml())
    final = run.final
    save_model(
        run.model,
        run.config.model,
        run_dir,
        normalize,
        metadata={
            "config": run.config.name,
            "dataset": run.config.data.dataset,
            "loss": run.config.training.loss,
            "epochs": final["epoch"],
            "test_accuracy": final["test_accuracy"],
        },
    )
    write_json(run_dir / "metrics.json", _metrics(run, device))
    plot_curves(run.epochs, run_dir / "curves.png", f"{run.config.name}: {run.config.description}")


def _epoch_line(r: dict[str, Any], total: int) -> str:
    parts = [
        f"epoch {r['epoch']}/{total}",
        f"train loss {r['train_loss']:.4f} acc {100 * r['train_accuracy']:.2f}%",
    ]
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

    def line(self, text: str) -> None:
        if not self.quiet:
            tqdm.write(text, file=sys.stderr)

    def bar(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, desc=desc, leave=False, disable=self.quiet or not self.tty, file=sys.stderr)
