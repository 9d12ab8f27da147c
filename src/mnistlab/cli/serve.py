"""`mnistlab serve`: the draw-a-digit page and its JSON API."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any

from mnistlab.cli.common import Formatter, Subparsers, add_data_dir, add_device
from mnistlab.config import ENGINES
from mnistlab.errors import MnistlabError, warn
from mnistlab.serve.settings import LOG_FORMATS

TOKEN_ENV = "MNISTLAB_TOKEN"  # where --token comes from when not given: the environment is not in `ps`


def register(sub: Subparsers) -> None:
    _add_serve(sub)


def _add_serve(sub: Subparsers) -> None:
    p = sub.add_parser(
        "serve",
        help="a web page to draw or upload digits, with a JSON API (needs mnistlab[web])",
        formatter_class=Formatter,
    )
    p.add_argument("models", nargs="*", metavar="MODEL", help="run directories or model files to serve as well")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: reachable from the network)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    p.add_argument("--collect", metavar="DIR", help="show 'That was a N' buttons that save drawings into DIR/<N>/")
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="processes that decode and preprocess uploads (default: one per CPU core, at most 4; 0: none)",
    )
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default="auto",
        help="what runs the models: onnxruntime (an ONNX copy checked against PyTorch; about twice as fast for "
        "one image on a CPU), torch, or auto: onnxruntime where it is installed and the device is the CPU",
    )
    add_device(p)
    _add_lab(p)
    _add_edge(p)
    _add_connections(p)
    _add_operations(p)
    _add_writes(p)

    p.set_defaults(handler=_serve)


# Each group of the operator's flags, and the ServeSettings fields they fill (serve/settings.py).


def _add_lab(p: argparse.ArgumentParser) -> None:
    """The lab: training from the page."""
    p.add_argument(
        "--lab",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train shipped configs from the page, one at a time, into --runs (default: on when listening on "
        "loopback or with --token; beyond loopback it needs --token)",
    )
    p.add_argument(
        "--runs", default="runs", metavar="DIR", help="the folder the lab's runs are written in and read from"
    )
    add_data_dir(p)


def _lab(args: argparse.Namespace, token: str | None) -> dict[str, Any]:
    from mnistlab.serve import is_loopback

    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise MnistlabError(f"--data-dir {args.data_dir}: no such folder (point it at a folder with the mnist files)")
    if Path(args.runs).exists() and not Path(args.runs).is_dir():
        raise MnistlabError(f"--runs {args.runs}: a file, not a folder; give the folder the lab's runs go in")
    guarded = is_loopback(args.host) or token is not None
    if args.lab and not guarded:
        raise MnistlabError(
            f"--lab on {args.host} (beyond loopback) needs --token or {TOKEN_ENV}: starting trainings is a write"
        )
    values: dict[str, Any] = {"lab": guarded if args.lab is None else args.lab, "runs_dir": args.runs}
    if args.lab is False:
        values["lab_off"] = "the server was started with --no-lab"
    elif not guarded:
        values["lab_off"] = f"the server listens on {args.host} (beyond loopback) without --token"
    return values | {"data_dir": args.data_dir}


def _add_edge(p: argparse.ArgumentParser) -> None:
    """The HTTP edge: bodies, headers, ports."""


def _edge(args: argparse.Namespace) -> dict[str, Any]:
    return {}


def _add_connections(p: argparse.ArgumentParser) -> None:
    """Connections: timeouts, caps, shutdown."""
    from mnistlab.serve.settings import ServeSettings

    default = ServeSettings()
    for flag, help_text in _CONNECTION_FLAGS.items():
        field = flag[2:].replace("-", "_")
        kind = int if field.startswith("max_") else float
        p.add_argument(
            flag, type=kind, default=getattr(default, field), metavar="N" if kind is int else "S", help=help_text
        )


_CONNECTION_FLAGS = {
    "--header-timeout": "seconds a request's head may take to arrive (from the connection's opening), then the "
    "connection is closed (slow or silent clients)",
    "--body-timeout": "seconds a request's body may take to arrive after its head, then 408 and close",
    "--keep-alive-timeout": "seconds an idle kept-alive connection stays open",
    "--max-connections": "open connections; past it the longest idle one is closed, or, all busy, 503",
    "--max-queue": "predictions in the server at once (received, being prepared or run); past it 503",
    "--shutdown-timeout": "seconds requests in progress may take to finish after SIGTERM or Ctrl-C",
}


def _connections(args: argparse.Namespace) -> dict[str, Any]:
    values = {flag[2:].replace("-", "_"): flag for flag in _CONNECTION_FLAGS}
    for field, flag in values.items():
        value = getattr(args, field)
        if not value > 0 or value == float("inf"):  # `not >`: NaN fails too
            raise MnistlabError(f"{flag} must be a positive, finite number, not {value}")
    return {field: getattr(args, field) for field in values}


def _add_operations(p: argparse.ArgumentParser) -> None:
    """Operations: metrics and logs."""
    p.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="human",
        help="json: one JSON line per request on stderr (time, route, status, latency, models, bytes; never the "
        "image); human: no access log. GET /metrics serves Prometheus metrics either way",
    )


def _operations(args: argparse.Namespace) -> dict[str, Any]:
    return {"log_format": args.log_format}


def _add_writes(p: argparse.ArgumentParser) -> None:
    """Writes: tokens, quotas, CORS."""
    from mnistlab.serve.settings import ServeSettings

    default = ServeSettings()
    p.add_argument(
        "--token",
        help="writes (--collect, the lab) need 'Authorization: Bearer TOKEN'; required with --collect or --lab "
        f"beyond loopback (default: the {TOKEN_ENV} environment variable, which ps does not show)",
    )
    p.add_argument(
        "--writes-per-minute",
        type=int,
        default=default.writes_per_minute,
        metavar="N",
        help="writes a client address may make a minute, in bursts of as many, then 429 (0: no limit)",
    )
    p.add_argument(
        "--collect-max-files",
        type=int,
        default=default.collect_max_files,
        metavar="N",
        help="drawings the --collect folder may hold, counting those already there, then 507",
    )
    p.add_argument(
        "--collect-max-mb",
        type=float,
        default=default.collect_max_mb,
        metavar="MB",
        help="megabytes the --collect folder's drawings may take, then 507",
    )
    p.add_argument(
        "--cors",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="let pages from ORIGIN (such as https://lab.example.org) call the API from a browser; repeatable "
        "(default: CORS off, same-origin only)",
    )


def _writes(args: argparse.Namespace) -> dict[str, Any]:
    from mnistlab.serve import is_loopback
    from mnistlab.serve.auth import check_token_text

    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    if token is not None:
        check_token_text(token)
    elif args.collect is not None and not is_loopback(args.host):
        raise MnistlabError(
            f"--collect on {args.host} (beyond loopback) needs --token or {TOKEN_ENV}, so that only who holds it "
            "can write; make one with: python -c 'import secrets; print(secrets.token_urlsafe())'"
        )
    for flag, value in (
        ("--writes-per-minute", args.writes_per_minute),
        ("--collect-max-files", args.collect_max_files),
        ("--collect-max-mb", args.collect_max_mb),
    ):
        if not value >= 0:  # `not >=`: NaN fails too
            raise MnistlabError(f"{flag} must be 0 or more, not {value}")
    origins = tuple(origin.rstrip("/") for origin in args.cors)
    for origin in origins:
        if not re.fullmatch(r"https?://[^/\s?#*]+", origin):
            raise MnistlabError(
                f"--cors {origin!r}: give an origin as scheme://host[:port], such as https://lab.example.org"
            )
    return {
        "token": token,
        "writes_per_minute": args.writes_per_minute,
        "collect_max_files": args.collect_max_files,
        "collect_max_mb": args.collect_max_mb,
        "cors": origins,
    }


def _serve(args: argparse.Namespace) -> None:
    try:
        from mnistlab.serve import create_app, is_loopback, listen, run, url_of
    except ImportError as exc:
        raise MnistlabError(f"mnistlab serve needs the web extra: pip install 'mnistlab[web]' ({exc})") from None

    if args.workers is not None and args.workers < 0:
        raise MnistlabError(f"--workers must be 0 or more, not {args.workers}")
    from mnistlab.serve.settings import ServeSettings

    writes = _writes(args)
    settings = ServeSettings(
        **_edge(args), **_connections(args), **_operations(args), **writes, **_lab(args, writes["token"])
    )
    sock = listen(args.host, args.port)  # before the models load, so a taken port is reported at once
    app = create_app([None, *args.models], args.collect, args.device, args.workers, args.engine, settings)
    if not is_loopback(args.host):
        guard = "writes need the token" if settings.token else "without authentication (nothing is written)"
        warn(f"listening on {args.host}: the page and API are reachable from the network; {guard}")
    state = app.server_state
    engines = sorted({m.engine for m in state.models})
    ready = f"serving {len(args.models) + 1} model(s) with {' and '.join(engines)} at {url_of(sock)} (Ctrl-C to stop)"
    # Requests are served side by side (uploads prepared in `workers` processes): one thread per forward pass
    # does more per core than a team of threads that wait for each other.
    run(app, sock, threads=1 if state.preparers.workers else None, ready=ready)
