"""GET /api/models and GET /api/health: what is served, and whether the server answers."""

from __future__ import annotations

from fastapi import APIRouter

from mnistlab.serve.deps import State
from mnistlab.serve.schemas import HealthResponse, ModelsResponse

router = APIRouter(tags=["models"])


@router.get("/api/models", summary="The served models")
async def models_info(state: State) -> ModelsResponse:
    """Name, engine, architecture, test accuracy, class names, calibration and outlier threshold of each model,
    in the order served."""
    return ModelsResponse.model_validate(
        {"models": [m.describe() for m in state.models], "collect": state.collect is not None}
    )


@router.get("/api/health", summary="Whether the server answers")
async def health(state: State) -> HealthResponse:
    """Also how many images the models have classified, in how many forward passes (batching at work)."""
    batcher = state.batcher
    return HealthResponse(status="ok", models=len(state.models), images=batcher.images, forward_passes=batcher.passes)
