"""The outlier score (issue 22, part 2): a Gaussian per class over the penultimate features, fitted on the training
split, its threshold chosen on the validation split (at most 1% flagged), stored in the model file, averaged over
an ensemble's members, and refused on load when it is broken."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mnistlab.config import load_config
from mnistlab.data.splits import Split, load_data, to_float
from mnistlab.infer.calibrate import calibrate
from mnistlab.infer.ensemble import make_ensemble
from mnistlab.models import outliers
from mnistlab.models.files import load_model
from mnistlab.models.outliers import FLAGGED, FeatureDensity, flagging_threshold
from mnistlab.train.loop import train

from .support.cli import assert_user_error, mnistlab
from .support.mnist import fashion_dir
from .support.runs import train_small


def _scores(path, images: torch.Tensor) -> torch.Tensor:
    """The outlier scores a model file gives uint8 images."""
    with torch.inference_mode():
        return load_model(path).answering().eval()(to_float(images))[1]


# ---------------------------------------------------------------------------------------------- the density


@settings(max_examples=40, deadline=None)
@given(
    dims=st.integers(2, 12),
    rank=st.integers(1, 12),
    classes=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_the_score_is_the_squared_mahalanobis_distance_to_the_nearest_class(dims, rank, classes, seed):
    """Against the textbook formula (f - mu_c)^T C^-1 (f - mu_c), minimised over classes, where C is the shrunk
    within-class covariance with all but its `rank` largest directions given their mean variance (probabilistic
    PCA; C is the covariance itself where rank >= dims), on random clusters of random shape."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(200) % classes
    centres = torch.randn(classes, dims, generator=g, dtype=torch.float64) * 5
    mixing = torch.randn(dims, dims, generator=g, dtype=torch.float64)
    features = centres[labels] + torch.randn(200, dims, generator=g, dtype=torch.float64) @ mixing
    with mock.patch.object(outliers, "RANK", rank):
        density = FeatureDensity.fit(features, labels)

    means = torch.stack([features[labels == c].mean(0) for c in range(classes)])
    centred = features - means[labels]
    covariance = centred.T @ centred / len(features)
    covariance += 1e-2 * covariance.diagonal().mean() * torch.eye(dims, dtype=torch.float64)
    if rank < dims:
        values, vectors = torch.linalg.eigh(covariance)  # ascending: the first dims - rank share their mean
        values[: dims - rank] = values[: dims - rank].mean()
        covariance = vectors @ torch.diag(values) @ vectors.T
    queries = torch.randn(30, dims, generator=g, dtype=torch.float64) * 10
    differences = queries[:, None, :] - means[None]
    expected = torch.einsum("ncd,de,nce->nc", differences, torch.linalg.inv(covariance), differences).min(1).values
    torch.testing.assert_close(density(queries).double(), expected, rtol=2e-3, atol=1e-2)


@settings(max_examples=200, deadline=None)
@given(
    scores=st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1, max_size=400),
    share=st.sampled_from([0.0, 0.01, 0.05, 0.5]),
)
def test_the_threshold_flags_at_most_its_share_and_no_lower_one_would(scores, share):
    """Flagged means above the threshold: at most `share` of the scores are, and any lower threshold among the
    scores would flag more than that."""
    values = torch.tensor(scores, dtype=torch.float64)
    threshold = flagging_threshold(values, share)
    assert int((values > threshold).sum()) <= math.floor(share * len(values))
    lower = values[values < threshold]
    if len(lower):
        assert int((values > lower.max()).sum()) > math.floor(share * len(values))


# ---------------------------------------------------------------------------------------- fitted when training ends


def test_a_finished_run_flags_at_most_one_percent_of_its_validation_split(small_run, small_mnist):
    stored = json.loads((small_run / "model.json").read_text())["outliers"]
    assert stored["method"] == "feature-mahalanobis"
    assert stored["fitted_on"].startswith(f"training split ({len(small_mnist.train)} images)")
    flagged = float((_scores(small_run, small_mnist.val.images) > stored["threshold"]).double().mean())
    assert flagged <= FLAGGED and flagged == pytest.approx(stored["validation_flagged"], abs=1 / len(small_mnist.val))
    assert load_model(small_run).outlier_threshold == stored["threshold"]


