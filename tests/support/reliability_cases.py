"""Bad inputs and faults, as data: each case is a `mnistlab` command a user could type (with the files it needs),
the exit code it must end with and what its one-line message must say.

`tests/test_reliability.py` runs every case; `benchmarks/reliability_table.py` runs them again and writes the
exact messages into docs/reliability.md, so the table there is what the tests check.
"""

from __future__ import annotations

import json
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from mnistlab.config import load_config

from .cli import mnistlab
from .digit_images import blank_png


@dataclass
class Context:
    """The files the cases work on: a scratch folder, the real MNIST, and a finished 1-epoch run of seed-b-fixed
    (`run`), which cases copy before they change it."""

    tmp: Path
    data: Path
    run: Path

    def copy_run(self, name: str) -> Path:
        target = self.tmp / name
        shutil.copytree(self.run, target)
        return target


@dataclass
class Case:
    """One bad input or fault: `argv` may use {tmp}, {data} and {run}; `prepare` makes the files it needs."""

    name: str
    argv: list[str]
    code: int
    needle: str
    prepare: Callable[[Context], None] | None = None
    env: dict[str, str] = field(default_factory=dict)
    # For faults that need more than a plain command (signals, resource limits): runs the case itself.
    runner: Callable[[Context, list[str]], subprocess.CompletedProcess] | None = None
    one_line: bool = True  # argparse's own usage errors print the usage line too

    def run(self, ctx: Context) -> subprocess.CompletedProcess:
        if self.prepare is not None:
            self.prepare(ctx)
        argv = [a.format(tmp=ctx.tmp, data=ctx.data, run=ctx.run) for a in self.argv]
        if self.runner is not None:
            return self.runner(ctx, argv)
        return mnistlab(*argv, env={k: v.format(tmp=ctx.tmp) for k, v in self.env.items()})


# ---------------------------------------------------------------------------------------------- file makers


def _write(relative: str, content: bytes | str) -> Callable[[Context], None]:
    def prepare(ctx: Context) -> None:
        path = ctx.tmp / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)

    return prepare


def _image(relative: str, array: np.ndarray, **save: object) -> Callable[[Context], None]:
    def prepare(ctx: Context) -> None:
        path = ctx.tmp / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path, **save)

    return prepare


def _run_copy(name: str, change: Callable[[Path], None] | None = None) -> Callable[[Context], None]:
    """A copy of the finished run as `{tmp}/<name>`, changed by `change`."""

    def prepare(ctx: Context) -> None:
        target = ctx.copy_run(name)
        if change is not None:
            change(target)

    return prepare


def _unfinish(run: Path) -> None:
    """The state of a run killed after an epoch was saved: no model files yet."""
    for name in ("model.safetensors", "model.json"):
        (run / name).unlink()


def _nan_temperature(run: Path) -> None:
    description = json.loads((run / "model.json").read_text())
    description["calibration"]["temperature"] = float("nan")
    (run / "model.json").write_text(json.dumps(description))  # Python writes NaN, as a careless tool would


def _nan_threshold(run: Path) -> None:
    description = json.loads((run / "model.json").read_text())
    description["outliers"]["threshold"] = float("nan")
    (run / "model.json").write_text(json.dumps(description))


def _no_detector(run: Path) -> None:
    description = json.loads((run / "model.json").read_text())
    del description["outliers"]
    (run / "model.json").write_text(json.dumps(description))


def _no_validation_split(run: Path) -> None:
    description = json.loads((run / "model.json").read_text())
    description["metadata"]["split"]["val_size"] = 0
    (run / "model.json").write_text(json.dumps(description))


def _edit_config(run: Path) -> None:
    text = (run / "config.toml").read_text().replace("hidden = [512]", "hidden = [256]")
    (run / "config.toml").write_text(text)


