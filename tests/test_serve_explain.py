"""The explanation API over real HTTP: /api/explain, /api/activations and /api/neighbours on a real uvicorn server
serving the bundled CNN ensemble and a small MLP trained here (engine "torch": an ONNX copy of the ensemble costs
17 s to make and changes nothing here, as explanations always run the PyTorch module). Answers match the core's
(`infer.explain`, `infer.inside`), every bad request is refused with one line, the neighbour index is built once
(and missing training data said in one line), and explanations never hold up a prediction."""

from __future__ import annotations

import asyncio
import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="the web extra is not installed (pip install 'mnistlab[web]')")
import httpx
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mnistlab.data.preprocess import preprocess
from mnistlab.infer.explain import METHODS, explain
from mnistlab.infer.inside import layer_views
from mnistlab.models.files import load_model
from mnistlab.serve import create_app
from mnistlab.serve.routers import explain as routes
from mnistlab.serve.routers.explain import FAINT, MAX_NEIGHBOURS, signed_png
from mnistlab.serve.schemas import (
    REF,
    ActivationsResponse,
    ExplainResponse,
    NeighboursResponse,
    Refusal,
)

from .support.drawings import drawing, drawn_png, png_bytes
from .support.mnist import write_mnist_folder
from .support.servers import AppServer

SEVEN = drawn_png("7")
SEVEN_URL = "data:image/png;base64," + base64.b64encode(SEVEN).decode()


@pytest.fixture(scope="module")
def models(small_run):
    return [load_model(None), load_model(small_run)]


@pytest.fixture(scope="module")
def train_files(tmp_path_factory, mnist_data):
    """A data folder whose MNIST training files hold the first 1,000 real training images (the test files: 10),
    so that a neighbour index builds in a moment; and those images and labels."""
    root = write_mnist_folder(tmp_path_factory.mktemp("data"), mnist_data, 1000, 10)
    images, labels = mnist_data.train.images[:1000].numpy(), mnist_data.train.labels[:1000].numpy()
    return root, images, labels


@pytest.fixture(scope="module")
def server(models, train_files):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MNISTLAB_DATA", str(train_files[0]))
        running = AppServer(create_app(models, device="cpu", workers=0, engine="torch"))
        yield running
        running.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def post(client: httpx.Client, path: str, data: bytes = SEVEN, **fields) -> httpx.Response:
    return client.post(path, files={"image": ("drawing.png", data, "image/png")}, data=fields)


def decoded(base64_png: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(base64_png))))


def view_of(png: bytes) -> torch.Tensor:
    return torch.from_numpy(preprocess(Image.open(io.BytesIO(png))).digit)


# ---------------------------------------------------------------------------------------------- /api/explain


def test_explain_gives_the_cores_maps_as_numbers_and_overlays(client, models):
    response = post(client, "/api/explain", model="bundled")
    assert response.status_code == 200, response.text
    body = ExplainResponse.model_validate(response.json())
    assert (body.model, body.method, body.members, body.label) == ("bundled", "integrated-gradients", 3, 7)
    assert [a.role for a in body.attributions] == ["answer", "runner-up"]
    view = view_of(SEVEN)
    assert np.array_equal(decoded(body.preprocessed), np.round(view.numpy() * 255).astype(np.uint8))

    core = explain(models[0], view)  # the same method, targets and steps as the server's defaults
    assert [a.target for a in body.attributions] == [a.target for a in core.attributions]
    for got, want in zip(body.attributions, core.attributions):
        values = np.array(got.map)
        assert values.shape == (28, 28)
        assert values == pytest.approx(want.map.numpy(), rel=1e-3, abs=1e-3 * got.scale)
        assert got.scale == pytest.approx(float(want.map.abs().max()), rel=1e-3)
        assert got.completeness_error == pytest.approx(want.completeness_error, rel=1e-2, abs=1e-4)
        overlay = decoded(got.overlay)
        assert overlay.shape == (28, 28, 4)
        strong = np.abs(values) >= 0.1 * got.scale
        assert (overlay[..., 3][strong] > 0).all() and (overlay[..., 3][np.abs(values) < 0.04 * got.scale] == 0).all()
        red = overlay[..., 0].astype(int) > overlay[..., 2]
        assert np.array_equal(red[strong], values[strong] > 0)  # red for, blue against
    assert body.probabilities == pytest.approx(core.probabilities.tolist(), abs=1e-5)
    # Each reported error is that of the map served beside it: |its sum - gap| / |gap|, the gap being the
    # members' mean score (output before the softmax) for the map's class, the 7's minus a black image's.
    with torch.no_grad():
        gaps = sum(m(view[None])[0] - m(torch.zeros(1, 28, 28))[0] for m in models[0].model.members) / 3
    for got in body.attributions:
        gap = float(gaps[got.target])
        assert got.completeness_error == pytest.approx(abs(np.sum(got.map) - gap) / abs(gap), rel=1e-2, abs=1e-3)
    # The strongest evidence for the 7 lies on its ink.
    answer = np.array(body.attributions[0].map)
    assert view.numpy().flat[int(np.argmax(answer))] > 0.5


