"""Training commands: `train`, `lr-find`, `reproduce`, `compare` and `configs`."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from mnistlab.cli.common import Formatter, Subparsers, add_data_dir, add_device
from mnistlab.config import LOSSES, MONITORS, OPTIMIZERS, SCHEDULERS
from mnistlab.datasets import DATASETS
from mnistlab.errors import MnistlabError


def register(sub: Subparsers) -> None:
    _add_train(sub)
    _add_lr_find(sub)
    _add_reproduce(sub)
    _add_compare(sub)
    _add_configs(sub)


def _add_train(sub: Subparsers) -> None:
    p = sub.add_parser("train", help="train a config and write a run directory", formatter_class=Formatter)
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
    p.add_argument(
        "--oversubscribe",
        action="store_true",
        help="with --nproc: allow more processes than CPU cores (or GPUs); the memory they need is still checked",
    )
    p.add_argument("--tensorboard", action="store_true", help="also log to RUN_DIR/tensorboard (needs tensorboard)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.add_argument(
        "--events",
        action="store_true",
        help="print the run's progress on stdout as JSON lines (start, progress about every 512 images, epoch, "
        "finished) for a program that watches it, such as the web lab; the human lines stay on stderr",
    )
    p.add_argument(
        "--until-stdin-closes",
        action="store_true",
        help="stop as Ctrl-C would (resumable) when stdin closes: a program that starts the run and dies, even "
        "killed, takes its training with it",
    )
    add_data_dir(p)
    add_device(p)

    p.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int | None:
    from mnistlab.config import load_config, parse_set
    from mnistlab.devices import resolve_device
    from mnistlab.train import distributed
    from mnistlab.train.checkpoint import CHECKPOINT
    from mnistlab.train.loop import refuse_exposure_across_processes, resume, train

    overrides = {key: getattr(args, flag) for key, flag in _TRAIN_FLAGS.items()}
    overrides.update(parse_set(args.set))
    if args.nproc is not None:
        if args.events:
            raise MnistlabError("--events reports a run of one process; leave out --nproc")
        if distributed.environment_world_size() > 1:
            raise MnistlabError("--nproc starts torchrun itself; under torchrun, leave it out")
        if args.config and not args.resume:  # here, once, rather than in each rank after torchrun has started
            refuse_exposure_across_processes(load_config(args.config).with_overrides(overrides), args.nproc)
        distributed.check_capacity(args.nproc, resolve_device(args.device), args.oversubscribe)
        return distributed.launch(args.nproc, _without_nproc(args.argv))
    common = {"data_dir": args.data_dir, "device": args.device, "quiet": args.quiet, "tensorboard": args.tensorboard}
    if args.until_stdin_closes:
        _stop_when_stdin_closes()
    events = _Events(Path(args.resume) if args.resume else None) if args.events else None
    if events is not None:
        common.update(on_progress=events.emit, on_epoch_end=events.epoch)
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
        if events is not None:
            events.run_dir = out
        if distributed.restarted() and (out / CHECKPOINT).is_file():
            # torchrun restarted the job after a rank failed (--max-restarts): go on from the last checkpoint.
            run = resume(out, epochs=config.training.epochs, config=config, **common)
        else:
            run = train(config, out_dir=out, force=args.force, **common)
    if events is not None and run.run_dir is not None:
        saved = run.saved
        events.emit(
            {
                "event": "finished",
                "test_accuracy": saved["test_accuracy"],
                "epoch": saved["epoch"],
                "stop_reason": run.stop_reason,
                "run_dir": str(run.run_dir),
            }
        )
        return None
    if args.quiet or run.run_dir is None:  # quiet, or a rank other than 0 of a distributed run
        return None
    saved = run.saved
    print(
        f"test accuracy {100 * saved['test_accuracy']:.2f}%, test loss {saved['test_loss']:.4f} "
        f"(model of epoch {saved['epoch']} of {len(run.epochs)}; stopped by {run.stop_reason})"
    )
    print(f"outputs in {run.run_dir}/ (curves: {run.run_dir}/curves.png)")
    return None


class _Events:
    """`train --events`: the run's progress as JSON lines on stdout, one object per line, flushed at once."""

    def __init__(self, run_dir: Path | None):
        self.run_dir = run_dir  # where metrics.json (and its best epoch so far) is written after each epoch

    def emit(self, event: dict) -> None:
        from mnistlab.files import to_json

        print(to_json(event), flush=True)

    def epoch(self, record: dict) -> None:
        """An epoch's record as metrics.json holds it, with the best epoch so far (from that file, which the run
        has just written: the one tracker decides it)."""
        assert self.run_dir is not None  # set before the run starts
        metrics = json.loads((self.run_dir / "metrics.json").read_text())
        self.emit({"event": "epoch", "record": record, "best_epoch": metrics.get("best_epoch")})


def _stop_when_stdin_closes() -> None:
    """Interrupt this process, as Ctrl-C would, once stdin reaches its end (the parent holding it went away)."""
    import os
    import signal
    import threading

    def watch() -> None:
        # The descriptor, not sys.stdin: a daemon thread blocked inside a buffered reader aborts the interpreter
        # at exit ("_enter_buffered_busy"), so a run that ends with stdin still open would exit -6.
        while os.read(0, 4096):
            pass
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=watch, name="stdin-watch", daemon=True).start()


