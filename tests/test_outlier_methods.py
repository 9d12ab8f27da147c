"""The outlier methods a model file records (issue 22): "feature-mahalanobis" (the density of the penultimate
features) and "max-probability" (1 - the top calibrated probability, for runs trained with outlier exposure):
fitted, stored, dispatched on when loading, scored in the one forward pass, exported, and mixed in an ensemble."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file

from mnistlab.config import load_config
from mnistlab.data.splits import to_float
from mnistlab.infer.calibrate import calibrate
from mnistlab.infer.ensemble import make_ensemble
from mnistlab.models.files import load_model
from mnistlab.models.metrics import predict_answers
from mnistlab.models.outliers import FLAGGED, FeatureDensity, MaxProbability, OutlierDetector, flagged
from mnistlab.train.loop import train

from .support.cli import assert_user_error, run_main
from .support.mnist import subset


@pytest.fixture(scope="module")
def max_probability_run(small_run, mnist_path, tmp_path_factory) -> Path:
    """A copy of `small_run` whose model.json names the max-probability method, calibrated: its temperature,
    confidence map and max-probability threshold refitted on its validation split."""
    run = tmp_path_factory.mktemp("maxprob") / "run"
    shutil.copytree(small_run, run)
    description = json.loads((run / "model.json").read_text())
    description["outliers"] = {"method": "max-probability"}
    (run / "model.json").write_text(json.dumps(description))
    calibrate(run, mnist_path, "cpu")
    return run


def _answers(path, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A model file's calibrated probabilities and outlier scores for uint8 images, batch by batch as the faces
    compute them."""
    return predict_answers(load_model(path).answering(), images)


def test_the_threshold_flags_at_most_one_percent_of_the_validation_split(max_probability_run, mnist_data):
    block = json.loads((max_probability_run / "model.json").read_text())["outliers"]
    assert block["method"] == "max-probability" and 0 < block["threshold"] <= 1
    assert block["fitted_on"] == "validation split (5000 images): 1 - the top calibrated probability"
    assert not any("outliers." in k for k in load_file(str(max_probability_run / "model.safetensors")))
    _, scores = _answers(max_probability_run, mnist_data.val.images)
    share = float(flagged(scores, block["threshold"]).double().mean())
    assert share <= FLAGGED and share == block["validation_flagged"]


def test_the_score_is_one_minus_the_top_probability_the_model_answers(max_probability_run, mnist_data):
    images = torch.cat([mnist_data.test.images[:300], torch.randint(0, 256, (50, 28, 28), dtype=torch.uint8)])
    with torch.inference_mode():
        probabilities, scores = load_model(max_probability_run).answering()(to_float(images))
    assert probabilities.dtype == scores.dtype == torch.float32
    torch.testing.assert_close(scores, 1 - probabilities.max(1).values, rtol=0, atol=1e-6)
    assert (scores > 0).all()  # in float64: a sure answer's score is small, not rounded to 0


