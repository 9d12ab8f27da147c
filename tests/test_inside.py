"""Inside the network (issue 23, part 2): each layer's maps and units for one image, an MLP's first-layer weights
as images, and the nearest training digits in the model's penultimate feature space. Real models (the bundled
ensemble, seed-B trained briefly) on real MNIST; the indexes are built over small IDX files holding the first
real training digits, so that building takes seconds (benchmarks/inside_cost.py measures the full 60,000)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mnistlab.config import load_config
from mnistlab.data.idx import read_images, read_labels
from mnistlab.data.splits import to_float
from mnistlab.errors import MnistlabError
from mnistlab.infer.inside import TOP_UNITS, NeighbourIndex, layer_views
from mnistlab.models.files import load_model
from mnistlab.models.outliers import RANK
from mnistlab.train.loop import train

from .support.idx_files import GZ_NAMES, write_images, write_labels
from .support.mnist import subset
from .support.runs import train_small

TRAIN_ROWS = 1000  # real training digits in the small data folder
TEST_ROWS = 200  # real test digits in it
REUSED = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def bundled():
    return load_model(None)


@pytest.fixture(scope="module")
def small_dir(mnist_path: Path, tmp_path_factory) -> Path:
    """A data folder whose MNIST files hold the first 2,000 real training and 200 real test digits."""
    root = tmp_path_factory.mktemp("inside-data")
    for name, rows in zip(GZ_NAMES, (TRAIN_ROWS, TRAIN_ROWS, TEST_ROWS, TEST_ROWS)):
        source = mnist_path / name
        if "labels" in name:
            write_labels(root / "mnist" / name, read_labels(source)[:rows], compress=True)
        else:
            write_images(root / "mnist" / name, read_images(source)[:rows], compress=True)
    return root


@pytest.fixture(scope="module")
def small_test(small_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The small folder's test digits (uint8) and labels."""
    folder = small_dir / "mnist"
    images, labels = read_images(folder / GZ_NAMES[2]), read_labels(folder / GZ_NAMES[3])
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype("int64"))


@pytest.fixture(scope="module")
def training_file(small_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The small folder's training digits (uint8) and labels, read straight from its files."""
    folder = small_dir / "mnist"
    images, labels = read_images(folder / GZ_NAMES[0]), read_labels(folder / GZ_NAMES[1])
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype("int64"))


@pytest.fixture(scope="module")
def bundled_index(bundled, small_dir) -> NeighbourIndex:
    return NeighbourIndex.build(bundled, small_dir)


@pytest.fixture(scope="module")
def mlp_run(mnist_data, tmp_path_factory) -> Path:
    """seed-b-fixed (784-512-10) trained for one epoch on 5,000 real digits, with its outlier density."""
    return train_small(tmp_path_factory.mktemp("inside") / "mlp", mnist_data, 5000)


@pytest.fixture(scope="module")
def mlp(mlp_run):
    return load_model(mlp_run)


def _digit(digits, i: int) -> torch.Tensor:
    return to_float(torch.from_numpy(digits[i].copy()))


# ---------------------------------------------------------------------------------------------- layer views


def test_a_cnn_shows_each_convolutions_maps_and_its_hidden_units(bundled, digits):
    """The bundled members (conv 16 5x5 stride 2, bn, relu; conv 32, maxpool, bn, relu; conv 64, maxpool, bn,
    relu; linear 128, bn, relu; linear 10): a view per convolution and one for the hidden linear layer, each the
    output of its layer and of the normalisation and activation after it; a convolution pooled before its
    BatchNorm is shown after the pool, the BatchNorm and the ReLU (what the next layer reads, never negative)."""
    image = _digit(digits, 0)
    views = layer_views(bundled, image)
    assert [v.name for v in views] == [
        "conv 1 (16 maps, 14x14)",
        "conv 2 (32 maps, 7x7)",
        "conv 3 (64 maps, 3x3)",
        "hidden 1 (128 units)",
    ]
    assert [tuple(v.values.shape) for v in views] == [(16, 14, 14), (16, 7, 7), (16, 3, 3), (128,)]
    assert all(v.member == 0 and v.unit_weights is None for v in views)  # an ensemble shows its first member
    member = bundled.model.members[0]
    network = member.network
    assert [type(layer).__name__ for layer in network] == [
        "_Unflatten",
        *("Conv2d", "BatchNorm2d", "ReLU"),
        *("Conv2d", "MaxPool2d", "BatchNorm2d", "ReLU") * 2,
        *("Flatten", "Linear", "BatchNorm1d", "ReLU", "Linear"),
    ]
    # Each view is computed here by slicing the network up to the last module it shows: each layer's ReLU.
    with torch.inference_mode():
        x = member.standardize(image[None])
        outputs = [network[: end + 1](x)[0] for end in (3, 7, 11, 15)]
        features = member.features_and_outputs(image[None])[0][0]
    for view, full in zip(views[:3], outputs):
        assert view.kind == "maps" and view.top_units == []
        assert len(set(view.channels)) == 16
        torch.testing.assert_close(view.values, full[view.channels])
        assert float(full.min()) >= 0  # after the ReLU
        means = full.mean((1, 2))
        assert torch.equal(means[view.channels], means.sort(descending=True).values[:16])  # most active, first
    assert views[3].kind == "units" and len(views[3].top_units) == TOP_UNITS
    torch.testing.assert_close(views[3].values, outputs[3])
    torch.testing.assert_close(views[3].values, features)  # the hidden layer's output is what the output layer reads


