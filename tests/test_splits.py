"""Loading splits into memory (small written files and the real MNIST), batches by index, float conversion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mnistlab.data.splits import MnistData, Split, batches, load_data, to_float
from mnistlab.errors import MnistlabError

from .support.idx_files import (
    MNIST,
    error_text,
    random_images,
    random_labels,
    row_fingerprints,
    write_dataset,
    write_labels,
)

pytestmark = pytest.mark.usefixtures("isolated_env")  # no test sees the caller's MNISTLAB_DATA or cache

# ---------------------------------------------------------------------------------------------- load_data: small files


def test_load_small_data(small_data_dir: Path) -> None:
    data = load_data("mnist", data_dir=small_data_dir, val_size=5, download=False)
    assert isinstance(data, MnistData)
    assert data.name == "mnist"
    assert (data.mean, data.std) == (MNIST.mean, MNIST.std)
    assert data.val is not None
    assert (len(data.train), len(data.val), len(data.test)) == (15, 5, 7)
    for split in (data.train, data.val, data.test):
        assert split.images.dtype == torch.uint8
        assert split.labels.dtype == torch.int64
        assert split.images.shape == (len(split), 28, 28)
        assert split.images.device.type == "cpu"
    np.testing.assert_array_equal(data.test.images.numpy(), random_images(7, 3))
    np.testing.assert_array_equal(data.test.labels.numpy(), random_labels(7, 4))
    # train and val together are exactly the training file, each sample once, images paired with labels.
    all_images = torch.cat([data.train.images, data.val.images])
    all_labels = torch.cat([data.train.labels, data.val.labels])
    np.testing.assert_array_equal(
        row_fingerprints(all_images, all_labels),
        row_fingerprints(random_images(20, 1), random_labels(20, 2)),
    )


def test_load_small_data_seeds(small_data_dir: Path) -> None:
    def val_and_train_images(seed: int) -> tuple[np.ndarray, np.ndarray]:
        data = load_data("mnist", data_dir=small_data_dir, val_size=10, seed=seed, download=False)
        return data.val.images.numpy(), data.train.images.numpy()

    a, b, c = val_and_train_images(3), val_and_train_images(3), val_and_train_images(4)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_load_small_data_without_val(small_data_dir: Path) -> None:
    data = load_data("mnist", data_dir=small_data_dir, val_size=0, download=False)
    assert data.val is None
    np.testing.assert_array_equal(data.train.images.numpy(), random_images(20, 1))
    np.testing.assert_array_equal(data.train.labels.numpy(), random_labels(20, 2))
    assert data.to("cpu").val is None


@pytest.mark.parametrize("val_size", [20, 21, -1])
def test_load_small_data_bad_val_size(small_data_dir: Path, val_size: int) -> None:
    with pytest.raises(MnistlabError) as excinfo:
        load_data("mnist", data_dir=small_data_dir, val_size=val_size, download=False)
    assert f"validation size {val_size} must be between 0 and 19" in error_text(excinfo)


def test_load_largest_val_size(small_data_dir: Path) -> None:
    data = load_data("mnist", data_dir=small_data_dir, val_size=19, download=False)
    assert (len(data.train), len(data.val)) == (1, 19)


def test_load_images_and_labels_of_different_length(tmp_path: Path) -> None:
    root = tmp_path / "data"
    paths = write_dataset(root / "mnist", n_train=6)
    write_labels(paths[1], random_labels(5), compress=True)
    with pytest.raises(MnistlabError) as excinfo:
        load_data("mnist", data_dir=root, download=False)
    msg = error_text(excinfo)
    assert f"{paths[0]} has 6 images" in msg
    assert f"{paths[1]} has 5 labels" in msg


def test_load_reports_a_bad_file(tmp_path: Path) -> None:
    root = tmp_path / "data"
    paths = write_dataset(root / "mnist")
    write_labels(paths[3], np.array([1, 2, 11, 3], dtype=np.uint8), compress=True)
    with pytest.raises(MnistlabError) as excinfo:
        load_data("mnist", data_dir=root, download=False)
    assert str(paths[3]) in error_text(excinfo)
    assert "label 11 is out of range" in error_text(excinfo)


def test_split_to_and_len() -> None:
    split = Split(torch.zeros(3, 28, 28, dtype=torch.uint8), torch.arange(3))
    assert len(split) == 3
    moved = split.to("cpu")
    assert isinstance(moved, Split)
    assert torch.equal(moved.labels, split.labels)


# ---------------------------------------------------------------------------------------------- load_data: real MNIST


def test_real_mnist_shapes_and_types(mnist_data: MnistData) -> None:
    assert mnist_data.name == "mnist"
    assert mnist_data.val is not None
    assert mnist_data.train.images.shape == (55000, 28, 28)
    assert mnist_data.val.images.shape == (5000, 28, 28)
    assert mnist_data.test.images.shape == (10000, 28, 28)
    for split in (mnist_data.train, mnist_data.val, mnist_data.test):
        assert split.images.dtype == torch.uint8
        assert split.labels.dtype == torch.int64
        assert split.labels.shape == (len(split.images),)
        assert int(split.labels.min()) == 0 and int(split.labels.max()) == 9
    assert (mnist_data.mean, mnist_data.std) == (0.1307, 0.3081)


def test_real_mnist_pixel_statistics_match_the_registry(real_train: tuple[np.ndarray, np.ndarray]) -> None:
    pixels = real_train[0].ravel()
    counts = np.bincount(pixels, minlength=256)  # exact integer statistics, without a float copy of 47M pixels
    values = np.arange(256) / 255.0
    mean = (counts * values).sum() / pixels.size
    std = np.sqrt((counts * (values - mean) ** 2).sum() / pixels.size)
    assert mean == pytest.approx(MNIST.mean, abs=1e-4)
    assert std == pytest.approx(MNIST.std, abs=1e-4)


def test_real_mnist_train_and_val_partition_the_training_file(
    mnist_data: MnistData, real_train: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = real_train
    assert len(mnist_data.train) + len(mnist_data.val) == 60000
    joined_labels = torch.cat([mnist_data.train.labels, mnist_data.val.labels]).numpy()
    np.testing.assert_array_equal(np.bincount(joined_labels, minlength=10), np.bincount(labels, minlength=10))
    # Stronger: the multiset of (image, label) pairs is the file's, so every sample is used exactly once.
    joined = row_fingerprints(
        torch.cat([mnist_data.train.images, mnist_data.val.images]),
        torch.cat([mnist_data.train.labels, mnist_data.val.labels]),
    )
    np.testing.assert_array_equal(joined, row_fingerprints(images, labels))


def test_real_mnist_seeds(mnist_data: MnistData, real_dir: Path) -> None:
    same = load_data("mnist", data_dir=real_dir, seed=0, download=False)
    assert torch.equal(same.val.images, mnist_data.val.images)
    assert torch.equal(same.val.labels, mnist_data.val.labels)
    assert torch.equal(same.train.labels, mnist_data.train.labels)
    other = load_data("mnist", data_dir=real_dir, seed=1, download=False)
    assert not torch.equal(other.val.labels, mnist_data.val.labels)
    assert not torch.equal(other.val.images, mnist_data.val.images)
    assert torch.equal(other.test.images, mnist_data.test.images)  # the test split never depends on the seed


def test_real_mnist_without_val(real_dir: Path, real_train: tuple[np.ndarray, np.ndarray]) -> None:
    data = load_data("mnist", data_dir=real_dir, val_size=0, download=False)
    assert data.val is None
    assert data.train.images.shape == (60000, 28, 28)
    assert data.test.images.shape == (10000, 28, 28)
    np.testing.assert_array_equal(data.train.images.numpy(), real_train[0])  # file order, untouched
    np.testing.assert_array_equal(data.train.labels.numpy(), real_train[1])


def test_real_mnist_val_size_too_large(real_dir: Path) -> None:
    with pytest.raises(MnistlabError) as excinfo:
        load_data("mnist", data_dir=real_dir, val_size=60000, download=False)
    assert "validation size 60000 must be between 0 and 59999" in error_text(excinfo)


# ---------------------------------------------------------------------------------------------- batches


def indexed_split(n: int) -> Split:
    """A split whose image i holds i in its first two pixels (and whose label is i), to track every sample."""
    index = torch.arange(n)
    images = torch.zeros(n, 28, 28, dtype=torch.uint8)
    images[:, 0, 0] = (index // 256).to(torch.uint8)
    images[:, 0, 1] = (index % 256).to(torch.uint8)
    return Split(images, index.clone())


def image_index(images: torch.Tensor) -> torch.Tensor:
    return images[:, 0, 0].long() * 256 + images[:, 0, 1].long()


def order_of(split: Split, batch_size: int, generator: torch.Generator | None) -> list[int]:
    order: list[int] = []
    for batch in batches(split, batch_size, generator):
        assert torch.equal(image_index(batch.images), batch.labels)  # images stay paired with their labels
        order += batch.labels.tolist()
    return order


def test_batches_in_order_without_generator() -> None:
    split = indexed_split(103)
    got = list(batches(split, 10))
    assert all(isinstance(b, Split) for b in got)
    assert [len(b) for b in got] == [10] * 10 + [3]  # the last batch is the remainder
    assert order_of(split, 10, None) == list(range(103))


@pytest.mark.parametrize(("n", "batch_size", "sizes"), [(100, 10, [10] * 10), (5, 8, [5]), (0, 4, []), (1, 1, [1])])
def test_batch_sizes(n: int, batch_size: int, sizes: list[int]) -> None:
    split = indexed_split(n)
    assert [len(b) for b in batches(split, batch_size)] == sizes
    assert [len(b) for b in batches(split, batch_size, torch.Generator().manual_seed(0))] == sizes


def test_batches_with_generator_cover_every_index_once_per_epoch() -> None:
    split = indexed_split(300)  # more than 256, so both index bytes matter
    generator = torch.Generator().manual_seed(0)
    epochs = []
    for _ in range(3):
        got = list(batches(split, 32, generator))
        assert [len(b) for b in got] == [32] * 9 + [12]
        order = [i for b in got for i in image_index(b.images).tolist()]
        assert sorted(order) == list(range(300))
        epochs.append(order)
    assert epochs[0] != list(range(300))  # actually shuffled
    assert epochs[0] != epochs[1]  # a fresh permutation every epoch


def test_batches_seeded_generators_reproduce_the_order() -> None:
    split = indexed_split(250)
    g1, g2, g3 = (torch.Generator().manual_seed(s) for s in (42, 42, 43))
    first = [order_of(split, 16, g1) for _ in range(2)]
    second = [order_of(split, 16, g2) for _ in range(2)]
    assert first == second
    assert order_of(split, 16, g3) != first[0]


def test_batches_do_not_change_the_split() -> None:
    split = indexed_split(50)
    before = split.images.clone(), split.labels.clone()
    list(batches(split, 7, torch.Generator().manual_seed(0)))
    assert torch.equal(split.images, before[0]) and torch.equal(split.labels, before[1])


# ---------------------------------------------------------------------------------------------- to_float


def test_to_float_scales_to_unit_range() -> None:
    images = torch.tensor([[0, 255], [128, 1]], dtype=torch.uint8)
    x = to_float(images)
    assert x.dtype == torch.float32
    assert x.shape == images.shape
    assert x[0, 0].item() == 0.0 and x[0, 1].item() == 1.0
    assert x[1, 0].item() == pytest.approx(128 / 255)
    assert images.dtype == torch.uint8 and images.tolist() == [[0, 255], [128, 1]]  # input untouched


def test_to_float_normalizes() -> None:
    images = torch.tensor([0, 51, 255], dtype=torch.uint8)
    mean, std = MNIST.mean, MNIST.std
    x = to_float(images, (mean, std))
    assert x.dtype == torch.float32
    expected = (torch.tensor([0, 51, 255], dtype=torch.float32) / 255 - mean) / std
    torch.testing.assert_close(x, expected)
    torch.testing.assert_close(to_float(images, (0.5, 0.5)), torch.tensor([-1.0, 51 / 255 * 2 - 1, 1.0]))


def test_to_float_on_a_batch() -> None:
    split = indexed_split(10)
    batch = next(batches(split, 4))
    x = to_float(batch.images, (0.0, 1.0))
    assert x.shape == (4, 28, 28)
    torch.testing.assert_close(x, batch.images.float() / 255)
