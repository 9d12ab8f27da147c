"""The CLI as a user runs it, and what a user error must look like."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

from mnistlab.cli import main


def mnistlab(*args: str, env: dict[str, str] | None = None, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """`mnistlab ARGS` in a fresh process, as a user runs it, with `env` added to this process's environment;
    other keywords go to `subprocess.run` (`input`, `preexec_fn`, a shorter `timeout`)."""
    kwargs.setdefault("timeout", 600)
    return subprocess.run(
        [sys.executable, "-m", "mnistlab", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        **kwargs,
    )


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess[str]:
    """`mnistlab ARGS` in this process (no interpreter start, no torch import), with what it printed: the same
    result as `mnistlab` gives, for the checks that need no fresh process."""
    capsys.readouterr()  # only what this command prints
    code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["mnistlab", *args], code, out, err)


def assert_user_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    """A user error: exit code 2 and one line on stderr, `mnistlab: error: ...` naming every needle, no
    traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mnistlab: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
