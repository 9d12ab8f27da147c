"""The draw-a-digit web app: a FastAPI app with a JSON API over `inference` and one static page.

    POST /api/predict   an image (multipart file field `image`, or JSON {"image": "data:image/png;base64,..."})
                        -> every model's answer and the 28x28 image they saw
    POST /api/collect   the same with a `label`: saved as DIR/<label>/<server-chosen name>.png (with --collect)
    GET  /api/models    name, architecture, test accuracy and class names of each model
    GET  /api/health    {"status": "ok"}
    GET  /docs          the OpenAPI page (Swagger UI, served from the package: no CDN, works offline)

Every refusal is a JSON 4xx {"detail": "one line"}: bodies over MAX_BODY (from Content-Length, or counted while
a chunked body streams in, never after reading it whole), images over the preprocessing pixel limit (from
their header), non-images, truncated files, empty bodies, wrong fields, malformed data URLs, blank drawings.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import secrets
import socket
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from swagger_ui_bundle import swagger_ui_path

from mnistlab import __version__
from mnistlab.devices import resolve_device
from mnistlab.errors import MnistlabError
from mnistlab.files import make_dirs, replacing
from mnistlab.models.files import LoadedModel
from mnistlab.serve.engines import MicroBatcher, Predictor, load_served
from mnistlab.serve.images import RequestError, prepare, sample_drawing
from mnistlab.serve.workers import Preparers

MAX_BODY = 5 * 1024 * 1024
STATIC = Path(__file__).resolve().parent / "static"
HOW = 'send a multipart file field "image", or JSON {"image": "data:image/png;base64,..."}'
# The page loads nothing from elsewhere; images are data: URLs (the model's view) and blobs (uploads).
PAGE_POLICY = "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'"


class BodyLimit:
    """Refuses request bodies over `limit` bytes with 413: at once from Content-Length, or, for a chunked body,
    as soon as the bytes received pass the limit (the route reading it gets a RequestError). Either way the
    connection is closed, so the rest of the body is never read."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"0")  # the HTTP parser made sure it is a number
        if int(length) > self.limit:
            response = JSONResponse(
                {"detail": f"request body over the {self.limit // 2**20} MB limit ({length.decode()} bytes)"},
                413,
                {"Connection": "close"},
            )
            await response(scope, receive, send)
            return
        received = 0

        async def counting() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise RequestError(413, f"request body over the {self.limit // 2**20} MB limit")
            return message

        await self.app(scope, counting, send)


class _InMemoryMultiPart(MultiPartParser):
    """Starlette's multipart parser, keeping file parts in memory: the body is at most MAX_BODY, so no upload
    ever goes to a temporary file on disk (the default rolls parts over 1 MB there)."""

    spool_max_size = MAX_BODY


async def read_image(request: Request) -> tuple[bytes, dict[str, str]]:
    """The image bytes of a request and its other (text) fields."""
    try:
        body = await request.body()
        if not body:
            raise RequestError(400, f"empty request body: {HOW}")
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media == "multipart/form-data":
            parser = _InMemoryMultiPart(request.headers, request.stream(), max_files=4, max_fields=16)
            form = await parser.parse()
            image = form.get("image")
            if image is None:
                names = ", ".join(repr(k[:40]) for k in list(form)[:5]) or "none"
                raise RequestError(400, f'no field "image" in the form (fields: {names}): {HOW}')
            if isinstance(image, str):
                raise RequestError(400, f'field "image" is text, not a file: {HOW}')
            fields = {k: v for k, v in form.items() if isinstance(v, str)}
            return await image.read(), fields
        if media == "application/json":
            return _from_json(body)
        raise RequestError(415, f"unsupported content type {media or '(none)'!r}: {HOW}")
    except MultiPartException as exc:
        raise RequestError(400, f"malformed multipart body ({exc.message})") from None
    except ClientDisconnect:
        raise RequestError(400, "the client went away before sending the whole body") from None


def _from_json(body: bytes) -> tuple[bytes, dict[str, str]]:
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        raise RequestError(400, f"the body is not valid JSON: {HOW}") from None
    if not isinstance(payload, dict) or "image" not in payload:
        raise RequestError(400, f'the JSON body has no "image" key: {HOW}')
    image = payload["image"]
    if not isinstance(image, str):
        raise RequestError(400, f'"image" must be a data URL string, not {type(image).__name__}')
    fields = {k: str(v) for k, v in payload.items() if k != "image" and isinstance(v, (str, int))}
    return data_url_bytes(image), fields


def data_url_bytes(url: str) -> bytes:
    """The bytes of a base64 data URL ("data:image/png;base64,...")."""
    header, comma, payload = url.partition(",")
    if not header.startswith("data:") or not comma or not header.endswith(";base64"):
        raise RequestError(400, 'malformed data URL: "image" must look like "data:image/png;base64,..."')
    media = header[5:].split(";")[0]
    if media and not media.startswith("image/"):
        raise RequestError(415, f"the data URL holds {media!r}, not an image")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, "malformed base64 in the data URL") from None


