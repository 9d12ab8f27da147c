"""`mnistlab lr-find`, the learning-rate range test: its schedule, its stop, its suggestion, and the command's
outputs and refusals, on the real MNIST."""

from __future__ import annotations

import json
import math
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mnistlab.config import load_config
from mnistlab.errors import MnistlabError
from mnistlab.train.lr_find import LrFindResult, find_lr, lr_schedule, suggest

from .support.cli import assert_user_error, run_main
from .support.mnist import subset

rates = st.floats(min_value=1e-9, max_value=1e3, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(start=rates, decades=st.floats(min_value=0.01, max_value=12), steps=st.integers(2, 1000))
def test_the_rates_rise_exponentially_from_start_to_end(start, decades, steps):
    end = start * 10**decades
    lrs = lr_schedule(start, end, steps)
    assert len(lrs) == steps
    assert lrs[0] == start and lrs[-1] == end
    assert all(a < b for a, b in pairwise(lrs))
    factor = (end / start) ** (1 / (steps - 1))  # every rate the last times the same factor
    assert all(b / a == pytest.approx(factor, rel=1e-9) for a, b in pairwise(lrs))


@settings(max_examples=200, deadline=None)
@given(
    losses=st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=2, max_size=400),
    start=rates,
    decades=st.floats(min_value=0.1, max_value=12),
)
def test_the_suggestion_lies_in_the_range(losses, start, decades):
    lrs = lr_schedule(start, start * 10**decades, len(losses))
    points = list(zip(lrs, losses))
    assert suggest(points, "minimum/10") == lrs[losses.index(min(losses))] / 10
    assert suggest(points, "steepest") in lrs[:-1]  # the rate where the steepest fall begins