@pytest.mark.parametrize("method", METHODS)
def test_every_method_explains_both_kinds_of_model_or_says_why_not(client, method):
    for model in ("bundled", "seed-b-small"):
        response = client.post(
            "/api/explain",
            json={"image": SEVEN_URL, "model": model, "method": method},
        )
        if method == "grad-cam" and model == "seed-b-small":
            assert response.status_code == 400
            assert "grad-cam needs a convolutional network" in Refusal.model_validate(response.json()).detail
            continue
        body = ExplainResponse.model_validate(response.json())
        assert body.method == method and body.members == (3 if model == "bundled" else 1)
        assert all(np.isfinite(a.map).all() for a in body.attributions)
        assert (a.completeness_error is None for a in body.attributions) != (method == "integrated-gradients")
        if method == "grad-cam":
            assert min(min(row) for a in body.attributions for row in a.map) >= 0


def test_a_target_is_explained_after_the_answer_by_number_or_name(client, models):
    """A class that is neither the answer nor the runner-up (the model's third most probable for the 7) is asked
    for: its map comes between theirs. Asking for the answer itself gives no third map."""
    with torch.no_grad():
        probabilities = models[0].answering()(view_of(SEVEN)[None])[0][0]
    answer, runner_up, third = probabilities.topk(3).indices.tolist()
    assert answer == 7
    by_number = ExplainResponse.model_validate(
        post(client, "/api/explain", target=str(third), method="saliency").json()
    )
    roles = [(a.target, a.role) for a in by_number.attributions]
    assert roles == [(7, "answer"), (third, "asked"), (runner_up, "runner-up")]
    assert [a.class_ for a in by_number.attributions] == [str(a.target) for a in by_number.attributions]
    answer_only = post(client, "/api/explain", target="7", method="saliency").json()  # the answer itself: once
    assert [a["role"] for a in answer_only["attributions"]] == ["answer", "runner-up"]


BAD_FIELDS = [
    ("/api/explain", {"model": "nope"}, 404, "no model named 'nope' is served here (served: 'bundled', 'seed-b-"),
    ("/api/explain", {"method": "lime"}, 400, "unknown explanation method 'lime'"),
    ("/api/explain", {"target": "10"}, 400, "target 10: not one of the model's classes (0-9)"),
    ("/api/explain", {"target": "-1"}, 400, "target -1: not one of the model's classes"),
    ("/api/explain", {"target": "seven"}, 400, "target seven: not one of the model's classes"),
    ("/api/activations", {"model": "nope"}, 404, "no model named 'nope'"),
    ("/api/neighbours", {"model": "nope"}, 404, "no model named 'nope'"),
    ("/api/neighbours", {"k": "0"}, 400, f"k must be a whole number from 1 to {MAX_NEIGHBOURS}, not '0'"),
    ("/api/neighbours", {"k": str(MAX_NEIGHBOURS + 1)}, 400, "k must be a whole number"),
    ("/api/neighbours", {"k": "2.5"}, 400, "k must be a whole number"),
]


# ---------------------------------------------------------------------------------------------- /api/activations


