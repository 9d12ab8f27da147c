"""The web server's preprocessing processes: uploads decoded and preprocessed (`images.prepare_digit`) on
every core at once. Like `images`, this module needs no torch, so neither do the processes that import it."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import wait

import numpy as np

from mnistlab.devices import cpu_count
from mnistlab.files import STOPPING
from mnistlab.processes import end_with_parent
from mnistlab.serve.images import RequestError, prepare_digit, sample_drawing

# How long a stop waits for preprocessing processes to finish the image at hand before killing them.
STOP_S = 3.0


def default_workers() -> int:
    """One preprocessing process per CPU core this process may use, at most 4 (each holds about 45 MB)."""
    return max(1, min(4, cpu_count()))


class Preparers:
    """Decodes and preprocesses uploads in `workers` processes of their own, so that images are prepared on
    every core at once: in threads of the server's process they queue for the GIL (numpy and Pillow release it
    only in their larger calls), and two preprocessing threads under load held the server to 107 drawings/s.
    A worker that dies (a decoder crashing on a hostile file, the kernel's OOM killer) costs the pool, not the
    server: the pool is replaced (counted in `restarts`) and each request it held tried once more there; one
    whose image kills a second pool too gets a 500. `workers=0` prepares in a thread of the server's process.
    """

    def __init__(self, workers: int | None = None):
        self.workers = default_workers() if workers is None else workers
        self._threads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare")
        self._pool: Executor = self._threads
        self.restarts = 0  # pools replaced after a worker died (GET /metrics)
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
            initializer=_start_worker,
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
                    self.restarts += 1
        raise RequestError(500, "the preprocessing process died twice while preparing this image (it was restarted)")

    async def run(self, fn, *args):
        """`fn(*args)` in the server's own preparing thread (work that needs more than the digit back)."""
        return await asyncio.get_running_loop().run_in_executor(self._threads, fn, *args)

    def worker_pids(self) -> list[int]:
        """The preprocessing processes' ids (none with workers=0)."""
        return list(getattr(self._pool, "_processes", None) or {})

    def close(self, timeout: float = STOP_S) -> None:
        """Stop the workers: each finishes the image at hand (a few ms); one still busy after `timeout` seconds
        (a decoder stuck on a file) is killed, so that the server's stop is bounded. They ignore SIGTERM."""
        processes = list((getattr(self._pool, "_processes", None) or {}).values())
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._threads.shutdown(wait=False, cancel_futures=True)
        # Waiting on their sentinels, never reaping them (the pool's own thread does): no reaped id gets killed.
        running = {process.sentinel: process for process in processes}
        deadline = time.monotonic() + timeout
        while running and (left := deadline - time.monotonic()) > 0:
            for sentinel in wait(list(running), left):
                del running[sentinel]
        for process in running.values():
            process.kill()


def _start_worker(parent: int) -> None:
    """A preprocessing process's start: it ends with the server (a server killed outright cannot shut its pool
    down), and leaves Ctrl-C and SIGTERM to the server, which stops it once the requests in progress are
    answered: a terminal's Ctrl-C, or a service manager's SIGTERM, reaches every process of the group at once."""
    for sig in STOPPING:
        signal.signal(sig, signal.SIG_IGN)
    end_with_parent(parent)
