"""The HTTP edge of `mnistlab serve`, over real sockets on loopback with real clients: a body over the limit gets
its 413 JSON in urllib, requests, httpx, curl (with and without `Expect: 100-continue`) and Chromium, with
Content-Length or chunked, just under and just over the limit; heads over their caps get 414/431 without being
read whole; bytes that are not HTTP get a JSON 400; every bad request of tests/support/server_cases.py gets its
status and one-line message; ports outside 0-65535 are refused naming --port."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the web extra is not installed (pip install 'mnistlab[web]')")
import httpx
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from mnistlab.errors import MnistlabError
from mnistlab.serve import MAX_BODY, listen
from mnistlab.serve.settings import ServeSettings

from .support.cli import assert_user_error, mnistlab
from .support.drawings import drawn_png
from .support.server_cases import MULTIPART, SERVER_CASES, ServerCase, multipart, send
from .support.servers import mnistlab_serve

EDGE = ServeSettings()


@pytest.fixture(scope="module")
def servers() -> Iterator[Callable[[tuple[str, ...]], tuple[str, int]]]:
    """Real `mnistlab serve` processes, one per set of flags, started when first asked for: (host, port)."""
    with contextlib.ExitStack() as stack:
        running: dict[tuple[str, ...], tuple[str, int]] = {}

        def server(args: tuple[str, ...] = ()) -> tuple[str, int]:
            if args not in running:
                served = stack.enter_context(mnistlab_serve(*args, "--workers", "0"))
                host, port = served.url.split("/")[2].split(":")
                running[args] = host, int(port)
            return running[args]

        yield server


@pytest.fixture(scope="module")
def url(servers) -> str:
    host, port = servers()
    return f"http://{host}:{port}/api/predict"


# ---------------------------------------------------------------------------------------------- bad requests


@pytest.mark.slow  # a real server (shared by the module), a few MB sent
@pytest.mark.parametrize("case", SERVER_CASES, ids=lambda case: case.name)
def test_every_server_case(servers, case: ServerCase):
    """Each case over a raw socket, its answer as it came; the server still answers after it."""
    host, port = servers(case.args)
    answer = send(host, port, case.request(f"{host}:{port}"))
    if case.plain:
        message = answer.body.decode("utf-8", "replace")
    else:
        assert answer.headers["content-type"] == "application/json", answer
        message = answer.detail()
    assert answer.status == case.status and case.needle in message and "\n" not in message.strip(), answer
    assert send(host, port, f"GET /api/health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()).status == 200


# ---------------------------------------------------------------------------------------------- the 413 in every client


def sized_body(size: int) -> bytes:
    """A multipart body of exactly `size` bytes: a drawing of a 7, and a file field padding it out."""
    base = multipart(("image", drawn_png("7"), "seven.png"), ("pad", b"", "pad.bin"))
    return multipart(("image", drawn_png("7"), "seven.png"), ("pad", bytes(size - len(base)), "pad.bin"))


def pieces(body: bytes, size: int = 65536) -> Iterator[bytes]:
    """The body in pieces: a client sends a body it gets as an iterator chunked (Transfer-Encoding)."""
    for start in range(0, len(body), size):
        yield body[start : start + size]


def by_urllib(url: str, body: bytes, chunked: bool, _: Path) -> tuple[int, dict]:
    request = urllib.request.Request(url, pieces(body) if chunked else body, MULTIPART, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as refusal:
        return refusal.code, json.loads(refusal.read())


def by_requests(url: str, body: bytes, chunked: bool, _: Path) -> tuple[int, dict]:
    response = requests.post(url, data=pieces(body) if chunked else body, headers=MULTIPART, timeout=60)
    return response.status_code, response.json()


def by_httpx(url: str, body: bytes, chunked: bool, _: Path) -> tuple[int, dict]:
    response = httpx.post(url, content=pieces(body) if chunked else body, headers=MULTIPART, timeout=60)
    return response.status_code, response.json()


def by_curl(expect: str | None) -> Callable[[str, bytes, bool, Path], tuple[int, dict]]:
    """curl sending the body from a file; `expect`: its Expect header ("": none; None: curl's own choice,
    which is `Expect: 100-continue` for bodies over 1 MB)."""

    def send_with_curl(url: str, body: bytes, chunked: bool, tmp: Path) -> tuple[int, dict]:
        (tmp / "body").write_bytes(body)
        command = ["curl", "-sS", "-o", str(tmp / "answer"), "-w", "%{http_code}", "--data-binary", f"@{tmp / 'body'}"]
        headers = [MULTIPART["Content-Type"]] + ["Transfer-Encoding: chunked"] * chunked
        headers += [f"Expect: {expect}" if expect else "Expect:"] * (expect is not None)
        for header in (f"Content-Type: {headers[0]}", *headers[1:]):
            command += ["-H", header]
        result = subprocess.run([*command, url], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr  # "Connection reset by peer" and the like fail here
        return int(result.stdout), json.loads((tmp / "answer").read_bytes())

    return send_with_curl


CLIENTS = {
    "urllib": by_urllib,
    "requests": by_requests,
    "httpx": by_httpx,
    "curl": by_curl(None),
    "curl expect 100-continue": by_curl("100-continue"),
    "curl without expect": by_curl(""),
}


@pytest.mark.slow  # 5 MB bodies, parsed
@pytest.mark.parametrize("size", [MAX_BODY, MAX_BODY + 1], ids=["just under", "just over"])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("client", CLIENTS)
def test_every_client_gets_the_answer_to_a_body_at_the_limit(url, client, chunked, size, tmp_path):
    """Just under the limit: predicted; just over: 413 JSON, read by the client rather than a reset (the server
    used to close while urllib and requests were still sending: "Connection reset by peer", "Broken pipe")."""
    body = sized_body(size)
    assert len(body) == size
    status, answer = CLIENTS[client](url, body, chunked, tmp_path)
    if size <= MAX_BODY:
        assert status == 200 and answer["predictions"][0]["label"] == 7, answer
    else:
        assert status == 413 and "5 MB limit" in answer["detail"], answer


@pytest.mark.slow  # a browser
def test_chromium_fetch_of_a_6_mb_blob_gets_the_413(browser, url):
    page = browser.new_page()
    try:
        page.goto(url.removesuffix("api/predict"))
        status, answer = page.evaluate(
            """async () => {
                const form = new FormData();
                form.append("image", new Blob([new Uint8Array(6 * 1024 * 1024)], {type: "image/png"}), "big.png");
                const response = await fetch("/api/predict", {method: "POST", body: form});
                return [response.status, await response.json()];
            }"""
        )
    finally:
        page.close()
    assert status == 413 and "5 MB limit" in answer["detail"]


@pytest.mark.slow  # a real server (shared by the module)
def test_a_client_sending_far_past_the_limit_is_cut_off_after_the_linger(servers):
    """The linger is bounded: a client that keeps sending after its 413 is disconnected once it has sent
    linger_bytes more, rather than held forever (nginx bounds it the same way)."""
    host, port = servers()
    head = f"POST /api/predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: {MULTIPART['Content-Type']}\r\n"
    head += f"Content-Length: {2**40}\r\n\r\n"
    with socket.create_connection((host, port), timeout=60) as sock:
        sock.sendall(head.encode())
        sent = 0
        with pytest.raises(OSError):  # reset or broken pipe: the server hung up
            while sent <= 4 * EDGE.linger_bytes:
                sent += sock.send(bytes(2**20))
    assert EDGE.linger_bytes <= sent <= 4 * EDGE.linger_bytes


# ---------------------------------------------------------------------------------------------- heads


@pytest.mark.slow  # a real server (shared by the module)
@pytest.mark.parametrize(
    ("start", "status", "needle"),
    [
        ("GET /" + "a" * EDGE.max_request_line, 414, "request line over the 8 KB limit"),
        ("GET / HTTP/1.1\r\nX-Big: " + "b" * EDGE.max_header_bytes, 431, "request headers over the 32 KB limit"),
    ],
    ids=["request line", "header"],
)
def test_a_head_past_its_cap_is_refused_before_it_ends(servers, start, status, needle):
    """A request line or header that has not ended is answered as soon as it passes its cap: the server does
    not wait for the rest (a 100 MB header used to be read whole, and answered 200)."""
    host, port = servers()
    with socket.create_connection((host, port), timeout=60) as sock:
        sock.sendall(start.encode() + b"c" * 64)  # and nothing more: the line never ends
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
            piece = sock.recv(65536)
            assert piece, answer
            answer += piece
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()) and b"content-type: application/json" in head
    assert needle in json.loads(body)["detail"]


@pytest.mark.slow  # a real server (shared by the module)
@settings(max_examples=25, deadline=None)
@given(
    url=st.one_of(
        st.integers(0, 2 * EDGE.max_request_line), st.integers(-8, 8).map(lambda d: EDGE.max_request_line + d)
    ),
    header=st.one_of(
        st.integers(0, 2 * EDGE.max_header_bytes), st.integers(-8, 8).map(lambda d: EDGE.max_header_bytes + d)
    ),
)
def test_heads_are_served_up_to_their_caps_exactly_and_refused_past_them(servers, url, header):
    """The URL may be max_request_line bytes, the head (request line, headers, blank line) max_header_bytes:
    one byte more is 414 (the URL) or 431 (the head)."""
    host, port = servers()
    target = "/api/health?" + "q" * max(0, url - len("/api/health?"))
    head = f"GET {target} HTTP/1.1\r\nHost: {host}\r\nX-Pad: \r\n\r\n"
    head = head.replace("X-Pad: ", "X-Pad: " + "p" * max(0, header - len(head)))
    answer = send(host, port, head.encode())
    if len(target) > EDGE.max_request_line:
        assert answer.status == 414, answer
    elif len(head) > EDGE.max_header_bytes:
        assert answer.status == 431, answer
    else:
        assert answer.status == 200, answer


@pytest.mark.slow  # a real server (shared by the module)
def test_heads_within_the_caps_are_served(servers):
    host, port = servers()
    line = "/api/health?" + "q" * (EDGE.max_request_line - len("/api/health?"))
    cookie = "c" * (EDGE.max_header_bytes - len(line) - 200)  # a big cookie jar, within the cap
    request = f"GET {line} HTTP/1.1\r\nHost: {host}\r\nCookie: {cookie}\r\n\r\n".encode()
    answer = send(host, port, request)
    assert answer.status == 200 and json.loads(answer.body)["status"] == "ok"
    # Two requests in one send (pipelined), together over the cap but each within it: the first is answered.
    first = f"GET /api/health HTTP/1.1\r\nHost: x\r\nX-Pad: {'p' * 1000}\r\n\r\n".encode()
    assert len(first + request) > EDGE.max_header_bytes
    assert send(host, port, first + request).status == 200


# ---------------------------------------------------------------------------------------------- the command


@pytest.mark.parametrize("port", [99999, 65536, -1])
def test_listen_refuses_a_port_outside_0_to_65535_naming_port(port):
    # 99999 used to be served as 34463 (the number wrapped), and -1 blamed --host.
    with pytest.raises(MnistlabError, match=f"^--port {port}: a port is a number from 0 to 65535"):
        listen("127.0.0.1", port)


@pytest.mark.slow  # a fresh `mnistlab serve` process
def test_serve_refuses_a_port_outside_0_to_65535_in_one_line():
    assert_user_error(mnistlab("serve", "--port", "99999", timeout=60), "--port 99999", "0 to 65535")
