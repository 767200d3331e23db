"""The SQLite writer as a child process: group commit and signature checks off the GIL.

A node's reactor thread parses HTTP and JSON; the writes and the Ed25519
checks of deposits are the other half of its work.  In a thread they would
share the interpreter lock with the reactor: every SQLite statement and every
verification releases and re-takes it, and each re-take waits for the busy
reactor thread, so a batch spends far longer waiting than working.  In a
child process (:class:`meshrelay.child.ChildProcess`) they run on the second
core with a lock of their own.

The parent (:class:`ProcessWriter`) sends batches of operations (up to two
queued, answered in order); the child runs each with the same
:class:`~meshrelay.store.sqlite.WriterCore` an in-process writer uses,
commits, and answers with the per-operation results and the new counters.

If the child dies, the batch in flight fails with a ``StoreError`` (the
clients get 503 and retry; dedup makes a retry of a committed deposit a
``duplicate``), and the next batch starts a new child, which reads the
counters back from the database.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.internet.defer import Deferred

from meshrelay.child import ChildProcess, serve
from meshrelay.store.base import Caps, StoreError

#: the name of the one-op batch that hands the child new caps (a config reload)
SET_CAPS = "__set_caps__"


def _caps_argv(caps: Caps) -> list[str]:
    return [
        str(caps.per_sender_pending),
        str(caps.per_mailbox_pending),
        str(caps.max_stored_bytes),
        str(caps.max_refused),
        str(caps.max_policies),
    ]


class ProcessWriter(ChildProcess):
    """Runs write batches in a child process; batches sent while one runs queue behind it, in order."""

    lost = "the write may not have committed"

    def __init__(self, reactor: Any, path: str, durability: str, caps: Caps) -> None:
        super().__init__(
            reactor,
            "meshrelay.store.writer_process",
            "child_main",
            [path, durability, *_caps_argv(caps)],
            "store writer",
            StoreError,
        )

    def run(self, ops: list[Any]) -> Deferred[Any]:
        """Send one batch; fires with ``(results, (seq, count, bytes))``."""
        return super().run(ops)

    def set_caps(self, caps: Caps) -> None:
        """New caps (a config reload): for a respawned child, and sent to the running one.

        The running child takes them between two batches: those sent before
        run under the old caps, those sent after under the new ones.
        """
        self.argv[-5:] = _caps_argv(caps)
        if self.running:
            self.run([(SET_CAPS, caps)]).addErrback(
                lambda f: self.log.error("writer process did not take the new caps: {why}", why=f.getErrorMessage())
            )


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
    from meshrelay.store.sqlite import WRITER_CACHE_KIB, WriterCore, _connect

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
