"""The draw-a-digit web app: a FastAPI app with a JSON API over `engines` and one static page.

    POST /api/predict   an image (multipart file field `image`, or JSON {"image": "data:image/png;base64,..."})
                        -> every model's answer and the 28x28 image they saw
    POST /api/collect   the same with a `label`: saved as DIR/<label>/<server-chosen name>.png (with --collect)
    POST /api/explain   an image and a model's name -> its attribution maps (numbers and red/blue overlays)
    POST /api/activations, /api/neighbours   what its layers computed; the training images nearest it
    GET  /api/models    name, architecture, test accuracy and class names of each model
    /api/lab, /api/configs, /api/runs..., /api/lr-find
                        the lab: train shipped configs from the page, watch them (SSE), stop, resume (routers/lab.py)
    GET  /api/health    {"status": "ok", ...}
    GET  /metrics       Prometheus metrics: requests, latency, predictions per model, queue depth, restarts
    GET  /docs          the OpenAPI page (Swagger UI, served from the package: no CDN, works offline)

The routes live in `routers/` (one module per concern), take what they share from `deps` (a `ServerState` made
here) and answer with the Pydantic models of `schemas`, from which `/openapi.json` is generated.

Every refusal is a JSON 4xx {"detail": "one line"}: bodies over MAX_BODY (from Content-Length, or counted while
a chunked body streams in, never after reading it whole), images over the preprocessing pixel limit (from
their header), non-images, truncated files, empty bodies, wrong fields, malformed data URLs, blank drawings.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from mnistlab import __version__
from mnistlab.errors import MnistlabError
from mnistlab.models.files import LoadedModel
from mnistlab.serve.auth import Cors
from mnistlab.serve.bodies import MAX_BODY, BodyLimit, refused
from mnistlab.serve.deps import ServerState
from mnistlab.serve.images import RequestError
from mnistlab.serve.metrics import RequestMetrics
from mnistlab.serve.routers.collect import router as collect_router
from mnistlab.serve.routers.explain import router as explain_router
from mnistlab.serve.routers.lab import router as lab_router
from mnistlab.serve.routers.metrics import router as metrics_router
from mnistlab.serve.routers.models import router as models_router
from mnistlab.serve.routers.pages import mount_files
from mnistlab.serve.routers.pages import router as pages_router
from mnistlab.serve.routers.predict import router as predict_router
from mnistlab.serve.schemas import request_schemas
from mnistlab.serve.server import QueueCap, run  # run: here for `mnistlab.serve.run`
from mnistlab.serve.settings import ServeSettings

__all__ = ["MAX_BODY", "WebApp", "create_app", "is_loopback", "listen", "run", "url_of"]


class WebApp(FastAPI):
    """The FastAPI app, holding what its routes share (`server_state`, handed to them by `deps.State`)."""

    def __init__(self, server_state: ServerState):
        super().__init__(
            title="mnistlab",
            summary="Draw or upload a digit; every served model answers.",
            version=__version__,
            lifespan=_lifespan,
            docs_url=None,  # served by routers.pages from the swagger-ui-bundle package instead of a CDN
            redoc_url=None,
        )
        self.server_state = server_state

    def openapi(self) -> dict[str, Any]:
        """FastAPI's document, with the schemas of the request bodies the routes read by hand (see `schemas`)."""
        if self.openapi_schema is None:
            document = super().openapi()
            document.setdefault("components", {}).setdefault("schemas", {}).update(request_schemas())
        return self.openapi_schema


@asynccontextmanager
async def _lifespan(app: WebApp) -> AsyncIterator[None]:
    yield
    explaining = getattr(app.state, "explaining", None)  # made on the first explanation request, if any came
    if explaining is not None:
        explaining.close()
    app.server_state.close()


def create_app(
    models: Sequence[str | Path | LoadedModel | None],
    collect_dir: str | Path | None = None,
    device: str = "auto",
    workers: int | None = 0,
    engine: str = "auto",
    settings: ServeSettings | None = None,
) -> WebApp:
    """The web app serving `models` (run directories, model files, loaded models; None: the bundled one), in
    that order. With `collect_dir`, drawings labelled on the page are saved as DIR/<label>/<name>.png.
    Uploads are prepared in `workers` processes (None: one per core, at most 4; 0: in the server's own; the
    caller's script needs an `if __name__ == "__main__":` guard for workers). `engine`: "auto", "torch" or
    "onnxruntime" (see engines.load_served); `settings`: the operator's limits, timeouts, logs and tokens. What it
    serves with is `app.server_state`."""
    app = WebApp(ServerState.start(models, collect_dir, device, workers, engine, settings or ServeSettings()))
    app.add_middleware(QueueCap)  # first added: the innermost, after the body limit (serve/server.py)
    app.add_middleware(BodyLimit)
    if app.server_state.settings.cors:  # off unless the operator names origins (--cors)
        app.add_middleware(Cors, origins=app.server_state.settings.cors)
    app.add_middleware(RequestMetrics)  # last added: the outermost, so it counts the others' answers too
    app.add_exception_handler(RequestError, refused)
    app.include_router(predict_router)
    app.include_router(models_router)
    app.include_router(collect_router)
    app.include_router(explain_router)
    app.include_router(lab_router)
    app.include_router(pages_router)
    app.include_router(metrics_router)
    mount_files(app)
    return app


# ---------------------------------------------------------------------------------------------- running


def listen(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), or a one-line error saying why not."""
    if not 0 <= port <= 65535:  # the OS would take the number modulo 65536 (99999: 34463), or blame the host
        raise MnistlabError(f"--port {port}: a port is a number from 0 to 65535 (0: any free port)")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise MnistlabError(f"--host {host}: not an address of this machine ({exc})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise MnistlabError(f"{host}:{port}: cannot listen there ({exc.strerror}); choose another --port") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable only from this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
