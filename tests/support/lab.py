"""Talking to a server's lab over HTTP: a run's Server-Sent Events read as they come, and waiting for a process
to go."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import httpx

from .servers import process_gone

Event = tuple[str, dict]


def stream(client: httpx.Client, run_id: str) -> Iterator[Event]:
    """The run's events (name, data) as the server sends them; the stream closes when the caller stops."""
    with client.stream("GET", f"/api/runs/{run_id}/events") as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        name = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                assert name is not None, line
                yield name, json.loads(line.removeprefix("data: "))
                name = None


def events_until(client: httpx.Client, run_id: str, last: Callable[[Event], bool]) -> list[Event]:
    """The run's events up to the first for which `last` is true (the stream's `end` at the latest)."""
    seen = []
    for event in stream(client, run_id):
        seen.append(event)
        if last(event) or event[0] == "end":
            break
    return seen


def all_events(client: httpx.Client, run_id: str) -> list[Event]:
    """Every event of the run, to its `end`."""
    return events_until(client, run_id, lambda event: False)


def first_epoch_after(done: int) -> Callable[[Event], bool]:
    """`last` for `events_until`: an epoch event past epoch `done`."""
    return lambda event: event[0] == "epoch" and event[1]["epoch"] > done


def wait_gone(pid: int, limit_s: float = 60) -> None:
    """Until process `pid` has exited (a failure after `limit_s`: something keeps it alive)."""
    deadline = time.monotonic() + limit_s
    while not process_gone(pid):
        assert time.monotonic() < deadline, f"process {pid} is still running"
        time.sleep(0.05)
