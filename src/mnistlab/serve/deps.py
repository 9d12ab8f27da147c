"""What the routes share, handed to each through FastAPI's dependencies: the state `create_app` starts (the
served models, the micro-batcher, the preprocessing processes, the collect folder, the lab) and the request's image.
A route asks for them by type: `async def route(upload: ImageUpload, state: State) -> ...`."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch
from fastapi import Depends, Request

from mnistlab.devices import resolve_device
from mnistlab.errors import MnistlabError, warn
from mnistlab.files import make_dirs
from mnistlab.models.files import LoadedModel
from mnistlab.serve.auth import Writes
from mnistlab.serve.bodies import Upload, read_upload
from mnistlab.serve.engines import MicroBatcher, Predictor, ServedModel, load_served
from mnistlab.serve.images import RequestError, sample_drawing
from mnistlab.serve.lab import Lab
from mnistlab.serve.settings import ServeSettings
from mnistlab.serve.workers import Preparers


@dataclass
class ServerState:
    """Everything the routes share, made once when the app is created."""

    predictor: Predictor  # holds the served models (`models`)
    batcher: MicroBatcher
    preparers: Preparers  # decode and preprocess uploads (in processes of their own, unless workers=0)
    collect: Path | None  # where /api/collect saves drawings; None: collecting is off
    settings: ServeSettings
    writes: Writes  # the token, rate limit and collect quota of write endpoints
    device: torch.device  # where models that join later are loaded, and by which engine
    engine: str
    lab: Lab | None = None  # training from the page (serve/lab.py); None: off, for `lab_off`
    lab_off: str | None = None
    _adding: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def models(self) -> list[ServedModel]:
        """The served models, in the order served (a list that is replaced, never changed, when one joins)."""
        return self.predictor.models

    @classmethod
    def start(
        cls,
        models: Sequence[str | Path | LoadedModel | None],
        collect_dir: str | Path | None = None,
        device: str = "auto",
        workers: int | None = 0,
        engine: str = "auto",
        settings: ServeSettings | None = None,
    ) -> ServerState:
        """Load the models, start the preprocessing processes, and pay the first request's one-time costs."""
        resolved = resolve_device(device)
        served = load_served(models, resolved, engine)
        predictor = Predictor(served)
        collect = make_dirs(Path(collect_dir)) if collect_dir is not None else None
        settings = settings or ServeSettings()
        writes = Writes(settings, collect)
        state = cls(predictor, MicroBatcher(predictor), Preparers(workers), collect, settings, writes, resolved, engine)
        predictor.predict(sample_drawing())
        if not settings.lab:
            state.lab_off = settings.lab_off
        else:
            try:
                state.lab = Lab(settings.runs_dir, settings.data_dir, resolved.type, on_finished=state.add_model)
            except MnistlabError as exc:  # RUNS is another server's lab: this one serves without
                state.lab_off = str(exc)
                warn(f"the lab is off: {exc}")
        return state

    def add_model(self, path: Path) -> ServedModel:
        """Load a model (a run directory or model file) and serve it from the next prediction on, under a name
        no served model has. Slow (an ONNX copy is made and checked): call it in a thread."""
        with self._adding:
            served = load_served([path], self.device, self.engine, taken=[m.name for m in self.models])[-1]
            self.predictor.add(served)
        return served

    def close(self) -> None:
        """Stop the lab's processes and the preprocessing processes."""
        if self.lab is not None:
            self.lab.close()
        self.preparers.close()


def server_state(request: Request) -> ServerState:
    """The state of the app serving `request` (`app.WebApp.server_state`)."""
    return request.app.server_state


State = Annotated[ServerState, Depends(server_state)]
ImageUpload = Annotated[Upload, Depends(read_upload)]


def collect_folder(state: State) -> Path:
    """The collect folder, or a 404 when collecting is off (before the body is read)."""
    if state.collect is None:
        raise RequestError(404, "collecting is off: start the server with --collect DIR")
    return state.collect


CollectFolder = Annotated[Path, Depends(collect_folder)]


def lab_of(state: State) -> Lab:
    """The server's lab, or a 404 saying why it is off (before the body is read)."""
    if state.lab is None:
        raise RequestError(404, f"the lab is off: {state.lab_off}")
    return state.lab


TheLab = Annotated[Lab, Depends(lab_of)]


async def writer(request: Request, state: State) -> None:
    """Admits a write (rate, then token: `auth.Writes.admit`); a write route lists it: `dependencies=[Writer]`.
    Async, so that it runs on the event loop, one at a time, never in a thread."""
    state.writes.admit(request)


Writer = Depends(writer)
