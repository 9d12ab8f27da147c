"""POST /api/predict: an image -> every served model's answer and the 28x28 image they saw."""

from __future__ import annotations

import torch
from fastapi import APIRouter

from mnistlab.serve.deps import ImageUpload, State
from mnistlab.serve.schemas import REFUSALS, PredictRequest, PredictResponse, PredictUpload, image_body

router = APIRouter(tags=["predict"])


@router.post(
    "/api/predict",
    summary="Classify one image with every served model",
    openapi_extra=image_body(PredictRequest, PredictUpload),
    responses=REFUSALS,
)
async def predict(upload: ImageUpload, state: State) -> PredictResponse:
    """One answer per model, in the order served, each with its outlier flag ("doesn't look like a digit");
    `preprocessed` is the 28x28 image they saw (base64 PNG).
    Concurrent requests share forward passes (the micro-batcher)."""
    digit = await state.preparers.digit(upload.data)
    probabilities = await state.batcher(torch.from_numpy(digit))
    return PredictResponse.model_validate(state.predictor.answer(digit, probabilities))
