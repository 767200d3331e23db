"""The SQLite writer as a child process: group commit and signature checks off the GIL.

A node's reactor thread parses HTTP and JSON; the writes and the Ed25519
checks of deposits are the other half of its work.  In a thread they would
share the interpreter lock with the reactor: every SQLite statement and every
verification releases and re-takes it, and each re-take waits for the busy
reactor thread, so a batch spends far longer waiting than working.  In a
child process they run on the second core with a lock of their own.

The parent (:class:`ProcessWriter`) sends batches of operations (up to two
queued, answered in order) as length-prefixed pickles on the child's stdin; the child runs it with the
same :class:`~meshrelay.store.sqlite.WriterCore` an in-process writer uses,
commits, and answers with the per-operation results and the new counters on
stdout.  The pipe is private to the two processes, so pickle is safe here.

If the child dies, the batch in flight fails with a ``StoreError`` (the
clients get 503 and retry; dedup makes a retry of a committed deposit a
``duplicate``), and the next batch starts a new child, which reads the
counters back from the database.  When the parent dies, the child reads EOF
and exits.
"""

from __future__ import annotations

import os
import pickle
import struct
import sys
from collections import deque
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from meshrelay.store.base import Caps, StoreError

_HEAD = struct.Struct(">I")
#: seconds to wait before starting a new child after one died
RESPAWN_DELAY = 1.0
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


#: seconds a stopping child gets to finish before it is killed
STOP_TIMEOUT = 30.0


def _package_root() -> str:
    import meshrelay

    return os.path.dirname(os.path.dirname(os.path.abspath(meshrelay.__file__)))


#: the child's ``-c`` program: its import path is exactly the one it is given (argv[1]), then child_main
_BOOTSTRAP = (
    "import sys; sys.path[:] = [p for p in sys.argv.pop(1).split({sep!r}) if p]; "
    "from meshrelay.store.writer_process import child_main; sys.exit(child_main(sys.argv[1:]))"
)


def child_import_path() -> list[str]:
    """The child's ``sys.path``: this package's root, then this process's absolute entries but the cwd.

    The child runs ``python -I`` (no ``PYTHON*`` variables, no user site, no
    script directory or cwd on the path), so a ``meshrelay/`` directory in the
    working directory is never imported in place of the real package; the
    path is handed over explicitly so it finds what this process found.
    """
    root = _package_root()
    cwd = os.getcwd()
    path = [root]
    for entry in sys.path:
        if entry and os.path.isabs(entry) and entry not in path and (entry != cwd or entry == root):
            path.append(entry)
    return path


