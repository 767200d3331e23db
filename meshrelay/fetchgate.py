"""Bounds on a poll's ``fetch_remote``: what one client can make this node pull from its peers.

Without bounds each poll with ``fetch_remote`` pulls the whole mailbox from
every peer, so a client polling a mailbox that it (or anyone) filled makes the
node fetch megabytes per poll, slows every other client, and spends the peer
request budget that replication needs.  :class:`RemoteFetchGate` sits between
the poll and the replication side's ``fetch(mailbox) -> Deferred``:

- **coalesced per mailbox**: while a fetch of a mailbox is in flight, another
  poll of it waits for that same fetch (its outcome is shared) instead of
  starting one;
- **a minimum interval per mailbox**: a mailbox fetched less than
  ``min_interval`` seconds ago is not fetched again; the poll is served from
  local data (sync brings the rest);
- **a cap on concurrent fetches**: with ``max_concurrent`` fetches in flight,
  a poll of another mailbox is served from local data at once, not refused;
- **a timeout**: a fetch still running after ``timeout`` seconds is cancelled.

:meth:`RemoteFetchGate.run` never fails: the poll goes on either way.  A poll
that gives up (its client went away) stops waiting, but the shared fetch runs
on for the others.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

#: outcomes of :meth:`RemoteFetchGate.run` (the ``outcome`` label of the metric)
STARTED = "started"
JOINED = "joined"
RECENT = "skipped_recent"
BUSY = "skipped_busy"


class RemoteFetchGate:
    """Coalesces, spaces out and caps the remote fetches that polls ask for."""

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        fetch: Callable[[str], Deferred[Any]],
        max_concurrent: int = 8,
        min_interval: float = 5.0,
        timeout: float | None = None,
        on_outcome: Callable[[str], None] | None = None,
        max_remembered: int = 100_000,
        log_agg: Any = None,
    ) -> None:
        #: a meshrelay.logs.Aggregator for the per-fetch failure line (one per minute), or None
        self.log_agg = log_agg
        self.clock = clock
        self.fetch = fetch
        self.max_concurrent = max_concurrent
        self.min_interval = min_interval
        self.timeout = timeout
        self.on_outcome = on_outcome
        self.max_remembered = max_remembered
        #: mailbox -> the polls waiting on its fetch in flight
        self._inflight: dict[str, list[Deferred[None]]] = {}
        #: mailbox -> when its last fetch ended, oldest first
        self._done_at: OrderedDict[str, float] = OrderedDict()

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def _count(self, outcome: str) -> None:
        if self.on_outcome is not None:
            self.on_outcome(outcome)

    def _recent(self, mailbox: str, now: float) -> bool:
        # Forget the fetches older than the interval (kept in order of their end).
        done = self._done_at
        while done:
            oldest_at = next(iter(done.values()))
            if now - oldest_at < self.min_interval and len(done) <= self.max_remembered:
                break
            done.popitem(last=False)
        last = done.get(mailbox)
        return last is not None and now - last < self.min_interval

    def run(self, mailbox: str) -> Deferred[None]:
        """Fetch ``mailbox`` from the peers within the bounds; fires (never fails) when the poll may go on."""
        waiters = self._inflight.get(mailbox)
        if waiters is None:
            if self._recent(mailbox, self.clock.seconds()):
                self._count(RECENT)
                return succeed(None)
            if len(self._inflight) >= self.max_concurrent:
                self._count(BUSY)
                return succeed(None)
            waiters = self._inflight[mailbox] = []
            self._count(STARTED)
            self._start(mailbox)
            if mailbox not in self._inflight:
                # The fetch finished at once (nothing to wait for).
                return succeed(None)
        else:
            self._count(JOINED)
        d: Deferred[None] = Deferred()
        waiters.append(d)
        return d

    def _start(self, mailbox: str) -> None:
        try:
            d = self.fetch(mailbox)
        except Exception:
            d = Deferred()
            d.errback(Failure())
        if self.timeout is not None:
            d.addTimeout(self.timeout, self.clock)
        d.addBoth(self._finished, mailbox)

    def _finished(self, result: Any, mailbox: str) -> None:
        if isinstance(result, Failure):
            # Best effort: whatever arrived in time is served; the rest comes by sync.
            fmt = "fetch_remote for a mailbox ended early: {err}"
            if self.log_agg is not None:
                self.log_agg.emit(self.log, "fetch_remote", fmt, LogLevel.debug, err=result.value)
            else:
                self.log.debug(fmt, err=result.value)
        self._done_at[mailbox] = self.clock.seconds()
        self._done_at.move_to_end(mailbox)
        for waiter in self._inflight.pop(mailbox, []):
            if not waiter.called:  # a poll that gave up has been cancelled already
                waiter.callback(None)
