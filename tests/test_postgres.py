"""What only a store shared by several processes must show: PostgreSQL under concurrency.

Each "process" here is a :class:`PostgresStore` of its own (its own writer
connection) driven by a thread of its own, all on one schema.  The stores
run inline (each batch on its thread), so the test threads are real
concurrent writers of the database.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from meshrelay.config import build_config
from meshrelay.executor import ThreadExecutor
from meshrelay.store import migrations, open_store
from meshrelay.store.base import ACCEPTED, MAILBOX_FULL, SENDER_CAP, STORAGE_FULL, AddResult, Caps, StoreError
from tests.helpers import T0, Identity
from tests.pgtest import create_schema, requires_pg, sql
from tests.test_store import make_ack, make_env, tomb

GUARD = 60.0  # seconds: failure guard for waits, never an assertion on speed


def result_of(d: Deferred[Any]) -> Any:
    """The result of an already-fired Deferred (inline stores fire before returning)."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def run_threads(fns: list[Callable[[], Any]]) -> list[Any]:
    """Run each function on its own thread, released together; re-raise the first error."""
    barrier = threading.Barrier(len(fns))
    results: list[Any] = [None] * len(fns)
    errors: list[BaseException] = []

    def wrap(i: int, fn: Callable[[], Any]) -> None:
        try:
            barrier.wait(GUARD)
            results[i] = fn()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(GUARD)
        assert not t.is_alive(), "a writer thread did not finish"
    if errors:
        raise errors[0]
    return results


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + GUARD
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


class Hooks(dict[str, Callable[[], None]]):
    """A store's writer observer that runs the callable a test set for a point ("before_seq", "before_commit")."""

    def _run(self, point: str) -> None:
        hook = self.get(point)
        if hook is not None:
            hook()

    def before_seq(self) -> None:
        self._run("before_seq")

    def before_commit(self) -> None:
        self._run("before_commit")


class _StoreCase(SynchronousTestCase):
    """A fresh schema per test; :meth:`store` opens a store on it (closed at cleanup)."""

    def setUp(self) -> None:
        self.dsn = create_schema(self.addCleanup)

    def store(self, caps: Caps | None = None, observer: Hooks | None = None) -> Any:
        from meshrelay.store.postgres import PostgresStore

        s = PostgresStore(self.dsn, caps or Caps(), observer=observer)
        s.start()
        self.addCleanup(s.close)
        return s


