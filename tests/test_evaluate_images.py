"""`mnistlab evaluate --images DIR`: a model measured on a folder of the user's own images, laid out as
torchvision's ImageFolder (one folder per class), with the same table and confusion matrix as `evaluate`."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from mnistlab.errors import MnistlabError
from mnistlab.infer.evaluate import evaluate_images
from mnistlab.infer.predict import predict_images
from mnistlab.models.files import load_model

from .support.cli import assert_user_error, mnistlab
from .support.digit_images import on_paper


@pytest.fixture(scope="module")
def folder(tmp_path_factory, mnist_data):
    """Three MNIST test digits of each class photographed on paper, in folders 0-9; and two unusable files."""
    root = tmp_path_factory.mktemp("mine")
    images, labels = mnist_data.test.images[:200].numpy(), mnist_data.test.labels[:200].tolist()
    per_class = {d: 0 for d in range(10)}
    for i, (digit, label) in enumerate(zip(images, labels)):
        if per_class[label] < 3:
            per_class[label] += 1
            (root / str(label)).mkdir(exist_ok=True)
            on_paper(digit, seed=i).save(root / str(label) / f"{i}.jpg", quality=85)
    Image.new("L", (64, 64), 255).save(root / "3" / "blank.png")  # no digit in it
    (root / "5" / "notes.png").write_text("not an image")
    (root / "README.txt").write_text("files beside the class folders are ignored, as ImageFolder does")
    return root


def test_evaluate_images_prints_the_evaluate_table(folder):
    result = mnistlab("evaluate", "--images", str(folder), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"accuracy on 30 images in {folder} ")
    assert lines[1].startswith("per-class accuracy: 0: ")
    assert lines[2] == "confusion matrix (rows: true class, columns: predicted):"
    assert len(lines) == 14 and all(len(line.split()) == 11 for line in lines[4:])
    warnings = result.stderr.strip().splitlines()
    assert len(warnings) == 2 and all(w.startswith("mnistlab: warning: ") and "(not counted)" in w for w in warnings)
    assert any("blank.png" in w and "no digit" in w for w in warnings) and any("notes.png" in w for w in warnings)

    report = json.loads(mnistlab("evaluate", "--images", str(folder), "--json", "--device", "cpu").stdout)
    assert report["images"] == 30 and len(report["skipped"]) == 2
    assert sum(map(sum, report["confusion_matrix"])) == 30
    assert [sum(row) for row in report["confusion_matrix"]] == [3] * 10


def test_evaluate_images_agrees_with_predict(folder):
    """The accuracy is what `predict` says about the same files, one by one."""
    found = evaluate_images(folder, device="cpu")
    model = load_model(None)
    predictions = [p for p in predict_images([folder / str(d) for d in range(10)], model) if p.error is None]
    correct = [p.label == int(p.path.split("/")[-2]) for p in predictions]
    assert found.count == len(predictions) == 30
    assert found.evaluation.accuracy == pytest.approx(sum(correct) / len(correct))
    assert found.evaluation.accuracy >= 0.9


def test_classes_without_images_show_a_dash(folder, tmp_path):
    shutil.copytree(folder / "4", tmp_path / "4")
    result = mnistlab("evaluate", "--images", str(tmp_path), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    shown = result.stdout.splitlines()[1].removeprefix("per-class accuracy: ").split("  ")
    assert [s.endswith(": -") for s in shown] == [d != 4 for d in range(10)]


def test_classes_without_images_are_null_in_json_not_zero(folder, tmp_path):
    """No image of a class is no accuracy (null), not 0.0; the report lists those classes, whose confusion-matrix
    rows are all zero, and the Python API says the same. One image is "1 image"."""
    (tmp_path / "4").mkdir()
    shutil.copy(next((folder / "4").glob("*.jpg")), tmp_path / "4")
    result = mnistlab("evaluate", "--images", str(tmp_path), "--json", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "NaN" not in result.stdout
    report = json.loads(result.stdout)
    absent = [d for d in range(10) if d != 4]
    assert report["classes_without_images"] == absent and report["images"] == 1
    assert [a is None for a in report["per_class_accuracy"]] == [d != 4 for d in range(10)]
    assert report["per_class_accuracy"][4] in (0.0, 1.0)
    assert [sum(row) for row in report["confusion_matrix"]] == [int(d == 4) for d in range(10)]

    found = evaluate_images(tmp_path, device="cpu")
    assert found.to_dict() == report
    assert found.evaluation.classes_without_images == absent and found.evaluation.per_class_accuracy[0] is None

    text = mnistlab("evaluate", "--images", str(tmp_path), "--device", "cpu")
    assert text.stdout.startswith(f"accuracy on 1 image in {tmp_path} "), text.stdout


def test_folders_not_named_by_class_are_refused(tmp_path):
    (tmp_path / "seven").mkdir()
    Image.new("L", (28, 28)).save(tmp_path / "seven" / "a.png")
    assert_user_error(mnistlab("evaluate", "--images", str(tmp_path)), "seven", "not a class")
    with pytest.raises(MnistlabError, match="not a folder"):
        evaluate_images(tmp_path / "missing", device="cpu")
    (tmp_path / "seven").rename(tmp_path / "7")
    (tmp_path / "7" / "a.png").unlink()
    with pytest.raises(MnistlabError, match="no images in class folders"):
        evaluate_images(tmp_path, device="cpu")
