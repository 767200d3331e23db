"""The SQLite writer in a child process: same results as in-process, crash and restart, clean stop."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from meshrelay import envelope as E
from meshrelay.store.base import Caps, StoreError
from meshrelay.store.sqlite import DB_NAME, SQLiteStore
from meshrelay.store.writer_process import ProcessWriter
from tests.helpers import Identity

pytestmark = pytest.mark.integration


class WriterProcessTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        self.caps = Caps(per_sender_pending=2, per_mailbox_pending=10, max_stored_bytes=1 << 20)
        self.writer = ProcessWriter(reactor, os.path.join(self.dir, DB_NAME), "normal", self.caps)
        os.makedirs(self.dir)
        self.store = SQLiteStore(self.dir, self.caps, writer_process=self.writer)
        self.store.start()
        self.addCleanup(self.store.close)
        self.alice, self.bob = Identity(), Identity()
        self.now = int(time.time())

    def env(self, text: bytes, sender: Identity | None = None) -> E.Envelope:
        obj = (sender or self.alice).envelope(self.bob, text, ts=self.now)
        return E.parse_envelope(obj, 8192)

    @inlineCallbacks
    def test_group_commit_results(self) -> Any:
        """Deposits, duplicates, the sender cap and signature checks come back from the child."""
        a, b, c = self.env(b"1"), self.env(b"2"), self.env(b"3")
        results = yield gatherResults(
            [
                self.store.add_envelope(a, self.now, verify="deposit"),
                self.store.add_envelope(a, self.now, verify="deposit"),
                self.store.add_envelope(b, self.now, verify="deposit"),
                self.store.add_envelope(c, self.now, verify="deposit"),
            ]
        )
        self.assertEqual([r.status for r in results], ["accepted", "duplicate", "accepted", "sender_cap"])
        self.assertEqual(self.store.stats().envelopes, 2)
        forged_obj = self.bob.envelope(self.bob, b"x", ts=self.now)
        forged_obj["sig"] = self.alice.envelope(self.bob, b"x", ts=self.now)["sig"]
        forged = E.parse_envelope(forged_obj, 8192)
        result = yield self.store.add_envelope(forged, self.now, verify="deposit")
        self.assertEqual(result.status, "bad_signature")
        bodies, more = yield self.store.fetch(self.bob.pub, self.now, 10)
        self.assertEqual(len(bodies), 2)
        fresh = yield self.store.claim_nonce("poll:x", "n1", self.now + 600)
        again = yield self.store.claim_nonce("poll:x", "n1", self.now + 600)
        self.assertEqual((fresh, again), (True, False))

    @inlineCallbacks
    def test_refusals_and_junk_bounds_run_in_the_child(self) -> Any:
        """A peer's capped replica is remembered and acks are accounted by the child, with its caps."""
        yield self.store.add_envelope(self.env(b"1"), self.now, verify="deposit")
        yield self.store.add_envelope(self.env(b"2"), self.now, verify="deposit")
        capped = self.env(b"3")
        result = yield self.store.add_envelope(capped, self.now, verify="replica", peer="http://p.test")
        self.assertEqual((result.status, result.remembered), ("sender_cap", True))
        rows = yield self.store.refused(self.now, 10)
        self.assertEqual([(r.msg_id, r.peer) for r in rows], [(capped.msg_id, "http://p.test")])
        before = self.store.stats().bytes
        junk = E.parse_signed_ack(Identity().signed(ts=self.now, ack=[f"{i:064x}" for i in range(200)]))
        ack_result = yield self.store.apply_ack(junk, self.now + 600)
        self.assertGreater(self.store.stats().bytes, before)
        # the child's junk budget (1/8 of max_stored_bytes = 128 KiB) holds the 200 tombstones and the ack
        self.assertEqual((ack_result.skipped, ack_result.stored), (0, True))

    @inlineCallbacks
    def test_writes_of_one_reactor_turn_leave_as_one_batch(self) -> Any:
        """The first write of a turn does not leave alone: every write made before the reactor turns joins it."""
        sent: list[int] = []
        run = self.writer.run

        def counting_run(ops: list[Any]) -> Deferred[Any]:
            sent.append(len(ops))
            return run(ops)

        self.writer.run = counting_run  # type: ignore[method-assign]
        senders = [Identity() for _ in range(5)]
        results = yield gatherResults(
            [self.store.add_envelope(self.env(b"m", s), self.now, verify="deposit") for s in senders]
        )
        self.assertEqual([r.status for r in results], ["accepted"] * 5)
        self.assertEqual(sent, [5])

    @inlineCallbacks
    def test_replica_duplicate_is_not_reverified(self) -> Any:
        """A replica already stored is a duplicate even with a broken signature; a new forged one is refused."""
        a = self.env(b"1")
        yield self.store.add_envelope(a, self.now, verify="deposit")
        obj = a.to_json()
        sig = bytearray(E.b64u_decode(obj["sig"]))
        sig[0] ^= 1
        copy = E.parse_envelope(dict(obj, sig=E.b64u_encode(bytes(sig))), 8192)
        result = yield self.store.add_envelope(copy, self.now, verify="replica")
        self.assertEqual(result.status, "duplicate")
        other = self.env(b"other", sender=Identity())
        bad = E.parse_envelope(dict(other.to_json(), sig=E.b64u_encode(bytes(sig))), 8192)
        result = yield self.store.add_envelope(bad, self.now, verify="replica")
        self.assertEqual(result.status, "bad_signature")

    @inlineCallbacks
    def test_child_crash_fails_the_batch_and_a_new_child_takes_over(self) -> Any:
        """A killed writer fails its in-flight writes with StoreError; later writes start a new child."""
        yield self.store.add_envelope(self.env(b"1"), self.now, verify="deposit")
        pid = self.writer.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        # Wait until the parent has seen the child end.
        for _ in range(200):
            if self.writer.pid is None:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertIsNone(self.writer.pid)
        self.flushLoggedErrors()
        # Within the restart delay (held open here, not timed) writes fail cleanly ...
        self.writer._next_spawn = float("inf")
        failed = yield self.store.claim_nonce("s", "n", self.now + 10).addErrback(lambda f: f.trap(StoreError))
        self.assertEqual(failed, StoreError)
        self.writer._next_spawn = 0.0
        # ... then a new child serves them, with the counters read back from the database.
        result = yield self.store.add_envelope(self.env(b"2", sender=Identity()), self.now, verify="deposit")
        self.assertEqual(result.status, "accepted")
        self.assertEqual(self.writer.spawned, 2)
        self.assertEqual(self.store.stats().envelopes, 2)

    @inlineCallbacks
    def test_new_caps_reach_the_running_child_and_a_respawned_one(self) -> Any:
        """A config reload's caps (``store.caps = ...``) apply in the child from the next batch, and after a respawn."""
        yield self.store.add_envelope(self.env(b"1"), self.now, verify="deposit")
        yield self.store.add_envelope(self.env(b"2"), self.now, verify="deposit")
        result = yield self.store.add_envelope(self.env(b"3"), self.now, verify="deposit")
        self.assertEqual(result.status, "sender_cap")
        self.store.caps = Caps(per_sender_pending=3, per_mailbox_pending=10, max_stored_bytes=1 << 20, max_policies=7)
        result = yield self.store.add_envelope(self.env(b"3"), self.now, verify="deposit")
        self.assertEqual(result.status, "accepted")
        result = yield self.store.add_envelope(self.env(b"4"), self.now, verify="deposit")
        self.assertEqual(result.status, "sender_cap")
        self.assertEqual(self.writer.spawned, 1)
        # A respawned child starts with the new caps (its argv), max_policies included.
        self.assertEqual(self.writer.argv[-5:], ["3", "10", str(1 << 20), "100000", "7"])
        pid = self.writer.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        for _ in range(200):
            if self.writer.pid is None:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.flushLoggedErrors()
        self.writer._next_spawn = 0.0
        self.store.caps = Caps(per_sender_pending=4, per_mailbox_pending=10, max_stored_bytes=1 << 20)
        result = yield self.store.add_envelope(self.env(b"4"), self.now, verify="deposit")
        self.assertEqual((result.status, self.writer.spawned), ("accepted", 2))

    @inlineCallbacks
    def test_a_child_that_cannot_be_started_fails_the_write(self) -> Any:
        """fork/exec failing answers the batch with StoreError (never a hang); a later write starts a child."""
        other = os.path.abspath(self.mktemp())
        os.makedirs(other)
        writer = ProcessWriter(reactor, os.path.join(other, DB_NAME), "normal", self.caps)
        store = SQLiteStore(other, self.caps, writer_process=writer)  # not started: no child yet
        self.addCleanup(store.close)
        spawn = writer._spawn

        def cannot_fork() -> None:
            raise OSError(11, "Resource temporarily unavailable")

        writer._spawn = cannot_fork  # type: ignore[method-assign]
        failed = yield store.add_envelope(self.env(b"1"), self.now, verify="deposit").addErrback(
            lambda f: f.trap(StoreError)
        )
        self.assertEqual(failed, StoreError)
        writer._spawn = spawn  # type: ignore[method-assign]
        writer._next_spawn = 0.0
        result = yield store.add_envelope(self.env(b"2"), self.now, verify="deposit")
        self.assertEqual(result.status, "accepted")

    @inlineCallbacks
    def test_close_lets_queued_writes_commit_and_stops_the_child(self) -> Any:
        """close() waits for queued writes, then the child exits."""
        envs = [E.parse_envelope(self.alice.envelope(Identity(), b"%d" % i, ts=self.now), 8192) for i in range(20)]
        ds = [self.store.add_envelope(env, self.now) for env in envs]
        pid = self.writer.pid
        closing: Deferred[None] = self.store.close()
        results = yield gatherResults(ds)
        self.assertEqual({r.status for r in results}, {"accepted"})
        yield closing
        self.assertIsNone(self.writer.pid)
        assert pid is not None
        self.assertRaises(ProcessLookupError, os.kill, pid, 0)
        reopened = SQLiteStore(self.dir, self.caps)
        self.assertEqual(reopened.stats().envelopes, 20)
        reopened._wconn.close()

    @inlineCallbacks
    def test_the_child_runs_as_sched_batch(self) -> Any:
        """The real child runs as SCHED_BATCH: woken by the node's pipe write, it does not preempt the node's reactor."""
        if not hasattr(os, "sched_getscheduler"):
            self.skipTest("no sched_getscheduler on this platform")
        yield self.store.add_envelope(self.env(b"one"), self.now)
        assert self.writer.pid is not None
        self.assertEqual(os.sched_getscheduler(self.writer.pid), os.SCHED_BATCH)


