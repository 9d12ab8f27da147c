"""What the web app runs its models with: each loaded once and prepared for inference (onnxruntime or
PyTorch), giving calibrated probabilities and outlier scores ("not a digit") from one forward pass, and a
micro-batcher that answers concurrent requests with one pass. Nothing here knows about HTTP; `bodies.refused`
turns `RequestError` into a status."""

from __future__ import annotations

import asyncio
import importlib.util
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mnistlab.config import ENGINES, ModelConfig
from mnistlab.errors import MnistlabError, warn
from mnistlab.models.files import LoadedModel, bundled_model_path, load_model, read_description
from mnistlab.models.networks import count_parameters, for_inference
from mnistlab.models.outliers import verdict
from mnistlab.serve.images import png_base64, prepare_digit, sample_drawing
from mnistlab.serve.metrics import answered

# ---------------------------------------------------------------------------------------------- models

# A batch's answers from one model, on the CPU: calibrated probabilities (B, classes) and outlier scores (B,)
# (0 where the model has no outlier detector).
Answers = tuple[torch.Tensor, torch.Tensor]


@dataclass
class ServedModel:
    """A model as the page shows it: its name, a one-line description, how its answers are computed
    (`engine`: "torch", or "onnxruntime" for an ONNX copy checked against PyTorch), and the expected calibration
    error its model file records (None: none recorded)."""

    name: str
    loaded: LoadedModel
    answers: Callable[[torch.Tensor], Answers]  # images (B, 28, 28) in [0, 1] -> their Answers
    engine: str
    calibration_ece: float | None = None

    @property
    def threshold(self) -> float | None:
        """The outlier score above which an image is flagged; None: the model has no outlier detector."""
        return self.loaded.outlier_threshold

    def describe(self) -> dict:
        meta = self.loaded.metadata
        members = meta.get("members") if isinstance(meta.get("members"), dict) else {}
        accuracy, test_ece = meta.get("test_accuracy"), meta.get("test_ece")
        return {
            "name": self.name,
            "engine": self.engine,
            "architecture": architecture(self.loaded.configs),
            "parameters": count_parameters(self.loaded.model),
            "dataset": self.loaded.dataset,
            "classes": self.loaded.classes,
            "test_accuracy": accuracy if isinstance(accuracy, (int, float)) else None,
            "members_test_accuracy": [v for v in members.values() if isinstance(v, (int, float))],
            "item": self.loaded.item,
            "calibrated": self.loaded.calibrated,
            "temperature": self.loaded.temperature,
            "confidence_map": self.loaded.confidence_map is not None,
            "calibration_ece": self.calibration_ece,
            "test_ece": float(test_ece) if _finite(test_ece) else None,
            "outlier_threshold": self.threshold,
        }


def recorded_ece(path: Path) -> float | None:
    """The expected calibration error of a model's calibrated probabilities on its validation split, as
    its model file records it (`calibration.after.ece`); None where it records none (an ensemble, an older file)."""
    _, _, description = read_description(path)
    calibration = description.get("calibration")
    after = calibration.get("after") if isinstance(calibration, dict) else None
    ece = after.get("ece") if isinstance(after, dict) else None
    return float(ece) if _finite(ece) else None


