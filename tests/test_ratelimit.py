"""Token buckets per key, bounded in the number of keys."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from meshrelay.ratelimit import RateLimiter


class RateLimiterTests(SynchronousTestCase):
    def test_burst_then_rate(self) -> None:
        """A key gets its burst at once, then rate tokens a second."""
        clock = Clock()
        rl = RateLimiter(rate=10, burst=5, clock=clock)
        self.assertEqual([rl.allow("a") for _ in range(6)], [True] * 5 + [False])
        clock.advance(0.1)
        self.assertEqual([rl.allow("a"), rl.allow("a")], [True, False])
        self.assertTrue(rl.allow("b"))

    def test_bounded_keys(self) -> None:
        """At most max_keys buckets are kept."""
        rl = RateLimiter(rate=1, burst=1, clock=Clock(), max_keys=10)
        for i in range(100):
            rl.allow(i)
        self.assertEqual(len(rl), 10)

    def test_disabled(self) -> None:
        """rate 0 allows everything."""
        rl = RateLimiter(rate=0, burst=1, clock=Clock())
        self.assertTrue(all(rl.allow("a") for _ in range(1000)))
