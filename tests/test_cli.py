"""The `mnistlab` command end to end, as a user runs it: real processes, real data, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def mnistlab(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "mnistlab", *args], capture_output=True, text=True, env=full_env, timeout=600
    )


def assert_user_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit code 2, one line on stderr, no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_help_on_every_command():
    for command in ("train", "evaluate", "reproduce", "configs"):
        result = mnistlab(command, "--help")
        assert result.returncode == 0
        assert "usage: mnistlab" in result.stdout
    assert "(default: None)" not in mnistlab("train", "--help").stdout  # overrides default to the config
    assert "(default: runs/reproduce, runs/study-<name>)" in " ".join(mnistlab("reproduce", "--help").stdout.split())


def test_configs_lists_the_seed_networks():
    result = mnistlab("configs")
    assert result.returncode == 0
    for name in ("seed-a", "seed-b", "seed-c", "seed-a-fixed", "seed-b-fixed", "seed-c-fixed"):
        assert any(line.startswith(name + " ") for line in result.stdout.splitlines())


def test_train_then_evaluate(mnist_path, tmp_path):
    out = tmp_path / "run"
    args = ["--config", "seed-b-fixed", "--epochs", "1", "--out", str(out), "--data-dir", str(mnist_path)]
    result = mnistlab("train", *args)
    assert result.returncode == 0, result.stderr
    assert "test accuracy" in result.stdout and str(out) in result.stdout
    assert "epoch 1/1" in result.stderr  # one plain line per epoch when not on a terminal

    metrics = json.loads((out / "metrics.json").read_text())
    evaluation = mnistlab("evaluate", str(out), "--json", "--data-dir", str(mnist_path))
    assert evaluation.returncode == 0, evaluation.stderr
    report = json.loads(evaluation.stdout)
    assert set(report) == {"accuracy", "loss", "per_class_accuracy", "confusion_matrix"}
    assert report["accuracy"] == metrics["epochs"][-1]["test_accuracy"]
    assert len(report["per_class_accuracy"]) == 10
    assert [len(row) for row in report["confusion_matrix"]] == [10] * 10

    text = mnistlab("evaluate", str(out / "model.safetensors"), "--data-dir", str(mnist_path))
    assert text.returncode == 0 and "confusion matrix" in text.stdout

    # An existing run directory is never overwritten without --force.
    again = mnistlab("train", *args)
    assert_user_error(again, "already exists", "--force")
    assert json.loads((out / "metrics.json").read_text()) == metrics

    quiet = mnistlab("train", *args, "--force", "--quiet")
    assert quiet.returncode == 0 and quiet.stdout == quiet.stderr == ""


def test_user_mistakes_are_one_line_errors(mnist_path, tmp_path):
    assert_user_error(mnistlab("train", "--config", "seed-z"), "no config named 'seed-z'")
    missing = tmp_path / "nowhere"
    assert_user_error(
        mnistlab("train", "--config", "seed-a", "--data-dir", str(missing), "--out", str(tmp_path / "r")),
        "does not exist",
        str(missing),
    )
    assert_user_error(mnistlab("evaluate", str(tmp_path / "no-model"), "--data-dir", str(mnist_path)), "no such model")
    assert_user_error(
        mnistlab("train", "--config", "seed-a", "--out", str(tmp_path / "r"), env={"MNISTLAB_DATA": str(missing)}),
        "MNISTLAB_DATA",
    )
    assert mnistlab("train", "--config", "seed-a", "--epochs", "x").returncode == 2  # argparse's own check
    assert not (tmp_path / "r").exists()  # a failed start leaves no half-made run directory


@pytest.mark.slow
def test_reproduce_writes_runs_and_report(mnist_path, tmp_path):
    out = tmp_path / "repro"
    result = mnistlab("reproduce", "--epochs", "1", "--out", str(out), "--data-dir", str(mnist_path), "--quiet")
    assert result.returncode == 0, result.stderr
    report = (out / "report.md").read_text()
    for name in ("seed-a", "seed-b", "seed-c", "seed-a-fixed", "seed-b-fixed", "seed-c-fixed"):
        assert (out / name / "curves.png").is_file()
        assert f"| {name} |" in report
    assert (out / "overlay.png").is_file()
    assert "ln(1 + 9/e) = 1.4612" in report
