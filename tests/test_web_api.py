"""The web app's JSON API over real HTTP: a real uvicorn server on a free loopback port, serving the bundled model
and a small model trained here; good requests answered as `mnistlab predict` would, every kind of bad request
refused with a one-line JSON 4xx, and the server still serving afterwards."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="the web extra is not installed (pip install 'mnistlab[web]')")
import httpx
from hypothesis import given, settings
from hypothesis import strategies as st

from mnistlab.data.preprocess import preprocess
from mnistlab.data.splits import to_float
from mnistlab.infer.evaluate import evaluate_images
from mnistlab.infer.predict import classify
from mnistlab.models.calibration import calibration
from mnistlab.models.files import bundled_model_path, load_model
from mnistlab.serve import MAX_BODY, create_app, is_loopback
from mnistlab.serve.engines import load_served
from mnistlab.serve.schemas import REF, HealthResponse, ModelsResponse, PredictResponse, Refusal

from .support.cli import assert_user_error, mnistlab
from .support.digit_images import blank_png
from .support.drawings import STROKES, drawing, drawn_png, png_bytes
from .support.servers import AppServer, child_pids, command_line, process_gone


@pytest.fixture(scope="module")
def models(small_run):
    return [load_model(None), load_model(small_run)]


@pytest.fixture(scope="module")
def collect_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("collected")


@pytest.fixture(scope="module")
def server(models, collect_dir):
    # Uploads prepared in two processes of their own, as `mnistlab serve` does on a 2-core machine.
    running = AppServer(create_app(models, collect_dir=collect_dir, device="cpu", workers=2))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def post_image(client: httpx.Client, data: bytes, path: str = "/api/predict", **fields) -> httpx.Response:
    return client.post(path, files={"image": ("drawing.png", data, "image/png")}, data=fields)


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


# ---------------------------------------------------------------------------------------------- good requests


def test_health_models_page_and_openapi(client, small_run, small_mnist):
    assert client.get("/api/health").json()["status"] == "ok"
    info = client.get("/api/models").json()
    assert info["collect"] is True
    bundled, small = info["models"]
    assert (bundled["name"], small["name"]) == ("bundled", "seed-b-small")
    assert bundled["architecture"] == "3 x CNN conv16 conv32 pool conv64 pool fc128 fc10 (bn, relu)"
    recorded = json.loads(bundled_model_path().with_suffix(".json").read_text())["metadata"]  # the packaged file's
    assert bundled["test_accuracy"] == recorded["test_accuracy"]
    assert bundled["members_test_accuracy"] == list(recorded["members"].values()) and len(recorded["members"]) == 3
    # Each model's test ECE as its file records it (`mnistlab ensemble` and training measure it): that of its
    # calibrated answers on its test split (the run's: the first 2,000 test digits).
    assert bundled["test_ece"] == recorded["test_ece"] < 0.01
    small_ece = json.loads((small_run / "model.json").read_text())["metadata"]["test_ece"]
    assert small["test_ece"] == small_ece
    with torch.inference_mode():
        probs = load_model(small_run).answering()(to_float(small_mnist.test.images))[0]
    assert small_ece == pytest.approx(calibration(probs, small_mnist.test.labels).ece, abs=1e-4)
    assert bundled["calibrated"] and bundled["temperature"] is None  # each member has its own
    assert small["calibrated"] and small["temperature"] == load_model(small_run).temperature
    assert small["architecture"] == "MLP 784-512-10 relu"
    assert small["test_accuracy"] == json.loads((small_run / "model.json").read_text())["metadata"]["test_accuracy"]
    assert bundled["classes"] == [str(d) for d in range(10)]
    assert bundled["engine"] == small["engine"] == "onnxruntime"  # "auto" with onnxruntime installed

    page = client.get("/")
    assert page.status_code == 200 and "<canvas" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("app.js", "style.css"):
        assert client.get(f"/static/{asset}").status_code == 200
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/api/predict"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"}
    docs = client.get("/docs")
    assert docs.status_code == 200 and "http" not in docs.text.split("<body>")[0]  # nothing from a CDN
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert client.get(f"/swagger/{asset}").status_code == 200 and f"/swagger/{asset}" in docs.text


def test_openapi_has_the_schemas_of_the_requests_and_of_the_real_answers(client):
    """`/openapi.json` is generated from the Pydantic models of `serve.schemas`, and real answers match them
    (the models forbid fields they do not list)."""
    spec = client.get("/openapi.json").json()
    components = spec["components"]["schemas"]
    body = spec["paths"]["/api/predict"]["post"]["requestBody"]["content"]
    assert body["application/json"]["schema"] == {"$ref": REF.format(model="PredictRequest")}
    assert body["multipart/form-data"]["schema"] == {"$ref": REF.format(model="PredictUpload")}
    assert components["PredictRequest"]["required"] == components["PredictUpload"]["required"] == ["image"]
    assert components["PredictUpload"]["properties"]["image"]["format"] == "binary"
    fields = {"model", "label", "class", "confidence", "probabilities", "outlier", "outlier_score"}
    assert set(components["Prediction"]["properties"]) == fields
    answers = [
        ("/api/predict", "post", post_image(client, drawn_png("7")), PredictResponse),
        ("/api/models", "get", client.get("/api/models"), ModelsResponse),
        ("/api/health", "get", client.get("/api/health"), HealthResponse),
        ("/api/predict", "post", client.post("/api/predict", json={}), Refusal),
    ]
    for path, method, response, model in answers:
        code = str(response.status_code)
        published = spec["paths"][path][method]["responses"][code]["content"]["application/json"]["schema"]
        assert published == {"$ref": REF.format(model=model.__name__)}, (path, code)
        generated = model.model_json_schema(mode="serialization", ref_template=REF)
        nested = generated.pop("$defs", {})
        for name, schema in {model.__name__: generated, **nested}.items():
            assert components[name] == schema, name
        model.model_validate(response.json())
    assert PredictResponse.model_validate(answers[0][2].json()).predictions[0].label == 7


@pytest.mark.parametrize("digit", sorted(STROKES))
def test_predict_answers_as_the_predict_path_does(client, models, digit):
    png = drawn_png(digit)
    answer = post_image(client, png).json()
    assert answer == client.post("/api/predict", json={"image": data_url(png)}).json()  # both ways in, same out

    pre = preprocess(Image.open(io.BytesIO(png)))  # the one preprocessing path, called directly
    seen = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["preprocessed"]))))
    assert seen.shape == (28, 28) and np.array_equal(seen, np.round(pre.digit * 255).astype(np.uint8))
    for model, prediction in zip(models, answer["predictions"]):
        expected, scores = (answers[0] for answers in classify(model, [pre.tensor]))
        assert prediction["probabilities"] == pytest.approx(expected.tolist(), abs=1e-5)
        assert prediction["outlier_score"] == pytest.approx(float(scores), rel=1e-3)
        assert prediction["label"] == int(expected.argmax()) and prediction["class"] == str(prediction["label"])
        assert prediction["confidence"] == max(prediction["probabilities"])
    assert [p["model"] for p in answer["predictions"]] == ["bundled", "seed-b-small"]
    assert answer["predictions"][0]["label"] == int(digit)


def test_concurrent_requests_share_forward_passes_and_keep_their_answers(server, client, mnist_data):
    """Many requests at once: the micro-batcher runs them together, and each still gets its own image's answer."""
    images = mnist_data.test.images[:24].numpy()
    pngs = [png_bytes(Image.fromarray(d)) for d in images]
    expected = [post_image(client, png).json() for png in pngs]  # one at a time
    before = client.get("/api/health").json()

    async def burst() -> list[dict]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            sent = [c.post("/api/predict", files={"image": ("d.png", png, "image/png")}) for png in pngs * 2]
            return [r.json() for r in await asyncio.gather(*sent)]

    answers = asyncio.run(burst())
    after = client.get("/api/health").json()
    for got, want in zip(answers, expected * 2):
        for g, w in zip(got["predictions"], want["predictions"]):
            assert g["probabilities"] == pytest.approx(w["probabilities"], abs=1e-5)
    assert len(answers) == 48
    assert after["images"] - before["images"] == 48
    assert after["forward_passes"] - before["forward_passes"] < 48  # batched, at least once


