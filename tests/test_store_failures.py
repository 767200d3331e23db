"""Disk-full and read-only stores: clear 503s, nothing corrupted, recovery when space returns."""

from __future__ import annotations

import sqlite3
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import Identity, MemNode, dump_live


class StoreFailureTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.n = MemNode(self.mktemp())
        self.addCleanup(self.n.stop)
        self.alice, self.bob = Identity(), Identity()

    def now(self) -> int:
        return int(self.n.clock.seconds())

    def send(self, text: bytes) -> tuple[int, Any]:
        return self.n.send(self.alice.envelope(self.bob, text, ts=self.now()))

    def fill_disk(self) -> None:
        conn = self.n.store._wconn  # type: ignore[attr-defined]
        # A new store's migrations leave free pages (schema 7 drops two indexes it made): without
        # them the file's page count is all there is.
        conn.execute("VACUUM")
        (pages,) = conn.execute("PRAGMA page_count").fetchone()
        conn.execute(f"PRAGMA max_page_count = {pages}")

    def test_disk_full_answers_503_and_keeps_the_store(self) -> None:
        """When the disk is full deposits answer 503 unavailable; stored mail is intact and served."""
        ok = self.alice.envelope(self.bob, b"before", ts=self.now())
        self.assertEqual(self.n.send(ok)[0], 200)
        self.fill_disk()
        failures = [self.send(b"x" * 4000 + bytes([i])) for i in range(40)]
        refused = [body for status, body in failures if status != 200]
        self.assertTrue(refused, "the full disk never refused a write")
        for status, body in failures:
            if status != 200:
                self.assertEqual((status, body["error"]), (503, "unavailable"))
        self.assertGreaterEqual(self.n.metrics.sample("meshrelay_store_errors_total"), 1)
        # Reads still work and see exactly what was committed.
        status, body = self.n.poll(self.bob)
        self.assertEqual(status, 200)
        polled = {m["msg_id"] for m in body["messages"]}
        self.assertIn(ok["msg_id"], polled)
        stats = self.n.store.stats()
        self.assertEqual(stats.envelopes, len(dump_live(self.n.store, self.now())["envelopes"]))
        self.assertEqual(self.n.store._wconn.execute("PRAGMA integrity_check").fetchone()[0], "ok")  # type: ignore[attr-defined]
        # Space comes back: deposits work again.
        self.n.store._wconn.execute("PRAGMA max_page_count = 1073741823")  # type: ignore[attr-defined]
        self.assertEqual(self.send(b"after")[0], 200)

    def test_read_only_store_answers_503_and_polls_still_work(self) -> None:
        """A store that became read-only refuses writes with 503 and still serves polls."""
        env = self.alice.envelope(self.bob, b"kept", ts=self.now())
        self.assertEqual(self.n.send(env)[0], 200)
        store = self.n.store
        writable = store._wconn  # type: ignore[attr-defined]
        ro = sqlite3.connect(f"file:{store.path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)  # type: ignore[attr-defined]
        store._core.conn = ro  # type: ignore[attr-defined]
        self.addCleanup(writable.close)
        status, body = self.send(b"refused")
        self.assertEqual((status, body["error"]), (503, "unavailable"))
        # A poll must record its nonce, which cannot be written: 503 too, never 500.
        status, body = self.n.poll(self.bob)
        self.assertEqual((status, body["error"]), (503, "unavailable"))
        store._core.conn = writable  # type: ignore[attr-defined]
        ro.close()
        status, body = self.n.poll(self.bob)
        self.assertEqual([m["msg_id"] for m in body["messages"]], [env["msg_id"]])

    def test_failed_operation_does_not_fail_its_batch_neighbours(self) -> None:
        """One operation raising inside a group commit rolls back alone; the others commit."""
        from meshrelay import envelope as E

        store = self.n.store
        good = E.parse_envelope(self.alice.envelope(self.bob, b"good", ts=self.now()), 8192)

        def boom(conn: sqlite3.Connection, st: Any) -> None:
            conn.execute("INSERT INTO meta (key, value) VALUES ('half', 'written')")
            raise sqlite3.OperationalError("simulated failure")

        store._inflight = store._depth  # hold the writer so both ops land in one batch  # type: ignore[attr-defined]
        d1 = store._write(boom)  # type: ignore[attr-defined]
        d2 = store.add_envelope(good, self.now())
        store._inflight = 0  # type: ignore[attr-defined]
        store._flush()  # type: ignore[attr-defined]
        self.failureResultOf(d1)
        self.assertEqual(self.successResultOf(d2).status, "accepted")
        self.assertIsNone(store._wconn.execute("SELECT value FROM meta WHERE key = 'half'").fetchone())  # type: ignore[attr-defined]
        self.assertEqual(store.stats().envelopes, 1)

    def test_disk_full_in_a_batch_commits_nothing_and_the_store_recovers(self) -> None:
        """When SQLite aborts the transaction (disk full) mid-batch, the batch fails whole and nothing is half-kept."""
        from meshrelay import envelope as E

        store = self.n.store
        before = E.parse_envelope(self.alice.envelope(self.bob, b"before", ts=self.now()), 8192)
        self.assertEqual(self.successResultOf(store.add_envelope(before, self.now())).status, "accepted")
        self.fill_disk()
        carol = Identity()
        big = E.parse_envelope(self.alice.envelope(self.bob, b"x" * 6000, ts=self.now()), 8192)
        small = E.parse_envelope(carol.envelope(self.bob, b"s", ts=self.now()), 8192)
        store._inflight = store._depth  # hold the writer so both ops land in one batch  # type: ignore[attr-defined]
        d1 = store.add_envelope(big, self.now())
        d2 = store.add_envelope(small, self.now())
        store._inflight = 0  # type: ignore[attr-defined]
        store._flush()  # type: ignore[attr-defined]
        self.failureResultOf(d1)
        self.failureResultOf(d2)
        conn = store._wconn  # type: ignore[attr-defined]
        self.assertEqual(conn.execute("SELECT count(*) FROM envelopes").fetchone()[0], 1)
        self.assertEqual(store.stats().envelopes, 1)
        conn.execute("PRAGMA max_page_count = 1073741823")
        again = self.successResultOf(store.add_envelope(small, self.now()))
        self.assertEqual(again.status, "accepted")
        self.assertEqual(conn.execute("PRAGMA integrity_check").fetchone()[0], "ok")
