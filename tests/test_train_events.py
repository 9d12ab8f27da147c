"""`mnistlab train --events` (the run's progress as JSON lines, what the web lab reads) and
`--until-stdin-closes` (a run that stops, resumable, when the program watching it goes away), on real MNIST."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .support.cli import assert_user_error, mnistlab
from .support.mnist import write_mnist_folder

SMALL = ("--set", "data.val_size=200", "--device", "cpu")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, mnist_data) -> Path:
    """A data folder whose MNIST files hold 2,000 real training and 500 real test images."""
    return write_mnist_folder(tmp_path_factory.mktemp("data"), mnist_data, 2000, 500)


def events_of(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def test_events_tell_the_start_progress_each_epoch_as_metrics_json_and_the_end(data_dir, tmp_path):
    out = tmp_path / "run"
    result = mnistlab(
        "train", "--config", "seed-b-fixed", "--epochs", "2", *SMALL, "--out", str(out), "--events",
        "--data-dir", str(data_dir),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    events = events_of(result.stdout)  # every stdout line is one JSON object
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "finished" and kinds.count("epoch") == 2
    start = events[0]
    assert (start["epoch"], start["epochs"], start["train_size"]) == (0, 2, 1800)
    assert start["steps_per_epoch"] == 29  # 1,800 images in batches of 64
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["record"] for e in events if e["event"] == "epoch"] == metrics["epochs"]
    assert events[kinds.index("epoch", kinds.index("epoch") + 1)]["best_epoch"] == metrics["best_epoch"]
    for epoch in (1, 2):
        progress = [e for e in events if e["event"] == "progress" and e["epoch"] == epoch]
        # about every 512 images (8 batches of 64): 512, 1024, 1536 of 1,800
        assert [p["images"] for p in progress] == [512, 1024, 1536]
        assert all(0 <= p["train_accuracy"] <= 1 and p["train_loss"] > 0 for p in progress)
    assert events[-1]["test_accuracy"] == metrics["epochs"][-1]["test_accuracy"]
    assert events[-1]["run_dir"] == str(out) and events[-1]["epoch"] == 2
    assert "epoch 2/2" in result.stderr  # the human lines stay on stderr


def test_a_run_stops_resumably_when_stdin_closes_and_resumes_from_its_saved_epoch(data_dir, tmp_path):
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "mnistlab", "train", "--config", "seed-b-fixed", "--epochs", "30", *SMALL,
        "--out", str(out), "--events", "--until-stdin-closes", "--data-dir", str(data_dir),
    ]  # fmt: skip
    child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in child.stdout:  # the watcher (the parent) goes away after the first epoch
            if json.loads(line)["event"] == "epoch":
                break
        child.stdin.close()
        code = child.wait(timeout=60)
    finally:
        child.kill()
    assert code == 130, child.stderr.read()
    saved = len(json.loads((out / "metrics.json").read_text())["epochs"])
    assert 1 <= saved < 30 and not (out / "model.safetensors").exists()

    more = str(saved + 1)
    result = mnistlab("train", "--resume", str(out), "--epochs", more, "--events", "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr
    events = events_of(result.stdout)
    assert events[0]["event"] == "start" and events[0]["epoch"] == saved
    assert [e["record"]["epoch"] for e in events if e["event"] == "epoch"] == [saved + 1]
    assert (out / "model.safetensors").is_file()


def test_a_run_watching_stdin_ends_normally_while_stdin_is_still_open(data_dir, tmp_path):
    command = [
        sys.executable, "-m", "mnistlab", "train", "--config", "seed-b-fixed", "--epochs", "1", *SMALL,
        "--out", str(tmp_path / "run"), "--events", "--until-stdin-closes", "--data-dir", str(data_dir),
    ]  # fmt: skip
    child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        events = [json.loads(line) for line in child.stdout]  # to the end of its output, stdin held open
        assert child.wait(timeout=60) == 0, child.stderr.read()  # not -6: the watching thread does not abort the exit
    finally:
        child.kill()
        child.stdin.close()
    assert events[-1]["event"] == "finished"


def test_events_are_for_one_process():
    assert_user_error(mnistlab("train", "--config", "seed-a", "--nproc", "2", "--events"), "--events", "--nproc")
