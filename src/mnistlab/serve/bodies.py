"""Request bodies: the limit on their size, and the image a request sends (a multipart file field `image`, or
JSON {"image": "data:image/png;base64,..."}), read by hand so that every refusal is a one-line JSON 4xx with a
status that says why (FastAPI's own body parsing would answer 422 with a list, and spool uploads to disk)."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mnistlab.serve.images import RequestError

MAX_BODY = 5 * 1024 * 1024
HOW = 'send a multipart file field "image", or JSON {"image": "data:image/png;base64,..."}'


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


async def refused(_: Request, exc: RequestError) -> JSONResponse:
    """A RequestError as its JSON 4xx: {"detail": "one line"} (after a 413 the connection closes)."""
    headers = {"Connection": "close"} if exc.status == 413 else None
    return JSONResponse({"detail": str(exc)}, exc.status, headers)


@dataclass(frozen=True)
class Upload:
    """The image a request sent, and its other text fields (`label`, for /api/collect)."""

    data: bytes
    fields: dict[str, str]


class _InMemoryMultiPart(MultiPartParser):
    """Starlette's multipart parser, keeping file parts in memory: the body is at most MAX_BODY, so no upload
    ever goes to a temporary file on disk (the default rolls parts over 1 MB there)."""

    spool_max_size = MAX_BODY


async def read_upload(request: Request) -> Upload:
    """The image a request sent, and its other text fields (a dependency: routes take it as `deps.ImageUpload`)."""
    try:
        body = await request.body()
        if not body:
            raise RequestError(400, f"empty request body: {HOW}")
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media == "multipart/form-data":
            parser = _InMemoryMultiPart(request.headers, request.stream(), max_files=4, max_fields=16)
            form = await parser.parse()
            repeated = next((name for name in form if len(form.getlist(name)) > 1), None)
            if repeated is not None:  # which one would count is a guess: refuse rather than take the last
                raise RequestError(400, f'more than one field "{repeated[:40]}" in the form: send one of each')
            image = form.get("image")
            if image is None:
                names = ", ".join(repr(k[:40]) for k in list(form)[:5]) or "none"
                raise RequestError(400, f'no field "image" in the form (fields: {names}): {HOW}')
            if isinstance(image, str):
                raise RequestError(400, f'field "image" is text, not a file: {HOW}')
            fields = {k: v for k, v in form.items() if isinstance(v, str)}
            return Upload(await image.read(), fields)
        if media == "application/json":
            return _from_json(body)
        raise RequestError(415, f"unsupported content type {media or '(none)'!r}: {HOW}")
    except MultiPartException as exc:
        raise RequestError(400, f"malformed multipart body ({exc.message})") from None
    except ClientDisconnect:
        raise RequestError(400, "the client went away before sending the whole body") from None


def _from_json(body: bytes) -> Upload:
    try:
        payload = json.loads(body, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        raise RequestError(400, f"the body is not valid JSON: {HOW}") from None
    if not isinstance(payload, dict) or "image" not in payload:
        raise RequestError(400, f'the JSON body has no "image" key: {HOW}')
    image = payload["image"]
    if not isinstance(image, str):
        raise RequestError(400, f'"image" must be a data URL string, not {type(image).__name__}')
    # Every other field as its JSON text (a string as itself): `"label": 3.5` is refused as "3.5", not dropped.
    fields = {k: v if isinstance(v, str) else json.dumps(v) for k, v in payload.items() if k != "image"}
    return Upload(data_url_bytes(image), fields)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object, refusing a key given twice (json.loads would keep the last silently)."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise RequestError(400, f'the key "{key[:40]}" is given more than once in the JSON body')
        seen.add(key)
    return dict(pairs)


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
