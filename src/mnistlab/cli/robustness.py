"""`mnistlab robustness`: corruptions and attacks over a model's test set."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mnistlab.cli.common import Formatter, Subparsers, add_data_dir, add_device, add_model, model_of

# The settings the command sets, by their field in RobustnessSettings (which is also the option's dest).
_SETTINGS = ("corruptions", "attacks", "eps", "images", "adversarial_images", "pgd_steps", "step_size", "seed")


class _Default:
    """An option's default, read from `RobustnessSettings` only when help shows it: that module imports torch,
    which parsing a command line must not. An option left out keeps the dataclass's own default."""

    def __init__(self, field: str):
        self.field = field

    def __str__(self) -> str:
        from mnistlab.analysis.robustness import ATTACKS, RobustnessSettings
        from mnistlab.data.corruptions import CORRUPTIONS

        value = getattr(RobustnessSettings(), self.field)
        if not isinstance(value, list):
            return str(value)
        if value in (list(CORRUPTIONS), list(ATTACKS)):
            return "all"
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)


def register(sub: Subparsers) -> None:
    _add_robustness(sub)


def _add_robustness(sub: Subparsers) -> None:
    p = sub.add_parser(
        "robustness",
        help="accuracy under MNIST-C corruptions and FGSM/PGD attacks, with a report",
        formatter_class=Formatter,
    )
    add_model(p)
    p.add_argument("--out", help="folder for report.md, robustness.json and figures (default: <run dir>/robustness)")
    setting = {name: _Default(name) for name in _SETTINGS}
    p.add_argument(
        "--corruptions", default=setting["corruptions"], help="comma-separated MNIST-C corruptions, all, or none"
    )
    p.add_argument("--attacks", default=setting["attacks"], help="comma-separated attacks (fgsm, pgd), all, or none")
    p.add_argument("--eps", default=setting["eps"], help="comma-separated L-infinity radii, pixels in [0, 1]")
    p.add_argument("--images", type=int, help="corrupt the first N test images (default: all of them)")
    p.add_argument(
        "--adversarial-images", type=int, default=setting["adversarial_images"], help="attack the first N test images"
    )
    p.add_argument("--pgd-steps", type=int, default=setting["pgd_steps"], help="PGD steps (from a random start)")
    p.add_argument("--step-size", type=float, default=setting["step_size"], help="PGD step size")
    p.add_argument(
        "--seed", type=int, default=setting["seed"], help="seed of the corruptions and of PGD's random start"
    )
    p.add_argument("--json", action="store_true", help="print the measurements as one JSON object")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out folder")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    add_data_dir(p)
    add_device(p)

    p.set_defaults(handler=_robustness)


def _robustness(args: argparse.Namespace) -> None:
    from mnistlab.analysis.robustness import RobustnessSettings, format_summary, parse_eps, parse_list, robustness
    from mnistlab.files import to_json

    parse = {
        "corruptions": lambda text: parse_list(text, "corruptions"),
        "attacks": lambda text: parse_list(text, "attacks"),
        "eps": parse_eps,
    }
    given: dict[str, Any] = {}
    for name in _SETTINGS:
        value = getattr(args, name)
        if value is not None and not isinstance(value, _Default):
            given[name] = parse.get(name, lambda v: v)(value)
    settings = RobustnessSettings(**given)
    model = model_of(args)
    default = Path(model) / "robustness" if model and Path(model).is_dir() else Path("runs/robustness")
    out = Path(args.out) if args.out else default
    result = robustness(model, out, settings, args.data_dir, args.device, args.force, args.quiet)
    if args.json:
        print(to_json(result))
        return
    print(format_summary(result))
    print(f"report: {out}/report.md")
