"""The outlier flag ("not a digit?") on every face that answers: `predict` (text, --json), `evaluate` (the test
split's flagged share, --outliers DIR with its AUROC), `robustness` (flagged share per corruption), and a model
file from before detectors (one note, predictions still made). Real models (the bundled one, small runs trained
here), real MNIST and Fashion-MNIST test images, and generated non-digits (tests/support/nondigits.py)."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file

from mnistlab.data.idx import read_labels
from mnistlab.infer.predict import predict_images
from mnistlab.models.files import load_model, write_safetensors
from mnistlab.models.outliers import auroc, flagged, verdict
from mnistlab.plots import plot_prediction

from .support.cli import assert_user_error, run_main
from .support.idx_files import GZ_NAMES, write_images, write_labels
from .support.nondigits import write_nondigits
from .support.runs import train_small

DIGITS = 20  # real MNIST test digits, each of which the bundled model must not flag (but for one)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, digits) -> Path:
    """root/digits: 20 real MNIST test digits as PNG (every 397th); root/shapes and root/fashion: 20 generated
    shapes and 20 Fashion-MNIST test garments (seed 1)."""
    root = tmp_path_factory.mktemp("outliers")
    (root / "digits").mkdir()
    for i in range(DIGITS):
        Image.fromarray(digits[i * 397]).save(root / "digits" / f"{i:02d}.png")
    for kind in ("shapes", "fashion"):
        write_nondigits(kind, 20, root / kind, seed=1)
    return root


@pytest.fixture(scope="module")
def small_mnist(tmp_path_factory, digits, mnist_path) -> Path:
    """A data folder whose MNIST test split is the first 500 real test images (and 20 training ones): evaluate
    with the bundled ensemble in seconds."""
    root = tmp_path_factory.mktemp("data")
    folder = root / "mnist"
    folder.mkdir()
    train_images = np.zeros((20, 28, 28), dtype=np.uint8)
    write_images(folder / GZ_NAMES[0], train_images, compress=True)
    write_labels(folder / GZ_NAMES[1], np.zeros(20, dtype=np.uint8), compress=True)
    write_images(folder / GZ_NAMES[2], digits[:500], compress=True)
    write_labels(folder / GZ_NAMES[3], read_labels(mnist_path / GZ_NAMES[3])[:500], compress=True)
    return root


@pytest.fixture(scope="module")
def run_dir(mnist_data, tmp_path_factory) -> Path:
    """Network B trained for one epoch on 5,000 real training images: its detector is fitted when it finishes."""
    return train_small(tmp_path_factory.mktemp("run") / "b", mnist_data, 5000)


def json_lines(text: str) -> list[dict]:
    """One strict JSON object per line (NaN or Infinity refused)."""

    def refuse(token: str) -> None:
        raise AssertionError(f"non-finite number {token} in JSON")

    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


def without_detector(run: Path, out: Path) -> Path:
    """A copy of a run's model file as it was before outlier detectors: no `outliers` block, no density."""
    out.mkdir()
    meta = json.loads((run / "model.json").read_text())
    del meta["outliers"]
    (out / "model.json").write_text(json.dumps(meta))
    state = {k: v for k, v in load_file(str(run / "model.safetensors")).items() if not k.startswith("outliers.")}
    write_safetensors(out / "model.safetensors", state, {"format": "mnistlab-model"})
    return out


def test_predict_flags_non_digits_and_not_real_digits(folders, capsys):
    result = run_main(capsys, "predict", "--json", str(folders))
    assert result.returncode == 0 and result.stderr == "", result.stderr
    found = json_lines(result.stdout)
    assert len(found) == 60
    by_kind: dict[str, list[dict]] = {}
    for p in found:
        assert isinstance(p["outlier"], bool) and p["outlier_score"] >= 0, p
        assert p["outlier"] == (p["outlier_score"] > 1.0)  # the bundled ensemble's threshold
        by_kind.setdefault(Path(p["path"]).parent.name, []).append(p)
    shares = {kind: np.mean([p["outlier"] for p in found]) for kind, found in by_kind.items()}
    assert sum(p["outlier"] for p in by_kind["digits"]) <= 1, shares
    assert shares["fashion"] >= 0.6 and shares["shapes"] >= 0.4, shares

    text = run_main(capsys, "predict", str(folders))
    assert text.returncode == 0 and text.stderr == ""
    lines = text.stdout.splitlines()
    assert len(lines) == len(found)
    for line, p in zip(lines, found):
        assert line.startswith(f"{p['path']}: {p['class']} (")
        assert line.endswith(", not a digit?") == p["outlier"], line
        assert line.count("not a digit?") == p["outlier"]