@requires_pg
class SharedStateTests(_StoreCase):
    """Caps, dedup, tombstones, nonces and leases hold across stores sharing one database."""

    def test_concurrent_deposits_never_exceed_the_sender_cap(self) -> None:
        """Four processes racing deposits from one sender to one mailbox accept exactly the cap."""
        caps = Caps(per_sender_pending=5)
        stores = [self.store(caps) for _ in range(4)]
        for _ in range(3):
            bob, alice = Identity(), Identity()
            envs = [[make_env(alice, bob, b"%d-%02d" % (w, i)) for i in range(6)] for w in range(4)]

            def writer(store: Any, mine: list[Any]) -> list[str]:
                return [result_of(store.add_envelope(e, T0)).status for e in mine]

            statuses = sum(run_threads([lambda s=s, m=m: writer(s, m) for s, m in zip(stores, envs)]), [])
            self.assertEqual(statuses.count(ACCEPTED), 5)
            self.assertEqual(statuses.count(SENDER_CAP), 19)
            self.assertEqual(result_of(stores[0].count(bob.pub, T0)), 5)

    def test_concurrent_deposits_never_exceed_the_mailbox_cap(self) -> None:
        """Processes racing deposits from many senders to one mailbox accept exactly the mailbox cap."""
        caps = Caps(per_mailbox_pending=7)
        stores = [self.store(caps) for _ in range(3)]
        bob = Identity()
        envs = [[make_env(Identity(), bob, b"%d-%d" % (w, i)) for i in range(5)] for w in range(3)]
        statuses = sum(
            run_threads(
                [lambda s=s, m=m: [result_of(s.add_envelope(e, T0)).status for e in m] for s, m in zip(stores, envs)]
            ),
            [],
        )
        self.assertEqual((statuses.count(ACCEPTED), statuses.count(MAILBOX_FULL)), (7, 8))

    def test_concurrent_deposits_never_exceed_the_storage_cap(self) -> None:
        """The stored-bytes total is shared: racing processes never store past max_stored_bytes."""
        size = len(make_env(Identity(), Identity(), b"xx").raw)
        stores = [self.store(Caps(max_stored_bytes=10 * size + size // 2)) for _ in range(3)]
        envs = [[make_env(Identity(), Identity(), b"xx") for _ in range(6)] for _ in range(3)]
        statuses = sum(
            run_threads(
                [lambda s=s, m=m: [result_of(s.add_envelope(e, T0)).status for e in m] for s, m in zip(stores, envs)]
            ),
            [],
        )
        self.assertEqual((statuses.count(ACCEPTED), statuses.count(STORAGE_FULL)), (10, 8))
        totals = dict(sql(self.dsn, "SELECT key, value FROM meta WHERE key LIKE 'stored_%'"))
        self.assertEqual(totals, {"stored_count": "10", "stored_bytes": str(10 * size)})
        self.assertEqual(sql(self.dsn, "SELECT count(*), sum(size) FROM envelopes")[0], (10, 10 * size))

    def test_same_envelope_at_two_processes_is_stored_once(self) -> None:
        """The same envelope deposited at two processes at once is accepted once, duplicate once."""
        a, b = self.store(), self.store()
        for _ in range(5):
            env = make_env(Identity(), Identity())
            results = run_threads([lambda s=s, e=env: result_of(s.add_envelope(e, T0)) for s in (a, b)])
            self.assertEqual(sorted(r.status for r in results), ["accepted", "duplicate"])

    def test_tombstone_written_by_one_process_stops_the_other(self) -> None:
        """An ack applied through one process deletes the envelope for all and blocks its replica at another."""
        a, b = self.store(), self.store()
        bob, alice = Identity(), Identity()
        env = make_env(alice, bob)
        self.assertEqual(result_of(a.add_envelope(env, T0)).status, ACCEPTED)
        ack = make_ack(bob, [env.msg_id])
        self.assertEqual(result_of(b.apply_ack(ack, tomb(ack))).deleted, (env.msg_id,))
        self.assertEqual(result_of(a.add_envelope(env, T0)).status, "duplicate")
        self.assertFalse(result_of(a.apply_ack(ack, tomb(ack))).new)

    def test_a_nonce_is_claimed_by_exactly_one_process(self) -> None:
        """Racing claims of one nonce through several processes: exactly one wins."""
        stores = [self.store() for _ in range(4)]
        for i in range(10):
            wins = run_threads([lambda s=s, n=f"n{i}": result_of(s.claim_nonce("poll:m", n, T0 + 600)) for s in stores])
            self.assertEqual(wins.count(True), 1)

    def test_lease_has_one_holder_across_processes(self) -> None:
        """A lease is held by one process until it expires; then another may take it."""
        a, b = self.store(), self.store()
        name = "sync:http://peer.test"
        results = run_threads(
            [lambda: result_of(a.acquire_lease(name, "A", 30)), lambda: result_of(b.acquire_lease(name, "B", 30))]
        )
        self.assertEqual(sorted(results), [False, True])
        holder, other = (a, b) if results[0] else (b, a)
        hname, oname = ("A", "B") if results[0] else ("B", "A")
        self.assertTrue(result_of(holder.acquire_lease(name, hname, 30)))
        self.assertFalse(result_of(other.acquire_lease(name, oname, 30)))
        self.assertTrue(result_of(other.acquire_lease("sync:http://another.test", oname, 30)))
        sql(self.dsn, "UPDATE leases SET expires = 0 WHERE name = %s", (name,))  # let it run out
        self.assertTrue(result_of(other.acquire_lease(name, oname, 30)))
        self.assertFalse(result_of(holder.acquire_lease(name, hname, 30)))

    def test_bad_lease_ttl_is_refused(self) -> None:
        """A lease ttl that is not a positive finite number fails instead of granting a lease for ever."""
        a = self.store()
        for ttl in (0, -1, float("inf"), float("nan")):
            d = a.acquire_lease("x", "A", ttl)
            self.assertRaises(ValueError, result_of, d)

    def test_concurrent_start_migrates_once(self) -> None:
        """Processes starting together on an empty database migrate it once and share one feed id."""
        from meshrelay.store.postgres import PostgresStore

        stores = run_threads([lambda: PostgresStore(self.dsn, Caps()) for _ in range(5)])
        for s in stores:
            self.addCleanup(s.close)
        self.assertEqual(len({s.feed_id for s in stores}), 1)
        self.assertEqual(sorted(s.migrated_from for s in stores), [0] + [migrations.LATEST_VERSION] * 4)
        self.assertEqual(
            sql(self.dsn, "SELECT value FROM meta WHERE key = 'schema_version'"), [(str(migrations.LATEST_VERSION),)]
        )

    def test_stats_follow_other_processes_after_a_sweep(self) -> None:
        """A process's totals include other processes' writes once it commits or sweeps."""
        a, b = self.store(), self.store()
        env = make_env(Identity(), Identity())
        result_of(a.add_envelope(env, T0))
        self.assertEqual(b.stats().envelopes, 0)
        result_of(b.sweep(T0))
        self.assertEqual((b.stats().envelopes, b.stats().bytes), (1, len(env.raw)))


@requires_pg
class FeedOrderTests(_StoreCase):
    """The changes feed never skips a row that commits late."""

    def hold(self, hooks: Hooks, hook: str) -> tuple[threading.Event, threading.Event]:
        """Make the next batch of the store observed by ``hooks`` stop at ``hook`` until released."""
        reached, release = threading.Event(), threading.Event()

        def pause() -> None:
            hooks.pop(hook)
            reached.set()
            assert release.wait(GUARD), "never released"

        hooks[hook] = pause
        return reached, release

    def feed(self, reader: Any, since: int = 0) -> list[int]:
        return [i.seq for i in result_of(reader.changes(since, 500, T0)).items]

    def test_an_open_transaction_commits_above_what_was_read(self) -> None:
        """A batch still open while later ones commit gets a seq above theirs, so a reader past them misses nothing."""
        hooks = Hooks()
        slow, fast, reader = self.store(observer=hooks), self.store(), self.store()
        reached, release = self.hold(hooks, "before_seq")
        late = make_env(Identity(), Identity(), b"late")
        box: list[AddResult] = []
        t = threading.Thread(target=lambda: box.append(result_of(slow.add_envelope(late, T0))))
        t.start()
        self.assertTrue(reached.wait(GUARD))
        # The slow transaction is open (it has checked and locked its mailbox); others commit meanwhile.
        seqs = [result_of(fast.add_envelope(make_env(Identity(), Identity(), b"%d" % i), T0)).seq for i in range(3)]
        self.assertEqual(self.feed(reader), seqs)
        cursor = seqs[-1]
        release.set()
        t.join(GUARD)
        self.assertGreater(box[0].seq, cursor)
        self.assertEqual(self.feed(reader, cursor), [box[0].seq])

    def test_reader_does_not_pass_a_numbered_uncommitted_row(self) -> None:
        """While a numbered batch is uncommitted, nothing at or above its seq is visible, and later writers wait."""
        hooks = Hooks()
        slow, fast, reader = self.store(observer=hooks), self.store(), self.store()
        reached, release = self.hold(hooks, "before_commit")
        first = make_env(Identity(), Identity(), b"first")
        second = make_env(Identity(), Identity(), b"second")
        results: dict[str, AddResult] = {}
        t1 = threading.Thread(target=lambda: results.update(slow=result_of(slow.add_envelope(first, T0))))
        t1.start()
        self.assertTrue(reached.wait(GUARD))
        t2 = threading.Thread(target=lambda: results.update(fast=result_of(fast.add_envelope(second, T0))))
        t2.start()
        # The later writer is queued behind the sequence lock, not committed with a higher seq.
        wait_until(
            lambda: (
                sql(self.dsn, "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (fast.writer_pid,))
                == [("Lock",)]
            ),
            "the second writer to wait for the sequence lock",
        )
        self.assertEqual(self.feed(reader), [])
        self.assertEqual(result_of(reader.fetch(first.mailbox, T0, 10)), ([], False))
        release.set()
        t1.join(GUARD)
        t2.join(GUARD)
        self.assertEqual((results["slow"].seq, results["fast"].seq), (1, 2))
        self.assertEqual(self.feed(reader), [1, 2])

    def test_a_reader_following_concurrent_writers_sees_every_row(self) -> None:
        """A reader paging with its cursor while three processes write sees every accepted row exactly once."""
        writers = [self.store() for _ in range(3)]
        reader = self.store()
        done = threading.Event()
        seen: list[int] = []
        accepted: list[int] = []
        lock = threading.Lock()

        def write(store: Any) -> None:
            for i in range(40):
                r = result_of(store.add_envelope(make_env(Identity(), Identity(), b"%d" % i), T0))
                with lock:
                    accepted.append(r.seq)

        def read() -> None:
            since = 0
            while True:
                finished = done.is_set()
                page = result_of(reader.changes(since, 7, T0))
                seen.extend(i.seq for i in page.items)
                since = page.next
                if finished and not page.more:
                    return

        rt = threading.Thread(target=read)
        rt.start()
        run_threads([lambda s=s: write(s) for s in writers])
        done.set()
        rt.join(GUARD)
        self.assertEqual(len(accepted), 120)
        self.assertEqual(seen, sorted(accepted))


@requires_pg
class FailureTests(_StoreCase):
    """Connection failures and bad DSNs give StoreError, never a hang or a lost answer."""

    def test_unreachable_database_is_a_one_line_store_error(self) -> None:
        """Opening a store on a port where nothing listens raises StoreError with one line."""
        from meshrelay.store.postgres import PostgresStore

        with self.assertRaises(StoreError) as cm:
            PostgresStore("postgresql://postgres@127.0.0.1:1/test?connect_timeout=3", Caps())
        text = str(cm.exception)
        self.assertIn("127.0.0.1:1/test", text)
        self.assertNotIn("\n", text)

    def test_malformed_dsn_is_a_one_line_store_error(self) -> None:
        """A DSN that does not parse raises StoreError and does not echo it (it may hold a password)."""
        from meshrelay.store.postgres import PostgresStore

        with self.assertRaises(StoreError) as cm:
            PostgresStore("host=127.0.0.1 password=s3cret port", Caps())
        self.assertNotIn("\n", str(cm.exception))
        self.assertNotIn("s3cret", str(cm.exception))

    def test_open_store_selects_postgresql(self) -> None:
        """[store] backend = "postgresql" with a dsn opens the PostgreSQL store; a bad one fails cleanly."""
        from meshrelay.store.postgres import PostgresStore

        cfg = build_config({"node": {"data_dir": self.mktemp()}, "store": {"backend": "postgresql", "dsn": self.dsn}})
        store = open_store(cfg, global_reactor)
        self.addCleanup(store.close)
        self.assertIsInstance(store, PostgresStore)
        bad = build_config(
            {
                "node": {"data_dir": self.mktemp()},
                "store": {"backend": "postgresql", "dsn": "postgresql://x@127.0.0.1:1/y"},
            }
        )
        self.assertRaises(StoreError, open_store, bad, global_reactor)

    def test_writer_reconnects_after_its_connection_dies(self) -> None:
        """A killed writer connection fails the batch in flight (503) and the next write reconnects."""
        s = self.store()
        result_of(s.add_envelope(make_env(Identity(), Identity()), T0))
        old = s.writer_pid
        sql(self.dsn, "SELECT pg_terminate_backend(%s)", (old,))
        self.assertRaises(StoreError, result_of, s.add_envelope(make_env(Identity(), Identity()), T0))
        self.assertEqual(result_of(s.add_envelope(make_env(Identity(), Identity()), T0)).status, ACCEPTED)
        self.assertNotEqual(s.writer_pid, old)

    def test_reads_survive_a_killed_reader_connection(self) -> None:
        """A read on a connection the server killed is retried once on a fresh connection."""
        s = self.store()
        bob = Identity()
        result_of(s.add_envelope(make_env(Identity(), bob), T0))
        self.assertEqual(result_of(s.count(bob.pub, T0)), 1)
        sql(
            self.dsn,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'meshrelay-reader'",
        )
        self.assertEqual(result_of(s.count(bob.pub, T0)), 1)

    def test_a_failure_before_commit_reruns_each_operation_alone(self) -> None:
        """A failure that belongs to no single operation retries each one in its own transaction."""
        from meshrelay.store.postgres import PostgresStore
        from tests.test_store import ManualExecutor

        writer = ManualExecutor()
        hooks = Hooks()
        s = PostgresStore(self.dsn, Caps(), writer=writer, observer=hooks)
        s.start()
        self.addCleanup(s.close)
        calls = [0]

        def boom() -> None:
            calls[0] += 1
            if calls[0] == 1:
                raise RuntimeError("injected")

        first = s.claim_nonce("x", "0", T0 + 60)
        a = s.add_envelope(make_env(Identity(), Identity(), b"a"), T0)
        b = s.add_envelope(make_env(Identity(), Identity(), b"b"), T0)
        writer.release()
        result_of(first)
        hooks["before_commit"] = boom
        writer.release()
        self.assertEqual([result_of(a).status, result_of(b).status], [ACCEPTED, ACCEPTED])
        self.assertEqual(calls[0], 3)
        self.assertEqual(sql(self.dsn, "SELECT count(*) FROM envelopes")[0][0], 2)


@requires_pg
class WakeTests(TestCase):
    """NOTIFY wakes long-polls of other processes, with a re-check while the listener is down."""

    timeout = 120

    def setUp(self) -> None:
        self.dsn = create_schema(self.addCleanup)

    def threaded_store(self) -> Any:
        from meshrelay.store.postgres import PostgresStore

        s = PostgresStore(
            self.dsn,
            Caps(),
            reactor=global_reactor,
            writer=ThreadExecutor(global_reactor, 1, "test-writer"),
            readers=ThreadExecutor(global_reactor, 2, "test-readers"),
            fallback_interval=0.2,
        )
        s.start()
        self.addCleanup(s.close)
        return s

    @inlineCallbacks
    def wait_for(self, predicate: Callable[[], bool], what: str) -> Any:
        deadline = time.monotonic() + GUARD
        while not predicate():
            self.assertLess(time.monotonic(), deadline, f"timed out waiting for {what}")
            yield deferLater(global_reactor, 0.02, lambda: None)

    @inlineCallbacks
    def test_deposit_through_one_process_wakes_another(self) -> Any:
        """An envelope committed by store A reaches store B's wake callback, once per mailbox, not A's."""
        a, b = self.threaded_store(), self.threaded_store()
        woken_a: list[str] = []
        woken_b: list[str] = []
        a.set_wake_callback(woken_a.append, lambda: [])
        b.set_wake_callback(woken_b.append, lambda: [])
        yield self.wait_for(lambda: a.listening and b.listening, "both listeners")
        bob = Identity()
        now = int(time.time())
        r = yield a.add_envelope(make_env(Identity(), bob, ts=now), now)
        self.assertEqual(r.status, ACCEPTED)
        yield self.wait_for(lambda: bob.pub in woken_b, "the wake-up at B")
        self.assertEqual(woken_a, [])  # A's relay wakes its own waiters directly

    @inlineCallbacks
    def test_waiters_are_rechecked_while_notifications_are_down(self) -> Any:
        """With the listening connection killed and not coming back, waiting mailboxes with mail are still woken."""
        import psycopg

        from meshrelay.store import postgres

        a, b = self.threaded_store(), self.threaded_store()
        bob, carol = Identity(), Identity()
        woken: list[str] = []
        b.set_wake_callback(woken.append, lambda: [bob.pub, carol.pub])
        yield self.wait_for(lambda: b.listening, "B's listener")
        # Keep B's listener from reconnecting, then kill its connection.
        real_connect = postgres.connect
        blocked = [True]

        def connect(dsn: str, role: str, **kw: Any) -> Any:
            if role == "listener" and blocked[0]:
                raise psycopg.OperationalError("blocked by the test")
            return real_connect(dsn, role, **kw)

        self.patch(postgres, "connect", connect)
        sql(
            self.dsn,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'meshrelay-listener'",
        )
        yield self.wait_for(lambda: b.listening is False, "B to notice the lost listener")
        now = int(time.time())  # the re-check looks for mail live at the reactor's time
        yield a.add_envelope(make_env(Identity(), bob, ts=now), now)
        yield self.wait_for(lambda: bob.pub in woken, "the fallback re-check to wake bob")
        self.assertNotIn(carol.pub, woken)  # no mail: not woken
        blocked[0] = False
        yield self.wait_for(lambda: b.listening is True, "B's listener to reconnect")
        woken.clear()
        dave = Identity()
        yield a.add_envelope(make_env(Identity(), dave, ts=now), now)
        yield self.wait_for(lambda: dave.pub in woken, "a notification after reconnecting")
