"""What an operator sets for `mnistlab serve` beyond the models: one frozen dataclass, by concern, that the CLI's
flags fill (`cli/serve.py`) and `create_app` and `run` read. Defaults are what a laptop or a classroom server
needs; docs/serving.md says why each is what it is."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from mnistlab.errors import MnistlabError

LOG_FORMATS = ("human", "json")


@dataclass(frozen=True)
class ServeSettings:
    # ------------------------------------------------------------------ the HTTP edge: bodies, headers, ports
    # nginx's limits (serve/edge.py): a request line over 8 KB gets 414, a head (request line and headers) over
    # 32 KB gets 431. A browser's request is under 2 KB, but cookies that other local apps set for 127.0.0.1
    # travel along, hence room to spare.
    max_request_line: int = 8 * 1024
    max_header_bytes: int = 32 * 1024
    # After answering a client still sending its body (a 413), what it still sends is read and dropped, up to
    # these bounds, before closing, so that it reads the answer rather than a reset (nginx's lingering close,
    # which allows 30 s): 64 MB is a 5 MB body many times over; 10 s sends 6 MB over a 5 Mbit/s link.
    linger_bytes: int = 64 * 2**20
    linger_seconds: float = 10.0

    # ------------------------------------------------------------------ connections: timeouts, caps, shutdown
    # Seconds (serve/server.py). A request's head must arrive within header_timeout of the connection's opening
    # (or of its first byte, on a kept-alive connection), its body within body_timeout of the head, else the
    # connection is closed: clients that trickle bytes (slowloris) or say nothing hold nothing for long. A
    # browser sends its head in one packet; 60 s sends a 5 MB photo over a 1 Mbit/s link.
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    # An idle kept-alive connection closes after this (uvicorn's default): a page's next request comes sooner.
    keep_alive_timeout: float = 5.0
    # Open connections (one file each; a connection over the cap evicts the longest idle one, and only when all
    # are busy is it answered 503), and predictions in the server at once (503 past it): measured on 2 cores in
    # docs/serving.md, a full queue still drains in about a second.
    max_connections: int = 512
    max_queue: int = 128
    # On SIGTERM or Ctrl-C, how long requests in progress may take to finish before they are cut.
    shutdown_timeout: float = 5.0

    # ------------------------------------------------------------------ operations: metrics and logs
    # "json": one JSON line per request on stderr (serve/logs.py); "human": no access log, as uvicorn's would
    # cost more than a prediction (GET /metrics counts requests either way).
    log_format: str = "human"

    # ------------------------------------------------------------------ writes: tokens, quotas, CORS
    # Writes (/api/collect) need `Authorization: Bearer <token>`; None: open, allowed on loopback only (the CLI
    # refuses --collect beyond loopback without one). Kept out of repr, so no log or traceback shows it.
    token: str | None = field(default=None, repr=False)
    # Writes a client address may make a minute, in bursts of as many (0: no limit): a person labels a drawing
    # every few seconds; a script looping on /api/collect is slowed to this.
    writes_per_minute: int = 60
    # What --collect may hold, counting the files there at the start: 10,000 drawings are a class of 30 drawing
    # 300 each (a canvas drawing is 2-5 KB), and 200 MB leaves room for photos saved as they came, while no
    # stranger fills the disk. Past either, saves are refused with 507.
    collect_max_files: int = 10_000
    collect_max_mb: float = 200
    # Origins whose pages may call the API from a browser (CORS); none: no CORS headers, same-origin only.
    cors: tuple[str, ...] = ()

    # ------------------------------------------------------------------ the lab: training from the page
    # Off unless asked for: `mnistlab serve` turns it on when listening on loopback or with --token
    # (cli/serve.py), and sets `lab_off` to why when it does not. Runs are written under `runs_dir` (records of
    # the lab's own in runs_dir/.lab); trainings, lr-find and the neighbour index read `data_dir` (None:
    # $MNISTLAB_DATA, else the user cache).
    lab: bool = False
    lab_off: str = "start the server with mnistlab serve (on loopback, or with --token) or ServeSettings(lab=True)"
    runs_dir: str = "runs"
    data_dir: str | None = None

    def __post_init__(self) -> None:
        """Refuse what no server could run with (the CLI's flags are checked before; a notebook's are here)."""
        if self.log_format not in LOG_FORMATS:
            raise MnistlabError(f"log_format must be one of {', '.join(LOG_FORMATS)}, not {self.log_format!r}")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not value >= 0:
                raise MnistlabError(f"{f.name} must be a number of at least 0, not {value!r}")
