"""Fashion-MNIST and KMNIST end to end: shipped configs, the real Fashion-MNIST files, class names in model files
and in what every command prints, flips for clothes, and KMNIST's download and loading path on small IDX files
served by a real HTTP server on 127.0.0.1 (KMNIST's own mirror is not reachable from the test machines)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mnistlab.cli import main
from mnistlab.config import AugmentConfig, load_config, shipped_configs
from mnistlab.data.augment import augment_batch
from mnistlab.data.download import resolve_files
from mnistlab.data.idx import IMAGES_MAGIC, LABELS_MAGIC
from mnistlab.data.splits import load_data
from mnistlab.datasets import DATASETS
from mnistlab.errors import MnistlabError
from mnistlab.models.files import load_model
from mnistlab.train.loop import train

from .support.idx_files import gz, idx_bytes
from .support.mnist import subset
from .support.servers import serve_folder

REPO = Path(__file__).resolve().parents[1]
FASHION_DIR = REPO.parent / "shared" / "data" / "fashion-mnist"
FASHION = list(DATASETS["fashion-mnist"].classes)
KANA = list(DATASETS["kmnist"].classes)
needs_fashion = pytest.mark.skipif(
    not (FASHION_DIR / "t10k-images-idx3-ubyte.gz").is_file(), reason="real Fashion-MNIST not found beside the checkout"
)


# ---------------------------------------------------------------------------------------------- configs


def test_fashion_configs_train_on_fashion_mnist_standardised() -> None:
    names = sorted(n for n in shipped_configs() if n.startswith("fashion-"))
    assert names == ["fashion-best", "fashion-cnn", "fashion-mlp"]
    for name in names:
        config = load_config(name)
        assert config.data.dataset == "fashion-mnist" and config.data.normalize
    # Mirrored clothes are still clothes (the CNN configs flip them); a mirrored digit is not a digit.
    assert load_config("fashion-cnn").augment.flip and load_config("fashion-best").augment.flip
    assert not any(load_config(n).augment.flip for n in shipped_configs() if not n.startswith("fashion-"))


def test_flip_mirrors_about_half_the_images(mnist_data) -> None:
    x = mnist_data.test.images[:200].float() / 255
    out = augment_batch(x, AugmentConfig(flip=True), torch.Generator().manual_seed(0))
    same = torch.isclose(out, x, atol=1e-5).flatten(1).all(1)
    mirrored = torch.isclose(out, x.flip(2), atol=1e-5).flatten(1).all(1)
    assert (same | mirrored).all()
    assert 70 < int(mirrored.sum()) < 130


# ---------------------------------------------------------------------------------------------- Fashion-MNIST


@pytest.fixture(scope="module")
def fashion():
    if not (FASHION_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("real Fashion-MNIST not found beside the checkout")
    return load_data("fashion-mnist", FASHION_DIR, val_size=500)


@pytest.fixture(scope="module")
def fashion_run(fashion, tmp_path_factory) -> Path:
    """fashion-mlp for one epoch on 5,000 real Fashion-MNIST training images (about a second)."""
    out = tmp_path_factory.mktemp("fashion") / "mlp"
    config = load_config("fashion-mlp").with_overrides({"training.epochs": 1, "data.val_size": 500})
    train(config, out_dir=out, data=subset(fashion, 5000, 500), device="cpu", quiet=True)
    return out


@needs_fashion
def test_the_shared_fashion_files_load_despite_their_recompressed_gzip(fashion) -> None:
    assert (len(fashion.train), len(fashion.val), len(fashion.test)) == (59500, 500, 10000)
    assert torch.bincount(fashion.test.labels).tolist() == [1000] * 10
    assert (fashion.mean, fashion.std) == (0.2860, 0.3530)


@needs_fashion
def test_a_fashion_model_records_its_dataset_classes_and_statistics(fashion_run) -> None:
    description = json.loads((fashion_run / "model.json").read_text())
    assert description["metadata"]["dataset"] == "fashion-mnist"
    assert description["metadata"]["classes"] == FASHION
    assert description["normalize"] == [0.2860, 0.3530]  # Fashion-MNIST's own mean and std, not MNIST's
    model = load_model(fashion_run)
    assert model.classes == FASHION and model.dataset == "fashion-mnist"


@needs_fashion
def test_a_model_file_without_class_names_falls_back_to_the_registry(fashion_run, tmp_path) -> None:
    for suffix in (".safetensors", ".json"):
        (tmp_path / f"model{suffix}").write_bytes((fashion_run / f"model{suffix}").read_bytes())
    description = json.loads((tmp_path / "model.json").read_text())
    del description["metadata"]["classes"]
    (tmp_path / "model.json").write_text(json.dumps(description))
    assert load_model(tmp_path / "model.json").classes == FASHION


@needs_fashion
def test_evaluate_inspect_and_predict_print_garment_names(fashion_run, fashion, tmp_path, capsys) -> None:
    assert main(["evaluate", str(fashion_run), "--data-dir", str(FASHION_DIR)]) == 0
    text = capsys.readouterr().out
    assert "Trouser: " in text and "Ankle boot: " in text and "classes: 0 T-shirt/top, 1 Trouser" in text

    assert main(["inspect", str(fashion_run), "--data-dir", str(FASHION_DIR), "--out", str(tmp_path / "i")]) == 0
    text = capsys.readouterr().out
    assert any(f"{a}->{b}" in text for a in FASHION for b in FASHION)
    assert json.loads((tmp_path / "i" / "inspection.json").read_text())["classes"] == FASHION

    trouser = int((fashion.test.labels == 1).nonzero()[0])
    image = tmp_path / "trouser.png"
    Image.fromarray(fashion.test.images[trouser].numpy()).save(image)
    assert main(["predict", str(image), "--model", str(fashion_run), "--top-k", "2"]) == 0
    line = capsys.readouterr().out.strip()
    named = [name for name in FASHION if line.startswith(f"{image}: {name} (")]
    assert named and any(f"  [{name}: " in line for name in FASHION)
    assert main(["predict", str(image), "--model", str(fashion_run), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["class"] == FASHION[record["label"]] == named[0]


# ---------------------------------------------------------------------------------------------- KMNIST


def small_kmnist(folder: Path, n_train: int = 300, n_test: int = 50) -> list[bytes]:
    """KMNIST-named gzipped IDX files with random strokes and labels; returns their bytes in registry order."""
    rng = np.random.default_rng(0)
    arrays = [
        (IMAGES_MAGIC, rng.integers(0, 256, (n_train, 28, 28)) * (rng.random((n_train, 28, 28)) < 0.2)),
        (LABELS_MAGIC, rng.integers(0, 10, n_train)),
        (IMAGES_MAGIC, rng.integers(0, 256, (n_test, 28, 28)) * (rng.random((n_test, 28, 28)) < 0.2)),
        (LABELS_MAGIC, rng.integers(0, 10, n_test)),
    ]
    contents = [gz(idx_bytes(magic, array.shape, array)) for magic, array in arrays]
    folder.mkdir(parents=True, exist_ok=True)
    for file, content in zip(DATASETS["kmnist"].files, contents):
        (folder / file.name).write_bytes(content)
    return contents


@pytest.fixture
def isolated(tmp_path: Path, isolated_env: Path) -> Path:
    """No MNISTLAB_DATA and a private cache (conftest's isolated_env); files go under tmp_path."""
    return tmp_path


def test_kmnist_downloads_checks_and_loads(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    www = isolated / "www"
    contents = small_kmnist(www)
    info = DATASETS["kmnist"]
    assert info.mirrors == ("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",)
    # The registry's checksums are those of the real files; point them at the small ones for this download.
    files = [replace(f, sha256=hashlib.sha256(c).hexdigest()) for f, c in zip(info.files, contents)]
    monkeypatch.setitem(
        DATASETS,
        "kmnist",
        replace(info, **dict(zip(("train_images", "train_labels", "test_images", "test_labels"), files))),
    )
    root = isolated / "data"
    root.mkdir()
    with serve_folder(www) as url:
        paths = resolve_files("kmnist", root, mirrors=[url])
    assert paths == [root / "kmnist" / f.name for f in info.files]
    assert [p.read_bytes() for p in paths] == contents
    data = load_data("kmnist", root, val_size=50, download=False)
    assert (len(data.train), len(data.val), len(data.test)) == (250, 50, 50)
    assert (data.name, data.mean, data.std) == ("kmnist", 0.1918, 0.3483)


def test_kmnist_files_that_are_not_kmnist_are_refused(isolated: Path) -> None:
    www = isolated / "www"
    small_kmnist(www)
    root = isolated / "data"
    root.mkdir()
    with serve_folder(www) as url, pytest.raises(MnistlabError, match="checksum mismatch"):
        resolve_files("kmnist", root, mirrors=[url])  # the real registry: these small files are not KMNIST
    assert list(root.iterdir()) == []


def test_kmnist_torchvision_layout_is_found(isolated: Path) -> None:
    small_kmnist(isolated / "KMNIST" / "raw")
    data = load_data("kmnist", isolated, val_size=0, download=False)
    assert len(data.train) == 300 and len(data.test) == 50


def test_a_kmnist_model_names_its_classes(isolated: Path, capsys) -> None:
    root = isolated / "data"
    small_kmnist(root / "kmnist")
    config = load_config("seed-b-fixed").with_overrides(
        {"data.dataset": "kmnist", "data.val_size": 50, "data.normalize": True, "training.epochs": 1}
    )
    run = isolated / "run"
    train(config, out_dir=run, data_dir=root, device="cpu", quiet=True)
    description = json.loads((run / "model.json").read_text())
    assert description["metadata"]["classes"] == KANA
    assert description["normalize"] == [0.1918, 0.3483]
    assert main(["evaluate", str(run), "--data-dir", str(root)]) == 0
    assert "per-class accuracy: o: " in capsys.readouterr().out
    image = isolated / "character.png"
    Image.fromarray(np.pad(np.full((12, 8), 255, np.uint8), 8)).save(image)
    assert main(["predict", str(image), "--model", str(run)]) == 0
    printed = capsys.readouterr().out
    assert any(printed.startswith(f"{image}: {name} (") for name in KANA), printed
