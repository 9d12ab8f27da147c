"""The `mnistlab` command: argument parsing only; each command calls one API function."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from mnistlab.errors import MnistlabError


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the empty ones (None, False) that would only add noise."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, argparse.SUPPRESS):
            return action.help or ""
        return super()._get_help_string(action)


MODEL_HELP = "a run directory or model file (.safetensors with its .json); default: the bundled pretrained model"


def _add_common(p: argparse.ArgumentParser, data: bool = True, device: bool = True) -> None:
    if data:
        p.add_argument(
            "--data-dir",
            default=None,
            help="folder with the dataset's IDX files (default: $MNISTLAB_DATA, else the user cache, "
            "downloading there if needed)",
        )
    if device:
        p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")


def build_parser() -> argparse.ArgumentParser:
    fmt = _Formatter
    parser = argparse.ArgumentParser(
        prog="mnistlab",
        description="Train, compare, explain and use MNIST digit classifiers.",
        formatter_class=fmt,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a config and write a run directory", formatter_class=fmt)
    p.add_argument("--config", help="a shipped config name (see `mnistlab configs`) or a TOML file")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its last checkpoint")
    p.add_argument("--epochs", type=int, help="override training.epochs (with --resume: the new total)")
    p.add_argument("--batch-size", type=int, help="override training.batch_size")
    p.add_argument("--seed", type=int, help="override training.seed")
    p.add_argument("--val-size", type=int, help="override data.val_size (0: no validation split)")
    g = p.add_argument_group("loss")
    g.add_argument("--loss", help="cross-entropy, nll, mse or hinge")
    g.add_argument("--label-smoothing", type=float, help="label smoothing for cross-entropy")
    g = p.add_argument_group("optimizer and schedule")
    g.add_argument("--optimizer", help="sgd, adam, adamw, rmsprop, adagrad or adadelta")
    g.add_argument("--lr", type=float, help="override optimizer.lr (the peak lr with onecycle)")
    g.add_argument("--momentum", type=float, help="momentum for sgd and rmsprop")
    g.add_argument("--nesterov", action="store_true", default=None, help="Nesterov momentum (sgd)")
    g.add_argument("--weight-decay", type=float, help="weight decay (decoupled for adamw)")
    g.add_argument("--scheduler", help="none, step, cosine or onecycle (stepped every batch)")
    g.add_argument("--warmup-epochs", type=float, help="linear warm-up length (onecycle: its rising phase)")
    g = p.add_argument_group("early stopping")
    g.add_argument(
        "--early-stopping", type=int, metavar="PATIENCE", help="stop after PATIENCE epochs without improvement"
    )
    g.add_argument("--monitor", help="val_loss or val_accuracy (the config's default: val_loss)")
    g.add_argument("--min-delta", type=float, help="the smallest change that counts as an improvement")
    p.add_argument("--out", help="run directory (default: runs/<config name>)")
    p.add_argument("--force", action="store_true", help="overwrite an existing run directory")
    p.add_argument("--tensorboard", action="store_true", help="also log to RUN_DIR/tensorboard (needs tensorboard)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    _add_common(p)

    p = sub.add_parser(
        "evaluate", help="test accuracy, loss, per-class accuracy, confusion matrix", formatter_class=fmt
    )
    p.add_argument("model", nargs="?", help=MODEL_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--tta", action="store_true", help="average each image with its four 1-pixel shifts")
    _add_common(p)

    p = sub.add_parser(
        "reproduce", help="run the report's six seed configs (or a study) with a report", formatter_class=fmt
    )
    p.add_argument("--study", default="seed", help="seed (the report's six networks), losses or optimizers")
    p.add_argument("--out", help="folder for the runs and report.md (default: runs/reproduce, runs/study-<name>)")
    p.add_argument("--epochs", type=int, help="override the configs' 10 epochs")
    p.add_argument("--force", action="store_true", help="overwrite existing runs in --out")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors and the report's path")
    _add_common(p)

    p = sub.add_parser("ensemble", help="average several trained models into one model file", formatter_class=fmt)
    p.add_argument("members", nargs="+", metavar="RUN_DIR", help="run directories or model files to average")
    p.add_argument("--out", required=True, help="folder for the ensemble's model.safetensors and model.json")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out folder")
    _add_common(p)

    p = sub.add_parser("compare", help="compare run directories in a Markdown report", formatter_class=fmt)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories to compare")
    p.add_argument("--out", default="runs/compare", help="folder for report.md and its plots")

    p = sub.add_parser("predict", help="classify image files (photos, scans, drawings of digits)", formatter_class=fmt)
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, or folders to search for images")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--top-k", type=int, default=1, help="show the K most likely digits")
    p.add_argument("--json", action="store_true", help="one JSON object per image, one per line")
    p.add_argument("--show", metavar="DIR", help="save, per image, the original beside what the model saw")
    p.add_argument(
        "--polarity",
        choices=("auto", "dark-on-light", "light-on-dark"),
        default="auto",
        help="ink polarity; auto decides from each image",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")

    p = sub.add_parser(
        "classify", help="interactive: type image paths, get digits ('exit' to stop)", formatter_class=fmt
    )
    p.add_argument("--model", help=MODEL_HELP)

    p = sub.add_parser(
        "inspect", help="confusion matrix, most-confused pairs, misclassified gallery", formatter_class=fmt
    )
    p.add_argument("model", nargs="?", help=MODEL_HELP)
    p.add_argument("--out", help="folder for the figures (default: <run dir>/inspect, or runs/inspect)")
    _add_common(p)

    p = sub.add_parser("export", help="export a model to ONNX and check it against PyTorch", formatter_class=fmt)
    p.add_argument("model", nargs="?", help=MODEL_HELP)
    p.add_argument("--onnx", required=True, metavar="FILE", help="where to write the .onnx file")
    _add_common(p, device=False)

    p = sub.add_parser(
        "robustness", help="accuracy under MNIST-C corruptions and FGSM/PGD attacks, with a report", formatter_class=fmt
    )
    p.add_argument("model", nargs="?", help=MODEL_HELP)
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
    _add_common(p)

    sub.add_parser("configs", help="list the shipped configs", formatter_class=fmt)
    return parser


def _train(args: argparse.Namespace) -> None:
    from mnistlab.config import load_config
    from mnistlab.training import resume, train

    overrides = {
        "training.epochs": args.epochs,
        "training.batch_size": args.batch_size,
        "training.seed": args.seed,
        "data.val_size": args.val_size,
        "training.loss": args.loss,
        "training.label_smoothing": args.label_smoothing,
        "optimizer.name": args.optimizer,
        "optimizer.lr": args.lr,
        "optimizer.momentum": args.momentum,
        "optimizer.nesterov": args.nesterov,
        "optimizer.weight_decay": args.weight_decay,
        "training.scheduler": args.scheduler,
        "training.warmup_epochs": args.warmup_epochs,
        "training.early_stopping": args.early_stopping,
        "training.monitor": args.monitor,
        "training.min_delta": args.min_delta,
    }
    common = {"data_dir": args.data_dir, "device": args.device, "quiet": args.quiet, "tensorboard": args.tensorboard}
    if args.resume:
        changed = [k for k, v in overrides.items() if v is not None and k != "training.epochs"]
        if changed or args.out or args.force:
            raise MnistlabError("--resume continues a run as it was configured; only --epochs may change")
        config = load_config(args.config) if args.config else None
        run = resume(args.resume, args.epochs, config=config, **common)
    elif not args.config:
        raise MnistlabError("give --config NAME|FILE to start a run, or --resume RUN_DIR to continue one")
    else:
        config = load_config(args.config).with_overrides(overrides)
        run = train(config, args.out or f"runs/{config.name}", force=args.force, **common)
    if args.quiet:
        return
    saved = run.best if run.config.training.early_stopping else run.final
    print(
        f"test accuracy {100 * saved['test_accuracy']:.2f}%, test loss {saved['test_loss']:.4f} "
        f"(model of epoch {saved['epoch']} of {len(run.epochs)}; stopped by {run.stop_reason})"
    )
    print(f"outputs in {run.run_dir}/ (curves: {run.run_dir}/curves.png)")


def _evaluate(args: argparse.Namespace) -> None:
    from mnistlab.predict import evaluate

    result = evaluate(args.model, args.data_dir, args.device, args.tta)
    if args.json:
        print(json.dumps(result.to_dict()))
        return
    names = result.classes
    print(f"test accuracy {100 * result.accuracy:.2f}%, loss {result.loss:.4f}")
    print("per-class accuracy: " + "  ".join(f"{n}: {100 * a:.2f}%" for n, a in zip(names, result.per_class_accuracy)))
    if names != [str(d) for d in range(10)]:
        print("classes: " + ", ".join(f"{d} {n}" for d, n in enumerate(names)))
    print("confusion matrix (rows: true class, columns: predicted):")
    print("      " + "".join(f"{d:>6}" for d in range(10)))
    for d, row in enumerate(result.confusion_matrix):
        print(f"{d:>6}" + "".join(f"{v:>6}" for v in row))


def _reproduce(args: argparse.Namespace) -> None:
    from mnistlab.reports import reproduce

    out = args.out or ("runs/reproduce" if args.study == "seed" else f"runs/study-{args.study}")
    report = reproduce(out, args.epochs, args.data_dir, args.device, args.quiet, args.force, args.study)
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
    print(f"report: {compare(args.runs, args.out, command=command)}")


def _predict(args: argparse.Namespace) -> int:
    from mnistlab.checkpoint import load_model
    from mnistlab.devices import resolve_device
    from mnistlab.plots import plot_prediction
    from mnistlab.predict import predict_images

    model = load_model(args.model, resolve_device(args.device))
    invert = {"auto": None, "dark-on-light": True, "light-on-dark": False}[args.polarity]
    failures = 0
    for i, p in enumerate(predict_images(args.paths, model, invert, keep_preprocessed=bool(args.show))):
        if p.error is not None:
            failures += 1
            print(f"mnistlab: error: {p.error}", file=sys.stderr)
            if args.json:
                print(json.dumps(p.to_dict()), flush=True)
            continue
        if args.json:
            print(json.dumps(p.to_dict()), flush=True)
        else:
            ranked = sorted(range(10), key=lambda d: -p.probabilities[d])[: max(1, args.top_k)]
            others = "  ".join(f"{model.classes[d]}: {100 * p.probabilities[d]:.1f}%" for d in ranked[1:])
            line = f"{p.path}: {p.class_name} ({100 * p.confidence:.1f}%)" + (f"  [{others}]" if others else "")
            print(line, flush=True)
        if args.show:
            pre = p.preprocessed
            target = Path(args.show) / f"{i:04d}-{Path(p.path).stem}.png"
            plot_prediction(pre.original, pre.digit, p.probabilities, target, f"{p.path}: {p.class_name}")
    return 1 if failures else 0


def _classify(args: argparse.Namespace) -> None:
    from mnistlab.checkpoint import load_model
    from mnistlab.predict import predict_images

    model = load_model(args.model)
    while True:
        print("Please enter a filepath:", flush=True)
        try:
            line = input().strip()
        except EOFError:
            break
        if line == "exit":
            print("Exiting...")
            break
        if not line:
            continue
        if Path(line).is_dir():
            print(f"mnistlab: error: {line}: a folder; give one image file", file=sys.stderr, flush=True)
            continue
        p = next(predict_images([line], model))
        if p.error is not None:
            print(f"mnistlab: error: {p.error}", file=sys.stderr, flush=True)
        else:
            print(f"Classifier: {p.class_name}", flush=True)


def _inspect(args: argparse.Namespace) -> None:
    from mnistlab.predict import inspect

    default = Path(args.model) / "inspect" if args.model and Path(args.model).is_dir() else Path("runs/inspect")
    out = Path(args.out) if args.out else default
    summary = inspect(args.model, out, args.data_dir, args.device)
    print(f"test accuracy {100 * summary['accuracy']:.2f}% ({summary['errors']} misclassified)")
    names = summary["classes"]
    print(
        "most confused (true -> predicted: count): "
        + ", ".join(f"{names[c['true']]}->{names[c['predicted']]}: {c['count']}" for c in summary["most_confused"])
    )
    print(f"figures in {out}/ (confusion.png, misclassified.png, inspection.json)")


def _export(args: argparse.Namespace) -> None:
    from mnistlab.export import export_onnx

    check = export_onnx(args.model, args.onnx, args.data_dir)
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
    default = Path(args.model) / "robustness" if args.model and Path(args.model).is_dir() else Path("runs/robustness")
    out = Path(args.out) if args.out else default
    result = robustness(args.model, out, settings, args.data_dir, args.device, args.force, args.quiet)
    if args.json:
        print(to_json(result))
        return
    print(format_summary(result))
    print(f"report: {out}/report.md")


def _configs(args: argparse.Namespace) -> None:
    from mnistlab.config import load_config, shipped_configs

    names = sorted(shipped_configs())
    width = max(map(len, names))
    for name in names:
        print(f"{name:<{width}}  {load_config(name).description}")


COMMANDS = {
    "train": _train,
    "evaluate": _evaluate,
    "reproduce": _reproduce,
    "ensemble": _ensemble,
    "compare": _compare,
    "predict": _predict,
    "classify": _classify,
    "inspect": _inspect,
    "export": _export,
    "robustness": _robustness,
    "configs": _configs,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args) or 0
    except MnistlabError as exc:
        print(f"mnistlab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mnistlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
