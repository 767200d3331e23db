"""The bounded replay cache never lets a replay through, even when full."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from meshrelay.replay import OK, REPLAYED, STALE, ReplayCache


class ReplayCacheTests(SynchronousTestCase):
    def test_replay_within_window(self) -> None:
        """A key seen within the window is a replay; after the window it is forgotten."""
        cache = ReplayCache(window=600, max_entries=10)
        self.assertEqual(cache.add("n1", ts=1000, now=1000), OK)
        self.assertEqual(cache.add("n1", ts=1000, now=1599), REPLAYED)
        self.assertEqual(cache.check("n1", ts=1000, now=1600), OK)

    def test_check_does_not_record(self) -> None:
        """check alone leaves the cache unchanged."""
        cache = ReplayCache(window=600, max_entries=10)
        self.assertEqual(cache.check("n", ts=1, now=1), OK)
        self.assertEqual(len(cache), 0)

    def test_bounded_and_replay_proof_when_full(self) -> None:
        """When full the oldest is dropped and its ts becomes the watermark, so its replay is stale."""
        cache = ReplayCache(window=600, max_entries=3)
        for i in range(5):
            self.assertEqual(cache.add(f"n{i}", ts=1000 + i, now=1000 + i), OK)
        self.assertEqual(len(cache), 3)
        self.assertEqual(cache.add("n0", ts=1000, now=1005), STALE)
        self.assertEqual(cache.add("n1", ts=1001, now=1005), STALE)
        self.assertEqual(cache.add("n4", ts=1004, now=1005), REPLAYED)
        self.assertEqual(cache.add("n9", ts=1002, now=1005), OK)

    def test_expired_entries_are_purged(self) -> None:
        """Entries past the window are dropped as new ones arrive."""
        cache = ReplayCache(window=10, max_entries=100)
        for i in range(50):
            cache.add(i, ts=i, now=i)
        self.assertLessEqual(len(cache), 11)
        self.assertEqual(cache.watermark, -1)
