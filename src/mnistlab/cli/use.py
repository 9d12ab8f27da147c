"""Commands that use a trained model: `evaluate`, `predict`, `classify`, `inspect`, `export`, `ensemble`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mnistlab.cli.common import Formatter, Subparsers, add_data_dir, add_device, add_model, model_of
from mnistlab.errors import MnistlabError, plural, warn

if TYPE_CHECKING:  # the CLI imports torch only when a command runs
    from mnistlab.infer.predict import Prediction
    from mnistlab.models.files import LoadedModel


def register(sub: Subparsers) -> None:
    _add_evaluate(sub)
    _add_predict(sub)
    _add_classify(sub)
    _add_inspect(sub)
    _add_export(sub)
    _add_ensemble(sub)
    _add_calibrate(sub)


def _add_evaluate(sub: Subparsers) -> None:
    p = sub.add_parser(
        "evaluate",
        help="test accuracy, loss, per-class accuracy, confusion matrix, calibration",
        formatter_class=Formatter,
    )
    add_model(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--plot", metavar="FILE", help="write the test split's reliability diagram (before and after calibration)"
    )
    p.add_argument("--tta", action="store_true", help="average each image with its four 1-pixel shifts")
    p.add_argument(
        "--images",
        metavar="DIR",
        help="evaluate on your own images instead of the test split: DIR/<class>/*.png, folders named by class "
        "(0-9, or the model's class names), as torchvision's ImageFolder lays them out",
    )
    p.add_argument(
        "--outliers",
        metavar="DIR",
        action="append",
        default=[],
        help="a folder of images unlike the model's training data (letters, shoes, noise; searched recursively, "
        "prepared as predict prepares them): the share flagged, and the AUROC of the outlier score between the "
        "test split and them; repeatable",
    )
    add_data_dir(p)
    add_device(p)

    p.set_defaults(handler=_evaluate)


def _evaluate(args: argparse.Namespace) -> None:
    from mnistlab.datasets import are_digits
    from mnistlab.files import to_json
    from mnistlab.infer.evaluate import evaluate, evaluate_images

    if args.images and args.plot:
        raise MnistlabError("--plot draws the test split's reliability diagram; leave out --images")
    if args.images and args.outliers:
        raise MnistlabError("--outliers measures against the test split; leave out --images")
    if args.images:
        found = evaluate_images(args.images, model_of(args), args.device, args.tta)
        for problem in found.skipped:
            warn(f"{problem} (not counted)")
        result, what = found.evaluation, f"accuracy on {plural(found.count, 'image')} in {args.images}"
        report = found.to_dict()
    else:
        result = evaluate(model_of(args), args.data_dir, args.device, args.tta, args.outliers)
        what, report = "test accuracy", result.to_dict()
        for folder in result.outliers["folders"]:
            for problem in folder["skipped"]:
                warn(f"{problem} (not counted)")
        if args.plot:
            _plot_reliability(result.calibration, Path(args.plot), model_of(args) or "the bundled model")
    if args.json:
        print(to_json(report))
        return
    names = result.classes
    print(f"{what} {100 * result.accuracy:.2f}%, loss {result.loss:.4f}")
    shown = ["-" if a is None else f"{100 * a:.2f}%" for a in result.per_class_accuracy]  # "-": no image of it
    print("per-class accuracy: " + "  ".join(f"{n}: {a}" for n, a in zip(names, shown)))
    if not are_digits(names):
        print("classes: " + ", ".join(f"{d} {n}" for d, n in enumerate(names)))
    print("confusion matrix (rows: true class, columns: predicted):")
    print("      " + "".join(f"{d:>6}" for d in range(10)))
    for d, row in enumerate(result.confusion_matrix):
        print(f"{d:>6}" + "".join(f"{v:>6}" for v in row))
    if result.calibration is not None:
        print(_calibration_line(result.calibration, model_of(args)))
    if result.outliers is not None:
        print("\n".join(_outlier_lines(result.outliers, model_of(args))))


def _outlier_lines(report: dict, model: str | None) -> list[str]:
    """The share of the test split the outlier score flags, and of each --outliers folder with its AUROC."""
    from mnistlab.infer.predict import no_detector

    if report["threshold"] is None:
        return [f"outliers: {no_detector(model, 'nothing is flagged')}"]
    lines = [
        f"outliers: {100 * report['test_flagged']:.2f}% of the {report['test_images']:,} test images flagged "
        f"(outlier score above {report['threshold']:.4g})"
    ]
    for f in report["folders"]:
        refused = f" ({f['refused']} of them refused by preprocessing: no digit found)" if f["refused"] else ""
        auroc = "-" if f["auroc"] is None else f"{f['auroc']:.4f}"
        flagged = f"{100 * f['flagged']:.2f}% of {plural(f['images'], 'image')} flagged{refused}"
        lines.append(f"outliers in {f['folder']}: {flagged}; AUROC {auroc} against the test images")
    return lines


def _calibration_line(report: dict, model: str | None) -> str:
    """The test split's calibration in one line: as trained, and after the temperature (and confidence map)
    fitted on validation."""
    from mnistlab.infer.predict import calibrate_command
    from mnistlab.models.calibration import ECE_BINS

    before, after = report["before"], report["after"]

    def shown(c: dict) -> str:
        return f"ECE {100 * c['ece']:.2f}%, NLL {c['nll']:.4f}, Brier {c['brier']:.4f}"

    if not report["calibrated"]:
        how = calibrate_command(model)
        return f"calibration ({ECE_BINS} bins): {shown(before)}; uncalibrated ({how} fits a temperature)"
    scaled = f"temperature {report['temperature']:.3g}" if report["temperature"] else "members' temperatures"
    if report.get("confidence_map"):
        scaled += " and confidence map"
    return f"calibration ({ECE_BINS} bins): as trained {shown(before)}; with its {scaled} {shown(after)}"


def _plot_reliability(report: dict, path: Path, model: str) -> None:
    from mnistlab.plots import plot_reliability

    if path.is_dir():
        raise MnistlabError(f"--plot {path}: a folder; give a file name such as reliability.png")
    tables = {"as trained": report["bins"]["before"]}
    if report["calibrated"]:
        tables["calibrated"] = report["bins"]["after"]
    plot_reliability(tables, path, f"{model}: test split")


def _add_predict(sub: Subparsers) -> None:
    p = sub.add_parser(
        "predict", help="classify image files (photos, scans, drawings of digits)", formatter_class=Formatter
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, or folders to search for images")
    add_model(p, positional=False)
    p.add_argument("--top-k", type=int, default=1, help="show the K most likely classes (1-10)")
    p.add_argument("--json", action="store_true", help="one JSON object per image, one per line")
    p.add_argument("--show", metavar="DIR", help="save, per image, the original beside what the model saw")
    p.add_argument(
        "--polarity",
        choices=("auto", "dark-on-light", "light-on-dark"),
        default="auto",
        help="ink polarity; auto decides from each image",
    )
    add_device(p)

    p.set_defaults(handler=_predict)


def _predict(args: argparse.Namespace) -> int:
    from mnistlab.files import make_dirs, to_json
    from mnistlab.infer.predict import predict_images
    from mnistlab.plots import plot_prediction

    if not 1 <= args.top_k <= 10:
        raise MnistlabError(f"--top-k must be between 1 and 10, got {args.top_k}")
    model = _load_answering(args)
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
            line = f"{p.path}: {p.class_name} ({100 * p.confidence:.1f}%){_flag(p, model)}"
            print(line + (f"  [{others}]" if others else ""), flush=True)
        if args.show:
            pre = p.preprocessed
            target = Path(args.show) / f"{i:04d}-{Path(p.path).stem}.png"
            title = f"{p.path}: {p.class_name}{_flag(p, model)}"
            plot_prediction(pre.original, pre.digit, p.probabilities, target, title, model.classes)
    return 1 if failures else 0


def _load_answering(args: argparse.Namespace) -> LoadedModel:
    """The model of `predict` and `classify`; one line on stderr when it cannot flag anything."""
    from mnistlab.devices import resolve_device
    from mnistlab.infer.predict import no_detector
    from mnistlab.models.files import load_model

    model = load_model(model_of(args), resolve_device(args.device))
    if model.outliers is None:
        warn(no_detector(model_of(args), f"no image is marked 'not a {model.item}?'"))
    return model


def _flag(p: Prediction, model: LoadedModel) -> str:
    """What follows a prediction's class where the outlier score flags the image: ", not a digit?"."""
    return f", not a {model.item}?" if p.outlier else ""


