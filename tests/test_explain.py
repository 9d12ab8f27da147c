"""`mnistlab explain` and whether its maps mean something: integrated gradients' completeness, the Adebayo et al.
(2018) re-initialisation check, deletion curves against a random order, and agreement with Captum, on the real
MNIST test digits with the bundled model (three CNNs), one of its CNNs alone, and a tiny trained MLP.

The check helpers (rank correlation, re-initialised copies, deletion curves) are shared with
benchmarks/explain_checks.py, which runs them over 1,000 test digits for docs/explain.md.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn

from mnistlab.infer.explain import METHODS, attribute, explain
from mnistlab.models.files import LoadedModel, load_model, save_model
from mnistlab.models.networks import Ensemble, Standardized

from .support.cli import assert_user_error, run_main

# Deletion curves: the share of a digit's inked pixels set to black at each point.
DELETED = torch.linspace(0, 1, 21)


# ---------------------------------------------------------------------------------------------- the checks


def networks_of(model: LoadedModel) -> list[Standardized]:
    """The networks whose maps an explanation averages: an ensemble's members, or the model itself."""
    return list(model.model.members) if isinstance(model.model, Ensemble) else [model.model]


def layers_of(network: Standardized) -> list[list[nn.Module]]:
    """A network's weighted layers from the input up, each a convolution or linear layer with the BatchNorm after
    it (re-initialised together: one layer of Adebayo et al.'s cascade)."""
    blocks: list[list[nn.Module]] = []
    for layer in network.network:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            blocks.append([layer])
        elif isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)) and blocks:
            blocks[-1].append(layer)
    return blocks


def reinitialised(model: LoadedModel, top: int | None = None, seed: int = 0) -> LoadedModel:
    """A copy of `model` whose networks have their `top` highest weighted layers (None: all) re-initialised as
    PyTorch initialises a new layer (BatchNorm back to its identity and fresh statistics)."""
    torch.manual_seed(seed)
    fresh = copy.copy(model)
    fresh.model = copy.deepcopy(model.model)
    for network in networks_of(fresh):
        blocks = layers_of(network)
        for block in blocks[len(blocks) - (len(blocks) if top is None else top) :]:
            for layer in block:
                layer.reset_parameters()
                if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
                    layer.reset_running_stats()
    return fresh


def ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks along the last dimension, ties given their mean rank (as Spearman's correlation wants)."""
    flat = values.reshape(-1, values.shape[-1]).double()
    out = torch.empty_like(flat)
    for v, o in zip(flat, out):
        _, inverse, counts = torch.unique(v, return_inverse=True, return_counts=True)
        ends = counts.cumsum(0).double()
        o.copy_(((ends - counts + 1 + ends) / 2)[inverse])
    return out.reshape(values.shape)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman's rank correlation of each pair of maps (B, 28, 28) -> (B,); 0 where a map is constant."""
    ra, rb = ranks(a.flatten(1)), ranks(b.flatten(1))
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    norms = ra.norm(dim=1) * rb.norm(dim=1)
    return torch.where(norms > 0, (ra * rb).sum(1) / norms.clamp_min(1e-12), 0.0).float()


def deletion_orders(maps: torch.Tensor, images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Per image, its inked pixels (> 0) from the most attributed to the least (ties in a random order), then
    the black ones (deleting those changes nothing): (B, 784) pixel indices."""
    generator = torch.Generator().manual_seed(seed)
    shuffle = torch.stack([torch.randperm(784, generator=generator) for _ in range(len(maps))])
    keys = maps.flatten(1).gather(1, shuffle).double()
    keys = torch.where(images.flatten(1).gather(1, shuffle) > 0, keys, -torch.inf)
    return shuffle.gather(1, keys.argsort(dim=1, descending=True, stable=True))


def random_orders(images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The same, with the inked pixels in a random order: the baseline a map must beat."""
    generator = torch.Generator().manual_seed(seed + 1)
    return deletion_orders(torch.rand(images.shape, generator=generator), images, seed)


@torch.no_grad()
def deletion_curves(model: LoadedModel, images: torch.Tensor, targets: torch.Tensor, orders: torch.Tensor):
    """The calibrated probability of each image's target as the first DELETED shares of its inked pixels, in
    `orders`, are set to black: (B, len(DELETED))."""
    inked = (images.flatten(1) > 0).sum(1)
    answering = model.answering()
    curves = []
    for share in DELETED:
        count = (share * inked).round().long()
        drop = torch.arange(784)[None] < count[:, None]  # the first `count` of each order
        mask = torch.zeros_like(drop).scatter(1, orders, drop)
        probabilities, _ = answering(images.masked_fill(mask.view_as(images), 0))
        curves.append(probabilities.gather(1, targets[:, None])[:, 0])
    return torch.stack(curves, 1)


def area(curves: torch.Tensor) -> torch.Tensor:
    """Area under each deletion curve (trapezoids over the share deleted, 0 to 1): lower is better."""
    return torch.trapezoid(curves, DELETED, dim=1)


def on_stroke(maps: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Whether each map's strongest evidence for its class (its largest value) lies on the digit's stroke, or
    one pixel beside it."""
    ink = nn.functional.max_pool2d((images > 0.2).float()[:, None], 3, 1, 1)[:, 0].flatten(1)
    return ink.gather(1, maps.flatten(1).argmax(1, keepdim=True))[:, 0] > 0


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bundled() -> LoadedModel:
    return load_model(None)


@pytest.fixture(scope="module")
def mlp_run(small_run) -> Path:
    """conftest's session-wide seed-b-fixed run (784-512-10, one epoch on 8,000 real images); only read here."""
    return small_run


@pytest.fixture(scope="module")
def mlp(mlp_run) -> LoadedModel:
    return load_model(mlp_run)


@pytest.fixture(scope="module")
def cnn_file(bundled, tmp_path_factory) -> Path:
    """The bundled model's first CNN saved as a model of its own (a single CNN, not an ensemble)."""
    member = bundled.model.members[0]
    folder = tmp_path_factory.mktemp("cnn")
    metadata = {"dataset": "mnist"}
    return save_model(member.network, bundled.configs[0], folder, (member.mean, member.std), metadata)


@pytest.fixture(scope="module")
def test_digits(mnist_data):
    """Clear test digits: every 97th of the test split (all classes), as [0, 1] floats, with their labels."""
    index = torch.arange(0, 10000, 97)[:60]
    return mnist_data.test.images[index].float() / 255, mnist_data.test.labels[index]


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory, test_digits) -> list[Path]:
    """Three test digits as PNG files, as a user would give them."""
    folder = tmp_path_factory.mktemp("digits")
    images, labels = test_digits
    paths = []
    for i in range(3):
        paths.append(folder / f"digit-{i}-{int(labels[i])}.png")
        Image.fromarray((255 * images[i]).round().byte().numpy()).save(paths[-1])
    return paths


def explained(capsys, *args: str) -> tuple[list[dict], object]:
    result = run_main(capsys, "explain", "--json", *args)
    return [json.loads(line) for line in result.stdout.splitlines()], result


# ---------------------------------------------------------------------------------------------- the command


@pytest.mark.parametrize("method", METHODS)
def test_the_bundled_ensemble_with_every_method(capsys, digit_files, tmp_path, method):
    found, result = explained(capsys, "--method", method, "--target", "3", "--out", str(tmp_path), str(digit_files[0]))
    assert result.returncode == 0, result.stderr
    (one,) = found
    label = int(Path(one["path"]).stem.split("-")[-1])
    assert one["label"] == label and one["method"] == method and one["members"] == 3
    assert "3 members' maps averaged" in one["combined"]
    targets = [m["target"] for m in one["maps"]]
    runner_up = sorted(range(10), key=lambda d: -one["probabilities"][d])[1]
    assert targets == list(dict.fromkeys([label, 3, runner_up]))
    for m in one["maps"]:
        values = np.array(m["map"])
        assert values.shape == (28, 28) and np.isfinite(values).all() and np.abs(values).max() > 0
        assert (m["completeness_error"] is not None) == (method == "integrated-gradients")
        if method == "grad-cam":
            assert values.min() >= 0
    (png,) = tmp_path.glob("*.png")
    assert png.name == f"0000-{Path(one['path']).stem}.png" and Image.open(png).size[0] >= 1000


def test_text_output_a_single_cnn_and_an_mlp(capsys, digit_files, cnn_file, mlp_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --out is ./explanations
    result = run_main(capsys, "explain", "--method", "saliency", *map(str, digit_files[:2]))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and "saliency, 3 members averaged -> explanations/0000-digit-0-" in lines[0]
    assert len(list((tmp_path / "explanations").glob("*.png"))) == 2
    for model, method in ((cnn_file, "grad-cam"), (mlp_run, "ig"), (mlp_run, "occlusion")):
        found, result = explained(capsys, "--model", str(model), "--method", method, str(digit_files[1]))
        assert result.returncode == 0, result.stderr
        assert found[0]["members"] == 1 and "combined" not in found[0]
        assert len(found[0]["maps"]) == 2  # the answer and the runner-up
    assert not (tmp_path / "explanations" / "0000-digit-1-2.png").exists()  # --json alone writes no PNG


def test_layers_and_neighbours(capsys, digit_files, mlp_run, small_data_dir, tmp_path):
    """--layers and --neighbours (infer/inside.py) in the JSON and the PNG; the neighbours from a small data
    folder of 20 training images, so the index builds at once."""
    args = ["--model", str(mlp_run), "--method", "saliency", "--layers", "--neighbours", "3"]
    args += ["--data-dir", str(small_data_dir), "--out", str(tmp_path), str(digit_files[0])]
    found, result = explained(capsys, *args)
    assert result.returncode == 0, result.stderr
    (layer,) = found[0]["layers"]  # the MLP's one hidden layer
    assert layer["kind"] == "units" and len(layer["activations"]) == 512 and layer["top_units"]
    neighbours = found[0]["neighbours"]
    assert len(neighbours) == 3 and all(0 <= n["index"] < 20 for n in neighbours)
    assert [n["distance"] for n in neighbours] == sorted(n["distance"] for n in neighbours)
    (png,) = tmp_path.glob("*.png")
    assert Image.open(png).size[1] > 600  # the rows below the maps


def test_bad_input_is_one_line(capsys, digit_files, mlp_run, tmp_path):
    image = str(digit_files[0])
    assert_user_error(run_main(capsys, "explain", "--method", "lime", image), "'lime'", ", ".join(METHODS))
    assert_user_error(run_main(capsys, "explain", "--target", "10", image), "--target 10", "0-9")
    assert_user_error(run_main(capsys, "explain", "--target", "seven", image), "--target seven")
    grad_cam = run_main(capsys, "explain", "--model", str(mlp_run), "--method", "grad-cam", image)
    assert_user_error(grad_cam, "grad-cam", "MLP")
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x08\x07")
    assert_user_error(run_main(capsys, "explain", "--model", str(onnx), image), str(onnx), ".safetensors")
    assert_user_error(run_main(capsys, "explain", "--steps", "0", image), "--steps")
    blank = tmp_path / "blank.png"
    Image.new("L", (40, 40), 255).save(blank)
    found, result = explained(capsys, "--method", "saliency", str(blank), image)
    assert result.returncode == 1  # as predict: the others are still explained
    assert result.stderr.strip() == f"mnistlab: error: {blank}: no digit found (the image is blank)"
    assert [f["path"] for f in found] == [image]


# ---------------------------------------------------------------------------------------------- the maps


def test_integrated_gradients_agrees_with_captum(bundled, mlp, test_digits):
    captum = pytest.importorskip("captum.attr")
    images, labels = test_digits[0][:2], test_digits[1][:2]
    for model in (bundled, mlp):
        ours, _ = attribute(model, images, labels, "integrated-gradients", 32)
        theirs = torch.stack(
            [
                captum.IntegratedGradients(network).attribute(
                    images, baselines=0.0, target=labels, n_steps=32, method="riemann_middle"
                )
                for network in networks_of(model)
            ]
        ).mean(0)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5 * float(theirs.abs().max()))


def test_occlusion_agrees_with_captum(bundled, mlp, test_digits):
    captum = pytest.importorskip("captum.attr")
    images, labels = test_digits[0][:2], test_digits[1][:2]
    for model in (bundled, mlp):
        ours, _ = attribute(model, images, labels, "occlusion")
        with torch.no_grad():
            theirs = torch.stack(
                [
                    captum.Occlusion(network).attribute(
                        images,
                        sliding_window_shapes=(4, 4),
                        strides=(2, 2),
                        baselines=0.0,
                        target=labels,
                        perturbations_per_eval=169,  # all 13 x 13 patches in one pass, as ours
                    )
                    for network in networks_of(model)
                ]
            ).mean(0)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5 * float(theirs.abs().max()))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**31 - 1),
    ink=st.floats(0.02, 0.5),
    target=st.integers(0, 9),
)
def test_nothing_is_attributed_where_no_ink_could_matter(mlp, seed, ink, target):
    """Integrated gradients from black gives a black pixel nothing; occlusion gives nothing to a pixel whose every
    covering patch is black already (hiding black with black changes no score), whatever the image."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 28, 28, generator=generator) * (torch.rand(1, 28, 28, generator=generator) < ink)
    targets = torch.tensor([target])
    ig, _ = attribute(mlp, image, targets, "integrated-gradients", 8)
    assert (ig[image == 0] == 0).all()
    occluded, _ = attribute(mlp, image, targets, "occlusion")
    # a pixel's patches (4x4, every 2 pixels) all lie within the 7x7 square around it
    seen = nn.functional.max_pool2d(image[:, None], 7, 1, 3)[:, 0]
    # zero but for float rounding: the image and its occluded copies go through the network in batches of
    # different sizes, whose kernels round differently (a few 1e-7)
    assert torch.where(seen == 0, occluded.abs(), 0).max() <= 1e-5 * (1 + float(occluded.abs().max()))


def test_completeness_of_integrated_gradients(bundled, mlp, test_digits):
    """The map adds up to the score's difference from black, to within the error of the midpoint sum, which more
    steps shrink. The bundled CNNs' gradients jump along the path (ReLUs, max-pooling, a stride-2 first layer):
    over the first 100 test digits the median error is 12.7% at 32 steps, 3.9% at 64, 1.4% at 128, 0.68% at 256
    and 0.32% at 512. On the 4 digits here the errors are 4-26% at 32 steps (median 8.9%), 1.4-3.2% at 128 and
    under 0.8% at 512; this holds the median under 25% at 32 steps, falling with more steps and under 1% at 512.
    The small MLP's error is smaller: its median under 5% at 32 steps and under 1% at 512."""
    images, labels = test_digits[0][:12], test_digits[1][:12]
    medians = [
        float(attribute(bundled, images[:4], labels[:4], "integrated-gradients", n)[1].median()) for n in (32, 128, 512)
    ]
    assert medians[0] < 0.25 and medians[0] > medians[1] > medians[2] and medians[2] < 0.01, medians
    _, coarse = attribute(mlp, images, labels, "integrated-gradients", 32)
    _, fine = attribute(mlp, images, labels, "integrated-gradients", 512)
    assert coarse.median() < 0.05, coarse
    assert fine.median() < coarse.median() and fine.median() < 0.01, (coarse, fine)


