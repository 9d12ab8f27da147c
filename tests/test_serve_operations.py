"""What an operator watches (issue 25 §4), against real servers on loopback with real clients: GET /metrics
scraped and parsed with prometheus_client's own parser, counts going up by exactly what was sent; the JSON
request log of `mnistlab serve --log-format json`; the soak benchmark on a few hundred requests."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the web extra is not installed (pip install 'mnistlab[web]')")
import requests
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from mnistlab.errors import MnistlabError
from mnistlab.serve import create_app
from mnistlab.serve.metrics import Routes
from mnistlab.serve.settings import ServeSettings

from .support.digit_images import on_paper
from .support.drawings import drawn_png
from .support.server_cases import send
from .support.servers import AppServer, Served, mnistlab_serve

ROOT = Path(__file__).resolve().parents[1]
PREDICT = "/api/predict"
Samples = dict[tuple[str, frozenset], float]


def scrape(url: str) -> Samples:
    """Every sample of GET /metrics, parsed by prometheus_client: {(name, labels): value}."""
    answer = requests.get(url + "metrics", timeout=30)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain"), answer.text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def requests_total(samples: Samples, route: str, method: str, status: int) -> float:
    return value(samples, "mnistlab_http_requests_total", route=route, method=method, status=str(status))


def photo_jpeg(digit) -> bytes:
    """An MNIST test digit written on tinted, noisy paper, as a phone's JPEG."""
    buffer = io.BytesIO()
    on_paper(digit).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def declared_too_long(url: str) -> int:
    """A POST that declares a 6 MB body and sends none: the server answers from Content-Length alone."""
    host, port = url.split("/")[2].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.putrequest("POST", PREDICT)
        connection.putheader("Content-Type", "image/png")
        connection.putheader("Content-Length", str(6 * 2**20))
        connection.endheaders()
        return connection.getresponse().status
    finally:
        connection.close()


@dataclass
class Traffic:
    """What the module's requests did: /metrics before and after them, and the server's stderr lines for them."""

    before: Samples
    after: Samples
    sent: list[tuple[str, int, int]]  # (route, status, request body bytes) per request, in order
    log: list[str]


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Served, queue.Queue]]:
    """A real `mnistlab serve --log-format json` with one preprocessing process; its stderr lines in a queue."""
    with mnistlab_serve("--workers", "1", "--device", "cpu", "--log-format", "json") as server:
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in server.process.stderr], daemon=True).start()
        yield server, lines


