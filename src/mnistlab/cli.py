"""The `mnistlab` command: argument parsing only; each command calls one API function.

Nothing heavy is imported until a command runs, so `mnistlab --help` answers at once. Choices (losses,
optimizers, devices ...) come from the config module's own tuples, so help and validation cannot drift apart.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mnistlab import __version__
from mnistlab.config import DATASETS, DEVICES, ENGINES, LOSSES, MONITORS, OPTIMIZERS, PRUNERS, SCHEDULERS
from mnistlab.errors import MnistlabError

MODEL_HELP = "a run directory or model file (.safetensors with its .json); default: the bundled pretrained model"


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the empty ones (None, False) that would only add noise."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, argparse.SUPPRESS) or isinstance(action.default, list):
            return action.help or ""
        return super()._get_help_string(action)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the run stops at once and keeps what it saved."""


def _add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder with the dataset's IDX files (default: $MNISTLAB_DATA, else the user cache, "
        "downloading there if needed)",
    )


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=DEVICES, help="auto: CUDA, else Apple's MPS, else the CPU")


def _add_model(p: argparse.ArgumentParser, positional: bool = True) -> None:
    """The model a command uses: `--model PATH` on every command, or as the first argument where a command
    takes no other positional arguments."""
    if positional:
        p.add_argument("model_arg", nargs="?", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--model", help=MODEL_HELP if not positional else "the same as MODEL")


def _model(args: argparse.Namespace) -> str | None:
    positional = getattr(args, "model_arg", None)
    if positional and args.model and positional != args.model:
        raise MnistlabError(f"two models given ({positional} and --model {args.model}); give one")
    return positional or args.model


def build_parser() -> argparse.ArgumentParser:
    fmt = _Formatter
    parser = argparse.ArgumentParser(
        prog="mnistlab",
        description="Train, compare, explain and use MNIST digit classifiers.",
        formatter_class=fmt,
    )
    parser.add_argument("--version", action="version", version=f"mnistlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a config and write a run directory", formatter_class=fmt)
    p.add_argument("--config", help="a shipped config name (see `mnistlab configs`) or a TOML file")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its last checkpoint")
    p.add_argument("--epochs", type=int, help="override training.epochs (with --resume: the new total)")
    p.add_argument("--batch-size", type=int, help="override training.batch_size")
    p.add_argument("--seed", type=int, help="override training.seed")
    p.add_argument("--dataset", choices=DATASETS, help="override data.dataset")
    p.add_argument("--val-size", type=int, help="override data.val_size (0: no validation split)")
    g = p.add_argument_group("loss")
    g.add_argument("--loss", choices=LOSSES, help="override training.loss")
    g.add_argument("--label-smoothing", type=float, help="label smoothing for cross-entropy")
    g = p.add_argument_group("optimizer and schedule")
    g.add_argument("--optimizer", choices=OPTIMIZERS, help="override optimizer.name")
    g.add_argument("--lr", type=float, help="override optimizer.lr (the peak lr with onecycle)")
    g.add_argument("--momentum", type=float, help="momentum for sgd and rmsprop")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None, help="Nesterov momentum (sgd)")
    g.add_argument("--weight-decay", type=float, help="weight decay (decoupled for adamw)")
    g.add_argument("--scheduler", choices=SCHEDULERS, help="override training.scheduler (stepped every batch)")
    g.add_argument("--warmup-epochs", type=float, help="linear warm-up length (onecycle: its rising phase)")
    g = p.add_argument_group("early stopping")
    g.add_argument(
        "--early-stopping", type=int, metavar="PATIENCE", help="stop after PATIENCE epochs without improvement"
    )
    g.add_argument("--monitor", choices=MONITORS, help="override training.monitor")
    g.add_argument("--min-delta", type=float, help="the smallest change that counts as an improvement")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set augment.rotate=10 --set training.amp=true "
        "(VALUE as in TOML; repeatable; keys: `mnistlab configs --keys`)",
    )
    p.add_argument("--out", help="run directory (default: runs/<config name>)")
    p.add_argument("--force", action="store_true", help="overwrite an existing run directory")
    p.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="train in N processes on this machine (torchrun --standalone --nproc-per-node N; see docs/distributed.md)",
    )
    p.add_argument("--tensorboard", action="store_true", help="also log to RUN_DIR/tensorboard (needs tensorboard)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    _add_data_dir(p)
    _add_device(p)

    p = sub.add_parser(
        "evaluate", help="test accuracy, loss, per-class accuracy, confusion matrix", formatter_class=fmt
    )
    _add_model(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--tta", action="store_true", help="average each image with its four 1-pixel shifts")
    p.add_argument(
        "--images",
        metavar="DIR",
        help="evaluate on your own images instead of the test split: DIR/<class>/*.png, folders named by class "
        "(0-9, or the model's class names), as torchvision's ImageFolder lays them out",
    )
    _add_data_dir(p)
    _add_device(p)

    p = sub.add_parser(
        "reproduce", help="run the report's six seed configs (or a study) with a report", formatter_class=fmt
    )
    p.add_argument("--study", default="seed", choices=("seed", "losses", "optimizers"), help="what to run")
    p.add_argument("--out", help="folder for the runs and report.md (default: runs/reproduce, runs/study-<name>)")
    p.add_argument("--epochs", type=int, help="override the configs' 10 epochs")
    p.add_argument("--force", action="store_true", help="retrain every run from scratch (default: continue)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors and the report's path")
    _add_data_dir(p)
    _add_device(p)

    p = sub.add_parser("ensemble", help="average several trained models into one model file", formatter_class=fmt)
    p.add_argument("members", nargs="+", metavar="RUN_DIR", help="run directories or model files to average")
    p.add_argument("--out", required=True, help="folder for the ensemble's model.safetensors and model.json")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out folder")
    _add_data_dir(p)
    _add_device(p)

    p = sub.add_parser("compare", help="compare run directories in a Markdown report", formatter_class=fmt)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories to compare")
    p.add_argument("--out", default="runs/compare", help="folder for report.md and its plots")
    p.add_argument("--force", action="store_true", help="replace an existing comparison in --out")

    p = sub.add_parser("predict", help="classify image files (photos, scans, drawings of digits)", formatter_class=fmt)
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, or folders to search for images")
    _add_model(p, positional=False)
    p.add_argument("--top-k", type=int, default=1, help="show the K most likely classes (1-10)")
    p.add_argument("--json", action="store_true", help="one JSON object per image, one per line")
    p.add_argument("--show", metavar="DIR", help="save, per image, the original beside what the model saw")
    p.add_argument(
        "--polarity",
        choices=("auto", "dark-on-light", "light-on-dark"),
        default="auto",
        help="ink polarity; auto decides from each image",
    )
    _add_device(p)

    p = sub.add_parser(
        "classify", help="interactive: type image paths, get digits ('exit' to stop)", formatter_class=fmt
    )
    _add_model(p, positional=False)
    _add_device(p)

    p = sub.add_parser(
        "inspect", help="confusion matrix, most-confused pairs, misclassified gallery", formatter_class=fmt
    )
    _add_model(p)
    p.add_argument("--out", help="folder for the figures (default: <run dir>/inspect, or runs/inspect)")
    _add_data_dir(p)
    _add_device(p)

    p = sub.add_parser("export", help="export a model to ONNX and check it against PyTorch", formatter_class=fmt)
    _add_model(p)
    p.add_argument("--onnx", required=True, metavar="FILE", help="where to write the .onnx file")
    p.add_argument("--force", action="store_true", help="replace an existing FILE")
    _add_data_dir(p)

    p = sub.add_parser(
        "serve", help="a web page to draw or upload digits, with a JSON API (needs mnistlab[web])", formatter_class=fmt
    )
    p.add_argument("models", nargs="*", metavar="MODEL", help="run directories or model files to serve as well")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: reachable from the network)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    p.add_argument("--collect", metavar="DIR", help="show 'That was a N' buttons that save drawings into DIR/<N>/")
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="processes that decode and preprocess uploads (default: one per CPU core, at most 4; 0: none)",
    )
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default="auto",
        help="what runs the models: onnxruntime (an ONNX copy checked against PyTorch; about twice as fast for "
        "one image on a CPU), torch, or auto: onnxruntime where it is installed and the device is the CPU",
    )
    _add_device(p)

    p = sub.add_parser(
        "sweep",
        help="search config settings with Optuna (parallel workers, pruning, shared storage)",
        formatter_class=fmt,
        description="Each trial is an ordinary run directory in OUT/trials/<number>/; the objective is a validation "
        "metric. Running the same command again continues the study. Several machines join one study by giving "
        "the same --storage (an SQL database URL) and --study.",
    )
    p.add_argument("--config", help="the base config every trial starts from (a shipped name or a TOML file)")
    p.add_argument(
        "--space",
        action="append",
        metavar="KEY=SPEC",
        help="a config key to search: log:LOW:HIGH, int:LOW:HIGH, float:LOW:HIGH or A,B,C (one value fixes it); "
        "repeat for more keys",
    )
    p.add_argument("--space-file", metavar="FILE", help="a TOML file with [space] (and [set] for fixed values)")
    p.add_argument("--preset", help="a shipped sweep: seed-lr (learning rate and optimizer for networks A, B, C)")
    p.add_argument("--trials", type=int, help="finished trials the study should have in total (default 20)")
    p.add_argument("--epochs", type=int, help="override training.epochs for every trial")
    p.add_argument("--metric", default="val_accuracy", help="the objective: val_accuracy (maximised) or val_loss")
    p.add_argument("--pruner", default="median", choices=PRUNERS, help="stop hopeless trials after an epoch")
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    p.add_argument("--threads", type=int, help="torch threads per worker (default: CPU cores / workers)")
    p.add_argument(
        "--storage", help="SQL database URL (postgresql://user@host/db) or journal file (default: OUT/study.journal)"
    )
    p.add_argument("--study", help="the study's name in the storage (default: the --out folder's name)")
    p.add_argument("--out", help="sweep folder (default: sweeps/<preset or config name>)")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="start no new trial after this many seconds")
    p.add_argument("--report", metavar="DIR", help="only redraw DIR's report, best.toml and plots from its storage")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors and the report's path")
    _add_data_dir(p)
    _add_device(p)

    p = sub.add_parser(
        "robustness", help="accuracy under MNIST-C corruptions and FGSM/PGD attacks, with a report", formatter_class=fmt
    )
    _add_model(p)
    p.add_argument("--out", help="folder for report.md, robustness.json and figures (default: <run dir>/robustness)")
    p.add_argument("--corruptions", default="all", help="comma-separated MNIST-C corruptions, all, or none")
    p.add_argument("--attacks", default="fgsm,pgd", help="fgsm, pgd, both (comma-separated), or none")
    p.add_argument("--eps", default="0.1,0.2,0.3", help="L-infinity radii, pixels in [0, 1]")
    p.add_argument("--images", type=int, help="corrupt the first N test images (default: all of them)")
    p.add_argument("--adversarial-images", type=int, default=1000, help="attack the first N test images")
    p.add_argument("--pgd-steps", type=int, default=40, help="PGD steps (from a random start)")
    p.add_argument("--step-size", type=float, default=0.01, help="PGD step size")
    p.add_argument("--seed", type=int, default=0, help="seed of the corruptions and of PGD's random start")
    p.add_argument("--json", action="store_true", help="print the measurements as one JSON object")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out folder")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    _add_data_dir(p)
    _add_device(p)

    p = sub.add_parser("configs", help="list the shipped configs", formatter_class=fmt)
    p.add_argument("--keys", action="store_true", help="list every config key with its default instead")
    return parser