class _WriterProtocol(ProcessProtocol):
    def __init__(self, owner: ProcessWriter) -> None:
        self.owner = owner
        self._buf = bytearray()

    def outReceived(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        while len(buf) >= 4:
            (n,) = _HEAD.unpack_from(buf)
            if len(buf) < 4 + n:
                break
            payload = bytes(buf[4 : 4 + n])
            del buf[: 4 + n]
            self.owner._answer(payload)

    def errReceived(self, data: bytes) -> None:
        for line in data.decode("utf-8", "replace").splitlines():
            if line.strip():
                self.owner.log.error("writer process: {line}", line=line)

    def processEnded(self, reason: Failure) -> None:
        self.owner._ended(self, reason)


class ProcessWriter:
    """Runs write batches in a child process; batches sent while one runs queue behind it, in order."""

    log = Logger()

    def __init__(self, reactor: Any, path: str, durability: str, caps: Caps) -> None:
        self.reactor = reactor
        self.argv = [
            sys.executable,
            "-I",
            "-c",
            _BOOTSTRAP.format(sep=os.pathsep),
            os.pathsep.join(child_import_path()),
            path,
            durability,
            *_caps_argv(caps),
        ]
        self._proto: _WriterProtocol | None = None
        self._inflight: deque[Deferred[Any]] = deque()
        self._stopping: Deferred[None] | None = None
        self._next_spawn = 0.0
        self.spawned = 0

    @property
    def pid(self) -> int | None:
        proto = self._proto
        return None if proto is None or proto.transport is None else proto.transport.pid

    def start(self) -> None:
        if self._proto is None:
            self._spawn()

    def _spawn(self) -> None:
        proto = _WriterProtocol(self)
        self.reactor.spawnProcess(
            proto, sys.executable, self.argv, env=dict(os.environ), childFDs={0: "w", 1: "r", 2: "r"}
        )
        self._proto = proto
        self.spawned += 1
        self.log.info("store writer process started (pid {pid})", pid=self.pid)

    def run(self, ops: list[Any]) -> Deferred[Any]:
        """Send one batch; fires with ``(results, (seq, count, bytes))``."""
        if self._stopping is not None:
            return fail(StoreError("the store is closing"))
        if self._proto is None:
            if self.reactor.seconds() < self._next_spawn:
                return fail(StoreError("the store writer process is restarting"))
            try:
                self._spawn()
            except OSError as e:  # fork or exec failed (EAGAIN, ENOMEM...): try again later
                self._next_spawn = self.reactor.seconds() + RESPAWN_DELAY
                return fail(StoreError(f"cannot start the store writer process: {e}"))
        assert self._proto is not None and self._proto.transport is not None
        try:
            payload = pickle.dumps(ops, protocol=pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            return fail(StoreError(f"cannot send this batch to the writer process: {e}"))
        d: Deferred[Any] = Deferred()
        self._inflight.append(d)
        self._proto.transport.write(_HEAD.pack(len(payload)) + payload)
        return d

    def set_caps(self, caps: Caps) -> None:
        """New caps (a config reload): for a respawned child, and sent to the running one.

        The running child takes them between two batches: those sent before
        run under the old caps, those sent after under the new ones.
        """
        self.argv[-5:] = _caps_argv(caps)
        if self._proto is not None and self._stopping is None:
            self.run([(SET_CAPS, caps)]).addErrback(
                lambda f: self.log.error("writer process did not take the new caps: {why}", why=f.getErrorMessage())
            )

    def _answer(self, payload: bytes) -> None:
        if not self._inflight:
            self.log.error("writer process answered a batch nobody sent")
            return
        d = self._inflight.popleft()
        kind, value = pickle.loads(payload)
        if kind == "ok":
            d.callback(value)
        else:
            d.errback(StoreError(value))

    def _ended(self, proto: _WriterProtocol, reason: Failure) -> None:
        if proto is not self._proto:
            return
        self._proto = None
        inflight, self._inflight = self._inflight, deque()
        if self._stopping is not None:
            stopping, self._stopping = self._stopping, None
            for d in inflight:
                d.errback(StoreError("the store writer process stopped"))
            stopping.callback(None)
            return
        self._next_spawn = self.reactor.seconds() + RESPAWN_DELAY
        self.log.error("store writer process exited unexpectedly: {why}", why=reason.getErrorMessage())
        for d in inflight:
            d.errback(StoreError("the store writer process exited; the write may not have committed"))

    def stop(self) -> Deferred[None]:
        """Close the child's stdin (it finishes its batch and exits); kill it if it hangs."""
        proto = self._proto
        if proto is None or proto.transport is None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._stopping = d
        transport = proto.transport
        transport.closeStdin()
        killer = self.reactor.callLater(STOP_TIMEOUT, _kill, transport)

        def cancel_killer(result: Any) -> Any:
            if killer.active():
                killer.cancel()
            return result

        return d.addBoth(cancel_killer)


def _kill(transport: Any) -> None:
    try:
        transport.signalProcess("KILL")
    except Exception:
        pass


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
    """The child: read batches on stdin, answer on stdout, until stdin closes."""
    import gc

    from meshrelay.store.sqlite import WriterCore, _connect

    path, durability, *numbers = argv
    caps = Caps(*(int(n) for n in numbers))
    conn = _connect(path, durability)
    core = WriterCore(conn, caps)
    checkpointer = core.run_checkpointer(path, durability)
    # What is loaded now lives as long as the child: no full collection walks it again (a
    # collection's pause is a pause of every batch queued behind it).
    gc.collect()
    gc.freeze()
    no_wakeup_preemption()
    inp = sys.stdin.buffer
    out = sys.stdout.buffer
    while True:
        head = inp.read(4)
        if len(head) < 4:
            break
        (n,) = _HEAD.unpack(head)
        ops = pickle.loads(inp.read(n))
        outcome: tuple[str, Any]
        if len(ops) == 1 and isinstance(ops[0], tuple) and ops[0][0] == SET_CAPS:
            core.caps = ops[0][1]
            outcome = ("ok", ([], core.state))
            data = pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)
            out.write(_HEAD.pack(len(data)) + data)
            out.flush()
            continue
        try:
            results, state = core.run_batch(ops)
            # Exceptions travel as StoreErrors: any exception pickles that way.
            results = [(ok, v if ok else StoreError(f"{type(v).__name__}: {v}")) for ok, v in results]
            outcome = ("ok", (results, state))
        except Exception as e:
            outcome = ("error", f"{type(e).__name__}: {e}")
        data = pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)
        out.write(_HEAD.pack(len(data)) + data)
        out.flush()
    checkpointer.set()
    conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