@pytest.mark.slow  # 20 s on 2 busy cores, most of it training the fashion model
def test_a_fashion_model_asks_not_a_garment(fashion_run, tmp_path, capsys):
    """Handwritten-like letters: the Fashion-MNIST model flags most of them (8 of these 10), in its own words,
    in text and in --show's chart."""
    letters = tmp_path / "letters"
    write_nondigits("letters", 10, letters, seed=3)
    found = json_lines(run_main(capsys, "predict", "--json", "--model", str(fashion_run), str(letters)).stdout)
    text = run_main(capsys, "predict", "--model", str(fashion_run), str(letters))
    assert text.returncode == 0 and text.stderr == ""
    assert sum(p["outlier"] for p in found) >= 5, [p["outlier_score"] for p in found]
    for line, p in zip(text.stdout.splitlines(), found):
        assert line.endswith(", not a garment?") == p["outlier"], line
    assert "digit" not in text.stdout

    first = next(p for p in found if p["outlier"])
    shown = run_main(capsys, "predict", first["path"], "--model", str(fashion_run), "--show", str(tmp_path / "show"))
    assert shown.returncode == 0, shown.stderr
    (chart,) = (tmp_path / "show").glob("*.png")
    model = load_model(fashion_run)
    p = next(predict_images([first["path"]], model, keep_preprocessed=True))
    title = f"{p.path}: {p.class_name}, not a garment?"
    expected = plot_prediction(
        p.preprocessed.original, p.preprocessed.digit, p.probabilities, tmp_path / "t.png", title, model.classes
    )
    assert chart.read_bytes() == expected.read_bytes()


@pytest.mark.slow  # 20 s on 2 busy cores: the bundled ensemble evaluated twice on 500 test images
def test_evaluate_outliers_reports_flagged_shares_and_auroc(folders, small_mnist, tmp_path, capsys):
    args = ["evaluate", "--data-dir", str(small_mnist), "--device", "cpu"]
    result = run_main(capsys, *args, "--json", "--outliers", str(folders / "fashion"))
    assert result.returncode == 0, result.stderr
    report = json_lines(result.stdout)[0]["outliers"]
    assert report["threshold"] == 1.0 and report["test_images"] == 500
    assert report["test_flagged"] <= 0.02  # about 1% of held-out digits, by the threshold's choice
    (fashion,) = report["folders"]
    assert fashion["folder"] == str(folders / "fashion") and fashion["images"] == 20 and fashion["refused"] == 0
    assert fashion["flagged"] >= 0.6 and fashion["skipped"] == []
    assert 0.9 < fashion["auroc"] <= 1

    # A blank page is refused by preprocessing and counted as flagged; a file that is no image is left out.
    odd = tmp_path / "odd"
    (odd / "deeper").mkdir(parents=True)
    Image.new("RGB", (200, 150), (255, 255, 255)).save(odd / "deeper" / "white.png")
    (odd / "notes.png").write_text("not an image")
    for i in range(3):
        shutil.copy(folders / "digits" / f"{i:02d}.png", odd / f"digit-{i}.png")
    text = run_main(capsys, *args, "--outliers", str(odd), "--outliers", str(folders / "fashion"))
    assert text.returncode == 0, text.stderr
    unread = f"{odd / 'notes.png'}: not an image (or in a format Pillow cannot read)"
    assert text.stderr.strip() == f"mnistlab: warning: {unread} (not counted)"
    lines = text.stdout.splitlines()
    assert lines[-3].startswith("outliers: ") and "of the 500 test images flagged" in lines[-3]
    assert lines[-2].startswith(f"outliers in {odd}: 25.00% of 4 images flagged (1 of them refused by preprocessing")
    assert lines[-1].startswith(f"outliers in {folders / 'fashion'}: {100 * fashion['flagged']:.2f}% of 20 images")
    assert f"AUROC {fashion['auroc']:.4f} against the test images" in lines[-1]


def test_evaluate_outliers_refuses_bad_folders_in_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "texts" / "more").mkdir(parents=True)
    (tmp_path / "texts" / "a.txt").write_text("a")
    (tmp_path / "texts" / "more" / "b.txt").write_text("b")
    (tmp_path / "file.png").write_text("x")
    cases = [
        (tmp_path / "missing", "no such folder"),
        (tmp_path / "empty", "no image files in this folder"),
        (tmp_path / "texts", "no image files in this folder"),
        (tmp_path / "file.png", "not a folder"),
    ]
    for folder, message in cases:
        assert_user_error(run_main(capsys, "evaluate", "--outliers", str(folder)), str(folder), message)
    both = run_main(capsys, "evaluate", "--images", str(tmp_path), "--outliers", str(tmp_path / "texts"))
    assert_user_error(both, "leave out --images")


