"""Nonce replay checks: the store's durable claim decides, a bounded cache only answers early.

Every poll, count and peer request carries a nonce.  :meth:`ReplayCache.use`
refuses it as ``replayed`` when this process saw it recently (no store trip);
otherwise the store's ``claim_nonce`` decides: it records ``(scope, nonce)``
durably and says whether it was new.  The claim is shared by every process on
the database and survives restarts, so a replay is refused whether or not the
cache still remembers it.

The cache holds at most ``max_entries`` keys.  When full, the oldest key is
forgotten and nothing else happens: eviction never refuses a request, so no
request (however its ``ts`` is chosen) can make another caller's fresh
request fail.  (An earlier design raised a "watermark" on eviction and refused
every ``ts`` below it as ``stale``; a flood stamped ``now + clock_skew`` moved
the watermark into the future and locked every other caller out.)  The time
window itself is checked before a nonce is used: the caller's ``ts`` must be
within ``clock_skew`` of the node's clock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable

from twisted.internet.defer import Deferred

from meshrelay.deferutil import shield

OK = "ok"
REPLAYED = "replayed"


class ReplayCache:
    def __init__(self, window: int, max_entries: int) -> None:
        self.window = window
        self.max_entries = max_entries
        #: key -> expiry time, in insertion (and so expiry) order
        self._entries: OrderedDict[Hashable, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def _expire(self, now: float) -> None:
        entries = self._entries
        while entries:
            key, expires = next(iter(entries.items()))
            if expires > now:
                break
            del entries[key]

    def check(self, key: Hashable, now: float) -> str:
        """``REPLAYED`` when ``key`` was recorded within the window; else ``OK`` (not recorded)."""
        expires = self._entries.get(key)
        if expires is not None and expires > now:
            return REPLAYED
        return OK

    def add(self, key: Hashable, now: float) -> None:
        """Remember ``key`` for ``window`` seconds; the oldest key is forgotten when full."""
        self._expire(now)
        entries = self._entries
        entries.pop(key, None)
        entries[key] = now + self.window
        while len(entries) > self.max_entries:
            entries.popitem(last=False)

    async def use(self, key: Hashable, now: Callable[[], float], claim: Callable[[], Deferred[bool]]) -> str:
        """Use up a nonce: ``REPLAYED`` if this cache or the store's ``claim()`` has seen it, else ``OK``.

        The store's claim (durable, shared by every process on the database)
        is the authority; this cache only saves it the replays it remembers.
        """
        if self.check(key, now()) != OK:
            return REPLAYED
        fresh = await shield(claim())
        # Remember it either way: a replay seen once is likely to come again.
        self.add(key, now())
        return OK if fresh else REPLAYED
