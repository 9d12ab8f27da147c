"""Chromium for the page's tests, driven by Playwright (Debian's chromium, never `playwright install`), and what a
test does on the page: open it, draw on it with the mouse, read its answer."""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT = 15_000  # ms for the page to answer


def chromium() -> str | None:
    return shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None)


def launch_browser() -> Iterator:
    """A headless Chromium for a module's tests; skipped where there is none (failed under CI=true)."""
    path = chromium()
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("no Chromium, and CI=true requires the browser test: apt-get install -y chromium")
        pytest.skip("no Chromium found (apt-get install chromium) for the browser test")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip("Playwright is not installed (make install-dev)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def answer(page) -> str:
    """The bundled model's digit, once the page shows the answer to the drawing as it is now."""
    page.wait_for_function("() => canvas.dataset.answered === String(version)", timeout=TIMEOUT)
    return page.locator('.model[data-model="bundled"] .digit').text_content()


def ink(page) -> int:
    """How many canvas pixels are not white."""
    return page.evaluate(
        """() => { const d = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
                   let n = 0; for (let i = 0; i < d.length; i += 4) n += d[i] < 250; return n; }"""
    )


def canvas_point(page, x: float, y: float) -> tuple[float, float]:
    """Page coordinates of canvas pixel (x, y) of 280."""
    box = page.locator("#canvas").bounding_box()
    return box["x"] + x * box["width"] / 280, box["y"] + y * box["height"] / 280


def draw_with_mouse(page, strokes: list[list[tuple[float, float]]]) -> None:
    for stroke in strokes:
        page.mouse.move(*canvas_point(page, *stroke[0]))
        page.mouse.down()
        for (x0, y0), (x1, y1) in itertools.pairwise(stroke):
            for i in range(1, 9):
                page.mouse.move(*canvas_point(page, x0 + (x1 - x0) * i / 8, y0 + (y1 - y0) * i / 8))
        page.mouse.up()


def open_page(browser, url: str, **options):
    context = browser.new_context(**options)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url)
    page.wait_for_selector("body[data-ready]")
    return context, page, errors
