"""Where blocking work runs: a dedicated thread pool, or inline for tests.

The store's writer, its readers and the signature verifier each get an
executor.  In production that is a :class:`ThreadExecutor` (its own
``ThreadPool``; results come back on the reactor thread).  Tests inject
:class:`InlineExecutor`, which runs the work at once and returns an
already-fired Deferred, so a whole node runs synchronously under a ``Clock``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")


class Executor(Protocol):
    def run(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run ``fn(*args)`` and deliver its result on the reactor thread."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


class InlineExecutor:
    """Runs work immediately on the calling thread (tests, benchmarks of the core)."""

    def run(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        try:
            return succeed(fn(*args))
        except BaseException:
            return fail(Failure())

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


class ThreadExecutor:
    """Runs work on a private ``ThreadPool`` of ``threads`` threads."""

    def __init__(self, reactor: IReactorFromThreads, threads: int, name: str) -> None:
        self._reactor = reactor
        self.pool = ThreadPool(minthreads=threads, maxthreads=threads, name=name)
        self._started = False

    def run(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        return deferToThreadPool(self._reactor, self.pool, fn, *args)

    def start(self) -> None:
        if not self._started:
            self._started = True
            self.pool.start()

    def stop(self) -> None:
        if self._started:
            self._started = False
            self.pool.stop()
