"""The lab's API (serve/lab.py, serve/routers/lab.py) against a real `mnistlab serve` training real MNIST: runs
started, watched over Server-Sent Events, queued one at a time, stopped and resumed, killed (the training, and
the server), joining the served models; every refusal; lr-find."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from .support.cli import assert_user_error, mnistlab
from .support.drawings import drawn_png
from .support.lab import all_events, events_until, first_epoch_after, stream, wait_gone
from .support.mnist import write_mnist_folder
from .support.servers import child_pids, command_line, mnistlab_serve

SMALL = {"data.val_size": 500}
TWO_EPOCHS = {**SMALL, "training.epochs": 2}
# Runs that cannot end while a test watches them (stopped by the test), and one whose epochs take a second each
# (batches of one image), so that the server can be killed between two of them.
ENDLESS = {**SMALL, "training.epochs": 1000}
SLOW = {**SMALL, "training.epochs": 2, "training.batch_size": 1}
TOKEN = "s3cret"  # the module's server has one: every write here shows it (see the last test)
FAST = ("--engine", "torch")  # for the servers a test starts: no ONNX copy of the bundled model to check


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, mnist_data) -> Path:
    """3,000 real training images (500 of them for validation) and 1,000 real test images."""
    return write_mnist_folder(tmp_path_factory.mktemp("data"), mnist_data, 3000, 1000)


def serve(runs: Path, data_dir: Path, *flags: str):
    return mnistlab_serve("--runs", str(runs), "--data-dir", str(data_dir), "--workers", "0", *flags)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lab") / "runs"


@pytest.fixture(scope="module")
def server(runs, data_dir):
    with serve(runs, data_dir, "--token", TOKEN) as served:
        yield served


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        yield c


def start(client: httpx.Client, values: dict, config: str = "seed-b-fixed") -> dict:
    response = client.post("/api/runs", json={"config": config, "set": values})
    assert response.status_code == 201, response.text
    return response.json()


def metrics_epochs(runs: Path, run_id: str) -> list[int]:
    return [e["epoch"] for e in json.loads((runs / run_id / "metrics.json").read_text())["epochs"]]


def training_pid(server) -> int:
    (pid,) = [p for p in child_pids(server.process.pid) if " train " in command_line(p)]
    return pid


# ---------------------------------------------------------------------------------------------- refusals


def test_the_lab_answers_with_its_state_and_the_configs_form(client, runs):
    lab = client.get("/api/lab").json()
    assert lab == {
        "enabled": True,
        "reason": None,
        "token_required": True,
        "runs_dir": str(runs),
        "running": None,
        "queue": [],
    }
    configs = client.get("/api/configs").json()
    by_name = {c["name"]: c for c in configs["configs"]}
    assert {"seed-a", "seed-b-fixed", "cnn-fast"} <= set(by_name)
    assert by_name["seed-a"]["values"]["optimizer.name"] == "sgd"
    assert "softmax" in by_name["seed-a"]["summary"].lower()
    keys = {k["key"]: k for k in configs["keys"]}
    assert keys["optimizer.name"]["choices"] == ["sgd", "adam", "adamw", "rmsprop", "adagrad", "adadelta"]
    assert (keys["optimizer.lr"]["type"], keys["training.epochs"]["type"]) == ("float", "int")
    assert (keys["model.softmax_output"]["type"], keys["model.layers"]["type"]) == ("bool", "list")


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"config": "seed-b-fixed", "set": {"training.epoch": 2}}, 422, "'training.epoch'"),
        ({"config": "seed-b-fixed", "set": {"optimizer.lr": "fast"}}, 422, "optimizer.lr"),
        ({"config": "seed-b-fixed", "set": {"optimizer.lr": -1}}, 422, "optimizer.lr must be positive"),
        ({"config": "seed-b-fixed", "set": {"optimizer.name": "sgdd"}}, 422, "optimizer.name: unknown 'sgdd'"),
        ({"config": "seed-b-fixed", "set": {"name": "../../x"}}, 422, "unknown config key 'name'"),
        ({"config": "no-such-config"}, 422, "no shipped config named 'no-such-config'"),
        ({"config": "/etc/passwd"}, 422, "no shipped config named"),
        ({"config": "seed-b-fixed", "set": [1]}, 400, "set must be an object"),
        ({"set": {}}, 400, "config's name"),
        ({"config": "seed-b-fixed", "epochs": 2}, 400, "unknown field 'epochs'"),
    ],
)
def test_a_refused_run_says_why_and_creates_nothing(client, runs, body, status, needle):
    for path in ("/api/runs", "/api/lr-find"):
        response = client.post(path, json=body)
        assert response.status_code == status, response.text
        assert needle in response.json()["detail"]
    assert not runs.exists()  # not even the lab's folder: nothing was written
    assert client.post("/api/runs", content=b"{not json").status_code == 400


def test_unknown_runs_are_404(client):
    assert client.get("/api/runs/.lab").status_code == 404  # the lab's own folder is no run
    for method, path in (
        ("GET", "/api/runs/nope"),
        ("GET", "/api/runs/nope/events"),
        ("POST", "/api/runs/nope/stop"),
        ("POST", "/api/runs/nope/resume"),
    ):
        response = client.request(method, path)
        assert response.status_code == 404, (path, response.text)
        assert "no run 'nope'" in response.json()["detail"]


# ---------------------------------------------------------------------------------------------- runs


def test_runs_train_one_at_a_time_stream_their_epochs_and_join_the_served_models(client, runs):
    first = start(client, TWO_EPOCHS)
    second = start(client, TWO_EPOCHS)
    assert first == {"id": "seed-b-fixed-1", "status": "running"}
    assert second == {"id": "seed-b-fixed-2", "status": "queued"}
    assert client.get("/api/lab").json()["queue"] == ["seed-b-fixed-2"]

    events = all_events(client, first["id"])
    epochs = [data for name, data in events if name == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    end = events[-1]
    assert end == (
        "end",
        {"status": "finished", "reason": None, "best_epoch": 2, "test_accuracy": end[1]["test_accuracy"]},
    )
    assert end[1]["test_accuracy"] == epochs[-1]["test_accuracy"]  # the model kept is the last epoch's
    progress = [data for name, data in events if name == "progress"]
    assert progress and {"epoch", "images", "train_size", "train_loss", "train_accuracy"} == set(progress[0])
    assert all_events(client, first["id"]) == events  # a late client gets the whole history

    # The queued run went next, and finished too; both models answer at once, without a restart.
    assert all_events(client, second["id"])[-1][1]["status"] == "finished"
    names = [m["name"] for m in client.get("/api/models").json()["models"]]
    assert names == ["bundled", "seed-b-fixed-1", "seed-b-fixed-2"]
    answer = client.post("/api/predict", files={"image": ("seven.png", drawn_png("7"), "image/png")}).json()
    assert [p["model"] for p in answer["predictions"]] == names

    listed = client.get("/api/runs").json()["runs"]
    assert [r["id"] for r in listed] == ["seed-b-fixed-2", "seed-b-fixed-1"]
    one = client.get("/api/runs/seed-b-fixed-1").json()
    assert (one["status"], one["epoch"], one["served"], one["resumable"]) == ("finished", 2, True, False)
    assert one["epochs"] == json.loads((runs / "seed-b-fixed-1" / "metrics.json").read_text())["epochs"]
    assert one["values"]["training.epochs"] == 2 and one["values"]["data.val_size"] == 500
    assert one["test_accuracy"] == epochs[-1]["test_accuracy"] and one["best_val_accuracy"] > 0.8
    assert [p["images"] for p in one["progress"]] == [p["images"] for p in progress]

    scraped = client.get("/metrics").text  # what an operator watches: the runs by status, every status named
    assert 'mnistlab_lab_runs{status="finished"} 2.0' in scraped
    assert 'mnistlab_lab_runs{status="running"} 0.0' in scraped and 'mnistlab_lab_runs{status="failed"} 0.0' in scraped

    assert client.post("/api/runs/seed-b-fixed-1/stop").status_code == 409
    resumed = client.post("/api/runs/seed-b-fixed-1/resume")
    assert resumed.status_code == 409 and "finished all its epochs" in resumed.json()["detail"]


def test_a_stopped_run_resumes_from_its_saved_epoch(client, runs, server):
    run = start(client, ENDLESS)["id"]
    queued = start(client, ENDLESS)["id"]
    done = events_until(client, run, first_epoch_after(0))[-1][1]["epoch"]

    # A queued run stopped leaves the queue, and nothing on disk; resumed, it starts from scratch.
    stopped = client.post(f"/api/runs/{queued}/stop").json()
    assert (stopped["status"], stopped["resumable"]) == ("stopped", False)
    assert client.get("/api/lab").json()["queue"] == [] and not (runs / queued).exists()

    stopped = client.post(f"/api/runs/{run}/stop")
    assert stopped.status_code == 200
    assert (stopped.json()["status"], stopped.json()["resumable"]) == ("stopped", True)
    saved = metrics_epochs(runs, run)
    assert saved == list(range(1, len(saved) + 1)) and len(saved) >= done
    assert all_events(client, run)[-1] == ("end", {"status": "stopped", "reason": None, "best_epoch": len(saved),
                                                   "test_accuracy": None})  # fmt: skip
    assert client.post(f"/api/runs/{run}/stop").status_code == 409

    assert client.post(f"/api/runs/{run}/resume").json() == {"id": run, "status": "running"}
    assert client.post(f"/api/runs/{run}/resume").status_code == 409
    seen = events_until(client, run, first_epoch_after(len(saved)))
    assert [d["epoch"] for n, d in seen if n == "epoch"][: len(saved)] == saved  # the history comes first
    assert client.post(f"/api/runs/{run}/stop").json()["status"] == "stopped"
    again = metrics_epochs(runs, run)
    assert again == list(range(1, len(again) + 1)) and len(again) > len(saved)  # continued, nothing repeated

    assert client.post(f"/api/runs/{queued}/resume").json() == {"id": queued, "status": "running"}
    assert client.post(f"/api/runs/{queued}/stop").json()["status"] == "stopped"


def test_a_killed_training_fails_with_a_reason_and_resumes_from_its_last_epoch(client, runs, server):
    run = start(client, ENDLESS)["id"]
    events_until(client, run, first_epoch_after(0))
    pid = training_pid(server)
    os.kill(pid, signal.SIGKILL)
    end = all_events(client, run)[-1][1]
    assert end["status"] == "failed" and "killed by SIGKILL" in end["reason"]
    info = client.get(f"/api/runs/{run}").json()
    assert (info["status"], info["resumable"], info["reason"]) == ("failed", True, end["reason"])
    saved = metrics_epochs(runs, run)

    assert client.post(f"/api/runs/{run}/resume").json()["status"] == "running"
    events_until(client, run, first_epoch_after(len(saved)))
    client.post(f"/api/runs/{run}/stop")
    again = metrics_epochs(runs, run)
    assert again == list(range(1, len(again) + 1)) and len(again) > len(saved)


def test_a_diverging_run_fails_with_its_own_error_and_nothing_to_resume(client, runs):
    run = start(client, {**SMALL, "training.epochs": 1, "optimizer.name": "sgd", "optimizer.lr": "1e30"})["id"]
    end = all_events(client, run)[-1][1]
    assert end["status"] == "failed"
    assert end["reason"].startswith("training diverged in epoch 1: train_loss is nan")  # its line, less the prefix
    info = client.get(f"/api/runs/{run}").json()
    assert (info["status"], info["resumable"], info["epoch"]) == ("failed", False, 0)
    assert not (runs / run).exists()


def test_the_server_killed_mid_run_stops_its_training_and_a_new_server_resumes_it(tmp_path, data_dir):
    runs = tmp_path / "runs"
    with serve(runs, data_dir, *FAST) as first, httpx.Client(base_url=first.url, timeout=120) as client:
        run = start(client, SLOW)["id"]
        events_until(client, run, first_epoch_after(0))
        child = training_pid(first)
        first.process.kill()
        wait_gone(child)  # its stdin closed: it stopped by itself, keeping its last epoch
    saved = metrics_epochs(runs, run)
    assert saved == [1]

    with serve(runs, data_dir, *FAST) as second, httpx.Client(base_url=second.url, timeout=120) as client:
        info = client.get(f"/api/runs/{run}").json()
        assert (info["status"], info["resumable"], info["epoch"]) == ("stopped", True, len(saved))
        assert all_events(client, run)[-1][1]["status"] == "stopped"
        assert client.post(f"/api/runs/{run}/resume").json()["status"] == "running"
        assert all_events(client, run)[-1][1]["status"] == "finished"
        assert metrics_epochs(runs, run) == [1, 2]
        assert run in [m["name"] for m in client.get("/api/models").json()["models"]]

        # Stopped gracefully (SIGTERM), a server stops its training as Ctrl-C would, and records it stopped; a
        # page watching the run is told so before its stream closes (the stream does not hold the stop up).
        endless = start(client, ENDLESS)["id"]
        events_until(client, endless, first_epoch_after(0))
        child = training_pid(second)
        watched: list = []
        connected = threading.Event()

        def watch() -> None:
            for event in stream(watcher, endless):  # to the stream's end
                watched.append(event)
                connected.set()

        with httpx.Client(base_url=second.url, timeout=120) as watcher:
            watching = threading.Thread(target=watch)
            watching.start()
            assert connected.wait(60)  # it has the history: it is watching
            second.process.terminate()
            assert second.process.wait(60) == 0
            watching.join(60)
        wait_gone(child)
        assert watched[-1] == ("end", {**watched[-1][1], "status": "stopped"})
    record = json.loads((runs / ".lab" / f"{endless}.json").read_text())
    assert record["status"] == "stopped" and (runs / endless / "checkpoint.safetensors").is_file()


def test_lr_find_suggests_a_finite_rate(client):
    response = client.post("/api/lr-find", json={"config": "seed-b-fixed", "set": SMALL})
    assert response.status_code == 200, response.text
    found = response.json()
    assert math.isfinite(found["suggested_lr"]) and 1e-7 <= found["suggested_lr"] <= 10
    assert found["method"] and len(found["points"]) > 10 and all(len(p) == 2 for p in found["points"])


# ---------------------------------------------------------------------------------------------- who may


def test_the_lab_is_off_when_asked_and_says_why(tmp_path, data_dir):
    with serve(tmp_path / "runs", data_dir, "--no-lab", *FAST) as off, httpx.Client(base_url=off.url) as client:
        lab = client.get("/api/lab").json()
        assert (lab["enabled"], lab["reason"]) == (False, "the server was started with --no-lab")
        for method, path in (("GET", "/api/configs"), ("GET", "/api/runs"), ("POST", "/api/runs"),
                             ("POST", "/api/lr-find"), ("GET", "/api/runs/x/events")):  # fmt: skip
            response = client.request(method, path, json={"config": "seed-b-fixed"})
            assert response.status_code == 404
            assert response.json()["detail"] == "the lab is off: the server was started with --no-lab"


def test_beyond_loopback_the_lab_needs_a_token(tmp_path):
    result = mnistlab("serve", "--host", "0.0.0.0", "--lab", "--port", "0")
    assert_user_error(result, "--lab on 0.0.0.0 (beyond loopback) needs --token")
    (tmp_path / "a-file").write_text("")
    assert_user_error(mnistlab("serve", "--runs", str(tmp_path / "a-file")), "--runs", "a file, not a folder")
    assert_user_error(mnistlab("serve", "--data-dir", str(tmp_path / "nowhere")), "--data-dir", "no such folder")

    # Without --lab and without a token, the server runs with the lab off.
    command = [sys.executable, "-m", "mnistlab", "serve", "--host", "0.0.0.0", "--port", "0", "--workers", "0",
               "--runs", str(tmp_path / "runs"), *FAST]  # fmt: skip
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as server:
        try:
            port = server.stdout.readline().split(" at http://0.0.0.0:")[1].split("/")[0]
            with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
                lab = client.get("/api/lab").json()
                assert not lab["enabled"] and "beyond loopback" in lab["reason"] and "--token" in lab["reason"]
                detail = client.get("/api/runs").json()["detail"]
                assert detail.startswith("the lab is off:") and "--token" in detail
        finally:
            server.terminate()


def test_writes_need_the_token_when_the_server_has_one(server):
    body = {"config": "seed-b-fixed", "set": {"training.epoch": 1}}  # refused either way: nothing would train
    with httpx.Client(base_url=server.url) as anonymous:
        for path in ("/api/runs", "/api/lr-find", "/api/runs/x/stop", "/api/runs/x/resume"):
            response = anonymous.post(path, json=body)
            assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert anonymous.get("/api/runs").status_code == 200  # reading is open
        authorised = anonymous.post("/api/runs", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
        assert authorised.status_code == 422


def test_one_training_at_a_time_on_the_machine_whichever_server_started_it(tmp_path, data_dir):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}  # the machine's lock, for these two alone
    flags = ("--data-dir", str(data_dir), "--workers", "0", *FAST)
    with (
        mnistlab_serve("--runs", str(tmp_path / "a"), *flags, env=env) as a,
        mnistlab_serve("--runs", str(tmp_path / "b"), *flags, env=env) as b,
        httpx.Client(base_url=a.url, timeout=120) as first_client,
        httpx.Client(base_url=b.url, timeout=120) as second_client,
    ):
        first = start(first_client, ENDLESS)["id"]
        events_until(first_client, first, first_epoch_after(0))  # it trains
        waiting = start(second_client, TWO_EPOCHS)
        assert waiting["status"] == "queued"
        info = second_client.get(f"/api/runs/{waiting['id']}").json()
        assert info["status"] == "queued" and "another server's training on this machine" in info["reason"]
        assert first_client.post(f"/api/runs/{first}/stop").status_code == 200
        assert all_events(second_client, waiting["id"])[-1][1]["status"] == "finished"  # it went next
