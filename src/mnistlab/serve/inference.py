"""What the web app runs: models loaded once and prepared for inference, image bytes opened safely and
preprocessed exactly as `mnistlab predict` does, and a micro-batcher that answers concurrent requests with one
forward pass. Nothing here knows about HTTP; `app.py` turns `RequestError` into a status code."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from mnistlab.checkpoint import LoadedModel, bundled_model_path, load_model
from mnistlab.config import ModelConfig
from mnistlab.errors import MnistlabError
from mnistlab.models import count_parameters, for_inference
from mnistlab.preprocess import CorruptImage, ImageTooLarge, NotAnImage, Preprocessed, load_image, preprocess


class RequestError(MnistlabError):
    """A request the server refuses, with the HTTP status that says why (4xx) and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(" ".join(message.split()))
        self.status = status


# ---------------------------------------------------------------------------------------------- models


@dataclass
class ServedModel:
    """A model as the page shows it: its name, a one-line description and the network it runs."""

    name: str
    loaded: LoadedModel
    network: nn.Module  # for_inference's copy of loaded.model

    def describe(self) -> dict:
        meta = self.loaded.metadata
        members = meta.get("members") if isinstance(meta.get("members"), dict) else {}
        accuracy = meta.get("test_accuracy")
        return {
            "name": self.name,
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


def load_served(
    models: Sequence[str | Path | LoadedModel | None], device: torch.device | str = "cpu"
) -> list[ServedModel]:
    """Load each model (None: the bundled one) and name it; repeated names get " (2)", " (3)"."""
    if not models:
        raise MnistlabError("no model to serve")
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
        served.append(ServedModel(name, loaded, for_inference(loaded.model)))
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


# ---------------------------------------------------------------------------------------------- predicting


class Predictor:
    """Image bytes -> every served model's probabilities, with what the models saw."""

    def __init__(self, models: list[ServedModel]):
        self.models = models
        self.device = next(models[0].network.parameters()).device

    def prepare(self, data: bytes) -> Preprocessed:
        """Decode and preprocess (the same `preprocess` as `mnistlab predict`); a blank image is refused."""
        image = open_image(data)
        try:
            return preprocess(image)
        except RequestError:
            raise
        except MnistlabError as exc:
            raise RequestError(422, str(exc)) from None

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor) -> list[torch.Tensor]:
        """Probabilities (B, 10) from each model, for preprocessed images (B, 28, 28)."""
        batch = batch.to(self.device)
        return [m.loaded.probabilities_of(m.network(batch)).float().cpu() for m in self.models]

    def answer(self, pre: Preprocessed, probabilities: list[torch.Tensor]) -> dict:
        """The JSON body for one image: each model's answer (one row of `probabilities` per model)."""
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
        return {"predictions": predictions, "preprocessed": png_base64(pre.digit)}

    def predict(self, data: bytes) -> dict:
        """One image, start to end, without batching (scripts, benchmarks)."""
        pre = self.prepare(data)
        return self.answer(pre, [p[0] for p in self.forward(pre.tensor[None])])


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
