"""The lab's routes: shipped configs and their keys, runs (start, list, watch, stop, resume) and the
learning-rate finder. The work is `serve.lab.Lab`'s; its calls that touch processes or files run in a thread.

    GET  /api/lab                    whether the lab is on (and why not), the running run and the queue
    GET  /api/configs                the shipped configs with their values, and every key a run can set
    POST /api/runs                   {"config": NAME, "set": {KEY: VALUE}} -> 201 {"id", "status"}
    GET  /api/runs, /api/runs/{id}   the runs, newest first; one with its values, epochs and progress
    GET  /api/runs/{id}/events       Server-Sent Events: progress, epoch, then one end
    POST /api/runs/{id}/stop, /api/runs/{id}/resume
    POST /api/lr-find                the same body as /api/runs -> the suggested learning rate

When the lab is off, all but GET /api/lab answer 404 {"detail": "the lab is off: <why>"}. Writes (the POSTs) go
through `deps.Writer`: the rate limit, then the token when the server has one.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from mnistlab.config import key_schema, load_config, shipped_configs
from mnistlab.files import to_json
from mnistlab.serve.deps import State, TheLab, Writer, lab_of
from mnistlab.serve.images import RequestError
from mnistlab.serve.lab import KEEP_ALIVE_S, Live, checked_config
from mnistlab.serve.schemas import (
    REF,
    ConfigsResponse,
    LabResponse,
    LrFindResponse,
    Refusal,
    RunDetail,
    RunRequest,
    RunsResponse,
    RunStarted,
)

router = APIRouter(tags=["lab"])

LabOn = Depends(lab_of)  # listed before Writer: a lab that is off says so before asking for a token
OFF = {404: {"model": Refusal, "description": "The lab is off (the detail says why), or no such run"}}
WRITE = {
    **OFF,
    401: {"model": Refusal, "description": "The server has a token (--token) and the request lacks it"},
    429: {"model": Refusal, "description": "Too many writes from this client (Retry-After says when to retry)"},
}
BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": REF.format(model=RunRequest.__name__)}}},
    }
}
REFUSED_CONFIG = {
    400: {"model": Refusal, "description": "Not a JSON object with a config name and a `set` object"},
    422: {"model": Refusal, "description": "An unknown config or key, or a bad value: the CLI's message, naming it"},
}


async def run_request(request: Request) -> RunRequest:
    """The body of POST /api/runs and /api/lr-find, read by hand for one-line refusals (400)."""
    shape = 'a JSON object {"config": NAME, "set": {KEY: VALUE, ...}}'
    try:
        data = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise RequestError(400, f"the body must be {shape}") from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), str):
        raise RequestError(400, f"the body must be {shape}, with the config's name as a string")
    unknown = sorted(set(data) - {"config", "set"})
    if unknown:
        raise RequestError(400, f"unknown field {unknown[0][:40]!r}: the body is {shape}")
    values = data.get("set") or {}
    if not isinstance(values, dict):
        raise RequestError(400, f"set must be an object of values by dotted key: the body is {shape}")
    return RunRequest(config=data["config"], set=values)


def served_names(state: State) -> set[str]:
    return {m.name for m in state.models}


@router.get("/api/lab", summary="Whether the lab is on, and what it is doing")
async def lab_status(state: State) -> LabResponse:
    """Always answers, the lab on or off."""
    lab = state.lab
    return LabResponse(
        enabled=lab is not None,
        reason=state.lab_off if lab is None else None,
        token_required=state.settings.token is not None,
        runs_dir=str(lab.runs if lab is not None else state.settings.runs_dir),
        running=lab.running if lab is not None else None,
        queue=list(lab.queue) if lab is not None else [],
    )


@router.get("/api/configs", summary="The shipped configs and the keys a run can set", responses=OFF)
async def configs(lab: TheLab) -> ConfigsResponse:
    """Each shipped config's name, description, one-line summary and values; each key's type, choices and help."""

    def listed() -> list[dict[str, Any]]:
        found = []
        for name in sorted(shipped_configs()):
            config = load_config(name)
            found.append(
                {"name": name, "description": config.description, "summary": config.summary(), "values": config.flat()}
            )
        return found

    return ConfigsResponse.model_validate({"configs": await asyncio.to_thread(listed), "keys": key_schema()})


@router.post(
    "/api/runs",
    summary="Start a run (or queue it behind the one training)",
    status_code=201,
    dependencies=[LabOn, Writer],
    openapi_extra=BODY,
    responses={**WRITE, **REFUSED_CONFIG},
)
async def start_run(request: Request, lab: TheLab) -> RunStarted:
    """A shipped config with the values that change; refused (422, the CLI's message naming the key) before
    anything is written. Runs train one at a time, in a process of their own, into RUNS/<id>/."""
    body = await run_request(request)
    config = checked_config(body.config, body.set)
    return RunStarted.model_validate(await asyncio.to_thread(lab.submit, config))


@router.get("/api/runs", summary="Every run, newest first", responses=OFF)
async def runs(lab: TheLab, state: State) -> RunsResponse:
    """The lab's runs and every run directory under the runs folder (trained in a terminal too)."""
    served = served_names(state)

    def listed() -> list[dict[str, Any]]:
        found = []
        for run_id in lab.ids():
            try:
                found.append(lab.info(run_id, served))
            except RequestError:  # removed while listed
                continue
        # Newest first; within a second, seed-b-fixed-10 after -9 (longer ids of one config are later ones).
        return sorted(found, key=lambda info: (info["created"], len(info["id"]), info["id"]), reverse=True)

    return RunsResponse.model_validate({"runs": await asyncio.to_thread(listed)})


@router.get("/api/runs/{run_id}", summary="One run: its status, values and metrics so far", responses=OFF)
async def run_detail(run_id: str, lab: TheLab, state: State) -> RunDetail:
    """With `values` (the resolved config), `epochs` (metrics.json's records so far) and `progress` (the progress
    events of this server's life)."""
    return RunDetail.model_validate(await asyncio.to_thread(lab.info, run_id, served_names(state), True))


@router.get(
    "/api/runs/{run_id}/events",
    summary="A run's events as they happen (Server-Sent Events)",
    response_class=StreamingResponse,
    responses={
        **OFF,
        200: {
            "description": "`progress` events (data: epoch, images, train_size, train_loss, train_accuracy), `epoch` "
            "events (data: the metrics.json epoch record), then one `end` (data: status, reason, best_epoch, "
            "test_accuracy) and the stream closes. A late client gets everything so far first.",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
    },
)
async def run_events(run_id: str, lab: TheLab) -> StreamingResponse:
    """Frames of `event: NAME` and `data: JSON` lines, a blank line after each; a `: keep-alive` comment when
    nothing happens for a while."""
    live = await asyncio.to_thread(lab.history, run_id)  # an unknown run: 404 before the stream begins
    return StreamingResponse(
        frames(live),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},  # the latter: nginx must not buffer it
    )


def frame(name: str, data: Any) -> str:
    return f"event: {name}\ndata: {to_json(data)}\n\n"


async def frames(live: Live) -> AsyncIterator[str]:
    """What `live` holds, then what arrives, until its end."""
    sent = 0
    while True:
        wake = asyncio.Event()
        with live.watching(wake):  # watching before looking: nothing arrives unseen in between
            new, end = live.since(sent)
            if not new and end is None:
                try:
                    await asyncio.wait_for(wake.wait(), KEEP_ALIVE_S)
                except TimeoutError:
                    yield ": keep-alive\n\n"
                continue
        for name, data in new:
            yield frame(name, data)
        sent += len(new)
        if end is not None:
            yield frame("end", end)
            return


@router.post(
    "/api/runs/{run_id}/stop",
    summary="Stop a queued or running run (resumable)",
    dependencies=[LabOn, Writer],
    responses={**WRITE, 409: {"model": Refusal, "description": "The run is neither queued nor running"}},
)
async def stop_run(run_id: str, lab: TheLab, state: State) -> RunDetail:
    """A running run stops as after Ctrl-C: its last finished epoch is kept, and it can be resumed. Answers once
    its process has ended."""
    await asyncio.to_thread(lab.stop, run_id)
    return RunDetail.model_validate(await asyncio.to_thread(lab.info, run_id, served_names(state), True))


@router.post(
    "/api/runs/{run_id}/resume",
    summary="Continue a stopped or failed run",
    dependencies=[LabOn, Writer],
    responses={
        **WRITE,
        409: {"model": Refusal, "description": "The run is queued or running, finished, or has nothing to resume"},
    },
)
async def resume_run(run_id: str, lab: TheLab) -> RunStarted:
    """From its last checkpoint (its saved epochs kept); a run stopped before its first epoch starts again."""
    return RunStarted.model_validate(await asyncio.to_thread(lab.resume, run_id))


@router.post(
    "/api/lr-find",
    summary="Find a learning rate for a config (the range test)",
    dependencies=[LabOn, Writer],
    openapi_extra=BODY,
    responses={
        **WRITE,
        **REFUSED_CONFIG,
        409: {"model": Refusal, "description": "Another learning-rate search is running"},
    },
)
async def lr_find(request: Request, lab: TheLab) -> LrFindResponse:
    """`mnistlab lr-find` on the config with its values, in a process of its own: seconds on a small network."""
    body = await run_request(request)
    config = checked_config(body.config, body.set)
    return LrFindResponse.model_validate(await asyncio.to_thread(lab.lr_find, config))
