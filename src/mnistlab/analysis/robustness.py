"""How a model holds up beyond its clean test set: MNIST-C's corruptions and white-box L-infinity attacks.

`robustness(model)` corrupts the test split of the model's own dataset (MNIST, Fashion-MNIST, KMNIST) with each
corruption (`corruptions.py`, seeded), attacks a fixed subset of it with FGSM and PGD (`attacks.py`), and writes
report.md, robustness.json and two figures into an output folder. The numbers are accuracies on the first N
test images, so every run with the same settings measures the same images.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mnistlab.data.corruptions import CORRUPTIONS, corrupt, parse_names
from mnistlab.data.splits import Split, to_float
from mnistlab.devices import describe_cpu, resolve_device
from mnistlab.errors import MnistlabError
from mnistlab.files import FolderLock, atomic_write_text, check_output_dir, clear_dir, write_json
from mnistlab.infer.evaluate import evaluation_split
from mnistlab.infer.predict import no_detector
from mnistlab.models.attacks import fgsm, pgd
from mnistlab.models.files import LoadedModel, load_model
from mnistlab.models.metrics import predict_answers
from mnistlab.models.outliers import flagged
from mnistlab.plots import plot_gallery, plot_robustness
from mnistlab.progress import Progress

ATTACKS = ("fgsm", "pgd")
# Where our figures stand: a standard CNN falls to about 0% under PGD at eps 0.3 (Madry et al. 2018), whose
# adversarially trained CNN keeps 92.5% under 100-step PGD (their MNIST challenge's white-box leaderboard).
REFERENCES = (
    "A standard (not adversarially trained) CNN falls to about 0% under PGD at eps 0.3 (Madry et al. 2018).",
    "Madry et al.'s adversarially trained CNN (PGD-40 training) keeps 92.5% under 100-step PGD at eps 0.3.",
)


@dataclass
class RobustnessSettings:
    """What to measure. `images`: the first N test images are corrupted (None: all); `adversarial_images`: the
    first N are attacked; PGD takes `pgd_steps` steps of `step_size` from a random start."""

    corruptions: list[str] = field(default_factory=lambda: list(CORRUPTIONS))
    attacks: list[str] = field(default_factory=lambda: list(ATTACKS))
    eps: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3])
    images: int | None = None
    adversarial_images: int = 1000
    pgd_steps: int = 40
    step_size: float = 0.01
    seed: int = 0
    batch_size: int = 500

    def check(self, test_size: int) -> None:
        """Raise MnistlabError for settings that cannot run, before any work is done."""
        problems = []
        if not self.corruptions and not self.attacks:
            problems.append("nothing to measure: give at least one corruption or attack")
        unknown = [a for a in self.attacks if a not in ATTACKS]
        if unknown:
            problems.append(f"unknown attack {', '.join(unknown)} (choose from {', '.join(ATTACKS)})")
        if self.attacks and (not self.eps or any(not 0 < e <= 1 for e in self.eps)):
            problems.append("eps values must be in (0, 1] (pixels are in [0, 1])")
        for name, n in (("images", self.images), ("adversarial images", self.adversarial_images)):
            if n is not None and not 1 <= n <= test_size:
                problems.append(f"{name} must be between 1 and {test_size} (the test set's size), got {n}")
        if self.pgd_steps < 1 or self.step_size <= 0 or self.batch_size < 1:
            problems.append("PGD needs at least 1 step, a positive step size and a batch size of at least 1")
        if problems:
            raise MnistlabError("; ".join(problems))


def parse_list(text: str, kind: str) -> list[str]:
    """A comma-separated option: 'none' is empty, 'all' every choice (corruptions, attacks)."""
    if text.strip() == "none":
        return []
    if kind == "corruptions":
        return parse_names(text)
    if text.strip() == "all":
        return list(ATTACKS)
    return list(dict.fromkeys(t.strip().lower() for t in text.split(",") if t.strip()))


def parse_eps(text: str) -> list[float]:
    try:
        return sorted({float(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise MnistlabError(f"--eps: {text!r} is not a comma-separated list of numbers (e.g. 0.1,0.2,0.3)") from None


def command_line(model_path: str | Path | None, settings: RobustnessSettings) -> str:
    """The `mnistlab robustness` command that measures with `settings` (every setting spelled out)."""
    s = settings
    parts = ["mnistlab robustness", *([str(model_path)] if model_path else [])]
    corruptions = "all" if s.corruptions == list(CORRUPTIONS) else ",".join(s.corruptions) or "none"
    parts += [f"--corruptions {corruptions}", f"--attacks {','.join(s.attacks) or 'none'}"]
    parts += [f"--eps {','.join(f'{e:g}' for e in s.eps)}"] if s.attacks else []
    parts += [f"--images {s.images}"] if s.images else []
    if "pgd" in s.attacks or "fgsm" in s.attacks:
        parts.append(f"--adversarial-images {s.adversarial_images}")
    if "pgd" in s.attacks:
        parts += [f"--pgd-steps {s.pgd_steps}", f"--step-size {s.step_size:g}"]
    return " ".join([*parts, f"--seed {s.seed}"])


def _predictions(
    loaded: LoadedModel, images: torch.Tensor, labels: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(predicted labels, which are correct, which the outlier score flags: None without a detector) on the CPU
    for uint8 images, from one pass on `device`."""
    probabilities, scores = predict_answers(loaded.answering(), images.to(device))
    predicted = probabilities.argmax(1)
    threshold = loaded.outlier_threshold
    return predicted, predicted == labels, None if threshold is None else flagged(scores, threshold)


