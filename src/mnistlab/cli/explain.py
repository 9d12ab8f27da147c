"""The command that shows why a model answered as it did: `explain` (attribution maps, and what the layers saw)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mnistlab.cli.common import Formatter, Subparsers, add_data_dir, add_device, model_of
from mnistlab.errors import MnistlabError

if TYPE_CHECKING:  # the CLI imports torch only when a command runs
    from mnistlab.infer.explain import Explanation
    from mnistlab.infer.inside import LayerView, NeighbourIndex
    from mnistlab.infer.predict import Prediction
    from mnistlab.models.files import LoadedModel

DEFAULT_OUT = "explanations"
MAX_STEPS = 1024  # integrated gradients' points all go through the network in one batch


def register(sub: Subparsers) -> None:
    _add_explain(sub)


def _add_explain(sub: Subparsers) -> None:
    p = sub.add_parser(
        "explain",
        help="why a model answered as it did: which pixels spoke for and against each class (a map per image)",
        formatter_class=Formatter,
    )
    p.add_argument("paths", nargs="+", metavar="IMAGE", help="image files, or folders to search for images")
    p.add_argument(
        "--model",
        help="a run directory or model file (.safetensors with its .json; not .onnx: explaining needs the "
        "network's gradients and layers); default: the bundled pretrained model",
    )
    p.add_argument(
        "--method",
        default="integrated-gradients",
        metavar="METHOD",
        help="integrated-gradients (ig), occlusion, saliency, or grad-cam (CNNs only); docs/explain.md says which "
        "to use when",
    )
    p.add_argument(
        "--target",
        metavar="CLASS",
        help="also explain this class (a digit 0-9, or one of the model's class names), after the predicted one",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        help=f"folder for one PNG per image: the 28x28 view, the maps (red: for the class, blue: against), the "
        f"top-3 probabilities (default: {DEFAULT_OUT}/; with --json, none unless --out is given)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per image, one per line, maps as numbers")
    p.add_argument(
        "--steps",
        type=int,
        help="integrated gradients' points between black and the image (default: infer.explain.STEPS, 128: "
        "the bundled model's map of its answer adds up to within 1.5%% (median), a class it barely scores "
        "less closely; each map says its own error)",
    )
    p.add_argument("--layers", action="store_true", help="add what each layer saw (feature maps, top units)")
    p.add_argument(
        "--neighbours",
        type=int,
        metavar="K",
        help="add the K training images nearest the input in the model's penultimate features (the model's "
        "whole training split is indexed first, on every run: this takes a while)",
    )
    add_data_dir(p)
    add_device(p)

    p.set_defaults(handler=_explain)


def _explain(args: argparse.Namespace) -> int:
    from mnistlab.devices import resolve_device
    from mnistlab.files import make_dirs
    from mnistlab.infer.explain import STEPS, check_method, method_of, target_of
    from mnistlab.infer.predict import predict_images
    from mnistlab.models.files import load_model

    method = method_of(args.method)
    args.steps = STEPS if args.steps is None else args.steps
    if not 1 <= args.steps <= MAX_STEPS:
        raise MnistlabError(f"--steps must be between 1 and {MAX_STEPS}, got {args.steps}")
    if args.neighbours is not None and not 1 <= args.neighbours <= 100:
        raise MnistlabError(f"--neighbours must be between 1 and 100, got {args.neighbours}")
    _refuse_onnx(model_of(args))
    model = load_model(model_of(args), resolve_device(args.device))
    target = target_of(args.target, model.classes, "--target")
    check_method(model, method)  # grad-cam on an MLP: refused before any image's line
    index = _neighbour_index(model, args.data_dir) if args.neighbours else None
    out = None if args.json and not args.out else Path(args.out or DEFAULT_OUT)
    if out is not None:
        make_dirs(out)  # before any work: a folder that cannot be made fails now
    failures = 0
    for i, p in enumerate(predict_images(args.paths, model, keep_preprocessed=True)):
        if p.error is not None:
            failures += 1
            print(f"mnistlab: error: {p.error}", file=sys.stderr, flush=True)
            continue
        _explain_one(args, model, method, target, index, out, i, p)
    return 1 if failures else 0


def _explain_one(
    args: argparse.Namespace,
    model: LoadedModel,
    method: str,
    target: int | None,
    index: NeighbourIndex | None,
    out: Path | None,
    i: int,
    p: Prediction,
) -> None:
    """Explain one preprocessed image: its PNG in `out`, and its line (or JSON object) on stdout."""
    from mnistlab.files import to_json
    from mnistlab.infer.explain import explain
    from mnistlab.infer.inside import layer_views

    image = p.preprocessed.tensor
    found = explain(model, image, method, target, args.steps)
    layers = layer_views(model, image) if args.layers else None
    neighbours = index.nearest(image, args.neighbours) if index is not None else None
    written = None
    if out is not None:
        written = out / f"{i:04d}-{Path(p.path).stem}.png"
        _plot(p, model, found, written, layers, neighbours)
    if args.json:
        print(to_json(_as_dict(p, model, found, layers, neighbours)), flush=True)
        return
    members = f", {found.members} members averaged" if found.members > 1 else ""
    print(f"{p.path}: {p.class_name} ({100 * p.confidence:.1f}%); {method}{members} -> {written}", flush=True)


def _neighbour_index(model: LoadedModel, data_dir: str | None) -> NeighbourIndex:
    """The model's index of the training images' features, built now (a bar on a terminal: it takes a while)."""
    from mnistlab.devices import keep_freed_memory
    from mnistlab.infer.inside import NeighbourIndex
    from mnistlab.progress import Progress

    with Progress().bar(0, "indexing the training images", unit="image") as bar:

        def advance(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        keep_freed_memory()  # a command's process: keeping freed memory spares a page fault per page per batch
        return NeighbourIndex.build(model, data_dir, advance)


def _refuse_onnx(path: str | None) -> None:
    if path is not None and Path(path).suffix.lower() == ".onnx":
        raise MnistlabError(
            f"--model {path}: an ONNX file; explain needs the model's .safetensors file (with its .json), since ONNX "
            "keeps no gradients or layers to explain with: give the run directory or model file it was exported from"
        )


def _as_dict(p: Prediction, model: LoadedModel, found: Explanation, layers, neighbours) -> dict:
    from mnistlab.infer.explain import rounded

    report = {
        "path": p.path,
        "label": p.label,
        "class": p.class_name,
        "confidence": p.confidence,
        "probabilities": [round(float(v), 6) for v in found.probabilities],
        "method": found.method,
        "members": found.members,
        "maps": [
            {
                "target": a.target,
                "class": model.classes[a.target],
                "map": rounded(a.map),
                "completeness_error": a.completeness_error,
            }
            for a in found.attributions
        ],
    }
    if found.members > 1:
        report["combined"] = f"the {found.members} members' maps averaged"
    if layers is not None:
        report["layers"] = [_layer_dict(v) for v in layers]
    if neighbours is not None:
        report["neighbours"] = [
            {"index": n.index, "label": n.label, "class": model.classes[n.label], "distance": round(n.distance, 6)}
            for n in neighbours
        ]
    return report


def _plot(p: Prediction, model: LoadedModel, found: Explanation, path: Path, layers, neighbours) -> None:
    from mnistlab.plots import plot_explanation

    names = model.classes
    maps = []
    for a in found.attributions:
        role = found.role(a.target)
        error = f", completeness error {100 * a.completeness_error:.2g}%" if a.completeness_error is not None else ""
        maps.append((f"{names[a.target]} ({role}){error}", a.map.numpy()))
    members = f", {found.members} members' maps averaged" if found.members > 1 else ""
    title = f"{p.path}: {p.class_name} ({100 * p.confidence:.1f}%); {found.method}{members}"
    probabilities = found.probabilities.tolist()
    plot_explanation(p.preprocessed.digit, maps, probabilities, path, title, names, layers, neighbours)


# ---------------------------------------------------------------------------------------------- inside the network


def _layer_dict(view: LayerView) -> dict:
    """A layer's view as JSON: its feature maps (the most active first, with their channels) or every unit's
    activation and the most active units."""
    from mnistlab.infer.explain import rounded

    report = {"name": view.name, "kind": view.kind, "member": view.member}
    if view.kind == "maps":
        report["channels"] = view.channels
        report["maps"] = rounded(view.values, what=f"activations of {view.name}")
    else:
        report["top_units"] = view.top_units
        report["activations"] = rounded(view.values, what=f"activations of {view.name}")
    return report
