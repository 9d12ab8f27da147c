"""POST /api/collect: a labelled drawing saved as DIR/<label>/<server-chosen name>.png (with --collect DIR)."""

from __future__ import annotations

import secrets
import time

from fastapi import APIRouter

from mnistlab.files import make_dirs, replacing
from mnistlab.serve.deps import CollectFolder, ImageUpload, State
from mnistlab.serve.images import RequestError, prepare
from mnistlab.serve.schemas import REFUSALS, CollectRequest, CollectResponse, CollectUpload, Refusal, image_body

router = APIRouter(tags=["collect"])


@router.post(
    "/api/collect",
    summary="Save a labelled drawing (needs --collect)",
    openapi_extra=image_body(CollectRequest, CollectUpload),
    responses={**REFUSALS, 404: {"model": Refusal, "description": "Collecting is off (no --collect)"}},
)
async def collect(collect: CollectFolder, upload: ImageUpload, state: State) -> CollectResponse:
    """Saves the image as DIR/<label>/<server-chosen name>.png; returns its path inside DIR and how many
    drawings that label's folder holds."""
    pre = await state.preparers.run(prepare, upload.data)  # the original image is what gets saved
    classes = state.models[0].loaded.classes
    label = upload.fields.get("label", "").strip()
    if not label.isdigit() or int(label) >= len(classes):
        raise RequestError(400, f"label must be a class number from 0 to {len(classes) - 1}, not {label!r}")
    folder = make_dirs(collect / str(int(label)))
    target = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}.png"
    with replacing(target) as tmp:
        await state.preparers.run(pre.original.save, tmp, "PNG")
    count = sum(1 for _ in folder.glob("*.png"))
    return CollectResponse(saved=f"{target.parent.name}/{target.name}", count=count)
