"""The web server's preprocessing processes: uploads decoded and preprocessed (`images.prepare_digit`) on
every core at once. Like `images`, this module needs no torch, so neither do the processes that import it."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from mnistlab.devices import cpu_count
from mnistlab.processes import end_with_parent
from mnistlab.serve.images import RequestError, prepare_digit, sample_drawing


def default_workers() -> int:
    """One preprocessing process per CPU core this process may use, at most 4 (each holds about 45 MB)."""
    return max(1, min(4, cpu_count()))


class Preparers:
    """Decodes and preprocesses uploads in `workers` processes of their own, so that images are prepared on
    every core at once: in threads of the server's process they queue for the GIL (numpy and Pillow release it
    only in their larger calls), and two preprocessing threads under load held the server to 107 drawings/s.
    A worker that dies (a decoder crashing on a hostile file) costs the pool, not the server: the pool is
    replaced and the request tried once more there. `workers=0` prepares in a thread of the server's process.
    """

    def __init__(self, workers: int | None = None):
        self.workers = default_workers() if workers is None else workers
        self._threads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare")
        self._pool: Executor = self._threads
        if self.workers:
            self._pool = self._new_pool()
            # Start every worker now, each preparing one drawing (imports, Pillow's plugins, numpy's first calls:
            # a second or two), so that the first requests do not queue behind that and wait for seconds.
            drawing = sample_drawing()
            for started in [self._pool.submit(prepare_digit, drawing) for _ in range(self.workers)]:
                started.result()

    def _new_pool(self) -> ProcessPoolExecutor:
        # "spawn": a fork of a server with running threads could inherit a lock some thread held.
        return ProcessPoolExecutor(
            self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=end_with_parent,  # a server killed outright cannot shut its pool down
            initargs=(os.getpid(),),
        )

    async def digit(self, data: bytes) -> np.ndarray:
        """The 28x28 digit the models see for image bytes (RequestError for an image the server refuses)."""
        loop = asyncio.get_running_loop()
        for _ in range(2):
            pool = self._pool
            try:
                return await loop.run_in_executor(pool, prepare_digit, data)
            except BrokenProcessPool:
                if self._pool is pool:  # the first request to see it replaces it; the others just retry
                    pool.shutdown(wait=False)
                    self._pool = self._new_pool()
        raise RequestError(422, "the image could not be decoded: the decoder crashed on it")

    async def run(self, fn, *args):
        """`fn(*args)` in the server's own preparing thread (work that needs more than the digit back)."""
        return await asyncio.get_running_loop().run_in_executor(self._threads, fn, *args)

    def worker_pids(self) -> list[int]:
        """The preprocessing processes' ids (none with workers=0)."""
        return list(getattr(self._pool, "_processes", None) or {})

    def close(self) -> None:
        """Stop the workers and wait for them to exit (they finish the image at hand, a few ms)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._threads.shutdown(wait=False, cancel_futures=True)