def test_predict_json_gives_the_flag_and_the_score(max_probability_run, mnist_data, tmp_path, capsys):
    threshold = load_model(max_probability_run).outlier_threshold
    Image.fromarray(mnist_data.test.images[0].numpy()).save(tmp_path / "digit.png")
    noise = torch.randint(0, 256, (28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    Image.fromarray(noise.numpy()).save(tmp_path / "noise.png")
    result = run_main(capsys, "predict", str(tmp_path), "--model", str(max_probability_run), "--json")
    assert result.returncode == 0, result.stderr
    records = {Path(r["path"]).name: r for r in map(json.loads, result.stdout.splitlines())}
    for record in records.values():
        assert record["outlier"] == (record["outlier_score"] > threshold)
        assert 0 <= record["outlier_score"] <= 1
    assert records["digit.png"]["outlier"] is False


def test_the_onnx_export_matches_pytorch(max_probability_run, mnist_path, mnist_data, tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="ONNX export is an optional extra")
    import onnxruntime

    out = tmp_path / "model.onnx"
    result = run_main(capsys, "export", str(max_probability_run), "--onnx", str(out), "--data-dir", str(mnist_path))
    assert result.returncode == 0, result.stderr
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert float(meta["outlier_threshold"]) == load_model(max_probability_run).outlier_threshold
    images = to_float(torch.cat([mnist_data.test.images[:200], torch.randint(0, 256, (50, 28, 28), dtype=torch.uint8)]))
    probabilities, scores = session.run(["probabilities", "outlier_score"], {"images": images.numpy()})
    with torch.inference_mode():
        expected = load_model(max_probability_run).answering()(images)
    torch.testing.assert_close(torch.from_numpy(probabilities), expected[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(scores), expected[1], rtol=1e-3, atol=0)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda b: b.update(method="banana"), "unknown outlier method 'banana'"),
        (lambda b: b.update(threshold=float("nan")), "outlier threshold must be a positive finite"),
        (lambda b: b.update(threshold=1.5), "max-probability outlier threshold must be in (0, 1]"),
    ],
    ids=["banana", "nan", "above-one"],
)
def test_a_broken_block_is_refused_on_load_in_one_line(max_probability_run, tmp_path, capsys, edit, message):
    broken = tmp_path / "broken"
    shutil.copytree(max_probability_run, broken)
    description = json.loads((broken / "model.json").read_text())
    edit(description["outliers"])
    (broken / "model.json").write_text(json.dumps(description))  # NaN as Python's json writes it
    image = tmp_path / "stroke.png"
    Image.fromarray((torch.arange(28 * 28).view(28, 28) % 28 == 14).to(torch.uint8).mul(255).numpy()).save(image)
    assert_user_error(run_main(capsys, "predict", str(image), "--model", str(broken)), message)


def test_an_ensemble_of_a_density_member_and_a_max_probability_member(
    small_run, max_probability_run, mnist_data, tmp_path
):
    """Each member's score over its own threshold, averaged: the max-probability member's from its own
    calibrated probabilities (its temperature, and its confidence map carried into the ensemble)."""
    make_ensemble([small_run, max_probability_run], tmp_path / "ensemble", device="cpu")
    description = json.loads((tmp_path / "ensemble" / "model.json").read_text())
    assert description["outliers"]["method"] == "mixed" and description["outliers"]["threshold"] == 1.0
    assert [m["outliers"]["method"] for m in description["ensemble"]] == ["feature-mahalanobis", "max-probability"]
    images = torch.cat([mnist_data.test.images[:200], torch.randint(0, 256, (50, 28, 28), dtype=torch.uint8)])
    expected = sum(_answers(r, images)[1] / load_model(r).outlier_threshold for r in (small_run, max_probability_run))
    torch.testing.assert_close(_answers(tmp_path / "ensemble", images)[1], expected / 2, rtol=1e-4, atol=1e-6)


def test_a_run_trained_with_outlier_exposure_gets_the_max_probability_detector(mnist_data, tmp_path):
    config = load_config("seed-b-fixed").with_overrides({"training.epochs": 1, "training.outlier_exposure": 1.0})
    data = subset(mnist_data, 3000, 1000)
    train(config, out_dir=tmp_path / "run", data=data, quiet=True)
    block = json.loads((tmp_path / "run" / "model.json").read_text())["outliers"]
    assert block["method"] == "max-probability" and 0 < block["threshold"] <= 1
    _, scores = _answers(tmp_path / "run", data.val.images)
    assert float(flagged(scores, block["threshold"]).double().mean()) == block["validation_flagged"] <= FLAGGED


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), threshold=st.floats(0.01, 0.99), sharpness=st.floats(0.1, 20))
def test_the_flag_is_monotone_in_the_score_for_both_methods(seed, threshold, sharpness):
    """Whatever the images, sorted by score their flags go from unflagged to flagged, never back."""
    g = torch.Generator().manual_seed(seed)
    probabilities = (torch.randn(200, 10, generator=g, dtype=torch.float64) * sharpness).softmax(1)
    features = torch.randn(200, 6, generator=g, dtype=torch.float64)
    density = FeatureDensity.fit(features, torch.arange(200) % 3)
    for scorer in (MaxProbability(), density):
        scores = OutlierDetector([scorer], [1.0], threshold)([features], [probabilities])
        flags = flagged(scores, threshold)[scores.argsort()]
        assert not (flags[:-1] & ~flags[1:]).any()