def test_an_mlp_shows_its_hidden_units_and_what_the_top_ones_look_for(mlp, digits):
    image = _digit(digits, 1)
    (view,) = layer_views(mlp, image)
    assert (view.name, view.kind, view.member, view.channels) == ("hidden 1 (512 units)", "units", None, [])
    first = mlp.model.network[1]
    assert isinstance(first, torch.nn.Linear) and first.in_features == 784
    with torch.inference_mode():
        expected = torch.relu(first(image.reshape(1, 784)))[0]  # seed-b-fixed: no input standardisation
    torch.testing.assert_close(view.values, expected)
    assert len(view.top_units) == TOP_UNITS
    torch.testing.assert_close(view.unit_weights, first.weight.detach()[view.top_units].reshape(-1, 28, 28))


@REUSED
@given(row=st.integers(0, 9999), scale=st.floats(0.05, 1.0))
def test_the_top_units_are_the_largest_activations(mlp, digits, row, scale):
    """Any digit, dimmed or not: the named units hold the largest activations, largest first."""
    (view,) = layer_views(mlp, _digit(digits, row) * scale)
    top = view.values[view.top_units]
    others = torch.ones(len(view.values), dtype=torch.bool)
    others[view.top_units] = False
    assert top.diff().le(0).all()
    assert float(top.min()) >= float(view.values[others].max())


@settings(deadline=None, max_examples=8)
@given(max_maps=st.integers(1, 40))
def test_at_most_max_maps_per_convolution(bundled, max_maps):
    image = torch.zeros(28, 28)
    image[6:22, 12:16] = 1.0  # a bar: a 1
    views = layer_views(bundled, image, max_maps=max_maps)
    maps = [v for v in views if v.kind == "maps"]
    counts = [16, 32, 64]  # the bundled members' convolutions
    assert [len(v.channels) for v in maps] == [min(max_maps, c) for c in counts]
    assert [v.values.shape[0] for v in maps] == [min(max_maps, c) for c in counts]


def test_a_cnn_with_a_hidden_linear_layer_shows_it_as_units(mnist_data, tmp_path):
    config = load_config("cnn-fast").with_overrides(
        {
            "training.epochs": 1,
            "model.layers": ["conv 8 3 1", "relu", "maxpool 2", "flatten", "linear 32", "relu", "linear 10"],
        }
    )
    train(config, out_dir=tmp_path / "run", data=subset(mnist_data, 600, 100), device="cpu", quiet=True)
    views = layer_views(load_model(tmp_path / "run"), torch.rand(28, 28))
    assert [v.name for v in views] == ["conv 1 (8 maps, 28x28)", "hidden 1 (32 units)"]
    assert views[1].unit_weights is None  # it reads maps, not pixels: its weights are no image


def test_layer_views_refuse_what_is_not_one_image(bundled):
    with pytest.raises(MnistlabError, match="one 28x28 image"):
        layer_views(bundled, torch.zeros(1, 28, 28))
    with pytest.raises(MnistlabError, match="max_maps"):
        layer_views(bundled, torch.zeros(28, 28), max_maps=0)


# ---------------------------------------------------------------------------------------------- neighbours


def test_the_nearest_training_digits_mostly_share_the_label(bundled_index, small_test):
    images, labels = small_test
    distances, rows = bundled_index.search(to_float(images), 5)
    found = bundled_index.labels[rows].long()
    assert float((found[:, 0] == labels).double().mean()) >= 0.9
    assert float((found == labels[:, None]).double().mean()) >= 0.85
    assert distances.diff(dim=1).ge(0).all() and distances.ge(0).all() and distances.le(2).all()


