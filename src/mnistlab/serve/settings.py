"""What an operator sets for `mnistlab serve` beyond the models: one frozen dataclass, by concern, that the CLI's
flags fill (`cli/serve.py`) and `create_app` and `run` read. Defaults are what a laptop or a classroom server
needs; docs/serving.md says why each is what it is."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeSettings:
    # ------------------------------------------------------------------ the HTTP edge: bodies, headers, ports

    # ------------------------------------------------------------------ connections: timeouts, caps, shutdown

    # ------------------------------------------------------------------ operations: metrics and logs

    # ------------------------------------------------------------------ writes: tokens, quotas, CORS

    pass
