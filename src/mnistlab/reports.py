"""`reproduce`: the report's experiments side by side, with an explanation written from the measured numbers."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from mnistlab.checkpoint import atomic_write_text
from mnistlab.config import load_config
from mnistlab.data import load_data
from mnistlab.errors import MnistlabError
from mnistlab.plots import plot_overlay
from mnistlab.training import Run, resolve_device, train

SEED_CONFIGS = ("seed-a", "seed-b", "seed-c", "seed-a-fixed", "seed-b-fixed", "seed-c-fixed")
# The smallest cross-entropy a Softmax output layer allows: probabilities p in [0, 1] fed as logits give
# -log(e^1 / (e^1 + 9 e^0)) at best, i.e. ln(1 + 9/e).
SOFTMAX_LOSS_FLOOR = math.log(1 + 9 / math.e)


def reproduce(
    out_dir: str | Path,
    epochs: int | None = None,
    data_dir: str | Path | None = None,
    device: str = "auto",
    quiet: bool = False,
    force: bool = False,
    configs: tuple[str, ...] = SEED_CONFIGS,
) -> Path:
    """Train the report's six configs into `out_dir/<name>/` and write `out_dir/report.md`."""
    out = Path(out_dir)
    taken = [n for n in configs if (out / n).exists() and any((out / n).iterdir())]
    if taken and not force:
        raise MnistlabError(f"{out} already has runs ({', '.join(taken)}); use --force to overwrite, or --out")
    loaded = [load_config(n) for n in configs]
    if epochs is not None:
        loaded = [c.with_overrides({"training.epochs": epochs}) for c in loaded]
    dev = resolve_device(device)
    first = loaded[0]
    data = load_data(first.data.dataset, data_dir, first.data.val_size, first.training.seed, dev)
    runs = []
    for config in loaded:
        if (config.data.val_size, config.training.seed) != (first.data.val_size, first.training.seed):
            raise MnistlabError("reproduce expects every config to share one seed and validation size")
        runs.append(train(config, out / config.name, device=str(dev), quiet=quiet, force=force, data=data))
    plot_overlay({r.config.name: r.epochs for r in runs}, out / "overlay.png")
    report = out / "report.md"
    atomic_write_text(report, _report(runs, out))
    return report


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
        "curves": os.path.relpath(run.run_dir / "curves.png", out) if run.run_dir else "",
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
    lines += ["", "![all six runs](overlay.png)", "", *_explanation(rows), "", "## Each run's curves", ""]
    for r in rows.values():
        lines += [f"### {r['name']}", "", f"![{r['name']}]({r['curves']})", ""]
    return "\n".join(lines)


def _pct(rows: dict[str, dict], name: str) -> str:
    return f"{100 * rows[name]['final']:.2f}%" if name in rows else "n/a"


def _explanation(rows: dict[str, dict]) -> list[str]:
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
        "10 epochs it barely leaves its initialisation: that is why A and C stay low.",
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
