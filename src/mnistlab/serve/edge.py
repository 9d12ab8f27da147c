"""The HTTP edge: uvicorn's httptools protocol with the limits nginx has, answering in the app's JSON shape.

- Request lines over `max_request_line` bytes get 414 and heads (request line and headers) over
  `max_header_bytes` get 431, counted as the bytes arrive: uvicorn's httptools protocol has no such cap (its
  `h11_max_incomplete_event_size` is for h11 only), and httptools gathers a header value whole before handing
  it over, so a 100 MB header was read whole.
- Bytes that are not HTTP (including what follows a body shorter than its Content-Length: it is read as the
  next request) get 400 {"detail": "malformed HTTP request (<the parser's reason>)"}, not uvicorn's plain text.
- A lingering close, as nginx does: when the server answers before the client has sent its whole body (a 413,
  or any refusal here), it half-closes, then reads and drops what the client still sends, at most
  `linger_bytes` or `linger_seconds`, before closing. Closing with unread bytes would make the kernel reset the
  connection, and a client still sending (urllib, requests) would get "Connection reset by peer" instead of
  the answer.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from mnistlab.serve.settings import ServeSettings


class _Refused(Exception):
    """An answer the protocol gives itself, before the app sees the request."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _Transport:
    """The connection's transport as uvicorn's request cycles see it: closing it while the client may still be
    sending lingers instead (`EdgeProtocol.close_or_linger`); everything else goes to the real transport."""

    def __init__(self, transport: asyncio.Transport, protocol: EdgeProtocol):
        self.transport, self.protocol = transport, protocol

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)

    def close(self) -> None:
        self.protocol.close_or_linger()

    def is_closing(self) -> bool:
        return self.protocol.lingering is not None or self.transport.is_closing()


class EdgeProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with caps on request lines and heads, JSON refusals and a lingering close.
    The operator's limits are `settings`, set on a subclass per server (`server.run`, which adds the
    connection-level ones)."""

    settings = ServeSettings()

    @staticmethod
    def refused(status: int) -> None:
        """Called with the status of each answer given here (`server.run` counts them in /metrics)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.head_bytes: int | None = 0  # bytes of the request head read so far; None while reading a body
        self.in_body = False  # the head is read and the body not all yet
        self.heads_read = 0  # request heads read whole on this connection
        self.lingering: asyncio.TimerHandle | None = None  # the linger's deadline, while lingering
        self.linger_left = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.real = transport
        super().connection_made(_Transport(transport, self))  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lingering is not None:
            self.lingering.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.lingering is not None:  # read and dropped, up to the linger's bound
            self.linger_left -= len(data)
            if self.linger_left < 0:
                self.real.close()
            return
        self._unset_keepalive_if_required()
        try:
            self._feed(data)
        except _Refused as exc:
            self._refuse(exc.status, str(exc))
        except httptools.HttpParserUpgrade:  # as uvicorn does: WebSockets where a library for them is installed
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError as exc:
            cause = exc.__context__  # an exception raised in a parser callback (ours, or uvicorn's)
            if isinstance(cause, _Refused):
                self._refuse(cause.status, str(cause))
            else:
                reason = " ".join(str(cause or exc).split())[:200]  # one line, whatever the parser quoted
                self._refuse(400, f"malformed HTTP request ({reason})")

    def _feed(self, data: bytes) -> None:
        """Parse `data`, refusing a head that grows past the limit. Counting stops at the end of a head and
        starts again after a body, so bytes of a next (pipelined) request that share a read with the end of a
        body go uncounted: the cap is exact to within one read (at most 256 KB)."""
        limit = self.settings.max_header_bytes
        if self.head_bytes is not None and self.head_bytes + len(data) > limit:
            room, heads = limit - self.head_bytes, self.heads_read
            self.head_bytes = limit
            self.parser.feed_data(data[:room])
            if self.heads_read == heads:  # the head did not end within the limit
                raise _Refused(431, f"request headers over the {_size(limit)} limit")
            data = data[room:]
        elif self.head_bytes is not None:
            self.head_bytes += len(data)
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self.settings.max_request_line:
            raise _Refused(414, f"request line over the {_size(self.settings.max_request_line)} limit")

    def on_headers_complete(self) -> None:
        self.head_bytes, self.in_body = None, True
        self.heads_read += 1
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self.head_bytes, self.in_body = 0, False
        super().on_message_complete()

    def _refuse(self, status: int, message: str) -> None:
        """Answer {"detail": message} with `status` and close (lingering): the request never reaches the app.
        A request before it on the connection whose answer is not sent yet is dropped (as uvicorn does). Once
        an answer has been given (lingering), a second one would follow the end of the stream: close instead."""
        if self.lingering is not None or self.real.is_closing():
            self.real.close()
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.pipeline.clear()
        self.refused(status)
        body = json.dumps({"detail": message}).encode()
        headers = [*self.server_state.default_headers, (b"content-type", b"application/json")]
        headers += [(b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        head = STATUS_LINE[status] + b"".join(name + b": " + value + b"\r\n" for name, value in headers)
        self.real.write(head + b"\r\n" + body)
        self.in_body = True  # the client may still be sending the rest of what was refused
        self.close_or_linger()

    def close_or_linger(self) -> None:
        """Close the connection; if the client may still be sending (its body is not all read), first
        half-close and drop what it sends, within the linger's bounds, so that it reads the answer."""
        if self.lingering is not None or not self.in_body or self.real.is_closing() or not self.real.can_write_eof():
            self.real.close()
            return
        self.linger_left = self.settings.linger_bytes
        self.lingering = self.loop.call_later(self.settings.linger_seconds, self.real.close)
        self.real.write_eof()  # after the answer: the client sees it, then the end of the stream
        self.flow.resume_reading()


def _size(n: int) -> str:
    return f"{n // 1024} KB" if n % 1024 == 0 else f"{n} bytes"
