"""Nonces: the bounded cache only answers early; the store's durable claim decides; no lock-out."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase

from meshrelay.replay import OK, REPLAYED, ReplayCache
from tests.helpers import Identity, MemNode

POLL = "/api/mesh/dm/poll"
COUNT = "/api/mesh/dm/count"


class ReplayCacheTests(SynchronousTestCase):
    def use(self, cache: ReplayCache, key: str, now: float, claimed: set[str]) -> str:
        def claim() -> Deferred[bool]:
            fresh = key not in claimed
            claimed.add(key)
            return succeed(fresh)

        out: list[str] = []
        Deferred.fromCoroutine(cache.use(key, lambda: now, claim)).addCallback(out.append)
        return out[0]

    def test_replay_within_window(self) -> None:
        """A key recorded within the window is a replay; after the window the cache forgets it."""
        cache = ReplayCache(window=600, max_entries=10)
        self.assertEqual(cache.check("n1", now=1000), OK)
        cache.add("n1", now=1000)
        self.assertEqual(cache.check("n1", now=1599), REPLAYED)
        self.assertEqual(cache.check("n1", now=1600), OK)

    def test_check_does_not_record(self) -> None:
        """check alone leaves the cache unchanged."""
        cache = ReplayCache(window=600, max_entries=10)
        self.assertEqual(cache.check("n", now=1), OK)
        self.assertEqual(len(cache), 0)

    def test_full_cache_forgets_the_oldest_and_refuses_nothing_new(self) -> None:
        """When full the oldest key is forgotten; no fresh key is ever refused because of the flood."""
        cache = ReplayCache(window=600, max_entries=3)
        claimed: set[str] = set()
        for i in range(50):
            self.assertEqual(self.use(cache, f"n{i}", 1000, claimed), OK)
        self.assertEqual(len(cache), 3)
        self.assertEqual(self.use(cache, "fresh", 1000, claimed), OK)

    def test_evicted_replay_is_refused_by_the_durable_claim(self) -> None:
        """A replay the cache forgot is still refused: the claim says it was used."""
        cache = ReplayCache(window=600, max_entries=3)
        claimed: set[str] = set()
        self.assertEqual(self.use(cache, "victim", 1000, claimed), OK)
        for i in range(10):
            self.use(cache, f"n{i}", 1000, claimed)
        self.assertEqual(cache.check("victim", 1000), OK)  # forgotten here...
        self.assertEqual(self.use(cache, "victim", 1000, claimed), REPLAYED)  # ...refused by the store

    def test_expired_entries_are_purged(self) -> None:
        """Entries past the window are dropped as new ones arrive."""
        cache = ReplayCache(window=10, max_entries=100)
        for i in range(50):
            cache.add(i, now=i)
        self.assertLessEqual(len(cache), 11)


class PollNonceLockoutTests(SynchronousTestCase):
    """Issue 10 item 2, clients: a flood of future-stamped polls cannot lock other mailboxes out."""

    def setUp(self) -> None:
        self.dir = self.mktemp()
        self.mem = MemNode(self.dir, max_nonces=100)
        self.addCleanup(lambda: self.mem.stop())

    def now(self) -> int:
        return int(self.mem.clock.seconds())

    def flood(self, n: int = 150) -> None:
        attacker = Identity()
        skew = self.mem.config.limits.clock_skew
        for _ in range(n):
            status, body = self.mem.request("POST", COUNT, attacker.signed(ts=self.now() + skew))
            self.assertEqual(status, 200, body)

    def test_future_stamped_flood_does_not_lock_out_other_mailboxes(self) -> None:
        """After 1.5x max_nonces counts stamped now+clock_skew, another mailbox's poll and count still pass."""
        self.flood()
        victim = Identity()
        self.assertEqual(self.mem.poll(victim)[0], 200)
        status, body = self.mem.request("POST", COUNT, victim.signed(ts=self.now() - 10))
        self.assertEqual(status, 200, body)

    def test_replay_is_refused_after_the_cache_forgot_it(self) -> None:
        """A poll replayed after the in-memory cache evicted its nonce is refused by the store's claim."""
        victim = Identity()
        body = victim.signed(ts=self.now())
        self.assertEqual(self.mem.request("POST", POLL, body)[0], 200)
        self.flood()
        self.assertNotIn((victim.pub, body["nonce"]), self.mem.relay.poll_nonces._entries)
        status, answer = self.mem.request("POST", POLL, body)
        self.assertEqual((status, answer["error"]), (403, "replayed"))

    def test_replay_is_refused_after_a_restart(self) -> None:
        """A poll replayed to a restarted node (empty cache) is refused by the store's claim."""
        victim = Identity()
        body = victim.signed(ts=self.now())
        self.assertEqual(self.mem.request("POST", POLL, body)[0], 200)
        clock = self.mem.clock
        self.mem.stop()
        self.mem = MemNode(self.dir, clock=clock, max_nonces=100)
        status, answer = self.mem.request("POST", POLL, body)
        self.assertEqual((status, answer["error"]), (403, "replayed"))

    def test_durable_claim_outlives_the_time_window_and_no_longer(self) -> None:
        """A claim is swept only once its ts is out of skew, so a replay is stale, never accepted."""
        victim = Identity()
        skew = self.mem.config.limits.clock_skew
        body = victim.signed(ts=self.now() + skew)
        self.assertEqual(self.mem.request("POST", POLL, body)[0], 200)
        self.mem.clock.advance(2 * skew)  # the last second the ts is in skew
        self.mem.relay.poll_nonces._entries.clear()
        self.assertEqual(self.swept_nonces(), 0)
        status, answer = self.mem.request("POST", POLL, body)
        self.assertEqual((status, answer["error"]), (403, "replayed"))
        self.mem.clock.advance(1)
        self.assertEqual(self.swept_nonces(), 1)
        status, answer = self.mem.request("POST", POLL, body)
        self.assertEqual((status, answer["error"]), (403, "stale"))

    def swept_nonces(self) -> int:
        out: list[Any] = []
        self.mem.relay.sweep().addBoth(out.append)
        return int(out[0].nonces)
