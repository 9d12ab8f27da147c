"""Real HTTP servers on 127.0.0.1: a folder for the download tests, and `mnistlab serve` itself."""

from __future__ import annotations

import contextlib
import functools
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def serve_folder(folder: Path) -> Iterator[str]:
    """A real ThreadingHTTPServer on 127.0.0.1 (a free port) serving `folder`; yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@dataclass
class Served:
    """A running `mnistlab serve`: its base URL (ending in /) and its process (for signals)."""

    url: str
    process: subprocess.Popen


@contextlib.contextmanager
def mnistlab_serve(*args: str, env: dict[str, str] | None = None) -> Iterator[Served]:
    """`mnistlab serve ARGS` in a process of its own on a free loopback port, until the block ends (SIGTERM)."""
    command = [sys.executable, "-m", "mnistlab", "serve", *args, "--port", "0"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = server.stdout.readline()
        assert " at http://127.0.0.1:" in line, line + server.stderr.read()
        yield Served(line.split(" at ")[1].split()[0], server)
    finally:
        if server.poll() is None:
            server.terminate()
        server.wait(timeout=30)
