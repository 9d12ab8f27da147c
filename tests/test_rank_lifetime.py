"""Ranks never outlive the job that started them (issue 27): when the launcher of a distributed training
(`mnistlab train --nproc 2`, or torchrun's own agent) dies, even by SIGKILL, every rank it started ends within a
few seconds with its checkpoint intact, and `--resume` goes on to the metrics of an uninterrupted run. A
signal to the launcher (SIGHUP: its terminal closed; Ctrl-C; SIGTERM) ends the job with one line and the
shell's exit code, resumable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mnistlab.train.checkpoint import CHECKPOINT, Checkpoint

from .support.cli import mnistlab

pytestmark = pytest.mark.slow

EPOCHS = 3


def _train_args(out: Path, mnist_path: Path) -> list[str]:
    return [
        "train",
        "--config",
        "seed-b-fixed",
        "--epochs",
        str(EPOCHS),
        "--data-dir",
        str(mnist_path),
        "--out",
        str(out),
    ]


def _children(parent: int) -> list[int]:
    """The processes whose parent is `parent` (the ranks a launcher started)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                found.append(int(proc.name))
        except (OSError, ProcessLookupError):
            continue
    return found


def _running(pid: int) -> bool:
    """Whether `pid` still runs (a zombie waiting for init to reap it has ended)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _start(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_first_epoch(job: subprocess.Popen, out: Path) -> list[int]:
    """Wait until the job has saved an epoch; its ranks' pids."""
    deadline = time.monotonic() + 180
    while not (out / "metrics.json").exists():
        assert job.poll() is None, job.communicate()[1]
        assert time.monotonic() < deadline, "no epoch finished in 180 s"
        time.sleep(0.1)
    ranks = _children(job.pid)
    assert len(ranks) == 2, ranks
    return ranks


@pytest.fixture(scope="module")
def uninterrupted(mnist_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("whole") / "run"
    result = mnistlab(*_train_args(out, mnist_path), "--nproc", "2")
    assert result.returncode == 0, result.stderr
    return _results(out)


def _results(out: Path) -> dict:
    """The run's final metrics but its timings."""
    final = json.loads((out / "metrics.json").read_text())["final"]
    return {k: v for k, v in final.items() if "seconds" not in k}


def _resumes_to_the_same_end(out: Path, mnist_path: Path, uninterrupted: dict) -> None:
    done = Checkpoint.load(out / CHECKPOINT).state["epoch"]
    assert 1 <= done < EPOCHS
    resumed = mnistlab("train", "--nproc", "2", "--resume", str(out), "--data-dir", str(mnist_path))
    assert resumed.returncode == 0, resumed.stderr
    assert _results(out) == uninterrupted


@pytest.mark.parametrize("launcher", ["mnistlab --nproc", "torchrun"])
def test_ranks_end_when_their_launcher_is_killed(
    launcher: str, mnist_path: Path, tmp_path: Path, uninterrupted: dict
) -> None:
    out = tmp_path / "run"
    if launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        command += ["-m", "mnistlab", *_train_args(out, mnist_path)]
    else:
        command = [sys.executable, "-m", "mnistlab", *_train_args(out, mnist_path), "--nproc", "2"]
    job = _start(command)
    ranks = _wait_for_first_epoch(job, out)
    os.kill(job.pid, signal.SIGKILL)
    job.communicate()
    deadline = time.monotonic() + 10
    while any(map(_running, ranks)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(_running, ranks)), f"ranks {[r for r in ranks if _running(r)]} outlived their launcher"
    _resumes_to_the_same_end(out, mnist_path, uninterrupted)


@pytest.mark.parametrize(
    ("sig", "code", "line"),
    [(signal.SIGHUP, 129, "mnistlab: terminated (SIGHUP)"), (signal.SIGINT, 130, "mnistlab: interrupted")],
)
def test_a_signal_to_the_launcher_ends_the_job_with_one_line(
    sig: int, code: int, line: str, mnist_path: Path, tmp_path: Path, uninterrupted: dict
) -> None:
    out = tmp_path / "run"
    job = _start([sys.executable, "-m", "mnistlab", *_train_args(out, mnist_path), "--nproc", "2"])
    ranks = _wait_for_first_epoch(job, out)
    os.kill(job.pid, sig)
    _, stderr = job.communicate(timeout=60)
    assert job.returncode == code, stderr
    assert "Traceback" not in stderr and "SignalException" not in stderr
    ended = [x for x in stderr.splitlines() if x.startswith("mnistlab: ")]
    assert ended == [line], stderr  # once, from the launcher: the ranks leave it to the launcher
    assert "Resume with: mnistlab train --resume" in stderr
    assert not any(map(_running, ranks))
    _resumes_to_the_same_end(out, mnist_path, uninterrupted)
