"""Flushing subnormal floats to zero on every CPU thread that PyTorch computes on.

Numbers below about 1e-38 ("subnormal") take a slow microcode path on x86 CPUs. Adam's moment estimates for
rarely lit pixels decay into that range within an epoch, and then every optimizer step pays for it.
`torch.set_flush_denormal` only sets the flag on the calling thread, while PyTorch's matrix products and
fused optimizers run on a pool of OpenMP threads that has usually been started by then; so the flag is also
set from inside one OpenMP parallel region, which runs on that same pool.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

_ON_THREAD = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


def flush_subnormals(on: bool) -> bool:
    """Turn flushing on or off for this thread and PyTorch's OpenMP threads; False where the CPU can't."""
    supported = torch.set_flush_denormal(on)
    openmp = _openmp()
    if supported and openmp is not None:
        callback = _ON_THREAD(lambda _: torch.set_flush_denormal(on))
        openmp.GOMP_parallel(callback, None, torch.get_num_threads(), 0)
    return supported


@functools.cache
def _openmp() -> ctypes.CDLL | None:
    """The OpenMP runtime loaded with PyTorch (libgomp, or Intel's, which has the same entry point)."""
    maps = Path("/proc/self/maps")  # Linux; elsewhere only the calling thread is set
    if not maps.exists():
        return None
    for line in maps.read_text().splitlines():
        path = line.split()[-1]
        if Path(path).name.startswith(("libgomp", "libiomp5")):
            library = ctypes.CDLL(path)
            library.GOMP_parallel.argtypes = [_ON_THREAD, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
            return library
    return None
