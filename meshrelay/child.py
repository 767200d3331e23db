"""A helper child process: requests and answers as length-prefixed pickles, in order.

The node runs two kinds of helper processes: the SQLite writer
(:mod:`meshrelay.store.writer_process`) and the signature verifier
(:class:`VerifierProcess`).  Each has an interpreter, and so a GIL, of its
own: work sent to it runs on the second core without waiting for the busy
reactor thread between two C calls, as a worker thread must.

The parent writes each request on the child's stdin and reads the answers
from its stdout, in the order sent.  The pipe is private to the two
processes, so pickle is safe here.  The child runs ``python -I`` with its
import path given explicitly, so a ``meshrelay/`` directory in the working
directory is never imported in its place.  If the child dies, the requests
in flight fail with the owner's error, and the next request starts a new
child (after ``RESPAWN_DELAY``).  When the parent dies, the child reads EOF
and exits.
"""

from __future__ import annotations

import os
import pickle
import sys
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from meshrelay.childloop import HEAD as _HEAD

#: seconds to wait before starting a new child after one died
RESPAWN_DELAY = 1.0
#: seconds a stopping child gets to finish before it is killed
STOP_TIMEOUT = 30.0

#: the child's ``-c`` program: its import path is exactly the one it is given (argv[1]), then ``func``
_BOOTSTRAP = (
    "import sys; sys.path[:] = [p for p in sys.argv.pop(1).split({sep!r}) if p]; "
    "from {module} import {func}; sys.exit({func}(sys.argv[1:]))"
)


def _package_root() -> str:
    import meshrelay

    return os.path.dirname(os.path.dirname(os.path.abspath(meshrelay.__file__)))


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


def _nothing_buffered(writer: Any) -> bool:
    """Whether Twisted's writer for a child's stdin is open and holds no data of its own to send."""
    try:
        pending = len(writer.dataBuffer) - writer.offset + writer._tempDataLen
        return bool(writer.connected) and not writer.disconnecting and pending == 0
    except (AttributeError, TypeError):  # not the FileDescriptor we know: let it write
        return False


def write_to_child(transport: Any, data: bytes) -> None:
    """Write ``data`` to a spawned child's stdin: into the pipe now when it can, else through Twisted.

    ``transport.write`` never writes at once: it stops the pipe's read watch,
    starts a write watch, and writes on the reactor's next turn, which then
    swaps the watches back: four ``epoll_ctl`` calls and one more turn of the
    loop for every request.  A signed poll makes two child requests (the
    signature, the nonce claim), and these calls were about 7 % of the node's
    CPU per poll.  When Twisted holds nothing unsent for this pipe, the frame
    is written straight into it (the pipe is non-blocking); whatever does not
    fit, or any error, goes through ``transport.write`` as before, behind
    nothing, so the order of frames is kept and Twisted still sees a closed pipe.
    """
    writer = getattr(transport, "pipes", {}).get(0)
    if writer is not None and _nothing_buffered(writer):
        try:
            written = os.write(writer.fileno(), data)
        except OSError:  # EAGAIN (full), EPIPE (the child is gone): Twisted's writer takes it
            written = 0
        if written == len(data):
            return
        data = data[written:]
    transport.write(data)


class _ChildProtocol(ProcessProtocol):
    def __init__(self, owner: ChildProcess) -> None:
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
                self.owner.log.error("{what} process: {line}", what=self.owner.what, line=line)

    def processEnded(self, reason: Failure) -> None:
        # On the next turn, not inside Twisted's reaping: ``reapAllProcesses`` walks a snapshot of
        # its handlers, and what ``_ended`` sets off (a node stopping: the other child's stdin
        # closed, so that child reaped at once) could reap a process still ahead in that walk,
        # which then fails "Failed to reap None" (seen in CI when the writer and the verifier
        # stopped together; twisted/twisted#9778 describes the same trap).
        self.owner.reactor.callLater(0, self.owner._ended, self, reason)


