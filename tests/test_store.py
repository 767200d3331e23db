"""The store behaviour suite, run against every backend.

:class:`StoreBehaviour` holds the tests; each backend gets one subclass that
only says how to open a store (SQLite always; PostgreSQL when
``MESHRELAY_TEST_PG_DSN`` is set, see ``tests/pgtest.py``).  The tests drive
the store synchronously: an inline (or hand-released) writer runs each batch
on the test thread, and every Deferred has fired by the time it is checked.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from meshrelay import envelope as E
from meshrelay.executor import Executor, InlineExecutor
from meshrelay.metrics import Metrics
from meshrelay.store import migrations, sqlite_core
from meshrelay.store import sqlite as sqlite_store
from meshrelay.store.base import (
    ACCEPTED,
    DUPLICATE,
    MAILBOX_FULL,
    SENDER_CAP,
    STORAGE_FULL,
    STRANGER_FULL,
    AckResult,
    AddResult,
    Bodies,
    Caps,
    Cursor,
    Refused,
    Store,
    StoreError,
    junk_budget,
    tombstone_key,
)
from meshrelay.store.emptiness import EmptyMailboxes
from meshrelay.store.sqlite import DB_NAME, SQLiteStore
from tests.helpers import T0, Identity, dump_live
from tests.pgtest import create_schema, requires_pg

MAX_MSG = 8192
MAX_TTL = 259200
SKEW = 300


def make_env(
    sender: Identity, mailbox: Identity | str, text: bytes = b"hello", ts: int = T0, ttl: int = 3600
) -> E.Envelope:
    return E.parse_envelope(sender.envelope(mailbox, text, ts=ts, ttl=ttl), MAX_MSG)


def make_ack(owner: Identity, ids: list[str], ts: int = T0) -> E.SignedAck:
    return E.parse_signed_ack(owner.signed(ts=ts, ack=ids))


def ack_size(ack: E.SignedAck) -> int:
    """Bytes a stored signed ack is accounted for (its canonical JSON)."""
    return len(E.dumps_json(ack.to_json()))


def tomb(ack: E.SignedAck) -> int:
    return E.tombstone_expiry(ack.ts, MAX_TTL, SKEW)


def schema_statements(dialect: str, version: int) -> list[tuple[str, tuple[Any, ...]]]:
    """The statements (``?`` placeholders) that make an empty store at schema ``version``, as a meshrelay of then did."""
    statements: list[tuple[str, tuple[Any, ...]]] = [
        ("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)", ())
    ]
    for m in migrations.MIGRATIONS[:version]:
        statements += [(stmt, ()) for stmt in m.render(dialect)]
        statements += [
            ("INSERT INTO meta (key, value) VALUES (?, ?)", kv) for kv in migrations.seed_meta(m.version).items()
        ]
    return statements + [("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(version),))]


class ManualExecutor:
    """A writer that holds each batch until :meth:`release`, so a test can queue several operations into one."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

    def run(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.jobs.append((fn, args, d))
        return d

    def release(self) -> int:
        """Run the batches queued so far (a batch queued meanwhile waits for the next call)."""
        jobs, self.jobs = self.jobs, []
        for fn, args, d in jobs:
            try:
                result = fn(*args)
            except BaseException:
                d.errback(Failure())
            else:
                d.callback(result)
        return len(jobs)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


class StoreBehaviour:
    """Behaviour every :class:`~meshrelay.store.base.Store` backend must show."""

    #: does acquire_lease arbitrate between holders (a store shared by processes)?
    shared = False
    #: the SQL dialect of migrations.Migration.render
    dialect = ""

    @property
    def tombstone_bytes(self) -> int:
        """Bytes a tombstone counts for in this backend's stored total."""
        return migrations.tombstone_bytes(migrations.LATEST_VERSION, self.dialect)

    @property
    def first_junk_rows(self) -> int:
        """Tombstone rows a mailbox's first junk ack writes per id: none on SQLite (schema 8), one on PostgreSQL."""
        return 0 if self.dialect == "sqlite" else 1

    # supplied by the TestCase
    successResultOf: Callable[..., Any]
    failureResultOf: Callable[..., Any]
    addCleanup: Callable[..., Any]
    assertEqual: Callable[..., Any]
    assertTrue: Callable[..., Any]
    assertFalse: Callable[..., Any]
    assertIsNone: Callable[..., Any]
    assertGreater: Callable[..., Any]
    assertIn: Callable[..., Any]
    assertNotIn: Callable[..., Any]

    def open_store(self, caps: Caps, writer: Executor | None, metrics: Metrics | None) -> Store:
        raise NotImplementedError

    def make_store(
        self, caps: Caps | None = None, writer: Executor | None = None, metrics: Metrics | None = None
    ) -> Any:
        store = self.open_store(caps or Caps(), writer, metrics)
        store.start()
        self.addCleanup(lambda: store.close())
        return store

    def reopen(self, store: Any, caps: Caps | None = None) -> Any:
        """Close ``store`` and open the same data again (a restart)."""
        self.successResultOf(store.close())
        return self.make_store(caps)

    def add(self, store: Store, env: E.Envelope, now: int = T0) -> AddResult:
        return self.successResultOf(store.add_envelope(env, now))

    def ack(self, store: Store, ack: E.SignedAck) -> AckResult:
        return self.successResultOf(store.apply_ack(ack, tomb(ack)))

    def fetch_ids(self, store: Store, mailbox: Identity, now: int = T0, limit: int = 100) -> list[str]:
        bodies, _ = self.successResultOf(store.fetch(mailbox.pub, now, limit))
        return [E.loads_json(b.encode())["msg_id"] for b in bodies]

    # ------------------------------------------------------------------ deposits and dedup

    def test_add_then_fetch_in_arrival_order(self) -> None:
        """Stored envelopes come back in arrival order, byte for byte, with growing seq."""
        store = self.make_store()
        bob, alice = Identity(), Identity()
        envs = [make_env(alice, bob, b"m%d" % i) for i in range(3)]
        seqs = [self.add(store, e).seq for e in envs]
        self.assertEqual(seqs, sorted(seqs))
        self.assertEqual(len(set(seqs)), 3)
        bodies, more = self.successResultOf(store.fetch(bob.pub, T0, 10))
        self.assertEqual(bodies, [e.raw for e in envs])
        self.assertFalse(more)
        self.assertEqual(self.successResultOf(store.count(bob.pub, T0)), 3)

    def test_fetch_limit_reports_has_more(self) -> None:
        """fetch returns at most limit envelopes and says whether more are pending."""
        store = self.make_store()
        bob, alice = Identity(), Identity()
        for i in range(5):
            self.add(store, make_env(alice, bob, b"%d" % i))
        bodies, more = self.successResultOf(store.fetch(bob.pub, T0, 2))
        self.assertEqual((len(bodies), more), (2, True))
        bodies, more = self.successResultOf(store.fetch(bob.pub, T0, 5))
        self.assertEqual((len(bodies), more), (5, False))

    def test_duplicate_is_reported_and_changes_nothing(self) -> None:
        """Adding a stored msg_id again answers duplicate, takes no seq and stores nothing."""
        store = self.make_store()
        bob, alice = Identity(), Identity()
        env = make_env(alice, bob)
        first = self.add(store, env)
        self.assertEqual(first.status, ACCEPTED)
        self.assertEqual(self.add(store, env), AddResult(DUPLICATE))
        self.assertEqual(store.stats().envelopes, 1)
        later = self.add(store, make_env(alice, bob, b"next"))
        self.assertEqual(later.seq, first.seq + 1)

    def test_expired_envelopes_are_not_served(self) -> None:
        """An envelope past ts + ttl is neither fetched, counted nor in the feed."""
        store = self.make_store()
        bob, alice = Identity(), Identity()
        self.add(store, make_env(alice, bob, ttl=60))
        self.assertEqual(self.successResultOf(store.count(bob.pub, T0 + 60)), 0)
        self.assertEqual(self.fetch_ids(store, bob, now=T0 + 60), [])
        self.assertEqual(self.successResultOf(store.changes(0, 10, T0 + 60)).items, [])

    # ------------------------------------------------------------------ acks and tombstones

    def test_ack_deletes_and_tombstones(self) -> None:
        """An ack deletes the listed envelopes of its mailbox; a later copy is a duplicate."""
        store = self.make_store()
        bob, alice = Identity(), Identity()
        e1, e2 = make_env(alice, bob, b"1"), make_env(alice, bob, b"2")
        self.add(store, e1)
        self.add(store, e2)
        ack = make_ack(bob, [e1.msg_id, "0" * 64])
        result = self.ack(store, ack)
        self.assertEqual(result.deleted, (e1.msg_id,))
        self.assertTrue(result.new)
        self.assertEqual(self.fetch_ids(store, bob), [e2.msg_id])
        self.assertEqual(self.add(store, e1).status, DUPLICATE)
        self.assertEqual(store.stats().envelopes, 1)
        # two tombstones and the signed ack are storage too
        self.assertEqual(store.stats().bytes, len(e2.raw) + 2 * self.tombstone_bytes + ack_size(ack))

    def test_tombstone_before_envelope_blocks_it(self) -> None:
        """An ack that arrives before its envelope still stops it (a late replica)."""
        store = self.make_store()
        bob, alice = Identity(), Identity()
        env = make_env(alice, bob)
        self.assertEqual(self.ack(store, make_ack(bob, [env.msg_id])).deleted, ())
        self.assertEqual(self.add(store, env), AddResult(DUPLICATE))
        self.assertEqual(self.fetch_ids(store, bob), [])

    def test_ack_by_another_mailbox_deletes_and_blocks_nothing(self) -> None:
        """Acking a msg_id of another mailbox deletes nothing and does not stop that envelope."""
        store = self.make_store()
        bob, mallory, alice = Identity(), Identity(), Identity()
        stored = make_env(alice, bob, b"stored")
        later = make_env(alice, bob, b"later")
        self.add(store, stored)
        result = self.ack(store, make_ack(mallory, [stored.msg_id, later.msg_id]))
        self.assertEqual(result.deleted, ())
        self.assertEqual(self.add(store, later).status, ACCEPTED)
        self.assertEqual(self.fetch_ids(store, bob), [stored.msg_id, later.msg_id])

    def test_repeated_signed_ack_is_not_new(self) -> None:
        """The same signed ack (mailbox, nonce) applied twice is recorded once."""
        store = self.make_store()
        bob, alice = Identity(), Identity()
        env = make_env(alice, bob)
        self.add(store, env)
        ack = make_ack(bob, [env.msg_id])
        first = self.ack(store, ack)
        again = self.ack(store, ack)
        self.assertTrue(first.new)
        self.assertEqual(again, AckResult(deleted=(), new=False))
        acks = [i for i in self.successResultOf(store.changes(0, 10, T0)).items if i.kind == "ack"]
        self.assertEqual([i.seq for i in acks], [first.seq])

    # ------------------------------------------------------------------ caps

    def test_sender_cap(self) -> None:
        """A sender may have at most per_sender_pending envelopes pending in one mailbox."""
        store = self.make_store(Caps(per_sender_pending=2))
        bob, carol, alice, dave = Identity(), Identity(), Identity(), Identity()
        self.add(store, make_env(alice, bob, b"1"))
        self.add(store, make_env(alice, bob, b"2"))
        self.assertEqual(self.add(store, make_env(alice, bob, b"3")), AddResult(SENDER_CAP, pending=2, limit=2))
        # other senders and other mailboxes are not affected
        self.assertEqual(self.add(store, make_env(dave, bob, b"4")).status, ACCEPTED)
        self.assertEqual(self.add(store, make_env(alice, carol, b"5")).status, ACCEPTED)

    def test_sender_cap_frees_on_ack_and_expiry(self) -> None:
        """Acked or expired envelopes no longer count toward the sender cap."""
        store = self.make_store(Caps(per_sender_pending=2))
        bob, alice = Identity(), Identity()
        e1 = make_env(alice, bob, b"1", ttl=60)
        self.add(store, e1)
        e2 = make_env(alice, bob, b"2")
        self.add(store, e2)
        self.ack(store, make_ack(bob, [e2.msg_id]))
        self.assertEqual(self.add(store, make_env(alice, bob, b"3")).status, ACCEPTED)
        self.assertEqual(self.add(store, make_env(alice, bob, b"4")).status, SENDER_CAP)
        self.assertEqual(self.add(store, make_env(alice, bob, b"5", ts=T0 + 60), now=T0 + 60).status, ACCEPTED)

    def test_mailbox_cap(self) -> None:
        """A mailbox holds at most per_mailbox_pending envelopes, whoever sent them."""
        store = self.make_store(Caps(per_mailbox_pending=3))
        bob = Identity()
        for i in range(3):
            self.assertEqual(self.add(store, make_env(Identity(), bob, b"%d" % i)).status, ACCEPTED)
        full = self.add(store, make_env(Identity(), bob, b"x"))
        self.assertEqual((full.status, full.limit), (MAILBOX_FULL, 3))
        self.assertEqual(self.add(store, make_env(Identity(), Identity(), b"y")).status, ACCEPTED)

    def test_storage_cap(self) -> None:
        """Deposits that would pass max_stored_bytes are refused until acks free space."""
        bob, alice = Identity(), Identity()
        e1 = make_env(alice, bob, b"1" * 1000)
        ack = make_ack(bob, [e1.msg_id])
        # room for two envelopes, and for the tombstone and signed ack an ack leaves in place of one
        store = self.make_store(Caps(max_stored_bytes=2 * len(e1.raw) + self.tombstone_bytes + ack_size(ack) + 10))
        self.add(store, e1)
        self.add(store, make_env(alice, bob, b"2" * 1000))
        self.assertEqual(self.add(store, make_env(alice, bob, b"3" * 1000)).status, STORAGE_FULL)
        self.assertEqual(store.stats().envelopes, 2)
        self.assertTrue(self.ack(store, ack).stored)
        self.assertEqual(self.add(store, make_env(alice, bob, b"3" * 1000)).status, ACCEPTED)

    # ------------------------------------------------------------------ seq and the feed

    def test_seq_never_reused_after_deleting_the_highest(self) -> None:
        """Deleting the newest row (or restarting) never hands its seq out again."""
        store = self.make_store()
        bob, alice = Identity(), Identity()
        top = make_env(alice, bob, b"top")
        self.add(store, make_env(alice, bob, b"low"))
        s_top = self.add(store, top).seq
        s_ack = self.ack(store, make_ack(bob, [top.msg_id])).seq
        self.assertGreater(s_ack, s_top)
        store = self.reopen(store)
        swept = make_env(alice, bob, b"expires", ttl=60)
        s_swept = self.add(store, swept).seq
        self.assertGreater(s_swept, s_ack)
        self.successResultOf(store.sweep(T0 + 100_000_000))
        store = self.reopen(store)
        self.assertGreater(self.add(store, make_env(alice, bob, b"after", ts=T0), now=T0).seq, s_swept)

    def test_changes_pages_in_seq_order(self) -> None:
        """changes pages through envelopes and acks by seq, with next and more."""
        store = self.make_store()
        bob, alice = Identity(), Identity()
        envs = [make_env(alice, bob, b"%d" % i) for i in range(5)]
        for e in envs:
            self.add(store, e)
        ack = make_ack(bob, [envs[0].msg_id])
        self.ack(store, ack)
        seen: list[Any] = []
        since = 0
        pages = 0
        while True:
            page = self.successResultOf(store.changes(since, 2, T0))
            self.assertEqual(page.feed, store.feed_id)
            pages += 1
            seen.extend(page.items)
            self.assertEqual(page.next, page.items[-1].seq if page.items else since)
            since = page.next
            if not page.more:
                break
        self.assertEqual(pages, 3)
        self.assertEqual([i.seq for i in seen], sorted(i.seq for i in seen))
        self.assertEqual([i.kind for i in seen], ["envelope"] * 4 + ["ack"])
        self.assertEqual([i.body for i in seen[:4]], [e.raw for e in envs[1:]])
        self.assertEqual(E.loads_json(seen[4].body.encode()), ack.to_json())
        empty = self.successResultOf(store.changes(since, 2, T0))
        self.assertEqual((empty.items, empty.next, empty.more), ([], since, False))

    def test_changes_mailbox_filter(self) -> None:
        """changes with a mailbox lists only that mailbox's envelopes and acks."""
        store = self.make_store()
        bob, carol, alice = Identity(), Identity(), Identity()
        b1 = make_env(alice, bob, b"b1")
        self.add(store, b1)
        self.add(store, make_env(alice, carol, b"c1"))
        b2 = make_env(alice, bob, b"b2")
        self.add(store, b2)
        self.ack(store, make_ack(carol, ["1" * 64]))
        page = self.successResultOf(store.changes(0, 10, T0, mailbox=bob.pub))
        self.assertEqual([i.body for i in page.items], [b1.raw, b2.raw])
        page = self.successResultOf(store.changes(0, 10, T0, mailbox=carol.pub))
        self.assertEqual([i.kind for i in page.items], ["envelope", "ack"])

    def test_changes_after_a_huge_cursor_is_empty(self) -> None:
        """A since beyond any seq (even past 64 bits) gives an empty page, not an error."""
        store = self.make_store()
        self.add(store, make_env(Identity(), Identity()))
        for since in (2**53, 2**63 - 1, 2**64 + 5):
            page = self.successResultOf(store.changes(since, 10, T0))
            self.assertEqual((page.items, page.next, page.more), ([], since, False))

    def test_ack_leaves_the_feed_with_its_tombstone(self) -> None:
        """A signed ack stays in the feed until its tombstone expires."""
        store = self.make_store()
        bob = Identity()
        ack = make_ack(bob, ["2" * 64])
        self.ack(store, ack)
        expires = tomb(ack)
        self.assertEqual(len(self.successResultOf(store.changes(0, 10, expires - 1)).items), 1)
        self.assertEqual(self.successResultOf(store.changes(0, 10, expires)).items, [])

    # ------------------------------------------------------------------ nonces, cursors, leases

    def test_claim_nonce_once_per_scope(self) -> None:
        """A nonce can be claimed once per scope until it expires and is swept."""
        store = self.make_store()
        self.assertTrue(self.successResultOf(store.claim_nonce("poll:a", "n1", T0 + 600)))
        self.assertFalse(self.successResultOf(store.claim_nonce("poll:a", "n1", T0 + 600)))
        self.assertTrue(self.successResultOf(store.claim_nonce("poll:b", "n1", T0 + 600)))
        self.assertTrue(self.successResultOf(store.claim_nonce("peer:x", "n1", T0 + 600)))
        self.assertEqual(self.successResultOf(store.sweep(T0 + 600)).nonces, 3)
        self.assertTrue(self.successResultOf(store.claim_nonce("poll:a", "n1", T0 + 1200)))

    def test_cursor_round_trip(self) -> None:
        """A sync cursor is stored durably and replaced by the next one."""
        store = self.make_store()
        self.assertIsNone(self.successResultOf(store.get_cursor("http://b.test")))
        self.successResultOf(store.set_cursor(Cursor("http://b.test", "feed1", 17, 1234.5)))
        self.successResultOf(store.set_cursor(Cursor("http://c.test", "feed2", 3, 0.0)))
        self.successResultOf(store.set_cursor(Cursor("http://b.test", "feed9", 40, 99.0)))
        store = self.reopen(store)
        self.assertEqual(
            self.successResultOf(store.get_cursor("http://b.test")), Cursor("http://b.test", "feed9", 40, 99.0)
        )
        self.assertEqual(
            self.successResultOf(store.get_cursor("http://c.test")), Cursor("http://c.test", "feed2", 3, 0.0)
        )

    def test_lease_holder_can_renew(self) -> None:
        """The holder of a lease gets it again when it renews."""
        store = self.make_store()
        self.assertTrue(self.successResultOf(store.acquire_lease("sync:http://b.test", "p1", 30)))
        self.assertTrue(self.successResultOf(store.acquire_lease("sync:http://b.test", "p1", 30)))
        other = self.successResultOf(store.acquire_lease("sync:http://b.test", "p2", 30))
        # one process owns a SQLite store; a shared store arbitrates
        self.assertEqual(other, not self.shared)

    # ------------------------------------------------------------------ sweep and stats

    def test_sweep_deletes_expired_rows_and_updates_stats(self) -> None:
        """sweep removes expired envelopes, tombstones, acks and nonces, and the totals follow."""
        store = self.make_store()
        bob, alice = Identity(), Identity()
        short = make_env(alice, bob, b"short", ttl=60)
        keep = make_env(alice, bob, b"keep", ttl=7200)
        self.add(store, short)
        self.add(store, keep)
        ack = make_ack(bob, ["3" * 64])
        self.ack(store, ack)
        self.successResultOf(store.claim_nonce("poll:x", "n", T0 + 10))
        self.assertEqual(store.stats().envelopes, 2)
        result = self.successResultOf(store.sweep(T0 + 60))
        self.assertEqual((result.envelopes, result.tombstones, result.acks, result.nonces), (1, 0, 0, 1))
        self.assertEqual(store.stats().envelopes, 1)
        rows = self.first_junk_rows  # bob's first ack deleted nothing
        self.assertEqual(store.stats().bytes, len(keep.raw) + rows * self.tombstone_bytes + ack_size(ack))
        result = self.successResultOf(store.sweep(tomb(ack)))
        self.assertEqual((result.envelopes, result.tombstones, result.acks), (1, rows, 1))
        self.assertEqual((store.stats().envelopes, store.stats().bytes), (0, 0))
        self.assertEqual(self.successResultOf(store.sweep(tomb(ack))).envelopes, 0)

    def test_sweep_reports_the_tombstones_left(self) -> None:
        """The sweep says how many tombstone rows the store holds once it ended (the tombstone gauge)."""
        store = self.make_store()
        bob, alice = Identity(), Identity()
        env = make_env(alice, bob)
        self.add(store, env)
        self.assertEqual(self.successResultOf(store.sweep(T0)).live_tombstones, 0)
        early = make_ack(bob, [env.msg_id, "4" * 64, "5" * 64])
        self.ack(store, early)
        later = make_ack(bob, ["6" * 64], ts=T0 + 100)
        self.ack(store, later)
        self.assertEqual(self.successResultOf(store.tombstone_count()), 4)
        self.assertEqual(self.successResultOf(store.sweep(T0 + 1)).live_tombstones, 4)
        # the first ack's tombstones expire, the later one's is left
        result = self.successResultOf(store.sweep(tomb(early)))
        self.assertEqual((result.tombstones, result.live_tombstones), (3, 1))
        self.assertEqual(self.successResultOf(store.sweep(tomb(later))).live_tombstones, 0)

    def test_stats_survive_a_restart(self) -> None:
        """Stored count and bytes are kept in the store, not recomputed from memory."""
        store = self.make_store()
        bob, alice = Identity(), Identity()
        envs = [make_env(alice, bob, b"%d" % i) for i in range(3)]
        for e in envs:
            self.add(store, e)
        ack = make_ack(bob, [envs[1].msg_id])
        self.ack(store, ack)
        store = self.reopen(store)
        self.assertEqual(store.stats().envelopes, 2)
        self.assertEqual(
            store.stats().bytes, len(envs[0].raw) + len(envs[2].raw) + self.tombstone_bytes + ack_size(ack)
        )

    def test_schema_is_at_the_latest_migration_and_feed_id_is_kept(self) -> None:
        """A new store is migrated to the latest version; reopening keeps its feed id."""
        store = self.make_store()
        feed = store.feed_id
        self.assertEqual(len(feed), 32)
        store = self.reopen(store)
        self.assertEqual(store.feed_id, feed)
        self.assertEqual(store.migrated_from, migrations.LATEST_VERSION)

    # ------------------------------------------------------------------ group commit

    def test_batch_neighbours_survive_a_failing_operation(self) -> None:
        """One operation failing in a group-commit batch fails alone; the others commit."""
        writer = ManualExecutor()
        metrics = Metrics()
        store = self.make_store(writer=writer, metrics=metrics)
        bob, alice = Identity(), Identity()
        e0, e1, e2 = (make_env(alice, bob, b"%d" % i) for i in range(3))
        first = store.add_envelope(e0, T0)  # occupies the writer
        a = store.add_envelope(e1, T0)
        bad = store.set_cursor(Cursor("http://b.test", "feed", 2**70, 0.0))  # out of range for the column
        n = store.claim_nonce("poll:x", "n", T0 + 60)
        b = store.add_envelope(e2, T0)
        writer.release()
        self.assertEqual(self.successResultOf(first).status, ACCEPTED)
        writer.release()  # the four queued operations, as one batch
        self.assertEqual(self.successResultOf(a).status, ACCEPTED)
        self.assertEqual(self.successResultOf(b).status, ACCEPTED)
        self.assertTrue(self.successResultOf(n))
        self.failureResultOf(bad, StoreError)
        self.assertEqual(metrics.registry.get_sample_value("meshrelay_store_commit_batch_size_count"), 2)
        self.assertEqual(metrics.registry.get_sample_value("meshrelay_store_commit_batch_size_sum"), 5)
        self.assertEqual(self.fetch_ids(store, bob), [e0.msg_id, e1.msg_id, e2.msg_id])
        self.assertIsNone(self.successResultOf(store.get_cursor("http://b.test")))
        self.assertEqual(store.stats().envelopes, 3)

    def test_add_envelopes_answers_each_in_order(self) -> None:
        """A page of replicas added at once: one result per envelope, in order, with dedup, tombstones and caps."""
        store = self.make_store(Caps(per_sender_pending=2))
        bob, alice, carol = Identity(), Identity(), Identity()
        held = make_env(alice, bob, b"held")
        gone = make_env(carol, bob, b"gone")
        self.assertEqual(self.add(store, held).status, ACCEPTED)
        self.ack(store, make_ack(bob, [gone.msg_id]))  # an ack before its envelope
        fresh = make_env(alice, bob, b"fresh")
        over = make_env(alice, bob, b"over")  # alice's third: over the sender cap
        other = make_env(carol, alice, b"other")
        page = [held, fresh, gone, over, other, fresh]
        results = self.successResultOf(store.add_envelopes(page, T0, peer="http://p.test"))
        self.assertEqual([r.status for r in results], [DUPLICATE, ACCEPTED, DUPLICATE, SENDER_CAP, ACCEPTED, DUPLICATE])
        self.assertTrue(results[3].remembered)
        self.assertEqual([r.msg_id for r in self.successResultOf(store.refused(T0, 10))], [over.msg_id])
        self.assertEqual(sorted(self.fetch_ids(store, bob)), sorted([held.msg_id, fresh.msg_id]))
        self.assertEqual(self.fetch_ids(store, alice), [other.msg_id])
        self.assertEqual(self.successResultOf(store.add_envelopes([], T0)), [])

    def test_one_batch_sees_its_own_earlier_operations(self) -> None:
        """Within one batch: a repeated deposit is a duplicate, caps count earlier deposits, an ack deletes them."""
        writer = ManualExecutor()
        store = self.make_store(Caps(per_sender_pending=2), writer=writer)
        bob, alice = Identity(), Identity()
        e1, e2, e3 = (make_env(alice, bob, b"%d" % i) for i in range(3))
        hold = store.claim_nonce("x", "y", T0 + 60)
        d1 = store.add_envelope(e1, T0)
        d1again = store.add_envelope(e1, T0)
        d2 = store.add_envelope(e2, T0)
        d3 = store.add_envelope(e3, T0)  # over the sender cap
        ack = make_ack(bob, [e2.msg_id])
        dack = store.apply_ack(ack, tomb(ack))
        d2again = store.add_envelope(e2, T0)  # tombstoned now
        d3again = store.add_envelope(e3, T0)  # the ack freed a slot
        writer.release()
        self.assertTrue(self.successResultOf(hold))
        writer.release()
        r1 = self.successResultOf(d1)
        self.assertEqual(r1.status, ACCEPTED)
        self.assertEqual(self.successResultOf(d1again), AddResult(DUPLICATE))
        r2 = self.successResultOf(d2)
        self.assertEqual(r2.status, ACCEPTED)
        self.assertEqual(self.successResultOf(d3), AddResult(SENDER_CAP, pending=2, limit=2))
        ack_result = self.successResultOf(dack)
        self.assertEqual(ack_result.deleted, (e2.msg_id,))
        self.assertEqual(self.successResultOf(d2again), AddResult(DUPLICATE))
        r3 = self.successResultOf(d3again)
        self.assertEqual(r3.status, ACCEPTED)
        self.assertEqual([r1.seq, r2.seq, ack_result.seq, r3.seq], sorted({r1.seq, r2.seq, ack_result.seq, r3.seq}))
        self.assertEqual(self.fetch_ids(store, bob), [e1.msg_id, e3.msg_id])
        self.assertEqual(store.stats().envelopes, 2)
        self.assertEqual(self.successResultOf(store.count(bob.pub, T0)), 2)

    # ------------------------------------------------------------------ wire v2: byte-bounded and ids-only pages

    def feed(self, store: Store, **kw: Any) -> list[Any]:
        """Every item of the feed, page by page (bounded loop)."""
        items: list[Any] = []
        since = 0
        for _ in range(1000):
            page = self.successResultOf(store.changes(since, kw.pop("limit", 100), T0, **kw))
            items.extend(page.items)
            since = page.next
            if not page.more:
                return items
        raise AssertionError("the feed never ended")

    def test_changes_pages_are_bounded_in_bytes(self) -> None:
        """With max_bytes a page stops before its bodies pass the budget; more is set and nothing is skipped."""
        store = self.make_store()
        bob = Identity()
        envs = [make_env(Identity(), bob, b"x" * 200) for _ in range(6)]
        for e in envs:
            self.add(store, e)
        ack = make_ack(bob, [envs[0].msg_id])
        self.ack(store, ack)
        size = len(envs[1].raw)
        page = self.successResultOf(store.changes(0, 100, T0, max_bytes=2 * size + size // 2))
        self.assertEqual(len(page.items), 2)
        self.assertTrue(page.more)
        self.assertEqual(page.next, page.items[-1].seq)
        self.assertEqual([i.size for i in page.items], [size, size])
        # exactly at the budget: included
        page = self.successResultOf(store.changes(0, 100, T0, max_bytes=3 * size))
        self.assertEqual((len(page.items), page.more), (3, True))
        items = []
        since = 0
        for _ in range(20):
            page = self.successResultOf(store.changes(since, 100, T0, max_bytes=size))
            self.assertEqual(len(page.items), 1)
            items.extend(page.items)
            since = page.next
            if not page.more:
                break
        self.assertEqual([i.body for i in items[:5]], [e.raw for e in envs[1:]])
        self.assertEqual(items[5].kind, "ack")
        self.assertEqual(len(items), 6)

    def test_an_item_over_the_budget_is_still_delivered_alone(self) -> None:
        """A big ack larger than max_bytes is the whole page (first item always), whatever the mix."""
        store = self.make_store()
        bob, alice = Identity(), Identity()
        small = make_env(alice, bob, b"s")
        self.add(store, small)
        big = make_ack(bob, [f"{i:064x}" for i in range(500)])
        self.ack(store, big)
        after = make_env(alice, bob, b"t")
        self.add(store, after)
        page = self.successResultOf(store.changes(0, 100, T0, max_bytes=len(small.raw) + 10))
        self.assertEqual(([i.kind for i in page.items], page.more), (["envelope"], True))
        page = self.successResultOf(store.changes(page.next, 100, T0, max_bytes=len(small.raw) + 10))
        self.assertEqual(([i.kind for i in page.items], page.more), (["ack"], True))
        self.assertGreater(page.items[0].size, len(small.raw) + 10)
        self.assertEqual(page.items[0].size, len(page.items[0].body.encode()))
        page = self.successResultOf(store.changes(page.next, 100, T0, max_bytes=len(small.raw) + 10))
        self.assertEqual(([i.body for i in page.items], page.more), ([after.raw], False))

    def test_ids_only_pages_carry_size_mailbox_and_key(self) -> None:
        """ids_only items have no body but the body's UTF-8 size, the mailbox and msg_id or nonce."""
        store = self.make_store()
        bob, carol, alice = Identity(), Identity(), Identity()
        e1 = make_env(alice, bob, b"1")
        e2 = make_env(alice, carol, b"22")
        self.add(store, e1)
        self.add(store, e2)
        ack = make_ack(carol, [e2.msg_id, "4" * 64])
        self.ack(store, ack)
        full = self.successResultOf(store.changes(0, 100, T0)).items
        ids = self.successResultOf(store.changes(0, 100, T0, ids_only=True)).items
        self.assertEqual([i.body for i in ids], ["", ""])
        self.assertEqual([(i.seq, i.kind) for i in ids], [(i.seq, i.kind) for i in full])
        self.assertEqual([i.size for i in ids], [len(i.body.encode()) for i in full])
        self.assertEqual([(i.mailbox, i.key) for i in ids], [(bob.pub, e1.msg_id), (carol.pub, ack.nonce)])
        by_mailbox = self.successResultOf(store.changes(0, 100, T0, mailbox=bob.pub, ids_only=True)).items
        self.assertEqual([i.key for i in by_mailbox], [e1.msg_id])

    def test_missing_lists_what_the_store_lacks_in_input_order(self) -> None:
        """missing: stored or live-tombstoned envelopes and recorded acks are not lacking; order is kept."""
        store = self.make_store()
        bob, alice = Identity(), Identity()
        held, acked, unknown, other = (make_env(alice, bob, b"%d" % i) for i in range(4))
        self.add(store, held)
        self.add(store, acked)
        ack = make_ack(bob, [acked.msg_id, other.msg_id])
        self.ack(store, ack)
        envs = [(bob.pub, unknown.msg_id), (bob.pub, held.msg_id), (bob.pub, acked.msg_id), (bob.pub, other.msg_id)]
        # a tombstone only stops its own mailbox
        envs.append((alice.pub, other.msg_id))
        acks = [(bob.pub, "nope"), (bob.pub, ack.nonce), (alice.pub, ack.nonce)]
        lack_env, lack_ack = self.successResultOf(store.missing(envs, acks, T0))
        self.assertEqual(lack_env, [(bob.pub, unknown.msg_id), (alice.pub, other.msg_id)])
        self.assertEqual(lack_ack, [(bob.pub, "nope"), (alice.pub, ack.nonce)])
        # an expired tombstone no longer stops it
        lack_env, _ = self.successResultOf(store.missing([(bob.pub, other.msg_id)], [], tomb(ack)))
        self.assertEqual(lack_env, [(bob.pub, other.msg_id)])
        self.assertEqual(self.successResultOf(store.missing([], [], T0)), ([], []))

    def test_missing_over_a_long_page_with_repeats(self) -> None:
        """A page longer than one statement's key list (512 on SQLite), an id listed twice, a tombstone at its end."""
        store = self.make_store()
        bob, alice = Identity(), Identity()
        acked = make_env(alice, bob, b"acked")
        self.add(store, acked)
        self.ack(store, make_ack(bob, [acked.msg_id]))
        filler = [(bob.pub, f"{i:064x}") for i in range(700)]
        envs = filler + [(bob.pub, acked.msg_id), filler[3], (alice.pub, acked.msg_id)]
        lack_env, _ = self.successResultOf(store.missing(envs, [], T0))
        self.assertEqual(lack_env, filler + [filler[3], (alice.pub, acked.msg_id)])

    def test_bodies_in_request_order_within_the_budget(self) -> None:
        """bodies returns held items in request order within max_bytes (the first always) and lists the gone."""
        store = self.make_store()
        bob, alice = Identity(), Identity()
        envs = [make_env(alice, bob, b"%d" % i) for i in range(3)]
        for e in envs:
            self.add(store, e)
        gone = make_env(alice, bob, b"never")
        ack = make_ack(bob, [envs[2].msg_id])
        self.ack(store, ack)
        ids = [envs[1].msg_id, gone.msg_id, envs[0].msg_id, envs[2].msg_id]
        acks = [(bob.pub, ack.nonce), (bob.pub, "unknown")]
        out = self.successResultOf(store.bodies(ids, acks, T0, 1 << 20))
        ack_body = E.dumps_json(ack.to_json()).decode()
        self.assertEqual(
            out,
            Bodies(
                envelopes=[envs[1].raw, envs[0].raw],
                acks=[ack_body],
                gone_envelopes=[gone.msg_id, envs[2].msg_id],
                gone_acks=[(bob.pub, "unknown")],
            ),
        )
        cut = self.successResultOf(store.bodies(ids, acks, T0, len(envs[1].raw) + 1))
        self.assertEqual(cut.envelopes, [envs[1].raw])
        self.assertEqual(cut.acks, [])
        self.assertEqual(cut.gone_envelopes, [gone.msg_id, envs[2].msg_id])
        tiny = self.successResultOf(store.bodies([], acks, T0, 10))
        self.assertEqual(tiny.acks, [ack_body])
        # an expired envelope is gone
        late = self.successResultOf(store.bodies([envs[0].msg_id], [], T0 + 3600, 1 << 20))
        self.assertEqual(late.gone_envelopes, [envs[0].msg_id])

    # ------------------------------------------------------------------ wire v2: remembered cap refusals

    def test_cap_refusals_of_replicas_are_remembered(self) -> None:
        """A replica refused at any cap with a peer given is remembered (reason, expiry); without a peer it is not."""
        bob, alice = Identity(), Identity()
        probe = make_env(alice, bob, b"0")
        store = self.make_store(Caps(per_sender_pending=1, per_mailbox_pending=2, max_stored_bytes=3 * len(probe.raw)))
        self.add(store, probe)
        sender_capped = make_env(alice, bob, b"1", ttl=600)
        r = self.successResultOf(store.add_envelope(sender_capped, T0, peer="http://p.test"))
        self.assertEqual((r.status, r.remembered), (SENDER_CAP, True))
        self.add(store, make_env(Identity(), bob, b"2"))
        full = make_env(Identity(), bob, b"3")
        r = self.successResultOf(store.add_envelope(full, T0 + 1, peer="http://q.test"))
        self.assertEqual((r.status, r.remembered), (MAILBOX_FULL, True))
        carol = Identity()
        self.add(store, make_env(Identity(), carol, b"4"))
        no_room = make_env(Identity(), carol, b"5")
        r = self.successResultOf(store.add_envelope(no_room, T0 + 2, peer="http://p.test"))
        self.assertEqual((r.status, r.remembered), (STORAGE_FULL, True))
        # without a peer (a client deposit) nothing is remembered
        self.assertIsNone(self.add(store, make_env(Identity(), bob, b"6")).remembered)
        rows = self.successResultOf(store.refused(T0, 10))
        self.assertEqual(
            rows,
            [
                Refused(sender_capped.msg_id, bob.pub, "http://p.test", SENDER_CAP, sender_capped.expires),
                Refused(full.msg_id, bob.pub, "http://q.test", MAILBOX_FULL, full.expires),
                Refused(no_room.msg_id, carol.pub, "http://p.test", STORAGE_FULL, no_room.expires),
            ],
        )
        self.assertEqual(
            [r.msg_id for r in self.successResultOf(store.refused(T0, 10, mailbox=carol.pub))], [no_room.msg_id]
        )
        self.assertEqual(len(self.successResultOf(store.refused(T0, 2))), 2)
        # the same refusal again is one row; an expired row is not listed
        self.successResultOf(store.add_envelope(sender_capped, T0 + 5, peer="http://p.test"))
        self.assertEqual(len(self.successResultOf(store.refused(T0, 10))), 3)
        self.assertEqual(
            self.successResultOf(store.refused(sender_capped.expires, 10, mailbox=bob.pub))[0].msg_id, full.msg_id
        )
        store = self.reopen(
            store, Caps(per_sender_pending=1, per_mailbox_pending=2, max_stored_bytes=3 * len(probe.raw))
        )
        self.assertEqual(len(self.successResultOf(store.refused(T0, 10))), 3)

    def test_remembered_refusals_are_bounded(self) -> None:
        """At most per_mailbox_pending rows per (peer, mailbox) and max_refused in all; the rest are counted."""
        metrics = Metrics()
        store = self.make_store(Caps(per_sender_pending=1, per_mailbox_pending=2, max_refused=3), metrics=metrics)
        bob, carol, alice = Identity(), Identity(), Identity()
        self.add(store, make_env(alice, bob, b"held"))
        self.add(store, make_env(alice, carol, b"held"))
        results = [
            self.successResultOf(store.add_envelope(make_env(alice, bob, b"%d" % i), T0, peer="http://p.test"))
            for i in range(3)
        ]
        self.assertEqual([r.remembered for r in results], [True, True, False])
        other_peer = self.successResultOf(store.add_envelope(make_env(alice, bob, b"x"), T0, peer="http://q.test"))
        self.assertTrue(other_peer.remembered)
        over_all = self.successResultOf(store.add_envelope(make_env(alice, carol, b"y"), T0, peer="http://q.test"))
        self.assertEqual((over_all.status, over_all.remembered), (SENDER_CAP, False))
        self.assertEqual(len(self.successResultOf(store.refused(T0, 100))), 3)
        self.assertEqual(metrics.registry.get_sample_value("meshrelay_replica_refusals_forgotten_total"), 2)

    def test_remembered_refusals_are_forgotten(self) -> None:
        """A row goes when its msg_id is accepted, when an ack tombstones it, when it expires, or on forget_refused."""
        store = self.make_store(Caps(per_sender_pending=1))
        bob, alice = Identity(), Identity()
        first = make_env(alice, bob, b"first")
        self.add(store, first)
        envs = [make_env(alice, bob, b"%d" % i, ttl=60 + i) for i in range(5)]
        for e in envs[:4]:
            self.successResultOf(store.add_envelope(e, T0, peer="http://p.test"))
        self.successResultOf(store.add_envelope(envs[0], T0, peer="http://q.test"))
        self.successResultOf(store.add_envelope(envs[4], T0, peer="http://q.test"))

        def listed() -> list[tuple[str, str]]:
            return [(r.msg_id, r.peer) for r in self.successResultOf(store.refused(T0, 100))]

        self.assertEqual(len(listed()), 6)
        # an ack of the held one frees the slot: envs[0] accepted (from anyone) forgets both its rows
        self.ack(store, make_ack(bob, [first.msg_id, envs[1].msg_id]))
        self.assertEqual(self.add(store, envs[0]).status, ACCEPTED)
        self.assertNotIn(envs[0].msg_id, [m for m, _ in listed()])
        # the ack tombstoned envs[1]: its row is gone
        self.assertNotIn(envs[1].msg_id, [m for m, _ in listed()])
        self.successResultOf(
            store.forget_refused([(envs[2].msg_id, "http://p.test"), (envs[4].msg_id, "http://p.test")])
        )
        self.assertEqual(
            sorted(listed()), sorted([(envs[3].msg_id, "http://p.test"), (envs[4].msg_id, "http://q.test")])
        )
        self.successResultOf(store.forget_refused([]))
        swept = self.successResultOf(store.sweep(envs[3].expires))
        self.assertEqual(swept.refused, 1)
        self.assertEqual(listed(), [(envs[4].msg_id, "http://q.test")])
        # an ack by another mailbox forgets nothing
        self.ack(store, make_ack(alice, [envs[4].msg_id]))
        self.assertEqual(listed(), [(envs[4].msg_id, "http://q.test")])

    # ------------------------------------------------------------------ acks are storage (issue 10)

    def test_acks_and_tombstones_count_toward_storage(self) -> None:
        """Tombstones and stored signed acks are in stats().bytes (the stored_bytes gauge) and go with the sweep."""
        store = self.make_store()
        ack = make_ack(Identity(), [f"{i:064x}" for i in range(500)])
        result = self.ack(store, ack)
        self.assertEqual((result.stored, result.skipped), (True, 0))
        rows = 500 * self.first_junk_rows  # the mailbox's first ack, and it deleted nothing
        self.assertEqual(store.stats().bytes, rows * self.tombstone_bytes + ack_size(ack))
        store = self.reopen(store)
        self.assertEqual(store.stats().bytes, rows * self.tombstone_bytes + ack_size(ack))
        self.assertEqual(self.successResultOf(store.sweep(tomb(ack))).tombstones, rows)
        self.assertEqual(store.stats().bytes, 0)
        # the mailbox's next junk ack has a tombstone row per id on every backend
        owner = Identity()
        self.ack(store, make_ack(owner, ["1" * 64]))
        before = store.stats().bytes
        later = make_ack(owner, [f"{i:064x}" for i in range(500)], ts=T0 + 1)
        result = self.ack(store, later)
        self.assertEqual((result.stored, result.skipped), (True, 0))
        self.assertEqual(store.stats().bytes - before, 500 * self.tombstone_bytes + ack_size(later))

    def test_junk_acks_are_bounded_and_never_block_deposits(self) -> None:
        """Acks of ids never held from throwaway mailboxes stay within the junk budget; deposits still fit."""
        cap = 64 * 1024
        store = self.make_store(Caps(max_stored_bytes=cap, per_mailbox_pending=1000))
        budget = junk_budget(Caps(max_stored_bytes=cap))
        results = []
        for n in range(30):
            junk = make_ack(Identity(), [f"{n:08x}{i:056x}" for i in range(200)])
            results.append(self.ack(store, junk))
        self.assertLessEqual(store.stats().bytes, budget)
        self.assertGreater(sum(r.skipped for r in results), 0)
        self.assertFalse(results[-1].stored)
        self.assertLessEqual(len(dump_live(store, T0)["tombstones"]), budget // self.tombstone_bytes)
        # the rest of the cap is still there for mail
        bob = Identity()
        big = make_env(Identity(), bob, b"x" * 4000)
        accepted = 0
        while self.add(store, make_env(Identity(), bob, b"x" * 4000)).status == ACCEPTED:
            accepted += 1
            self.assertLess(accepted, 100)
        self.assertGreaterEqual(accepted * len(big.raw), cap - budget - len(big.raw))
        self.assertLessEqual(store.stats().bytes, cap)

    def test_owner_can_ack_held_mail_when_storage_is_full(self) -> None:
        """With storage and the junk budget full, an ack of held mail still deletes and tombstones it."""
        bob, alice = Identity(), Identity()
        envs = [make_env(alice, bob, b"%d" % i + b"y" * 3000) for i in range(4)]
        cap = 4 * len(envs[0].raw) + 1000
        store = self.make_store(Caps(max_stored_bytes=cap, per_sender_pending=100))
        for e in envs:
            self.assertEqual(self.add(store, e).status, ACCEPTED)
        for n in range(20):
            self.ack(store, make_ack(Identity(), [f"{n:08x}{i:056x}" for i in range(100)]))
        self.assertEqual(self.add(store, make_env(alice, bob, b"z" * 3000)).status, STORAGE_FULL)
        before = store.stats().bytes
        # the owner's ack also names many ids never held: they cost nothing past the budget
        ack = make_ack(bob, [envs[0].msg_id, *[f"{i:064x}" for i in range(400)]])
        result = self.ack(store, ack)
        self.assertEqual(result.deleted, (envs[0].msg_id,))
        self.assertLess(store.stats().bytes, before)
        self.assertEqual(self.add(store, envs[0]).status, DUPLICATE)
        self.assertEqual(self.fetch_ids(store, bob), [e.msg_id for e in envs[1:]])
        self.assertLessEqual(store.stats().bytes, cap)

    def test_early_ack_within_the_budget_still_stops_its_envelope(self) -> None:
        """An ack that arrives before its envelope (a mesh race) tombstones it while the junk budget has room."""
        store = self.make_store(Caps(max_stored_bytes=64 * 1024))
        bob, alice = Identity(), Identity()
        env = make_env(alice, bob)
        result = self.ack(store, make_ack(bob, [env.msg_id]))
        self.assertEqual((result.deleted, result.skipped, result.stored), ((), 0, True))
        self.assertEqual(self.add(store, env), AddResult(DUPLICATE))

    def test_a_junk_flood_cannot_take_the_tombstone_of_an_ack_relayed_by_a_peer(self) -> None:
        """With the client junk budget spent by throwaway mailboxes, a peer's early ack of real mail still stops it."""
        cap = 64 * 1024
        store = self.make_store(Caps(max_stored_bytes=cap, per_mailbox_pending=1000))
        flood = [self.ack(store, make_ack(Identity(), [f"{n:08x}{i:056x}" for i in range(200)])) for n in range(30)]
        self.assertGreater(flood[-1].skipped, 0)
        # a client's early ack now gets no tombstone (the trade of the client share) ...
        carol, dave = Identity(), Identity()
        lost = make_env(dave, carol)
        self.assertEqual(self.ack(store, make_ack(carol, [lost.msg_id])).skipped, 1)
        # ... but the recipient acked this one at a peer, which relays the ack before the replica
        bob, alice = Identity(), Identity()
        env = make_env(alice, bob)
        early = make_ack(bob, [env.msg_id])
        result = self.successResultOf(store.apply_ack(early, tomb(early), from_peer=True))
        self.assertEqual((result.deleted, result.skipped), ((), 0))
        self.assertEqual(self.add(store, env), AddResult(DUPLICATE))
        self.assertEqual(self.fetch_ids(store, bob), [])
        # and a peer's junk is bounded too: never past two client shares, nor the cap
        for n in range(60):
            relayed = make_ack(Identity(), [f"{n + 100:08x}{i:056x}" for i in range(200)])
            self.successResultOf(store.apply_ack(relayed, tomb(relayed), from_peer=True))
        self.assertLessEqual(store.stats().bytes, junk_budget(Caps(max_stored_bytes=cap), from_peer=True))

    def test_attested_ids_are_tombstoned_outside_the_junk_budget(self) -> None:
        """v4 (13): ids a peer says it held get real tombstones though every junk share is spent; the cap holds."""
        cap = 64 * 1024
        store = self.make_store(Caps(max_stored_bytes=cap, per_mailbox_pending=1000))
        bob, alice, carol = Identity(), Identity(), Identity()
        # a junk tombstone is not "held"; a later attestation makes it real and gives its junk back
        lone = make_env(alice, carol)
        junk = make_ack(carol, [lone.msg_id])
        self.assertEqual(self.ack(store, junk).skipped, 0)
        key = (carol.pub, lone.msg_id)
        self.assertEqual(self.successResultOf(store.held_tombstones([key])), set())
        again = make_ack(carol, [lone.msg_id])
        self.successResultOf(store.apply_ack(again, tomb(again), from_peer=True, attested=[lone.msg_id]))
        self.assertEqual(self.successResultOf(store.held_tombstones([key])), {key})
        # spend every junk share
        for n in range(60):
            relayed = make_ack(Identity(), [f"{n:08x}{i:056x}" for i in range(200)])
            self.successResultOf(store.apply_ack(relayed, tomb(relayed), from_peer=True))
        envs = [make_env(alice, bob, f"m{i}".encode()) for i in range(3)]
        early = make_ack(bob, [e.msg_id for e in envs])
        attested = (envs[0].msg_id, envs[1].msg_id)
        result = self.successResultOf(store.apply_ack(early, tomb(early), from_peer=True, attested=attested))
        self.assertEqual((result.deleted, result.skipped), ((), 1))
        self.assertEqual([self.add(store, e).status for e in envs], [DUPLICATE, DUPLICATE, ACCEPTED])
        pairs = [(bob.pub, e.msg_id) for e in envs]
        self.assertEqual(self.successResultOf(store.held_tombstones(pairs)), set(pairs[:2]))
        self.assertLessEqual(store.stats().bytes, cap)

    def test_the_sweep_gives_the_junk_budget_back(self) -> None:
        """Once junk tombstones and acks expire and are swept, new ones fit again."""
        cap = 64 * 1024
        store = self.make_store(Caps(max_stored_bytes=cap))
        first = [make_ack(Identity(), [f"{n:08x}{i:056x}" for i in range(200)]) for n in range(10)]
        for a in first:
            self.ack(store, a)
        late = make_ack(Identity(), [f"{i:064x}" for i in range(10)], ts=T0 + MAX_TTL * 2)
        self.assertEqual(self.ack(store, late).skipped, 10)
        self.successResultOf(store.sweep(max(tomb(a) for a in first)))
        self.assertEqual(store.stats().bytes, 0)
        again = self.ack(store, late)
        self.assertEqual((again.skipped, again.stored), (0, True))

    def raw_sql(self, statements: list[tuple[str, tuple[Any, ...]]]) -> list[tuple[Any, ...]]:
        """Run statements (``?`` placeholders) on the backend's database directly, in one transaction.

        Returns the rows of the last statement.
        """
        raise NotImplementedError

    def test_upgrade_from_schema_5_keys_tombstones_by_digest(self) -> None:
        """Schema 6: tombstones made at schema 5 still stop their envelopes, keep their junk flag, count at the new size."""
        bob, carol, alice = Identity(), Identity(), Identity()
        kept, acked, early = make_env(alice, bob, b"kept"), make_env(alice, bob, b"acked"), make_env(alice, carol)
        ack = make_ack(bob, [acked.msg_id])
        # carol acked a message before it reached this node: a junk tombstone, and a junk ack
        junk_ack = make_ack(carol, [early.msg_id])
        statements = schema_statements(self.dialect, 5)
        for seq, a, junk in ((2, ack, 0), (3, junk_ack, 1)):
            body = E.dumps_json(a.to_json()).decode()
            statements.append(
                (
                    "INSERT INTO acks (seq, mailbox, nonce, expires, body, size, junk) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (seq, a.mailbox, a.nonce, tomb(a), body, len(body), junk),
                )
            )
        statements += [
            (
                "INSERT INTO envelopes (seq, msg_id, mailbox, sender, expires, size, body) VALUES (1, ?, ?, ?, ?, ?, ?)",
                (kept.msg_id, kept.mailbox, kept.sender, kept.expires, len(kept.raw), kept.raw),
            ),
            (
                "INSERT INTO tombstones (mailbox, msg_id, expires, junk) VALUES (?, ?, ?, 0)",
                (bob.pub, acked.msg_id, tomb(ack)),
            ),
            (
                "INSERT INTO tombstones (mailbox, msg_id, expires, junk) VALUES (?, ?, ?, 1)",
                (carol.pub, early.msg_id, tomb(junk_ack)),
            ),
            ("UPDATE meta SET value = '3' WHERE key = 'last_seq'", ()),
            ("UPDATE meta SET value = '1' WHERE key = 'stored_count'", ()),
            (
                "UPDATE meta SET value = ? WHERE key = 'stored_bytes'",
                (str(len(kept.raw) + ack_size(ack) + ack_size(junk_ack) + 2 * migrations.TOMBSTONE_BYTES_V4),),
            ),
            (
                "UPDATE meta SET value = ? WHERE key = 'junk_bytes'",
                (str(ack_size(junk_ack) + migrations.TOMBSTONE_BYTES_V4),),
            ),
        ]
        self.raw_sql(statements)
        store = self.make_store()
        self.assertEqual(store.migrated_from, 5)
        self.assertEqual(store.tombstone_bytes, self.tombstone_bytes)
        self.assertLess(self.tombstone_bytes, migrations.TOMBSTONE_BYTES_V4)
        accounted = len(kept.raw) + ack_size(ack) + ack_size(junk_ack) + 2 * self.tombstone_bytes
        self.assertEqual(store.stats().bytes, accounted)
        self.assertEqual(self.meta(store, "stored_bytes"), str(accounted))
        self.assertEqual(self.meta(store, "junk_bytes"), str(ack_size(junk_ack) + self.tombstone_bytes))
        rows = self.raw_sql([("SELECT digest FROM tombstones ORDER BY digest", ())])
        self.assertEqual(
            [bytes(r[0]) for r in rows],
            sorted([tombstone_key(bob.pub, acked.msg_id), tombstone_key(carol.pub, early.msg_id)]),
        )
        self.assertEqual(self.successResultOf(store.tombstone_count()), 2)
        # Both tombstones still stop their envelopes, as deposits and as replicas.
        self.assertEqual(self.add(store, acked), AddResult(DUPLICATE))
        self.assertEqual(self.successResultOf(store.add_envelope(early, T0, peer="p")), AddResult(DUPLICATE))
        pairs = [(bob.pub, acked.msg_id), (carol.pub, early.msg_id), (bob.pub, kept.msg_id), (alice.pub, acked.msg_id)]
        self.assertEqual(self.successResultOf(store.missing(pairs, [], T0)), ([(alice.pub, acked.msg_id)], []))
        # Only the tombstone of mail held here is served as held (v4): the junk flag was kept.
        self.assertEqual(self.successResultOf(store.held_tombstones(pairs)), {(bob.pub, acked.msg_id)})
        # The next ack of the same id keeps one tombstone (the key matches the migrated one).
        self.assertEqual(
            self.successResultOf(store.apply_ack(make_ack(bob, [acked.msg_id], T0 + 1), tomb(ack) + 1)).deleted, ()
        )
        self.assertEqual(self.successResultOf(store.tombstone_count()), 2)
        # Everything expires: nothing is accounted any more.
        self.successResultOf(store.sweep(tomb(ack) + 1))
        self.assertEqual(store.stats().bytes, 0)
        self.assertEqual(self.meta(store, "junk_bytes"), "0")

    def test_tombstone_key_in_sql_is_tombstone_key(self) -> None:
        """The migration's SQL spelling of tombstone_key gives the bytes the store looks up, for any text."""
        pairs = [("ab", "c"), ("a", "bc"), ("", ""), ("m\u00e9l", "\u2603" * 3), (Identity().pub, "f" * 64)]
        expr = migrations.DIALECTS[self.dialect]["tombstone_key"]
        for mb, m in pairs:
            ((key,),) = self.raw_sql([(f"SELECT {expr} FROM (SELECT ? AS mailbox, ? AS msg_id) AS t", (mb, m))])
            self.assertEqual(bytes(key), tombstone_key(mb, m), (mb, m))
        # 16 bytes, and the mailbox's length keeps ("ab", "c") and ("a", "bc") apart
        self.assertEqual({len(tombstone_key(mb, m)) for mb, m in pairs}, {migrations.TOMBSTONE_KEY_BYTES})
        self.assertEqual(len({tombstone_key(mb, m) for mb, m in pairs}), len(pairs))

    def meta(self, store: Store, key: str) -> str:
        ((value,),) = self.raw_sql([("SELECT value FROM meta WHERE key = ?", (key,))])
        return str(value)

    def test_upgrade_from_schema_3_accounts_acks_and_tombstones(self) -> None:
        """A store made at schema 3 upgrades: acks get sizes, stored_bytes counts acks and tombstones, mail is kept."""
        bob, alice = Identity(), Identity()
        kept, acked = make_env(alice, bob, b"kept"), make_env(alice, bob, b"acked")
        ack = make_ack(bob, [acked.msg_id])
        body = E.dumps_json(ack.to_json()).decode()
        statements: list[tuple[str, tuple[Any, ...]]] = [
            ("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)", ())
        ]
        for m in migrations.MIGRATIONS[:3]:
            statements += [(stmt, ()) for stmt in m.render(self.dialect)]
            statements += [
                ("INSERT INTO meta (key, value) VALUES (?, ?)", kv) for kv in migrations.seed_meta(m.version).items()
            ]
        statements += [
            ("INSERT INTO meta (key, value) VALUES ('schema_version', '3')", ()),
            (
                "INSERT INTO envelopes (seq, msg_id, mailbox, sender, expires, size, body) VALUES (1, ?, ?, ?, ?, ?, ?)",
                (kept.msg_id, kept.mailbox, kept.sender, kept.expires, len(kept.raw), kept.raw),
            ),
            (
                "INSERT INTO acks (seq, mailbox, nonce, expires, body) VALUES (3, ?, ?, ?, ?)",
                (bob.pub, ack.nonce, tomb(ack), body),
            ),
            ("INSERT INTO tombstones (mailbox, msg_id, expires) VALUES (?, ?, ?)", (bob.pub, acked.msg_id, tomb(ack))),
            ("UPDATE meta SET value = '3' WHERE key = 'last_seq'", ()),
            ("UPDATE meta SET value = '1' WHERE key = 'stored_count'", ()),
            ("UPDATE meta SET value = ? WHERE key = 'stored_bytes'", (str(len(kept.raw)),)),
        ]
        self.raw_sql(statements)
        store = self.make_store()
        self.assertEqual(store.migrated_from, 3)
        self.assertEqual(store.stats().envelopes, 1)
        self.assertEqual(store.stats().bytes, len(kept.raw) + ack_size(ack) + self.tombstone_bytes)
        items = self.successResultOf(store.changes(0, 10, T0, ids_only=True)).items
        self.assertEqual([(i.kind, i.size) for i in items], [("envelope", len(kept.raw)), ("ack", ack_size(ack))])
        self.assertEqual(self.add(store, acked), AddResult(DUPLICATE))
        self.assertEqual(self.add(store, make_env(alice, bob, b"new")).seq, 4)
        self.successResultOf(store.sweep(tomb(ack)))
        self.assertEqual(store.stats().bytes, 0)

    def test_closed_store_refuses_writes(self) -> None:
        """Writes after close fail with StoreError instead of hanging."""
        store = self.make_store()
        self.successResultOf(store.close())
        self.failureResultOf(store.add_envelope(make_env(Identity(), Identity()), T0), StoreError)


class FirstContactStoreBehaviour(StoreBehaviour):
    """Protocol v3 in the store: two buckets per mailbox, the dedup upgrade, policies (both backends)."""

    def test_buckets_are_counted_apart(self) -> None:
        """Strangers stop at their cap (stranger_full), contacts at per_mailbox_pending, neither takes the other's room."""
        store = self.make_store(Caps(per_mailbox_pending=3, per_sender_pending=10))
        bob, friend = Identity(), Identity()
        stranger = [dataclasses.replace(make_env(Identity(), bob, b"s%d" % i), stranger_cap=2) for i in range(3)]
        self.assertEqual([self.add(store, e).status for e in stranger], [ACCEPTED, ACCEPTED, STRANGER_FULL])
        contact = [dataclasses.replace(make_env(friend, bob, b"c%d" % i), contact=True) for i in range(4)]
        self.assertEqual([self.add(store, e).status for e in contact], [ACCEPTED] * 3 + [MAILBOX_FULL])
        # Without a policy a stranger meets the v1 cap (and the v1 answer) at per_mailbox_pending.
        plain = [make_env(Identity(), bob, b"p%d" % i) for i in range(2)]
        self.assertEqual([self.add(store, e).status for e in plain], [ACCEPTED, MAILBOX_FULL])

    def test_contact_copy_upgrades_a_stranger_copy(self) -> None:
        """The same envelope arriving with a permit turns the stored stranger copy into contact mail, once."""
        store = self.make_store(Caps(per_mailbox_pending=1, per_sender_pending=10))
        bob, friend = Identity(), Identity()
        env = make_env(friend, bob)
        self.assertEqual(self.add(store, env).status, ACCEPTED)
        suffix = ',"stamp":"AAAAAAAAAAA"'
        upgraded = dataclasses.replace(env, contact=True, suffix=suffix)
        self.assertEqual(self.add(store, upgraded), AddResult(DUPLICATE, upgraded=True))
        self.assertEqual(self.add(store, upgraded), AddResult(DUPLICATE))
        bodies, _ = self.successResultOf(store.fetch(bob.pub, T0, 10))
        self.assertEqual(bodies, [upgraded.raw])
        self.assertEqual(store.stats().bytes, len(upgraded.raw))
        # The stranger bucket is free again: a stranger fits beside the contact.
        self.assertEqual(self.add(store, make_env(Identity(), bob, b"s")).status, ACCEPTED)

    def test_latest_policy_wins(self) -> None:
        """put_policy keeps the highest version, reports duplicates and stale ones, and feeds them by pseq."""
        store = self.make_store()
        self.assertEqual(self.successResultOf(store.put_policy("m", 2, "b" * 64, "{2}")), "accepted")
        self.assertEqual(self.successResultOf(store.put_policy("m", 2, "b" * 64, "{2}")), "duplicate")
        self.assertEqual(self.successResultOf(store.put_policy("m", 1, "f" * 64, "{1}")), "stale")
        self.assertEqual(self.successResultOf(store.put_policy("n", 1, "a" * 64, "{n}")), "accepted")
        self.assertEqual(self.successResultOf(store.put_policy("m", 3, "a" * 64, "{3}")), "accepted")
        self.assertEqual(self.successResultOf(store.policies_since(0, 10)), [(2, "{n}"), (3, "{3}")])
        self.assertEqual(self.successResultOf(store.policies_since(2, 10)), [(3, "{3}")])
        store = self.reopen(store, Caps(max_policies=2))
        self.assertEqual(sorted(store.load_policies()), ["{3}", "{n}"])
        # At max_policies a new mailbox is refused; a newer version for a counted one is taken.
        self.assertEqual(self.successResultOf(store.put_policy("o", 1, "a" * 64, "{o}")), "storage_full")
        self.assertEqual(self.successResultOf(store.put_policy("n", 2, "c" * 64, "{n2}")), "accepted")


class SQLiteStoreTests(FirstContactStoreBehaviour, SynchronousTestCase):
    """The behaviour suite on the embedded SQLite store."""

    shared = False

    def setUp(self) -> None:
        self.data_dir = self.mktemp()

    dialect = "sqlite"

    def open_store(self, caps: Caps, writer: Executor | None, metrics: Metrics | None) -> Store:
        return SQLiteStore(self.data_dir, caps, writer=writer or InlineExecutor(), metrics=metrics)

    def raw_sql(self, statements: list[tuple[str, tuple[Any, ...]]]) -> list[tuple[Any, ...]]:
        os.makedirs(self.data_dir, exist_ok=True)
        conn = sqlite3.connect(os.path.join(self.data_dir, DB_NAME), isolation_level=None)
        sqlite_core.register_functions(conn)
        rows: list[tuple[Any, ...]] = []
        try:
            conn.execute("BEGIN")
            for stmt, args in statements:
                rows = conn.execute(stmt, args).fetchall()
            conn.execute("COMMIT")
        finally:
            conn.close()
        return rows

    def test_a_page_is_read_under_one_snapshot(self) -> None:
        """A deposit and an ack committed while a page is being read never move next past the deposit."""
        store = self.make_store()
        bob, alice = Identity(), Identity()
        first = make_env(alice, bob, b"first")
        self.add(store, first)
        racing = make_env(alice, bob, b"racing")
        calls: list[int] = []

        def between() -> None:
            calls.append(1)
            if len(calls) == 1:
                self.add(store, racing)
                self.ack(store, make_ack(bob, ["5" * 64]))

        store.between_statements = between
        page = self.successResultOf(store.changes(0, 10, T0))
        store.between_statements = None
        rest = self.successResultOf(store.changes(page.next, 10, T0))
        self.assertIn(racing.raw, [i.body for i in page.items + rest.items])
        self.assertEqual([i.body for i in page.items], [first.raw])
        self.assertEqual([i.kind for i in rest.items], ["envelope", "ack"])
        self.assertEqual(len(calls), 1)

    def test_a_mailbox_read_empty_is_answered_from_memory_until_an_add(self) -> None:
        """fetch and count of a mailbox a read found empty need no read, until an add to it is sent."""
        metrics = Metrics()
        store = self.make_store(metrics=metrics)
        skipped = metrics.store_reads_skipped_total.labels("empty_mailbox")
        bob, carol, alice = Identity(), Identity(), Identity()
        reads: list[int] = []
        plain_read = store._read
        store._read = lambda fn: (reads.append(1), plain_read(fn))[1]
        self.assertEqual(self.fetch_ids(store, bob), [])
        self.assertEqual(self.fetch_ids(store, bob), [])
        self.assertEqual(self.successResultOf(store.count(bob.pub, T0)), 0)
        self.assertEqual((len(reads), skipped._value.get()), (1, 2))
        self.add(store, make_env(alice, carol, b"to carol"))  # another mailbox: bob stays known empty
        self.assertEqual(self.fetch_ids(store, bob), [])
        env = make_env(alice, bob, b"to bob")
        self.add(store, env)
        self.assertEqual(self.fetch_ids(store, bob), [env.msg_id])
        self.assertEqual(self.successResultOf(store.count(bob.pub, T0)), 1)
        self.assertEqual(len(reads), 3)
        # acked away: the next read finds it empty again, and is remembered
        self.ack(store, make_ack(bob, [env.msg_id]))
        self.assertEqual(self.fetch_ids(store, bob), [])
        self.assertEqual(self.fetch_ids(store, bob), [])
        self.assertEqual(len(reads), 4)

    def test_a_fetch_of_no_messages_from_a_mailbox_with_mail_is_not_remembered_as_empty(self) -> None:
        """fetch(limit=0) of a mailbox with mail finds no bodies but more: the mailbox is not empty."""
        store = self.make_store()
        bob, alice = Identity(), Identity()
        env = make_env(alice, bob, b"held")
        self.add(store, env)
        self.assertEqual(self.successResultOf(store.fetch(bob.pub, T0, 0)), ([], True))
        self.assertEqual(self.fetch_ids(store, bob), [env.msg_id])

    def test_a_read_that_began_while_an_add_was_in_flight_is_not_remembered(self) -> None:
        """An add sent and not yet committed when an empty read began: the mailbox is not known empty."""
        writer = ManualExecutor()
        store = self.make_store(writer=writer)
        bob, alice = Identity(), Identity()
        env = make_env(alice, bob, b"in flight")
        added = store.add_envelope(env, T0)
        self.assertEqual(self.fetch_ids(store, bob), [])  # read before the add commits
        writer.release()
        self.assertEqual(self.successResultOf(added).status, ACCEPTED)
        self.assertEqual(self.fetch_ids(store, bob), [env.msg_id])
        # a failed add leaves nothing in flight either
        self.assertEqual(self.fetch_ids(store, Identity()), [])

    def test_an_add_sent_during_a_read_is_not_hidden_by_it(self) -> None:
        """A read that found nothing, with an add to its mailbox sent while it ran, is not remembered."""
        store = self.make_store()
        bob, alice = Identity(), Identity()
        env = make_env(alice, bob, b"racing")

        sent: list[int] = []

        def between() -> None:
            if not sent:
                sent.append(1)
                self.add(store, env)

        store.between_statements = between
        self.assertEqual(self.fetch_ids(store, bob), [])  # the read's snapshot is older than the add
        store.between_statements = None
        self.assertEqual(sent, [1])
        self.assertEqual(self.fetch_ids(store, bob), [env.msg_id])

    def test_the_mailboxes_known_empty_are_bounded(self) -> None:
        """EmptyMailboxes keeps the most recently used ``limit`` mailboxes and forgets the rest."""
        known = EmptyMailboxes(limit=2)
        for mailbox in ("a", "b", "c"):
            known.end_read(mailbox, known.begin_read(mailbox), True)
        self.assertEqual(len(known), 2)
        self.assertFalse(known.known_empty("a"))
        self.assertTrue(known.known_empty("b"))  # now the most recent: c goes first
        known.end_read("d", known.begin_read("d"), True)
        self.assertEqual([m for m in "abcd" if known.known_empty(m)], ["b", "d"])
        known.end_read("e", known.begin_read("e"), False)  # found mail: not remembered
        self.assertFalse(known.known_empty("e"))
        pending = known.begin_read("f")
        known.forget_all()
        known.end_read("f", pending, True)
        self.assertEqual([m for m in "bdf" if known.known_empty(m)], [])

    def test_a_changes_page_past_the_last_seq_needs_no_read(self) -> None:
        """changes(since >= the last committed seq) answers an empty page without reading."""
        metrics = Metrics()
        store = self.make_store(metrics=metrics)
        skipped = metrics.store_reads_skipped_total.labels("feed_end")
        bob, alice = Identity(), Identity()
        self.add(store, make_env(alice, bob, b"one"))
        last = store._seq
        for since in (last, last + 1, 2**70):
            page = self.successResultOf(store.changes(since, 10, T0))
            self.assertEqual((page.items, page.next, page.more, page.feed), ([], since, False, store.feed_id))
        self.assertEqual(skipped._value.get(), 3)
        page = self.successResultOf(store.changes(last - 1, 10, T0))
        self.assertEqual((len(page.items), page.next, skipped._value.get()), (1, last, 3))

    def test_a_page_of_replicas_is_one_write_operation(self) -> None:
        """add_envelopes crosses to the writer as one operation, whatever the page's length."""
        writer = ManualExecutor()
        store = self.make_store(writer=writer)
        bob, alice = Identity(), Identity()
        hold = store.claim_nonce("x", "y", T0 + 60)  # occupies the writer
        page = [make_env(alice, bob, b"%d" % i) for i in range(5)]
        d = store.add_envelopes(page, T0, peer="http://p.test")
        writer.release()
        self.assertTrue(self.successResultOf(hold))
        ((_, (ops,), _),) = writer.jobs
        self.assertEqual([op[0] for op in ops], ["add_many"])
        writer.release()
        self.assertEqual([r.status for r in self.successResultOf(d)], [ACCEPTED] * 5)

    def test_the_writer_connection_has_the_larger_page_cache(self) -> None:
        """The writer's connection caches WRITER_CACHE_KIB of pages, a reader's READER_CACHE_KIB."""
        store = self.make_store()
        assert isinstance(store, SQLiteStore)
        self.assertGreater(sqlite_store.WRITER_CACHE_KIB, sqlite_store.READER_CACHE_KIB)
        (writer,) = store._wconn.execute("PRAGMA cache_size").fetchone()
        self.assertEqual(writer, -sqlite_store.WRITER_CACHE_KIB)
        reader = sqlite_store._connect(store.path, "normal")
        self.addCleanup(reader.close)
        self.assertEqual(reader.execute("PRAGMA cache_size").fetchone()[0], -sqlite_store.READER_CACHE_KIB)

    def test_a_deposit_checks_its_caps_from_the_one_mailbox_index(self) -> None:
        """Schema 7: envelopes has one index per mailbox (with the sender), and the add check reads only covering indexes."""
        store = self.make_store()
        assert isinstance(store, SQLiteStore)
        conn = store._wconn
        indexes = {
            r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'envelopes'")
        }
        self.assertEqual(indexes, {"sqlite_autoindex_envelopes_1", "envelopes_by_mailbox", "envelopes_by_expiry"})
        columns = [r[2] for r in conn.execute("PRAGMA index_info(envelopes_by_mailbox)")]
        self.assertEqual(columns, ["mailbox", "seq", "expires", "sender"])
        plan = [
            r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sqlite_core._ADD_CHECKS, ("0" * 64, "m", T0, "s", b"k"))
        ]
        on_envelopes = [step for step in plan if " envelopes " in step]
        self.assertEqual(len(on_envelopes), 2, plan)
        self.assertTrue(all("USING COVERING INDEX" in step for step in on_envelopes), plan)
        self.assertIn("envelopes_by_mailbox (mailbox=?)", " ".join(on_envelopes))

    def test_upgrade_from_schema_6_keeps_counting_each_sender(self) -> None:
        """A store made at schema 6 gets the new mailbox index; its envelopes still count toward both caps."""
        bob, alice, dave = Identity(), Identity(), Identity()
        old = [make_env(alice, bob, b"1"), make_env(alice, bob, b"2"), make_env(dave, bob, b"3")]
        statements = schema_statements(self.dialect, 6)
        for seq, env in enumerate(old, 1):
            statements.append(
                (
                    "INSERT INTO envelopes (seq, msg_id, mailbox, sender, expires, size, body) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (seq, env.msg_id, env.mailbox, env.sender, env.expires, len(env.raw), env.raw),
                )
            )
        statements += [
            ("UPDATE meta SET value = '3' WHERE key = 'last_seq'", ()),
            ("UPDATE meta SET value = '3' WHERE key = 'stored_count'", ()),
            ("UPDATE meta SET value = ? WHERE key = 'stored_bytes'", (str(sum(len(e.raw) for e in old)),)),
        ]
        self.raw_sql(statements)
        store = self.make_store(Caps(per_sender_pending=2, per_mailbox_pending=4))
        self.assertEqual(store.migrated_from, 6)
        self.assertEqual(self.add(store, make_env(alice, bob, b"4")), AddResult(SENDER_CAP, pending=2, limit=2))
        fourth = make_env(dave, bob, b"5")
        self.assertEqual(self.add(store, fourth).status, ACCEPTED)
        self.assertEqual(self.add(store, make_env(Identity(), bob, b"6")).status, MAILBOX_FULL)
        self.assertEqual(self.add(store, old[0]), AddResult(DUPLICATE))
        self.assertEqual(sorted(self.fetch_ids(store, bob)), sorted([e.msg_id for e in [*old, fourth]]))

    def test_a_failing_item_fails_the_page_but_not_its_neighbours(self) -> None:
        """One add of a page failing in SQLite: the call fails with StoreError, the others are stored."""
        metrics = Metrics()
        store = self.make_store(metrics=metrics)
        bob, alice = Identity(), Identity()
        page = [make_env(alice, bob, b"%d" % i) for i in range(3)]
        real_add = sqlite_core._add

        def failing_add(conn: Any, st: Any, caps: Caps, args: tuple[Any, ...]) -> AddResult:
            if args[0] == page[1].msg_id:
                conn.execute("INSERT INTO envelopes (seq) VALUES (NULL)")  # violates NOT NULL
            return real_add(conn, st, caps, args)

        self.patch(sqlite_core, "_add", failing_add)
        f = self.failureResultOf(store.add_envelopes(page, T0), StoreError)
        self.assertIn("NOT NULL", f.getErrorMessage())
        self.assertEqual(sorted(self.fetch_ids(store, bob)), sorted([page[0].msg_id, page[2].msg_id]))
        self.assertEqual(metrics.value("meshrelay_store_errors_total"), 1)
        self.assertEqual(store.stats().envelopes, 2)


@requires_pg
class PostgresStoreTests(FirstContactStoreBehaviour, SynchronousTestCase):
    """The behaviour suite on the PostgreSQL store (its own schema per test)."""

    shared = True

    def setUp(self) -> None:
        self.dsn = create_schema(self.addCleanup)

    dialect = "postgresql"

    def open_store(self, caps: Caps, writer: Executor | None, metrics: Metrics | None) -> Store:
        from meshrelay.store.postgres import PostgresStore

        return PostgresStore(self.dsn, caps, writer=writer or InlineExecutor(), metrics=metrics)

    def raw_sql(self, statements: list[tuple[str, tuple[Any, ...]]]) -> list[tuple[Any, ...]]:
        import psycopg

        rows: list[tuple[Any, ...]] = []
        with psycopg.connect(self.dsn) as conn:
            for stmt, args in statements:
                cur = conn.execute(stmt.replace("?", "%s") if args else stmt, args or None)
                rows = cur.fetchall() if cur.description else []
        return rows
