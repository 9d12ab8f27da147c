"""Shared by the benchmark scripts: machine description and writing a section of docs/benchmarks.md.

Importing it also puts the repository root on the path, so that a benchmark run as `python benchmarks/NAME.py`
(which puts only benchmarks/ there) can reuse the tests' image and case builders as `tests.support.<module>`."""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mnistlab.devices import describe_cpu

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
DOC = ROOT / "docs" / "benchmarks.md"
HEADER = (
    "# Benchmarks\n\nEvery figure here was written by a script in `benchmarks/`; each section names its command. "
    "Timings are medians of repeated runs within one process, so the pipelines compared share the machine's "
    "state at that moment.\n"
)


def machine() -> str:
    """The CPU (with the instruction set PyTorch uses and whether bfloat16 is native), threads and versions."""
    return (
        f"{describe_cpu()}; {os.cpu_count()} logical CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {sys.version.split()[0]}"
    )


# What holds PyTorch and oneDNN to AVX2 on a CPU that has more: how the benchmarks show an AVX2-only machine.
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def held_back_suffix() -> str:
    """ "" where PyTorch runs its best kernels here, else "-avx2" (or the like): the environment held it back
    (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2, to see an AVX2-only CPU), and its figures get their own
    section of docs/benchmarks.md."""
    import subprocess

    native = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
        env={k: v for k, v in os.environ.items() if k not in AVX2},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    capability = torch.backends.cpu.get_cpu_capability()
    return "" if capability == native else f"-{capability.lower()}"


def held_back_prefix(suffix: str) -> str:
    """The environment to write before a command that `held_back_suffix` found held back ("" when not)."""
    return "".join(f"{k}={v} " for k, v in AVX2.items()) if suffix else ""


def busy_seconds() -> float:
    """CPU seconds this machine's cores have been busy since boot (all processes: /proc/stat)."""
    user, nice, system, _idle, _iowait, irq, softirq = map(int, Path("/proc/stat").read_text().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def own_seconds() -> float:
    """CPU seconds of this process and of every process it started and has waited for (with theirs)."""
    return sum(os.times()[:4])


def others_while(fn: Callable[[], object]) -> tuple[object, float, float]:
    """(fn(), CPU seconds other processes on the machine used meanwhile, wall seconds): the cores' busy time
    less this process's and its waited-for children's, so every process `fn` starts must be waited for by its
    end."""
    began, busy, own = time.perf_counter(), busy_seconds(), own_seconds()
    result = fn()
    # The two clocks count ticks apart: a quiet machine can come out a few seconds below zero.
    return result, max(0.0, (busy_seconds() - busy) - (own_seconds() - own)), time.perf_counter() - began


def median_time(fn: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def write_section(name: str, markdown: str, doc: Path = DOC) -> None:
    """Replace (or append) the section between `<!-- begin NAME -->` and `<!-- end NAME -->` of `doc`."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    text = doc.read_text() if doc.exists() else HEADER
    block = f"{begin}\n{markdown.strip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