def test_strongest_evidence_lies_on_the_stroke(bundled, mlp, test_digits):
    """Occlusion, which could put its peak anywhere, puts it on the digit (integrated gradients from black can
    only attribute inked pixels; plain saliency often peaks beside the stroke, where ink would change the score
    most, and Grad-CAM's 7x7 grid is coarser than a stroke: docs/explain.md)."""
    images, labels = test_digits[0][:20], test_digits[1][:20]
    for model, count in ((bundled, 5), (mlp, 20)):
        maps, _ = attribute(model, images[:count], labels[:count], "occlusion")
        assert on_stroke(maps, images[:count]).float().mean() >= 0.9, on_stroke(maps, images[:count])


def _reinitialised_correlations(model: LoadedModel, images, labels, method: str) -> tuple[float, float]:
    """Mean Spearman correlation of the trained and the re-initialised maps: signed, and of their |values|."""
    trained, _ = attribute(model, images, labels, method, 16)
    fresh, _ = attribute(reinitialised(model), images, labels, method, 16)
    return float(spearman(trained, fresh).mean()), float(spearman(trained.abs(), fresh.abs()).mean())


@pytest.mark.parametrize("method", METHODS)
def test_reinitialising_the_weights_changes_the_map(mlp, cnn_file, test_digits, method):
    """Adebayo et al. (2018): a map that barely changes when the network forgets all it learned explains the
    image, not the model. Mean Spearman correlation of the trained and the re-initialised map below 0.5; also of
    their absolute values for saliency and Grad-CAM. (Integrated gradients and occlusion fail that form: their
    |map| keeps the digit's shape whatever the weights, 0.99 and 0.93 with the bundled model: docs/explain.md.)"""
    images, labels = test_digits[0][:4], test_digits[1][:4]
    models = [load_model(cnn_file)] + ([mlp] if method != "grad-cam" else [])
    for model in models:
        signed, absolute = _reinitialised_correlations(model, images, labels, method)
        assert signed < 0.5, (method, model.path, signed)
        if method in ("saliency", "grad-cam"):
            assert absolute < 0.5, (method, model.path, absolute)


