"""Child processes that do not outlive the process that started them.

A worker node's batch consumers and a foreground ``maas-worker server``'s
Valkey are children that must stop when their parent dies, however it dies:
SIGKILLed, a consumer would keep taking jobs for a node that no longer
answers remote control, heartbeats or shutdown; the server would hold its
port and data. Linux's parent-death signal (``prctl(PR_SET_PDEATHSIG)``)
sends the child a signal when its parent exits; `ends_with_parent` sets it
between fork and exec. Elsewhere it is a no-op (the children are then only
stopped by a clean shutdown).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

#: prctl option (linux/prctl.h).
_PR_SET_PDEATHSIG = 1


def ends_with_parent(sig: signal.Signals = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` for `subprocess.Popen`: the child gets ``sig`` when this process
    exits (None where the platform has no parent-death signal).

    Linux sends it when the thread that forked the child exits: fork from a
    thread that lives as long as the children should (the main thread, or the
    thread that supervises them). ``libc.prctl`` is looked up here, before the
    fork, so the child runs one C call and two system calls, and takes no lock
    another thread could hold at the fork (what makes ``preexec_fn`` unsafe
    with threads in general: ruff's PLW1509, silenced where this is passed).
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:
            # The parent died before the signal was set: act as if it came.
            os.kill(os.getpid(), sig)

    return preexec
