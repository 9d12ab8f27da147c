"""Reports: `reproduce` (the report's experiments, or a study, side by side) and `compare` (any runs).

The seed report explains its results from the measured numbers; a study's report is a comparison table.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from mnistlab.config import Config, load_config
from mnistlab.data.splits import MnistData, load_data
from mnistlab.devices import resolve_device
from mnistlab.errors import MnistlabError, warn
from mnistlab.files import FolderLock, atomic_write_text, check_output_dir, is_empty_output
from mnistlab.models.files import load_model
from mnistlab.plots import plot_overlay
from mnistlab.train.checkpoint import CHECKPOINT
from mnistlab.train.loop import Run, resume, train

SEED_CONFIGS = ("seed-a", "seed-b", "seed-c", "seed-a-fixed", "seed-b-fixed", "seed-c-fixed")
# Studies are data: (run name, shipped config, overrides). Each trains the report's best network, corrected.
STUDIES: dict[str, list[tuple[str, str, dict[str, Any]]]] = {
    "seed": [(name, name, {}) for name in SEED_CONFIGS],
    "losses": [
        ("cross-entropy", "seed-b-fixed", {"training.loss": "cross-entropy"}),
        ("cross-entropy-ls0.1", "seed-b-fixed", {"training.loss": "cross-entropy", "training.label_smoothing": 0.1}),
        ("nll", "seed-b-fixed", {"training.loss": "nll"}),
        ("mse", "seed-b-fixed", {"training.loss": "mse"}),
        ("hinge", "seed-b-fixed", {"training.loss": "hinge"}),
        ("nll-softmax-output", "seed-b", {"training.loss": "nll"}),
    ],
    "optimizers": [
        ("sgd", "seed-b-fixed", {"optimizer.name": "sgd", "optimizer.lr": 0.001}),
        (
            "sgd-nesterov",
            "seed-b-fixed",
            {"optimizer.name": "sgd", "optimizer.lr": 0.05, "optimizer.momentum": 0.9, "optimizer.nesterov": True},
        ),
        ("adam", "seed-b-fixed", {"optimizer.name": "adam", "optimizer.lr": 0.001}),
        ("adamw", "seed-b-fixed", {"optimizer.name": "adamw", "optimizer.lr": 0.001, "optimizer.weight_decay": 0.01}),
        ("rmsprop", "seed-b-fixed", {"optimizer.name": "rmsprop", "optimizer.lr": 0.001}),
        ("adagrad", "seed-b-fixed", {"optimizer.name": "adagrad", "optimizer.lr": 0.01}),
        ("adadelta", "seed-b-fixed", {"optimizer.name": "adadelta", "optimizer.lr": 1.0}),
        (
            "adam-onecycle",
            "seed-b-fixed",
            {"optimizer.name": "adam", "optimizer.lr": 0.003, "training.scheduler": "onecycle"},
        ),
    ],
}
# The smallest cross-entropy a Softmax output layer allows: probabilities p in [0, 1] fed as logits give
# -log(e^1 / (e^1 + 9 e^0)) at best, i.e. ln(1 + 9/e).
SOFTMAX_LOSS_FLOOR = math.log(1 + 9 / math.e)


def study_configs(study: str, epochs: int | None = None) -> list[Config]:
    """The configs of a study, named after their runs."""
    if study not in STUDIES:
        raise MnistlabError(f"unknown study {study!r} (choose from {', '.join(STUDIES)})")
    configs = []
    for run_name, base, overrides in STUDIES[study]:
        config = load_config(base).with_overrides({**overrides, "training.epochs": epochs, "name": run_name})
        configs.append(config)
    return configs


def reproduce(
    out_dir: str | Path,
    *,
    study: str = "seed",
    epochs: int | None = None,
    data: MnistData | None = None,
    data_dir: str | Path | None = None,
    device: str = "auto",
    force: bool = False,
    quiet: bool = False,
) -> Path:
    """Train a study's configs (by default the report's six) into `out_dir/<name>/`; write `out_dir/report.md`.

    Run again after an interruption, it keeps the finished runs, resumes the interrupted one and trains the
    rest; `force` starts every run afresh.
    """
    out = Path(out_dir)
    configs = study_configs(study, epochs)  # every config validated before any training
    first = configs[0]
    shared = (first.data.dataset, first.data.val_size, first.training.seed)
    if any((c.data.dataset, c.data.val_size, c.training.seed) != shared for c in configs):
        raise MnistlabError(f"study {study!r}: its configs must share one dataset, seed and validation size")
    check_output_dir(out, force=True)  # a file in the way is an error even with --force
    with FolderLock(out):
        plan = [(config, "new" if force else _run_status(out / config.name, config)) for config in configs]
        dev = resolve_device(device)
        if data is None and any(status != "done" for _, status in plan):
            data = load_data(first.data.dataset, data_dir, first.data.val_size, first.training.seed, dev)
        common = {"data": data, "device": str(dev), "quiet": quiet}
        runs = []
        for config, status in plan:
            run_dir = out / config.name
            if status == "done":
                runs.append(_finished_run(run_dir, config))
            elif status == "resume":
                runs.append(resume(run_dir, config=config, **common))
            else:
                runs.append(train(config, out_dir=run_dir, force=force, **common))
        if study != "seed":
            return compare(
                [r.run_dir for r in runs if r.run_dir is not None],
                out,
                title=f"Study: {study}",
                command=f"mnistlab reproduce --study {study}" + (f" --epochs {epochs}" if epochs else ""),
                force=True,
            )
        plot_overlay({r.config.name: r.epochs for r in runs}, out / "overlay.png")
        report = out / "report.md"
        atomic_write_text(report, _report(runs, out))
        return report


def _run_status(run_dir: Path, config: Config) -> str:
    """What a study finds in a run's folder: nothing yet ("new"), an interrupted run of this config ("resume"),
    a finished one ("done"); anything else is an error, so no one's run is overwritten without --force."""
    if is_empty_output(run_dir):
        return "new"
    if (run_dir / "model.safetensors").is_file() and (run_dir / "config.toml").is_file():
        status = "done"
    elif (run_dir / CHECKPOINT).is_file():
        status = "resume"
    else:
        raise MnistlabError(f"{run_dir} holds something other than a run of {config.name}; use --force to replace it")
    saved = load_config(run_dir / "config.toml") if (run_dir / "config.toml").is_file() else config
    if saved.flat() != config.flat():
        raise MnistlabError(f"{run_dir} holds a run of different settings; use --force to replace it, or another --out")
    return status