def test_spearman_and_reinitialisation_are_what_they_say(mlp, test_digits):
    a = torch.randn(3, 28, 28)
    assert torch.allclose(spearman(a, a), torch.ones(3))
    assert torch.allclose(spearman(a, -a), -torch.ones(3))
    assert torch.allclose(spearman(a, a.exp()), torch.ones(3))  # ranks only
    fresh = reinitialised(mlp)
    for old, new in zip(mlp.model.parameters(), fresh.model.parameters()):
        assert not torch.equal(old, new)
    top = reinitialised(mlp, top=1)
    kept = [torch.equal(o, n) for o, n in zip(mlp.model.parameters(), top.model.parameters())]
    assert kept == [True, True, False, False]  # the hidden layer kept, the output layer new


def test_deleting_the_most_attributed_pixels_first_beats_a_random_order(mlp, bundled, test_digits):
    images, labels = test_digits[0][:30], test_digits[1][:30]
    random = deletion_curves(mlp, images, labels, random_orders(images))
    for method in ("integrated-gradients", "occlusion", "saliency"):
        maps, _ = attribute(mlp, images, labels, method, 16)
        curves = deletion_curves(mlp, images, labels, deletion_orders(maps, images))
        assert torch.equal(curves[:, [0, -1]], random[:, [0, -1]])  # the same image at the start, black at the end
        assert area(curves).mean() < 0.8 * area(random).mean(), method


