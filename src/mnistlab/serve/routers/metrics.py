"""GET /metrics: the app's metrics in Prometheus' text format, written by prometheus_client (`serve/metrics.py`
says what they are)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mnistlab.serve.metrics import metrics_of

router = APIRouter(tags=["operations"])


@router.get(
    "/metrics",
    summary="Metrics for Prometheus",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}, "description": "Prometheus text format"}},
)
async def metrics(request: Request) -> Response:
    """Requests by route and status, their latency, predictions and outliers flagged by model, the prediction
    queue, preprocessing restarts and the server process's memory, CPU and open files."""
    return Response(generate_latest(metrics_of(request.app).registry), media_type=CONTENT_TYPE_LATEST)
