"""``meshrelay backup`` of a serving node under load, and ``meshrelay restore`` on a new data dir: two real nodes.

B is backed up while a bounded deposit loop runs at it; more deposits and acks
follow; B is destroyed and restored from the backup on a new data dir (same
public_url) while A is down, takes deposits A cannot be pushed, and then both
converge: the same live set on both nodes, nothing acked back, nothing
deposited lost.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import threading
import time

import pytest
from twisted.trial.unittest import SynchronousTestCase

from tests.harness import REPO, NodeProcess, changes_page
from tests.helpers import Identity, link_secret
from tests.test_integration_mesh import feed, wait_for

pytestmark = pytest.mark.integration


def meshrelay(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run the ``meshrelay`` command of this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "meshrelay.cli", *argv], env=env, capture_output=True, text=True, timeout=300
    )


class BackupRestoreIntegrationTests(SynchronousTestCase):
    def setUp(self) -> None:
        base = os.path.abspath(self.mktemp())
        config = {"sync": {"interval": 2, "push_timeout": 2}, "limits": {"per_mailbox_pending": 5000}}
        self.a = NodeProcess(base, "a", config=config)
        self.b = NodeProcess(base, "b", config=config)
        self.a.peers = [{"url": self.b.url, "secret": link_secret("a", "b")}]
        self.b.peers = [{"url": self.a.url, "secret": link_secret("a", "b")}]
        self.addCleanup(self.check_logs)
        for p in (self.a, self.b):
            p.start(wait=False)
            self.addCleanup(p.stop)
        for p in (self.a, self.b):
            p.wait_ready()
        self.boxes = [Identity() for _ in range(4)]
        self.sent: set[str] = set()
        self.box_of: dict[str, Identity] = {}

    def check_logs(self) -> None:
        for p in (self.a, self.b):
            with open(p.log_path, "rb") as fh:
                text = fh.read().decode(errors="replace")
            for marker in ("Traceback", "Unhandled error", "Unhandled Error"):
                self.assertNotIn(marker, text, f"node {p.name} logged {marker!r}:\n{p.tail_log(60)}")

    def deposit(self, node: NodeProcess, n: int, tag: str) -> list[str]:
        ids = []
        for i in range(n):
            box = self.boxes[len(self.sent) % 4]
            env = Identity().envelope(box, b"%s %d" % (tag.encode(), i), ts=int(time.time()))
            status, body = node.send(env)
            self.assertEqual(status, 200, body)
            self.sent.add(env["msg_id"])
            self.box_of[env["msg_id"]] = box
            ids.append(env["msg_id"])
        return ids

    def ack(self, node: NodeProcess, ids: list[str]) -> None:
        for box in self.boxes:
            mine = [m for m in ids if self.box_of[m] is box]
            if mine:
                status, body = node.poll(box.poll_body(ts=int(time.time()), ack=mine, limit=1))
                self.assertEqual(status, 200, body)

    @staticmethod
    def pulls(node: NodeProcess, peer: str) -> float:
        return node.metric("meshrelay_sync_pull_total", peer=peer, outcome="ok")

    def live(self) -> tuple[set[str], set[str]]:
        """The live envelope ids of A and of B (each read as the other's peer)."""
        return feed(self.a, self.b)[0], feed(self.b, self.a)[0]

    def test_backup_under_load_then_restore_on_a_new_data_dir_converges(self) -> None:
        a, b = self.a, self.b
        first = self.deposit(b, 100, "first")

        # A bounded deposit loop runs at B while `meshrelay backup` copies B's store.
        statuses: list[int] = []
        during: list[str] = []
        backup_done = threading.Event()
        lock = threading.Lock()

        def load() -> None:
            extra = 0
            for i in range(3000):
                if backup_done.is_set():
                    extra += 1
                    if extra > 50:
                        return
                box = self.boxes[i % 4]
                env = Identity().envelope(box, b"during %d" % i, ts=int(time.time()))
                status, _ = b.send(env)
                with lock:
                    statuses.append(status)
                    if status == 200:
                        during.append(env["msg_id"])
                        self.box_of[env["msg_id"]] = box

        loader = threading.Thread(target=load)
        loader.start()
        wait_for(lambda: len(statuses) >= 50, 60, "the deposit loop to get going")
        out = os.path.join(os.path.abspath(self.mktemp()), "b-backup.sqlite3")
        done = meshrelay("backup", "--config", b.config_path, out, "--step-pages", "4")
        backup_done.set()
        loader.join(120)
        self.assertFalse(loader.is_alive())
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("integrity_check ok", done.stdout)
        self.assertEqual(stat.S_IMODE(os.stat(out).st_mode), 0o600)
        # Deposits went on throughout: every one was accepted, none waited for the backup and failed.
        self.assertEqual(set(statuses), {200})
        self.sent.update(during)
        conn = sqlite3.connect(out)
        in_backup = {r[0] for r in conn.execute("SELECT msg_id FROM envelopes")}
        old_feed = conn.execute("SELECT value FROM meta WHERE key = 'feed_id'").fetchone()[0]
        conn.close()
        self.assertIn(f"{len(in_backup)} envelopes", done.stdout)
        self.assertLessEqual(set(first), in_backup)
        self.assertLessEqual(in_backup, self.sent)

        # After the backup: more deposits at B, acks at A and at B of messages the backup holds.
        after = self.deposit(b, 60, "after")
        acked = set(first[:20] + first[20:40])
        self.ack(a, first[:20])
        self.ack(b, first[20:40])
        expected = self.sent - acked
        wait_for(lambda: self.live() == (expected, expected), 60, "A and B to converge before B is lost", 0.5)
        # And A's durable cursor on B's feed is at B's end: a whole pull run of A started after that.
        pulled = self.pulls(a, b.url)
        wait_for(lambda: self.pulls(a, b.url) >= pulled + 3, 60, "A to pull B's feed to its end", 0.5)

        # B is lost; A goes down too, so what the restored B takes first can reach A only by sync.
        b.kill()
        shutil.rmtree(b.data_dir)
        a.stop()
        b.data_dir = os.path.join(b.dir, "restored")
        done = meshrelay("restore", out, "--data-dir", b.data_dir)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn(f"from store {old_feed}", done.stdout)
        b.start()
        new = self.deposit(b, 30, "new")
        page = changes_page(b, a.url, link_secret("a", "b"), 0, limit=1)
        self.assertNotEqual(page["feed"], old_feed)
        a.start()

        expected = self.sent - acked
        wait_for(lambda: self.live() == (expected, expected), 90, "A and the restored B to converge", 0.5)
        # Stay converged over two more sync rounds each way.
        links = [(a, b.url), (b, a.url)]
        before = {n.name: self.pulls(n, peer) for n, peer in links}
        wait_for(lambda: all(self.pulls(n, p) >= before[n.name] + 2 for n, p in links), 60, "two more sync rounds", 0.5)
        live_a, live_b = self.live()
        self.assertEqual(live_a, live_b)
        self.assertEqual(live_a & acked, set())
        self.assertLessEqual(set(after) | set(new) | set(during), live_a)
        self.assertEqual(live_a, expected)
        for box in self.boxes:
            for node in (a, b):
                status, polled = node.poll(box.poll_body(ts=int(time.time()), limit=100))
                self.assertEqual(status, 200)
                self.assertEqual({m["msg_id"] for m in polled["messages"]} & acked, set())
        with open(a.log_path, "rb") as fh:
            self.assertIn(b"has a new feed id", fh.read())
