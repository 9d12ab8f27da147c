"""The `mnistlab` command: argument parsing only; each command calls one API function."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from mnistlab.errors import MnistlabError


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the empty ones (None, False) that would only add noise."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, argparse.SUPPRESS):
            return action.help or ""
        return super()._get_help_string(action)


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
    p.add_argument("--config", required=True, help="a shipped config name (see `mnistlab configs`) or a TOML file")
    p.add_argument("--epochs", type=int, default=None, help="override training.epochs")
    p.add_argument("--batch-size", type=int, default=None, help="override training.batch_size")
    p.add_argument("--lr", type=float, default=None, help="override optimizer.lr")
    p.add_argument("--seed", type=int, default=None, help="override training.seed")
    p.add_argument("--val-size", type=int, default=None, help="override data.val_size (0: no validation split)")
    p.add_argument("--out", default=None, help="run directory (default: runs/<config name>)")
    p.add_argument("--force", action="store_true", help="overwrite an existing run directory")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    _add_common(p)

    p = sub.add_parser(
        "evaluate", help="test accuracy, loss, per-class accuracy, confusion matrix", formatter_class=fmt
    )
    p.add_argument("model", help="a run directory or a model file (.safetensors with its .json)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_common(p)

    p = sub.add_parser("reproduce", help="run the report's six seed configs and write a report", formatter_class=fmt)
    p.add_argument("--out", default="runs/reproduce", help="folder for the runs and report.md")
    p.add_argument("--epochs", type=int, default=None, help="override the configs' 10 epochs")
    p.add_argument("--force", action="store_true", help="overwrite existing runs in --out")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors and the report's path")
    _add_common(p)

    sub.add_parser("configs", help="list the shipped configs", formatter_class=fmt)
    return parser


def _train(args: argparse.Namespace) -> None:
    from mnistlab.config import load_config
    from mnistlab.training import train

    config = load_config(args.config).with_overrides(
        {
            "training.epochs": args.epochs,
            "training.batch_size": args.batch_size,
            "optimizer.lr": args.lr,
            "training.seed": args.seed,
            "data.val_size": args.val_size,
        }
    )
    out = args.out or f"runs/{config.name}"
    run = train(config, out, args.data_dir, args.device, args.quiet, args.force)
    final = run.final
    print(f"test accuracy {100 * final['test_accuracy']:.2f}%, test loss {final['test_loss']:.4f}")
    print(f"outputs in {run.run_dir}/ (curves: {run.run_dir}/curves.png)")


def _evaluate(args: argparse.Namespace) -> None:
    from mnistlab.predict import evaluate

    result = evaluate(args.model, args.data_dir, args.device)
    if args.json:
        print(json.dumps(result.to_dict()))
        return
    print(f"test accuracy {100 * result.accuracy:.2f}%, loss {result.loss:.4f}")
    print("per-class accuracy: " + "  ".join(f"{d}: {100 * a:.2f}%" for d, a in enumerate(result.per_class_accuracy)))
    print("confusion matrix (rows: true digit, columns: predicted):")
    print("      " + "".join(f"{d:>6}" for d in range(10)))
    for d, row in enumerate(result.confusion_matrix):
        print(f"{d:>6}" + "".join(f"{v:>6}" for v in row))


def _reproduce(args: argparse.Namespace) -> None:
    from mnistlab.reports import reproduce

    report = reproduce(args.out, args.epochs, args.data_dir, args.device, args.quiet, args.force)
    print(f"report: {report}")


def _configs(args: argparse.Namespace) -> None:
    from mnistlab.config import load_config, shipped_configs

    names = sorted(shipped_configs())
    width = max(map(len, names))
    for name in names:
        print(f"{name:<{width}}  {load_config(name).description}")


COMMANDS = {"train": _train, "evaluate": _evaluate, "reproduce": _reproduce, "configs": _configs}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except MnistlabError as exc:
        print(f"mnistlab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mnistlab: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
