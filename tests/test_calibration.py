"""Calibrated confidence (issue 22, part 1): temperature scaling and then a top-label confidence map, fitted on the
validation split only, applied to every probability mnistlab gives, measured by ECE, NLL and Brier score on the
test split."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mnistlab.config import load_config
from mnistlab.infer.calibrate import calibrate
from mnistlab.infer.ensemble import make_ensemble
from mnistlab.infer.evaluate import evaluate
from mnistlab.models.calibration import (
    ConfidenceMap,
    calibrated,
    calibration,
    fit_confidence_map,
    fit_on_split,
    fit_temperature,
    reliability,
    temper,
)
from mnistlab.models.files import load_model
from mnistlab.models.metrics import predict_scores
from mnistlab.models.networks import as_probabilities
from mnistlab.train.loop import train

from .support.cli import assert_user_error, mnistlab
from .support.mnist import subset
from .support.runs import train_small


def _logits(small_run, split) -> torch.Tensor:
    return predict_scores(load_model(small_run).model, split.images)


# ---------------------------------------------------------------------------------------------- fitting


@pytest.mark.parametrize("sharpness", [5.0, 0.2], ids=["over-confident", "under-confident"])
def test_the_temperature_fitted_on_validation_lowers_the_test_error(small_run, small_mnist, sharpness):
    """A model made over-confident (logits x5) or under-confident (x0.2): the temperature fitted on its validation
    split undoes it, and the ECE on the test split, which chose nothing, falls."""
    val = (_logits(small_run, small_mnist.val) * sharpness).softmax(1)
    test = (_logits(small_run, small_mnist.test) * sharpness).softmax(1)
    temperature = fit_temperature(val, small_mnist.val.labels)
    assert (temperature > 2) if sharpness > 1 else (temperature < 0.5)
    before, after = (
        calibration(test, small_mnist.test.labels),
        calibration(temper(test, temperature), small_mnist.test.labels),
    )
    assert after.ece < before.ece / 2 and after.nll < before.nll
    assert torch.equal(temper(test, temperature).argmax(1), test.argmax(1))  # not one answer changes


def test_a_finished_run_is_calibrated_on_its_validation_split_only(small_run, small_mnist):
    """The stored temperature and confidence map are the ones fitted on the validation split, not on the test
    split (they would differ)."""
    stored = json.loads((small_run / "model.json").read_text())["calibration"]
    val = as_probabilities(_logits(small_run, small_mnist.val), False)
    on_val = fit_on_split(val, small_mnist.val.labels)
    assert stored["temperature"] == pytest.approx(on_val["temperature"], rel=1e-9)
    for key in ("knots", "values"):
        assert stored["confidence_map"][key] == pytest.approx(on_val["confidence_map"][key], rel=1e-9)
    test = as_probabilities(_logits(small_run, small_mnist.test), False)
    on_test = fit_on_split(test, small_mnist.test.labels)
    assert abs(on_test["temperature"] - stored["temperature"]) > 1e-3
    assert on_test["confidence_map"]["knots"] != stored["confidence_map"]["knots"]
    assert stored["fitted_on"] == f"validation split ({len(small_mnist.val)} images)"
    assert (small_run / "reliability.png").is_file()
    # Every probability the model gives is the calibrated one.
    loaded = load_model(small_run)
    x = small_mnist.test.images[:50].float() / 255
    confidence_map = ConfidenceMap.from_dict(stored["confidence_map"], "stored")
    expected = confidence_map(temper(loaded.model(x).softmax(1), stored["temperature"]))
    torch.testing.assert_close(loaded.probabilities_of(loaded.model(x)), expected)
    torch.testing.assert_close(loaded.answering()(x)[0], expected)


def test_the_confidence_map_mends_what_one_temperature_cannot(small_run, small_mnist):
    """A model sure of some answers and unsure of others (logits x4 where it answers 0-4, x0.25 where it answers
    5-9), as the report's half-trained networks are: one temperature leaves it miscalibrated; the map fitted on
    the validation split after it brings the test split's ECE down, and changes no answer."""

    def uneven(split) -> torch.Tensor:
        logits = _logits(small_run, split)
        sharpness = torch.where(logits.argmax(1) < 5, 4.0, 0.25)
        return (logits * sharpness[:, None]).softmax(1)

    val, test = uneven(small_mnist.val), uneven(small_mnist.test)
    val_labels, test_labels = small_mnist.val.labels, small_mnist.test.labels
    temperature = fit_temperature(val, val_labels)
    confidence_map = fit_confidence_map(temper(val, temperature), val_labels)
    tempered = temper(test, temperature)
    mapped = confidence_map(tempered)
    assert calibration(tempered, test_labels).ece > 0.02  # one temperature cannot mend it
    assert calibration(mapped, test_labels).ece < calibration(tempered, test_labels).ece / 2
    assert torch.equal(mapped.argmax(1), test.argmax(1))  # not one answer changes
    torch.testing.assert_close(calibrated(test, temperature, confidence_map), mapped)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 30),
    st.floats(0.05, 20),
    st.lists(st.floats(0.0, 1.0), min_size=1, max_size=12),
    st.integers(0, 2**31 - 1),
)
def test_a_confidence_map_keeps_every_order_and_gives_probabilities(n, sharpness, cuts, seed):
    """Any non-decreasing map, any probabilities: rows stay probabilities, every class keeps its place in the
    order (so the answer never changes) and the top class's probability is the map's value at the old one."""
    generator = torch.Generator().manual_seed(seed)
    probs = (torch.randn(n, 10, generator=generator, dtype=torch.float64) * sharpness).softmax(1)
    knots = sorted({0.0, 1.0, *cuts})
    values = sorted(float(v) for v in torch.rand(len(knots), generator=generator, dtype=torch.float64) * 0.98 + 0.01)
    confidence_map = ConfidenceMap(knots, values)
    mapped = confidence_map(probs)
    assert (mapped >= 0).all() and torch.allclose(mapped.sum(1), torch.ones(n, dtype=torch.float64))
    distinct = (probs[:, :, None] - probs[:, None, :]).abs() > 1e-9
    kept = (probs[:, :, None] > probs[:, None, :]) == (mapped[:, :, None] > mapped[:, None, :])
    assert kept[distinct].all()
    assert torch.equal(mapped.argmax(1), probs.argmax(1))
    top = probs.max(1).values
    expected = torch.from_numpy(np.interp(top.numpy(), knots, values)).clamp_min(0.1 + 1e-6)
    torch.testing.assert_close(mapped.max(1).values, expected)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(2, 40),
    st.floats(0.05, 20),
    st.integers(0, 2**31 - 1),
)
def test_the_fitted_temperature_minimises_the_nll(n, sharpness, seed):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 10, generator=generator, dtype=torch.float64) * sharpness
    labels = torch.randint(0, 10, (n,), generator=generator)
    probs = logits.softmax(1)
    t = fit_temperature(probs, labels)
    assert 1e-3 <= t <= 1e3 and math.isfinite(t)

    def nll(temperature: float) -> float:
        return calibration(temper(probs, temperature), labels).nll

    if 1.001e-3 < t < 0.999e3:  # inside the searched range: a minimum, within the bisection's precision
        assert nll(t) <= min(nll(t * 1.05), nll(t / 1.05)) + 1e-9
    assert torch.equal(temper(probs, t).argmax(1), probs.argmax(1))


