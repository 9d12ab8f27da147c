"""Processes that end with the one that started them: the web server's preprocessing workers and the ranks of
a distributed training (`mnistlab train --nproc N`, torchrun).

A child started in a session of its own (torchrun starts each rank so) is re-parented when its parent dies,
even by SIGKILL, and would otherwise go on alone: a rank holding hundreds of MB with nobody to report to. We
poll the parent's id from a daemon thread rather than ask Linux for a parent-death signal (`PR_SET_PDEATHSIG`):
polling works on every OS, and the kernel's signal fires when the parent *thread* that forked the child ends,
which a launcher that starts processes from a worker thread would trigger while still alive. Half a second of
polling costs nothing measurable. The parent's id is given by the caller, never read late: a parent that died
while the child was starting is noticed too.
"""

from __future__ import annotations

import os
import threading
import time

LAUNCHER_ENV = "MNISTLAB_LAUNCHER_PID"
POLL_S = 0.5
# After the signal, how long a process may take to stop by itself (a rank finishing a checkpoint write it holds
# signals for) before it is ended outright.
GRACE_S = 5.0


def end_with_parent(parent: int, signum: int | None = None) -> None:
    """From now on, end this process within about POLL_S once `parent` is no longer its parent: by `signum`
    sent to itself (its handlers run: a training saves and says how to resume), ended outright GRACE_S later
    if it is still alive; with no `signum`, at once (os._exit)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(POLL_S)
        if signum is not None:
            os.kill(os.getpid(), signum)
            time.sleep(GRACE_S)
        os._exit(1 if signum is not None else 0)

    threading.Thread(target=watch, name="end-with-parent", daemon=True).start()


_parent_at_start: int | None = None


def note_launcher() -> None:
    """At a process's very start (`python -m mnistlab`): a rank started by plain torchrun notes its parent (the
    agent) before anything slow runs, so that a launcher that dies while this rank imports torch is noticed."""
    global _parent_at_start
    if "TORCHELASTIC_RUN_ID" in os.environ:
        _parent_at_start = os.getppid()


def launcher_pid() -> int:
    """The id of the process that launched this rank: `mnistlab train --nproc` names itself in the environment
    (LAUNCHER_ENV); under plain torchrun, the parent noted at start (else this process's parent now)."""
    return int(os.environ.get(LAUNCHER_ENV) or _parent_at_start or os.getppid())


def reports_the_end() -> bool:
    """Whether this process says how the command ended (interrupted, terminated): any process but a rank of
    several, where rank 0 speaks for the job, or none does when `mnistlab train --nproc` launched it (the
    launcher says it, once)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return True
    return LAUNCHER_ENV not in os.environ and os.environ.get("RANK", "0") == "0"
