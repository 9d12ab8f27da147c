"""Bad requests and faults for `mnistlab serve`, as data: each case is one HTTP request (or raw bytes no client
would send), the `mnistlab serve` flags it needs, the status it must get and a phrase its message must hold.

`tests/test_serve_edge.py::test_every_server_case` sends every case to a real `mnistlab serve` on loopback (one
server per distinct set of flags) over a plain socket, so what is checked is what goes over the wire.
Append cases only in your concern's section below.
"""

from __future__ import annotations

import contextlib
import json
import socket
import tempfile
from dataclasses import dataclass, field

from .drawings import drawn_png

BOUNDARY = "mnistlab-case"


def multipart(*parts: tuple[str, bytes, str | None]) -> bytes:
    """A multipart/form-data body (boundary BOUNDARY) of (field name, content, file name or None for text)."""
    body = b""
    for name, content, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        kind = "Content-Type: image/png\r\n" if filename else ""
        body += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n{kind}\r\n".encode() + content + b"\r\n"
    return body + f"--{BOUNDARY}--\r\n".encode()


MULTIPART = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


@dataclass(frozen=True)
class ServerCase:
    """One bad request: sent as `method path` with `headers` and `body` (Content-Length added unless the headers
    frame the body themselves), or as the bytes of `raw` exactly ({host} filled in). `status` and `needle`: what
    the answer must be ({"detail": "one line"} holding the needle; `plain`: a text answer from the HTTP layer
    before the app, documented in docs/serving.md). `args`: the `mnistlab serve` flags the case needs."""

    name: str
    method: str
    path: str
    status: int
    needle: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    raw: bytes | None = None
    args: tuple[str, ...] = ()
    plain: bool = False

    def request(self, host: str) -> bytes:
        """The bytes this case sends to a server at `host` ("127.0.0.1:PORT")."""
        if self.raw is not None:
            return self.raw.replace(b"{host}", host.encode())
        headers = {"Host": host, **self.headers}
        if "Transfer-Encoding" not in headers and "Content-Length" not in headers:
            headers["Content-Length"] = str(len(self.body))
        head = f"{self.method} {self.path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        return head.encode("latin-1") + b"\r\n" + self.body


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def detail(self) -> str:
        return json.loads(self.body)["detail"]


def send(host: str, port: int, data: bytes, timeout: float = 30) -> Answer:
    """Send `data` on a fresh connection (stopping if the server hangs up) and read the one answer to it."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):  # refused and closed before all was sent: the answer may be there
            sock.sendall(data)
        received = b""
        while True:
            head, blank, rest = received.partition(b"\r\n\r\n")
            if blank:
                lines = head.decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
                if len(rest) >= int(headers.get("content-length", 1 << 40)):
                    return Answer(int(lines[0].split()[1]), headers, rest[: int(headers["content-length"])])
            try:
                piece = sock.recv(65536)
            except ConnectionResetError:
                piece = b""
            if not piece:
                break
            received += piece
    assert blank, f"no answer: {received[:200]!r}"
    return Answer(int(lines[0].split()[1]), headers, rest)


PNG = drawn_png("7")

SERVER_CASES: list[ServerCase] = [
    # the HTTP edge
    ServerCase(
        "body over the limit (Content-Length)",
        "POST",
        "/api/predict",
        413,
        "5 MB limit",
        MULTIPART,
        multipart(("image", bytes(6 * 2**20), "big.png")),
    ),
    ServerCase(
        "chunked body over the limit",
        "POST",
        "/api/predict",
        413,
        "5 MB limit",
        {**MULTIPART, "Transfer-Encoding": "chunked"},
        b"".join(b"10000\r\n" + bytes(0x10000) + b"\r\n" for _ in range(88)) + b"0\r\n\r\n",
    ),
    ServerCase(
        "two image fields",
        "POST",
        "/api/predict",
        400,
        'more than one field "image"',
        MULTIPART,
        multipart(("image", PNG, "a.png"), ("image", PNG, "b.png")),
    ),
    ServerCase(
        "a JSON key given twice",
        "POST",
        "/api/predict",
        400,
        'the key "image" is given more than once',
        {"Content-Type": "application/json"},
        b'{"image": "data:image/png;base64,", "image": "data:image/png;base64,"}',
    ),
    ServerCase(
        "header over the limit",
        "GET",
        "/api/health",
        431,
        "headers over the",
        {"X-Big": "x" * (64 * 1024)},
    ),
    ServerCase(
        "request line over the limit",
        "GET",
        "/api/health?" + "q" * (16 * 1024),
        414,
        "request line over the",
    ),
    ServerCase(
        "Content-Length shorter than the body",
        "POST",
        "/api/predict",
        400,
        "malformed HTTP request",
        raw=(
            b"POST /api/predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            b"Content-Length: 2\r\n\r\n{}garbage that is no request\r\n\r\n"
        ),
    ),
    ServerCase(
        "not HTTP at all",
        "",
        "",
        400,
        "malformed HTTP request",
        raw=b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 hello TLS\r\n\r\n",
    ),
    # connections
    # operations
    # writes (a labelled drawing; --collect into a folder of the temporary directory that nothing is written to)
    *(
        ServerCase(
            f"write {name}",
            "POST",
            "/api/collect",
            401,
            needle,
            {**MULTIPART, **auth},
            multipart(("image", PNG, "d.png"), ("label", b"7", None)),
            args=("--token", "s3cret"),
        )
        for name, auth, needle in (
            ("without the token", {}, "send Authorization: Bearer <token>"),
            ("with a wrong token", {"Authorization": "Bearer not-it"}, "wrong token"),
            ("with another scheme", {"Authorization": "Basic bm90LWl0"}, "send Authorization: Bearer <token>"),
        )
    ),
    # Sent to one server in this order: the first write of the minute is the only one let through.
    *(
        ServerCase(
            name,
            "POST",
            "/api/collect",
            status,
            needle,
            MULTIPART,
            multipart(("image", PNG, "d.png"), ("label", b"7", None)),
            args=("--token", "s3cret", "--writes-per-minute", "1"),
        )
        for name, status, needle in (
            ("first write of the minute", 401, "token"),
            ("second write in the minute", 429, "at most 1 a minute; try again in"),
        )
    ),
    *(
        ServerCase(
            name,
            "POST",
            "/api/collect",
            status,
            needle,
            MULTIPART,
            multipart(("image", PNG, "d.png"), ("label", label.encode(), None)),
            args=("--collect", f"{tempfile.gettempdir()}/mnistlab-server-cases", "--collect-max-files", "0"),
        )
        for name, label, status, needle in (
            ("label '07'", "07", 400, "not '07'"),
            ("label ' 7'", " 7", 400, "not ' 7'"),
            ("label: an Arabic-Indic seven", "\u0667", 400, "not '\u0667'"),
            ("label 'seven'", "seven", 400, "not 'seven'"),
            ("collect folder full", "7", 507, "(--collect-max-files); nothing was saved"),
        )
    ),
    ServerCase(
        "a JSON label that is a number with a fraction",
        "POST",
        "/api/collect",
        400,
        "not '3.5'",
        {"Content-Type": "application/json"},
        b'{"image": "data:image/png;base64,iVBORw0KGgo=", "label": 3.5}',
        args=("--collect", f"{tempfile.gettempdir()}/mnistlab-server-cases", "--collect-max-files", "0"),
    ),
]
