"""Reports: `compare` of any runs, and `reproduce` of the report's experiments."""

from __future__ import annotations

import pytest

from mnistlab.analysis.reports import compare
from mnistlab.config import load_config
from mnistlab.train.loop import train

from .support.cli import assert_user_error, mnistlab
from .support.mnist import subset

# ---------------------------------------------------------------------------------------------- compare


@pytest.mark.slow  # 6 s on 2 busy cores
def test_compare_reports_runs_side_by_side(mnist_data, tmp_path):
    data = subset(mnist_data, 4000, 1000)
    base = load_config("seed-b-fixed").with_overrides({"training.epochs": 2})
    train(base, out_dir=tmp_path / "adam", quiet=True, data=data)
    train(base.with_overrides({"training.loss": "mse"}), out_dir=tmp_path / "mse", quiet=True, data=data)
    report = compare([tmp_path / "adam", tmp_path / "mse"], tmp_path / "cmp").read_text()
    assert "| adam | loss=cross-entropy |" in report
    assert "| mse | loss=mse |" in report
    assert (tmp_path / "cmp" / "test-curves.png").is_file() and (tmp_path / "cmp" / "val-curves.png").is_file()

    cli = mnistlab("compare", str(tmp_path / "adam"), str(tmp_path / "mse"), "--out", str(tmp_path / "cli"))
    assert cli.returncode == 0, cli.stderr
    assert "| adam |" in (tmp_path / "cli" / "report.md").read_text()
    assert_user_error(mnistlab("compare", str(tmp_path), "--out", str(tmp_path / "x")), "not a run directory")


@pytest.mark.slow  # a 1-epoch run on 2,000 images
def test_compare_says_when_runs_are_on_different_data_sets(mnist_data, fashion_run, tmp_path):
    base = load_config("seed-b-fixed").with_overrides({"training.epochs": 1})
    train(base, out_dir=tmp_path / "digits", quiet=True, data=subset(mnist_data, 2000, 500))
    result = mnistlab("compare", str(tmp_path / "digits"), str(fashion_run), "--out", str(tmp_path / "cmp"))
    assert result.returncode == 0, result.stderr
    warning = "different data sets (fashion-mnist, mnist): their accuracies are not comparable"
    assert result.stderr.strip() == f"mnistlab: warning: these runs were trained and tested on {warning}"
    assert "different data sets (fashion-mnist, mnist)" in (tmp_path / "cmp" / "report.md").read_text()


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