def test_training_images_find_themselves_in_the_ensembles_index(bundled_index):
    rows = torch.arange(0, TRAIN_ROWS, TRAIN_ROWS // 50)
    distances, found = bundled_index.search(to_float(bundled_index.images[rows]), 5)
    assert distances[:, 0].max() < 1e-3
    assert all(
        int(row) in [int(f) for f, d in zip(hits, near) if d < 1e-3] for row, hits, near in zip(rows, found, distances)
    )


@pytest.fixture(scope="module")
def mlp_index(mlp, small_dir) -> NeighbourIndex:
    return NeighbourIndex.build(mlp, small_dir)


@REUSED
@given(row=st.integers(0, TRAIN_ROWS - 1))
def test_a_training_image_finds_itself(mlp_index, training_file, row):
    images, labels = training_file
    found = mlp_index.nearest(to_float(images[row]), k=5)
    assert found[0].distance < 1e-3
    itself = [n for n in found if n.index == row]
    assert itself and itself[0].distance < 1e-3
    assert itself[0].label == int(labels[row])
    assert itself[0].image.dtype == torch.uint8 and torch.equal(itself[0].image, images[row])
    assert mlp_index.nearest(images[row], k=5)[0].distance < 1e-3  # uint8 pixels are taken too


def test_an_ensembles_distance_is_one_minus_its_members_mean_cosine(bundled, bundled_index, small_test):
    """Recomputed from the loaded (unfolded) members and the training file: the float16 index agrees to 1e-2.
    The bundled members have 128 features each, no more than RANK, so the index keeps them whole (no basis)."""
    assert bundled_index.bases == [None] * 3
    query = to_float(small_test[0][:3])
    found = [bundled_index.nearest(q, k=3) for q in query]
    rows = torch.tensor([[n.index for n in f] for f in found])
    training = to_float(bundled_index.images[rows.flatten()])
    cosines = []
    with torch.inference_mode():
        for member in bundled.model.members:
            q = torch.nn.functional.normalize(member.features_and_outputs(query)[0], dim=1)
            t = torch.nn.functional.normalize(member.features_and_outputs(training)[0], dim=1)
            cosines.append((q[:, None, :] * t.view(3, 3, -1)).sum(-1))
    expected = 1 - torch.stack(cosines).mean(0)
    torch.testing.assert_close(torch.tensor([[n.distance for n in f] for f in found]), expected, atol=1e-2, rtol=0)


def test_the_index_of_the_bundled_model_fits_in_150_mb_for_60000_images(bundled, bundled_index):
    """3 members x 128 features (at most RANK: kept whole, no basis) as float16, plus the images and labels."""
    features = [member.network[-1].in_features for member in bundled.model.members]  # what the output reads
    assert features == [128] * 3 and max(features) <= RANK
    assert bundled_index.members == 3 and bundled_index.vectors.shape == (TRAIN_ROWS, sum(features))
    assert bundled_index.vectors.dtype == torch.float16 and bundled_index.bases == [None] * 3
    per_image = bundled_index.nbytes / len(bundled_index)
    assert per_image * 60000 < 150e6


@pytest.mark.parametrize("density", [True, False], ids=["density basis", "own principal directions"])
def test_an_mlp_index_finds_its_training_images(mlp_run, small_dir, density):
    model = load_model(mlp_run, outliers=density)
    calls = []
    index = NeighbourIndex.build(model, small_dir, progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (TRAIN_ROWS, TRAIN_ROWS) and [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert index.vectors.shape == (TRAIN_ROWS, RANK)  # 512 features kept along 256 directions
    basis = index.bases[0]
    torch.testing.assert_close(basis.T @ basis, torch.eye(RANK), atol=1e-4, rtol=0)  # orthonormal either way
    images = to_float(index.images[:50])
    distances, rows = index.search(images, 1)
    assert distances.max() < 1e-3 and (index.labels[rows[:, 0]] == index.labels[:50]).all()


def test_a_network_with_few_features_keeps_them_all(mnist_data, small_dir, tmp_path):
    config = load_config("seed-b-fixed").with_overrides({"training.epochs": 1, "model.hidden": [64]})
    train(config, out_dir=tmp_path / "run", data=subset(mnist_data, 1000, 200), device="cpu", quiet=True)
    model = load_model(tmp_path / "run", outliers=False)
    index = NeighbourIndex.build(model, small_dir)
    assert index.bases == [None] and index.vectors.shape == (TRAIN_ROWS, 64)
    found = index.nearest(index.images[7], k=3)
    assert found[0].distance < 1e-3 and 7 in [n.index for n in found if n.distance < 1e-3]


def test_missing_training_files_are_named(bundled, tmp_path, isolated_env):
    with pytest.raises(MnistlabError, match="does not exist"):
        NeighbourIndex.build(bundled, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MnistlabError, match=r"not found in .*empty.*download is off"):
        NeighbourIndex.build(bundled, tmp_path / "empty", download=False)


def test_bad_queries_are_refused(bundled_index):
    with pytest.raises(MnistlabError, match="one 28x28 image"):
        bundled_index.nearest(torch.zeros(28, 29))
    with pytest.raises(MnistlabError, match=r"28x28 images \(B, 28, 28\)"):
        bundled_index.search(torch.zeros(2, 28, 29))
    with pytest.raises(MnistlabError, match="between 1 and 1000"):
        bundled_index.nearest(torch.zeros(28, 28), k=0)
