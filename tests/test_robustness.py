"""Tests for `mnistlab robustness` end to end: real models (trained here in seconds, or the bundled one), real
MNIST and Fashion-MNIST test sets, small subsets so each run takes seconds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mnistlab.cli import main
from mnistlab.config import load_config
from mnistlab.data.corruptions import CORRUPTIONS
from mnistlab.data.splits import load_data
from mnistlab.datasets import DATASETS
from mnistlab.train.loop import train

from .support.cli import assert_user_error, run_main
from .support.mnist import subset
from .support.runs import train_small

REPO = Path(__file__).resolve().parents[1]
FASHION = DATASETS["fashion-mnist"].classes


def strict_json(text: str) -> dict:
    """Parse JSON, refusing the NaN and Infinity that Python's json module would otherwise accept."""

    def refuse(token: str) -> None:
        raise AssertionError(f"non-finite number {token} in JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def run_dir(mnist_data, tmp_path_factory) -> Path:
    """Network B trained for one epoch on 5,000 real training images (about a second)."""
    return train_small(tmp_path_factory.mktemp("robustness") / "b", mnist_data, 5000)


# Three PGD steps of 0.1 can cross the whole eps-ball, so even this short attack is a real one.
SMALL = ["--images", "64", "--adversarial-images", "16", "--pgd-steps", "3", "--step-size", "0.1", "--quiet"]


def test_cli_end_to_end(run_dir, mnist_path, tmp_path, capsys) -> None:
    out = tmp_path / "report"
    assert main(["robustness", str(run_dir), "--out", str(out), "--data-dir", str(mnist_path), *SMALL]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir() if p.name != ".lock") == [
        "corruptions.png",
        "examples.png",
        "report.md",
        "robustness.json",
    ]
    result = strict_json((out / "robustness.json").read_text())
    assert list(result["corruptions"]) == list(CORRUPTIONS)
    accuracies = [c["accuracy"] for c in result["corruptions"].values()]
    assert all(0 <= a <= 1 for a in accuracies)
    assert result["mean_corruption_accuracy"] == pytest.approx(sum(accuracies) / len(accuracies))
    assert result["settings"]["images"] == 64 and result["adversarial"]["images"] == 16
    rows = {(r["attack"], r["eps"]): r["accuracy"] for r in result["adversarial"]["results"]}
    assert set(rows) == {(a, e) for a in ("fgsm", "pgd") for e in (0.1, 0.2, 0.3)}
    assert rows[("pgd", 0.1)] >= rows[("pgd", 0.2)] >= rows[("pgd", 0.3)]  # a larger ball breaks more
    assert rows[("pgd", 0.3)] <= 0.2  # an MLP without adversarial training falls
    report = (out / "report.md").read_text()
    for name in CORRUPTIONS:
        assert f"| {name} |" in report and name in printed
    assert "PGD-3, random start" in report and "mnistlab robustness" in report
    assert f"report: {out}/report.md" in printed


def test_json_is_strict_and_matches_the_file(run_dir, mnist_path, tmp_path, capsys) -> None:
    out = tmp_path / "json"
    args = ["robustness", str(run_dir), "--out", str(out), "--data-dir", str(mnist_path), "--json", *SMALL]
    assert main([*args[:-1], "--corruptions", "fog,stripe", "--attacks", "pgd", "--eps", "0.3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    printed = strict_json(lines[0])
    assert printed == strict_json((out / "robustness.json").read_text())
    assert list(printed["corruptions"]) == ["fog", "stripe"]
    assert [r["attack"] for r in printed["adversarial"]["results"]] == ["pgd"]


def test_same_seed_same_numbers(run_dir, mnist_path, tmp_path) -> None:
    results = []
    for name in ("first", "second"):
        out = tmp_path / name
        args = ["robustness", str(run_dir), "--out", str(out), "--data-dir", str(mnist_path), *SMALL]
        assert main([*args, "--corruptions", "shot_noise,glass_blur", "--attacks", "pgd"]) == 0
        data = strict_json((out / "robustness.json").read_text())
        data.pop("seconds")
        results.append(data)
    assert results[0] == results[1]


def test_refusals_are_one_line_and_leave_no_folder(run_dir, mnist_path, tmp_path, capsys) -> None:
    base = ["robustness", str(run_dir), "--data-dir", str(mnist_path), "--quiet"]
    cases = [
        (["--corruptions", "fog,nope"], "unknown corruption 'nope'"),
        (["--attacks", "cw"], "unknown attack cw"),
        (["--eps", "0,0.3"], "eps values must be in (0, 1]"),
        (["--eps", "a"], "--eps"),
        (["--images", "0"], "images must be between 1 and 10000"),
        (["--adversarial-images", "20000"], "adversarial images must be between 1 and 10000"),
        (["--corruptions", "none", "--attacks", "none"], "nothing to measure"),
        (["--pgd-steps", "0"], "PGD needs at least 1 step"),
    ]
    for i, (extra, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        assert_user_error(run_main(capsys, *base, "--out", str(out), *extra), message)
        assert not out.exists()


def test_an_existing_report_needs_force(run_dir, mnist_path, tmp_path, capsys) -> None:
    out = tmp_path / "again"
    args = ["robustness", str(run_dir), "--out", str(out), "--data-dir", str(mnist_path), *SMALL]
    args += ["--corruptions", "fog", "--attacks", "none"]
    assert main(args) == 0
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0


def test_the_bundled_model_is_the_default(mnist_path, tmp_path, capsys) -> None:
    out = tmp_path / "bundled"
    args = ["robustness", "--out", str(out), "--data-dir", str(mnist_path), "--images", "30", "--quiet"]
    assert main([*args, "--corruptions", "rotate,fog", "--adversarial-images", "4", "--pgd-steps", "2"]) == 0
    result = strict_json((out / "robustness.json").read_text())
    assert result["model"] == "bundled model" and result["dataset"] == "mnist"
    assert result["clean_accuracy"] > 0.9 and "bundled model" in (out / "report.md").read_text()
    assert "mnistlab robustness --corruptions rotate,fog" in result["command"]


def fashion_dir() -> Path | None:
    path = REPO.parent / "shared" / "data" / "fashion-mnist"
    return path if (path / "t10k-images-idx3-ubyte.gz").is_file() else None


@pytest.mark.skipif(fashion_dir() is None, reason="real Fashion-MNIST not found beside the checkout")
def test_a_fashion_model_is_measured_on_fashion_mnist_with_class_names(tmp_path, capsys) -> None:
    data = load_data("fashion-mnist", fashion_dir(), val_size=500)
    run = tmp_path / "fashion"
    config = load_config("fashion-mlp").with_overrides({"training.epochs": 1, "data.val_size": 500})
    train(config, out_dir=run, data=subset(data, 5000, 500), device="cpu", quiet=True)
    out = tmp_path / "report"
    args = ["robustness", str(run), "--out", str(out), "--data-dir", str(fashion_dir()), *SMALL]
    assert main([*args, "--corruptions", "shear,brightness"]) == 0
    result = strict_json((out / "robustness.json").read_text())
    assert result["dataset"] == "fashion-mnist" and result["classes"] == list(FASHION)
    assert 0.6 < result["clean_accuracy"] < 1  # a garment model on garments, not digits
    assert [c["class"] for c in result["per_class"]] == list(FASHION)
    assert "| Trouser |" in (out / "report.md").read_text()
    assert all(e["predicted"] in FASHION for e in result["examples"])
    assert "weakest class under corruption: " in capsys.readouterr().out
    assert not math.isnan(result["mean_corruption_accuracy"])
