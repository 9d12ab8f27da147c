"""The page (GET /), its files (/static), and the API's docs (GET /docs, Swagger UI served from the
swagger-ui-bundle package: no CDN, works offline). None of them is part of the OpenAPI document."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

STATIC = Path(__file__).resolve().parent.parent / "static"
# The page loads nothing from elsewhere; images are data: URLs (the model's view) and blobs (uploads).
PAGE_POLICY = "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'"

router = APIRouter(include_in_schema=False)


@router.get("/")
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_POLICY})


@router.get("/docs")
async def docs() -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="mnistlab API",
        swagger_js_url="/swagger/swagger-ui-bundle.js",
        swagger_css_url="/swagger/swagger-ui.css",
        swagger_favicon_url="data:,",
    )


def mount_files(app: FastAPI) -> None:
    """Serve the page's files and Swagger UI's, mounted on the app itself: older FastAPI releases (the web extra
    allows 0.115) leave a router's mounts out of `include_router`."""
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.mount("/swagger", StaticFiles(directory=swagger_ui_path), name="swagger")
