"""POST /api/explain, /api/activations and /api/neighbours: why one served model answered as it did (attribution
maps), what its layers computed, and the training images it finds nearest.

Explanations always run PyTorch on the model's own module (`ServedModel.loaded`), whatever engine answers the
predictions (those run a copy: `engines.TorchNetwork`, or onnxruntime), in a thread of their own: one at a time,
never in the threads the micro-batcher uses, so a slow one delays no prediction. None of them changes the module
(no hooks, no stored gradients), so they need no lock against each other or the index builds. A model's
nearest-neighbour index is built once, on its first request, in a thread of its own (on `for_inference`'s copy of
the network); requests meanwhile wait for that same build, up to BUILD_WAIT_S, then are told to come back (503,
Retry-After), so that a page's one lane of explanations is not held for the minutes a build can take on 2 busy
cores. The index stays in memory (the bundled model's: about 140 MB).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, TypeVar

import numpy as np
import torch
from fastapi import APIRouter, Depends, HTTPException, Request
from PIL import Image

from mnistlab.errors import MnistlabError, plural
from mnistlab.infer.explain import METHODS, STEPS, NotFinite, check_method, explain, finite, rounded, target_of
from mnistlab.infer.inside import NeighbourIndex, layer_views
from mnistlab.serve.deps import ImageUpload, ServerState, State
from mnistlab.serve.engines import ServedModel
from mnistlab.serve.images import RequestError, png_base64
from mnistlab.serve.schemas import (
    REFUSALS,
    ActivationsResponse,
    ExplainRequest,
    ExplainResponse,
    ExplainUpload,
    InsideRequest,
    InsideUpload,
    NeighboursRequest,
    NeighboursResponse,
    NeighboursUpload,
    Refusal,
    image_body,
)

router = APIRouter(tags=["explain"])

MAX_NEIGHBOURS = 20
# Explanations waiting for the explaining thread, past which a request is answered 503: a page sends one at a
# time, so more than this are scripts, and each waits for all before it.
MAX_WAITING = 16
# How long a neighbours request waits for its model's index to be built before it is told to come back, in
# seconds: a build takes 181 s for the bundled model over 60,000 images on 2 cores shared with other work.
BUILD_WAIT_S = 10.0
RETRY_S = 5
# What a 503 for missing training data adds: how the operator gets it there.
FETCH = "the server downloads nothing on a request: put the files there, or fetch them: `mnistlab evaluate --model M`"
FAINT = 0.05  # an overlay is transparent where |value| is under this share of the map's largest

T = TypeVar("T")

BAD_FIELD = {"model": Refusal, "description": "A model name the server does not serve"}
REFUSED = {
    **REFUSALS,
    400: {
        "model": Refusal,
        "description": f"{REFUSALS[400]['description']}; an unknown method, a target that is no class of the model, "
        "grad-cam on an MLP, a k outside 1-20",
    },
    404: BAD_FIELD,
    503: {"model": Refusal, "description": f"More than {MAX_WAITING} explanations waiting"},
}


# ---------------------------------------------------------------------------------------------- shared state


class Explaining:
    """What the explanation routes share: the thread that runs them, one at a time, and each model's index of
    training images (its build, while it runs)."""

    def __init__(self, data_dir: str | None = None) -> None:
        self.data_dir = data_dir  # where the training images are (None: $MNISTLAB_DATA, else the user cache)
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="explain")
        self.waiting = 0  # requests given to the thread, not yet answered
        self.indexes: dict[str, asyncio.Future] = {}  # by model name: the index, or its build in progress
        self.built: dict[str, tuple[int, int]] = {}  # by model name: (training images done, in all) while building

    def close(self) -> None:
        """The server stops: explanations not begun are dropped, the one under way finishes on its own."""
        self.thread.shutdown(wait=False, cancel_futures=True)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in the explaining thread, a MnistlabError it raises answered 400 (grad-cam on an MLP);
        503 while MAX_WAITING requests are already there."""
        if self.waiting >= MAX_WAITING:
            raise RequestError(503, f"the server is busy: {plural(self.waiting, 'explanation')} waiting; retry later")
        self.waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.thread, fn, *args)
        except RequestError:
            raise
        except NotFinite as exc:  # a bug to report, not the request's fault
            raise RequestError(500, str(exc)) from None
        except MnistlabError as exc:  # what the request asked for cannot be done, in the core's words
            raise RequestError(400, str(exc)) from None
        finally:
            self.waiting -= 1

    async def index(self, served: ServedModel) -> NeighbourIndex:
        """The model's `NeighbourIndex`, built on first use (the whole training split through the network) in a
        thread of its own; a request arriving during the build waits for that one, up to BUILD_WAIT_S, then gets
        503 with Retry-After and the build's progress. A build that fails (the training data is not there: the
        server downloads nothing on a request) is answered 503 with its reason, and tried again next time."""
        future = self.indexes.get(served.name)
        if future is None:
            loop = asyncio.get_running_loop()
            future = self.indexes[served.name] = loop.create_future()
            future.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: no warning if no one waits
            # A daemon thread, not an executor's: a server stopped during a build does not wait for it to finish.
            thread = threading.Thread(
                target=self._build, args=(loop, future, served), name="neighbour-index", daemon=True
            )
            thread.start()
        try:
            # shielded: a request that stops waiting (timed out, or its client gone) leaves the build running
            return await asyncio.wait_for(asyncio.shield(future), BUILD_WAIT_S)
        except TimeoutError:
            done, total = self.built.get(served.name, (0, 0))
            progress = f" ({done:,} of {total:,} training images)" if total else ""
            raise HTTPException(
                503,
                f"the nearest-neighbour index of {served.name} is being built{progress}: retry in a few seconds",
                {"Retry-After": str(RETRY_S)},
            ) from None
        except MnistlabError as exc:
            raise RequestError(503, f"{exc} ({FETCH})") from None

    def _build(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future, served: ServedModel) -> None:
        def progress(done: int, total: int) -> None:
            self.built[served.name] = (done, total)  # one tuple replaced: read whole by the event loop

        def settle(result: Any = None, error: BaseException | None = None) -> None:
            self.built.pop(served.name, None)
            if error is None:
                future.set_result(result)
                return
            if self.indexes.get(served.name) is future:
                del self.indexes[served.name]  # the next request tries again (the data may be there by then)
            future.set_exception(error)

        try:
            index = NeighbourIndex.build(served.loaded, self.data_dir, download=False, progress=progress)
        except Exception as exc:  # handed to the waiting requests: a MnistlabError as 503, anything else as 500
            outcome: dict[str, Any] = {"error": exc}
        else:
            outcome = {"result": index}
        with contextlib.suppress(RuntimeError):  # the server stopped meanwhile: no one is waiting
            loop.call_soon_threadsafe(lambda: settle(**outcome))


