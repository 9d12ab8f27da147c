"""`mnistlab robustness`: corruptions and attacks over a model's test set."""

from __future__ import annotations

import argparse
from pathlib import Path

from mnistlab.cli.common import Formatter, Subparsers, add_data_dir, add_device, add_model, model_of


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
    add_data_dir(p)
    add_device(p)

    p.set_defaults(handler=_robustness)


def _robustness(args: argparse.Namespace) -> None:
    from mnistlab.analysis.robustness import RobustnessSettings, format_summary, parse_eps, parse_list, robustness
    from mnistlab.files import to_json

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
    model = model_of(args)
    default = Path(model) / "robustness" if model and Path(model).is_dir() else Path("runs/robustness")
    out = Path(args.out) if args.out else default
    result = robustness(model, out, settings, args.data_dir, args.device, args.force, args.quiet)
    if args.json:
        print(to_json(result))
        return
    print(format_summary(result))
    print(f"report: {out}/report.md")
