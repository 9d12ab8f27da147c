"""Classifying a user's own images end to end: predict, classify, inspect and export, through the CLI, with
real files built from MNIST *test* digits and the bundled pretrained model."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mnistlab.config import load_config
from mnistlab.datasets import DATASETS
from mnistlab.infer.evaluate import gallery_text
from mnistlab.infer.predict import predict_images
from mnistlab.models.files import load_model
from mnistlab.plots import plot_prediction
from mnistlab.train.loop import train

from .support.cli import assert_user_error, mnistlab, run_main
from .support.digit_images import KINDS, blank_png, realistic_image
from .support.mnist import fashion_dir

# The least accuracy each kind of image must keep with the bundled model, on the digits below (measured
# figures are in docs/predict.md; these floors leave a margin under them).
FLOORS = {
    "mnist-png": 1.0,
    "paper-jpeg": 0.95,
    "paper-png": 0.95,
    "small-in-corner-jpeg": 0.9,
    "canvas-rgba-png": 0.95,
    "palette-png": 0.95,
    "greyscale-jpeg": 0.95,
    "exif-rotated-jpeg": 0.95,
    "light-on-dark-png": 0.95,
}
COUNT = 40


@pytest.fixture(scope="module")
def test_digits(mnist_data):
    """A fixed spread of MNIST test digits (never training ones): every 250th, so all classes appear."""
    index = torch.arange(0, 10000, 250)[:COUNT]
    return mnist_data.test.images[index].numpy(), mnist_data.test.labels[index].tolist()


@pytest.fixture(scope="module")
def image_folders(tmp_path_factory, test_digits):
    root = tmp_path_factory.mktemp("images")
    images, _ = test_digits
    for kind in KINDS:
        for i, digit in enumerate(images):
            realistic_image(kind, digit, i, root / kind)
    return root


def predictions(*paths: Path, extra: tuple[str, ...] = ()) -> tuple[list[dict], subprocess.CompletedProcess]:
    result = mnistlab("predict", "--json", *extra, *map(str, paths))
    return [json.loads(line) for line in result.stdout.splitlines()], result


@pytest.mark.slow  # 25 s on 2 busy cores, with its images
def test_accuracy_on_each_kind_of_image(image_folders, test_digits):
    _, labels = test_digits
    found, result = predictions(image_folders)
    assert result.returncode == 0, result.stderr
    by_kind: dict[str, list[dict]] = {}
    for p in found:
        by_kind.setdefault(Path(p["path"]).parent.name, []).append(p)
    assert set(by_kind) == set(KINDS)
    for kind, preds in by_kind.items():
        assert [Path(p["path"]).stem for p in preds] == [f"{i:04d}" for i in range(COUNT)]  # sorted walk
        accuracy = np.mean([p["label"] == labels[i] for i, p in enumerate(preds)])
        assert accuracy >= FLOORS[kind], f"{kind}: {accuracy:.3f}"
    first = found[0]
    assert set(first) == {"path", "label", "class", "confidence", "probabilities", "outlier", "outlier_score"}
    assert first["class"] == str(first["label"])  # the bundled model's classes are the digits
    assert len(first["probabilities"]) == 10 and abs(sum(first["probabilities"]) - 1) < 1e-4
    assert first["confidence"] == max(first["probabilities"])


@pytest.mark.slow  # with image_folders, 20 s to make, on 2 busy cores
def test_bad_files_are_reported_and_the_rest_still_classified(image_folders, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "notes.png").write_text("not an image")
    (bad / "empty.png").write_bytes(b"")
    Image.new("L", (1, 1), 255).save(bad / "dot.png")
    Image.new("RGB", (300, 200), (255, 255, 255)).save(bad / "white.png")
    blank_png(bad / "huge.png", 20000, 20000)
    (tmp_path / "no-images").mkdir()
    good = image_folders / "paper-jpeg" / "0000.jpg"
    found, result = predictions(bad, tmp_path / "missing.png", tmp_path / "no-images", good)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = {Path(p["path"]).name: p["error"] for p in found if "error" in p}
    assert "not an image" in errors["notes.png"]
    assert "empty file" in errors["empty.png"]
    assert "blank" in errors["dot.png"] and "blank" in errors["white.png"]
    assert "too large" in errors["huge.png"]
    assert "No such file" in errors["missing.png"] or "cannot read" in errors["missing.png"]
    assert "no image files" in errors["no-images"]
    assert len(result.stderr.strip().splitlines()) == len(errors)  # one line each
    assert found[-1]["path"] == str(good) and "label" in found[-1]


@pytest.mark.slow  # with image_folders, 20 s to make, on 2 busy cores
def test_plain_output_top_k_and_show(image_folders, tmp_path):
    image = image_folders / "canvas-rgba-png" / "0001.png"
    result = mnistlab("predict", "--top-k", "3", "--show", str(tmp_path / "show"), str(image))
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith(f"{image}: ") and line.count("%") == 3
    shown = list((tmp_path / "show").glob("*.png"))
    assert len(shown) == 1 and Image.open(shown[0]).size[0] > 500


@pytest.mark.slow  # 8 s on 2 busy cores
def test_polarity_override(image_folders, test_digits):
    _, labels = test_digits
    image = image_folders / "paper-png" / "0003.png"
    auto, _ = predictions(image)
    forced, _ = predictions(image, extra=("--polarity", "dark-on-light"))
    wrong, _ = predictions(image, extra=("--polarity", "light-on-dark"))
    assert auto[0]["label"] == forced[0]["label"] == labels[3]
    assert "error" in wrong[0] or wrong[0]["probabilities"] != auto[0]["probabilities"]


@pytest.mark.slow  # with image_folders, 20 s to make, on 2 busy cores
def test_classify_reads_paths_until_exit(image_folders, test_digits):
    _, labels = test_digits
    paths = [image_folders / "paper-jpeg" / "0002.jpg", image_folders / "mnist-png" / "0005.png"]
    stdin = f"{paths[0]}\n/no/such/file.png\n{image_folders}\n{paths[1]}\nexit\n"
    result = subprocess.run(
        [sys.executable, "-m", "mnistlab", "classify"], input=stdin, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "Please enter a filepath:",
        f"Classifier: {labels[2]}",
        "Please enter a filepath:",
        "Please enter a filepath:",
        "Please enter a filepath:",
        f"Classifier: {labels[5]}",
        "Please enter a filepath:",
        "Exiting...",
    ]
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 2 and "file.png" in errors[0] and "folder" in errors[1]


@pytest.mark.slow  # with image_folders, 20 s to make, on 2 busy cores
def test_classify_typed_at_a_terminal(image_folders, test_digits):
    """The same loop typed at a real terminal (a pseudo-terminal), line by line."""
    _, labels = test_digits
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(sys.executable, [sys.executable, "-m", "mnistlab", "classify"])
    output = b""

    def read_until(text: bytes, timeout: float = 120) -> None:
        nonlocal output
        deadline = time.monotonic() + timeout
        while text not in output and time.monotonic() < deadline:
            try:
                output += os.read(fd, 4096)
            except OSError:
                break

    read_until(b"filepath:")
    os.write(fd, f"{image_folders / 'palette-png' / '0004.png'}\n".encode())
    read_until(b"Classifier:")
    read_until(b"filepath:", 10)
    os.write(fd, b"exit\n")
    read_until(b"Exiting...")
    os.waitpid(pid, 0)
    os.close(fd)
    assert f"Classifier: {labels[4]}".encode() in output
    assert b"Exiting..." in output


@pytest.mark.slow  # 25 s on 2 busy cores
def test_inspect_finds_the_mistakes(mnist_path, tmp_path):
    result = mnistlab("inspect", "--out", str(tmp_path), "--data-dir", str(mnist_path))
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "inspection.json").read_text())
    assert (tmp_path / "confusion.png").is_file() and (tmp_path / "misclassified.png").is_file()
    assert summary["errors"] == len(summary["misclassified"]) == round((1 - summary["accuracy"]) * 10000)
    confidences = [m["confidence"] for m in summary["misclassified"]]
    assert confidences == sorted(confidences, reverse=True)
    counts = {}
    for m in summary["misclassified"]:
        assert m["true"] != m["predicted"]
        counts[(m["true"], m["predicted"])] = counts.get((m["true"], m["predicted"]), 0) + 1
    top = summary["most_confused"][0]
    assert counts[(top["true"], top["predicted"])] == top["count"] == max(counts.values())


@pytest.mark.slow  # 13 s on 2 busy cores
def test_onnx_export_matches_pytorch(mnist_path, tmp_path):
    pytest.importorskip("onnxruntime", reason="ONNX export is an optional extra")
    import onnxruntime

    out = tmp_path / "model.onnx"
    result = mnistlab("export", "--onnx", str(out), "--data-dir", str(mnist_path))
    assert result.returncode == 0, result.stderr
    assert "1000 test images" in result.stdout and result.stderr == ""
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 7):  # the batch size is free
        x = np.random.default_rng(batch).random((batch, 28, 28), dtype=np.float32)
        got = session.run(None, {"images": x})[0]
        with torch.inference_mode():
            expected = load_model().model(torch.from_numpy(x)).numpy()
        assert got.shape == (batch, 10)
        np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.slow  # 42 s on 2 busy cores
def test_unsafe_or_mismatched_model_files_are_refused(mnist_data, tmp_path, image_folders):
    image = str(image_folders / "mnist-png" / "0000.png")
    pickled = tmp_path / "evil.safetensors"
    torch.save({"weights": torch.zeros(3)}, pickled)
    (tmp_path / "evil.json").write_text("{}")
    assert_user_error(mnistlab("predict", "--model", str(pickled), image), "pickle", "only opens safetensors")

    run = tmp_path / "run"
    config = load_config("seed-b-fixed").with_overrides({"training.epochs": 1})
    train(config, out_dir=run, quiet=True, data=mnist_data)
    meta = json.loads((run / "model.json").read_text())
    meta["model"]["hidden"] = [256]
    (run / "model.json").write_text(json.dumps(meta))
    assert_user_error(mnistlab("predict", "--model", str(run), image), "do not match the architecture")
    assert_user_error(mnistlab("evaluate", str(run)), "do not match the architecture")
    (run / "model.json").write_text("{not json")
    assert_user_error(mnistlab("predict", "--model", str(run), image), "not valid JSON")


@pytest.mark.slow  # 10 s on 2 busy cores: an ONNX export
def test_a_fashion_model_speaks_of_garments_not_digits(fashion_run, fashion_data, tmp_path, capsys):
    """evaluate --images, predict --show's chart, inspect's gallery and export name a Fashion-MNIST model's
    classes, not the digits 0-9."""
    run, data = fashion_run, fashion_data
    names = list(DATASETS["fashion-mnist"].classes)
    image = tmp_path / "mine" / "Trouser" / "trouser.png"
    image.parent.mkdir(parents=True)
    Image.fromarray(data.test.images[int((data.test.labels == 1).nonzero()[0])].numpy()).save(image)

    text = run_main(capsys, "evaluate", str(run), "--images", str(tmp_path / "mine"), "--device", "cpu")
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines()[1].startswith("per-class accuracy: T-shirt/top: -  Trouser: "), text.stdout

    # The chart is the one drawn with the class names (the same figure, byte for byte).
    shown = run_main(capsys, "predict", str(image), "--model", str(run), "--show", str(tmp_path / "show"))
    assert shown.returncode == 0, shown.stderr
    (chart,) = (tmp_path / "show").glob("*.png")
    p = next(predict_images([str(image)], load_model(run), keep_preprocessed=True))
    title = f"{p.path}: {p.class_name}"
    named = plot_prediction(
        p.preprocessed.original, p.preprocessed.digit, p.probabilities, tmp_path / "n.png", title, names
    )
    assert chart.read_bytes() == named.read_bytes()

    heading, captions = gallery_text(names, 1, [(9, 7, 0.5)])
    assert heading.startswith("1 misclassified test image (") and captions == ["Ankle boot → Sneaker (50%)"]
    assert gallery_text([str(d) for d in range(10)], 2, [(4, 9, 1.0)]) == (
        "2 misclassified test digits (true → predicted, confidence), most confident first",
        ["4 → 9 (100%)"],
    )

    pytest.importorskip("onnxruntime", reason="ONNX export is an optional extra")
    onnx = run_main(capsys, "export", str(run), "--onnx", str(tmp_path / "f.onnx"), "--data-dir", str(fashion_dir()))
    assert onnx.returncode == 0, onnx.stderr
    assert "on 1000 test images" in onnx.stdout and "same class for all)" in onnx.stdout, onnx.stdout
