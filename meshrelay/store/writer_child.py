"""The store writer's child process: runs the batches its parent sends (see :mod:`meshrelay.store.writer_process`).

It imports no Twisted, only :mod:`meshrelay.childloop` and
:mod:`meshrelay.store.sqlite_core`: a node (re)started under load has its
writer ready sooner.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from meshrelay.childloop import serve
from meshrelay.store.base import Caps, StoreError

#: the name of the one-op batch that hands the child new caps (a config reload)
SET_CAPS = "__set_caps__"


def no_wakeup_preemption() -> None:
    """Run this process as ``SCHED_BATCH``: woken by the parent, it does not preempt the parent's reactor.

    The parent wakes the writer with every batch it sends (a pipe write).  Linux places a task
    woken that way on the waker's core and lets it preempt the waker, so the node's reactor
    stood still while the writer ran the batch: under issue 10's attack soak the pipe write
    took about 0.4 ms of the reactor's time per batch (py-spy), 15 % of its busy time, and the
    requests waiting in the reactor waited that much longer.  ``SCHED_BATCH`` (same nice
    value, no privilege needed) only turns that wakeup preemption off: the batch runs on
    another core, or as soon as the reactor waits for events.  Where the call does not exist
    or is refused, nothing changes.
    """
    setter = getattr(os, "sched_setscheduler", None)
    policy = getattr(os, "SCHED_BATCH", None)
    if setter is None or policy is None:
        return
    try:
        setter(0, policy, os.sched_param(0))
    except OSError:
        pass


def child_main(argv: list[str]) -> int:
    """The child: run the batches read on stdin, answer on stdout, until stdin closes."""
    from meshrelay.store.sqlite_core import WRITER_CACHE_KIB, WriterCore, _connect

    path, durability, *numbers = argv
    caps = Caps(*(int(n) for n in numbers))
    conn = _connect(path, durability, WRITER_CACHE_KIB)
    core = WriterCore(conn, caps)
    checkpointer = core.run_checkpointer(path, durability)
    no_wakeup_preemption()

    def handle(ops: Any) -> tuple[str, Any]:
        if len(ops) == 1 and isinstance(ops[0], tuple) and ops[0][0] == SET_CAPS:
            core.caps = ops[0][1]
            return ("ok", ([], core.state))
        try:
            results, state = core.run_batch(ops)
        except Exception as e:
            return ("error", f"{type(e).__name__}: {e}")
        # Exceptions travel as StoreErrors: any exception pickles that way.
        return ("ok", ([(ok, v if ok else StoreError(f"{type(v).__name__}: {v}")) for ok, v in results], state))

    serve(handle)
    checkpointer.set()
    conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
