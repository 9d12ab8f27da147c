"""Reliability: every bad input of `reliability_cases.CASES` is a clear error; every file mnistlab writes loads
back; arbitrary bytes never crash, hang or exhaust memory in a loader; faults (signals, failed writes, full or
read-only disks, concurrent writers, divergence) leave the previous files intact and nothing half-written."""

from __future__ import annotations

import contextlib
import json
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from mnistlab.analysis.reports import reproduce
from mnistlab.config import ModelConfig, load_config
from mnistlab.data.idx import IMAGES_MAGIC, read_idx
from mnistlab.data.preprocess import NotAnImage, load_image, preprocess
from mnistlab.errors import MnistlabError
from mnistlab.files import LOCK, FolderLock, finite_json, signals_held
from mnistlab.models.files import load_model, save_model
from mnistlab.models.networks import build_model
from mnistlab.train.checkpoint import CHECKPOINT, Checkpoint
from mnistlab.train.loop import resume, train

from .support.cli import mnistlab
from .support.mnist import subset
from .support.reliability_cases import CASES, Case, Context, fresh_run, interrupt
from .support.runs import without_time

# ---------------------------------------------------------------------------------------------- every case


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory, mnist_path: Path) -> Path:
    return fresh_run(tmp_path_factory.mktemp("reliability"), mnist_path)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.slow  # a process a case, about 2.5 s each on 2 busy cores: 2-3 minutes
def test_bad_input_or_fault_is_a_clear_error(case: Case, base_run: Path, mnist_path: Path, tmp_path: Path) -> None:
    before = {p.name: p.read_bytes() for p in base_run.iterdir() if p.is_file()}
    result = case.run(Context(tmp_path, mnist_path, base_run))
    assert result.returncode == case.code, result.stderr
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr
    lines = result.stderr.strip().splitlines()
    if case.one_line:
        assert len(lines) == 1, result.stderr
    assert any(case.needle in line for line in lines) or not case.needle, result.stderr
    assert {p.name: p.read_bytes() for p in base_run.iterdir() if p.is_file()} == before  # the base run untouched


def test_the_cases_are_many_and_distinct() -> None:
    assert len(CASES) >= 40
    assert len({c.name for c in CASES}) == len(CASES)


# ---------------------------------------------------------------------------------------------- files load back


def _header_length(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[:8], "little")


# safetensors pads its header to a multiple of 8 bytes, so its length takes the 32 values 0, 8, ... 248 modulo 256.
HEADER_RESIDUES = set(range(0, 256, 8))


def test_checkpoints_load_back_whatever_their_header_length(tmp_path: Path) -> None:
    """The safetensors header length takes every value it can modulo 256 (its first byte; 128 is the pickle
    protocol byte 0x80, which an earlier kind-by-first-byte check mistook for a pickle), and every file loads
    back."""
    tensors = {"weight": torch.arange(6.0).reshape(2, 3)}
    residues = set()
    for pad in range(300):
        path = tmp_path / f"c{pad}.safetensors"
        Checkpoint(model=tensors, optimizer={}, rng={}, state={"epoch": 1, "pad": "x" * pad}).save(path)
        residues.add(_header_length(path) % 256)
        loaded = Checkpoint.load(path)
        assert loaded.state["pad"] == "x" * pad and torch.equal(loaded.model["weight"], tensors["weight"])
    assert residues == HEADER_RESIDUES


@pytest.mark.slow  # 10 s on 2 busy cores
def test_model_files_load_back_whatever_their_header_length(tmp_path: Path) -> None:
    """The same for model files, whose header lists the tensors: vary depth and widths until every residue of
    the header length modulo 256 has been written and read back."""
    residues: set[int] = set()
    x = torch.rand(4, 28, 28)
    rng = np.random.default_rng(0)
    for i in range(2000):  # all 32 residues are seen after 276 models with this seed
        depth = int(rng.integers(1, 12))
        config = ModelConfig(hidden=[int(w) for w in rng.integers(1, 300, depth)], activations=["relu"] * depth)
        network = build_model(config)
        folder = tmp_path / f"m{i}"
        save_model(network, config, folder, None, metadata={"i": i})
        residue = _header_length(folder / "model.safetensors") % 256
        if residue not in residues:
            residues.add(residue)
            assert torch.equal(load_model(folder).model(x), network(x))
        if residues == HEADER_RESIDUES:
            break
    assert residues == HEADER_RESIDUES


