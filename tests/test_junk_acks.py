"""Acks are storage (issue 10): junk acks from throwaway mailboxes are accounted and bounded on a real node."""

from __future__ import annotations

import os
import sqlite3

from twisted.trial.unittest import SynchronousTestCase

from meshrelay.store.base import Caps, junk_budget
from meshrelay.store.sqlite import DB_NAME
from tests.adminhelpers import AdminClient
from tests.helpers import Identity, MemNode, make_config

CAP = 512 * 1024
#: the attack of issue 10, scaled down: signed polls from throwaway mailboxes, each acking 500 made-up ids
POLLS = 60
IDS = 500


def db_bytes(data_dir: str) -> int:
    """The SQLite database file's size once the WAL is checkpointed into it (the WAL is slack)."""
    path = os.path.join(data_dir, DB_NAME)
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    finally:
        conn.close()
    return os.path.getsize(path)


class JunkAckTests(SynchronousTestCase):
    def setUp(self) -> None:
        tmp = self.mktemp()
        self.cfg = make_config(tmp, max_stored_bytes=CAP, per_mailbox_pending=1000, per_sender_pending=1000)
        self.mem = MemNode(tmp, config=self.cfg)
        self.admin = AdminClient(self.mem)
        self.addCleanup(self.mem.stop)

    def test_junk_acks_are_counted_bounded_and_leave_room_for_mail(self) -> None:
        """Polls acking made-up ids: stored_bytes counts them, they stay in the junk budget, mail still fits."""
        data_dir = self.cfg.node.data_dir
        before = db_bytes(data_dir)
        for n in range(POLLS):
            status, _ = self.mem.poll(Identity(), ack=[f"{n:08x}{i:056x}" for i in range(IDS)])
            self.assertEqual(status, 200)
        stored = self.mem.node.store.stats().bytes
        metrics = self.admin.metrics()
        self.assertEqual(metrics[("meshrelay_stored_bytes", frozenset())], stored)
        self.assertGreater(stored, 0)
        self.assertLessEqual(stored, junk_budget(Caps(max_stored_bytes=CAP)))
        # the files grew by about what is accounted, not by 30,000 tombstones and 60 acks (~10 MB)
        self.assertLess(db_bytes(data_dir) - before, CAP)
        # the owner of a mailbox can still receive and ack mail
        bob, alice = Identity(), Identity()
        env = alice.envelope(bob, b"real mail")
        self.assertEqual(self.mem.send(env)[0], 200)
        status, body = self.mem.poll(bob, ack=[env["msg_id"]])
        self.assertEqual(status, 200)
        self.assertEqual(self.mem.node.store.stats().envelopes, 0)
