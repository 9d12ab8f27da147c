"""Several trained models averaged into one model file, measured with its members."""

from __future__ import annotations

import json
from pathlib import Path

from mnistlab.data.splits import load_data
from mnistlab.devices import resolve_device
from mnistlab.errors import MnistlabError
from mnistlab.files import FolderLock, check_output_dir, clear_dir, write_json
from mnistlab.models.calibration import calibration
from mnistlab.models.files import load_model, model_paths, save_ensemble
from mnistlab.models.metrics import evaluate_model, evaluate_scores, predict_scores


def make_ensemble(
    members: list[str | Path],
    out_dir: str | Path,
    data_dir: str | Path | None = None,
    device: str = "auto",
    force: bool = False,
) -> dict:
    """Average `members` into one model file in `out_dir`, and measure it and its members on the test set.

    The ensemble is then a model like any other: evaluate, predict and export take `out_dir`.
    """
    out = check_output_dir(out_dir, force)
    if len(members) < 2:
        raise MnistlabError("an ensemble needs at least two members")
    _check_distinct(members)
    with FolderLock(out):
        check_output_dir(out, force)  # again, now that no one else can write there
        return _make_ensemble(members, out, data_dir, device)


def _check_distinct(members: list[str | Path]) -> None:
    """Refuse a model given twice, under any path (`d1` and `./d1/`, a symlink, `d1/model.safetensors`): it would
    be one member counted twice."""
    seen: dict[tuple[int, int], str | Path] = {}
    for member in members:
        stat = model_paths(member)[0].stat()  # the weights file: one model, whatever path names it
        first = seen.get((stat.st_dev, stat.st_ino))
        if first is not None:
            raise MnistlabError(
                f"{first} and {member} are the same model given twice; an ensemble needs at least two different members"
            )
        seen[(stat.st_dev, stat.st_ino)] = member


def _make_ensemble(members: list[str | Path], out: Path, data_dir: str | Path | None, device: str) -> dict:
    dev = resolve_device(device)
    loaded = [load_model(m, dev) for m in members]  # validates every member before anything is written
    datasets = {m.dataset for m in loaded}
    if len(datasets) > 1:
        raise MnistlabError(f"the members were trained on different datasets ({', '.join(sorted(datasets))})")
    dataset = datasets.pop()
    data = load_data(dataset, data_dir, val_size=0, device=dev)
    accuracies = {str(m): evaluate_model(lm.model, data.test, lm.loss_fn()).accuracy for m, lm in zip(members, loaded)}
    clear_dir(out)
    save_ensemble([Path(m) for m in members], out, {"dataset": dataset, "members": accuracies})
    ensemble = load_model(out, dev)
    scores = predict_scores(ensemble.model, data.test.images)  # one pass for its accuracy and its calibration
    result = evaluate_scores(scores, data.test.labels, ensemble.loss_fn())
    description = json.loads((out / "model.json").read_text(encoding="utf-8"))
    description["metadata"]["test_accuracy"] = result.accuracy  # the ensemble's own, as a single model's file has
    # and how well its calibration held there, measured as `evaluate` measures it
    description["metadata"]["test_ece"] = calibration(ensemble.probabilities_of(scores), data.test.labels).ece
    write_json(out / "model.json", description)
    summary = {"accuracy": result.accuracy, "loss": result.loss, "members": accuracies}
    write_json(out / "metrics.json", summary)
    return summary
