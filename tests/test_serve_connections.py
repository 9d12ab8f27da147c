"""Slow, idle and too many clients, stopping, and dying preprocessing processes, against a real `mnistlab serve`
on loopback (tests/support/servers.py) with real clients: raw sockets for what no polite client sends, urllib
and http.client for the rest. Loads are bounded in count; waits are bounded and never asserted as speeds."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import io
import json
import os
import select
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from email.message import Message
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the web extra is not installed (pip install 'mnistlab[web]')")

from mnistlab.serve.images import prepare_digit
from mnistlab.serve.workers import Preparers

from .support.cli import assert_user_error, mnistlab
from .support.drawings import drawn_png
from .support.servers import Served, child_pids, command_line, mnistlab_serve, process_gone

SEVEN = drawn_png("7")


def photo_of_seven(size: int = 3000) -> bytes:
    """The drawn 7 as a large JPEG: about 160 kB that take a preprocessing process 0.1-0.4 s to prepare."""
    buffer = io.BytesIO()
    Image.open(io.BytesIO(SEVEN)).convert("RGB").resize((size, size)).save(buffer, "JPEG", quality=80)
    return buffer.getvalue()


def address(served: Served) -> tuple[str, int]:
    host, port = served.url.split("/")[2].rsplit(":", 1)
    return host, int(port)


def predict(url: str, data: bytes = SEVEN, timeout: float = 30) -> tuple[int, dict, Message]:
    """POST an image to /api/predict with urllib (a fresh connection): status, JSON body, headers."""
    boundary = "mnistlab-test"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="d.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        url + "api/predict", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, json.load(answer), answer.headers
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc), exc.headers


def is_open(sock: socket.socket) -> bool:
    """Whether the server holds `sock` open and has sent nothing on it (no answer, no end, no reset)."""
    return not select.select([sock], [], [], 0)[0]


def until(condition: Callable[[], bool], seconds: float, what: str) -> None:
    """Wait for `condition`, failing with `what` after `seconds` (a bound, not a measure)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def read_to_end(sock: socket.socket) -> bytes:
    """All the server sends until it closes (a reset after an answer counts as the end)."""
    sock.settimeout(30)
    received = b""
    while True:
        try:
            piece = sock.recv(65536)
        except ConnectionResetError:
            return received
        if not piece:
            return received
        received += piece


def workers_of(served: Served) -> list[int]:
    return [p for p in child_pids(served.process.pid) if "multiprocessing.spawn" in command_line(p)]


# ---------------------------------------------------------------------------------------------- slow clients


@pytest.mark.slow  # 200 connections held for the header timeout (5 s)
def test_slow_and_silent_clients_starve_no_one_and_are_closed_after_the_header_timeout():
    """100 clients trickling a request head a byte every half second (slowloris) and 100 that connect and say
    nothing: a normal client gets its prediction while they are all still connected, and the server closes
    every one of them after --header-timeout (the tricklers with a 408)."""
    with mnistlab_serve("--workers", "0", "--engine", "torch", "--header-timeout", "5") as served:
        host, port = address(served)
        silent = [socket.create_connection((host, port)) for _ in range(100)]
        tricklers = [socket.create_connection((host, port)) for _ in range(100)]
        head = b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Slow: "
        stop = threading.Event()

        def trickle() -> None:
            for i in range(len(head) * 10):  # never the whole head
                for sock in tricklers:
                    with contextlib.suppress(OSError):  # closed by the server
                        sock.send(head[i : i + 1] if i < len(head) else b"a")
                if stop.wait(0.5):
                    return

        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        try:
            started = time.monotonic()
            status, body, _ = predict(served.url)
            took = time.monotonic() - started
            assert status == 200 and body["predictions"][0]["label"] == 7
            assert all(map(is_open, silent + tricklers)), "slow clients were closed before the normal one's answer"
            print(f"a prediction among 200 slow clients: {took * 1000:.0f} ms")
            until(lambda: not any(map(is_open, silent + tricklers)), 15, "slow clients outlived --header-timeout")
            assert all(read_to_end(sock) == b"" for sock in silent)
            answers = [read_to_end(sock) for sock in tricklers]
            assert all(a.startswith(b"HTTP/1.1 408 ") and b"request head not received within 5 s" in a for a in answers)
            assert predict(served.url)[0] == 200
        finally:
            stop.set()
            thread.join(5)
            for sock in silent + tricklers:
                sock.close()


