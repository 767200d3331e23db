"""A bounded nonce replay cache that never lets a replay through.

Entries live for ``window`` seconds after they are first seen.  When the
cache is full the oldest entry is dropped and the cache's *watermark* rises to
that entry's timestamp: from then on a request whose ``ts`` is at or below the
watermark is refused as ``stale``.  A replay of a dropped nonce carries the
dropped timestamp, so it is refused too; under a flood the cost is that old
(but still in-skew) timestamps are refused, never that a replay passes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable

from twisted.internet.defer import Deferred

from meshrelay.deferutil import shield

OK = "ok"
REPLAYED = "replayed"
STALE = "stale"


class ReplayCache:
    def __init__(self, window: int, max_entries: int) -> None:
        self.window = window
        self.max_entries = max_entries
        #: key -> (expires, ts), in insertion (and so expiry) order
        self._entries: OrderedDict[Hashable, tuple[float, int]] = OrderedDict()
        self.watermark = -1

    def __len__(self) -> int:
        return len(self._entries)

    def _expire(self, now: float) -> None:
        entries = self._entries
        while entries:
            key, (expires, _) = next(iter(entries.items()))
            if expires > now:
                break
            del entries[key]

    def check(self, key: Hashable, ts: int, now: float) -> str:
        """Return ``REPLAYED`` or ``STALE`` for a refused key; else ``OK`` (not recorded)."""
        if ts <= self.watermark:
            return STALE
        entry = self._entries.get(key)
        if entry is not None and entry[0] > now:
            return REPLAYED
        return OK

    def add(self, key: Hashable, ts: int, now: float) -> str:
        """Check ``key`` and, when it passes, record it.  Returns OK/REPLAYED/STALE."""
        verdict = self.check(key, ts, now)
        if verdict != OK:
            return verdict
        self._expire(now)
        entries = self._entries
        entries.pop(key, None)
        entries[key] = (now + self.window, ts)
        while len(entries) > self.max_entries:
            _, (_, dropped_ts) = entries.popitem(last=False)
            if dropped_ts > self.watermark:
                self.watermark = dropped_ts
        return OK

    async def use(self, key: Hashable, ts: int, now: Callable[[], float], claim: Callable[[], Deferred[bool]]) -> str:
        """Use up a nonce: this cache first, then ``claim()`` in the store, then record it here.

        The store's claim (durable, shared by every process on the database)
        is what makes a replay fail across restarts and processes; this
        cache answers most replays without it.  Returns OK/REPLAYED/STALE.
        """
        verdict = self.check(key, ts, now())
        if verdict != OK:
            return verdict
        fresh = await shield(claim())
        verdict = self.add(key, ts, now())
        return verdict if fresh else REPLAYED
