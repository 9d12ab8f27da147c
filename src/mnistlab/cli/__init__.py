"""The `mnistlab` command: argument parsing only; each command calls one API function.

Each command's arguments are declared beside its handler, in the module of its group (train, use, robustness,
sweep, serve); adding a command is one `_add_<name>` function there plus its handler. Nothing heavy is
imported until a command runs, so `mnistlab --help` answers at once. Choices (losses, optimizers, devices ...)
come from the config module's own tuples, so help and validation cannot drift apart.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

from mnistlab import __version__
from mnistlab.cli import explain, robustness, serve, sweep, train, use
from mnistlab.cli.common import Formatter
from mnistlab.errors import MnistlabError
from mnistlab.files import Interrupts, Terminated
from mnistlab.processes import reports_the_end

GROUPS = (train, use, explain, robustness, sweep, serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnistlab",
        description="Train, compare, explain and use MNIST digit classifiers.",
        formatter_class=Formatter,
    )
    parser.add_argument("--version", action="version", version=f"mnistlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    # SIGTERM and SIGHUP stop a command as Ctrl-C does (a KeyboardInterrupt: Terminated), keeping what it saved
    sigterm = Interrupts((signal.SIGTERM, signal.SIGHUP))
    try:
        with sigterm, sigterm.allow():
            code = args.handler(args) or 0
            sys.stdout.flush()  # here, where a reader that went away can still be handled
        return code
    except MnistlabError as exc:
        print(f"mnistlab: error: {exc}", file=sys.stderr)
        return 2
    except Terminated as exc:
        _report_the_end(f"mnistlab: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        _report_the_end("mnistlab: interrupted")
        return 130
    except BrokenPipeError:
        # The reader went away (`mnistlab configs | head -1`): stop quietly, as command-line tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _report_the_end(line: str) -> None:
    """The one line saying a signal ended the command (from one process of a distributed training)."""
    if reports_the_end():
        print(line, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