def explaining(request: Request) -> Explaining:
    """The app's `Explaining`, made on the first explanation request (on the event loop: no race)."""
    found = getattr(request.app.state, "explaining", None)
    if found is None:
        found = request.app.state.explaining = Explaining(request.app.server_state.settings.data_dir)
    return found


Work = Annotated[Explaining, Depends(explaining)]


# ---------------------------------------------------------------------------------------------- the fields


def served_model(state: ServerState, name: str | None) -> ServedModel:
    """The served model a request names (none named: the first served), or 404 naming those served."""
    if name is None:
        return state.models[0]
    for served in state.models:
        if served.name == name:
            return served
    names = ", ".join(repr(m.name) for m in state.models)
    raise RequestError(404, f"no model named {name[:60]!r} is served here (served: {names})")


def count_of(raw: str | None) -> int:
    """The `k` of /api/neighbours: a whole number from 1 to MAX_NEIGHBOURS (none given: 5)."""
    if raw is None:
        return 5
    if not (raw.isascii() and raw.isdigit() and 1 <= int(raw) <= MAX_NEIGHBOURS):
        raise RequestError(400, f"k must be a whole number from 1 to {MAX_NEIGHBOURS}, not {raw[:40]!r}")
    return int(raw)


def refused_as_400(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)`, a MnistlabError it raises (a field naming what cannot be) answered 400 in its words."""
    try:
        return fn(*args)
    except MnistlabError as exc:
        raise RequestError(400, str(exc)) from None


# ---------------------------------------------------------------------------------------------- the routes


@router.post(
    "/api/explain",
    summary="Why one model answered as it did: attribution maps over the 28x28 view",
    openapi_extra=image_body(ExplainRequest, ExplainUpload),
    responses=REFUSED,
)
async def explain_image(upload: ImageUpload, state: State, work: Work) -> ExplainResponse:
    """For the model's answer, the runner-up and any `target`: how much each pixel of the 28x28 view counted for
    (> 0) or against (< 0) that class, as numbers and as a red/blue overlay. Runs PyTorch on the model's own
    network, whatever engine serves its predictions; an ensemble's maps are its members' mean (`members`)."""
    served = served_model(state, upload.fields.get("model"))
    method = refused_as_400(check_method, served.loaded, upload.fields.get("method") or METHODS[0])
    target = refused_as_400(target_of, upload.fields.get("target"), served.loaded.classes)
    digit = await state.preparers.digit(upload.data)
    return ExplainResponse.model_validate(await work.run(explained, served, digit, method, target))


@router.post(
    "/api/activations",
    summary="What each layer of one model computed for an image",
    openapi_extra=image_body(InsideRequest, InsideUpload),
    responses=REFUSED,
)
async def activations(upload: ImageUpload, state: State, work: Work) -> ActivationsResponse:
    """A convolution's feature maps as greyscale tiles; a hidden layer's units as numbers, the most active
    first, and for an MLP's first layer the most active units' weights as 28x28 images."""
    served = served_model(state, upload.fields.get("model"))
    digit = await state.preparers.digit(upload.data)
    return ActivationsResponse.model_validate(await work.run(layers_of, served, digit))


@router.post(
    "/api/neighbours",
    summary="The training images nearest an image, as one model sees them",
    openapi_extra=image_body(NeighboursRequest, NeighboursUpload),
    responses={
        **REFUSED,
        503: {
            "model": Refusal,
            "description": f"The model's index is still being built after {BUILD_WAIT_S:.0f} s (Retry-After says when "
            f"to ask again), its training data is not on the server, or more than {MAX_WAITING} explanations wait",
        },
    },
)
async def neighbours(upload: ImageUpload, state: State, work: Work) -> NeighboursResponse:
    """The `k` training images closest to the image in the model's penultimate features, nearest first. The
    first request for a model starts building its index over the training split (a minute or more on 2 cores: a
    request waits 10 s for it, then is answered 503 with Retry-After); once built, an answer takes milliseconds."""
    served = served_model(state, upload.fields.get("model"))
    k = count_of(upload.fields.get("k"))
    digit = await state.preparers.digit(upload.data)
    index = await work.index(served)
    return NeighboursResponse.model_validate(await work.run(nearest_of, served, index, digit, k))


# ---------------------------------------------------------------------------------------------- the answers
# Each runs in the explaining thread, PNGs and all.


def explained(served: ServedModel, digit: np.ndarray, method: str, target: int | None) -> dict:
    """The body of /api/explain: maps for the answer, `target` and the runner-up, as `mnistlab explain` makes."""
    loaded = served.loaded
    found = explain(loaded, torch.from_numpy(digit), method, target, STEPS)
    maps = []
    for a in found.attributions:
        values = finite(a.map.numpy(), "attribution map")
        scale = float(np.abs(values).max())
        role = found.role(a.target)
        error = a.completeness_error
        maps.append(
            {
                "target": a.target,
                "class": loaded.classes[a.target],
                "role": role,
                "map": rounded(values, 4),
                "scale": float(f"{scale:.4g}"),
                "overlay": signed_png(values, scale),
                "completeness_error": None if error is None else float(f"{finite(error, 'completeness error'):.4g}"),
            }
        )
    return {
        "model": served.name,
        "method": found.method,
        "members": found.members,
        "label": found.label,
        "probabilities": [round(p, 6) for p in finite(found.probabilities.numpy(), "probabilities").tolist()],
        "preprocessed": png_base64(digit),
        "attributions": maps,
    }


def layers_of(served: ServedModel, digit: np.ndarray) -> dict:
    """The body of /api/activations."""
    views = layer_views(served.loaded, torch.from_numpy(digit))
    layers = []
    for view in views:
        values = finite(view.values.detach().float().cpu().numpy(), f"activations of {view.name}")
        low, high = min(float(values.min()), 0.0), float(values.max())
        maps = view.kind == "maps"
        weights = view.unit_weights
        layers.append(
            {
                "name": view.name,
                "kind": view.kind,
                "shape": list(values.shape),
                "maximum": float(f"{high:.6g}"),
                "tiles": [png_base64((m - low) / (high - low or 1)) for m in values] if maps else None,
                "values": None if maps else rounded(values, 6, f"activations of {view.name}"),
                "top_units": [int(u) for u in view.top_units],
                "channels": [int(c) for c in view.channels],
                "member": view.member,
                "unit_weights": None if weights is None else weight_pngs(weights),
            }
        )
    return {"model": served.name, "preprocessed": png_base64(digit), "layers": layers}


def weight_pngs(weights: torch.Tensor) -> list[str]:
    """Units' input weights (k, 28, 28) as signed PNGs, each on its own scale."""
    pngs = []
    for w in finite(weights.detach().float().cpu().numpy(), "unit weights"):
        pngs.append(signed_png(w, float(np.abs(w).max()), faint=0.0))
    return pngs


def nearest_of(served: ServedModel, index: NeighbourIndex, digit: np.ndarray, k: int) -> dict:
    """The body of /api/neighbours."""
    found = index.nearest(torch.from_numpy(digit), k)
    classes = served.loaded.classes
    return {
        "model": served.name,
        "neighbours": [
            {
                "index": int(n.index),
                "label": int(n.label),
                "class": classes[int(n.label)],
                "distance": float(f"{finite(float(n.distance), 'distance'):.6g}"),
                "image": png_base64(n.image.numpy() / 255),
            }
            for n in found
        ],
    }


# ---------------------------------------------------------------------------------------------- numbers, pictures


def signed_png(values: np.ndarray, scale: float, faint: float = FAINT) -> str:
    """A signed map as an RGBA PNG (base64): red where positive, blue where negative, opacity by |value| / scale,
    transparent where that is under `faint`."""
    strength = np.abs(values) / (scale or 1.0)
    alpha = np.where(strength < faint, 0, np.round(np.clip(strength, 0, 1) * 255))
    rgba = np.zeros((*values.shape, 4), np.uint8)
    rgba[..., 0] = np.where(values > 0, 230, 30)
    rgba[..., 1] = np.where(values > 0, 30, 90)
    rgba[..., 2] = np.where(values > 0, 30, 230)
    rgba[..., 3] = alpha
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
