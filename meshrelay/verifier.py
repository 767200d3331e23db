"""Ed25519 verification, batched onto worker threads.

libsodium (:func:`~meshrelay.envelope.verify_signature`) releases the GIL
while it verifies, so verification on a worker thread runs beside the reactor
on the second core.  Requests that
arrive while ``threads`` batches are in flight wait and go together in the
next batch, so the thread hand-off is paid once per batch, not per request.
With no executor, verification runs inline (tests, ``verify_threads = 0``).
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from meshrelay.envelope import verify_signature
from meshrelay.executor import Executor

Item = tuple[bytes, bytes, bytes]


def _verify_all(items: list[Item]) -> list[bool]:
    return [verify_signature(key, sig, msg) for key, sig, msg in items]


class Verifier:
    def __init__(self, executor: Executor | None = None, max_inflight: int = 1) -> None:
        self._executor = executor
        self._max_inflight = max(1, max_inflight)
        self._inflight = 0
        self._pending: list[tuple[Item, Deferred[bool]]] = []

    def start(self) -> None:
        if self._executor is not None:
            self._executor.start()

    def stop(self) -> None:
        if self._executor is not None:
            self._executor.stop()

    def verify(self, key: bytes, sig: bytes, msg: bytes) -> Deferred[bool]:
        """Fire with True when ``sig`` is ``key``'s signature over ``msg``."""
        if self._executor is None:
            return succeed(verify_signature(key, sig, msg))
        d: Deferred[bool] = Deferred()
        self._pending.append(((key, sig, msg), d))
        if self._inflight < self._max_inflight:
            self._dispatch()
        return d

    def _dispatch(self) -> None:
        assert self._executor is not None
        batch, self._pending = self._pending, []
        self._inflight += 1
        self._executor.run(_verify_all, [item for item, _ in batch]).addBoth(self._done, batch)

    def _done(self, result: list[bool] | Failure, batch: list[tuple[Item, Deferred[bool]]]) -> None:
        self._inflight -= 1
        for i, (_, d) in enumerate(batch):
            # A verification that could not run counts as not verified.
            d.callback(False if isinstance(result, Failure) else result[i])
        if self._pending and self._inflight < self._max_inflight:
            self._dispatch()