def _truncate_weights(run: Path) -> None:
    data = (run / "model.safetensors").read_bytes()
    (run / "model.safetensors").write_bytes(data[: len(data) // 2])


def _pickle_weights(run: Path) -> None:
    import pickle

    (run / "model.safetensors").write_bytes(pickle.dumps({"weight": [1.0, 2.0]}))  # what torch.save's files hold


def _wrong_shape(run: Path) -> None:
    meta = json.loads((run / "model.json").read_text())
    meta["model"]["hidden"] = [256]
    (run / "model.json").write_text(json.dumps(meta))


def _nan_weights(run: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(run / "model.safetensors"))
    first = next(iter(state))
    state[first][0] = float("nan")
    save_file(state, str(run / "model.safetensors"), metadata={"format": "mnistlab-model"})


def _bad_json(run: Path) -> None:
    (run / "model.json").write_text("{not json")


def _foreign_json(run: Path) -> None:
    (run / "model.json").write_text('{"name": "something else"}')


def _truncate_checkpoint(run: Path) -> None:
    data = (run / "checkpoint.safetensors").read_bytes()
    (run / "checkpoint.safetensors").write_bytes(data[:1000])
    (run / "model.safetensors").unlink()  # an interrupted run: no model yet


def _bomb(ctx: Context) -> None:
    """A PNG of 30000 x 30000 pixels (100 kB on disk): refused before a pixel is decoded."""
    blank_png(ctx.tmp / "bomb.png", 30000, 30000)


def _truncated_png(ctx: Context) -> None:
    path = ctx.tmp / "digit.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)).save(path)
    data = path.read_bytes()
    (ctx.tmp / "truncated.png").write_bytes(data[: len(data) // 2])


def _data_with_corrupt_file(ctx: Context) -> None:
    folder = ctx.tmp / "corrupt-data" / "mnist"
    folder.mkdir(parents=True)
    for source in ctx.data.glob("*-ubyte.gz"):
        shutil.copy(source, folder / source.name)
    (folder / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b" + b"\0" * 100)


# ---------------------------------------------------------------------------------------------- fault runners


def interrupt(
    sig: int, when: str = "checkpoint.safetensors"
) -> Callable[[Context, list[str]], subprocess.CompletedProcess]:
    """Start the command, send `sig` once the file `when` exists in its --out folder (by default its first
    checkpoint: mid-run), and wait for it to end."""

    def runner(ctx: Context, argv: list[str]) -> subprocess.CompletedProcess:
        out = Path(argv[argv.index("--out") + 1])
        proc = subprocess.Popen(
            [sys.executable, "-m", "mnistlab", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # A shell that starts jobs in the background makes them ignore SIGINT; give the child the default.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        deadline = time.monotonic() + 300
        while not (out / when).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=300)
        return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)

    return runner


def _file_size_limit(ctx: Context, argv: list[str]) -> subprocess.CompletedProcess:
    """Files over 1 MB fail to write (EFBIG), as on a full disk or under a quota; the checkpoint is bigger."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))

    return mnistlab(*argv, preexec_fn=limit)


def _two_writers(ctx: Context, argv: list[str]) -> subprocess.CompletedProcess:
    """A second `train` into the folder a first one is writing: the second is refused, the first finishes."""
    out = Path(argv[argv.index("--out") + 1])
    first = subprocess.Popen(
        [sys.executable, "-m", "mnistlab", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not (out / ".lock").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    second = mnistlab(*argv)
    _, first_err = first.communicate(timeout=600)
    assert first.returncode == 0, first_err  # the first run is not disturbed
    return second


def _head_one(ctx: Context, argv: list[str]) -> subprocess.CompletedProcess:
    """`mnistlab configs | head -1`: the reader goes away after one line."""
    proc = subprocess.Popen([sys.executable, "-m", "mnistlab", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()
    proc.stdout.close()
    _, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, first.decode(), stderr.decode())


# ---------------------------------------------------------------------------------------------- the cases

_SEED_A = ["train", "--config", "seed-a", "--data-dir", "{data}"]
_TRAIN = ["train", "--config", "seed-b-fixed", "--epochs", "1", "--data-dir", "{data}"]
_BLANK = np.full((64, 64), 255, dtype=np.uint8)
_NOISE = (np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)

CASES: list[Case] = [
    # configs and settings
    Case("unknown config name", ["train", "--config", "seed-z"], 2, "no config named 'seed-z'"),
    Case(
        "config file that is not TOML",
        ["train", "--config", "{tmp}/bad.toml"],
        2,
        "not valid TOML",
        _write("bad.toml", "[model\nhidden = "),
    ),
    Case(
        "config file with an unknown key",
        ["train", "--config", "{tmp}/typo.toml"],
        2,
        "unknown key model.hiden",
        _write("typo.toml", "[model]\nhiden = [512]\n"),
    ),
    Case(
        "config value of the wrong type",
        ["train", "--config", "{tmp}/type.toml"],
        2,
        "expected int",
        _write("type.toml", '[training]\nepochs = "ten"\n'),
    ),
    Case(
        "config file that is not text",
        ["train", "--config", "{tmp}/binary.toml"],
        2,
        "not valid TOML",
        _write("binary.toml", b"\xff\xfe\x00\x01"),
    ),
    Case("--lr nan", [*_SEED_A, "--lr", "nan"], 2, "optimizer.lr must be a finite number"),
    Case("--lr inf", [*_SEED_A, "--lr", "inf"], 2, "optimizer.lr must be a finite number"),
    Case("--lr 0", [*_SEED_A, "--lr", "0"], 2, "optimizer.lr must be positive"),
    Case("--weight-decay -1", [*_SEED_A, "--weight-decay", "-1"], 2, "weight_decay must be 0 or more"),
    Case("--momentum -1", [*_SEED_A, "--momentum", "-1"], 2, "momentum and optimizer.weight_decay must be 0 or more"),
    Case("--epochs 0", [*_SEED_A, "--epochs", "0"], 2, "epochs and training.batch_size must be at least 1"),
    Case("--epochs x", [*_SEED_A, "--epochs", "x"], 2, "invalid int value: 'x'", one_line=False),
    Case("--loss that does not exist", [*_SEED_A, "--loss", "l1"], 2, "invalid choice: 'l1'", one_line=False),
    Case("--nesterov with Adam", ["train", "--config", "seed-b", "--nesterov"], 2, "nesterov needs"),
    Case(
        "early stopping without a validation split",
        [*_SEED_A, "--early-stopping", "3", "--val-size", "0"],
        2,
        "needs a validation split",
    ),
    Case("--set without =", [*_SEED_A, "--set", "optimizer.lr"], 2, "expected KEY=VALUE"),
    Case("--set of an unknown key", [*_SEED_A, "--set", "training.speed=9"], 2, "unknown config key 'training.speed'"),
    Case("--set of a wrong type", [*_SEED_A, "--set", "augment.rotate=fast"], 2, "augment.rotate: expected float"),
    Case(
        "--set of a bad layer list",
        ["train", "--config", "cnn-fast", "--set", 'model.layers=["conv 8 3", "wobble"]'],
        2,
        "unknown layer 'wobble'",
    ),
    Case("--device cuda without a GPU", [*_SEED_A, "--device", "cuda"], 2, "sees no CUDA GPU"),
    # data
    Case(
        "--data-dir that does not exist",
        ["train", "--config", "seed-a", "--data-dir", "{tmp}/nowhere"],
        2,
        "does not exist",
    ),
    Case(
        "--data-dir that is a file",
        ["train", "--config", "seed-a", "--data-dir", "{tmp}/file"],
        2,
        "is a file; point it at the folder",
        _write("file", "x"),
    ),
    Case(
        "MNISTLAB_DATA that does not exist",
        ["train", "--config", "seed-a", "--out", "{tmp}/r"],
        2,
        "MNISTLAB_DATA",
        env={"MNISTLAB_DATA": "{tmp}/nowhere"},
    ),
    Case(
        "corrupt gzip among the data files",
        ["train", "--config", "seed-a", "--data-dir", "{tmp}/corrupt-data", "--out", "{tmp}/corrupt-run"],
        2,
        "corrupt gzip data",
        _data_with_corrupt_file,
    ),
    # output folders
    Case(
        "--out that holds another run",
        [*_TRAIN, "--out", "{tmp}/taken"],
        2,
        "already exists and is not empty",
        _run_copy("taken"),
    ),
    Case("--out under a file", [*_TRAIN, "--out", "{tmp}/file2/run"], 2, "which is a file", _write("file2", "x")),
    Case(
        "a second train into a folder being written",
        [*_TRAIN, "--out", "{tmp}/busy"],
        2,
        "is being written by another mnistlab command",
        runner=_two_writers,
    ),
    Case(
        "a write that fails (file size limit, as a full disk)",
        [*_TRAIN, "--quiet", "--out", "{tmp}/limited"],
        2,
        "cannot write (file too large",
        runner=_file_size_limit,
    ),
    # training faults
    Case(
        "a diverging run (SGD at lr 1e6)",
        [*_TRAIN, "--quiet", "--optimizer", "sgd", "--lr", "1e6", "--out", "{tmp}/diverged"],
        2,
        "training diverged in epoch 1",
    ),
    Case(
        "Ctrl-C (SIGINT) mid-run",
        [*_TRAIN, "--epochs", "30", "--out", "{tmp}/sigint"],
        130,
        "mnistlab: interrupted",
        runner=interrupt(signal.SIGINT),
        one_line=False,
    ),
    Case(
        "SIGTERM mid-run",
        [*_TRAIN, "--epochs", "30", "--out", "{tmp}/sigterm"],
        143,
        "terminated (SIGTERM)",
        runner=interrupt(signal.SIGTERM),
        one_line=False,
    ),
    # resume
    Case("--resume of a folder that does not exist", ["train", "--resume", "{tmp}/none"], 2, "no such run directory"),
    Case(
        "--resume of an empty folder",
        ["train", "--resume", "{tmp}/empty"],
        2,
        "nothing to resume",
        lambda ctx: (ctx.tmp / "empty").mkdir(),
    ),
    Case(
        "--resume with a changed setting", ["train", "--resume", "{run}", "--lr", "0.1"], 2, "only --epochs may change"
    ),
    Case("--resume with another config", ["train", "--resume", "{run}", "--config", "seed-a"], 2, "different config"),
    Case(
        "--resume of a finished run", ["train", "--resume", "{run}", "--data-dir", "{data}"], 2, "is already complete"
    ),
    Case(
        "--resume with fewer epochs than trained",
        ["train", "--resume", "{tmp}/done", "--epochs", "0"],
        2,
        "is fewer",
        _run_copy("done"),
    ),
    Case(
        "--resume after editing config.toml",
        ["train", "--resume", "{tmp}/edited", "--epochs", "3"],
        2,
        "config.toml was edited after training started (model.hidden",
        _run_copy("edited", _edit_config),
    ),
    Case(
        "--resume of a truncated checkpoint",
        ["train", "--resume", "{tmp}/cut", "--epochs", "3"],
        2,
        "not a safetensors file",
        _run_copy("cut", _truncate_checkpoint),
    ),
    # model files
    Case("a model that does not exist", ["evaluate", "{tmp}/no-model"], 2, "no such model file or run directory"),
    Case(
        "weights that are a pickle",
        ["evaluate", "{tmp}/pickled"],
        2,
        "this is a pickle",
        _run_copy("pickled", _pickle_weights),
    ),
    Case(
        "truncated weights",
        ["evaluate", "{tmp}/halved"],
        2,
        "not a valid safetensors file",
        _run_copy("halved", _truncate_weights),
    ),
    Case(
        "model.json that is not JSON",
        ["evaluate", "{tmp}/badjson"],
        2,
        "model.json: not valid JSON",
        _run_copy("badjson", _bad_json),
    ),
    Case(
        "model.json of something else",
        ["evaluate", "{tmp}/foreign"],
        2,
        "model.json: not an mnistlab model",
        _run_copy("foreign", _foreign_json),
    ),
    Case(
        "weights that do not fit model.json",
        ["evaluate", "{tmp}/shape"],
        2,
        "do not match the architecture",
        _run_copy("shape", _wrong_shape),
    ),
    Case(
        "weights holding NaN",
        ["predict", "{tmp}/digit.png", "--model", "{tmp}/nan"],
        2,
        "weights are not finite",
        lambda ctx: (_run_copy("nan", _nan_weights)(ctx), _image("digit.png", _NOISE)(ctx)),
    ),
    Case("two different models named", ["evaluate", "{run}", "--model", "{tmp}/other"], 2, "two models given"),
    # images
    Case(
        "an image file that is not an image",
        ["predict", "{tmp}/notes.png"],
        1,
        "notes.png: not an image",
        _write("notes.png", "just text"),
        one_line=False,
    ),
    Case(
        "an empty image file", ["predict", "{tmp}/empty.png"], 1, "empty file", _write("empty.png", b""), one_line=False
    ),
    Case(
        "a truncated PNG",
        ["predict", "{tmp}/truncated.png"],
        1,
        "corrupt or truncated image",
        _truncated_png,
        one_line=False,
    ),
    Case(
        "a blank image",
        ["predict", "{tmp}/blank.png"],
        1,
        "blank.png: no digit found",
        _image("blank.png", _BLANK),
        one_line=False,
    ),
    Case("a decompression bomb", ["predict", "{tmp}/bomb.png"], 1, "too large to open safely", _bomb, one_line=False),
    Case(
        "a folder with no images",
        ["predict", "{tmp}/no-images"],
        1,
        "no image files in this folder",
        lambda ctx: (ctx.tmp / "no-images").mkdir(),
        one_line=False,
    ),
    Case(
        "--top-k 0",
        ["predict", "{tmp}/noise.png", "--top-k", "0"],
        2,
        "--top-k must be between 1 and 10",
        _image("noise.png", _NOISE),
    ),
    Case(
        "--top-k 11",
        ["predict", "{tmp}/noise.png", "--top-k", "11"],
        2,
        "--top-k must be between 1 and 10",
        _image("noise.png", _NOISE),
    ),
    Case(
        "--show under a file",
        ["predict", "{tmp}/noise.png", "--show", "{tmp}/file3/show"],
        2,
        "is a file",
        lambda ctx: (_image("noise.png", _NOISE)(ctx), _write("file3", "x")(ctx)),
    ),
    # other commands
    Case("export --onnx given a folder", ["export", "--onnx", "{tmp}"], 2, "is a folder"),
    Case(
        "export over an existing file",
        ["export", "--onnx", "{tmp}/notes.txt"],
        2,
        "already exists (use --force",
        _write("notes.txt", "keep me"),
    ),
    Case("compare of a folder that is not a run", ["compare", "{tmp}", "--out", "{tmp}/cmp"], 2, "not a run directory"),
    Case(
        "compare over an existing comparison",
        ["compare", "{run}", "--out", "{tmp}/cmp2"],
        2,
        "already has a comparison",
        _write("cmp2/report.md", "# mine"),
    ),
    Case("ensemble of one model", ["ensemble", "{run}", "--out", "{tmp}/ens"], 2, "at least two members"),
    Case(
        "reproduce into a file",
        ["reproduce", "--out", "{tmp}/file4"],
        2,
        "exists and is not a folder",
        _write("file4", "x"),
    ),
    Case(
        "output cut short by the reader (`configs | head -1`)", ["configs"], 141, "", runner=_head_one, one_line=False
    ),
    # sweeps (issue 26)
    Case(
        "sweep --storage in a folder that does not exist",
        [
            "sweep",
            "--config",
            "seed-a",
            "--space",
            "optimizer.lr=log:1e-4:1",
            "--out",
            "{tmp}/sw",
            "--storage",
            "{tmp}/no-such-dir/study.journal",
        ],
        2,
        "no-such-dir does not exist",
    ),
    Case(
        "sweep --space with a key twice",
        ["sweep", "--config", "seed-a", "--space", "optimizer.lr=log:1e-3:1", "--space", "optimizer.lr=0.1"],
        2,
        "--space optimizer.lr is given twice",
    ),
    Case(
        "sweep --space-file with fixed values only",
        ["sweep", "--config", "seed-a", "--space-file", "{tmp}/fixed.toml", "--out", "{tmp}/sw"],
        2,
        "fixed.toml only fixes optimizer.lr",
        _write("fixed.toml", '[space]\n"optimizer.lr" = 0.1\n'),
    ),
    Case(
        "sweep --threads 0",
        ["sweep", "--config", "seed-a", "--space", "optimizer.lr=log:1e-4:1", "--out", "{tmp}/sw", "--threads", "0"],
        2,
        "--threads must be at least 1",
    ),
    Case(
        "sweep --timeout -5",
        ["sweep", "--config", "seed-a", "--space", "optimizer.lr=log:1e-4:1", "--out", "{tmp}/sw", "--timeout", "-5"],
        2,
        "--timeout must be above 0 seconds",
    ),
    Case(
        "sweep --report with --trials", ["sweep", "--report", "{tmp}/sw", "--trials", "3"], 2, "--trials is for running"
    ),
    # using models: evaluate, ensemble, export (issue 26)
    Case(
        "ensemble of one run given twice",
        ["ensemble", "{run}", "{run}/", "--out", "{tmp}/ens"],
        2,
        "the same model given twice",
    ),
    Case(
        "ensemble of a run and a symlink to it",
        ["ensemble", "{run}", "{tmp}/link", "--out", "{tmp}/ens"],
        2,
        "the same model given twice",
        lambda ctx: (ctx.tmp / "link").symlink_to(ctx.run),
    ),
    Case(
        "export --onnx to a name not ending in .onnx (written, with a warning)",
        ["export", "{run}", "--onnx", "{tmp}/model.txt", "--data-dir", "{data}"],
        0,
        "model.txt: an ONNX model, though its name does not end in .onnx",
    ),
    # calibration (issue 22)
    Case(
        "a model file whose calibration temperature is NaN",
        ["evaluate", "{tmp}/nan-temperature"],
        2,
        "temperature must be a positive finite number",
        _run_copy("nan-temperature", _nan_temperature),
    ),
    Case(
        "calibrate a model trained without a validation split",
        ["calibrate", "{tmp}/no-val", "--data-dir", "{data}"],
        2,
        "trained without a validation split",
        _run_copy("no-val", _no_validation_split),
    ),
    Case(
        "a model file whose outlier threshold is NaN",
        ["evaluate", "{tmp}/nan-threshold"],
        2,
        "outlier threshold must be a positive finite number",
        _run_copy("nan-threshold", _nan_threshold),
    ),
    Case(
        "evaluate --outliers on a folder that is not there",
        ["evaluate", "{run}", "--outliers", "{tmp}/none"],
        2,
        "no such folder",
    ),
    Case(
        "evaluate --outliers on a folder of text files",
        ["evaluate", "{run}", "--outliers", "{tmp}/texts"],
        2,
        "no image files in this folder",
        _write("texts/a.txt", "not an image"),
    ),
    Case(
        "evaluate --outliers with a model file from before outlier detectors",
        ["evaluate", "{tmp}/no-detector", "--outliers", "{tmp}/no-detector"],
        2,
        "has no outlier detector",
        _run_copy("no-detector", _no_detector),
    ),
    # serving on a network (issue 25)
    Case("serve --port 99999", ["serve", "--port", "99999"], 2, "--port 99999: a port is a number from 0 to 65535"),
    Case(
        "serve --collect beyond loopback without a token",
        ["serve", "--host", "0.0.0.0", "--collect", "{tmp}/drawings"],
        2,
        "needs --token or MNISTLAB_TOKEN",
    ),
    Case("serve --token with a space", ["serve", "--token", "two words"], 2, "--token must be letters"),
    Case("serve --writes-per-minute -1", ["serve", "--writes-per-minute", "-1"], 2, "must be 0 or more"),
    Case("serve --cors '*'", ["serve", "--cors", "*"], 2, "give an origin"),
    Case("serve --header-timeout 0", ["serve", "--header-timeout", "0"], 2, "must be a positive, finite number"),
    # training, runs and compare (issue 26)
    Case("--nproc above the CPU cores", [*_TRAIN, "--nproc", "9999"], 2, "is more than this machine's"),
    Case(
        "--nproc --oversubscribe above the memory",
        [*_TRAIN, "--nproc", "100000", "--oversubscribe"],
        2,
        "GB of memory",
    ),
    Case(
        "evaluate of a run killed in its first epoch",
        ["evaluate", "{tmp}/killed"],
        2,
        "the run has no finished epoch",
        _write("killed/.lock", "4242 mnistlab train"),
    ),
    Case(
        "evaluate of a run killed after some epochs",
        ["evaluate", "{tmp}/unfinished"],
        2,
        "finish it with: mnistlab train --resume",
        _run_copy("unfinished", _unfinish),
    ),
]


def fresh_run(tmp: Path, data: Path) -> Path:
    """The finished run the cases use: one epoch of seed-b-fixed on the real MNIST."""
    run = tmp / "base-run"
    result = mnistlab(*(a.format(data=data) for a in _TRAIN), "--out", str(run), "--quiet")
    assert result.returncode == 0, result.stderr
    assert load_config(run / "config.toml").training.epochs == 1
    return run
