"""The SQLite writer as a child process: group commit and signature checks off the GIL.

A node's reactor thread parses HTTP and JSON; the writes and the Ed25519
checks of deposits are the other half of its work.  In a thread they would
share the interpreter lock with the reactor: every SQLite statement and every
verification releases and re-takes it, and each re-take waits for the busy
reactor thread, so a batch spends far longer waiting than working.  In a
child process (:class:`meshrelay.child.ChildProcess`) they run on the second
core with a lock of their own.

The parent (:class:`ProcessWriter`) sends batches of operations (up to two
queued, answered in order); the child (:mod:`meshrelay.store.writer_child`,
which imports no Twisted) runs each with the same
:class:`~meshrelay.store.sqlite_core.WriterCore` an in-process writer uses,
commits, and answers with the per-operation results and the new counters.

If the child dies, the batch in flight fails with a ``StoreError`` (the
clients get 503 and retry; dedup makes a retry of a committed deposit a
``duplicate``), and the next batch starts a new child, which reads the
counters back from the database.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from meshrelay.child import ChildProcess
from meshrelay.store.base import Caps, StoreError
from meshrelay.store.writer_child import SET_CAPS


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
            "meshrelay.store.writer_child",
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