def _add_lr_find(sub: Subparsers) -> None:
    p = sub.add_parser(
        "lr-find",
        help="suggest a learning rate for a config (the learning-rate range test)",
        description="Train a throw-away copy of the config's network while the learning rate rises exponentially "
        "from --start to --end over at most one epoch, stop when the smoothed loss blows up, and suggest a rate "
        "(docs/training.md, 'Finding a learning rate'). Nothing is kept but the plot.",
        formatter_class=Formatter,
    )
    p.add_argument("--config", required=True, help="a shipped config name (see `mnistlab configs`) or a TOML file")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, as for `mnistlab train` (repeatable)",
    )
    p.add_argument("--start", type=float, default=1e-7, help="the first learning rate")
    p.add_argument("--end", type=float, default=10.0, help="the last learning rate")
    p.add_argument(
        "--max-batches",
        type=int,
        default=300,  # lr_find.MAX_BATCHES, not imported here: it loads torch
        metavar="N",
        help="at most N batches (fewer when an epoch is shorter)",
    )
    p.add_argument("--out", default="lr-find", help="folder for the plot, <config name>.png")
    p.add_argument("--json", action="store_true", help="print the result as JSON (the plot is still written)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_data_dir(p)
    add_device(p)
    p.set_defaults(handler=_lr_find)


def _lr_find(args: argparse.Namespace) -> None:
    from mnistlab.config import load_config, parse_set
    from mnistlab.files import to_json
    from mnistlab.plots import plot_lr_find
    from mnistlab.progress import Progress
    from mnistlab.train.lr_find import check_range, find_lr

    check_range(args.start, args.end, args.max_batches)  # before the data loads
    config = load_config(args.config).with_overrides(parse_set(args.set))
    out = Path(args.out) / f"{config.name}.png"
    bar = Progress(args.quiet or args.json).bar(args.max_batches, f"lr-find {config.name}")

    def advance(done: int, total: int) -> None:
        bar.total = total  # fewer than --max-batches where an epoch is shorter
        bar.update(done - bar.n)

    result = find_lr(
        config,
        data_dir=args.data_dir,
        device=args.device,
        start=args.start,
        end=args.end,
        max_batches=args.max_batches,
        progress=advance,
    )
    bar.close()
    swept = f"{result.points[0][0]:.2g} to {result.points[-1][0]:.2g}"
    title = f"learning-rate range test: {config.name} ({config.summary(lr=swept)})"
    plot_lr_find(result.points, result.raw_losses, result.suggested_lr, result.how, out, title)
    if args.json:
        print(to_json({**result.to_dict(), "plot": str(out)}))
        return
    ended = {
        "end of schedule": f"the schedule ended at lr {result.points[-1][0]:.3g}",
        "diverged": f"stopped early at lr {result.points[-1][0]:.3g}: the smoothed loss passed 4x its minimum",
        "not finite": f"stopped early at lr {result.points[-1][0]:.3g}: the loss was no longer a number",
    }[result.stop_reason]
    print(f"suggested learning rate: {result.suggested_lr:.3g} ({result.how})")
    print(f"{len(result.points)} batches in {result.seconds:.1f} s; {ended}")
    print(f"plot: {out}")
    sets = [*args.set, f"optimizer.lr={result.suggested_lr:.3g}"]
    print(
        f"train with: mnistlab train --config {shlex.quote(args.config)} "
        + " ".join(f"--set {shlex.quote(s)}" for s in sets)
    )


def _add_reproduce(sub: Subparsers) -> None:
    p = sub.add_parser(
        "reproduce", help="run the report's six seed configs (or a study) with a report", formatter_class=Formatter
    )
    p.add_argument("--study", default="seed", choices=("seed", "losses", "optimizers"), help="what to run")
    p.add_argument("--out", help="folder for the runs and report.md (default: runs/reproduce, runs/study-<name>)")
    p.add_argument("--epochs", type=int, help="override the configs' 10 epochs")
    p.add_argument("--force", action="store_true", help="retrain every run from scratch (default: continue)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors and the report's path")
    add_data_dir(p)
    add_device(p)

    p.set_defaults(handler=_reproduce)


def _reproduce(args: argparse.Namespace) -> None:
    from mnistlab.analysis.reports import reproduce

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


def _add_compare(sub: Subparsers) -> None:
    p = sub.add_parser("compare", help="compare run directories in a Markdown report", formatter_class=Formatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories to compare")
    p.add_argument("--out", default="runs/compare", help="folder for report.md and its plots")
    p.add_argument("--force", action="store_true", help="replace an existing comparison in --out")

    p.set_defaults(handler=_compare)


def _compare(args: argparse.Namespace) -> None:
    from mnistlab.analysis.reports import compare

    command = "mnistlab compare " + " ".join(args.runs)
    print(f"report: {compare(args.runs, args.out, command=command, force=args.force)}")


def _add_configs(sub: Subparsers) -> None:
    p = sub.add_parser("configs", help="list the shipped configs", formatter_class=Formatter)
    p.add_argument("--keys", action="store_true", help="list every config key with its default instead")
    p.set_defaults(handler=_configs)


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