def test_activations_show_a_cnns_maps_and_an_mlps_units_and_weights(client, models):
    view = view_of(SEVEN)
    for loaded, name in zip(models, ("bundled", "seed-b-small")):
        body = ActivationsResponse.model_validate(post(client, "/api/activations", model=name).json())
        core = layer_views(loaded, view)
        assert [(layer.name, layer.kind) for layer in body.layers] == [(v.name, v.kind) for v in core]
        for layer, want in zip(body.layers, core):
            assert layer.shape == list(want.values.shape) and layer.member == want.member
            assert layer.maximum == pytest.approx(float(want.values.max()), rel=1e-5)
            assert layer.top_units == want.top_units and layer.channels == want.channels
            if layer.kind == "maps":
                tiles = np.stack([decoded(t) for t in layer.tiles]).astype(float) / 255
                assert tiles.shape == tuple(want.values.shape)
                low = min(float(want.values.min()), 0.0)
                expected = (want.values.numpy() - low) / (float(want.values.max()) - low)
                assert tiles == pytest.approx(expected, abs=1 / 255)
                assert layer.values is None and layer.unit_weights is None
            else:
                assert layer.values == pytest.approx(want.values.tolist(), rel=1e-5, abs=1e-6)
                assert layer.tiles is None
                assert (layer.unit_weights is None) == (want.unit_weights is None)
        kinds = {layer.kind for layer in body.layers}
        if name == "bundled":
            assert "maps" in kinds and body.layers[0].member == 0  # an ensemble shows its first member
        else:
            first = body.layers[0]
            assert kinds == {"units"} and first.unit_weights is not None
            assert len(first.unit_weights) == len(first.top_units) == 16
            assert all(decoded(w).shape == (28, 28, 4) for w in first.unit_weights)


# ---------------------------------------------------------------------------------------------- /api/neighbours


def test_neighbours_are_the_nearest_training_images_with_their_labels(client, train_files):
    _, images, labels = train_files
    body = NeighboursResponse.model_validate(post(client, "/api/neighbours", model="bundled").json())
    assert len(body.neighbours) == 5
    distances = [n.distance for n in body.neighbours]
    assert distances == sorted(distances) and all(0 <= d <= 2 for d in distances)
    for n in body.neighbours:
        assert np.array_equal(decoded(n.image), images[n.index]) and n.label == labels[n.index]
        assert n.class_ == str(n.label)
    assert [n.label for n in body.neighbours].count(7) >= 3  # a drawn 7 resembles training 7s
    more = NeighboursResponse.model_validate(post(client, "/api/neighbours", model="bundled", k="12").json())
    assert len(more.neighbours) == 12 and more.neighbours[:5] == body.neighbours
    # A training image finds itself first.
    itself = post(client, "/api/neighbours", png_bytes(Image.fromarray(images[7])), model="bundled", k="1").json()
    assert itself["neighbours"][0]["index"] == 7 and itself["neighbours"][0]["distance"] < 1e-3


def test_without_its_training_data_the_index_is_refused_in_one_line_then_built_once_it_is_there(
    server, client, train_files, tmp_path, monkeypatch
):
    empty = tmp_path / "no-data"
    empty.mkdir()
    monkeypatch.setenv("MNISTLAB_DATA", str(empty))
    response = post(client, "/api/neighbours", model="seed-b-small")
    assert response.status_code == 503
    detail = Refusal.model_validate(response.json()).detail
    assert "mnist files not found in" in detail and str(empty) in detail and "downloads nothing" in detail
    assert "\n" not in detail and list(empty.iterdir()) == []  # nothing downloaded

    monkeypatch.setenv("MNISTLAB_DATA", str(train_files[0]))
    monkeypatch.setattr(routes, "BUILD_WAIT_S", 0)  # as if the build took longer than a request waits
    building = post(client, "/api/neighbours", model="seed-b-small")
    assert building.status_code == 503 and building.headers["Retry-After"] == str(routes.RETRY_S)
    assert "the nearest-neighbour index of seed-b-small is being built" in building.json()["detail"]
    monkeypatch.undo()  # the data stays where it is: MNISTLAB_DATA is the module's small folder again

    async def together() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            files = {"image": ("d.png", SEVEN, "image/png")}
            return await asyncio.gather(
                *(c.post("/api/neighbours", files=files, data={"model": "seed-b-small"}) for _ in range(3))
            )

    answers = [r.json() for r in asyncio.run(together())]  # all wait for the one build begun above
    assert answers[0]["neighbours"] and answers == [answers[0]] * 3
    indexes = server.app.state.explaining.indexes
    assert indexes["seed-b-small"].done() and len(indexes["seed-b-small"].result()) == 1000


@pytest.mark.parametrize(("path", "fields", "status", "phrase"), BAD_FIELDS)
def test_bad_fields_are_refused_in_one_line(client, path, fields, status, phrase):
    response = post(client, path, **fields)
    assert response.status_code == status, response.text
    detail = Refusal.model_validate(response.json()).detail
    assert phrase in detail and "\n" not in detail