_names = st.text("abcdefghij_.0123456789", min_size=1, max_size=24)
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(
    model=st.dictionaries(_names, st.integers(1, 5).map(lambda n: torch.rand(n, 3)), max_size=4),
    best=st.dictionaries(_names, st.integers(1, 3).map(lambda n: torch.rand(n)), max_size=2),
    extra=st.dictionaries(st.text(max_size=10), _json, max_size=5),
    epoch=st.integers(0, 10_000),
)
def test_any_checkpoint_round_trips(tmp_path_factory, model, best, extra, epoch) -> None:
    path = tmp_path_factory.mktemp("ckpt") / CHECKPOINT
    state = {**extra, "epoch": epoch}
    Checkpoint(model=model, optimizer={}, rng={"torch": torch.get_rng_state()}, state=state, best=best).save(path)
    loaded = Checkpoint.load(path)
    assert loaded.state == finite_json(state)  # non-finite numbers are stored as null: JSON has no NaN
    assert loaded.model.keys() == model.keys() and all(torch.equal(loaded.model[k], v) for k, v in model.items())
    assert loaded.best.keys() == best.keys()


@settings(max_examples=40, deadline=None)
@given(
    hidden=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    activation=st.sampled_from(["relu", "tanh", "sigmoid", "gelu"]),
    softmax=st.booleans(),
    metadata=st.dictionaries(st.text(max_size=12), _json, max_size=6),
)
def test_any_model_file_round_trips(tmp_path_factory, hidden, activation, softmax, metadata) -> None:
    config = ModelConfig(hidden=hidden, activations=[activation] * len(hidden), softmax_output=softmax)
    network = build_model(config)
    folder = tmp_path_factory.mktemp("model")
    save_model(network, config, folder, (0.1307, 0.3081), metadata=metadata)
    loaded = load_model(folder)
    x = torch.rand(3, 28, 28)
    assert torch.allclose(loaded.model(x), network((x - 0.1307) / 0.3081))
    assert loaded.configs == [config] and loaded.metadata == finite_json(metadata)


# ---------------------------------------------------------------------------------------------- arbitrary bytes


@contextlib.contextmanager
def bounded_memory(extra: int = 1 << 30) -> Iterator[None]:
    """Cap this process's address space at what it uses now plus `extra`: a loader that believed a size field
    and allocated for it fails with MemoryError instead of passing."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    used = int(status["VmSize"].split()[0]) * 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (used + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _only_user_errors(load, path: Path, data: bytes) -> None:
    path.write_bytes(data)
    start = time.process_time()
    with bounded_memory(), contextlib.suppress(MnistlabError):
        load(path)
    # Nothing spins: this process's CPU time, which other processes on a busy machine do not stretch.
    assert time.process_time() - start < 5


_safetensors_like = st.builds(
    lambda n, body: n.to_bytes(8, "little") + body,
    st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 300)),
    st.binary(max_size=400) | st.text(max_size=300).map(lambda t: ("{" + t).encode()),
)
_fuzz = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_fuzz
@given(data=st.binary(max_size=2000) | _safetensors_like)
@example(data=(0x80).to_bytes(8, "little") + b"{}" + b"\0" * 200)
@example(data=(1 << 62).to_bytes(8, "little") + b'{"a": 1}')
def test_model_loader_takes_any_bytes(tmp_path: Path, data: bytes) -> None:
    (tmp_path / "model.json").write_text('{"format": "mnistlab-model", "model": {}, "normalize": null}')
    _only_user_errors(load_model, tmp_path / "model.safetensors", data)


@_fuzz
@given(data=st.binary(max_size=2000) | _safetensors_like)
def test_checkpoint_loader_takes_any_bytes(tmp_path: Path, data: bytes) -> None:
    _only_user_errors(Checkpoint.load, tmp_path / CHECKPOINT, data)


@_fuzz
@given(
    data=st.binary(max_size=2000)
    | st.builds(
        lambda dims, body: (
            IMAGES_MAGIC.to_bytes(4, "big")[:3]
            + bytes([len(dims)])
            + b"".join(d.to_bytes(4, "big") for d in dims)
            + body
        ),
        st.lists(st.integers(0, 2**32 - 1) | st.integers(0, 30), max_size=4),
        st.binary(max_size=500),
    )
)
def test_idx_reader_takes_any_bytes(tmp_path: Path, data: bytes) -> None:
    _only_user_errors(lambda p: read_idx(p, IMAGES_MAGIC), tmp_path / "images-idx3-ubyte", data)


@_fuzz
@given(
    data=st.binary(max_size=1000)
    | st.dictionaries(
        st.sampled_from(["model", "optimizer", "training", "augment", "data", "name", "x"]),
        st.dictionaries(st.text("abcdefghijklmnopqrstuvwxyz_", max_size=14), _json, max_size=4) | _json,
        max_size=4,
    ).map(lambda d: "\n".join(f"{k} = {json.dumps(v)}" for k, v in d.items()).encode())
)
def test_config_loader_takes_any_bytes(tmp_path: Path, data: bytes) -> None:
    _only_user_errors(load_config, tmp_path / "config.toml", data)


@_fuzz
@given(data=st.binary(max_size=3000))
@example(data=b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
def test_image_preprocessing_takes_any_bytes(tmp_path: Path, data: bytes) -> None:
    _only_user_errors(preprocess, tmp_path / "image.png", data)


_PNG_HEADER = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"


@_fuzz
@given(data=st.binary(max_size=3000) | st.binary(max_size=200).map(lambda b: _PNG_HEADER + b))
@example(data=b"")
def test_uploaded_bytes_load_as_files_do(tmp_path: Path, data: bytes) -> None:
    """The web server's path (bytes) and predict's (a file) accept and refuse the same images, for the same
    reason, with the same message but for the file's name."""
    path = tmp_path / "image.png"
    path.write_bytes(data)
    outcomes = []
    with bounded_memory():
        for source in (data, path):
            try:
                outcomes.append(np.asarray(load_image(source)))
            except MnistlabError as exc:
                outcomes.append((type(exc), str(exc).removeprefix(f"{path}: ")))
    from_bytes, from_file = outcomes
    if isinstance(from_bytes, np.ndarray):
        assert isinstance(from_file, np.ndarray) and np.array_equal(from_bytes, from_file)
    elif data:
        assert from_bytes == from_file
    else:  # empty: said in the words of each
        assert from_bytes[0] is from_file[0] is NotAnImage


