"""CNN configs, batched augmentation, EMA, ensembles and the bundled pretrained model, on the real MNIST."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mnistlab.config import AugmentConfig, ModelConfig, load_config
from mnistlab.data.augment import augment_batch
from mnistlab.data.splits import to_float
from mnistlab.infer.ensemble import make_ensemble
from mnistlab.models.calibration import temper
from mnistlab.models.files import bundled_model_path, load_model
from mnistlab.models.metrics import evaluate_model, predict_scores
from mnistlab.models.networks import ShiftAveraged, as_probabilities, build_model, count_parameters
from mnistlab.train.loop import train

from .support.cli import assert_user_error, mnistlab
from .support.mnist import subset
from .support.runs import interrupted_and_resumed, without_time

AFFINE = AugmentConfig(rotate=10, scale=0.1, shear=8, translate=2)


def test_cnn_configs_build_the_right_shapes():
    examples = build_model(load_config("cnn-examples").model)
    assert count_parameters(examples) == 1_199_882  # the pytorch/examples network, parameter for parameter
    for name in ("cnn-examples", "cnn-fast", "cnn-fast-995", "cnn-best", "cnn-robust"):
        model = build_model(load_config(name).model).eval()
        assert model(torch.rand(3, 28, 28)).shape == (3, 10)


@settings(max_examples=40, deadline=None)
@given(pools=st.integers(0, 2), seed=st.integers(0, 2**16))
def test_a_bias_is_left_out_only_where_batchnorm_would_cancel_it(pools: int, seed: int):
    """A convolution followed by "bn", with max-pools between or not, gets no bias: adding a per-channel constant
    before max-pooling and BatchNorm changes nothing. With one put back the outputs are the same."""
    spec = ["conv 4 3 1", *["maxpool 2"] * pools, "bn", "relu", "conv 4 3 1", "relu", "flatten", "linear 10"]
    torch.manual_seed(seed)
    model = build_model(ModelConfig(kind="cnn", layers=spec)).train()
    convs = [m for m in model if isinstance(m, torch.nn.Conv2d)]
    assert convs[0].bias is None and convs[1].bias is not None
    x = torch.rand(8, 28, 28)
    before = model(x)
    with_bias = torch.nn.Conv2d(1, 4, 3, padding=1)
    with torch.no_grad():
        with_bias.weight.copy_(convs[0].weight)
        with_bias.bias.uniform_(-1, 1)
    model[1] = with_bias
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-4)


def test_bad_layer_lists_are_config_errors():
    from mnistlab.config import config_from_dict
    from mnistlab.errors import MnistlabError

    for layers, message in [
        (["conv 8 3", "flatten", "linear 5"], "end with 'linear 10'"),
        (["conv 8 3", "wobble", "flatten", "linear 10"], "unknown layer 'wobble'"),
        (["conv 8 29", "flatten", "linear 10"], "leaves nothing"),
        ([], "must list"),
    ]:
        with pytest.raises(MnistlabError, match=message):
            config_from_dict({"model": {"kind": "cnn", "layers": layers}})


# ---------------------------------------------------------------------------------------------- augmentation


@pytest.mark.slow  # 7 s on 2 busy cores
def test_augmentation_keeps_images_in_range_and_labels_valid(mnist_data):
    images = to_float(mnist_data.test.images[:1000])
    warped = augment_batch(images, AFFINE, torch.Generator().manual_seed(0))
    assert warped.shape == images.shape and warped.dtype == torch.float32
    assert warped.min() >= 0 and warped.max() <= 1
    assert (warped - images).abs().mean() > 0.01  # it did something
    ink = warped.sum((1, 2)) / images.sum((1, 2))
    assert ink.min() > 0.6 and ink.max() < 1.6  # digits are moved and bent, not cut off or smeared out
    again = augment_batch(images, AFFINE, torch.Generator().manual_seed(0))
    assert torch.equal(warped, again)  # seeded: reproducible
    # The labels stay right: the bundled model still reads the warped digits.
    model = load_model().model
    predicted = model(warped).argmax(1)
    assert (predicted == mnist_data.test.labels[:1000]).float().mean() >= 0.97


def test_no_augmentation_is_the_identity(mnist_data):
    images = to_float(mnist_data.test.images[:64])
    same = augment_batch(images, AugmentConfig(), torch.Generator().manual_seed(0))
    torch.testing.assert_close(same, images, atol=1e-5, rtol=0)


def test_elastic_distortion_is_smooth_and_bounded(mnist_data):
    images = to_float(mnist_data.test.images[:256])
    elastic = augment_batch(images, AugmentConfig(elastic_alpha=2.0), torch.Generator().manual_seed(1))
    assert elastic.min() >= 0 and elastic.max() <= 1
    assert 0.01 < (elastic - images).abs().mean() < 0.2


# ---------------------------------------------------------------------------------------------- training


@pytest.mark.slow  # 28 s on 2 busy cores
def test_cnn_with_augmentation_and_ema_resumes_exactly(mnist_data, tmp_path):
    data = subset(mnist_data, 1500, 500)
    config = load_config("cnn-best").with_overrides({"training.epochs": 3, "training.batch_size": 100})
    whole = train(config, out_dir=tmp_path / "whole", quiet=True, data=data, device="cpu")
    resumed = interrupted_and_resumed(config, tmp_path / "cut", data, after=1)
    assert without_time(resumed.epochs) == without_time(whole.epochs)
    assert whole.final["test_accuracy"] > 0.9
    # The saved model is the EMA one that was evaluated.
    loaded = load_model(tmp_path / "whole")
    assert evaluate_model(loaded.model, data.test, loaded.loss_fn()).accuracy == whole.final["test_accuracy"]


# ---------------------------------------------------------------------------------------------- ensembles


@pytest.mark.slow  # 44 s on 2 busy cores
def test_ensemble_averages_member_probabilities(mnist_data, mnist_path, tmp_path):
    data = subset(mnist_data, 3000, 1000)
    members = []
    for i, name in enumerate(("seed-b-fixed", "seed-b")):  # one logits member, one Softmax-output member
        config = load_config(name).with_overrides({"training.epochs": 1, "training.seed": i})
        train(config, out_dir=tmp_path / f"m{i}", quiet=True, data=data)
        members.append(tmp_path / f"m{i}")
    summary = make_ensemble(members, tmp_path / "ens", data_dir=mnist_path)
    ensemble = load_model(tmp_path / "ens")
    assert ensemble.probabilities and len(ensemble.configs) == 2

    images = mnist_data.test.images[:500]

    def tempered(member) -> torch.Tensor:  # each member at its own temperature (an ensemble uses no member's map)
        loaded = load_model(member)
        return temper(as_probabilities(predict_scores(loaded.model, images), loaded.probabilities), loaded.temperature)

    expected = torch.stack([tempered(m) for m in members]).mean(0)
    got = predict_scores(ensemble.model, images)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got.sum(1), torch.ones(500))
    assert json.loads((tmp_path / "ens" / "metrics.json").read_text())["accuracy"] == summary["accuracy"]
    assert ensemble.metadata["test_accuracy"] == summary["accuracy"]  # its own, as a single model's file has
    assert summary["accuracy"] >= min(summary["members"].values())

    # An ensemble is a model like any other for the CLI.
    result = mnistlab("evaluate", str(tmp_path / "ens"), "--json", "--data-dir", str(mnist_path))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["accuracy"] == summary["accuracy"]
    assert_user_error(mnistlab("ensemble", str(members[0]), "--out", str(tmp_path / "one")), "at least two")
    assert_user_error(mnistlab("ensemble", *map(str, members), "--out", str(tmp_path / "ens")), "--force")


@pytest.mark.slow  # 21 s on 2 busy cores
def test_test_time_augmentation_averages_one_pixel_shifts(mnist_data, mnist_path, tmp_path):
    config = load_config("seed-b-fixed").with_overrides({"training.epochs": 1})
    train(config, out_dir=tmp_path / "run", quiet=True, data=subset(mnist_data, 3000, 1000))
    loaded = load_model(tmp_path / "run")
    x = to_float(mnist_data.test.images[:300])

    def shifted(dy: int, dx: int) -> torch.Tensor:  # moved by (dy, dx) pixels, zeros shifted in
        out = torch.zeros_like(x)
        out[:, max(dy, 0) : 28 + min(dy, 0), max(dx, 0) : 28 + min(dx, 0)] = x[
            :, max(-dy, 0) : 28 + min(-dy, 0), max(-dx, 0) : 28 + min(-dx, 0)
        ]
        return out

    views = [x, shifted(1, 0), shifted(-1, 0), shifted(0, 1), shifted(0, -1)]
    with torch.inference_mode():
        expected = torch.stack([loaded.model(v).softmax(1) for v in views]).mean(0)
        got = ShiftAveraged(loaded.model, loaded.probabilities)(x)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, loaded.model(x).softmax(1))

    result = mnistlab("evaluate", str(tmp_path / "run"), "--tta", "--json", "--data-dir", str(mnist_path))
    assert result.returncode == 0, result.stderr
    test = mnist_data.test
    predicted = predict_scores(ShiftAveraged(loaded.model, loaded.probabilities), test.images).argmax(1)
    assert json.loads(result.stdout)["accuracy"] == (predicted == test.labels).sum().item() / len(test)


# ---------------------------------------------------------------------------------------------- bundled model


def test_bundled_model_classifies_the_first_test_digits(mnist_data):
    assert bundled_model_path().is_file()
    loaded = load_model()  # no path: the model shipped inside the package, no network needed
    predicted = predict_scores(loaded.model, mnist_data.test.images[:100]).argmax(1)
    assert (predicted != mnist_data.test.labels[:100]).sum() <= 1


@pytest.mark.slow  # 31 s on 2 busy cores
def test_evaluate_without_a_model_uses_the_bundled_one(mnist_path):
    """`mnistlab evaluate` with no model evaluates the packaged one: it reproduces the test accuracy that the
    packaged model.json records."""
    result = mnistlab("evaluate", "--json", "--data-dir", str(mnist_path))
    assert result.returncode == 0, result.stderr
    recorded = json.loads(bundled_model_path().with_suffix(".json").read_text())["metadata"]["test_accuracy"]
    assert json.loads(result.stdout)["accuracy"] == pytest.approx(recorded, abs=1e-4)