@pytest.mark.parametrize("path", ["/api/explain", "/api/activations", "/api/neighbours"])
def test_images_the_preprocessing_refuses_are_refused_as_predict_refuses_them(client, path):
    for data, status, phrase in [
        (png_bytes(drawing([])), 422, "blank"),
        (b"not an image at all", 415, "not an image"),
        (b"", 400, "empty"),
    ]:
        response = post(client, path, data)
        assert response.status_code == status, (path, response.text)
        assert phrase in response.json()["detail"] and response.json() == post(client, "/api/predict", data).json()
    assert client.post(path, json={}).status_code == 400  # no image


def test_explanations_never_hold_up_predictions(server, client):
    """Explanations queue on their own thread: predictions sent while three of them run (about a second each)
    are all answered before they end, each as it would be alone."""
    alone = post(client, "/api/predict").json()

    async def both() -> tuple[list[dict], list[dict]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            files = {"image": ("d.png", SEVEN, "image/png")}
            slow = [asyncio.create_task(c.post("/api/explain", files=files, data={"target": str(d)})) for d in range(3)]
            await asyncio.sleep(0)
            predictions = []
            for _ in range(10):
                predictions.append((await c.post("/api/predict", files=files)).json())
                assert not all(task.done() for task in slow)  # the explanations are still running
            return predictions, [(await task).json() for task in slow]

    predictions, explanations = asyncio.run(both())
    assert all(p == alone for p in predictions)
    assert [e["attributions"][1]["target"] for e in explanations] == [0, 1, 2]


def test_openapi_documents_the_explanation_endpoints_with_their_models(client):
    spec = client.get("/openapi.json").json()
    components = spec["components"]["schemas"]
    for path, request, answer in [
        ("/api/explain", "Explain", ExplainResponse),
        ("/api/activations", "Inside", ActivationsResponse),
        ("/api/neighbours", "Neighbours", NeighboursResponse),
    ]:
        operation = spec["paths"][path]["post"]
        body = operation["requestBody"]["content"]
        assert body["application/json"]["schema"] == {"$ref": REF.format(model=f"{request}Request")}
        assert body["multipart/form-data"]["schema"] == {"$ref": REF.format(model=f"{request}Upload")}
        assert components[f"{request}Upload"]["required"] == ["image"]
        ok = operation["responses"]["200"]["content"]["application/json"]["schema"]
        assert ok == {"$ref": REF.format(model=answer.__name__)}
        for status in ("400", "404", "415", "422"):
            refusal = operation["responses"][status]["content"]["application/json"]["schema"]
            assert refusal == {"$ref": REF.format(model="Refusal")}
        generated = answer.model_json_schema(mode="serialization", ref_template=REF)
        for name, schema in {answer.__name__: generated, **generated.pop("$defs", {})}.items():
            assert components[name] == schema, name
    methods = components["ExplainRequest"]["properties"]["method"]["description"]
    assert all(m in methods for m in METHODS)
    assert "/api/neighbours" in client.get("/metrics").text  # counted per route like every other


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, (28, 28), elements=st.floats(-1e3, 1e3, width=32)))
def test_an_overlay_is_red_for_blue_against_and_clear_where_faint(values):
    scale = float(np.abs(values).max())
    overlay = decoded(signed_png(values, scale))
    strength = np.abs(values) / (scale or 1)
    assert (overlay[..., 3][strength < FAINT] == 0).all()
    shown = overlay[..., 3] > 0
    assert np.array_equal((overlay[..., 0] > overlay[..., 2])[shown], (values > 0)[shown])
    if scale > 0:
        assert overlay[..., 3].max() == 255  # the strongest pixel in full colour


def test_a_stopped_server_leaves_no_explaining_thread_behind(models):
    import threading

    before = set(threading.enumerate())  # the module's own server has its explaining thread too
    server = AppServer(create_app(models[:1], device="cpu", workers=0, engine="torch"))
    try:
        answered = httpx.post(f"{server.url}/api/explain", files={"image": ("7.png", SEVEN, "image/png")}, timeout=60)
        assert answered.status_code == 200
        explaining = [t for t in threading.enumerate() if t not in before and t.name.startswith("explain")]
        assert explaining
    finally:
        server.stop()
    for thread in explaining:
        thread.join(10)  # its work done and its executor shut, it ends
    assert not [t.name for t in explaining if t.is_alive()]