def _add_classify(sub: Subparsers) -> None:
    p = sub.add_parser(
        "classify", help="interactive: type image paths, get digits ('exit' to stop)", formatter_class=Formatter
    )
    add_model(p, positional=False)
    add_device(p)

    p.set_defaults(handler=_classify)


def _classify(args: argparse.Namespace) -> None:
    from mnistlab.infer.predict import predict_images

    model = _load_answering(args)
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
            print(f"Classifier: {p.class_name}{_flag(p, model)}", flush=True)


def _add_inspect(sub: Subparsers) -> None:
    p = sub.add_parser(
        "inspect", help="confusion matrix, most-confused pairs, misclassified gallery", formatter_class=Formatter
    )
    add_model(p)
    p.add_argument("--out", help="folder for the figures (default: <run dir>/inspect, or runs/inspect)")
    add_data_dir(p)
    add_device(p)

    p.set_defaults(handler=_inspect)


def _inspect(args: argparse.Namespace) -> None:
    from mnistlab.infer.evaluate import inspect

    model = model_of(args)
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


def _add_export(sub: Subparsers) -> None:
    p = sub.add_parser("export", help="export a model to ONNX and check it against PyTorch", formatter_class=Formatter)
    add_model(p)
    p.add_argument("--onnx", required=True, metavar="FILE", help="where to write the .onnx file")
    p.add_argument("--force", action="store_true", help="replace an existing FILE")
    add_data_dir(p)

    p.set_defaults(handler=_export)


