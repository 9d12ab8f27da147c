"""Real HTTP servers on 127.0.0.1: a folder for the download tests, `mnistlab serve` itself (in a process of its own,
or an app in a thread of the test's), and the processes a server runs."""

from __future__ import annotations

import contextlib
import functools
import subprocess
import sys
import threading
import time
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


class AppServer:
    """A real uvicorn server for an app, in a thread of this process, on a free loopback port."""

    def __init__(self, app):
        import uvicorn  # the web extra: only the tests that serve an app need it

        from mnistlab.serve import listen

        self.app = app
        self.sock = listen("127.0.0.1", 0)
        self.host, self.port = self.sock.getsockname()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def process_gone(pid: int) -> bool:
    """Whether a process has exited (a zombie awaiting its parent's wait counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):  # the second: reaped while its file was being read
        return True


def child_pids(pid: int) -> list[int]:
    """The process ids of `pid`'s children (Linux: /proc)."""
    tasks = Path(f"/proc/{pid}/task")
    return [int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split()]


def command_line(pid: int) -> str:
    """The command line `pid` runs, its arguments joined by spaces."""
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