@pytest.fixture(scope="module")
def traffic(served, digits) -> Traffic:
    """Predictions of canvas drawings and a photo, and bad requests, each with the status it must get."""
    server, lines = served
    url, before = server.url, scrape(server.url)
    sent: list[tuple[str, int, int]] = []
    with requests.Session() as session:

        def post(status: int, **kwargs) -> None:
            answer = session.post(url + PREDICT.lstrip("/"), timeout=30, **kwargs)
            assert answer.status_code == status, answer.text
            sent.append((PREDICT, status, len(answer.request.body or b"")))

        for digit in "170":
            post(200, files={"image": ("drawing.png", drawn_png(digit), "image/png")})
        photo = "data:image/jpeg;base64," + base64.b64encode(photo_jpeg(digits[0])).decode()
        post(200, json={"image": photo})
        post(415, data=b"not an image", headers={"Content-Type": "text/plain"})
        post(400, data=b"", headers={"Content-Type": "application/json"})
        assert session.get(url + "no/such/page-1234", timeout=30).status_code == 404
        sent.append(("unmatched", 404, 0))
    assert declared_too_long(url) == 413
    sent.append((PREDICT, 413, 0))
    host, port = url.split("/")[2].split(":")
    # answered by the HTTP layer, never by the app: counted apart, not logged
    assert send(host, int(port), b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n").status == 414
    assert send(host, int(port), b"\x16\x03\x01\x02\x00 a TLS hello\r\n\r\n").status == 400
    after = scrape(url)
    sent = [("/metrics", 200, 0), *sent, ("/metrics", 200, 0)]  # each scrape is a request too
    log = [lines.get(timeout=30) for _ in sent]
    return Traffic(before, after, sent, log)


@pytest.mark.slow  # starts a real server
def test_metrics_count_exactly_what_was_sent(traffic):
    """Requests by route template and status, their latency, and predictions by model went up by exactly what
    the module sent; the raw URL of the 404 is in no label."""

    def delta(route: str, method: str, status: int) -> float:
        return requests_total(traffic.after, route, method, status) - requests_total(
            traffic.before, route, method, status
        )

    assert delta(PREDICT, "POST", 200) == 4
    assert delta(PREDICT, "POST", 415) == delta(PREDICT, "POST", 400) == delta(PREDICT, "POST", 413) == 1
    assert delta("unmatched", "GET", 404) == 1
    assert delta("/metrics", "GET", 200) == 1  # the first scrape (the second counts itself after answering)
    count = "mnistlab_http_request_duration_seconds_count"
    latencies = value(traffic.after, count, route=PREDICT, method="POST") - value(
        traffic.before, count, route=PREDICT, method="POST"
    )
    assert latencies == 7
    predictions = "mnistlab_predictions_total"
    assert value(traffic.after, predictions, model="bundled") - value(traffic.before, predictions, model="bundled") == 4
    assert value(traffic.after, "mnistlab_prediction_queue_depth") == 0  # nothing waits between requests
    assert value(traffic.after, "mnistlab_preprocessing_restarts_total") == 0
    assert value(traffic.after, "process_open_fds") > 0  # the server process's own figures are there too
    assert not any("page-1234" in v for _, labels in traffic.after for _, v in labels)
    refused = {
        status: value(traffic.after, "mnistlab_http_refused_total", status=status)
        - value(traffic.before, "mnistlab_http_refused_total", status=status)
        for status in ("400", "408", "414", "431")
    }
    assert refused == {"400": 1, "408": 0, "414": 1, "431": 0}
    assert all(("mnistlab_http_refused_total", frozenset({("status", s)})) in traffic.before for s in refused)


@pytest.mark.slow  # starts a real server
def test_json_log_has_one_line_per_request(traffic):
    """`--log-format json`: one JSON object a line per request, with its route, status, latency, models that
    answered and body bytes; never the image."""
    records = [json.loads(line) for line in traffic.log]
    assert [(r["route"], r["status"]) for r in records] == [(route, status) for route, status, _ in traffic.sent]
    for record, (route, status, body) in zip(records, traffic.sent):
        assert set(record) == {"time", "client", "method", "path", "route", "status", "latency_ms", "models"} | {
            "bytes_in",
            "bytes_out",
        }
        assert record["time"].endswith("Z") and record["client"] == "127.0.0.1"
        assert record["latency_ms"] >= 0 and record["bytes_out"] > 0
        assert record["bytes_in"] == body  # the 413 was refused from its Content-Length: no byte read
        assert record["models"] == (1 if status == 200 and route == PREDICT else 0)
    assert not any("base64" in line or "iVBOR" in line for line in traffic.log)  # no image, not even its start


@pytest.fixture(scope="module")
def apps():
    """Two apps in this process, each serving the bundled model (PyTorch, no preprocessing processes)."""
    return [create_app([None], device="cpu", workers=0, engine="torch") for _ in range(2)]


@pytest.mark.slow  # two apps, each loading the bundled model
def test_each_app_counts_its_own_and_default_logs_stay_quiet(apps, capfd):
    """Two apps in one process keep apart counts (each its own registry); without --log-format json no request
    is logged."""
    servers = [AppServer(app) for app in apps]
    try:
        capfd.readouterr()
        for server, n in zip(servers, (2, 1)):
            for _ in range(n):
                answer = requests.post(
                    server.url + PREDICT, files={"image": ("d.png", drawn_png("1"), "image/png")}, timeout=30
                )
                assert answer.status_code == 200, answer.text
        counts = [requests_total(scrape(server.url + "/"), PREDICT, "POST", 200) for server in servers]
        assert counts == [2, 1]
        out, err = capfd.readouterr()
        assert PREDICT not in out + err
    finally:
        for server in servers:
            server.stop()
    assert ServeSettings().log_format == "human"


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"log_format": "xml"}, "log_format"),
        ({"header_timeout": -1.0}, "header_timeout"),
        ({"max_queue": float("nan")}, "max_queue"),
    ],
)
def test_settings_refuse_what_no_server_runs_with(change, named):
    """A notebook's ServeSettings are checked as the CLI's flags are: one line naming the setting."""
    with pytest.raises(MnistlabError, match=named):
        ServeSettings(**change)


@pytest.mark.slow  # loads the bundled model
@settings(max_examples=300, deadline=None)
@given(path=st.text(min_size=0, max_size=60).map(lambda text: "/" + text))
def test_route_labels_are_bounded(apps, path):
    """Whatever path a client asks for, its label is one of the app's route templates or "unmatched", and a
    path is a label only when it is exactly a route's (no client text becomes a series of its own)."""
    routes = Routes(apps[0])
    for method in ("GET", "POST"):
        label = routes.template({"type": "http", "method": method, "path": path, "root_path": ""})
        assert label in routes.paths | set(routes.mounts) | {"unmatched"}
        assert label == "unmatched" or label == path or path.startswith(label + "/")


@pytest.mark.slow  # kills a preprocessing process of a real server
def test_restarted_preprocessing_process_is_counted(served):
    """A preprocessing process killed outright: the server still answers, and /metrics counts one restart."""
    server, _ = served
    restarts = "mnistlab_preprocessing_restarts_total"
    before = value(scrape(server.url), restarts)
    children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children").read_text().split()
    workers = [int(pid) for pid in children if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]
    assert len(workers) >= 1, children
    os.kill(workers[0], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:  # the server may answer the first request from the old pool's other processes
        answer = requests.post(
            server.url + PREDICT.lstrip("/"), files={"image": ("d.png", drawn_png("7"), "image/png")}, timeout=30
        )
        assert answer.status_code in (200, 503), answer.text
        if value(scrape(server.url), restarts) > before or time.monotonic() > deadline:
            break
    assert value(scrape(server.url), restarts) == before + 1


@pytest.mark.slow  # the soak benchmark on 300 requests: a real server and three client threads
def test_soak_benchmark_runs(tmp_path):
    """benchmarks/soak.py with --requests 300 runs through and reports its figures (written to a copy)."""
    doc = tmp_path / "serving.md"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--requests", "300", "--doc", str(doc)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["requests"] == 300 and figures["unexpected"] == 0, figures
    assert figures["fds_start"] > 0 and figures["rss_warm_mb"] > 0
    assert "<!-- begin soak -->" in doc.read_text()
