"""Writes docs/reliability.md: every bad input and fault of tests/support/reliability_cases.py, run for real, with the
exact message and exit code observed. tests/test_reliability.py checks the same cases.

Run: .venv/bin/python benchmarks/reliability_table.py [--data-dir DIR]   (about three minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from pathlib import Path

from common import machine

from tests.support.mnist import mnist_dir
from tests.support.reliability_cases import CASES, Context, fresh_run
from tests.support.server_cases import SERVER_CASES, send
from tests.support.servers import mnistlab_serve

DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"

INTRO = """# Reliability: bad inputs and faults

Every row is a case in [tests/support/reliability_cases.py](../tests/support/reliability_cases.py), run by
`tests/test_reliability.py` (which checks the exit code and the key words of the message)
and, for this page, by `benchmarks/reliability_table.py`, which recorded the message exactly as printed. Paths are
shortened to `…/`. Exit codes: 2 for a user's mistake (one line on stderr, no traceback), 1 when `predict` could
not read some of its images (it still reads the others), 130 after Ctrl-C, 143 after SIGTERM, 129 after SIGHUP
(a closed terminal), 141 when the reader of the output went away.

Beside these, `tests/test_reliability.py` proves properties over many generated cases (hypothesis): checkpoints
and model files load back whatever the length of their header (every value modulo 256); arbitrary bytes given to
the model loader, the checkpoint loader, the IDX reader, the config loader and image preprocessing raise only
`MnistlabError`, within five seconds and a 1 GiB cap on extra address space. Its fault tests show that a write
cut short by a size limit or by the process being killed leaves the previous checkpoint whole and no
half-written file under a real name; that a full or read-only disk is a one-line error; that a run interrupted
by SIGINT or SIGTERM resumes to bit-identical metrics; that a diverging run keeps its last good epoch.

A distributed training's launcher and its ranks (`tests/test_rank_lifetime.py` and `tests/test_distributed.py`,
2 ranks of seed-b-fixed on the real MNIST; [docs/distributed.md](distributed.md)):

Resumable: `--resume` ends on the metrics of an uninterrupted run; rank 0 has printed the resume command.

| fault | what happens | exit code |
|---|---|---|
| SIGKILL to `mnistlab train --nproc 2` after epoch 1 | every rank stops (1.5 s seen, 10 s tested); resumes | 137 |
| SIGKILL to `torchrun --standalone` (its agent) | the same | 137 |
| SIGHUP to `mnistlab train --nproc 2` | `mnistlab: terminated (SIGHUP)` once; resumable | 129 |
| Ctrl-C (SIGINT) to `mnistlab train --nproc 2` | `mnistlab: interrupted` once, no traceback; resumable | 130 |
| a rank killed (SIGKILL) or hung (SIGSTOP) | `rank 0 of 2: lost the other ranks ...`; resumable | 1 |

A sweep (`tests/test_sweep.py`, 1-epoch trials on a slice of the real MNIST; [docs/sweeps.md](sweeps.md)):

| fault | what happens | exit code |
|---|---|---|
| Ctrl-C (SIGINT) to `mnistlab sweep` | trials with all epochs done count; the rest fail: rerun to go on | 130 |
| SIGTERM to `mnistlab sweep` (`kill PID`) | the same; `mnistlab: terminated (SIGTERM)` | 143 |
| a worker killed (SIGKILL) | only its running trial is lost; the others go on | 0, or 2: "run the same command" |

Rerunning the same sweep command runs new trials in the places of the failed ones.
"""


SERVER_INTRO = """## The server: bad requests and faults

Every row below is a case of [tests/support/server_cases.py](../tests/support/server_cases.py), sent over a plain
socket to a real `mnistlab serve` on loopback (`tests/test_serve_edge.py::test_every_server_case` checks the same),
with the answer as it came. Faults that take more than one request are tested in `tests/test_serve_connections.py`
([docs/serving.md](serving.md)):

| fault | what happens | status |
|---|---|---|
| 200 clients trickling a head, or silent | others served (0.4 s seen); closed after 10 s | 408 if begun |
| over `--max-connections` (512) | the idlest connection closed; none idle: refused | 503, Retry-After |
| over `--max-queue` (128) predictions | the others are served | 503, Retry-After |
| SIGTERM or Ctrl-C under load | every request begun is answered; exit 0 | 200 |
| a preprocessing process killed under load | pool rebuilt, its images retried once | 200 (then 500) |
"""


def server_table() -> str:
    """Every server case sent to a real `mnistlab serve` (one per set of flags), as a Markdown table."""
    rows = []
    with contextlib.ExitStack() as stack:
        running: dict[tuple[str, ...], tuple[str, int]] = {}
        for i, case in enumerate(SERVER_CASES):
            if case.args not in running:
                served = stack.enter_context(mnistlab_serve(*case.args, "--workers", "0"))
                host, port = served.url.split("/")[2].split(":")
                running[case.args] = host, int(port)
            host, port = running[case.args]
            answer = send(host, port, case.request(f"{host}:{port}"))
            message = answer.body.decode("utf-8", "replace") if case.plain else answer.detail()
            status = "ok" if answer.status == case.status else f"**expected {case.status}**"
            flags = f" (`{' '.join(case.args)}`)" if case.args else ""
            rows.append(
                f"| {i + 1} | {case.name}{flags} | {answer.status} {status} | `{message.strip().replace('|', '/')}` |"
            )
            print(rows[-1], flush=True)
    return "| # | bad request | status | message |\n|---|---|---|---|\n" + "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=mnist_dir())
    args = parser.parse_args()
    if args.data_dir is None:
        parser.error("no MNIST found: give --data-dir")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        base = fresh_run(Path(scratch), args.data_dir)
        for i, case in enumerate(CASES):
            tmp = Path(scratch) / f"case{i}"
            tmp.mkdir()
            result = case.run(Context(tmp, args.data_dir, base))
            lines = result.stderr.strip().splitlines()
            message = next((line for line in lines if case.needle and case.needle in line), lines[-1] if lines else "")
            message = message.replace(scratch + os.sep, "…/").replace(str(args.data_dir), "MNIST")
            status = "ok" if result.returncode == case.code else f"**expected {case.code}**"
            command = " ".join(
                a.replace("{tmp}/", "").replace("{run}", "RUN").replace("{data}", "MNIST") for a in case.argv
            )
            rows.append(
                f"| {i + 1} | {case.name} | `mnistlab {command}` | {result.returncode} {status} "
                f"| `{message.replace('|', '/')}` |"
            )
            print(rows[-1], flush=True)
    table = "| # | bad input or fault | command | exit | message |\n|---|---|---|---|---|\n" + "\n".join(rows)
    DOC.write_text(
        f"{INTRO}\nMachine: {machine()}\nCommand: `.venv/bin/python benchmarks/reliability_table.py`\n\n{table}\n"
        f"\n{SERVER_INTRO}\n{server_table()}\n"
    )
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
