"""The request log of `mnistlab serve --log-format json`: one JSON object a line on stderr per request, for a
log shipper to read. It holds what an operator needs to follow traffic and errors, never what was sent: no
image, no form field, no query string. The default ("human") writes no access log, as uvicorn's would cost
more than a prediction; start-up lines, warnings and errors stay human either way."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime

from starlette.types import Scope

MAX_PATH = 200  # characters of the requested path kept in a line (a URL can be as long as the server allows)


def request_line(
    scope: Scope, route: str, status: int | None, seconds: float, models: int, bytes_in: int, bytes_out: int
) -> str:
    """One request as a line of JSON: when it ended (UTC), the client, method, path (without the query), route
    template, status (null: no answer was sent), latency in milliseconds, how many models answered, and the
    body bytes read and sent."""
    client = scope.get("client")
    record = {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "client": client[0] if client else None,
        "method": scope["method"],
        "path": scope["path"][:MAX_PATH],
        "route": route,
        "status": status,
        "latency_ms": round(seconds * 1000, 2),
        "models": models,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
    }
    return json.dumps(record, ensure_ascii=True)


def write_request_line(line: str) -> None:
    """The line on stderr, at once (a log shipper reads it as it comes)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