@pytest.fixture(scope="module")
def capped() -> Iterator[Served]:
    """A server with small caps and short timeouts, to reach them with a few connections."""
    flags = ["--max-connections", "6", "--max-queue", "1", "--keep-alive-timeout", "1", "--body-timeout", "3"]
    with mnistlab_serve("--workers", "1", "--engine", "torch", *flags) as served:
        yield served


def busy_connection(host: str, port: int) -> socket.socket:
    """A connection with a request in progress: its head sent, its body not all."""
    sock = socket.create_connection((host, port))
    sock.sendall(
        b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
    )
    return sock


@pytest.mark.slow  # a server started, and a body timeout waited for
def test_connections_over_the_cap_evict_idle_ones_or_get_503_with_retry_after(capped):
    host, port = address(capped)
    idle = [socket.create_connection((host, port)) for _ in range(6)]
    try:
        # Six idle connections fill the cap; a seventh evicts the one idle longest, and is served.
        assert predict(capped.url)[0] == 200
        until(lambda: not is_open(idle[0]), 10, "the longest idle connection was not evicted")
        assert all(map(is_open, idle[1:]))
    finally:
        for sock in idle:
            sock.close()
    busy = [busy_connection(host, port) for _ in range(5)]
    try:
        # A sixth, asked something first: once it is answered, the server has read the five heads sent before.
        sixth = http.client.HTTPConnection(host, port, timeout=30)
        sixth.request("GET", "/api/health")
        assert sixth.getresponse().read() and sixth.sock is not None
        busy.append(sixth.sock)
        sixth.sock.sendall(b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        # Six requests in progress: nothing to evict, so the next connection is refused, in the JSON shape.
        status, body, headers = predict(capped.url)
        assert (status, headers["Retry-After"], headers["Connection"]) == (503, "1", "close")
        assert "6 connections busy" in body["detail"] and "\n" not in body["detail"]
        # A body that does not come within --body-timeout: 408, and the connection closed.
        answer = read_to_end(busy[0])
        assert answer.startswith(b"HTTP/1.1 408 ") and b"request body not received within 3 s" in answer
    finally:
        for sock in busy:
            sock.close()
    until(lambda: predict(capped.url)[0] == 200, 10, "the server did not serve again once the busy ones left")


@pytest.mark.slow  # 8 large photos prepared
def test_a_full_prediction_queue_answers_503_with_retry_after_and_the_rest_are_served(capped):
    photo, answers = photo_of_seven(), []
    start = threading.Barrier(5)

    def client() -> None:
        start.wait()
        answers.append(predict(capped.url, photo))

    threads = [threading.Thread(target=client) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    statuses = sorted(status for status, _, _ in answers)
    assert len(answers) == 5 and set(statuses) == {200, 503}, statuses
    for status, body, headers in answers:
        if status == 503:
            assert headers["Retry-After"] == "1" and "busy: 1 prediction waiting" in body["detail"]
        else:
            assert body["predictions"][0]["label"] == 7
    with urllib.request.urlopen(capped.url + "api/health", timeout=30) as health:  # never queued
        assert health.status == 200


@pytest.mark.slow  # waits for the keep-alive timeout (1 s)
def test_a_kept_alive_connection_is_reused_then_closed_after_the_keep_alive_timeout(capped):
    host, port = address(capped)
    connection = http.client.HTTPConnection(host, port, timeout=30)
    try:
        for _ in range(2):
            connection.request("GET", "/api/health")
            answer = connection.getresponse()
            assert answer.status == 200 and answer.getheader("Connection") != "close"
            answer.read()
            if _ == 0:
                first = connection.sock
        assert connection.sock is first and is_open(first)  # the second request reused the connection
        until(lambda: not is_open(first), 10, "an idle kept-alive connection was never closed")
    finally:
        connection.close()


# ---------------------------------------------------------------------------------------------- stopping


@pytest.mark.slow  # a server started, loaded and stopped
@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_stop_under_load_answers_every_request_in_progress_and_exits_0(how):
    """Six clients sending predictions back to back; the stop comes while requests are in progress (Ctrl-C as a
    terminal sends it: to the server and its preprocessing processes at once). Every request begun before the
    stop is answered 200, none is reset; the server exits 0 within 10 s, its preprocessing processes with it."""
    with mnistlab_serve("--workers", "2", "--engine", "torch") as served:
        workers = workers_of(served)
        assert len(workers) == 2
        stop, outcomes, lock = threading.Event(), [], threading.Lock()

        def client() -> None:
            while not stop.is_set():
                began = time.monotonic()
                try:
                    outcome = predict(served.url)[0]
                except OSError as exc:  # a reset, a refusal, or the connection closed without an answer
                    outcome = repr(exc)
                with lock:
                    outcomes.append((began, time.monotonic(), outcome))

        threads = [threading.Thread(target=client) for _ in range(6)]
        for thread in threads:
            thread.start()
        until(lambda: len(outcomes) >= 12, 60, "the load did not get going")
        stop.set()
        signalled = time.monotonic()
        for pid in [served.process.pid, *workers] if how == signal.SIGINT else [served.process.pid]:
            os.kill(pid, how)
        for thread in threads:
            thread.join(30)
        code = served.process.wait(10)
        out = served.process.stdout.read()
    in_flight = [outcome for began, ended, outcome in outcomes if began < signalled < ended]
    assert in_flight, "no request was in progress at the stop"
    assert [outcome for _, _, outcome in outcomes if outcome != 200] == []
    assert code == 0 and f"stopping ({how.name})" in out
    until(lambda: all(map(process_gone, workers)), 10, "preprocessing processes outlived the server")


# ---------------------------------------------------------------------------------------------- dying workers


def test_preparers_replace_a_killed_process_and_retry_what_it_held():
    """A preprocessing process killed while preparing: each image it (and its pool) held is prepared again in
    a new pool, and the restart is counted."""
    photo = photo_of_seven()
    expected = prepare_digit(photo)
    preparers = Preparers(2)
    try:
        victim = preparers.worker_pids()[0]

        async def main() -> list:
            tasks = [asyncio.create_task(preparers.digit(photo)) for _ in range(4)]
            cpu, deadline = _cpu_ticks(victim), time.monotonic() + 30
            while _cpu_ticks(victim) == cpu:  # until it is preparing one of them
                assert time.monotonic() < deadline, "the preprocessing process never got to work"
                await asyncio.sleep(0.005)
            os.kill(victim, signal.SIGKILL)
            return await asyncio.wait_for(asyncio.gather(*tasks), 60)

        digits = asyncio.run(main())
        assert all((digit == expected).all() for digit in digits)
        assert preparers.restarts == 1 and victim not in preparers.worker_pids()
        assert (asyncio.run(preparers.digit(photo)) == expected).all()
    finally:
        preparers.close()


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


@pytest.mark.slow  # a server started, and processes killed under load
def test_a_server_whose_preprocessing_process_dies_under_load_answers_every_request_and_goes_on():
    photo = photo_of_seven()
    with mnistlab_serve("--workers", "2", "--engine", "torch") as served:
        victim = workers_of(served)[0]
        answers: list = []
        threads = [threading.Thread(target=lambda: answers.append(predict(served.url, photo))) for _ in range(6)]
        for thread in threads:
            thread.start()
        cpu = _cpu_ticks(victim)
        until(lambda: _cpu_ticks(victim) != cpu, 30, "the preprocessing process never got to work")
        os.kill(victim, signal.SIGKILL)
        for thread in threads:
            thread.join(60)
        assert len(answers) == 6
        # Each image the dead pool held was prepared again in a new one (a second death would be a one-line 500).
        assert [(status, body["predictions"][0]["label"]) for status, body, _ in answers] == [(200, 7)] * 6
        assert predict(served.url)[0] == 200
        assert victim not in workers_of(served) and len(workers_of(served)) >= 1


BAD_CONNECTION_FLAGS = [("--max-queue", "0"), ("--header-timeout", "nan"), ("--body-timeout", "inf")]


@pytest.mark.parametrize(("flag", "value"), BAD_CONNECTION_FLAGS)
def test_connection_flags_refuse_what_is_not_a_positive_finite_number(flag, value):
    assert_user_error(mnistlab("serve", "--port", "0", flag, value), f"{flag} must be a positive, finite number")