# ---------------------------------------------------------------------------------------------- train

# The dedicated flags of `train`, by the config key each overrides.
_TRAIN_FLAGS = {
    "training.epochs": "epochs",
    "training.batch_size": "batch_size",
    "training.seed": "seed",
    "data.dataset": "dataset",
    "data.val_size": "val_size",
    "training.loss": "loss",
    "training.label_smoothing": "label_smoothing",
    "optimizer.name": "optimizer",
    "optimizer.lr": "lr",
    "optimizer.momentum": "momentum",
    "optimizer.nesterov": "nesterov",
    "optimizer.weight_decay": "weight_decay",
    "training.scheduler": "scheduler",
    "training.warmup_epochs": "warmup_epochs",
    "training.early_stopping": "early_stopping",
    "training.monitor": "monitor",
    "training.min_delta": "min_delta",
}


def parse_set(items: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings as overrides; VALUE is read as a TOML value (`true`, `0.1`, `["conv 8 3"]`), else
    taken as a plain string (`sgd`)."""
    import tomllib

    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise MnistlabError(f"--set {item!r}: expected KEY=VALUE, e.g. --set optimizer.lr=0.01")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        overrides[key.strip()] = value
    return overrides


def _train(args: argparse.Namespace) -> int | None:
    from mnistlab import distributed
    from mnistlab.checkpoint import CHECKPOINT
    from mnistlab.config import load_config
    from mnistlab.training import resume, train

    if args.nproc is not None:
        if distributed.environment_world_size() > 1:
            raise MnistlabError("--nproc starts torchrun itself; under torchrun, leave it out")
        return distributed.launch(args.nproc, _without_nproc(args.argv))
    overrides = {key: getattr(args, flag) for key, flag in _TRAIN_FLAGS.items()}
    overrides.update(parse_set(args.set))
    common = {"data_dir": args.data_dir, "device": args.device, "quiet": args.quiet, "tensorboard": args.tensorboard}
    if args.resume:
        changed = [k for k, v in overrides.items() if v is not None and k != "training.epochs"]
        if changed or args.out or args.force:
            raise MnistlabError("--resume continues a run as it was configured; only --epochs may change")
        config = load_config(args.config) if args.config else None
        run = resume(args.resume, epochs=args.epochs, config=config, **common)
    elif not args.config:
        raise MnistlabError("give --config NAME|FILE to start a run, or --resume RUN_DIR to continue one")
    else:
        config = load_config(args.config).with_overrides(overrides)
        out = Path(args.out or f"runs/{config.name}")
        if distributed.restarted() and (out / CHECKPOINT).is_file():
            # torchrun restarted the job after a rank failed (--max-restarts): go on from the last checkpoint.
            run = resume(out, epochs=config.training.epochs, config=config, **common)
        else:
            run = train(config, out_dir=out, force=args.force, **common)
    if args.quiet or run.run_dir is None:  # quiet, or a rank other than 0 of a distributed run
        return None
    saved = run.saved
    print(
        f"test accuracy {100 * saved['test_accuracy']:.2f}%, test loss {saved['test_loss']:.4f} "
        f"(model of epoch {saved['epoch']} of {len(run.epochs)}; stopped by {run.stop_reason})"
    )
    print(f"outputs in {run.run_dir}/ (curves: {run.run_dir}/curves.png)")
    return None


def _without_nproc(argv: list[str]) -> list[str]:
    """The command line with `--nproc N` (or `--nproc=N`) taken out, for the processes torchrun starts."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


# ---------------------------------------------------------------------------------------------- the others


def _evaluate(args: argparse.Namespace) -> None:
    from mnistlab.files import to_json
    from mnistlab.predict import evaluate, evaluate_images

    if args.images:
        found = evaluate_images(args.images, _model(args), args.device, args.tta)
        for problem in found.skipped:
            print(f"mnistlab: warning: {problem} (not counted)", file=sys.stderr)
        result, what = found.evaluation, f"accuracy on {found.count} images in {args.images}"
    else:
        result, what = evaluate(_model(args), args.data_dir, args.device, args.tta), "test accuracy"
    if args.json:
        print(to_json(result.to_dict() | ({"images": found.count, "skipped": found.skipped} if args.images else {})))
        return
    names = result.classes
    print(f"{what} {100 * result.accuracy:.2f}%, loss {result.loss:.4f}")
    rows = zip(result.per_class_accuracy, result.confusion_matrix)
    shown = [f"{100 * a:.2f}%" if sum(row) else "-" for a, row in rows]  # "-": no image of that class
    print("per-class accuracy: " + "  ".join(f"{n}: {a}" for n, a in zip(names, shown)))
    if names != [str(d) for d in range(10)]:
        print("classes: " + ", ".join(f"{d} {n}" for d, n in enumerate(names)))
    print("confusion matrix (rows: true class, columns: predicted):")
    print("      " + "".join(f"{d:>6}" for d in range(10)))
    for d, row in enumerate(result.confusion_matrix):
        print(f"{d:>6}" + "".join(f"{v:>6}" for v in row))


def _reproduce(args: argparse.Namespace) -> None:
    from mnistlab.reports import reproduce

    out = args.out or ("runs/reproduce" if args.study == "seed" else f"runs/study-{args.study}")
    report = reproduce(
        out,
        study=args.study,
        epochs=args.epochs,
        data_dir=args.data_dir,
        device=args.device,
        force=args.force,
        quiet=args.quiet,
    )
    print(f"report: {report}")


def _ensemble(args: argparse.Namespace) -> None:
    from mnistlab.predict import make_ensemble

    result = make_ensemble(args.members, args.out, args.data_dir, args.device, args.force)
    for member, accuracy in result["members"].items():
        print(f"member {member}: test accuracy {100 * accuracy:.2f}%")
    print(f"ensemble of {len(result['members'])}: test accuracy {100 * result['accuracy']:.2f}% -> {args.out}/")


def _compare(args: argparse.Namespace) -> None:
    from mnistlab.reports import compare

    command = "mnistlab compare " + " ".join(args.runs)
    print(f"report: {compare(args.runs, args.out, command=command, force=args.force)}")


def _predict(args: argparse.Namespace) -> int:
    from mnistlab.checkpoint import load_model
    from mnistlab.devices import resolve_device
    from mnistlab.files import make_dirs, to_json
    from mnistlab.plots import plot_prediction
    from mnistlab.predict import predict_images

    if not 1 <= args.top_k <= 10:
        raise MnistlabError(f"--top-k must be between 1 and 10, got {args.top_k}")
    model = load_model(_model(args), resolve_device(args.device))
    if args.show:
        make_dirs(Path(args.show))  # before any work: a folder that cannot be made fails now
    invert = {"auto": None, "dark-on-light": True, "light-on-dark": False}[args.polarity]
    failures = 0
    for i, p in enumerate(predict_images(args.paths, model, invert, keep_preprocessed=bool(args.show))):
        if p.error is not None:
            failures += 1
            print(f"mnistlab: error: {p.error}", file=sys.stderr)
            if args.json:
                print(to_json(p.to_dict()), flush=True)
            continue
        if args.json:
            print(to_json(p.to_dict()), flush=True)
        else:
            ranked = sorted(range(10), key=lambda d: -p.probabilities[d])[: args.top_k]
            others = "  ".join(f"{model.classes[d]}: {100 * p.probabilities[d]:.1f}%" for d in ranked[1:])
            line = f"{p.path}: {p.class_name} ({100 * p.confidence:.1f}%)" + (f"  [{others}]" if others else "")
            print(line, flush=True)
        if args.show:
            pre = p.preprocessed
            target = Path(args.show) / f"{i:04d}-{Path(p.path).stem}.png"
            plot_prediction(pre.original, pre.digit, p.probabilities, target, f"{p.path}: {p.class_name}")
    return 1 if failures else 0


_QUIT = {"exit", "quit", "q"}


def _classify(args: argparse.Namespace) -> None:
    from mnistlab.checkpoint import load_model
    from mnistlab.devices import resolve_device
    from mnistlab.predict import predict_images

    model = load_model(_model(args), resolve_device(args.device))
    while True:
        print("Please enter a filepath:", flush=True)
        try:
            line = input().strip()
        except EOFError:
            break
        if line.lower() in _QUIT:
            print("Exiting...")
            break
        path = os.path.expanduser(line.strip("'\""))  # a path pasted with quotes, or starting with ~
        if not path:
            continue
        if Path(path).is_dir():
            print(f"mnistlab: error: {path}: a folder; give one image file", file=sys.stderr, flush=True)
            continue
        p = next(predict_images([path], model))
        if p.error is not None:
            print(f"mnistlab: error: {p.error}", file=sys.stderr, flush=True)
        else:
            print(f"Classifier: {p.class_name}", flush=True)


def _inspect(args: argparse.Namespace) -> None:
    from mnistlab.predict import inspect

    model = _model(args)
    default = Path(model) / "inspect" if model and Path(model).is_dir() else Path("runs/inspect")
    out = Path(args.out) if args.out else default
    summary = inspect(model, out, args.data_dir, args.device)
    print(f"test accuracy {100 * summary['accuracy']:.2f}% ({summary['errors']} misclassified)")
    names = summary["classes"]
    print(
        "most confused (true -> predicted: count): "
        + ", ".join(f"{names[c['true']]}->{names[c['predicted']]}: {c['count']}" for c in summary["most_confused"])
    )
    print(f"figures in {out}/ (confusion.png, misclassified.png, inspection.json)")


def _export(args: argparse.Namespace) -> None:
    from mnistlab.export import export_onnx

    check = export_onnx(_model(args), args.onnx, args.data_dir, force=args.force)
    print(
        f"wrote {check.path}: onnxruntime matches PyTorch on {check.images} test images "
        f"(max probability difference {check.max_abs_diff:.1e}, same digit for all)"
    )


def _robustness(args: argparse.Namespace) -> None:
    from mnistlab.files import to_json
    from mnistlab.robustness import RobustnessSettings, format_summary, parse_eps, parse_list, robustness

    settings = RobustnessSettings(
        corruptions=parse_list(args.corruptions, "corruptions"),
        attacks=parse_list(args.attacks, "attacks"),
        eps=parse_eps(args.eps),
        images=args.images,
        adversarial_images=args.adversarial_images,
        pgd_steps=args.pgd_steps,
        step_size=args.step_size,
        seed=args.seed,
    )
    model = _model(args)
    default = Path(model) / "robustness" if model and Path(model).is_dir() else Path("runs/robustness")
    out = Path(args.out) if args.out else default
    result = robustness(model, out, settings, args.data_dir, args.device, args.force, args.quiet)
    if args.json:
        print(to_json(result))
        return
    print(format_summary(result))
    print(f"report: {out}/report.md")


def _sweep(args: argparse.Namespace) -> None:
    from mnistlab.sweep import report, sweep

    if args.report:
        print(f"report: {report(args.report, storage=args.storage)}")
        return
    path = sweep(
        config=args.config,
        space=args.space or (),
        space_file=args.space_file,
        preset=args.preset,
        trials=args.trials,
        metric=args.metric,
        pruner=args.pruner,
        workers=args.workers,
        threads=args.threads,
        storage=args.storage,
        study=args.study,
        out=args.out,
        epochs=args.epochs,
        timeout=args.timeout,
        data_dir=args.data_dir,
        device=args.device,
        quiet=args.quiet,
    )
    print(f"report: {path}")


def _serve(args: argparse.Namespace) -> None:
    try:
        from mnistlab.serve import create_app, is_loopback, listen, run, url_of
    except ImportError as exc:
        raise MnistlabError(f"mnistlab serve needs the web extra: pip install 'mnistlab[web]' ({exc})") from None

    if args.workers is not None and args.workers < 0:
        raise MnistlabError(f"--workers must be 0 or more, not {args.workers}")
    sock = listen(args.host, args.port)  # first, so a taken port is reported before the models load
    app = create_app([None, *args.models], args.collect, args.device, args.workers, args.engine)
    if not is_loopback(args.host):
        print(
            f"mnistlab: warning: listening on {args.host}: the page and API are reachable from the network, "
            "without any authentication",
            file=sys.stderr,
        )
    engines = sorted({m.engine for m in app.state.served})
    print(
        f"serving {len(args.models) + 1} model(s) with {' and '.join(engines)} at {url_of(sock)} (Ctrl-C to stop)",
        flush=True,
    )
    # Requests are served side by side (uploads prepared in `workers` processes): one thread per forward pass
    # does more per core than a team of threads that wait for each other.
    run(app, sock, threads=1 if app.state.preparers.workers else None)


def _configs(args: argparse.Namespace) -> None:
    from mnistlab.config import Config, load_config, shipped_configs

    if args.keys:
        for key, value in Config().flat().items():
            print(f"{key} = {json.dumps(value)}")
        return
    names = sorted(shipped_configs())
    width = max(map(len, names))
    for name in names:
        print(f"{name:<{width}}  {load_config(name).description}")


COMMANDS: dict[str, Callable[[argparse.Namespace], int | None]] = {
    "train": _train,
    "evaluate": _evaluate,
    "reproduce": _reproduce,
    "ensemble": _ensemble,
    "compare": _compare,
    "predict": _predict,
    "classify": _classify,
    "inspect": _inspect,
    "export": _export,
    "sweep": _sweep,
    "robustness": _robustness,
    "configs": _configs,
    "serve": _serve,
}


def _terminate(signum: int, frame: object) -> None:
    raise _Terminated


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        code = COMMANDS[args.command](args) or 0
        sys.stdout.flush()  # here, where a reader that went away can still be handled
        return code
    except MnistlabError as exc:
        print(f"mnistlab: error: {exc}", file=sys.stderr)
        return 2
    except _Terminated:
        print("mnistlab: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("mnistlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`mnistlab configs | head -1`): stop quietly, as command-line tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