def _export(args: argparse.Namespace) -> None:
    from mnistlab.datasets import are_digits
    from mnistlab.infer.export import export_onnx

    check = export_onnx(model_of(args), args.onnx, args.data_dir, force=args.force)
    print(
        f"wrote {check.path}: onnxruntime matches PyTorch on {plural(check.images, 'test image')} "
        f"(max probability difference {check.max_abs_diff:.1e}, "
        f"same {'digit' if are_digits(check.classes) else 'class'} for all)"
    )


def _add_calibrate(sub: Subparsers) -> None:
    p = sub.add_parser(
        "calibrate",
        help="fit a model's temperature, confidence map and outlier detector on the splits it was trained on "
        "(runs trained now have them already)",
        formatter_class=Formatter,
    )
    p.add_argument("model", metavar="MODEL", help="run directory or model file (an ensemble: each member)")
    add_data_dir(p)
    add_device(p)

    p.set_defaults(handler=_calibrate)


def _calibrate(args: argparse.Namespace) -> None:
    from mnistlab.infer.calibrate import calibrate

    fitted = calibrate(args.model, args.data_dir, args.device)
    if "members" in fitted:
        shown = ", ".join(f"{t:.3g}" for t in fitted["members"])
        print(f"calibrated {args.model}: members' temperatures {shown}, each fitted on its own validation split")
        return
    before, after = fitted["before"], fitted["after"]
    print(
        f"calibrated {args.model}: temperature {fitted['temperature']:.3g} and confidence map, fitted on its "
        f"{fitted['fitted_on']}: "
        f"ECE {100 * before['ece']:.2f}% -> {100 * after['ece']:.2f}%, NLL {before['nll']:.4f} -> {after['nll']:.4f}"
    )


def _add_ensemble(sub: Subparsers) -> None:
    p = sub.add_parser("ensemble", help="average several trained models into one model file", formatter_class=Formatter)
    p.add_argument("members", nargs="+", metavar="RUN_DIR", help="run directories or model files to average")
    p.add_argument("--out", required=True, help="folder for the ensemble's model.safetensors and model.json")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out folder")
    add_data_dir(p)
    add_device(p)

    p.set_defaults(handler=_ensemble)


def _ensemble(args: argparse.Namespace) -> None:
    from mnistlab.infer.ensemble import make_ensemble

    result = make_ensemble(args.members, args.out, args.data_dir, args.device, args.force)
    for member, accuracy in result["members"].items():
        print(f"member {member}: test accuracy {100 * accuracy:.2f}%")
    print(f"ensemble of {len(result['members'])}: test accuracy {100 * result['accuracy']:.2f}% -> {args.out}/")


_QUIT = {"exit", "quit", "q"}
