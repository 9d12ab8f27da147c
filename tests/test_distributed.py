"""Training across processes (torch.distributed, gloo on the CPU, 2 processes, the real MNIST): one step of two
ranks is one step of one process, a 1-epoch run matches a single process's accuracy, only rank 0 writes, and a
rank that dies or hangs fails the job within the timeout, leaving a checkpoint that resumes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from mnistlab.config import Config, load_config
from mnistlab.data.splits import MnistData
from mnistlab.train import distributed
from mnistlab.train.checkpoint import CHECKPOINT, Checkpoint
from mnistlab.train.loop import Steps, train_epoch
from mnistlab.train.state import RunState

from .support.cli import mnistlab
from .support.mnist import subset

# A BatchNorm-free CNN, so that a step of two ranks is exactly a step of one process (with BatchNorm each rank
# normalises by its own share's statistics on the CPU; see docs/distributed.md).
_CNN = ["conv 8 3 1", "relu", "maxpool 2", "conv 16 3 1", "relu", "maxpool 2", "flatten", "linear 10"]
# Odd batch sizes, so that the two ranks' shares differ in size.
CONFIGS = {
    "mlp-by-hand": load_config("seed-a-fixed").with_overrides({"training.batch_size": 63}),
    "mlp-adam": load_config("seed-b-fixed").with_overrides({"training.batch_size": 63}),
    "mlp-autograd": load_config("seed-c-fixed").with_overrides({"training.loss": "nll", "training.batch_size": 63}),
    "cnn-augmented": load_config("cnn-fast").with_overrides(
        {
            "model.layers": _CNN,
            "training.amp": False,
            "training.scheduler": "none",
            "training.warmup_epochs": 0.0,
            "training.ema_decay": 0.9,
            "augment.rotate": 10.0,
            "augment.elastic_alpha": 2.0,
            "training.batch_size": 51,
        }
    ),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _steps(rank: int, config: Config, data: MnistData, world: int, port: int, out: Path) -> None:
    """Train one epoch of `data` (a few batches) as rank `rank` of `world`, and save the parameters."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    cluster, device = distributed.join(torch.device("cpu"))
    try:
        state = RunState(config, device, -(-len(data.train) // config.training.batch_size), cluster)
        steps = Steps.for_state(state, data)
        from tqdm import tqdm

        with tqdm(disable=True) as bar:
            metrics = train_epoch(state, steps, data, bar)
        if cluster.main:
            save_file({k: v.contiguous() for k, v in state.evaluated.state_dict().items()}, out)
            out.with_suffix(".json").write_text(json.dumps(metrics))
        cluster.barrier()  # leave together, as training does (distributed.leave)
    finally:
        distributed.leave(cluster)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.slow  # 3-8 s each on 2 busy cores: two processes
def test_a_step_of_two_ranks_is_a_step_of_one_process(name: str, mnist_data, tmp_path: Path) -> None:
    config = CONFIGS[name]
    data = subset(mnist_data, config.training.batch_size, 10)  # one batch: one step
    state = RunState(config, torch.device("cpu"), -(-len(data.train) // config.training.batch_size))
    from tqdm import tqdm

    with tqdm(disable=True) as bar:
        single = train_epoch(state, Steps.for_state(state, data), data, bar)
    expected = state.evaluated.state_dict()
    mp.start_processes(
        _steps, args=(config, data, 2, _free_port(), tmp_path / "ranks.safetensors"), nprocs=2, start_method="spawn"
    )
    params, metrics = load_file(tmp_path / "ranks.safetensors"), json.loads((tmp_path / "ranks.json").read_text())
    # Adam's first step is about lr * g / (|g| + 1e-8): the rounding noise left where a gradient cancels to about
    # 1e-11 (summed in another order by two ranks) moves such a weight by up to ~1e-6, so Adam gets 1e-5.
    tolerance = 1e-5 if config.optimizer.name == "adam" else 1e-6
    for key, value in expected.items():
        assert torch.allclose(params[key], value, atol=tolerance, rtol=0), key
    assert metrics["train_accuracy"] == single["train_accuracy"]
    assert metrics["train_loss"] == pytest.approx(single["train_loss"], rel=1e-5)


def test_shares_cover_a_batch_once(mnist_data) -> None:
    for total in range(0, 70):
        for world in (1, 2, 3, 5):
            rows = [distributed.Cluster(rank, world).share(total) for rank in range(world)]
            cut = torch.tensor_split(torch.arange(total), world)
            assert [list(range(total))[r] for r in rows] == [c.tolist() for c in cut]


@pytest.mark.slow
def test_two_processes_train_like_one(mnist_path: Path, tmp_path: Path) -> None:
    """`--nproc 2` for one epoch: the accuracy of a single process within 0.3 points, files written by rank 0
    only (one set, one printed result), the world size in metrics.json."""
    args = ["train", "--config", "seed-b-fixed", "--epochs", "1", "--data-dir", str(mnist_path)]
    one = mnistlab(*args, "--out", str(tmp_path / "one"))
    two = mnistlab(*args, "--nproc", "2", "--out", str(tmp_path / "two"))
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    a = json.loads((tmp_path / "one" / "metrics.json").read_text())
    b = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert abs(a["final"]["test_accuracy"] - b["final"]["test_accuracy"]) <= 0.003
    assert (b["world_size"], b["backend"], a["world_size"]) == (2, "gloo", 1)
    assert two.stdout.count("test accuracy") == 1 and "2 processes (gloo)" in two.stderr
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


def _rank_pids(launcher: int) -> dict[int, int]:
    """{local rank: pid} of the workers a torchrun process started."""
    ranks = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        env = dict(e.split(b"=", 1) for e in environ if b"=" in e)
        if parent == launcher and b"LOCAL_RANK" in env:
            ranks[int(env[b"LOCAL_RANK"])] = int(proc.name)
    return ranks


def _start(argv: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def _wait_for(path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_rank_that_dies_or_hangs_fails_the_job_and_the_checkpoint_resumes(
    fault: str, mnist_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    argv = [
        "-m",
        "mnistlab",
        "train",
        "--config",
        "seed-b-fixed",
        "--epochs",
        "4",
        "--data-dir",
        str(mnist_path),
        "--out",
        str(out),
    ]
    job = _start(argv, env={"MNISTLAB_DIST_TIMEOUT": "10"})
    _wait_for(out / CHECKPOINT)
    victim = _rank_pids(job.pid)[1]
    os.kill(victim, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
    try:
        _, stderr = job.communicate(timeout=90)
    finally:
        if fault == "hung":
            with pytest.raises(ProcessLookupError):  # torchrun has ended it
                os.kill(victim, signal.SIGCONT)
    assert job.returncode != 0  # ended, within communicate's 90 s
    if fault == "hung":
        assert "rank 0 of 2: lost the other ranks" in stderr
    done = Checkpoint.load(out / CHECKPOINT).state["epoch"]
    assert 1 <= done < 4
    resumed = mnistlab("train", "--nproc", "2", "--resume", str(out), "--data-dir", str(mnist_path))
    assert resumed.returncode == 0, resumed.stderr
    assert f"from epoch {done + 1}" in resumed.stderr
    assert len(json.loads((out / "metrics.json").read_text())["epochs"]) == 4


@pytest.mark.slow
def test_torchrun_restarts_resume_from_the_checkpoint(mnist_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    job = _start(
        [
            "--max-restarts",
            "1",
            "-m",
            "mnistlab",
            "train",
            "--config",
            "seed-b-fixed",
            "--epochs",
            "3",
            "--data-dir",
            str(mnist_path),
            "--out",
            str(out),
        ]
    )
    _wait_for(out / CHECKPOINT)
    os.kill(_rank_pids(job.pid)[1], signal.SIGKILL)
    _, stderr = job.communicate(timeout=300)
    assert job.returncode == 0, stderr
    assert "resuming seed-b-fixed" in stderr
    assert [e["epoch"] for e in json.loads((out / "metrics.json").read_text())["epochs"]] == [1, 2, 3]
