"""Outlier exposure (Hendrycks et al. 2019) for the "not a digit?" flag, measured: cnn-fast's network trained on
MNIST with variants of a recipe, each judged on the trust_table sets (real-looking digits that must not be
flagged, non-digits that should) by three scores.

Variants (RECIPES): `baseline` (cnn-fast as configured); `aug` (a random half of each batch of digits made
thicker, thinner, low-resolution, blurred or of another contrast, so that scanned digits stay digits); `oe` (each
batch of 128 digits with 64 generated non-digits, loss CE(digits) + 0.5 CE(non-digits, uniform)); `oe-aug` (both);
`oe-aug-mix` (a third of the non-digits made from digits: two of different classes overlaid or side by side);
`oe-aug-both` (the non-digits augmented like the digits, so stroke width is no cue either way); `oe-fonts` (16
digits typeset in DejaVu added to each batch, so that "typeset" is no cue for "not a digit" either); and
`oe-fonts-heavy` (as many non-digits as digits, weight 1), `oe-fonts-long` (4 epochs) and both. The non-digits
come from mnistlab.data.exposure (which `training.outlier_exposure` trains on), never from the measuring generator
(tests/support/nondigits.py) nor Fashion-MNIST.

Each trained network gets the temperature (fitted on the validation split), the feature density (fitted on the
training split) and thresholds that flag 1% of the validation split, all with mnistlab's own functions, and three
scores: (a) density, the squared Mahalanobis distance mnistlab ships; (b) confidence, 1 - the top calibrated
probability; (c) combined, the larger of the two each divided by its own threshold, thresholded again at 1% of
the validation split. The sets are trust_table's (seed 1, 300 per kind), each image through `preprocess` as
`mnistlab predict` does; an image preprocessing refuses counts as flagged.

Run: .venv/bin/python benchmarks/outlier_exposure.py [--variants baseline oe ...] [--epochs 2] [--write]
Results accumulate in --results (a JSON file, one entry per variant), so variants can be trained one per run;
the table printed (and written with --write) holds every variant in that file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import ROOT, machine, write_section
from trust_table import preprocessed

from mnistlab.config import load_config
from mnistlab.data.exposure import from_digits, nondigit_pool, typeset_pool, vary_strokes
from mnistlab.data.splits import batch_indices, load_data, standardize_, take, to_float
from mnistlab.models.calibration import fit_temperature, temper
from mnistlab.models.losses import make_loss
from mnistlab.models.networks import Standardized, build_model
from mnistlab.models.optimizers import make_optimizer, make_scheduler
from mnistlab.models.outliers import features_of, fit_detector, flagged, flagging_threshold
from mnistlab.train.state import Ema
from tests.support.nondigits import NONDIGIT_KINDS, REAL_DIGIT_KINDS, write_nondigits, write_real_digits

DOC = ROOT / "docs" / "outliers.md"
CACHE = Path(tempfile.gettempdir()) / "mnistlab-outlier-exposure"
# What each variant turns on: exposure, digit augmentation, non-digits made from digits, the same augmentation of
# the non-digits (so that stroke width and blur are no cue either way), typeset digits among the digits.
RECIPES = {
    "baseline": set(),
    "aug": {"aug"},
    "oe": {"oe"},
    "oe-aug": {"oe", "aug"},
    "oe-aug-mix": {"oe", "aug", "mix"},
    "oe-aug-both": {"oe", "aug", "mix", "aug-outliers"},
    "oe-fonts": {"oe", "aug", "mix", "aug-outliers", "fonts"},
    # oe-fonts with as many non-digits as digits and loss weight 1 ("heavy"), or twice the epochs ("long")
    "oe-fonts-heavy": {"oe", "aug", "mix", "aug-outliers", "fonts", "heavy"},
    "oe-fonts-long": {"oe", "aug", "mix", "aug-outliers", "fonts", "long"},
    "oe-fonts-heavy-long": {"oe", "aug", "mix", "aug-outliers", "fonts", "heavy", "long"},
}
VARIANTS = tuple(RECIPES)
FONT_DIGITS = 16  # typeset digits added to each batch of 128 ("fonts")
SCORES = ("density", "confidence", "combined")
OE_WEIGHT = 0.5  # Hendrycks et al.'s weight of the uniform-target loss
OE_SHARE = 0.5  # non-digits per digit in a batch
AUG_SHARE = 0.5  # the share of each batch of digits augmented (the rest stays as MNIST is)
MIX_SHARE = 1 / 3  # oe-aug-mix: the share of non-digits made from digits
POOL = 30_000  # generated non-digits drawn once (about 1.5 minutes) and cached in mnistlab's cache folder


def measuring_sets(count: int, seed: int, data_dir: Path | None) -> dict[str, tuple[torch.Tensor, int]]:
    """trust_table's sets (`write_nondigits`, `write_real_digits` of `seed`), preprocessed as `predict` does:
    per kind, the 28x28 views and how many images preprocessing refused. Cached between runs."""
    path = CACHE / f"sets-{count}-{seed}.pt"
    if path.exists():
        return torch.load(path)
    sets = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in NONDIGIT_KINDS:
            views, kept = preprocessed(write_nondigits(kind, count, Path(tmp) / kind, seed, None))
            sets[kind] = (views, int((~kept).sum()))
        for kind in REAL_DIGIT_KINDS:
            written = write_real_digits(kind, count, Path(tmp) / f"real-{kind}", seed, data_dir)
            views, kept = preprocessed([p for p, _ in written])
            sets[kind] = (views, int((~kept).sum()))
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(sets, path)
    return sets


def train(variant: str, epochs: int, data_dir: str | None, seed: int) -> tuple[Standardized, float]:
    """cnn-fast's network trained as `variant` says (its optimizer, OneCycle schedule, label smoothing and EMA
    from the config, a plain loop); the EMA network with its standardisation, and the minutes it took."""
    config = load_config("cnn-fast")
    t = config.training
    recipe = RECIPES[variant]
    epochs *= 2 if "long" in recipe else 1
    share, weight = (1.0, 1.0) if "heavy" in recipe else (OE_SHARE, OE_WEIGHT)
    data = load_data("mnist", data_dir, config.data.val_size, t.seed)
    normalize = (data.mean, data.std) if config.data.normalize else None
    torch.manual_seed(t.seed)
    network = build_model(config.model)
    optimizer = make_optimizer(network.parameters(), config.optimizer)
    steps = math.ceil(len(data.train) / t.batch_size)
    scheduler = make_scheduler(optimizer, dataclasses.replace(t, epochs=epochs), steps)
    ema = Ema(network, t.ema_decay)
    loss_fn = make_loss(t.loss, False, t.label_smoothing)
    shuffle = torch.Generator().manual_seed(t.seed)
    rng = torch.Generator().manual_seed(t.seed + 1)
    exposed = "oe" in recipe
    outliers = to_float(nondigit_pool(POOL, seed)) if exposed else None
    fonts = typeset_pool(5000, seed) if "fonts" in recipe else None
    start = time.perf_counter()
    network.train()
    for _ in range(epochs):
        for index in batch_indices(len(data.train), t.batch_size, shuffle):
            batch = take(data.train, index)
            x, labels = to_float(batch.images), batch.labels
            if fonts is not None:
                pick = torch.randint(0, len(fonts[1]), (FONT_DIGITS,), generator=rng)
                x, labels = torch.cat([x, to_float(fonts[0][pick])]), torch.cat([labels, fonts[1][pick]])
            if "aug" in recipe:
                x = vary_strokes(x, AUG_SHARE, rng)
            n = len(x)
            if outliers is not None:
                k = round(share * n)
                extra = outliers[torch.randint(0, len(outliers), (k,), generator=rng)]
                if "mix" in recipe:  # k <= n: the first share of them, where the pair's classes differ
                    made, usable = from_digits(x, labels, rng)
                    mixed = (torch.arange(k) < round(MIX_SHARE * k)) & usable[:k]
                    extra = torch.where(mixed[:, None, None], made[:k], extra)
                if "aug-outliers" in recipe:
                    extra = vary_strokes(extra, AUG_SHARE, rng)
                x = torch.cat([x, extra])
            out = network(standardize_(x, normalize))
            loss = loss_fn(out[:n], labels)
            if exposed:
                # Cross-entropy to the uniform distribution: the mean negative log-probability over the classes.
                loss = loss + weight * -out[n:].log_softmax(1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            ema.update()
    ema.copy_buffers()
    return Standardized(ema.model.eval(), normalize), (time.perf_counter() - start) / 60


def scorers(
    model: Standardized, data_dir: str | None, seed: int
) -> tuple[Callable[[torch.Tensor], dict[str, torch.Tensor]], dict[str, float], float]:
    """A function from float images to their three scores and the predicted class, the thresholds that flag 1%
    of the validation split, and the test accuracy."""
    config = load_config("cnn-fast")
    data = load_data("mnist", data_dir, config.data.val_size, config.training.seed)
    train_x = to_float(data.train.images)
    density, _ = fit_detector(model, (train_x, data.train.labels), to_float(data.val.images))

    def raw(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = features_of(model, images)
        with torch.inference_mode():
            return density(features), model.network[-1](features).softmax(1)

    val_density, val_probs = raw(to_float(data.val.images))
    temperature = fit_temperature(val_probs, data.val.labels)
    thresholds = {"density": flagging_threshold(val_density)}
    thresholds["confidence"] = flagging_threshold(1 - temper(val_probs, temperature).max(1).values)

    def score(images: torch.Tensor) -> dict[str, torch.Tensor]:
        d, probs = raw(images)
        c = 1 - temper(probs, temperature).max(1).values
        both = torch.maximum(d / thresholds["density"], c / thresholds["confidence"])
        return {"density": d, "confidence": c, "combined": both, "predicted": probs.argmax(1)}

    thresholds["combined"] = flagging_threshold(score(to_float(data.val.images))["combined"])
    test = score(to_float(data.test.images))
    accuracy = float((test["predicted"] == data.test.labels).double().mean())
    return score, thresholds, accuracy


def measure(variant: str, epochs: int, data_dir: str | None, seed: int, sets: dict) -> dict:
    """Train `variant` and measure it: accuracy, minutes, and per score the share flagged of each kind."""
    model, minutes = train(variant, epochs, data_dir, seed)
    score, thresholds, accuracy = scorers(model, data_dir, seed)
    test = load_data("mnist", data_dir, 0, 0).test.images
    shares: dict[str, dict[str, float]] = {s: {} for s in SCORES}
    scored = {"mnist": (score(to_float(test)), 0, len(test))}
    for kind, (views, refused) in sets.items():
        scored[kind] = (score(views), refused, len(views) + refused)
    for s in SCORES:
        for kind, (values, refused, total) in scored.items():
            shares[s][kind] = (int(flagged(values[s], thresholds[s]).sum()) + refused) / total
    epochs *= 2 if "long" in RECIPES[variant] else 1
    return {"variant": variant, "epochs": epochs, "minutes": minutes, "accuracy": accuracy, "shares": shares}


def table(results: dict[str, dict]) -> str:
    kinds = [*(f"{k} (real)" for k in REAL_DIGIT_KINDS), *NONDIGIT_KINDS]
    lines = [
        f"| variant | score | test accuracy | MNIST test | {' | '.join(kinds)} |",
        "|---|---|---:|---:|" + "---:|" * len(kinds),
    ]
    for variant in [v for v in VARIANTS if v in results]:
        r = results[variant]
        for s in SCORES:
            shares = r["shares"][s]
            cells = [f"{100 * shares['mnist']:.2f}%"]
            cells += [f"{100 * shares[k]:.1f}%" for k in (*REAL_DIGIT_KINDS, *NONDIGIT_KINDS)]
            lines.append(f"| {variant} | {s} | {100 * r['accuracy']:.2f}% | {' | '.join(cells)} |")
    return "\n".join(lines)


def main() -> None:
    torch.set_num_threads(1)  # the machine is shared; and every figure below is one thread's
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--epochs", type=int, default=2, help="cnn-fast's own schedule has 2")
    parser.add_argument("--count", type=int, default=300, help="images per measured kind")
    parser.add_argument("--seed", type=int, default=1, help="the measuring sets' seed")
    parser.add_argument("--pool-seed", type=int, default=100, help="the generated training non-digits' seed")
    parser.add_argument("--data-dir", default=None, help="MNIST's folder")
    parser.add_argument("--results", type=Path, default=CACHE / "results.json", help="accumulated results")
    parser.add_argument("--write", action="store_true", help="write the table into docs/outliers.md")
    args = parser.parse_args()

    sets = measuring_sets(args.count, args.seed, Path(args.data_dir) if args.data_dir else None)
    results = json.loads(args.results.read_text()) if args.results.exists() else {}
    for variant in args.variants:
        results[variant] = measure(variant, args.epochs, args.data_dir, args.pool_seed, sets)
        results[variant]["machine"] = machine()
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(results, indent=1))
        print(table({variant: results[variant]}), f"\n({results[variant]['minutes']:.1f} min)", flush=True)
    timing = ", ".join(
        f"{v} {results[v]['minutes']:.1f}" + (f" ({results[v]['epochs']} epochs)" if results[v]["epochs"] != 2 else "")
        for v in VARIANTS
        if v in results
    )
    machines = sorted({r["machine"] for r in results.values()})
    section = f"""Command: `.venv/bin/python benchmarks/outlier_exposure.py --write` ({args.count} images of each kind,
generated with seed {args.seed}; training non-digits from mnistlab/data/exposure.py, seed {args.pool_seed}).
Machine: {"; ".join(machines)}. Minutes per training (2 epochs unless said, 1 thread): {timing}.

Share flagged at the threshold that flags 1% of the validation split. The goal (issue 22): at most 1% of MNIST
test digits and 3% of real digit images flagged, at least 95% of each non-digit kind.

{table(results)}"""
    print(section)
    if args.write:
        write_section("outlier-exposure", section, DOC)


if __name__ == "__main__":
    main()
