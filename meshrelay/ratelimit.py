"""A bounded set of token buckets, one per key (a client's share key, a peer URL...).

Each key may make ``rate`` requests a second on average with bursts of up
to ``burst``.  At most ``max_keys`` buckets are kept; the least recently used
is forgotten first (a forgotten key starts again with a full bucket, which
only ever errs toward serving).  ``rate <= 0`` disables the limiter.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable

from twisted.internet.interfaces import IReactorTime


class RateLimiter:
    def __init__(self, rate: float, burst: float, clock: IReactorTime, max_keys: int = 100_000) -> None:
        self.rate = float(rate)
        self.burst = float(max(burst, 1))
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: OrderedDict[Hashable, list[float]] = OrderedDict()

    def reconfigure(self, rate: float, burst: float) -> None:
        """New rate and burst (a config reload); each bucket keeps its tokens, up to the new burst."""
        self.rate = float(rate)
        self.burst = float(max(burst, 1))
        for bucket in self._buckets.values():
            bucket[0] = min(bucket[0], self.burst)

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def _bucket(self, key: Hashable, now: float) -> list[float]:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = [self.burst, now]
            self._buckets[key] = bucket
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket[0] = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
            bucket[1] = now
        return bucket

    def allow(self, key: Hashable, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens from ``key``'s bucket; False when it has too few."""
        return self.allow_all((key,), cost)

    def allow_all(self, keys: tuple[Hashable, ...], cost: float = 1.0) -> bool:
        """Take ``cost`` tokens from each key's bucket if every one has enough; else take none, False."""
        if self.rate <= 0:
            return True
        now = self.clock.seconds()
        buckets = [self._bucket(key, now) for key in keys]
        if any(bucket[0] < cost for bucket in buckets):
            return False
        for bucket in buckets:
            bucket[0] -= cost
        return True

    def retry_after(self, cost: float = 1.0) -> int:
        """Whole seconds after which an empty bucket holds ``cost`` tokens again (a 429's ``Retry-After``)."""
        if self.rate <= 0:
            return 1
        return min(3600, max(1, math.ceil(cost / self.rate)))

    def __len__(self) -> int:
        return len(self._buckets)
