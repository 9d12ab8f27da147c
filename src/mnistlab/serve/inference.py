"""What the web app runs: models loaded once and prepared for inference, image bytes opened safely and
preprocessed exactly as `mnistlab predict` does, and a micro-batcher that answers concurrent requests with one
forward pass. Nothing here knows about HTTP; `app.py` turns `RequestError` into a status code."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import io
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from mnistlab.checkpoint import LoadedModel, bundled_model_path, load_model
from mnistlab.config import ENGINES, ModelConfig
from mnistlab.errors import MnistlabError
from mnistlab.models import count_parameters, for_inference
from mnistlab.preprocess import CorruptImage, ImageTooLarge, NotAnImage, Preprocessed, load_image, preprocess


class RequestError(MnistlabError):
    """A request the server refuses, with the HTTP status that says why (4xx) and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(" ".join(message.split()))
        self.status = status

    def __reduce__(self):  # raised in a preprocessing process, it travels back pickled
        return RequestError, (self.status, str(self))


# ---------------------------------------------------------------------------------------------- models


@dataclass
class ServedModel:
    """A model as the page shows it: its name, a one-line description, and how its probabilities are computed
    (`engine`: "torch", or "onnxruntime" for an ONNX copy checked against PyTorch)."""

    name: str
    loaded: LoadedModel
    probabilities: Callable[[torch.Tensor], torch.Tensor]  # (B, 28, 28) in [0, 1] -> (B, classes), on the CPU
    engine: str

    def describe(self) -> dict:
        meta = self.loaded.metadata
        members = meta.get("members") if isinstance(meta.get("members"), dict) else {}
        accuracy = meta.get("test_accuracy")
        return {
            "name": self.name,
            "engine": self.engine,
            "architecture": architecture(self.loaded.configs),
            "parameters": count_parameters(self.loaded.model),
            "dataset": self.loaded.dataset,
            "classes": self.loaded.classes,
            "test_accuracy": accuracy if isinstance(accuracy, (int, float)) else None,
            # An ensemble's model.json records its members' test accuracies, not its own.
            "members_test_accuracy": [v for v in members.values() if isinstance(v, (int, float))],
        }


def architecture(configs: list[ModelConfig]) -> str:
    """One line: "MLP 784-512-10 relu", "CNN conv32 conv32 pool conv64 ... fc10 (bn, relu)", "3 x CNN ..."."""
    config = configs[0]
    if config.kind == "mlp":
        text = f"MLP {'-'.join(map(str, [784, *config.hidden, 10]))} {'/'.join(config.activations)}"
    else:
        words, extras = [], []
        for layer in config.layers:
            name, *args = layer.split()
            if name in ("conv", "linear"):
                words.append(f"{'conv' if name == 'conv' else 'fc'}{args[0]}")
            elif name in ("maxpool", "avgpool"):
                words.append("pool" if name == "maxpool" else "gap")
            elif name not in ("flatten", "dropout") and name not in extras:
                extras.append(name)
        text = f"CNN {' '.join(words)}" + (f" ({', '.join(extras)})" if extras else "")
    if config.softmax_output:
        text += ", softmax output"
    same = all(c == config for c in configs)
    if len(configs) > 1:
        return f"{len(configs)} x {text}" if same else f"ensemble of {len(configs)}: {text}, ..."
    return text


def model_name(path: Path) -> str:
    """A short name for a model file: its run directory's name (or the file's stem), "bundled" for ours."""
    if path.resolve() == bundled_model_path().resolve():
        return "bundled"
    return path.parent.name if path.stem == "model" else path.stem


class TorchNetwork:
    """A model run by PyTorch: for_inference's copy (BatchNorm folded, channels-last)."""

    def __init__(self, loaded: LoadedModel):
        self.network, self.to_probabilities = for_inference(loaded.model), loaded.probabilities_of
        self.device = next(loaded.model.parameters()).device

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.to_probabilities(self.network(batch.to(self.device))).float().cpu()


class OnnxNetwork:
    """A model run by onnxruntime on the CPU, from an ONNX copy made in memory at start (`export.onnx_bytes`).
    For one image it takes half of PyTorch's time (the bundled ensemble: 0.9 ms against 1.8 ms on a 2-core
    Xeon), which is most requests of a page; one thread, as the server answers requests side by side."""

    def __init__(self, loaded: LoadedModel):
        import onnxruntime

        from mnistlab.export import onnx_bytes

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        self.session = onnxruntime.InferenceSession(onnx_bytes(loaded), options, providers=["CPUExecutionProvider"])

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        images = np.ascontiguousarray(batch.cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(["probabilities"], {"images": images})[0])


