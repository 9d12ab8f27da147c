"""Running the web app with uvicorn, as a server on an open network needs it: slow, idle and too many clients
cannot starve it, and a stop finishes what it started.

- Timeouts (`Protocol`): a request's head must arrive within `header_timeout` of the connection's opening or of
  the request's first byte, and its body within `body_timeout` of its head; past them the connection is closed
  (with a 408 if the client had begun a request). uvicorn has no header or body timeout of its own: a client
  that trickles its head a byte a second (slowloris) or says nothing held its connection for ever. Between
  requests a kept-alive connection is closed after `keep_alive_timeout` (uvicorn's own timer).
- Caps: at most `max_connections` open connections. One more evicts the connection that has waited longest
  without a request in progress (idle, or still sending its head), so that holding connections open starves
  nobody; only when every connection is busy with a request is the new one answered 503. At most `max_queue`
  predictions (their body received) are in the server at once (`QueueCap`); past it, 503. Both say
  `Retry-After: 1`, in the app's JSON shape: the queue is never unbounded, and a refusal costs microseconds.
- Stopping (`Server`): SIGTERM, Ctrl-C or SIGHUP stop accepting (connections the kernel already accepted are
  taken first, so none is reset), let requests in progress finish within `shutdown_timeout`, close idle
  connections, stop the preprocessing processes and return: `mnistlab serve` exits 0. A second Ctrl-C stops at
  once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import resource
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mnistlab.errors import plural, warn
from mnistlab.files import STOPPING
from mnistlab.serve.edge import EdgeProtocol
from mnistlab.serve.metrics import metrics_of
from mnistlab.serve.settings import ServeSettings

if TYPE_CHECKING:
    from mnistlab.serve.app import WebApp

__all__ = ["QueueCap", "Server", "run"]

RETRY_AFTER_S = 1  # a full queue drains in well under a second (docs/serving.md, "Connections")
# After a stop, how long a connection accepted just before it, or sending a head, may take to send its head.
STOP_GRACE_S = 1.0
# File descriptors the server needs besides its connections: its own files, the preprocessing processes' pipes.
SPARE_FDS = 64
PREDICTION_PATHS = frozenset({"/api/predict", "/api/collect"})


def run(app: WebApp, sock: socket.socket, threads: int | None = None, ready: str | None = None) -> None:
    """Serve `app` on `sock` with uvicorn until SIGTERM or Ctrl-C, with the timeouts, caps and graceful stop of
    `app.server_state.settings`; no access log (it would cost more than a prediction). `ready` is printed once
    the server accepts and a stop signal is handled gracefully (before that, Ctrl-C would be a KeyboardInterrupt
    in whatever code it lands in)."""
    if threads:
        torch.set_num_threads(threads)
    settings = _fit_open_files(app.server_state.settings)
    config = uvicorn.Config(
        app,
        http=type("Protocol", (Protocol,), {"settings": settings, "refused": staticmethod(metrics_of(app).refuse)}),
        log_level="warning",
        access_log=False,
        timeout_keep_alive=settings.keep_alive_timeout,
        timeout_graceful_shutdown=settings.shutdown_timeout,
    )
    server = Server(config)
    server.ready = ready
    server.run(sockets=[sock])


def _fit_open_files(settings: ServeSettings) -> ServeSettings:
    """Make room for `max_connections` open files (raising the soft limit up to the hard one); where there is
    none, lower the cap to fit and say so. Past the limit, accept() would fail and stall every new client."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = settings.max_connections + SPARE_FDS
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        if soft < needed:
            fits = max(1, soft - SPARE_FDS)
            warn(f"--max-connections {settings.max_connections} lowered to {fits}: the open-file limit is {soft}")
            return dataclasses.replace(settings, max_connections=fits)
    return settings


# ---------------------------------------------------------------------------------------------- refusals


async def busy(send: Send, detail: str, close: bool = False) -> None:
    """Answer 503 {"detail": ...} with Retry-After (and Connection: close when the connection is refused)."""
    body = json.dumps({"detail": detail}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(RETRY_AFTER_S).encode()),
    ]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class QueueFull(Exception):
    """Raised from a prediction's body read when `max_queue` predictions are already in the server."""


