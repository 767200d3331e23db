"""Ed25519 verification, batched onto a child process or worker threads.

By default (``node.verifier = "process"``) the batches run in a child process
(:class:`meshrelay.child.ProcessExecutor`) with an interpreter lock of its own.
libsodium (:func:`~meshrelay.envelope.verify_signature`) releases the GIL
while it verifies, so a worker thread also runs beside the reactor; but it
must take the lock back after every signature, and while the reactor is busy
each of those waits: a catch-up verified about a quarter faster in a process.
Requests that arrive while batches are in flight wait and go together in the
next batch, so the hand-off is paid once per batch, not per request.  With no
executor, verification runs inline (tests, ``verify_threads = 0``).

A hand-off is not free either: at low rates, where every request is a batch
of one, sending a poll's signature to the child and reading the verdict back
cost the node and the child about 160 us of CPU together, three times the
check itself (about 55 us; ``bench/op_costs.py poll``), and one more process
that must get a core before the request can go on.  So when nothing is in
flight or waiting, a single small signature (``INLINE_MAX_BYTES``) is checked
on the reactor instead, at most once per ``INLINE_INTERVAL`` seconds: an idle
or lightly loaded node pays no hand-off, while under load, when batches are in
flight, requests still go to the child together and the reactor spends at
most ``1 / INLINE_INTERVAL`` checks a second itself.

When the executor fails (the child process died), the requests of that
batch fail with ``Unavailable`` (503): a signature that could not be checked
is neither valid nor forged.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from meshrelay.errors import Unavailable
from meshrelay.executor import Executor
from meshrelay.sigcheck import verify_all, verify_signature

Item = tuple[bytes, bytes, bytes]

#: the largest signed message checked on the reactor (bigger ones always go to the executor)
INLINE_MAX_BYTES = 16384
#: seconds between two checks on the reactor (at most 500 a second)
INLINE_INTERVAL = 0.002


class Verifier:
    def __init__(
        self,
        executor: Executor | None = None,
        max_inflight: int = 1,
        clock: IReactorTime | None = None,
        inline_interval: float = INLINE_INTERVAL,
        inline_counter: Any = None,
    ) -> None:
        self._executor = executor
        self._max_inflight = max(1, max_inflight)
        self._inflight = 0
        #: with a clock, an idle verifier checks one small signature on the reactor (see the module)
        self._clock = clock
        self.inline_interval = inline_interval
        self._inline_after = 0.0
        #: counted with each signature checked on the reactor while an executor was there
        #: (``meshrelay_signature_checks_inline``), or None
        self.inline_counter = inline_counter
        #: waiting groups: (items, deferred, whether it wants the whole list or one verdict)
        self._pending: list[tuple[list[Item], Deferred[Any], bool]] = []

    def start(self) -> None:
        if self._executor is not None:
            self._executor.start()

    def stop(self) -> None:
        if self._executor is not None:
            self._executor.stop()

    def verify(self, key: bytes, sig: bytes, msg: bytes) -> Deferred[bool]:
        """Fire with True when ``sig`` is ``key``'s signature over ``msg``."""
        if self._executor is None or self._idle_inline(len(msg)):
            return succeed(verify_signature(key, sig, msg))
        return self._queue([(key, sig, msg)], False)

    def _idle_inline(self, size: int) -> bool:
        """Whether to check this one on the reactor: nothing in flight or waiting, small, not too often."""
        if self._clock is None or self._inflight or self._pending or size > INLINE_MAX_BYTES:
            return False
        now = self._clock.seconds()
        if now < self._inline_after:
            return False
        self._inline_after = now + self.inline_interval
        if self.inline_counter is not None:
            self.inline_counter.inc()
        return True

    def verify_many(self, items: list[Item]) -> Deferred[list[bool]]:
        """One verdict per (key, sig, msg), in order: a page of replicas costs one Deferred, not one each."""
        if self._executor is None or not items:
            return succeed(verify_all(items))
        return self._queue(list(items), True)

    def _queue(self, items: list[Item], many: bool) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self._pending.append((items, d, many))
        if self._inflight < self._max_inflight:
            self._dispatch()
        return d

    def _dispatch(self) -> None:
        assert self._executor is not None
        batch, self._pending = self._pending, []
        self._inflight += 1
        flat = [item for items, _, _ in batch for item in items]
        self._executor.run(verify_all, flat).addBoth(self._done, batch)

    def _done(self, result: list[bool] | Failure, batch: list[tuple[list[Item], Deferred[Any], bool]]) -> None:
        self._inflight -= 1
        at = 0
        for items, d, many in batch:
            if isinstance(result, Failure):
                d.errback(Unavailable(f"signatures cannot be verified now: {result.getErrorMessage()}"))
                continue
            verdicts = result[at : at + len(items)]
            at += len(items)
            d.callback(verdicts if many else verdicts[0])
        if self._pending and self._inflight < self._max_inflight:
            self._dispatch()
