"""The draw-a-digit web app behind `mnistlab serve`: a JSON API and one page (needs `pip install 'mnistlab[web]'`).

>>> from mnistlab.serve import create_app, listen, run
>>> run(create_app([None, "runs/seed-b"]), listen("127.0.0.1", 8000))   # the bundled model and a run

The names load `app` (FastAPI, torch) on first use: the server's preprocessing processes import
`mnistlab.serve.images` alone.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["MAX_BODY", "WebApp", "create_app", "is_loopback", "listen", "run", "url_of"]

if TYPE_CHECKING:
    from mnistlab.serve.app import MAX_BODY, WebApp, create_app, is_loopback, listen, run, url_of


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("mnistlab.serve.app"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