@settings(max_examples=100, deadline=None)
@given(
    array=st.integers(1, 80).flatmap(
        lambda h: st.integers(1, 80).flatmap(
            lambda w: st.binary(min_size=h * w, max_size=h * w).map(
                lambda b: np.frombuffer(b, dtype=np.uint8).reshape(h, w)
            )
        )
    )
)
def test_image_preprocessing_takes_any_pixels(array: np.ndarray) -> None:
    try:
        out = preprocess(Image.fromarray(array))
    except MnistlabError:
        return
    assert out.tensor.shape == (28, 28) and torch.isfinite(out.tensor).all()
    assert float(out.tensor.min()) >= 0 and float(out.tensor.max()) <= 1


# ---------------------------------------------------------------------------------------------- faults


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


# Run in a child process: its checkpoint writes stop half-way, the process killed with SIGKILL at that moment.
_KILLED_MID_WRITE = """
import os, pathlib, signal, sys
write = pathlib.Path.write_bytes
def half_then_die(self, data):
    if self.name.startswith(".checkpoint.safetensors."):
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return write(self, data)
pathlib.Path.write_bytes = half_then_die
from mnistlab.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow  # 95 s on 2 busy cores
def test_a_failed_write_keeps_the_previous_files(base_run: Path, mnist_path: Path, tmp_path: Path) -> None:
    """Resume, then make the checkpoint write fail (a size limit, as on a full disk), or kill the process in the
    middle of writing it: the run's files are the previous ones, whole, and no half-written file takes a real
    name; the run then resumes."""
    run = tmp_path / "run"
    run.mkdir()
    for p in base_run.iterdir():
        if p.is_file():
            (run / p.name).write_bytes(p.read_bytes())
    before = _files(run)
    argv = ["train", "--resume", str(run), "--epochs", "2", "--data-dir", str(mnist_path), "--quiet"]

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))  # Python ignores SIGXFSZ

    failed = mnistlab(*argv, preexec_fn=limit)
    assert failed.returncode == 2 and "cannot write (file too large" in failed.stderr, failed.stderr
    assert _files(run) == before  # not even a temporary file is left
    killed = subprocess.run([sys.executable, "-c", _KILLED_MID_WRITE, *argv], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert {name: data for name, data in _files(run).items() if not name.startswith(".")} == before
    assert any(name.startswith(".checkpoint.safetensors.") for name in _files(run))  # it did die mid-write
    assert Checkpoint.load(run / CHECKPOINT).state["epoch"] == 1
    assert mnistlab(*argv).returncode == 0
    assert Checkpoint.load(run / CHECKPOINT).state["epoch"] == 2


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 3 MB tmpfs (where this process may mount one: root here and in CI); unmounted afterwards."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow  # 15 s on 2 busy cores
def test_a_full_disk_is_a_clear_error_and_keeps_nothing_half_written(small_filesystem: Path, mnist_path: Path):
    out = small_filesystem / "run"
    result = mnistlab(
        "train", "--config", "seed-b-fixed", "--epochs", "1", "--data-dir", str(mnist_path), "--out", str(out)
    )
    assert result.returncode == 2 and "no space left on the device" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not any(p.suffix == ".safetensors" for p in small_filesystem.rglob("*"))


@pytest.mark.slow  # 19 s on 2 busy cores
def test_a_read_only_folder_is_a_clear_error(
    small_filesystem: Path, mnist_path: Path, base_run: Path, tmp_path: Path
) -> None:
    (small_filesystem / "existing").mkdir()
    twin = tmp_path / "twin"  # a second member (the same run twice is refused before anything is written)
    shutil.copytree(base_run, twin)
    subprocess.run(["mount", "-o", "remount,ro", str(small_filesystem)], check=True)
    commands = [
        ["train", "--config", "seed-a", "--data-dir", str(mnist_path), "--out", str(small_filesystem / "run")],
        [
            "train",
            "--config",
            "seed-a",
            "--data-dir",
            str(mnist_path),
            "--out",
            str(small_filesystem / "existing"),
            "--force",
        ],
        ["compare", str(base_run), "--out", str(small_filesystem / "cmp")],
        [
            "ensemble",
            str(base_run),
            str(twin),
            "--out",
            str(small_filesystem / "ens"),
            "--data-dir",
            str(mnist_path),
        ],
        ["reproduce", "--out", str(small_filesystem / "repro"), "--data-dir", str(mnist_path)],
        ["inspect", str(base_run), "--out", str(small_filesystem / "inspect"), "--data-dir", str(mnist_path)],
        ["predict", str(base_run / "curves.png"), "--show", str(small_filesystem / "show")],
    ]
    for argv in commands:
        result = mnistlab(*argv)
        assert result.returncode == 2, (argv, result.stderr)
        assert "read-only file system" in result.stderr and "Traceback" not in result.stderr, result.stderr


@pytest.mark.slow  # 26 s on 2 busy cores
def test_divergence_keeps_the_last_good_epoch_and_writes_no_nan(mnist_path: Path, tmp_path: Path) -> None:
    """A schedule that multiplies SGD's rate by 1e7 after epoch 1 diverges in epoch 2: the command fails with the
    epoch and the setting to change, and the folder keeps epoch 1's checkpoint and metrics, as strict JSON."""
    out = tmp_path / "run"
    result = mnistlab(
        "train",
        "--config",
        "seed-b-fixed",
        "--epochs",
        "3",
        "--optimizer",
        "sgd",
        "--lr",
        "0.1",
        "--scheduler",
        "step",
        "--set",
        "training.gamma=1e7",
        "--data-dir",
        str(mnist_path),
        "--out",
        str(out),
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "training diverged in epoch 2" in result.stderr and "optimizer.lr" in result.stderr
    assert "keeps the last good epoch" in result.stderr

    def no_constants(name: str) -> None:
        raise AssertionError(f"{name} in JSON")

    metrics = json.loads((out / "metrics.json").read_text(), parse_constant=no_constants)
    assert len(metrics["epochs"]) == 1
    assert Checkpoint.load(out / CHECKPOINT).state["epoch"] == 1
    assert not (out / "model.safetensors").exists()


def test_interrupt_before_the_first_epoch_leaves_no_folder(mnist_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = ["train", "--config", "seed-b-fixed", "--data-dir", str(mnist_path), "--out", str(out)]
    stopped = interrupt(signal.SIGINT, when=".lock")(Context(tmp_path, mnist_path, out), argv)
    assert stopped.returncode == 130 and "Traceback" not in stopped.stderr, stopped.stderr
    assert not out.exists()  # so a retry needs no --force


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.slow  # 18-280 s on 2 busy cores: a 3-epoch run, stopped and resumed, and a whole one
def test_a_signal_mid_run_then_resume_gives_identical_metrics(sig, mnist_path: Path, tmp_path: Path) -> None:
    args = ["train", "--config", "seed-b-fixed", "--epochs", "3", "--val-size", "1000", "--data-dir", str(mnist_path)]
    whole = mnistlab(*args, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    cut = tmp_path / "cut"
    # Once epoch 1's metrics.json exists (it is written right after the checkpoint, which a signal could
    # otherwise split from it), so that the cut run has both of its files to compare.
    stopped = interrupt(sig, when="metrics.json")(Context(tmp_path, mnist_path, cut), [*args, "--out", str(cut)])
    done = json.loads((cut / "metrics.json").read_text())["epochs"]
    if len(done) == 3:
        pytest.skip("the run finished before the signal arrived")
    assert stopped.returncode == 128 + sig and f"mnistlab train --resume {cut}" in stopped.stderr
    resumed = mnistlab("train", "--resume", str(cut), "--data-dir", str(mnist_path))
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((tmp_path / "whole" / "metrics.json").read_text())["epochs"]
    b = json.loads((cut / "metrics.json").read_text())["epochs"]
    assert without_time(a) == without_time(b)


def test_an_early_stopped_run_trains_further_with_more_epochs(mnist_data, tmp_path: Path) -> None:
    data = subset(mnist_data, 3000, 2000)
    config = load_config("seed-b-fixed").with_overrides(
        {"training.epochs": 30, "training.early_stopping": 1, "optimizer.lr": 0.003}
    )
    first = train(config, out_dir=tmp_path / "run", data=data, quiet=True)
    assert first.stop_reason == "early_stopping"
    done = len(first.epochs)
    with pytest.raises(MnistlabError, match="already complete"):
        resume(tmp_path / "run", data=data, quiet=True)
    more = resume(tmp_path / "run", epochs=done + 2, data=data, quiet=True)
    assert len(more.epochs) > done and more.epochs[:done] == first.epochs


def test_an_interrupted_reproduce_continues_where_it_stopped(mnist_data, tmp_path: Path) -> None:
    data = subset(mnist_data, 2000, 500)
    out = tmp_path / "repro"
    train(load_config("seed-a").with_overrides({"training.epochs": 1}), out_dir=out / "seed-a", data=data, quiet=True)
    seed_a = _files(out / "seed-a")

    def stop(record: dict) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        seed_b = load_config("seed-b").with_overrides({"training.epochs": 1})
        train(seed_b, out_dir=out / "seed-b", data=data, quiet=True, on_epoch_end=stop)
    report = reproduce(out, epochs=1, data=data, quiet=True)
    assert _files(out / "seed-a") == seed_a  # kept as it was
    assert (out / "seed-b" / "model.safetensors").is_file() and (out / "seed-c-fixed" / "model.safetensors").is_file()
    assert "| seed-c-fixed |" in report.read_text()
    other = tmp_path / "other"
    train(load_config("seed-a").with_overrides({"training.epochs": 2}), out_dir=other / "seed-a", data=data, quiet=True)
    with pytest.raises(MnistlabError, match="different settings"):
        reproduce(other, epochs=1, data=data, quiet=True)


def test_a_folder_lock_nests_within_a_process_and_refuses_another(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    with FolderLock(folder):
        with FolderLock(folder):  # a sweep holds its trial's folder while train writes it
            pass
        assert (folder / LOCK).exists()  # the inner release left the outer lock in place
        other = subprocess.run(
            [sys.executable, "-c", f"from mnistlab.files import FolderLock; FolderLock({str(folder)!r}).acquire()"],
            capture_output=True,
            text=True,
        )
        assert other.returncode == 1 and "is being written by another mnistlab command" in other.stderr
    assert not folder.exists()  # made by the lock, nothing written: removed


def test_ctrl_c_inside_a_held_block_waits_for_the_block_to_finish(tmp_path: Path) -> None:
    """The checkpoint and its metrics.json are written together: Ctrl-C in between takes effect after both."""
    written = []
    with pytest.raises(KeyboardInterrupt), signals_held():
        signal.raise_signal(signal.SIGINT)
        for name in ("checkpoint", "metrics"):
            (tmp_path / name).write_text(name)
            written.append(name)
    assert written == ["checkpoint", "metrics"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is back


def test_sigterm_inside_a_held_block_ends_the_process_after_the_block(tmp_path: Path) -> None:
    script = (
        "import os, signal, sys\n"
        "from mnistlab.files import signals_held\n"
        "with signals_held():\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        f"    open({str(tmp_path / 'done')!r}, 'w').write('written')\n"
        "print('not reached')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGTERM and "not reached" not in result.stdout
    assert (tmp_path / "done").read_text() == "written"