class WriterIsolationTests(TestCase):
    """Issue 10 item 6: the writer child imports only the real package, and writes private files."""

    timeout = 60

    def setUp(self) -> None:
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.caps = Caps(per_sender_pending=2, per_mailbox_pending=10, max_stored_bytes=1 << 20)

    def open_store(self, data_dir: str) -> SQLiteStore:
        writer = ProcessWriter(reactor, os.path.join(data_dir, DB_NAME), "normal", self.caps)
        store = SQLiteStore(data_dir, self.caps, writer_process=writer)
        store.start()
        self.addCleanup(store.close)
        return store

    @inlineCallbacks
    def test_bogus_package_in_the_working_directory_is_not_imported(self) -> Any:
        """A meshrelay/ package in the cwd is not imported by the writer child; its writes still commit."""
        cwd = os.path.join(self.base, "cwd")
        marker = os.path.join(self.base, "imported-from-cwd")
        os.makedirs(os.path.join(cwd, "meshrelay", "store"))
        with open(os.path.join(cwd, "meshrelay", "__init__.py"), "w") as fh:
            fh.write(f"open({marker!r}, 'w').close()\nraise ImportError('bogus meshrelay from the cwd')\n")
        open(os.path.join(cwd, "meshrelay", "store", "__init__.py"), "w").close()
        old = os.getcwd()
        os.chdir(cwd)
        self.addCleanup(os.chdir, old)
        store = self.open_store(os.path.join(self.base, "data"))
        fresh = yield store.claim_nonce("poll:x", "n1", int(time.time()) + 600)
        self.assertTrue(fresh)
        self.assertFalse(os.path.exists(marker))

    @inlineCallbacks
    def test_data_directory_and_files_are_private_whatever_the_umask(self) -> Any:
        """With umask 000 the data dir is 0700 and the database, -wal and -shm the child writes are 0600."""
        old = os.umask(0)
        self.addCleanup(os.umask, old)
        data_dir = os.path.join(self.base, "data")
        store = self.open_store(data_dir)
        env = E.parse_envelope(Identity().envelope(Identity(), b"x", ts=int(time.time())), 8192)
        result = yield store.add_envelope(env, int(time.time()))
        self.assertEqual(result.status, "accepted")
        self.assertEqual(os.stat(data_dir).st_mode & 0o777, 0o700)
        names = sorted(os.listdir(data_dir))
        self.assertIn(DB_NAME + "-wal", names)
        for name in names:
            self.assertEqual(os.stat(os.path.join(data_dir, name)).st_mode & 0o777, 0o600, name)