def test_the_measures_of_calibration_on_known_cases():
    labels = torch.tensor([0, 1, 2, 3])
    sure_and_right = torch.eye(10)[labels]
    assert calibration(sure_and_right, labels).to_dict() == pytest.approx({"ece": 0, "nll": 0, "brier": 0}, abs=1e-9)
    half = torch.full((4, 10), 0.5 / 9).scatter(1, torch.tensor([[0], [1], [5], [6]]), 0.5)  # 50% sure, right half
    measured = calibration(half, labels)
    assert measured.ece == pytest.approx(0.0, abs=1e-9)  # 50% sure and right half the time
    assert measured.nll == pytest.approx(-math.log(0.5 / 9) / 2 - math.log(0.5) / 2)
    table = reliability(half, labels)
    assert [(b["count"], b["accuracy"]) for b in table] == [(4, 0.5)]


# ---------------------------------------------------------------------------------------------- files


def test_a_model_file_without_a_temperature_still_loads_and_evaluate_says_so(small_run, mnist_path, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(small_run, old)
    description = json.loads((old / "model.json").read_text())
    del description["calibration"]
    (old / "model.json").write_text(json.dumps(description))
    assert not load_model(old).calibrated
    text = mnistlab("evaluate", str(old), "--data-dir", str(mnist_path))
    assert text.returncode == 0, text.stderr
    assert f"uncalibrated (mnistlab calibrate {old} fits a temperature)" in text.stdout

    fixed = mnistlab("calibrate", str(old), "--data-dir", str(mnist_path))
    assert fixed.returncode == 0, fixed.stderr
    assert "fitted on its validation split (5000 images)" in fixed.stdout
    assert load_model(old).calibrated


def test_calibrate_refuses_what_it_cannot_calibrate(small_run, mnist_data, mnist_path, tmp_path):
    no_val = tmp_path / "no-val"
    config = load_config("seed-b-fixed").with_overrides({"training.epochs": 1, "data.val_size": 0})
    train(config, out_dir=no_val, data=replace(subset(mnist_data, 2000, 500), val=None), quiet=True)
    assert not load_model(no_val).calibrated  # nothing held out: left uncalibrated
    assert_user_error(mnistlab("calibrate", str(no_val), "--data-dir", str(mnist_path)), "without a validation split")

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("model.safetensors", "model.json"):
        shutil.copy(small_run / name, bare / name)
    description = json.loads((bare / "model.json").read_text())
    del description["metadata"]["split"]
    (bare / "model.json").write_text(json.dumps(description))
    assert_user_error(mnistlab("calibrate", str(bare / "model.safetensors")), "which validation split")


@pytest.mark.parametrize("value", ["NaN", "Infinity", "0", "-1", '"warm"'])
def test_a_temperature_that_is_not_a_positive_number_is_refused_on_load(small_run, tmp_path, value):
    broken = tmp_path / "broken"
    shutil.copytree(small_run, broken)
    text = (broken / "model.json").read_text()
    stored = json.loads(text)["calibration"]["temperature"]
    (broken / "model.json").write_text(text.replace(f'"temperature": {stored!r}', f'"temperature": {value}', 1))
    assert_user_error(mnistlab("evaluate", str(broken)), "temperature must be a positive finite")


@pytest.mark.parametrize(
    "confidence_map",
    [
        {"knots": [0, 0.5, 0.4, 1], "values": [0.1, 0.2, 0.3, 0.9]},  # knots not increasing
        {"knots": [0, 1], "values": [0.9, 0.2]},  # values falling
        {"knots": [0, 1], "values": [0.1, float("nan")]},
        {"knots": [0, 1], "values": [0.1, 1.5]},
        {"knots": [0, 0.5, 1], "values": [0.1, 0.9]},
        {"knots": [0.1, 1], "values": [0.1, 0.9]},  # not from 0
        {"knots": "0 1", "values": [0.1, 0.9]},
    ],
    ids=["knots-unsorted", "values-falling", "nan", "above-one", "lengths", "not-from-0", "not-a-list"],
)
def test_a_broken_confidence_map_is_refused_on_load(small_run, tmp_path, confidence_map):
    broken = tmp_path / "broken"
    shutil.copytree(small_run, broken)
    description = json.loads((broken / "model.json").read_text())
    description["calibration"]["confidence_map"] = confidence_map
    (broken / "model.json").write_text(json.dumps(description))  # NaN written as Python's json writes it
    assert_user_error(mnistlab("evaluate", str(broken)), "confidence_map must be knots increasing from 0 to 1")


def test_a_model_file_with_a_temperature_and_no_map_loads_as_before(small_run, small_mnist, tmp_path):
    older = tmp_path / "older"
    shutil.copytree(small_run, older)
    description = json.loads((older / "model.json").read_text())
    temperature = description["calibration"].pop("confidence_map") and description["calibration"]["temperature"]
    (older / "model.json").write_text(json.dumps(description))
    loaded = load_model(older)
    assert loaded.calibrated and loaded.confidence_map is None
    x = small_mnist.test.images[:20].float() / 255
    torch.testing.assert_close(loaded.answering()(x)[0], temper(loaded.model(x).softmax(1), temperature))


# ---------------------------------------------------------------------------------------------- ensembles


def test_an_ensemble_of_calibrated_runs_keeps_each_member_s_temperature(small_run, mnist_data, mnist_path, tmp_path):
    other = train_small(tmp_path / "other", mnist_data, 3000)
    make_ensemble([small_run, other], tmp_path / "ensemble", mnist_path, device="cpu")
    members = json.loads((tmp_path / "ensemble" / "model.json").read_text())["ensemble"]
    stored = [json.loads((r / "model.json").read_text())["calibration"]["temperature"] for r in (small_run, other)]
    assert [m["temperature"] for m in members] == stored
    assert load_model(tmp_path / "ensemble").calibrated


@pytest.mark.slow  # two passes of the bundled model over the test set
def test_the_bundled_model_is_calibrated_to_within_one_percent(mnist_path):
    result = evaluate(None, mnist_path, "cpu")
    report = result.calibration
    assert report["calibrated"] and report["before"]["ece"] > 0.05  # label smoothing left it under-confident
    assert report["after"]["ece"] <= 0.01


def test_calibrate_fits_each_member_of_an_ensemble_on_its_own_split(small_run, mnist_data, mnist_path, tmp_path):
    other = train_small(tmp_path / "other", mnist_data, 3000)
    make_ensemble([small_run, other], tmp_path / "ensemble", mnist_path, device="cpu")
    path = tmp_path / "ensemble" / "model.json"
    description = json.loads(path.read_text())
    for member in description["ensemble"]:
        del member["temperature"]
    path.write_text(json.dumps(description))
    assert not load_model(tmp_path / "ensemble").calibrated
    done = calibrate(tmp_path / "ensemble", mnist_path, "cpu")
    assert len(done["members"]) == 2 and load_model(tmp_path / "ensemble").calibrated


def test_an_ensemble_file_keeps_its_members_splits_so_it_calibrates_away_from_them(
    small_run, mnist_data, mnist_path, tmp_path
):
    """The bundled model is an ensemble file whose members' run directories are not shipped with it."""
    other = train_small(tmp_path / "other", mnist_data, 3000)
    make_ensemble([small_run, other], tmp_path / "ensemble", mnist_path, device="cpu")
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    description = json.loads((tmp_path / "ensemble" / "model.json").read_text())
    for member, run in zip(description["ensemble"], (small_run, other)):
        assert member["split"] == json.loads((run / "model.json").read_text())["metadata"]["split"]
        member["source"] = "runs/gone"  # its run directory is nowhere here
        del member["temperature"]
    (moved / "model.json").write_text(json.dumps(description))
    shutil.copy(tmp_path / "ensemble" / "model.safetensors", moved / "model.safetensors")
    done = calibrate(moved / "model.safetensors", mnist_path, "cpu")
    assert len(done["members"]) == 2 and load_model(moved / "model.safetensors").calibrated