@pytest.mark.slow  # 4 s on 2 busy cores
def test_onnxruntime_serves_the_probabilities_pytorch_computes(models, mnist_data):
    """The two engines on 500 real test digits: probabilities within 1e-5 and the same class for every one."""
    images = mnist_data.test.images[:500].float() / 255
    by_onnx, by_torch = load_served(models, "cpu", "onnxruntime"), load_served(models, "cpu", "torch")
    for onnx, reference in zip(by_onnx, by_torch):
        assert (onnx.engine, reference.engine) == ("onnxruntime", "torch")
        (got, _), (want, _) = onnx.answers(images), reference.answers(images)  # scores: test_serve_outliers.py
        assert got.shape == (500, 10) and torch.allclose(got, want, atol=1e-5)
        assert torch.equal(got.argmax(1), want.argmax(1))


def test_a_killed_preprocessing_process_costs_no_request(server, client):
    """A worker that dies (as one would if a decoder crashed on a hostile file) takes its pool with it; the
    next request gets a new pool and its answer."""
    preparers = server.app.server_state.preparers
    killed = preparers.worker_pids()
    assert len(killed) == 2
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    while not all(map(process_gone, killed)):
        time.sleep(0.01)
    answer = post_image(client, drawn_png("7"))
    assert answer.status_code == 200 and answer.json()["predictions"][0]["label"] == 7
    assert preparers.worker_pids() and set(preparers.worker_pids()).isdisjoint(killed)
    assert post_image(client, drawn_png("1")).json()["predictions"][0]["label"] == 1