def _engine(loaded: LoadedModel, engine: str) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """The model's probabilities by `engine` ("auto": onnxruntime where it is installed and the model is on
    the CPU), and the engine's name. An ONNX copy is used only if it agrees with PyTorch (probabilities
    within 1e-4) on a drawing and 31 random images; under "auto" a copy that cannot be
    made or does not agree leaves the model to PyTorch, with a warning."""
    reference = TorchNetwork(loaded)
    on_cpu = reference.device.type == "cpu"
    if engine == "torch" or (engine == "auto" and not (on_cpu and importlib.util.find_spec("onnxruntime"))):
        return reference, "torch"
    if not on_cpu:
        raise MnistlabError(f"--engine onnxruntime runs on the CPU only, not {reference.device.type}")
    try:
        onnx = OnnxNetwork(loaded)
        noise = torch.rand(31, 28, 28, generator=torch.Generator().manual_seed(0))
        check = torch.cat([torch.from_numpy(prepare_digit(sample_drawing()))[None], noise])
        expected, got = reference(check), onnx(check)
        diff = float((expected - got).abs().max())
        if not diff < 1e-4:  # `not <`: NaN fails too (no class test: noise may tie two classes)
            raise MnistlabError(f"its ONNX copy differs from PyTorch (max probability difference {diff:.1e})")
    except ImportError as exc:
        if engine == "auto":
            return reference, "torch"
        raise MnistlabError(f"--engine onnxruntime needs onnx, onnxscript and onnxruntime ({exc})") from None
    except Exception as exc:  # the exporter fails in many ways on layers it does not know
        if engine != "auto":
            raise MnistlabError(f"{loaded.path}: cannot run with onnxruntime: {exc}") from None
        print(f"mnistlab: warning: {loaded.path}: served by PyTorch ({exc})", file=sys.stderr)
        return reference, "torch"
    return onnx, "onnxruntime"


def load_served(
    models: Sequence[str | Path | LoadedModel | None], device: torch.device | str = "cpu", engine: str = "torch"
) -> list[ServedModel]:
    """Load each model (None: the bundled one) and name it; repeated names get " (2)", " (3)". `engine`: one
    of ENGINES (see `_engine`)."""
    if not models:
        raise MnistlabError("no model to serve")
    if engine not in ENGINES:
        raise MnistlabError(f"unknown engine {engine!r} (choose from {', '.join(ENGINES)})")
    served: list[ServedModel] = []
    names: list[str] = []
    for entry in models:
        loaded = entry if isinstance(entry, LoadedModel) else load_model(entry, device)
        base = model_name(loaded.path)
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base} ({n})"
        names.append(name)
        served.append(ServedModel(name, loaded, *_engine(loaded, engine)))
    return served


# ---------------------------------------------------------------------------------------------- images


# How the server answers each kind of image `load_image` refuses.
_STATUS = {NotAnImage: 415, ImageTooLarge: 413, CorruptImage: 422}


def open_image(data: bytes) -> Image.Image:
    """Decode uploaded bytes with `preprocess.load_image`, the checks `mnistlab predict` makes for files, its
    refusals turned into HTTP statuses: empty 400, too many pixels 413, not an image 415, corrupt 422."""
    try:
        return load_image(data)
    except MnistlabError as exc:
        status = 400 if not data else _STATUS.get(type(exc), 422)
        raise RequestError(status, str(exc)) from None