def _flagged_shares(correct: torch.Tensor, flags: torch.Tensor | None) -> dict[str, float | None]:
    """The share of images flagged as unlike the training data, and of the misclassified ones (the mistakes the
    flag warns of); None without a detector, or without a mistake."""
    if flags is None:
        return {"flagged": None, "errors_flagged": None}
    wrong = ~correct
    caught = float(flags[wrong].double().mean()) if wrong.any() else None
    return {"flagged": float(flags.double().mean()), "errors_flagged": caught}


@torch.no_grad()
def _predict(loaded: LoadedModel, x: torch.Tensor) -> torch.Tensor:
    """Predicted labels for float images in [0, 1]."""
    return loaded.model(x).argmax(1)


def _per_class(correct: torch.Tensor, labels: torch.Tensor) -> list[float]:
    counts = torch.bincount(labels, minlength=10).clamp(min=1)
    return (torch.bincount(labels, weights=correct.double(), minlength=10) / counts).tolist()


def _relative(error: float, clean_error: float) -> float | None:
    """Corrupted error as a multiple of the clean error (None where the clean error is 0 on these images)."""
    return error / clean_error if clean_error > 0 else None


def robustness(
    model_path: str | Path | None = None,
    out_dir: str | Path | None = None,
    settings: RobustnessSettings | None = None,
    data_dir: str | Path | None = None,
    device: str = "auto",
    force: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """Measure a model (default: the bundled one) under corruptions and attacks; with `out_dir`, write
    report.md, robustness.json, corruptions.png and examples.png there. Returns the measurements."""
    settings = settings or RobustnessSettings()
    out = check_output_dir(out_dir, force) if out_dir is not None else None
    dev = resolve_device(device)
    loaded = load_model(model_path, dev)
    test = evaluation_split(loaded, data_dir)
    settings.check(len(test))
    name = str(model_path or "bundled model")
    if out is None:
        return _measure(loaded, test, settings, dev, Progress(quiet), name)[0]
    with FolderLock(out):
        clear_dir(out)
        result, example_images = _measure(loaded, test, settings, dev, Progress(quiet), name)
        result["command"] = command_line(model_path, settings)
        _write(result, example_images, out)
    return result


def _measure(
    loaded: LoadedModel, test: Split, settings: RobustnessSettings, dev: torch.device, progress: Progress, name: str
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """The measurements, and the first test image clean and under each corruption (for the figure)."""
    classes = loaded.classes
    n = settings.images or len(test)
    images, labels = test.images[:n].cpu(), test.labels[:n].cpu()
    start = time.perf_counter()
    predicted, correct, flags = _predictions(loaded, images, labels, dev)
    clean = correct.float().mean().item()
    progress.line(f"{name} on {loaded.dataset}: clean accuracy {100 * clean:.2f}% ({n:,} test images)")
    result: dict[str, Any] = {
        "model": name,
        "dataset": loaded.dataset,
        "classes": classes,
        "settings": asdict(settings) | {"images": n},
        "device": describe_cpu() if dev.type == "cpu" else _describe_accelerator(dev),
        "torch": torch.__version__,
        "clean_accuracy": clean,
        "outlier_threshold": loaded.outlier_threshold,
        "clean_flagged": _flagged_shares(correct, flags),
        "corruptions": {},
        "examples": [_example("clean", classes[int(predicted[0])], flags)],
    }
    example_images = [images[0].numpy()]
    per_class = {"clean": _per_class(correct, labels), "corrupted": []}
    for i, corruption in enumerate(settings.corruptions, 1):
        t = time.perf_counter()
        corrupted = corrupt(images, corruption, settings.seed)
        predicted, correct, flags = _predictions(loaded, corrupted, labels, dev)
        accuracy = correct.float().mean().item()
        result["corruptions"][corruption] = {
            "accuracy": accuracy,
            "error": 1 - accuracy,
            "relative_error": _relative(1 - accuracy, 1 - clean),
            **_flagged_shares(correct, flags),
        }
        per_class["corrupted"].append(_per_class(correct, labels))
        example_images.append(corrupted[0].numpy())
        result["examples"].append(_example(corruption, classes[int(predicted[0])], flags))
        progress.line(
            f"[{i}/{len(settings.corruptions)}] {corruption}: {100 * accuracy:.2f}% ({time.perf_counter() - t:.1f} s)"
        )
    if settings.corruptions:
        accuracies = [c["accuracy"] for c in result["corruptions"].values()]
        result["mean_corruption_accuracy"] = sum(accuracies) / len(accuracies)
        result["mean_relative_error"] = _relative(1 - result["mean_corruption_accuracy"], 1 - clean)
        shares = [c["flagged"] for c in result["corruptions"].values()]
        result["mean_flagged"] = None if None in shares else sum(shares) / len(shares)
        mean_by_class = torch.tensor(per_class["corrupted"]).mean(0).tolist()
        result["per_class"] = [
            {"class": c, "clean": a, "corrupted_mean": m} for c, a, m in zip(classes, per_class["clean"], mean_by_class)
        ]
    result["seconds"] = {"corruptions": time.perf_counter() - start}
    if settings.attacks:
        start = time.perf_counter()
        result["adversarial"] = _attack(loaded, test, settings, dev, progress)
        result["seconds"]["attacks"] = time.perf_counter() - start
    return result, example_images


def _example(corruption: str, predicted: str, flags: torch.Tensor | None) -> dict[str, Any]:
    """The model's answer for the first image under a corruption: its class, and whether it is flagged."""
    return {"corruption": corruption, "predicted": predicted, "outlier": None if flags is None else bool(flags[0])}


def _describe_accelerator(dev: torch.device) -> str:
    return f"{torch.cuda.get_device_name(dev)} ({dev})" if dev.type == "cuda" else str(dev)


def _attack(
    loaded: LoadedModel, test: Split, settings: RobustnessSettings, dev: torch.device, progress: Progress
) -> dict[str, Any]:
    """FGSM and PGD accuracies at each eps on the first `adversarial_images` test images.

    PGD runs from the smallest eps up and attacks at each eps only the images that survived the smaller one:
    an adversarial image within eps 0.1 lies within eps 0.2 too, so this finds at least as many as separate runs.
    """
    n = settings.adversarial_images
    x, y = to_float(test.images[:n]).to(dev), test.labels[:n].to(dev)
    bs = settings.batch_size
    _, correct, _ = _predictions(loaded, test.images[:n].cpu(), y.cpu(), dev)
    rows: list[dict[str, Any]] = []
    if "fgsm" in settings.attacks:
        for eps in settings.eps:
            right = 0
            for i in range(0, n, bs):
                adversarial = fgsm(loaded.model, x[i : i + bs], y[i : i + bs], eps, loaded.probabilities)
                right += int((_predict(loaded, adversarial) == y[i : i + bs]).sum())
            rows.append({"attack": "fgsm", "eps": eps, "accuracy": right / n})
            progress.line(f"FGSM eps {eps:g}: {100 * right / n:.2f}% ({n:,} images)")
    if "pgd" in settings.attacks:
        generator = torch.Generator().manual_seed(settings.seed)
        survivors = correct.to(dev).clone()
        bar = progress.bar(len(settings.eps) * -(-n // bs), f"PGD-{settings.pgd_steps}")
        for eps in settings.eps:
            t = time.perf_counter()
            for i in range(0, n, bs):
                alive = survivors[i : i + bs].nonzero().flatten() + i
                if len(alive):
                    _, fooled = pgd(
                        loaded.model,
                        x[alive],
                        y[alive],
                        eps,
                        settings.pgd_steps,
                        settings.step_size,
                        loaded.probabilities,
                        generator,
                    )
                    survivors[alive[fooled]] = False
                bar.update()
            accuracy = survivors.float().mean().item()
            rows.append({"attack": "pgd", "eps": eps, "accuracy": accuracy})
            progress.line(
                f"PGD-{settings.pgd_steps} eps {eps:g}: {100 * accuracy:.2f}% ({time.perf_counter() - t:.0f} s)"
            )
        bar.close()
    return {"images": n, "clean_accuracy": correct.float().mean().item(), "results": rows}


# ---------------------------------------------------------------------------------------------- report


_FLAGGED_NOTE = (
    "Flagged: the share of the corrupted images whose outlier score is above the model's threshold, where its "
    'answer carries "not a digit?" (for an MNIST model); errors flagged: the share of its mistakes so marked.'
)


def _clean_flagged(result: dict[str, Any]) -> str:
    """ ", 0.52% flagged as outliers" after the clean accuracy; nothing without a detector."""
    share = result["clean_flagged"]["flagged"]
    return "" if share is None else f", {_pct(share)} flagged as outliers"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _times(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}x"


def _adversarial_table(adversarial: dict[str, Any], steps: int) -> list[str]:
    eps = sorted({r["eps"] for r in adversarial["results"]})
    lines = ["| attack | " + " | ".join(f"eps {e:g}" for e in eps) + " |", "|---|" + "---|" * len(eps)]
    for attack in ATTACKS:
        found = {r["eps"]: r["accuracy"] for r in adversarial["results"] if r["attack"] == attack}
        if found:
            label = "FGSM" if attack == "fgsm" else f"PGD-{steps}, random start"
            lines.append(f"| {label} | " + " | ".join(_pct(found.get(e)) for e in eps) + " |")
    return lines


def format_summary(result: dict[str, Any]) -> str:
    """The measurements as plain-text tables, for a terminal."""
    s = result["settings"]
    lines = [
        f"{result['model']} on {result['dataset']}: clean accuracy {_pct(result['clean_accuracy'])} "
        f"({s['images']:,} test images){_clean_flagged(result)}"
    ]
    if result["outlier_threshold"] is None:
        lines.append(f"outliers: {no_detector(result['model'], 'nothing is flagged (n/a below)')}")
    if result["corruptions"]:
        columns = f"{'accuracy':>10}{'error':>9}{'x clean error':>15}{'flagged':>9}{'errors flagged':>16}"
        lines.append(f"{'corruption':<16}{columns}")
        for name, c in result["corruptions"].items():
            measured = f"{_pct(c['accuracy']):>10}{_pct(c['error']):>9}{_times(c['relative_error']):>15}"
            lines.append(f"{name:<16}{measured}{_pct(c['flagged']):>9}{_pct(c['errors_flagged']):>16}")
        mean = result["mean_corruption_accuracy"]
        measured = f"{_pct(mean):>10}{_pct(1 - mean):>9}{_times(result['mean_relative_error']):>15}"
        lines.append(f"{'mean':<16}{measured}{_pct(result['mean_flagged']):>9}")
        weakest = min(result["per_class"], key=lambda c: c["corrupted_mean"])
        lines.append(f"weakest class under corruption: {weakest['class']} ({_pct(weakest['corrupted_mean'])} mean)")
    if "adversarial" in result:
        adv = result["adversarial"]
        lines.append(
            f"white-box attacks on the first {adv['images']:,} test images (clean {_pct(adv['clean_accuracy'])}):"
        )
        for row in _adversarial_table(adv, s["pgd_steps"]):
            if not row.startswith("|---"):
                lines.append("  ".join(cell.strip() for cell in row.strip("|").split("|")))
    return "\n".join(lines)


def _write(result: dict[str, Any], example_images: list[np.ndarray], out: Path) -> None:
    """report.md, robustness.json, corruptions.png (bar chart) and examples.png (one image, each corruption)."""
    s = result["settings"]
    title = f"{result['model']} ({result['dataset']})"
    examples = result["examples"]
    if result["corruptions"]:
        captions = [
            f"{e['corruption'].replace('_', ' ')}: {e['predicted']}" + (" (flagged)" if e["outlier"] else "")
            for e in examples
        ]
        plot_gallery(
            example_images,
            captions,
            out / "examples.png",
            "the first test image under each corruption (caption: the model's prediction; flagged: an outlier)",
            columns=8,
        )
    plot_robustness(
        {k: v["accuracy"] for k, v in result["corruptions"].items()},
        result["clean_accuracy"],
        result.get("adversarial", {}).get("results", []),
        out / "corruptions.png",
        f"{title}: robustness",
    )
    write_json(out / "robustness.json", result)
    lines = [f"# Robustness: {title}", ""]
    if result.get("command"):
        lines += [f"Command: `{result['command']}`", ""]
    lines += [
        f"Device: {result['device']}; torch {result['torch']}. Corruptions: MNIST-C's (Mu and Gilmer 2019) at its "
        f"published severities, generated from the first {s['images']:,} test images with seed {s['seed']} "
        "(see docs/robustness.md for how each generator compares with the original).",
        "",
        f"Clean accuracy: **{_pct(result['clean_accuracy'])}**{_clean_flagged(result)}.",
        "",
    ]
    if result["corruptions"]:
        lines += _corruption_lines(result)
    if "adversarial" in result:
        adv = result["adversarial"]
        lines += [
            "## White-box attacks (L-infinity, pixels in [0, 1])",
            "",
            f"On the first {adv['images']:,} test images (clean accuracy on them: {_pct(adv['clean_accuracy'])}). "
            f"PGD: {s['pgd_steps']} steps of {s['step_size']:g} from a random start in the eps-ball; an image counts "
            "as broken when the clean image or any iterate is misclassified, and each larger eps attacks only the "
            "images that survived the smaller one. Ensembles are attacked through their averaged probabilities.",
            "",
            *_adversarial_table(adv, s["pgd_steps"]),
            "",
            *[f"- {r}" for r in REFERENCES],
            "",
        ]
    atomic_write_text(out / "report.md", "\n".join(lines))


def _corruption_lines(result: dict[str, Any]) -> list[str]:
    """The report's section on the corruptions: accuracy and flagged share of each, and per class."""
    lines = [
        "## Corruptions",
        "",
        _FLAGGED_NOTE
        if result["outlier_threshold"] is not None
        else f"Flagged: n/a, as {no_detector(result['model'], 'nothing is flagged')}.",
        "",
        "| corruption | accuracy | error | error / clean error | flagged | errors flagged |",
        "|---|---|---|---|---|---|",
    ]
    for name, c in result["corruptions"].items():
        measured = f"{_pct(c['accuracy'])} | {_pct(c['error'])} | {_times(c['relative_error'])}"
        lines.append(f"| {name} | {measured} | {_pct(c['flagged'])} | {_pct(c['errors_flagged'])} |")
    mean = result["mean_corruption_accuracy"]
    measured = f"**{_pct(mean)}** | {_pct(1 - mean)} | {_times(result['mean_relative_error'])}"
    lines += [
        f"| **mean** | {measured} | {_pct(result['mean_flagged'])} | |",
        "",
        "![accuracy per corruption](corruptions.png)",
        "",
        "![the first test image under each corruption](examples.png)",
        "",
        "Per class (clean, and the mean over the corruptions):",
        "",
        "| class | clean | corrupted (mean) |",
        "|---|---|---|",
    ]
    lines += [f"| {c['class']} | {_pct(c['clean'])} | {_pct(c['corrupted_mean'])} |" for c in result["per_class"]]
    lines.append("")
    return lines