def _finite(value: Any) -> bool:
    """Whether a value read from a model file is a finite number (JSON holds nothing non-finite)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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
    """A model run by PyTorch: for_inference's copy of its `answering()` module (BatchNorm folded,
    channels-last)."""

    def __init__(self, loaded: LoadedModel):
        self.network = for_inference(loaded.answering())
        self.device = next(loaded.model.parameters()).device

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> Answers:
        probabilities, scores = self.network(batch.to(self.device))
        return probabilities.float().cpu(), scores.float().cpu()


class OnnxNetwork:
    """A model run by onnxruntime on the CPU, from an ONNX copy made in memory at start (`export.onnx_bytes`).
    For one image it takes half of PyTorch's time (the bundled ensemble: 0.9 ms against 1.8 ms on a 2-core
    Xeon), which is most requests of a page; one thread, as the server answers requests side by side."""

    def __init__(self, loaded: LoadedModel):
        import onnxruntime

        from mnistlab.infer.export import onnx_bytes

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        self.session = onnxruntime.InferenceSession(onnx_bytes(loaded), options, providers=["CPUExecutionProvider"])

    def __call__(self, batch: torch.Tensor) -> Answers:
        images = np.ascontiguousarray(batch.cpu().numpy(), dtype=np.float32)
        probabilities, scores = self.session.run(["probabilities", "outlier_score"], {"images": images})
        return torch.from_numpy(probabilities), torch.from_numpy(scores)


def _engine(loaded: LoadedModel, engine: str) -> tuple[Callable[[torch.Tensor], Answers], str]:
    """The model's answers by `engine` ("auto": onnxruntime where it is installed and the model is on the
    CPU), and the engine's name. An ONNX copy is used only if it agrees with PyTorch on a drawing and 31 random
    images (probabilities within 1e-4, outlier scores within a relative 1e-3: `export.agree`); under "auto" a
    copy that cannot be made or does not agree leaves the model to PyTorch, with a warning."""
    reference = TorchNetwork(loaded)
    on_cpu = reference.device.type == "cpu"
    if engine == "torch" or (engine == "auto" and not (on_cpu and importlib.util.find_spec("onnxruntime"))):
        return reference, "torch"
    if not on_cpu:
        raise MnistlabError(f"--engine onnxruntime runs on the CPU only, not {reference.device.type}")
    try:
        from mnistlab.infer.export import agree, differences

        onnx = OnnxNetwork(loaded)
        noise = torch.rand(31, 28, 28, generator=torch.Generator().manual_seed(0))
        check = torch.cat([torch.from_numpy(prepare_digit(sample_drawing()))[None], noise])
        diff, score_diff = differences(reference(check), onnx(check))
        if not agree(diff, score_diff):  # no class test: noise may tie two classes
            raise MnistlabError(
                f"its ONNX copy differs from PyTorch (max probability difference {diff:.1e}, max relative outlier "
                f"score difference {score_diff:.1e})"
            )
    except ImportError as exc:
        if engine == "auto":
            return reference, "torch"
        raise MnistlabError(f"--engine onnxruntime needs onnx, onnxscript and onnxruntime ({exc})") from None
    except Exception as exc:  # the exporter fails in many ways on layers it does not know
        if engine != "auto":
            raise MnistlabError(f"{loaded.path}: cannot run with onnxruntime: {exc}") from None
        warn(f"{loaded.path}: served by PyTorch ({exc})")
        return reference, "torch"
    return onnx, "onnxruntime"


def load_served(
    models: Sequence[str | Path | LoadedModel | None],
    device: torch.device | str = "cpu",
    engine: str = "torch",
    taken: Sequence[str] = (),
) -> list[ServedModel]:
    """Load each model (None: the bundled one) and name it; names repeated, or among `taken` (those served
    already), get " (2)", " (3)". `engine`: one of ENGINES (see `_engine`)."""
    if not models:
        raise MnistlabError("no model to serve")
    if engine not in ENGINES:
        raise MnistlabError(f"unknown engine {engine!r} (choose from {', '.join(ENGINES)})")
    served: list[ServedModel] = []
    names: list[str] = list(taken)
    for entry in models:
        loaded = entry if isinstance(entry, LoadedModel) else load_model(entry, device)
        base = model_name(loaded.path)
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base} ({n})"
        names.append(name)
        served.append(ServedModel(name, loaded, *_engine(loaded, engine), recorded_ece(loaded.path)))
    return served


# ---------------------------------------------------------------------------------------------- predicting


# Each served model with its Answers, in the order served: a forward pass's models travel with its answers, as a
# model may join the served ones (`Predictor.add`) while the pass runs.
Answered = list[tuple[ServedModel, Answers]]


class Predictor:
    """Image bytes -> every served model's probabilities and outlier flag, with what the models saw."""

    def __init__(self, models: list[ServedModel]):
        self.models = models

    def add(self, served: ServedModel) -> None:
        """Serve one more model from the next forward pass on. The list is replaced, never changed in place: a
        pass running in another thread goes on with the list it took."""
        self.models = [*self.models, served]

    def forward(self, batch: torch.Tensor) -> Answered:
        """Each model's Answers for preprocessed images (B, 28, 28)."""
        return [(m, m.answers(batch)) for m in self.models]

    def answer(self, digit: np.ndarray, answers: Answered) -> dict:
        """The JSON body for one image, the 28x28 `digit` the models saw: each model's answer (from its
        probabilities (classes,) and outlier score (), one pair per model)."""
        predictions, flagged = [], []
        models = [served for served, _ in answers]
        for served, (probs, score) in answers:
            label = int(probs.argmax())
            outlier, outlier_score = verdict(float(score), served.threshold)
            predictions.append(
                {
                    "model": served.name,
                    "label": label,
                    "class": served.loaded.classes[label],
                    "confidence": round(float(probs[label]), 6),
                    "probabilities": [round(p, 6) for p in probs.tolist()],
                    "outlier": outlier,
                    "outlier_score": outlier_score,
                }
            )
            if outlier:
                flagged.append(served.name)
        answered([served.name for served in models], flagged)  # counted per model in GET /metrics
        return {"predictions": predictions, "preprocessed": png_base64(digit)}

    def predict(self, data: bytes) -> dict:
        """One image, start to end, without batching (scripts, benchmarks)."""
        digit = prepare_digit(data)
        return self.answer(digit, [(m, (p[0], s[0])) for m, (p, s) in self.forward(torch.from_numpy(digit)[None])])


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
        # Predictions in the server (their body received, not yet answered: being prepared, or waiting here),
        # counted and capped by `server.QueueCap`: the queue depth an operator watches.
        self.pending = 0

    async def __call__(self, image: torch.Tensor) -> Answered:
        """Each model's probabilities (classes,) and outlier score () for one preprocessed image (28, 28)."""
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
                        future.set_result([(m, (probs[i], scores[i])) for m, (probs, scores) in outputs])
        finally:
            self._task = None