@pytest.mark.slow  # 7 s on 2 busy cores, with its training
def test_a_model_without_a_detector_is_noted_once_and_still_predicts(run_dir, folders, mnist_path, tmp_path, capsys):
    old = without_detector(run_dir, tmp_path / "old")
    refused = run_main(capsys, "evaluate", str(old), "--outliers", str(folders / "fashion"))
    assert_user_error(refused, f"{old} has no outlier detector", f"add one with: mnistlab calibrate {old}")

    result = run_main(capsys, "predict", "--json", "--model", str(old), str(folders / "digits"))
    assert result.returncode == 0
    note = result.stderr.strip().splitlines()
    assert note == [
        f"mnistlab: warning: {old} has no outlier detector (an older model file), so no image is marked "
        f"'not a digit?'; add one with: mnistlab calibrate {old}"
    ]
    found = json_lines(result.stdout)
    assert len(found) == DIGITS and all(p["outlier"] is None and p["outlier_score"] is None for p in found)
    assert all(p["class"] == str(p["label"]) and len(p["probabilities"]) == 10 for p in found)

    text = run_main(capsys, "evaluate", str(old), "--data-dir", str(mnist_path), "--device", "cpu")
    assert text.returncode == 0 and text.stdout.splitlines()[-1].startswith(f"outliers: {old} has no outlier")
    as_json = json_lines(run_main(capsys, "evaluate", str(old), "--json", "--data-dir", str(mnist_path)).stdout)[0]
    assert as_json["outliers"] == {"threshold": None, "test_images": 10000, "test_flagged": None, "folders": []}


@pytest.mark.slow  # 6 s on 2 busy cores
def test_robustness_rows_carry_the_flagged_share(run_dir, mnist_path, tmp_path, capsys):
    def robustness(model: Path, corruptions: str, out: Path) -> dict:
        args = ["--data-dir", str(mnist_path), "--images", "200", "--attacks", "none", "--json", "--quiet"]
        result = run_main(capsys, "robustness", str(model), "--corruptions", corruptions, "--out", str(out), *args)
        assert result.returncode == 0, result.stderr
        return json_lines(result.stdout)[0]

    report = robustness(run_dir, "fog,shot_noise,stripe", tmp_path / "r")
    assert report["outlier_threshold"] > 0 and 0 <= report["clean_flagged"]["flagged"] <= 0.05
    for name, row in report["corruptions"].items():
        assert 0 <= row["flagged"] <= 1 and (row["errors_flagged"] is None or 0 <= row["errors_flagged"] <= 1), name
    assert report["corruptions"]["fog"]["flagged"] > report["clean_flagged"]["flagged"]  # fog is far from MNIST
    assert report["mean_flagged"] == pytest.approx(np.mean([r["flagged"] for r in report["corruptions"].values()]))
    markdown = (tmp_path / "r" / "report.md").read_text()
    assert "| corruption | accuracy | error | error / clean error | flagged | errors flagged |" in markdown
    assert f"| fog | {100 * report['corruptions']['fog']['accuracy']:.2f}% |" in markdown

    plain = robustness(without_detector(run_dir, tmp_path / "old"), "fog", tmp_path / "o")
    assert plain["corruptions"]["fog"]["flagged"] is None and plain["clean_flagged"]["flagged"] is None


# ---------------------------------------------------------------------------------------------- the decision

finite = st.floats(min_value=-1e30, max_value=1e30, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(scores=st.lists(finite, min_size=1, max_size=20), threshold=st.floats(1e-6, 1e6))
def test_the_flag_is_score_above_threshold_and_monotone(scores, threshold):
    tensor = torch.tensor(scores, dtype=torch.float64)
    flags = flagged(tensor, threshold)
    assert flags.tolist() == [s > threshold for s in scores]
    order = tensor.argsort()
    assert (flags[order].int().diff() >= 0).all()  # along rising scores, once flagged, always flagged
    for s, f in zip(scores, flags.tolist()):
        shown_flag, shown = verdict(s, threshold)
        assert shown_flag == f and shown is not None and math.isclose(shown, s, rel_tol=1e-5, abs_tol=1e-30)
        assert verdict(s, None) == (None, None)
    assert verdict(threshold, threshold)[0] is False  # at the threshold itself: not above it
    assert verdict(math.nan, threshold) == (True, None) and verdict(math.inf, threshold) == (True, None)


@settings(max_examples=200, deadline=None)
@given(
    negatives=st.lists(st.integers(0, 5), min_size=1, max_size=12),
    positives=st.lists(st.integers(0, 5), min_size=1, max_size=12),
)
def test_auroc_counts_ordered_pairs_and_ties_half(negatives, positives):
    pairs = list(itertools.product(negatives, positives))
    expected = sum(1.0 if p > n else 0.5 if p == n else 0.0 for n, p in pairs) / len(pairs)
    got = auroc(torch.tensor(negatives, dtype=torch.float32), torch.tensor(positives, dtype=torch.float32))
    assert got == pytest.approx(expected)
    assert auroc(torch.tensor([]), torch.tensor(positives)) is None
