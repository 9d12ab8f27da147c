"""`mnistlab sweep`: search config settings with Optuna."""

from __future__ import annotations

import argparse
import dataclasses

from mnistlab.cli.common import Formatter, Subparsers, add_data_dir, add_device
from mnistlab.config import PRUNERS
from mnistlab.errors import MnistlabError
from mnistlab.sweep.plan import DEFAULT_TRIALS, METRICS, SweepOptions

_DEFAULT = SweepOptions()
REPORT_OPTIONS = ("storage", "quiet")  # what --report uses of the options (it redraws, it runs nothing)


def register(sub: Subparsers) -> None:
    _add_sweep(sub)


def _add_sweep(sub: Subparsers) -> None:
    p = sub.add_parser(
        "sweep",
        help="search config settings with Optuna (parallel workers, pruning, shared storage)",
        formatter_class=Formatter,
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
        "repeat for more keys, each once; a key also in --space-file or --preset is replaced by this one",
    )
    p.add_argument(
        "--space-file",
        metavar="FILE",
        help="a TOML file with [space] (and [set] for fixed values); a model.hidden choice without "
        "model.activations keeps the config's activations, the last one repeated for extra layers",
    )
    p.add_argument("--preset", help="a shipped sweep: seed-lr (learning rate and optimizer for networks A, B, C)")
    p.add_argument(
        "--trials",
        type=int,
        help=f"finished trials the study should have in total (default: the preset's, else {DEFAULT_TRIALS})",
    )
    p.add_argument("--epochs", type=int, help="override training.epochs for every trial")
    objectives = " or ".join(f"{m} ({'maximised' if d == 'maximize' else 'minimised'})" for m, d in METRICS.items())
    p.add_argument("--metric", default=_DEFAULT.metric, help=f"the objective: {objectives}")
    p.add_argument("--pruner", default=_DEFAULT.pruner, choices=PRUNERS, help="stop hopeless trials after an epoch")
    p.add_argument("--workers", type=int, default=_DEFAULT.workers, help="worker processes on this machine")
    p.add_argument("--threads", type=int, help="torch threads per worker (default: CPU cores / workers)")
    p.add_argument(
        "--storage", help="SQL database URL (postgresql://user@host/db) or journal file (default: OUT/study.journal)"
    )
    p.add_argument("--study", help="the study's name in the storage (default: the --out folder's name)")
    p.add_argument("--out", help="sweep folder (default: sweeps/<preset or config name>)")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="start no new trial after this many seconds")
    p.add_argument(
        "--report",
        metavar="DIR",
        help="only redraw DIR's report, best.toml and plots from its storage (takes --storage and --quiet only)",
    )
    p.add_argument("--quiet", action="store_true", help="print nothing but errors and the report's path")
    add_data_dir(p)
    add_device(p)
    p.set_defaults(handler=_sweep, device=_DEFAULT.device)


def _sweep(args: argparse.Namespace) -> None:
    try:
        from mnistlab.sweep.report import report
        from mnistlab.sweep.run import sweep
    except ImportError as exc:
        raise MnistlabError(f"mnistlab sweep needs Optuna: pip install 'mnistlab[sweep]' ({exc})") from None

    if args.report:
        _check_report_options(args)
        print(f"report: {report(args.report, storage=args.storage)}")
        return
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(SweepOptions)}
    path = sweep(SweepOptions(**{**options, "space": tuple(args.space or ())}))
    print(f"report: {path}")


def _check_report_options(args: argparse.Namespace) -> None:
    """--report only redraws: an option for running a sweep would be ignored, so it is refused."""
    given = [
        "--" + f.name.replace("_", "-")
        for f in dataclasses.fields(SweepOptions)
        if f.name not in REPORT_OPTIONS and getattr(args, f.name) not in (None, getattr(_DEFAULT, f.name))
    ]
    if given:
        verb, pronoun = ("is", "it") if len(given) == 1 else ("are", "them")
        raise MnistlabError(
            f"--report only redraws a sweep's report from its storage; {', '.join(given)} {verb} for running a "
            f"sweep (leave {pronoun} out)"
        )
