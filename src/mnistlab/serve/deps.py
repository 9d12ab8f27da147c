"""What the routes share, handed to each through FastAPI's dependencies: the state `create_app` starts (the
served models, the micro-batcher, the preprocessing processes, the collect folder) and the request's image.
A route asks for them by type: `async def route(upload: ImageUpload, state: State) -> ...`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request

from mnistlab.devices import resolve_device
from mnistlab.files import make_dirs
from mnistlab.models.files import LoadedModel
from mnistlab.serve.auth import Writes
from mnistlab.serve.bodies import Upload, read_upload
from mnistlab.serve.engines import MicroBatcher, Predictor, ServedModel, load_served
from mnistlab.serve.images import RequestError, sample_drawing
from mnistlab.serve.settings import ServeSettings
from mnistlab.serve.workers import Preparers


@dataclass
class ServerState:
    """Everything the routes share, made once when the app is created."""

    models: list[ServedModel]  # in the order served
    predictor: Predictor
    batcher: MicroBatcher
    preparers: Preparers  # decode and preprocess uploads (in processes of their own, unless workers=0)
    collect: Path | None  # where /api/collect saves drawings; None: collecting is off
    settings: ServeSettings
    writes: Writes  # the token, rate limit and collect quota of write endpoints

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
        served = load_served(models, resolve_device(device), engine)
        predictor = Predictor(served)
        collect = make_dirs(Path(collect_dir)) if collect_dir is not None else None
        settings = settings or ServeSettings()
        writes = Writes(settings, collect)
        state = cls(served, predictor, MicroBatcher(predictor), Preparers(workers), collect, settings, writes)
        predictor.predict(sample_drawing())
        return state

    def close(self) -> None:
        """Stop the preprocessing processes."""
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


async def writer(request: Request, state: State) -> None:
    """Admits a write (rate, then token: `auth.Writes.admit`); a write route lists it: `dependencies=[Writer]`.
    Async, so that it runs on the event loop, one at a time, never in a thread."""
    state.writes.admit(request)


Writer = Depends(writer)
