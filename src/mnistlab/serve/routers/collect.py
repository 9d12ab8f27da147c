"""POST /api/collect: a labelled drawing saved as DIR/<label>/<server-chosen name>.png (with --collect DIR).

A write: admitted by `deps.Writer` (the client's rate, then the token), its label checked before the image is
prepared, and saved only while the folder has room (`auth.CollectQuota`), in one rename, never half-written."""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence

from fastapi import APIRouter

from mnistlab.files import make_dirs, replacing
from mnistlab.serve.deps import CollectFolder, ImageUpload, State, Writer
from mnistlab.serve.engines import ServedModel
from mnistlab.serve.images import RequestError, prepare
from mnistlab.serve.schemas import REFUSALS, CollectRequest, CollectResponse, CollectUpload, Refusal, image_body

router = APIRouter(tags=["collect"])


@router.post(
    "/api/collect",
    summary="Save a labelled drawing (needs --collect)",
    openapi_extra=image_body(CollectRequest, CollectUpload),
    dependencies=[Writer],
    responses={
        **REFUSALS,
        401: {"model": Refusal, "description": "The server has a token (--token) and the request lacks it"},
        404: {"model": Refusal, "description": "Collecting is off (no --collect)"},
        429: {"model": Refusal, "description": "Too many writes from this client (Retry-After says when to retry)"},
        507: {"model": Refusal, "description": "The collect folder holds its --collect-max-files or -mb"},
    },
)
async def collect(collect: CollectFolder, upload: ImageUpload, state: State) -> CollectResponse:
    """Saves the image as DIR/<label>/<server-chosen name>.png; returns its path inside DIR and how many
    drawings that label's folder holds."""
    label = class_number(upload.fields.get("label"), state.models)
    quota = state.writes.quota
    assert quota is not None  # `collect` exists: the folder is set, and so is its quota
    quota.check_room()  # before preparing the image: a full folder costs the server nothing more
    pre = await state.preparers.run(prepare, upload.data)  # the original image is what gets saved
    folder = make_dirs(collect / str(label))
    target = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}.png"
    with replacing(target) as tmp:
        await state.preparers.run(pre.original.save, tmp, "PNG")
        size = tmp.stat().st_size
        # No await from this check to the rename and the count: no other save comes between.
        quota.check_room(size)
    quota.add(size)
    count = sum(1 for _ in folder.glob("*.png"))
    return CollectResponse(saved=f"{target.parent.name}/{target.name}", count=count)


def class_number(label: str | None, models: Sequence[ServedModel]) -> int:
    """The class a label names: exactly a class number ("0" to "9" for ten classes; a JSON integer arrives as
    its digits) or a served model's class name ("Ankle boot"); refused naming the value otherwise ("07", " 7",
    an Arabic-Indic seven, 3.5)."""
    count = len(models[0].loaded.classes)  # the first model's classes label the page's buttons
    if label is not None and label in {str(i) for i in range(count)}:
        return int(label)
    named: dict[str, set[int]] = {}
    for model in models:
        for i, name in enumerate(model.loaded.classes[:count]):
            named.setdefault(name, set()).add(i)
    if label is not None and len(named.get(label, ())) == 1:  # a name two models give two classes is no answer
        return named[label].pop()
    words = [repr(name) for name, i in named.items() if name not in {str(j) for j in i}][:2]
    names = f" or a class name ({', '.join(words)}, ...)" if words else ""
    given = "and the request has none" if label is None else f"not {label[:40]!r}"
    raise RequestError(400, f"label must be a class number from 0 to {count - 1}{names}, {given}")