def test_grad_cam_beats_a_random_order_on_a_bundled_cnn(cnn_file, test_digits):
    """The bundled members pool their last convolution before its BatchNorm and ReLU; Grad-CAM on the raw
    convolution's maps was barely better than deleting at random (0.88 of its area over 300 test digits)."""
    model = load_model(cnn_file)
    images, labels = test_digits[0][:30], test_digits[1][:30]
    random = deletion_curves(model, images, labels, random_orders(images))
    maps, _ = attribute(model, images, labels, "grad-cam")
    curves = deletion_curves(model, images, labels, deletion_orders(maps, images))
    assert area(curves).mean() < 0.8 * area(random).mean()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), signs=st.lists(st.sampled_from([-1.0, 1.0]), min_size=4, max_size=4))
def test_grad_cam_splits_a_network_into_the_same_function(seed, signs):
    """Whatever the BatchNorm's signs, Grad-CAM's body then head compute what the network does: a block pooled
    before its BatchNorm and ReLU is reordered only while that changes nothing (all scales positive)."""
    from mnistlab.infer.explain import _cam_split

    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(signs) * torch.rand(4).add(0.1))
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    network = nn.Sequential(nn.Conv2d(1, 4, 3), nn.MaxPool2d(2), bn, nn.ReLU(), nn.Flatten(), nn.Linear(64, 10))
    body, head = _cam_split(network)
    x = torch.randn(5, 1, 10, 10)
    with torch.no_grad():
        assert torch.allclose(head(body(x)), network(x), atol=1e-5)
        assert body(x).shape[-2:] == (8, 8)  # the convolution's resolution, before the pool
    # the maps the next layer reads (after BatchNorm and ReLU) where reordering is exact, the raw ones otherwise
    assert [type(layer) for layer in body] == ([nn.Conv2d, nn.BatchNorm2d, nn.ReLU] if min(signs) > 0 else [nn.Conv2d])


@pytest.mark.parametrize("asked", [None, "answer", "runner-up", "other"])
def test_explain_maps_the_answer_the_target_and_the_runner_up_each_once(bundled, test_digits, asked):
    image = test_digits[0][5]
    answer, runner_up, other = bundled.answering()(image[None])[0][0].argsort(descending=True)[:3].tolist()
    target = {None: None, "answer": answer, "runner-up": runner_up, "other": other}[asked]
    found = explain(bundled, image, "saliency", target)
    expected = [answer, other, runner_up] if asked == "other" else [answer, runner_up]
    assert [a.target for a in found.attributions] == expected and found.label == answer
    roles = ["answer", "asked", "runner-up"] if asked == "other" else ["answer", "runner-up"]
    assert [found.role(t) for t in expected] == roles
    assert found.members == 3 and abs(float(found.probabilities.sum()) - 1) < 1e-4


def test_an_empty_batch_gives_no_maps(mlp):
    maps, errors = attribute(mlp, torch.zeros(0, 28, 28), torch.zeros(0, dtype=torch.long), "integrated-gradients")
    assert maps.shape == (0, 28, 28) and errors.shape == (0,)


def test_maps_become_short_finite_numbers_or_a_one_line_error():
    from mnistlab.infer.explain import NotFinite, rounded

    assert rounded(torch.tensor([[1 / 3, 2.0], [-123456.0, 0.0]])) == [[0.3333, 2.0], [-123500.0, 0.0]]
    assert rounded(np.array([1 / 3]), 6) == [0.333333]
    with pytest.raises(NotFinite, match="activations of conv1 is not finite"):
        rounded(torch.tensor([1.0, float("nan")]), what="activations of conv1")