def test_collect_saves_server_named_pngs_that_evaluate_images_reads(client, collect_dir):
    names = []
    for digit in ("1", "7", "0"):
        # The client's file name is ignored: nothing it sends becomes part of a path.
        files = {"image": ("../../escape.png", drawn_png(digit), "image/png")}
        response = client.post("/api/collect", files=files, data={"label": digit})
        assert response.status_code == 200, response.text
        saved = response.json()["saved"]
        assert re.fullmatch(rf"{digit}/\d{{8}}-\d{{6}}-[0-9a-f]{{8}}\.png", saved)
        names.append(saved)
    response = client.post("/api/collect", json={"image": data_url(drawn_png("7")), "label": 7})
    assert response.status_code == 200 and response.json()["count"] == 2
    files = sorted(str(p.relative_to(collect_dir)) for p in collect_dir.rglob("*") if p.is_file())
    assert len(files) == 4 and set(names) <= set(files)
    assert not list(collect_dir.parent.glob("escape*"))

    found = evaluate_images(collect_dir, device="cpu")
    assert found.count == 4 and found.skipped == [] and found.evaluation.accuracy == 1.0


def test_collect_is_off_without_a_folder(models):
    running = AppServer(create_app(models[:1], device="cpu"))
    try:
        response = httpx.post(f"{running.url}/api/collect", files={"image": ("d.png", drawn_png("7"))})
        assert response.status_code == 404 and "--collect" in response.json()["detail"]
        assert httpx.get(f"{running.url}/api/models").json()["collect"] is False
    finally:
        running.stop()


# ---------------------------------------------------------------------------------------------- bad requests


def raw_http(server: AppServer, head: bytes, chunks: list[bytes] = (), wait: float = 10) -> tuple[int, dict]:
    """Send a request by hand (headers, then body pieces, stopping when the server hangs up) and read the
    response: for requests httpx will not make, such as a body that does not match its Content-Length."""
    with socket.create_connection((server.host, server.port), timeout=wait) as sock:
        sock.sendall(head)
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except OSError:  # the server refused and closed the connection before the body was all sent
            pass
        response = b""
        while b"\r\n\r\n" not in response or len(response.split(b"\r\n\r\n", 1)[1]) < _length(response):
            piece = sock.recv(65536)
            if not piece:
                break
            response += piece
    status = int(response.split(b" ", 2)[1])
    return status, json.loads(response.split(b"\r\n\r\n", 1)[1])


