"""What every command's parser shares: the help formatter and the data, device and model arguments."""

from __future__ import annotations

import argparse

from mnistlab.config import DEVICES
from mnistlab.errors import MnistlabError

# What `add_subparsers()` returns; argparse does not name the type publicly.
Subparsers = argparse._SubParsersAction

MODEL_HELP = "a run directory or model file (.safetensors with its .json); default: the bundled pretrained model"


class Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the empty ones (None, False) that would only add noise."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, argparse.SUPPRESS) or isinstance(action.default, list):
            return action.help or ""
        return super()._get_help_string(action)


def add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder with the dataset's IDX files (default: $MNISTLAB_DATA, else the user cache, "
        "downloading there if needed)",
    )


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=DEVICES, help="auto: CUDA, else Apple's MPS, else the CPU")


def add_model(p: argparse.ArgumentParser, positional: bool = True) -> None:
    """The model a command uses: `--model PATH`, or as the first argument where a command takes no other
    positional arguments."""
    if positional:
        p.add_argument("model_arg", nargs="?", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--model", help=MODEL_HELP if not positional else "the same as MODEL")


def model_of(args: argparse.Namespace) -> str | None:
    """The model named by MODEL or --model (None: the bundled one); both, if different, is a mistake."""
    positional = getattr(args, "model_arg", None)
    if positional and args.model and positional != args.model:
        raise MnistlabError(f"two models given ({positional} and --model {args.model}); give one")
    return positional or args.model