def test_the_test_split_chooses_nothing(small_mnist, tmp_path):
    """Two runs that differ only in their test split (one of them all noise) store the same density and
    threshold: a fit that looked at the test split would differ."""
    noise = torch.randint(
        0, 256, small_mnist.test.images.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    config = load_config("seed-b-fixed").with_overrides({"training.epochs": 1})
    for name, data in (("a", small_mnist), ("b", replace(small_mnist, test=Split(noise, small_mnist.test.labels)))):
        train(config, out_dir=tmp_path / name, data=data, quiet=True)
    a, b = (json.loads((tmp_path / n / "model.json").read_text())["outliers"] for n in "ab")
    assert a == b


def test_the_flag_separates_real_digits_from_fashion_items(small_run, small_mnist):
    """The one-epoch MLP's detector: about 1% of unseen MNIST test digits flagged, and most Fashion-MNIST items."""
    if fashion_dir() is None:
        pytest.skip("Fashion-MNIST not found")
    threshold = load_model(small_run).outlier_threshold
    test = float((_scores(small_run, small_mnist.test.images) > threshold).double().mean())
    items = load_data("fashion-mnist", fashion_dir(), 0, 0).test.images[:1000]
    assert test <= 0.03
    assert float((_scores(small_run, items) > threshold).double().mean()) >= 0.8


# ---------------------------------------------------------------------------------------------- files


def _without_outliers(source, target):
    """A copy of a model file as it was before outlier detectors: no block, no density tensors."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    description = json.loads((target / "model.json").read_text())
    del description["outliers"]
    (target / "model.json").write_text(json.dumps(description))
    state = load_file(str(target / "model.safetensors"))
    save_file({k: v for k, v in state.items() if "outliers." not in k}, str(target / "model.safetensors"))


def test_calibrate_gives_an_old_model_file_its_detector(small_run, small_mnist, mnist_path, tmp_path):
    old = tmp_path / "old"
    _without_outliers(small_run, old)
    assert load_model(old).outliers is None and load_model(old).outlier_threshold is None
    done = mnistlab("calibrate", str(old), "--data-dir", str(mnist_path))
    assert done.returncode == 0, done.stderr
    fitted = json.loads((old / "model.json").read_text())["outliers"]
    assert fitted["fitted_on"] == "training split (55000 images); threshold on the validation split (5000 images)"
    assert fitted["validation_flagged"] <= FLAGGED
    assert load_model(old).outlier_threshold == fitted["threshold"]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["outliers"].update(threshold=float("nan")), "outlier threshold must be a positive finite"),
        (lambda d: d["outliers"].update(threshold=-1), "outlier threshold must be a positive finite"),
        (lambda d: d["outliers"].update(threshold="high"), "outlier threshold must be a positive finite"),
    ],
    ids=["nan", "negative", "text"],
)
def test_a_broken_outlier_block_is_refused_on_load_in_one_line(small_run, tmp_path, edit, message):
    broken = tmp_path / "broken"
    shutil.copytree(small_run, broken)
    description = json.loads((broken / "model.json").read_text())
    edit(description)
    (broken / "model.json").write_text(json.dumps(description))  # NaN as Python's json writes it
    assert_user_error(mnistlab("evaluate", str(broken)), message)


def test_a_density_that_does_not_fit_the_network_or_is_not_finite_is_refused(small_run, tmp_path):
    from safetensors.torch import load_file, save_file

    for name, change, message in (
        ("shape", lambda w: w[:10], "does not fit the network"),
        ("nan", lambda w: w * float("nan"), "outlier density is not finite"),
    ):
        broken = tmp_path / name
        shutil.copytree(small_run, broken)
        state = load_file(str(broken / "model.safetensors"))
        state["outliers.basis"] = change(state["outliers.basis"]).contiguous()
        save_file(state, str(broken / "model.safetensors"))
        assert_user_error(mnistlab("evaluate", str(broken)), message)


# ---------------------------------------------------------------------------------------------- ensembles


def test_an_ensemble_scores_the_mean_of_its_members_scores_over_their_thresholds(
    small_run, small_mnist, mnist_data, tmp_path
):
    other = train_small(tmp_path / "other", mnist_data, 3000)
    make_ensemble([small_run, other], tmp_path / "ensemble", device="cpu")
    description = json.loads((tmp_path / "ensemble" / "model.json").read_text())
    assert description["outliers"]["threshold"] == 1.0
    images = small_mnist.test.images[:200]
    expected = sum(_scores(r, images) / load_model(r).outlier_threshold for r in (small_run, other)) / 2
    torch.testing.assert_close(_scores(tmp_path / "ensemble", images), expected, rtol=1e-5, atol=1e-6)

    # A member without a detector: the ensemble has none (and keeps no density tensors).
    _without_outliers(other, tmp_path / "old-other")
    make_ensemble([small_run, tmp_path / "old-other"], tmp_path / "mixed", device="cpu")
    assert load_model(tmp_path / "mixed").outliers is None
    assert "outliers" not in json.loads((tmp_path / "mixed" / "model.json").read_text())


def test_calibrate_fits_each_ensemble_member_s_detector_on_its_own_splits(small_run, mnist_data, mnist_path, tmp_path):
    other = train_small(tmp_path / "other", mnist_data, 3000)
    _without_outliers(other, tmp_path / "old-other")
    make_ensemble([small_run, tmp_path / "old-other"], tmp_path / "ensemble", device="cpu")
    assert load_model(tmp_path / "ensemble").outliers is None
    done = calibrate(tmp_path / "ensemble", mnist_path, "cpu")
    assert len(done["thresholds"]) == 2 and all(t > 0 for t in done["thresholds"])
    loaded = load_model(tmp_path / "ensemble")
    assert loaded.outlier_threshold == 1.0 and loaded.outliers.scales == done["thresholds"]


@pytest.mark.slow  # the bundled model over the whole test split
def test_the_bundled_model_flags_under_one_percent_of_mnist_test_digits_and_95_percent_of_fashion_items(mnist_path):
    """Issue 22's goal for the bundled model: at most 1% of the MNIST test digits flagged, at least 95% of each
    non-digit kind; Fashion-MNIST's items as stored are the kind held here (98.35% of the first 2,000 flagged)."""
    test = load_data("mnist", mnist_path, 0, 0).test.images
    flagged = float(
        torch.cat([_scores(None, test[i : i + 2000]) > 1.0 for i in range(0, len(test), 2000)]).double().mean()
    )
    assert flagged <= 0.01
    if fashion_dir() is not None:
        items = load_data("fashion-mnist", fashion_dir(), 0, 0).test.images[:2000]
        assert float((_scores(None, items) > 1.0).double().mean()) >= 0.95


def test_density_tensors_without_their_block_load_as_a_model_without_a_detector(small_run, tmp_path):
    """What `calibrate` leaves if it is stopped between writing the weights and the description: a model that
    loads and answers as before it was run."""
    half = tmp_path / "half"
    shutil.copytree(small_run, half)
    description = json.loads((half / "model.json").read_text())
    del description["outliers"]
    (half / "model.json").write_text(json.dumps(description))
    loaded = load_model(half)
    assert loaded.outliers is None
    images = torch.rand(4, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.answering()(images)[0], load_model(small_run).answering()(images)[0])