def _length(response: bytes) -> int:
    found = re.search(rb"(?i)content-length: *(\d+)", response)
    return int(found.group(1)) if found else 0


def multipart_head(server: AppServer, length: int | None) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (
        f"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
        f"Content-Type: multipart/form-data; boundary=b\r\n{framing}\r\n\r\n"
    ).encode()


def test_body_over_the_limit_is_refused_from_its_content_length_before_it_is_sent(server):
    # 250 MB announced, not a byte of it sent: an answer at all shows the refusal came from the header (a
    # server waiting for the body would leave raw_http's read to time out).
    status, body = raw_http(server, multipart_head(server, 50 * MAX_BODY))
    assert status == 413 and "5 MB limit" in body["detail"]


def test_chunked_body_over_the_limit_is_refused_while_it_streams(server):
    piece = b"x" * 65536
    chunks = [b"%x\r\n%s\r\n" % (len(piece), piece)] * (MAX_BODY // len(piece) + 8) + [b"0\r\n\r\n"]
    status, body = raw_http(server, multipart_head(server, None), chunks)
    assert status == 413 and "5 MB limit" in body["detail"]


def bad_requests(tmp: Path) -> list[tuple[str, dict, int, str]]:
    """(what, httpx request arguments, status, a phrase of the message) for each kind of bad request."""
    png = drawn_png("7")
    blank = png_bytes(drawing([]))

    def upload(data: bytes, field: str = "image") -> dict:
        return {"files": {field: ("upload.png", data, "image/png")}}

    return [
        ("file over 5 MB", upload(b"\x89PNG" + bytes(MAX_BODY)), 413, "5 MB limit"),
        (
            "image over the pixel limit",
            upload(blank_png(tmp / "bomb.png", 20000, 20000).read_bytes()),
            413,
            "too large",
        ),
        ("not an image", upload(b"hello, I am a text file\n" * 10), 415, "not an image"),
        ("truncated PNG", upload(png[: len(png) // 2]), 422, "truncated"),
        ("empty file", upload(b""), 400, "empty image"),
        ("empty body", {"headers": {"Content-Type": "application/json"}}, 400, "empty request body"),
        ("wrong field name", upload(png, field="file"), 400, 'no field "image"'),
        ("a form without files", {"data": {"image": "not a file"}}, 415, "content type"),
        ("image field as text", {"files": {"x": ("x.txt", b"x")}, "data": {"image": "text"}}, 400, "text, not a file"),
        (
            "broken multipart",
            {"content": b"--b\r\nnonsense", "headers": {"Content-Type": "multipart/form-data"}},
            400,
            "multipart",
        ),
        ("invalid JSON", {"content": b"{image:", "headers": {"Content-Type": "application/json"}}, 400, "valid JSON"),
        (
            "JSON nested too deep",
            {"content": b"[" * 100_000, "headers": {"Content-Type": "application/json"}},
            400,
            "valid JSON",
        ),
        ("JSON without image", {"json": {"picture": data_url(png)}}, 400, 'no "image" key'),
        ("JSON image not a string", {"json": {"image": [1, 2, 3]}}, 400, "data URL string"),
        ("not a data URL", {"json": {"image": base64.b64encode(png).decode()}}, 400, "malformed data URL"),
        ("data URL without base64", {"json": {"image": "data:image/png,abc"}}, 400, "malformed data URL"),
        ("malformed base64", {"json": {"image": "data:image/png;base64,iVBOR$w0K"}}, 400, "malformed base64"),
        ("data URL of text", {"json": {"image": "data:text/plain;base64,aGk="}}, 415, "not an image"),
        ("unsupported content type", {"content": png, "headers": {"Content-Type": "image/png"}}, 415, "content type"),
        ("blank canvas", upload(blank), 422, "blank"),
    ]


def test_every_bad_request_gets_a_one_line_4xx_and_the_server_keeps_serving(client, tmp_path):
    for what, request, status, phrase in bad_requests(tmp_path):
        response = client.post("/api/predict", **request)
        assert response.status_code == status, (what, response.text)
        detail = response.json()["detail"]
        assert isinstance(detail, str) and "\n" not in detail and phrase in detail, (what, detail)
    for label, status in (("", 400), ("../../x", 400), ("10", 400), ("-1", 400)):
        response = post_image(client, drawn_png("7"), "/api/collect", label=label)
        assert response.status_code == status and "label must be" in response.json()["detail"], label
    assert client.get("/api/predict").status_code == 405
    assert client.get("/api/health").json()["status"] == "ok"
    assert post_image(client, drawn_png("7")).json()["predictions"][0]["label"] == 7


valid_png = drawn_png("1")
fuzzed_images = st.one_of(
    st.binary(max_size=2000),
    st.integers(0, len(valid_png)).map(lambda n: valid_png[:n]),
    st.tuples(st.integers(0, len(valid_png) - 1), st.integers(0, 255)).map(
        lambda c: valid_png[: c[0]] + bytes([c[1]]) + valid_png[c[0] + 1 :]
    ),
)


@settings(max_examples=80, deadline=None)
@given(image=fuzzed_images, as_json=st.booleans(), media=st.sampled_from(["image/png", "", "text/plain"]))
def test_fuzzed_images_never_get_a_server_error(client, image, as_json, media):
    if as_json:
        response = client.post(
            "/api/predict", json={"image": f"data:{media};base64," + base64.b64encode(image).decode()}
        )
    else:
        response = client.post("/api/predict", files={"image": ("f", image, media or "application/octet-stream")})
    assert response.status_code in (200, 400, 413, 415, 422), response.text
    if response.status_code != 200:
        assert "\n" not in response.json()["detail"]


@settings(max_examples=40, deadline=None)
@given(body=st.binary(max_size=500), media=st.sampled_from(["multipart/form-data; boundary=b", "application/json"]))
def test_fuzzed_bodies_never_get_a_server_error(client, body, media):
    response = client.post("/api/predict", content=body, headers={"Content-Type": media})
    assert response.status_code in (400, 413, 415, 422), response.text


# ---------------------------------------------------------------------------------------------- the command


def test_serve_reports_a_taken_port_in_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert_user_error(mnistlab("serve", "--port", str(taken.getsockname()[1])), "cannot listen", "--port")


@pytest.mark.slow  # 4 s on 2 busy cores: servers started and stopped
def test_serve_leaves_no_preprocessing_process_behind_when_killed_or_stopped():
    for how in (signal.SIGKILL, signal.SIGINT):
        server = subprocess.Popen(
            [sys.executable, "-m", "mnistlab", "serve", "--port", "0", "--workers", "2", "--engine", "torch"],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert "serving 1 model(s) with torch at http://127.0.0.1:" in server.stdout.readline()
            workers = [p for p in child_pids(server.pid) if "multiprocessing.spawn" in command_line(p)]
            assert len(workers) == 2
        finally:
            server.send_signal(how)
            server.wait(30)
        deadline = time.monotonic() + 10
        while not all(map(process_gone, workers)):
            assert time.monotonic() < deadline, f"preprocessing processes outlived the server ({how.name})"
            time.sleep(0.05)


def test_preprocessing_processes_need_neither_torch_nor_the_web_stack():
    """What a worker imports to prepare an upload: numpy and Pillow, not torch or FastAPI (45 MB against 235)."""
    script = "import sys, mnistlab.serve.workers; print(sorted({'torch', 'fastapi'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_serve_refuses_a_negative_worker_count_in_one_line():
    assert_user_error(mnistlab("serve", "--workers", "-1", "--port", "0"), "--workers must be 0 or more")


def test_only_loopback_addresses_count_as_private():
    assert all(map(is_loopback, ["127.0.0.1", "127.1.2.3", "::1", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.168.1.10", "example.org"]))
