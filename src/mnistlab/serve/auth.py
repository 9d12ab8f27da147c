"""Who may write, how often and how much: the bearer token of the write endpoints (compared in constant time),
a rate limit per client address, the quota of the collect folder, and CORS when the operator names origins.

A write endpoint takes `deps.Writer` as a dependency: the client's rate is checked first (so guessing the token
is as slow as writing), then the token. Refusals are JSON {"detail": "one line"} with the header that says what
to do: 401 with `WWW-Authenticate: Bearer`, 429 with `Retry-After` (seconds)."""

from __future__ import annotations

import hmac
import math
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from mnistlab.errors import MnistlabError
from mnistlab.serve.settings import ServeSettings

# Clients remembered by the rate limit: an attacker with many addresses evicts the oldest, never grows memory.
MAX_CLIENTS = 10_000


def check_token_text(token: str) -> str:
    """`token` if a browser can send it in a header (visible ASCII, no spaces), else a one-line error."""
    if not token or not all("!" <= c <= "~" for c in token):
        raise MnistlabError(
            "--token must be letters, digits and punctuation without spaces, such as the output of "
            "python -c 'import secrets; print(secrets.token_urlsafe())'"
        )
    return token


class RateLimit:
    """A token bucket per client address: `per_minute` writes a minute, in bursts of up to as many (0: none
    refused). Kept in memory: each server instance limits what reaches it."""

    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (writes left, when)

    def take(self, client: str, now: float | None = None) -> float:
        """Count one write of `client`: 0 if allowed, else the seconds until one would be."""
        if self.per_minute <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        rate = self.per_minute / 60
        left, then = self.buckets.pop(client, (float(self.per_minute), now))
        left = min(float(self.per_minute), left + (now - then) * rate)
        allowed = left >= 1
        self.buckets[client] = (left - 1 if allowed else left, now)
        while len(self.buckets) > MAX_CLIENTS:
            self.buckets.popitem(last=False)
        return 0.0 if allowed else (1 - left) / rate


class CollectQuota:
    """How many files and bytes the collect folder holds (its label folders' PNGs, counted at the start and as
    the server saves), against the operator's limits."""

    def __init__(self, folder: Path, max_files: int, max_mb: float):
        self.max_files, self.max_mb, self.max_bytes = max_files, max_mb, int(max_mb * 2**20)
        pngs = [p for p in folder.glob("*/*.png") if p.is_file()]
        self.files, self.bytes = len(pngs), sum(p.stat().st_size for p in pngs)

    def check_room(self, size: int = 0) -> None:
        """A 507 if one more file of `size` bytes would pass a limit."""
        if self.files + 1 > self.max_files:
            raise HTTPException(
                507,
                f"the collect folder is full: it holds {self.files} of at most {self.max_files} "
                "files (--collect-max-files); nothing was saved",
            )
        if self.bytes + size > self.max_bytes:
            held = f"{self.bytes / 2**20:.1f} MB of at most {self.max_mb:g} MB"
            raise HTTPException(
                507,
                f"the collect folder is full: it holds {held} and the drawing takes "
                f"{size} bytes (--collect-max-mb); nothing was saved",
            )

    def add(self, size: int) -> None:
        self.files += 1
        self.bytes += size


class Writes:
    """What guards one server's writes: its token, its per-client rate limit and its collect quota."""

    def __init__(self, settings: ServeSettings, collect: Path | None):
        self.token = settings.token.encode() if settings.token is not None else None
        self.rate = RateLimit(settings.writes_per_minute)
        self.quota = CollectQuota(collect, settings.collect_max_files, settings.collect_max_mb) if collect else None

    def admit(self, request: Request) -> None:
        """Refuse the write `request` asks for if its client writes too often (429) or lacks the token (401)."""
        # Behind a reverse proxy, uvicorn puts the address from X-Forwarded-For here (see docs/serving.md).
        client = request.client.host if request.client else "unknown"
        wait = self.rate.take(client)
        if wait:
            seconds = math.ceil(wait)
            raise HTTPException(
                429,
                f"too many writes from {client}: at most {self.rate.per_minute} a minute; try again in {seconds} s",
                {"Retry-After": str(seconds)},
            )
        if self.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise HTTPException(401, "writes need this server's token: send Authorization: Bearer <token>", _ASK)
        # compare_digest takes as long whatever the first differing byte: the time says nothing of the token.
        if not hmac.compare_digest(given.strip().encode("latin-1"), self.token):
            raise HTTPException(401, "wrong token in Authorization: Bearer <token>", _ASK)


_ASK = {"WWW-Authenticate": "Bearer"}


class Cors(CORSMiddleware):
    """Starlette's CORS for the origins the operator names (--cors), with its refused preflights answered in
    the server's JSON shape rather than plain text."""

    def __init__(self, app: Any, origins: tuple[str, ...]):
        super().__init__(
            app,
            allow_origins=list(origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            max_age=600,
        )

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        reason = response.body.decode()  # "Disallowed CORS origin, method, headers": the ones that failed
        headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
        return JSONResponse({"detail": f"CORS preflight refused: {reason[len('Disallowed CORS ') :]}"}, 400, headers)