class QueueCap:
    """At most `settings.max_queue` predictions (POST /api/predict or /api/collect whose body has arrived) in
    the app at once, counted in `batcher.pending` (the queue depth an operator watches); past it 503 with
    Retry-After, before any work is done on the image. Counted from the body's end, not the request's start,
    so that a slow uploader holds a connection (bounded by `body_timeout`) but no place in the queue."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in PREDICTION_PATHS:
            await self.app(scope, receive, send)
            return
        state = scope["app"].server_state
        batcher, limit = state.batcher, state.settings.max_queue
        admitted = False

        async def counted() -> Message:
            nonlocal admitted
            message = await receive()
            if not admitted and message["type"] == "http.request" and not message.get("more_body", False):
                if batcher.pending >= limit:
                    raise QueueFull
                batcher.pending += 1
                admitted = True
            return message

        try:
            await self.app(scope, counted, send)
        except QueueFull:
            await busy(send, f"the server is busy: {plural(limit, 'prediction')} waiting; retry in a second")
        finally:
            if admitted:
                batcher.pending -= 1


# ---------------------------------------------------------------------------------------------- connections


class Protocol(EdgeProtocol):
    """uvicorn's httptools protocol (with the edge's limits, `edge.EdgeProtocol`) and the timeouts, connection
    cap and graceful stop of `settings` (set on a subclass made per server by `run`)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.app = self._admit  # every request passes the connection cap first
        self.socket_transport: asyncio.Transport | None = None  # the real one (the edge wraps what uvicorn sees)
        self.deadline: asyncio.TimerHandle | None = None  # for the head, or for the body, being read
        self.began = 0  # requests begun on this connection
        self.in_head = False  # a request's head is arriving
        # Since when no request is in progress: time.monotonic, as the loop's clock is read once a turn (uvloop)
        # and connections accepted in one turn would tie.
        self.idle_since = time.monotonic()
        self.stopping = False

    # -- the connection's life

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.socket_transport = transport
        super().connection_made(transport)
        self._arm(self.settings.header_timeout, self._head_timed_out)
        if len(self.connections) > self.settings.max_connections:
            self._evict_one()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def busy_with_request(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _evict_one(self) -> None:
        """Close the connection that has waited longest without a request in progress (not this one); if every
        connection is busy, this one's request is answered 503 (`_admit`)."""
        waiting = [c for c in self.connections if isinstance(c, Protocol) and c is not self and c.evictable()]
        if waiting:
            min(waiting, key=lambda c: c.idle_since).close_now()

    def evictable(self) -> bool:
        return not self.busy_with_request() and not self.stopping

    def close_now(self) -> None:
        if self.socket_transport is not None and not self.socket_transport.is_closing():
            self.socket_transport.close()

    async def _admit(self, scope: Scope, receive: Receive, send: Send) -> None:
        if len(self.connections) > self.settings.max_connections:
            detail = f"the server has {plural(self.settings.max_connections, 'connection')} busy; retry in a second"
            await busy(send, detail, close=True)
            return
        await self.config.loaded_app(scope, receive, send)

    # -- parser callbacks: which deadline runs

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.began += 1
        self.in_head = True
        if self.deadline is None:  # the first request's deadline runs from the connection's opening
            self._arm(self.settings.header_timeout, self._head_timed_out)

    def on_headers_complete(self) -> None:
        self._disarm()
        self.in_head = False
        super().on_headers_complete()
        if self.stopping and self.cycle is not None:
            self.cycle.keep_alive = False
        self._arm(self.settings.body_timeout, self._body_timed_out)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        self.idle_since = time.monotonic()
        super().on_response_complete()

    def _arm(self, seconds: float, then: Any) -> None:
        self._disarm()
        self.deadline = self.loop.call_later(seconds, then)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _head_timed_out(self) -> None:
        self.deadline = None
        if self.in_head:  # a request begun: say why it ends
            self._time_out(f"request head not received within {self.settings.header_timeout:g} s")
        else:  # opened and said nothing: nobody to tell
            self.close_now()

    def _body_timed_out(self) -> None:
        self.deadline = None
        if self.cycle is not None and not self.cycle.response_started:
            self._time_out(f"request body not received within {self.settings.body_timeout:g} s")
        else:
            self.close_now()

    def _time_out(self, detail: str) -> None:
        """408 {"detail": ...}, then close at once: the client is too slow to be worth a lingering close."""
        self._refuse(408, detail)
        self.close_now()

    # -- a graceful stop (`Server.shutdown` calls this on every connection)

    def shutdown(self) -> None:
        """A request in progress finishes, and then the connection closes; one whose head is arriving, or that
        was accepted just before the stop, gets STOP_GRACE_S for its head (then the same); an idle one closes
        now."""
        self.stopping = True
        if self.busy_with_request():
            super().shutdown()  # uvicorn: close after the answer
        elif self.in_head or self.began == 0:  # a request that begins or is about to: it gets STOP_GRACE_S
            self._arm(STOP_GRACE_S, self.close_now)
        else:
            self.close_now()


class Server(uvicorn.Server):
    """uvicorn's server, stopping gracefully on SIGTERM, Ctrl-C and SIGHUP and then returning (uvicorn raises
    the signal again after its stop, which would make `mnistlab serve` exit 143 or 130 rather than 0)."""

    stopped_by: int | None = None
    ready: str | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in STOPPING}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.ready and not self.should_exit:
            print(self.ready, flush=True)

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.stopped_by = self.stopped_by or sig
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        accepted = _take_accepted(sockets or [])
        for server in self.servers:  # stop accepting before anything awaits
            server.close()
        loop = asyncio.get_running_loop()
        for sock in accepted:
            await loop.connect_accepted_socket(self._protocol, sock)
        busy_now = sum(1 for c in self.server_state.connections if isinstance(c, Protocol) and c.busy_with_request())
        why = signal.Signals(self.stopped_by).name if self.stopped_by else "asked to"
        limit = self.config.timeout_graceful_shutdown
        print(
            f"stopping ({why}): finishing {plural(busy_now, 'request')} in progress (at most {limit:g} s)", flush=True
        )
        lab = getattr(getattr(self.config.app, "server_state", None), "lab", None)
        if lab is not None:  # its training stopped (resumable) and its event streams ended, which would hold the stop
            await asyncio.to_thread(lab.close)
        await super().shutdown(sockets)

    def _protocol(self) -> asyncio.Protocol:
        return self.config.http_protocol_class(  # type: ignore[call-arg]
            config=self.config, server_state=self.server_state, app_state=self.lifespan.state
        )


def _take_accepted(sockets: list[socket.socket]) -> list[socket.socket]:
    """The connections waiting in the listening sockets' queues: closing a listening socket resets them, and
    their clients, who connected and sent a request, would read "Connection reset by peer"."""
    taken = []
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.setblocking(False)
            while True:
                try:
                    taken.append(sock.accept()[0])
                except BlockingIOError:
                    break
    return taken
