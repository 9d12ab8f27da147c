"""The `mnistlab` command end to end, as a user runs it: real processes, real data, real files."""

from __future__ import annotations

import argparse
import json

import pytest

from mnistlab.cli import build_parser

from .support.cli import assert_user_error, mnistlab


def _commands() -> list[str]:
    """Every command the parser declares, so that a new one is covered without a list to keep."""
    (commands,) = (a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return list(commands.choices)


@pytest.mark.parametrize("command", _commands())
def test_help_on_every_command(command):
    result = mnistlab(command, "--help")
    assert result.returncode == 0, result.stderr
    assert f"usage: mnistlab {command}" in result.stdout


def test_help_shows_the_defaults_that_apply():
    assert "(default: None)" not in mnistlab("train", "--help").stdout  # overrides default to the config
    assert "(default: runs/reproduce, runs/study-<name>)" in " ".join(mnistlab("reproduce", "--help").stdout.split())


def test_configs_lists_the_seed_networks():
    result = mnistlab("configs")
    assert result.returncode == 0
    for name in ("seed-a", "seed-b", "seed-c", "seed-a-fixed", "seed-b-fixed", "seed-c-fixed"):
        assert any(line.startswith(name + " ") for line in result.stdout.splitlines())


@pytest.mark.slow  # 43 s on 2 busy cores
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
    assert set(report) == {"accuracy", "loss", "per_class_accuracy", "confusion_matrix", "calibration", "outliers"}
    # Calibrated when training finished, on the validation split: the test split only measures it.
    calibration = report["calibration"]
    saved = json.loads((out / "model.json").read_text())["calibration"]
    assert calibration["calibrated"] and calibration["temperature"] == saved["temperature"]
    assert saved["fitted_on"] == "validation split (5000 images)"
    assert (out / "reliability.png").is_file()
    assert report["accuracy"] == metrics["epochs"][-1]["test_accuracy"]
    assert len(report["per_class_accuracy"]) == 10
    assert [len(row) for row in report["confusion_matrix"]] == [10] * 10

    text = mnistlab("evaluate", str(out / "model.safetensors"), "--data-dir", str(mnist_path))
    assert text.returncode == 0 and "confusion matrix" in text.stdout
    assert f"with its temperature {saved['temperature']:.3g} and confidence map ECE" in text.stdout

    # An existing run directory is never overwritten without --force.
    again = mnistlab("train", *args)
    assert_user_error(again, "already exists", "--force")
    assert json.loads((out / "metrics.json").read_text()) == metrics

    quiet = mnistlab("train", *args, "--force", "--quiet")
    assert quiet.returncode == 0 and quiet.stdout == quiet.stderr == ""


@pytest.mark.slow  # 9 s on 2 busy cores: five processes
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


def test_the_package_and_the_cli_load_nothing_heavy_until_a_command_needs_it():
    """`import mnistlab` and `mnistlab --help` load neither torch nor matplotlib (nor change a notebook's
    plotting backend); the lazy names still give the API."""
    import subprocess
    import sys

    probe = (
        "import sys, mnistlab, mnistlab.cli; mnistlab.cli.build_parser();"
        "print(sorted(m for m in ('torch', 'matplotlib', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    api = "import mnistlab; print(mnistlab.load_config('seed-b').name, callable(mnistlab.train))"
    assert subprocess.run([sys.executable, "-c", api], capture_output=True, text=True).stdout.split() == [
        "seed-b",
        "True",
    ]
    backend = (
        "import matplotlib; matplotlib.use('svg'); import mnistlab.plots, mnistlab.train.loop;"
        "print(matplotlib.get_backend())"
    )
    assert subprocess.run([sys.executable, "-c", backend], capture_output=True, text=True).stdout.strip() == "svg"


def test_choices_come_from_the_config_and_help_lists_them():
    from mnistlab.config import DEVICES, LOSSES, OPTIMIZERS, SCHEDULERS

    help_text = " ".join(mnistlab("train", "--help").stdout.split())
    for choices in (LOSSES, OPTIMIZERS, SCHEDULERS, DEVICES):
        assert "{" + ",".join(choices) + "}" in help_text
    assert "--nesterov, --no-nesterov" in help_text and "--set KEY=VALUE" in help_text
    for command in ("evaluate", "predict", "classify", "inspect"):
        assert "--device" in mnistlab(command, "--help").stdout and "--model" in mnistlab(command, "--help").stdout
    assert mnistlab("--version").stdout.startswith("mnistlab ")
    keys = mnistlab("configs", "--keys").stdout
    assert "augment.rotate = 0.0" in keys and "training.amp = false" in keys


@pytest.mark.slow  # 20 s on 2 busy cores
def test_set_and_no_nesterov_reach_any_config_key(mnist_path, tmp_path):
    from mnistlab.config import load_config, parse_set

    overrides = parse_set(["augment.rotate=10", "training.amp=true", 'model.layers=["conv 8 3"]', "optimizer.name=sgd"])
    assert overrides == {
        "augment.rotate": 10,
        "training.amp": True,
        "model.layers": ["conv 8 3"],
        "optimizer.name": "sgd",
    }
    out = tmp_path / "run"
    result = mnistlab(
        "train",
        "--config",
        "cnn-fast",
        "--no-nesterov",
        "--set",
        "augment.rotate=12.5",
        "--set",
        "data.val_size=500",
        "--set",
        'model.layers=["conv 4 5 0 2", "relu", "flatten", "linear 10"]',
        "--set",
        "training.amp=false",
        "--set",
        "training.batch_size=512",
        "--set",
        "training.warmup_epochs=0.1",
        "--val-size",
        "1000",
        "--out",
        str(out),
        "--data-dir",
        str(mnist_path),
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    saved = load_config(out / "config.toml")
    assert saved.optimizer.nesterov is False and saved.augment.rotate == 12.5 and saved.training.amp is False
    assert saved.model.layers[0] == "conv 4 5 0 2" and saved.data.val_size == 500  # --set comes after the flags
    assert "changed:" in saved.description and "optimizer.nesterov=false" in saved.description


def test_an_ensemble_refuses_one_run_given_twice_under_any_path(mnist_data, tmp_path, monkeypatch):
    """`d1 d1` would be "an ensemble of 1": the same model named twice, however it is named, is refused before
    anything is written (the reliability table has the command's one line)."""
    from mnistlab.errors import MnistlabError
    from mnistlab.infer.ensemble import make_ensemble

    from .support.runs import train_small

    d1 = train_small(tmp_path / "d1", mnist_data, 2000)
    (tmp_path / "link").symlink_to(d1)
    monkeypatch.chdir(tmp_path)
    for pair in (
        ["d1", "d1"],
        ["d1", "./d1/"],
        ["d1", "link"],
        ["d1", "d1/model.safetensors"],
        ["d1/model.json", "d1"],
    ):
        with pytest.raises(MnistlabError, match="the same model given twice"):
            make_ensemble(pair, tmp_path / "e", device="cpu")
        assert not (tmp_path / "e").exists()