@settings(max_examples=200, deadline=None)
@given(n=st.integers(20, 400), where=st.floats(0.1, 0.9), drop=st.floats(0.01, 10), noise=st.floats(0, 0.4))
def test_the_steepest_fall_is_found(n, where, drop, noise):
    # a loss that falls gently (by `noise` of the drop per batch at most) but for one batch where it drops at once
    k = min(max(n // 10, round(where * n)), n - 7)
    losses, loss = [], 100.0
    for i in range(n):
        losses.append(loss)
        loss -= drop if i == k else noise * drop * ((i * 7919) % 13) / 13
    lrs = lr_schedule(1e-7, 10.0, n)
    assert suggest(list(zip(lrs, losses)), "steepest") == lrs[k]


@pytest.fixture(scope="module")
def small_mnist(mnist_data):
    """The first 12,800 real training images (200 batches of 64), with small evaluation splits (never used)."""
    return subset(mnist_data, 12_800, 100)


def _assert_finite(result: LrFindResult) -> None:
    assert result.points and all(math.isfinite(lr) and math.isfinite(loss) for lr, loss in result.points)
    assert math.isfinite(result.suggested_lr) and result.start <= result.suggested_lr <= result.end


def test_a_blow_up_stops_the_test_early(small_mnist):
    # SGD on logits: a rate rising to 1e4 sends the loss to infinity within a few batches
    config = load_config("seed-a-fixed")
    calls = []
    result = find_lr(
        config,
        data=small_mnist,
        device="cpu",
        end=1e4,
        max_batches=150,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert result.stopped_early and result.stop_reason in ("diverged", "not finite")
    assert len(result.points) < result.planned == 150
    assert calls == [(k, 150) for k in range(1, len(calls) + 1)] and len(calls) >= len(result.points)
    _assert_finite(result)
    lrs = [lr for lr, _ in result.points]
    assert lrs == lr_schedule(1e-7, 1e4, 150)[: len(lrs)]  # each batch trained at its scheduled rate
    json.dumps(result.to_dict(), allow_nan=False)


def test_seed_b_fixed_gets_an_adam_rate(mnist_data):
    """The goal of docs/training.md: Adam on the report's network B (corrected) is told a rate in [1e-4, 1e-2]."""
    result = find_lr(load_config("seed-b-fixed"), data=mnist_data, device="cpu")
    _assert_finite(result)
    assert result.method == "minimum/10" and result.planned == 300
    assert 1e-4 <= result.suggested_lr <= 1e-2, result.suggested_lr


def test_the_command_writes_the_plot_and_json_only(capsys, monkeypatch, tmp_path, mnist_path):
    monkeypatch.chdir(tmp_path)
    result = run_main(
        capsys,
        "lr-find", "--config", "seed-a", "--set", "training.batch_size=128", "--max-batches", "80",
        "--data-dir", str(mnist_path), "--device", "cpu", "--json", "--out", "plots",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} in the JSON")

    data = json.loads(result.stdout, parse_constant=refuse)
    assert data["config"] == "seed-a" and data["method"] == "minimum/10" and data["planned_batches"] == 80
    assert len(data["points"]) == data["batches"] == 80 and data["stopped_early"] is False
    assert all(len(p) == 2 and all(math.isfinite(v) for v in p) for p in data["points"])
    assert 1e-7 <= data["suggested_lr"] <= 10
    assert data["plot"] == str(Path("plots") / "seed-a.png")
    assert (tmp_path / "plots" / "seed-a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # nothing else: no run directory, no model, no checkpoint
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["plots", "plots/seed-a.png"]


def test_the_command_says_what_it_suggests(capsys, tmp_path, mnist_path):
    result = run_main(
        capsys,
        "lr-find", "--config", "seed-b-fixed", "--max-batches", "60", "--data-dir", str(mnist_path),
        "--device", "cpu", "--out", str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("suggested learning rate: ") and "a tenth of the rate" in lines[0]
    assert lines[-1].startswith("train with: mnistlab train --config seed-b-fixed --set optimizer.lr=")
    assert (tmp_path / "seed-b-fixed.png").is_file()


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--config", "no-such-config"], ["no config named 'no-such-config'"]),
        (["--config", "seed-a", "--set", "optimizer.rate=0.1"], ["optimizer.rate"]),
        (["--config", "seed-a", "--set", "optimizer.lr=fast"], ["optimizer.lr", "'fast'"]),
        (["--config", "seed-a", "--set", "training.batch_size=0"], ["training.batch_size"]),
        (["--config", "seed-a", "--start", "1", "--end", "1"], ["--start (1) must be below --end (1)"]),
        (["--config", "seed-a", "--start", "0.1", "--end", "0.5"], ["less than a decade"]),
        (["--config", "seed-a", "--start", "0"], ["--start must be a positive"]),
        (["--config", "seed-a", "--start=-1e-3"], ["--start must be a positive"]),
        (["--config", "seed-a", "--end", "inf"], ["finite"]),
        (["--config", "seed-a", "--max-batches", "1"], ["--max-batches"]),
    ],
)
def test_bad_input_is_one_line(capsys, monkeypatch, tmp_path, args, needles):
    monkeypatch.chdir(tmp_path)
    assert_user_error(run_main(capsys, "lr-find", *args), *needles)
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_an_epoch_of_one_batch_is_refused(capsys, tmp_path, small_data_dir):
    # 15 training images after a 5-image validation split: one batch of 64
    args = ["--config", "seed-a", "--set", "data.val_size=5", "--data-dir", str(small_data_dir)]
    assert_user_error(run_main(capsys, "lr-find", *args, "--out", str(tmp_path / "o")), "training.batch_size")
    assert not (tmp_path / "o").exists()


def test_a_start_that_is_already_too_high_is_refused(small_mnist):
    with pytest.raises(MnistlabError, match="lower --start"):
        find_lr(load_config("seed-a-fixed"), data=small_mnist, device="cpu", start=100.0, end=1e6, max_batches=50)


def test_the_plot_is_legible(small_mnist):
    # the checks every other picture passes (tests/test_pictures.py), with the longest title a shipped config gives
    from mnistlab import plots
    from mnistlab.config import shipped_configs

    from .test_pictures import RUN, _problems

    result = find_lr(load_config("seed-b-fixed"), data=small_mnist, device="cpu", max_batches=100)
    summary = max((f"{RUN}: {load_config(name).summary()}" for name in shipped_configs()), key=len)
    fig = plots._figure_lr_find(result.points, result.raw_losses, result.suggested_lr, result.how, summary)
    assert _problems(fig) == []
