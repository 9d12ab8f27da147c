"""Where a model runs and how it computes: device choice (cpu, cuda, mps), bfloat16 autocast, the CPU cores this
process may use, and a one-line description of the CPU for logs and benchmarks. Training and inference both
choose their device here.

torch is imported by the functions that need it, not at the top, so that code which must not load torch (the web
server's preprocessing processes, tests/test_web_api.py) can still count cores here: one module keeps everything
about the machine, rather than a torch-free twin of it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING

from mnistlab.config import DEVICES
from mnistlab.errors import MnistlabError

if TYPE_CHECKING:
    import torch


def cpu_count() -> int:
    """The CPU cores this process may run on: its affinity mask where the OS has one (taskset, cgroups' cpusets,
    a batch scheduler's allocation), else every core the machine has."""
    if hasattr(os, "sched_getaffinity"):  # Linux; macOS and Windows have none
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def available_memory() -> int | None:
    """Bytes of memory the kernel could give new processes now without swapping (Linux's MemAvailable, which
    counts reclaimable caches); None where the OS does not say."""
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def mps_available() -> bool:
    """Whether PyTorch can use Apple's Metal GPU here."""
    import torch

    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` picks CUDA, else Apple's MPS, else the CPU; asking for a device PyTorch cannot see is an error."""
    import torch

    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_available() else "cpu")
    kind = device.split(":", 1)[0]
    if kind not in DEVICES[1:]:
        raise MnistlabError(f"unknown device {device!r} (choose from {', '.join(DEVICES)})")
    if kind == "cuda" and not torch.cuda.is_available():
        raise MnistlabError(f"device {device!r} asked for, but PyTorch sees no CUDA GPU here (use --device cpu)")
    if kind == "mps" and not mps_available():
        raise MnistlabError(f"device {device!r} asked for, but PyTorch has no MPS (Apple GPU) here (use --device cpu)")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise MnistlabError(f"bad device {device!r} ({exc})") from None


@functools.cache
def cpu_bf16_native() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AMX or AVX512-BF16), where oneDNN's bf16 kernels beat
    float32. On AVX2-only CPUs (and where `ONEDNN_MAX_CPU_ISA` caps oneDNN below AVX-512) bf16 is emulated and
    slower than float32, so autocast stays off there."""
    import torch

    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AMX"):
        return False
    flags = _cpu_flags()
    return ("amx_bf16" in flags or "avx512_bf16" in flags) and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def bf16_native(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 natively (CUDA GPUs from Ampere on, CPUs with AMX or AVX512-BF16)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_bf16_native()


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bfloat16 autocast when `enabled` and the device computes bf16 natively; plain float32 otherwise."""
    import torch

    if enabled and bf16_native(device):
        return torch.autocast(device.type, torch.bfloat16)
    return contextlib.nullcontext()


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc keep the memory PyTorch frees for its next allocation instead of handing it back to the kernel.

    By default glibc maps every block above its threshold (128 KiB, raised as it goes up to 32 MiB) fresh from
    the kernel and unmaps it when freed, and gives the top of its heap back once more than twice that is free.
    A network allocates activations of that size at every batch, so every page of them was faulted in again
    at every batch: evaluating the bundled ensemble in batches of 2,000 took 12 million page faults and more
    system time than arithmetic (docs/benchmarks.md). Process-wide and idempotent; False where the C library
    is not glibc (elsewhere nothing is changed).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30) and mallopt(_M_TRIM_THRESHOLD, 1 << 30))


@functools.cache
def _cpu_flags() -> frozenset[str]:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return frozenset()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe_cpu() -> str:
    """The CPU, the instruction set PyTorch dispatches to, and whether bfloat16 runs natively, in one line."""
    import torch

    flags = _cpu_flags()
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return (
        f"{cpu_model()}; torch CPU capability {torch.backends.cpu.get_cpu_capability()}"
        f"{' (flags: ' + ', '.join(isa) + ')' if isa else ''}; bf16 native: {'yes' if cpu_bf16_native() else 'no'}"
    )