def create_app(
    models: Sequence[str | Path | LoadedModel | None],
    collect_dir: str | Path | None = None,
    device: str = "auto",
    workers: int | None = 0,
    engine: str = "auto",
) -> FastAPI:
    """The web app serving `models` (run directories, model files, loaded models; None: the bundled one), in
    that order. With `collect_dir`, drawings labelled on the page are saved as DIR/<label>/<name>.png.
    Uploads are prepared in `workers` processes (None: one per core, at most 4; 0: in the server's own; the
    caller's script needs an `if __name__ == "__main__":` guard for workers). `engine`: "auto", "torch" or
    "onnxruntime" (see inference.load_served)."""
    served = load_served(models, resolve_device(device), engine)
    predictor = Predictor(served)
    batcher = MicroBatcher(predictor)
    collect = make_dirs(Path(collect_dir)) if collect_dir is not None else None
    preparers = Preparers(workers)
    predictor.predict(sample_drawing())  # the first request's one-time costs, paid before serving

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        preparers.close()

    app = FastAPI(
        title="mnistlab",
        summary="Draw or upload a digit; every served model answers.",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,  # served below from the swagger-ui-bundle package instead of a CDN: it works offline
        redoc_url=None,
    )

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="mnistlab API",
            swagger_js_url="/swagger/swagger-ui-bundle.js",
            swagger_css_url="/swagger/swagger-ui.css",
            swagger_favicon_url="data:,",
        )

    app.add_middleware(BodyLimit)

    @app.exception_handler(RequestError)
    async def refused(_: Request, exc: RequestError) -> JSONResponse:
        headers = {"Connection": "close"} if exc.status == 413 else None
        return JSONResponse({"detail": str(exc)}, exc.status, headers)

    image_body = {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["image"],
                        "properties": {"image": {"type": "string", "format": "binary"}},
                    }
                },
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["image"],
                        "properties": {"image": {"type": "string", "example": "data:image/png;base64,iVBORw0..."}},
                    }
                },
            },
        }
    }

    @app.post("/api/predict", openapi_extra=image_body, summary="Classify one image with every served model")
    async def predict(request: Request) -> JSONResponse:
        """`{"predictions": [{"model", "label", "class", "confidence", "probabilities"}], "preprocessed"}`:
        one answer per model, in the order served; `preprocessed` is the 28x28 image they saw (base64 PNG)."""
        data, _ = await read_image(request)
        digit = await preparers.digit(data)
        probabilities = await batcher(torch.from_numpy(digit))
        return JSONResponse(predictor.answer(digit, probabilities))

    collect_body = json.loads(json.dumps(image_body))
    for content in collect_body["requestBody"]["content"].values():
        content["schema"]["required"].append("label")
        content["schema"]["properties"]["label"] = {"type": "integer", "minimum": 0, "maximum": 9}

    @app.post("/api/collect", openapi_extra=collect_body, summary="Save a labelled drawing (needs --collect)")
    async def save(request: Request) -> JSONResponse:
        """Saves the image as DIR/<label>/<server-chosen name>.png; returns its path inside DIR."""
        if collect is None:
            raise RequestError(404, "collecting is off: start the server with --collect DIR")
        data, fields = await read_image(request)
        pre = await preparers.run(prepare, data)  # the original image is what gets saved
        classes = served[0].loaded.classes
        label = fields.get("label", "").strip()
        if not label.isdigit() or int(label) >= len(classes):
            raise RequestError(400, f"label must be a class number from 0 to {len(classes) - 1}, not {label!r}")
        folder = make_dirs(collect / str(int(label)))
        target = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}.png"
        with replacing(target) as tmp:
            await preparers.run(pre.original.save, tmp, "PNG")
        count = sum(1 for _ in folder.glob("*.png"))
        return JSONResponse({"saved": f"{target.parent.name}/{target.name}", "count": count})

    @app.get("/api/models", summary="The served models")
    async def models_info() -> dict:
        return {"models": [m.describe() for m in served], "collect": collect is not None}

    @app.get("/api/health", summary="Whether the server answers")
    async def health() -> dict:
        """Also how many images the models have classified, in how many forward passes (batching at work)."""
        return {"status": "ok", "models": len(served), "images": batcher.images, "forward_passes": batcher.passes}

    app.state.preparers, app.state.served = preparers, served

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_POLICY})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.mount("/swagger", StaticFiles(directory=swagger_ui_path), name="swagger")
    return app


# ---------------------------------------------------------------------------------------------- running


def listen(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), or a one-line error saying why not."""
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


def run(app: FastAPI, sock: socket.socket, threads: int | None = None) -> None:
    """Serve `app` on `sock` with uvicorn until Ctrl-C; no access log (it would cost more than a prediction)."""
    import uvicorn

    if threads:
        torch.set_num_threads(threads)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])
