"""The draw-a-digit web app behind `mnistlab serve`: a JSON API and one page (needs `pip install 'mnistlab[web]'`).

>>> from mnistlab.serve import create_app, listen, run
>>> run(create_app([None, "runs/seed-b"]), listen("127.0.0.1", 8000))   # the bundled model and a run
"""

from mnistlab.serve.app import MAX_BODY, create_app, is_loopback, listen, run, url_of

__all__ = ["MAX_BODY", "create_app", "is_loopback", "listen", "run", "url_of"]
