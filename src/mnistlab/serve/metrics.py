"""What an operator watches: each app's own Prometheus registry (`GET /metrics`, `routers/metrics.py`) and the
ASGI middleware that times and counts every request, and writes its JSON log line with `--log-format json`
(`logs.py`).

Labels stay bounded whatever clients send: a request is labelled with its route's path template
("/api/predict", "/static" for a mounted folder, "unmatched" for any URL no route serves), never the raw URL,
and with its method (unknown methods: "other"). The registry is the app's own, not prometheus_client's global
one, so several apps in one process (the tests, a script serving two sets of models) count apart.

The lab's runs are counted by status at scrape time (`mnistlab_lab_runs`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mnistlab.serve.logs import request_line, write_request_line

if TYPE_CHECKING:
    from mnistlab.serve.app import WebApp
    from mnistlab.serve.deps import ServerState

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
# What the HTTP layer answers itself (serve/edge.py, serve/server.py): malformed, too slow, request line or head
# over its cap.
REFUSED = ("400", "408", "414", "431")
# Seconds: a prediction takes a few ms alone and tens under load; past 10 s something is wrong.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class Exchange:
    """One request as it goes through the app: what the middleware counts and logs when it ends."""

    status: int | None = None  # None: the request ended without an answer
    bytes_in: int = 0  # body bytes the app read (none for a body refused from its Content-Length)
    bytes_out: int = 0  # response body bytes
    models: list[str] = field(default_factory=list)  # the models that answered (see `answered`)
    flagged: list[str] = field(default_factory=list)  # those of them that flagged the image as an outlier


# The request at hand, for `answered` (the middleware sets it; the route runs in the same task, or in one that
# copies the context, and the Exchange is shared by reference either way).
_EXCHANGE: ContextVar[Exchange | None] = ContextVar("mnistlab_exchange", default=None)


def answered(models: Iterable[str], flagged: Iterable[str] = ()) -> None:
    """Note that these models each answered one image for the request at hand, and that the `flagged` ones
    found it unlike their training data (`engines.Predictor.answer`); outside a request (scripts, the start-up
    check) it does nothing."""
    exchange = _EXCHANGE.get()
    if exchange is not None:
        exchange.models.extend(models)
        exchange.flagged.extend(flagged)


class _StateCollector:
    """What is read from the server's state at scrape time: the predictions in the server, the preprocessing
    processes' restarts (counted by `engines.MicroBatcher` and `workers.Preparers`) and the lab's runs."""

    def __init__(self, state: ServerState):
        self.state = state

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "mnistlab_prediction_queue_depth",
            "Predictions in the server: their body received, not yet answered (being prepared or batched)",
            value=self.state.batcher.pending,
        )
        yield CounterMetricFamily(
            "mnistlab_preprocessing_restarts",
            "Times the pool of preprocessing processes was replaced after one of them died",
            value=self.state.preparers.restarts,
        )
        if self.state.lab is not None:
            runs = GaugeMetricFamily(
                "mnistlab_lab_runs", "The lab's runs under --runs, by status (queued: its queue)", labels=["status"]
            )
            for status, count in self.state.lab.counts().items():
                runs.add_metric([status], count)
            yield runs


class Routes:
    """The path templates a request is labelled with, read from the app once."""

    def __init__(self, app: WebApp):
        self.mounts = [route.path for route in app.routes if isinstance(route, Mount)]
        # Paths of the routes, for requests answered before routing (a 413 from Content-Length); FastAPI may nest
        # included routers, so they are read from the OpenAPI document, plus what sits on the app itself.
        paths = {route.path for route in app.routes if isinstance(getattr(route, "path", None), str)}
        self.paths = frozenset(paths | set(app.openapi().get("paths", {})))

    def template(self, scope: Scope) -> str:
        """The path template of the route that served `scope` (read after the app ran: the router notes its
        route), else the path itself when it is a route's, else "unmatched"."""
        route = scope.get("route")
        if not isinstance(route, Mount) and isinstance(getattr(route, "path_format", None), str):
            return route.path_format
        path = scope["path"]
        mount = next((m for m in self.mounts if path.startswith(m.rstrip("/") + "/")), None)
        return mount or (path if path in self.paths else "unmatched")


class Metrics:
    """An app's registry and its metrics."""

    def __init__(self, app: WebApp):
        state = app.server_state
        self.routes = Routes(app)
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mnistlab_http_requests",
            "HTTP requests answered, by route template, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "mnistlab_http_request_duration_seconds",
            "Time from a request's arrival to the end of its answer, by route template and method",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.refused = Counter(
            "mnistlab_http_refused",
            "Requests the HTTP layer answered itself, never reaching the app (malformed, a request line or head "
            "over its cap, too slow), by status",
            ["status"],
            registry=self.registry,
        )
        for status in REFUSED:  # every series exists from the start, at 0
            self.refused.labels(status)
        self.predictions = Counter(
            "mnistlab_predictions", "Images classified, by model", ["model"], registry=self.registry
        )
        self.outliers = Counter(
            "mnistlab_outliers",
            'Images flagged as unlike the model\'s training data ("not a digit"), by model',
            ["model"],
            registry=self.registry,
        )
        for model in state.models:  # every model's series exists from the start, at 0
            self.predictions.labels(model.name)
            if model.threshold is not None:  # a model without a detector flags nothing: no series
                self.outliers.labels(model.name)
        self.registry.register(_StateCollector(state))
        ProcessCollector(registry=self.registry)  # the server's memory, CPU and open files

    def record(self, route: str, method: str, exchange: Exchange, seconds: float) -> None:
        status = str(exchange.status) if exchange.status is not None else "none"
        self.requests.labels(route, method, status).inc()
        self.latency.labels(route, method).observe(seconds)
        for model in exchange.models:
            self.predictions.labels(model).inc()
        for model in exchange.flagged:
            self.outliers.labels(model).inc()

    def refuse(self, status: int) -> None:
        """Count an answer the HTTP layer gave itself (`edge.EdgeProtocol.refused`)."""
        self.refused.labels(str(status)).inc()


def metrics_of(app: WebApp) -> Metrics:
    """The app's metrics, made on first use (by the first request or scrape) and kept on `app.state`."""
    metrics = getattr(app.state, "metrics", None)
    if metrics is None:
        metrics = app.state.metrics = Metrics(app)
    return metrics


class RequestMetrics:
    """ASGI middleware: counts and times every HTTP request into the app's metrics, by route template and
    status, and with `--log-format json` writes its line. Added last in `create_app`, it is the outermost
    middleware, so the answers other middleware gives (a 413 from Content-Length) are counted too."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        web_app = scope["app"]
        metrics = metrics_of(web_app)
        method = scope["method"] if scope["method"] in METHODS else "other"
        exchange = Exchange()
        token = _EXCHANGE.set(exchange)
        start = time.perf_counter()

        async def receiving() -> Message:
            message = await receive()
            exchange.bytes_in += len(message.get("body", b""))
            return message

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                exchange.status = message["status"]
            else:
                exchange.bytes_out += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receiving, sending)
        except Exception:
            exchange.status = exchange.status or 500  # Starlette's outermost handler answers 500 for it
            raise
        finally:
            _EXCHANGE.reset(token)
            seconds = time.perf_counter() - start
            route = metrics.routes.template(scope)
            metrics.record(route, method, exchange, seconds)
            if web_app.server_state.settings.log_format == "json":
                models, sizes = len(exchange.models), (exchange.bytes_in, exchange.bytes_out)
                write_request_line(request_line(scope, route, exchange.status, seconds, models, *sizes))