def _finished_run(run_dir: Path, config: Config) -> Run:
    """A finished run read back from its folder."""
    _, metrics = _load_run(run_dir)
    model = load_model(run_dir).model
    return Run(config, model, metrics["epochs"], run_dir, metrics.get("best_epoch"), metrics.get("stop_reason", ""))


def _row(run: Run, out: Path) -> dict[str, Any]:
    best = max(run.epochs, key=lambda e: e["test_accuracy"])
    return {
        "name": run.config.name,
        "optimizer": f"{run.config.optimizer.name} lr {run.config.optimizer.lr:g}",
        "output": "Softmax (quirk)" if run.config.model.softmax_output else "logits",
        "final": run.final["test_accuracy"],
        "best": best["test_accuracy"],
        "best_epoch": best["epoch"],
        "loss": run.final["test_loss"],
        "train_loss": run.final["train_loss"],
        "seconds": sum(e["train_seconds"] for e in run.epochs) / len(run.epochs),
        "curves": Path(os.path.relpath(run.run_dir / "curves.png", out)).as_posix() if run.run_dir else "",
    }


def _report(runs: list[Run], out: Path) -> str:
    rows = {r.config.name: _row(r, out) for r in runs}
    epochs = runs[0].final["epoch"]
    lines = [
        "# The report's three networks, reproduced",
        "",
        f"Each network trained for {epochs} epochs, batch 64, on the MNIST training set less a seeded "
        "5,000-image validation split; accuracy and loss are on the 10,000-image test set. "
        "Command: `mnistlab reproduce`.",
        "",
        "| config | optimizer | output | final test acc | best test acc (epoch) | final test loss | s/epoch (train) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows.values():
        lines.append(
            f"| {r['name']} | {r['optimizer']} | {r['output']} | {100 * r['final']:.2f}% "
            f"| {100 * r['best']:.2f}% ({r['best_epoch']}) | {r['loss']:.4f} | {r['seconds']:.2f} |"
        )
    lines += ["", "![all six runs](overlay.png)", "", *_explanation(rows, epochs), "", "## Each run's curves", ""]
    for r in rows.values():
        lines += [f"### {r['name']}", "", f"![{r['name']}]({r['curves']})", ""]
    return "\n".join(lines)


def _pct(rows: dict[str, dict], name: str) -> str:
    return f"{100 * rows[name]['final']:.2f}%" if name in rows else "n/a"


def _explanation(rows: dict[str, dict], epochs: int) -> list[str]:
    floor = SOFTMAX_LOSS_FLOOR
    quirk = [r for r in rows.values() if r["output"] != "logits"]
    lines = [
        "## What the numbers say",
        "",
        f"**The Softmax output layer is the problem, not the networks.** seed-a ended at {_pct(rows, 'seed-a')} "
        f"and seed-c at {_pct(rows, 'seed-c')}; the same networks with logits into the loss ended at "
        f"{_pct(rows, 'seed-a-fixed')} and {_pct(rows, 'seed-c-fixed')}. PyTorch's `CrossEntropyLoss` applies "
        "log-softmax itself, so a Softmax layer in front of it makes the network's outputs probabilities in "
        "[0, 1] that are then treated as logits and softmaxed a second time.",
        "",
        f"**The loss has a floor.** With outputs confined to [0, 1], the best the loss can do is a perfectly "
        f"confident prediction (1 for the right digit, 0 elsewhere), which still scores ln(1 + 9/e) = {floor:.4f}. "
        "Measured final test losses of the Softmax-output runs: "
        + ", ".join(f"{r['name']} {r['loss']:.4f}" for r in quirk)
        + f" (all above {floor:.2f}); the logits runs are free to approach 0 ("
        + ", ".join(f"{r['name']} {r['loss']:.4f}" for r in rows.values() if r["output"] == "logits")
        + ").",
        "",
        "**The gradient is squashed.** The loss's gradient with respect to the probabilities is at most 1 in "
        "size, and the Softmax layer's Jacobian (diag(p) - p pᵀ, entries at most 1/4) shrinks it again before "
        "it reaches the weights; once a probability saturates near 0 or 1 the gradient through it all but "
        "vanishes. Plain SGD at lr 0.001 moves each weight by lr times that tiny gradient, so in "
        f"{epochs} epochs it barely leaves its initialisation: that is why A and C stay low. The small learning "
        f"rate alone is not the cause: the same SGD at the same rate reaches {_pct(rows, 'seed-a-fixed')} (A) "
        f"and {_pct(rows, 'seed-c-fixed')} (C) once logits go into the loss.",
        "",
        f"**Why B still works.** Adam divides each step by a running estimate of the gradient's own size, so a "
        f"uniformly shrunken gradient still produces steps of about lr: seed-b reached {_pct(rows, 'seed-b')} "
        f"despite the quirk. Removing the quirk helps it too: seed-b-fixed reached {_pct(rows, 'seed-b-fixed')}.",
        "",
        "**What logits change.** With logits into the loss, the gradient at the output is simply p - y "
        "(predicted probabilities minus the one-hot label): large when wrong, small when right, with no "
        "saturating layer in between and no floor on the loss. The correct usage is `softmax_output = false` "
        "(the `*-fixed` configs); apply softmax only when you want probabilities, after the model.",
    ]
    return lines


# ---------------------------------------------------------------------------------------------- compare


def _load_run(run_dir: Path) -> tuple[Config, dict[str, Any]]:
    if not (run_dir / "metrics.json").is_file() or not (run_dir / "config.toml").is_file():
        raise MnistlabError(f"{run_dir}: not a run directory (needs config.toml and metrics.json)")
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise MnistlabError(f"{run_dir}/metrics.json: not valid JSON ({exc})") from None
    if not metrics.get("epochs"):
        raise MnistlabError(f"{run_dir}: metrics.json has no finished epoch")
    return load_config(run_dir / "config.toml"), metrics


def _best(epochs: list[dict], key: str) -> tuple[float | None, int | None]:
    scored = [e for e in epochs if e.get(key) is not None]
    if not scored:
        return None, None
    top = max(scored, key=lambda e: e[key])
    return top[key], top["epoch"]


def _pct_or_dash(value: float | None, epoch: int | None = None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.2f}%" + (f" ({epoch})" if epoch is not None else "")


def compare(
    run_dirs: list[str | Path],
    out_dir: str | Path,
    *,
    title: str = "Run comparison",
    command: str = "",
    force: bool = False,
) -> Path:
    """A Markdown report comparing runs: what differs in their configs, their accuracies, epochs and time,
    with overlay plots of their curves. Returns the report's path. Existing report files in `out_dir` are
    replaced only with `force`."""
    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise MnistlabError("compare needs at least one run directory")
    loaded = [(d, *_load_run(d)) for d in dirs]
    out = Path(out_dir)
    check_output_dir(out, force=True)  # a file in the way, or under a file, is an error even with --force
    existing = [name for name in ("report.md", "test-curves.png", "val-curves.png") if (out / name).exists()]
    if existing and not force:
        raise MnistlabError(f"{out} already has a comparison ({', '.join(existing)}); use --force to replace it")
    flat = [c.flat() for _, c, _ in loaded]
    keys = sorted({k for f in flat for k in f})
    differing = [k for k in keys if len({json.dumps(f.get(k)) for f in flat}) > 1]
    names = [d.name for d in dirs]
    if len(set(names)) < len(names):
        names = [str(d) for d in dirs]
    lines = [f"# {title}", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    datasets = sorted({c.data.dataset for _, c, _ in loaded})
    if len(datasets) > 1:
        different = f"these runs were trained and tested on different data sets ({', '.join(datasets)})"
        warn(f"{different}: their accuracies are not comparable")
        lines += [f"**Warning: {different}; their accuracies are not comparable.**", ""]
    lines += [
        "Best values are per epoch; the test column never chose anything (model selection uses validation).",
        "",
        "| run | differs in | best val acc (epoch) | final val acc | best test acc (epoch) | final test acc "
        "| final test loss | epochs | stopped by | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (_, _, metrics), f in zip(names, loaded, flat):
        epochs = metrics["epochs"]
        final = epochs[-1]
        diff = ", ".join(f"{k.split('.', 1)[1]}={f.get(k)}" for k in differing) or "-"
        lines.append(
            f"| {name} | {diff} | {_pct_or_dash(*_best(epochs, 'val_accuracy'))} "
            f"| {_pct_or_dash(final.get('val_accuracy'))} | {_pct_or_dash(*_best(epochs, 'test_accuracy'))} "
            f"| {_pct_or_dash(final['test_accuracy'])} | {final['test_loss']:.4f} | {len(epochs)} "
            f"| {metrics.get('stop_reason', 'epoch_limit')} | {sum(e['seconds'] for e in epochs):.1f} |"
        )
    curves = {name: metrics["epochs"] for name, (_, _, metrics) in zip(names, loaded)}
    plot_overlay(curves, out / "test-curves.png", split="test")
    lines += ["", "![test curves](test-curves.png)", ""]
    if all(e.get("val_accuracy") is not None for c in curves.values() for e in c):
        plot_overlay(curves, out / "val-curves.png", split="val")
        lines += ["![validation curves](val-curves.png)", ""]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines))
    return report