def png_base64(digit: np.ndarray) -> str:
    """A float image in [0, 1] as a greyscale PNG, base64-encoded."""
    buffer = io.BytesIO()
    Image.fromarray(np.round(np.clip(digit, 0, 1) * 255).astype(np.uint8)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def prepare(data: bytes) -> Preprocessed:
    """Decode and preprocess (the same `preprocess` as `mnistlab predict`); a blank image is refused."""
    image = open_image(data)
    try:
        return preprocess(image)
    except MnistlabError as exc:
        raise RequestError(422, str(exc)) from None


def prepare_digit(data: bytes) -> np.ndarray:
    """`prepare`'s 28x28 digit alone: what a preprocessing process sends back (a few kB, not the image)."""
    return prepare(data).digit


def sample_drawing() -> bytes:
    """A drawing of a 1 as the page sends it (black on a white 280x280 RGBA canvas): the server's warm-up."""
    image = Image.new("RGBA", (280, 280), "white")
    ImageDraw.Draw(image).line([(140, 40), (140, 240)], fill="black", width=24)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def default_workers() -> int:
    """One preprocessing process per CPU core this process may use, at most 4 (each holds about 250 MB)."""
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


class Preparers:
    """Decodes and preprocesses uploads in `workers` processes of their own, so that images are prepared on
    every core at once: in threads of the server's process they queue for the GIL (numpy and Pillow release it
    only in their larger calls), and two preprocessing threads under load held the server to 107 drawings/s.
    A worker that dies (a decoder crashing on a hostile file) costs the pool, not the server: the pool is
    replaced and the request tried once more there. `workers=0` prepares in a thread of the server's process.
    """

    def __init__(self, workers: int | None = None):
        self.workers = default_workers() if workers is None else workers
        self._threads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare")
        self._pool: Executor = self._threads
        if self.workers:
            self._pool = self._new_pool()
            # Start every worker now, each preparing one drawing (imports, Pillow's plugins, numpy's first calls:
            # a second or two), so that the first requests do not queue behind that and wait for seconds.
            drawing = sample_drawing()
            for started in [self._pool.submit(prepare_digit, drawing) for _ in range(self.workers)]:
                started.result()

    def _new_pool(self) -> ProcessPoolExecutor:
        # "spawn": a fork of a server with running threads could inherit a lock some thread held.
        return ProcessPoolExecutor(
            self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_exit_with_parent,
            initargs=(os.getpid(),),
        )

    async def digit(self, data: bytes) -> np.ndarray:
        """The 28x28 digit the models see for image bytes (RequestError for an image the server refuses)."""
        loop = asyncio.get_running_loop()
        for _ in range(2):
            pool = self._pool
            try:
                return await loop.run_in_executor(pool, prepare_digit, data)
            except BrokenProcessPool:
                if self._pool is pool:  # the first request to see it replaces it; the others just retry
                    pool.shutdown(wait=False)
                    self._pool = self._new_pool()
        raise RequestError(422, "the image could not be decoded: the decoder crashed on it")

    async def run(self, fn, *args):
        """`fn(*args)` in the server's own preparing thread (work that needs more than the digit back)."""
        return await asyncio.get_running_loop().run_in_executor(self._threads, fn, *args)

    def worker_pids(self) -> list[int]:
        """The preprocessing processes' ids (none with workers=0)."""
        return list(getattr(self._pool, "_processes", None) or {})

    def close(self) -> None:
        """Stop the workers and wait for them to exit (they finish the image at hand, a few ms)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._threads.shutdown(wait=False, cancel_futures=True)


def _exit_with_parent(parent: int) -> None:
    """A preprocessing process's first act: a thread that ends the process once the server that started it is
    gone. A server killed outright cannot shut its pool down, and its workers would otherwise wait forever
    for work (their siblings keep the queue's pipe open). `parent` is the server's process id, given by the
    server itself: one that died while this process was starting is noticed too."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


# ---------------------------------------------------------------------------------------------- predicting


class Predictor:
    """Image bytes -> every served model's probabilities, with what the models saw."""

    def __init__(self, models: list[ServedModel]):
        self.models = models

    def forward(self, batch: torch.Tensor) -> list[torch.Tensor]:
        """Probabilities (B, 10) from each model, for preprocessed images (B, 28, 28)."""
        return [m.probabilities(batch) for m in self.models]

    def answer(self, digit: np.ndarray, probabilities: list[torch.Tensor]) -> dict:
        """The JSON body for one image, the 28x28 `digit` the models saw: each model's answer (one row of
        `probabilities` per model)."""
        predictions = []
        for served, probs in zip(self.models, probabilities):
            label = int(probs.argmax())
            predictions.append(
                {
                    "model": served.name,
                    "label": label,
                    "class": served.loaded.classes[label],
                    "confidence": round(float(probs[label]), 6),
                    "probabilities": [round(p, 6) for p in probs.tolist()],
                }
            )
        return {"predictions": predictions, "preprocessed": png_base64(digit)}

    def predict(self, data: bytes) -> dict:
        """One image, start to end, without batching (scripts, benchmarks)."""
        digit = prepare(data).digit
        return self.answer(digit, [p[0] for p in self.forward(torch.from_numpy(digit)[None])])


class MicroBatcher:
    """Runs the images of concurrent requests through the models together: while one forward pass runs, the
    requests arriving meanwhile queue up, and the next pass takes them all (up to `max_batch`). A lone request
    waits for nothing; under load, one pass serves many, which costs far less per image (the bundled ensemble:
    2.1 ms for 1 image, 9.7 ms for 16, on a 2-core Xeon)."""

    def __init__(self, predictor: Predictor, max_batch: int = 64):
        self.predictor = predictor
        self.max_batch = max_batch
        self._queue: list[tuple[torch.Tensor, asyncio.Future]] = []
        self._task: asyncio.Task | None = None  # the running drain; kept so it is not garbage-collected
        self.images = self.passes = 0  # how many images went through in how many forward passes

    async def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Each model's probabilities (10,) for one preprocessed image (28, 28)."""
        future = asyncio.get_running_loop().create_future()
        self._queue.append((image, future))
        if self._task is None:
            self._task = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._queue:
                taken, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
                batch = torch.stack([image for image, _ in taken])
                try:
                    outputs = await asyncio.to_thread(self.predictor.forward, batch)
                except Exception as exc:  # a bug in a model: every waiting request gets the error, none hangs
                    for _, future in taken:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                self.images, self.passes = self.images + len(taken), self.passes + 1
                for i, (_, future) in enumerate(taken):
                    if not future.done():  # its client may have gone away
                        future.set_result([probs[i] for probs in outputs])
        finally:
            self._task = None