class ChildProcess:
    """One helper child: ``run(request)`` fires with its answer; requests queue in order.

    ``module.func(argv)`` is the child's entry point (it calls :func:`serve`);
    ``error`` makes the exception every failure reaches a caller as.
    """

    log = Logger()
    #: what the child's exit means for a request in flight
    lost = "the request was not answered"

    def __init__(
        self, reactor: Any, module: str, func: str, args: list[str], what: str, error: Callable[[str], Exception]
    ) -> None:
        self.reactor = reactor
        self.what = what
        self.error = error
        self.argv = [
            sys.executable,
            "-I",
            "-c",
            _BOOTSTRAP.format(sep=os.pathsep, module=module, func=func),
            os.pathsep.join(child_import_path()),
            *args,
        ]
        self._proto: _ChildProtocol | None = None
        self._inflight: deque[Deferred[Any]] = deque()
        self._stopping: Deferred[None] | None = None
        self._next_spawn = 0.0
        self.spawned = 0

    @property
    def pid(self) -> int | None:
        proto = self._proto
        return None if proto is None or proto.transport is None else proto.transport.pid

    @property
    def running(self) -> bool:
        return self._proto is not None and self._stopping is None

    def start(self) -> None:
        if self._proto is None:
            self._spawn()

    def _spawn(self) -> None:
        proto = _ChildProtocol(self)
        self.reactor.spawnProcess(
            proto, sys.executable, self.argv, env=dict(os.environ), childFDs={0: "w", 1: "r", 2: "r"}
        )
        self._proto = proto
        self.spawned += 1
        self.log.info("{what} process started (pid {pid})", what=self.what, pid=self.pid)

    def run(self, request: Any) -> Deferred[Any]:
        """Send one request (any picklable value); fires with the child's answer, or fails with ``error``."""
        if self._stopping is not None:
            return fail(self.error(f"the {self.what} process is stopping"))
        if self._proto is None:
            if self.reactor.seconds() < self._next_spawn:
                return fail(self.error(f"the {self.what} process is restarting"))
            try:
                self._spawn()
            except OSError as e:  # fork or exec failed (EAGAIN, ENOMEM...): try again later
                self._next_spawn = self.reactor.seconds() + RESPAWN_DELAY
                return fail(self.error(f"cannot start the {self.what} process: {e}"))
        assert self._proto is not None and self._proto.transport is not None
        try:
            payload = pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            return fail(self.error(f"cannot send this request to the {self.what} process: {e}"))
        d: Deferred[Any] = Deferred()
        self._inflight.append(d)
        write_to_child(self._proto.transport, _HEAD.pack(len(payload)) + payload)
        return d

    def _answer(self, payload: bytes) -> None:
        if not self._inflight:
            self.log.error("{what} process answered a request nobody sent", what=self.what)
            return
        d = self._inflight.popleft()
        kind, value = pickle.loads(payload)
        if kind == "ok":
            d.callback(value)
        else:
            d.errback(self.error(value))

    def _ended(self, proto: _ChildProtocol, reason: Failure) -> None:
        if proto is not self._proto:
            return
        self._proto = None
        inflight, self._inflight = self._inflight, deque()
        if self._stopping is not None:
            stopping, self._stopping = self._stopping, None
            for d in inflight:
                d.errback(self.error(f"the {self.what} process stopped"))
            stopping.callback(None)
            return
        self._next_spawn = self.reactor.seconds() + RESPAWN_DELAY
        self.log.error("{what} process exited unexpectedly: {why}", what=self.what, why=reason.getErrorMessage())
        for d in inflight:
            d.errback(self.error(f"the {self.what} process exited; {self.lost}"))

    def stop(self) -> Deferred[None]:
        """Close the child's stdin (it finishes its request and exits); kill it if it hangs."""
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


class ProcessExecutor:
    """An executor (:class:`meshrelay.executor.Executor`) whose work runs in a child process.

    ``fn`` must be a module-level function (it travels by name) and its
    arguments and result picklable.  Jobs run one after another, in order.
    """

    def __init__(self, reactor: Any, what: str, error: Callable[[str], Exception]) -> None:
        self.child = ChildProcess(reactor, "meshrelay.childloop", "call_main", [], what, error)

    def run(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return self.child.run((fn, args))

    def start(self) -> None:
        self.child.start()

    def stop(self) -> None:
        # The child finishes the job it has, reads EOF and exits; jobs in flight fail.
        self.child.stop()
