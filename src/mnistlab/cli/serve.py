"""`mnistlab serve`: the draw-a-digit page and its JSON API."""

from __future__ import annotations

import argparse
from typing import Any

from mnistlab.cli.common import Formatter, Subparsers, add_device
from mnistlab.config import ENGINES
from mnistlab.errors import MnistlabError, warn


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
    _add_edge(p)
    _add_connections(p)
    _add_operations(p)
    _add_writes(p)

    p.set_defaults(handler=_serve)


# Each group of the operator's flags, and the ServeSettings fields they fill (serve/settings.py).


def _add_edge(p: argparse.ArgumentParser) -> None:
    """The HTTP edge: bodies, headers, ports."""


def _edge(args: argparse.Namespace) -> dict[str, Any]:
    return {}


def _add_connections(p: argparse.ArgumentParser) -> None:
    """Connections: timeouts, caps, shutdown."""


def _connections(args: argparse.Namespace) -> dict[str, Any]:
    return {}


def _add_operations(p: argparse.ArgumentParser) -> None:
    """Operations: metrics and logs."""


def _operations(args: argparse.Namespace) -> dict[str, Any]:
    return {}


def _add_writes(p: argparse.ArgumentParser) -> None:
    """Writes: tokens, quotas, CORS."""


def _writes(args: argparse.Namespace) -> dict[str, Any]:
    return {}


def _serve(args: argparse.Namespace) -> None:
    try:
        from mnistlab.serve import create_app, is_loopback, listen, run, url_of
    except ImportError as exc:
        raise MnistlabError(f"mnistlab serve needs the web extra: pip install 'mnistlab[web]' ({exc})") from None

    if args.workers is not None and args.workers < 0:
        raise MnistlabError(f"--workers must be 0 or more, not {args.workers}")
    sock = listen(args.host, args.port)  # first, so a taken port is reported before the models load
    from mnistlab.serve.settings import ServeSettings

    settings = ServeSettings(**_edge(args), **_connections(args), **_operations(args), **_writes(args))
    app = create_app([None, *args.models], args.collect, args.device, args.workers, args.engine, settings)
    if not is_loopback(args.host):
        warn(f"listening on {args.host}: the page and API are reachable from the network, without any authentication")
    state = app.server_state
    engines = sorted({m.engine for m in state.models})
    print(
        f"serving {len(args.models) + 1} model(s) with {' and '.join(engines)} at {url_of(sock)} (Ctrl-C to stop)",
        flush=True,
    )
    # Requests are served side by side (uploads prepared in `workers` processes): one thread per forward pass
    # does more per core than a team of threads that wait for each other.
    run(app, sock, threads=1 if state.preparers.workers else None)
