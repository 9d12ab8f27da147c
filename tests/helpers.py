"""Helpers shared by the tests: the CLI as a user runs it, small real-data subsets, an interrupted-then-resumed run."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from mnistlab.config import Config, load_config
from mnistlab.data.splits import MnistData, Split
from mnistlab.train.loop import Run, resume, train


def subset(data: MnistData, n_train: int, n_eval: int) -> MnistData:
    """The first images of each split, for tests that need real data but not all of it."""

    def head(s: Split, n: int) -> Split:
        return Split(s.images[:n], s.labels[:n])

    return MnistData(
        data.name, head(data.train, n_train), head(data.val, n_eval), head(data.test, n_eval), data.mean, data.std
    )


def without_time(epochs: list[dict]) -> list[dict]:
    """Per-epoch metrics without the timings, which differ from run to run."""
    return [{k: v for k, v in e.items() if "seconds" not in k} for e in epochs]


def interrupted_and_resumed(config: Config, run_dir: Path, data: MnistData, after: int) -> Run:
    """Train `config` into `run_dir`, interrupt it (as Ctrl-C would) after epoch `after`, then resume it."""

    def interrupt(record: dict) -> None:
        if record["epoch"] == after:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, out_dir=run_dir, quiet=True, data=data, device="cpu", on_epoch_end=interrupt)
    assert len(json.loads((run_dir / "metrics.json").read_text())["epochs"]) == after
    assert not (run_dir / "model.safetensors").exists()  # only a finished run has a model
    return resume(run_dir, quiet=True, data=data, device="cpu")


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


def train_small(out: Path, mnist_data, images: int) -> Path:
    """seed-b-fixed trained for one epoch on the first `images` training images (well under a second)."""
    threads = torch.get_num_threads()
    # One thread: this small MLP gains nothing from a second, and two spin badly when the cores are busy
    # (20,000 images: 0.5 s with one thread, 6 s with two while another process ran).
    torch.set_num_threads(1)
    try:
        config = load_config("seed-b-fixed").with_overrides({"training.epochs": 1})
        train(config, out_dir=out, data=subset(mnist_data, images, 1000), device="cpu", quiet=True)
    finally:
        torch.set_num_threads(threads)
    return out


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def serve_folder(folder: Path) -> Iterator[str]:
    """A real ThreadingHTTPServer on 127.0.0.1 (a free port) serving `folder`; yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
