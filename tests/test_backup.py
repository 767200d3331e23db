"""``meshrelay backup`` / ``meshrelay restore`` (meshrelay.store.backup): fast tests.

The copy of a store being written, its checks, the new feed identity of a
restored store (SQLite and PostgreSQL), and a restored node rejoining an
in-memory mesh.  The real-process test under load is in
tests/test_integration_backup.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import shutil
import sqlite3
import stat
import subprocess
import unittest
from typing import Any
from unittest import mock

import pytest
from twisted.trial.unittest import SynchronousTestCase

from meshrelay import cli
from meshrelay.store import backup as B
from meshrelay.store import migrations
from meshrelay.store.base import ACCEPTED, Caps, Cursor
from meshrelay.store.sqlite import DB_NAME, SQLiteStore
from tests.helpers import T0, Identity, MemNode, Mesh, dump_live
from tests.pgtest import base_dsn, create_schema, requires_pg, sql
from tests.test_store import make_ack, make_env, tomb

CAPS = Caps(per_sender_pending=10000, per_mailbox_pending=10000, max_stored_bytes=10**9)


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def meta(path: str) -> dict[str, str]:
    conn = sqlite3.connect(path)
    try:
        return dict(conn.execute("SELECT key, value FROM meta").fetchall())
    finally:
        conn.close()


class StoreCase(SynchronousTestCase):
    def open_store(self, data_dir: str) -> SQLiteStore:
        store = SQLiteStore(data_dir, CAPS)
        store.start()
        self.addCleanup(lambda: store.close() if not store._closed else None)
        return store

    def filled(self, n: int = 30) -> tuple[str, SQLiteStore, list[str]]:
        """A store with ``n`` envelopes (two of them acked), a cursor and two policies."""
        data_dir = os.path.abspath(self.mktemp())
        store = self.open_store(data_dir)
        box, sender = Identity(), Identity()
        ids = []
        for i in range(n):
            env = make_env(sender, box, b"m%d" % i + b"x" * 2000)
            self.assertEqual(self.successResultOf(store.add_envelope(env, T0)).status, ACCEPTED)
            ids.append(env.msg_id)
        ack = make_ack(box, ids[:2])
        self.successResultOf(store.apply_ack(ack, tomb(ack)))
        self.successResultOf(store.set_cursor(Cursor("http://peer.test", "f" * 32, 17, 1.0)))
        self.successResultOf(store.put_policy("m1", 1, "a" * 64, "{p1}"))
        self.successResultOf(store.put_policy("m2", 1, "b" * 64, "{p2}"))
        return data_dir, store, ids[2:]


class BackupTests(StoreCase):
    def test_backup_of_a_store_being_written_is_one_snapshot_and_never_blocks_the_writer(self) -> None:
        """Deposits commit between the copy's steps (not blocked) and none of them is in the copy."""
        data_dir, store, live = self.filled()
        feed = store.feed_id
        out = os.path.join(os.path.abspath(self.mktemp()), "b.sqlite3")
        sender, box = Identity(), Identity()
        during: list[str] = []

        def deposit(remaining: int, total: int) -> None:
            # The node's writer commits on its own connection while the copy holds its snapshot.
            if len(during) < 20:
                env = make_env(sender, box, b"during %d" % len(during))
                self.assertEqual(self.successResultOf(store.add_envelope(env, T0)).status, ACCEPTED)
                during.append(env.msg_id)

        report = B.backup_sqlite(data_dir, out, step_pages=2, progress=deposit)
        self.assertGreater(report.steps, 20)
        self.assertEqual(len(during), 20)
        self.assertEqual(mode(out), 0o600)
        s = report.summary
        self.assertEqual((s.feed_id, s.envelopes, s.acks, s.tombstones, s.policies), (feed, len(live), 1, 2, 2))
        self.assertEqual(s.schema_version, migrations.LATEST_VERSION)
        self.assertEqual(s.checked, "integrity_check")
        # The writes went on: the live store has them, the copy is the state before them.
        self.assertEqual(self.successResultOf(store.count(box.pub, T0)), 20)
        conn = sqlite3.connect(out)
        copied = {r[0] for r in conn.execute("SELECT msg_id FROM envelopes")}
        journal = conn.execute("PRAGMA journal_mode").fetchone()[0]
        conn.close()
        self.assertEqual(copied, set(live))
        self.assertEqual(journal, "delete")  # one self-contained file
        self.assertEqual(sorted(os.listdir(os.path.dirname(out))), ["b.sqlite3"])

    def test_command_prints_what_it_copied_and_refuses_to_overwrite(self) -> None:
        data_dir, store, live = self.filled(5)
        out = os.path.join(os.path.abspath(self.mktemp()), "b.sqlite3")
        code, text, err = run_cli("backup", "--data-dir", data_dir, out)
        self.assertEqual((code, err), (0, ""))
        self.assertIn(f"backed up store {store.feed_id} (schema {migrations.LATEST_VERSION}) to {out}:", text)
        self.assertIn(f"{len(live)} envelopes, 1 acks, 2 tombstones, 2 policies", text)
        self.assertIn(f"last seq {store._seq}", text)
        self.assertIn("integrity_check ok", text)
        code, _, err = run_cli("backup", "--data-dir", data_dir, out)
        self.assertEqual(code, 1)
        self.assertEqual(err, f"meshrelay: backup: {out} already exists (use --force to replace it)\n")
        os.chmod(out, 0o644)
        code, _, _ = run_cli("backup", "--data-dir", data_dir, out, "--force", "--quick", "--step-pages", "1")
        self.assertEqual(code, 0)
        self.assertEqual(mode(out), 0o600)

    def test_command_with_a_config_uses_its_data_dir_and_refuses_postgresql(self) -> None:
        data_dir, store, _ = self.filled(3)
        conf = os.path.abspath(self.mktemp())
        with open(conf, "w") as fh:
            fh.write(f'[node]\ndata_dir = "{data_dir}"\n')
        out = os.path.join(os.path.abspath(self.mktemp()), "b.sqlite3")
        self.assertEqual(run_cli("backup", "--config", conf, out)[0], 0)
        self.assertEqual(meta(out)["feed_id"], store.feed_id)
        with open(conf, "w") as fh:
            fh.write('[store]\nbackend = "postgresql"\ndsn = "postgresql://x@127.0.0.1/y"\n')
        code, _, err = run_cli("backup", "--config", conf, out + ".2")
        self.assertEqual(code, 1)
        self.assertIn("back it up with pg_dump", err)
        self.assertFalse(os.path.exists(out + ".2"))

    def test_command_errors_are_one_line(self) -> None:
        empty = os.path.abspath(self.mktemp())
        os.makedirs(empty)
        code, _, err = run_cli("backup", "--data-dir", empty, os.path.join(empty, "..", "x.sqlite3"))
        self.assertEqual(code, 1)
        self.assertEqual(err, f"meshrelay: backup: no meshrelay store at {os.path.join(empty, DB_NAME)}\n")
        data_dir, _, _ = self.filled(1)
        code, _, err = run_cli("backup", "--data-dir", data_dir, os.path.join(data_dir, "x.sqlite3"))
        self.assertEqual((code, err), (1, "meshrelay: backup: write the backup outside the data directory\n"))
        with self.assertRaises(SystemExit) as exited:  # --data-dir or --config is required
            run_cli("backup", "x.sqlite3")
        self.assertEqual(exited.exception.code, 2)

    def test_a_failed_check_leaves_no_file(self) -> None:
        """A copy that does not verify is deleted, and OUT never appears."""
        data_dir, _, _ = self.filled(3)
        out = os.path.join(os.path.abspath(self.mktemp()), "b.sqlite3")
        with mock.patch.object(B, "verify", side_effect=B.BackupError("quick_check failed: boom")):
            code, _, err = run_cli("backup", "--data-dir", data_dir, out)
        self.assertEqual((code, err), (1, "meshrelay: backup: quick_check failed: boom\n"))
        self.assertEqual(os.listdir(os.path.dirname(out)), [])


class VerifyTests(StoreCase):
    def backup_of(self, n: int = 30) -> tuple[str, SQLiteStore]:
        data_dir, store, _ = self.filled(n)
        out = os.path.join(os.path.abspath(self.mktemp()), "b.sqlite3")
        B.backup_sqlite(data_dir, out)
        return out, store

    def restore_fails(self, backup: str, message: str) -> None:
        target = os.path.abspath(self.mktemp())
        code, _, err = run_cli("restore", backup, "--data-dir", target)
        self.assertEqual(code, 1, err)
        self.assertIn(message, err)
        self.assertEqual(err.count("\n"), 1)
        self.assertEqual(os.listdir(target) if os.path.exists(target) else [], [])
        code, _, err = run_cli("restore", backup, "--check")
        self.assertEqual(code, 1)
        self.assertIn(message, err)

    def test_check_prints_what_a_good_backup_holds(self) -> None:
        out, store = self.backup_of(4)
        code, text, _ = run_cli("restore", out, "--check")
        self.assertEqual(code, 0)
        self.assertIn(f"a good backup of store {store.feed_id}", text)
        self.assertIn("2 envelopes, 1 acks, 2 tombstones", text)

    def test_counters_that_disagree_with_the_rows_are_a_torn_copy(self) -> None:
        out, _ = self.backup_of(4)
        conn = sqlite3.connect(out)
        conn.execute("DELETE FROM envelopes WHERE seq = (SELECT MAX(seq) FROM envelopes)")
        conn.commit()
        conn.close()
        self.restore_fails(out, "counters disagree with its rows (a torn copy?): stored_count 2 but 1 envelope rows")

    def test_a_damaged_page_fails_the_integrity_check(self) -> None:
        out, _ = self.backup_of(30)
        conn = sqlite3.connect(out)
        (root,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'envelopes_by_mailbox'").fetchone()
        (page_size,) = conn.execute("PRAGMA page_size").fetchone()
        conn.close()
        with open(out, "r+b") as fh:
            fh.seek((root - 1) * page_size)
            fh.write(b"\xff" * page_size)
        # Either the check lists the damage or SQLite stops it ("database disk image is malformed").
        self.restore_fails(out, "integrity_check")

    def test_a_newer_schema_or_another_file_is_refused(self) -> None:
        out, _ = self.backup_of(2)
        conn = sqlite3.connect(out)
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(migrations.LATEST_VERSION + 1),))
        conn.commit()
        conn.close()
        self.restore_fails(out, f"schema version {migrations.LATEST_VERSION + 1}, newer than this meshrelay knows")
        other = os.path.abspath(self.mktemp())
        with open(other, "wb") as fh:
            fh.write(b"not a database" * 1000)
        self.restore_fails(other, "not a usable SQLite database")
        sqlite3.connect(other + ".db").close()
        self.restore_fails(other + ".db", "not a meshrelay store")
        live = os.path.abspath(self.mktemp())
        with open(live, "wb") as fh, open(out, "rb") as src:
            fh.write(src.read())
        open(live + "-wal", "wb").close()
        self.restore_fails(live, "is a live database, not a finished backup")


class RestoreTests(StoreCase):
    def test_restore_copies_everything_under_a_new_feed_id(self) -> None:
        data_dir, store, live = self.filled(6)
        old_feed, old_seq = store.feed_id, store._seq
        old_policies = self.successResultOf(store.policies_since(0, 10))
        out = os.path.join(os.path.abspath(self.mktemp()), "b.sqlite3")
        B.backup_sqlite(data_dir, out)
        target = os.path.join(os.path.abspath(self.mktemp()), "new")
        code, text, err = run_cli("restore", out, "--data-dir", target)
        self.assertEqual((code, err), (0, ""))
        restored = self.open_store(target)
        self.assertNotEqual(restored.feed_id, old_feed)
        self.assertEqual(len(restored.feed_id), 32)
        self.assertIn(f"from store {old_feed}", text)
        self.assertIn(f"new feed id {restored.feed_id}", text)
        rows = meta(os.path.join(target, DB_NAME))
        self.assertEqual(rows["restored_from"], old_feed)
        self.assertEqual((mode(target), mode(os.path.join(target, DB_NAME))), (0o700, 0o600))
        # Everything else as it was: envelopes under their seq, acks, tombstones, cursors.
        self.assertEqual(dump_live(restored, T0), dump_live(store, T0))
        self.assertEqual(restored._seq, old_seq)
        page = self.successResultOf(restored.changes(0, 100, T0))
        self.assertEqual(page.feed, restored.feed_id)
        self.assertEqual([i.key for i in page.items if i.kind == "envelope"], live)
        self.assertEqual(self.successResultOf(restored.get_cursor("http://peer.test")).since, 17)
        # The policy feed moved past anything the lost store handed out, in the same order.
        policies = self.successResultOf(restored.policies_since(0, 10))
        self.assertEqual([b for _, b in policies], [b for _, b in old_policies])
        self.assertGreater(policies[0][0], old_policies[-1][0] + 10**15)
        self.assertEqual(self.successResultOf(restored.policies_since(old_policies[-1][0], 10)), policies)
        # A new policy continues above them.
        self.successResultOf(restored.put_policy("m3", 1, "c" * 64, "{p3}"))
        self.assertEqual(self.successResultOf(restored.policies_since(policies[-1][0], 10))[0][1], "{p3}")

    def test_pseq_jumps_above_the_restore_time_and_never_collides(self) -> None:
        """Restored twice: each restore numbers the policies above the last (and above now, in microseconds)."""
        data_dir, store, _ = self.filled(1)
        store.close()
        path = os.path.join(data_dir, DB_NAME)
        seen = []
        for now in (T0, T0 + 1):
            conn = sqlite3.connect(path, isolation_level=None)
            conn.execute("BEGIN IMMEDIATE")
            B.renew_feed_identity(B._sqlite_run(conn), now)
            conn.execute("COMMIT")
            seen.append([r[0] for r in conn.execute("SELECT pseq FROM policies ORDER BY mailbox")])
            conn.close()
        self.assertEqual(seen[0], [T0 * 10**6 + 1, T0 * 10**6 + 2])
        self.assertEqual(seen[1], [(T0 + 1) * 10**6 + 1, (T0 + 1) * 10**6 + 2])

    def test_a_non_empty_target_needs_force_and_a_stopped_node(self) -> None:
        data_dir, store, _ = self.filled(3)
        out = os.path.join(os.path.abspath(self.mktemp()), "b.sqlite3")
        B.backup_sqlite(data_dir, out)
        other_dir, other, _ = self.filled(1)
        other_feed = other.feed_id
        code, _, err = run_cli("restore", out, "--data-dir", other_dir)
        self.assertEqual(code, 1)
        self.assertEqual(
            err, f"meshrelay: restore: {other_dir} is not empty (use --force to replace the store in it)\n"
        )
        code, _, err = run_cli("restore", out, "--data-dir", other_dir, "--force")
        self.assertEqual(code, 1)
        self.assertIn("is open in another process: stop the node first", err)
        self.successResultOf(other.close())
        self.assertEqual(meta(os.path.join(other_dir, DB_NAME))["feed_id"], other_feed)
        # A -wal of the replaced store must not be replayed into the restored one.
        with open(os.path.join(other_dir, DB_NAME + "-wal"), "wb") as fh:
            fh.write(b"stale")
        self.assertEqual(run_cli("restore", out, "--data-dir", other_dir, "--force")[0], 0)
        self.assertNotIn(DB_NAME + "-wal", os.listdir(other_dir))
        restored = self.open_store(other_dir)
        self.assertEqual(dump_live(restored, T0), dump_live(store, T0))
        self.assertEqual(meta(os.path.join(other_dir, DB_NAME))["restored_from"], store.feed_id)

    def test_usage(self) -> None:
        self.assertEqual(run_cli("restore", "--data-dir", "x")[0], 1)  # no BACKUP
        code, _, err = run_cli("restore", "b.sqlite3")
        self.assertEqual(
            (code, err), (1, "meshrelay: restore: give --data-dir DIR or --config FILE: where the node's store goes\n")
        )
        code, _, err = run_cli("restore", "b.sqlite3", "--check", "--data-dir", "x")
        self.assertEqual(code, 1)
        self.assertIn("--check reads the backup only", err)
        code, _, err = run_cli("restore", "--postgres")
        self.assertEqual((code, err), (1, "meshrelay: restore: --postgres needs --config FILE or --dsn-file PATH\n"))


class RejoinTests(SynchronousTestCase):
    """A restored node rejoins an in-memory mesh: what it lost comes back, what it stores later spreads."""

    def restore_b(self, mesh: Mesh, backup: str) -> MemNode:
        old = mesh.nodes["b"]
        old.stop()
        data_dir = os.path.abspath(self.mktemp())
        code, _, err = run_cli("restore", backup, "--data-dir", data_dir)
        self.assertEqual(code, 0, err)
        cfg = old.config.replace(node=dataclasses.replace(old.config.node, data_dir=data_dir))
        node = MemNode(data_dir, clock=mesh.clock, config=cfg, peer_client_factory=lambda p: mesh.link("b", "a"))
        mesh.nodes["b"] = node
        return node

    def scenario(self) -> dict[str, Any]:
        mesh = Mesh(os.path.abspath(self.mktemp()), names=("a", "b"))
        self.addCleanup(mesh.stop)
        box = Identity()
        a, b = mesh["a"], mesh["b"]

        def deposit(node: MemNode, n: int, tag: str) -> list[str]:
            ids = []
            for i in range(n):
                env = Identity().envelope(box, b"%s %d" % (tag.encode(), i), ts=int(mesh.clock.seconds()))
                self.assertEqual(node.send(env)[0], 200)
                ids.append(env["msg_id"])
            mesh.settle()
            return ids

        before = deposit(b, 5, "before")
        backup = os.path.join(os.path.abspath(self.mktemp()), "b.sqlite3")
        B.backup_sqlite(b.config.node.data_dir, backup)
        after = deposit(b, 6, "after")  # pushed to A, lost with B
        self.assertEqual(a.poll(box, ack=before[:2])[0], 200)  # acked at A after the backup
        mesh.settle()
        mesh.sync_all()  # A's cursor on B is now at B's last seq
        b = self.restore_b(mesh, backup)
        mesh.set_mode("a", "b", "down", both=True)
        mesh.settle()
        new = deposit(b, 3, "new")  # its pushes fail: only sync can bring them to A
        mesh.set_mode("a", "b", "up", both=True)
        mesh.advance(65, step=5)
        return {"mesh": mesh, "box": box, "before": before, "after": after, "new": new}

    def live(self, node: MemNode, box: Identity) -> set[str]:
        status, body = node.poll(box, limit=100)
        self.assertEqual(status, 200)
        return {m["msg_id"] for m in body["messages"]}

    def test_restored_node_converges(self) -> None:
        s = self.scenario()
        mesh, box = s["mesh"], s["box"]
        expected = set(s["before"][2:] + s["after"] + s["new"])
        self.assertEqual(self.live(mesh["b"], box), expected)  # the lost deposits are back, the acked stay gone
        self.assertEqual(self.live(mesh["a"], box), expected)  # the new ones reached A by sync

    def test_without_a_new_feed_id_the_peer_would_skip_what_the_restored_node_stores(self) -> None:
        """Why the restore renews the feed id: A's cursor is past the seq values B hands out again."""
        with mock.patch.object(B, "renew_feed_identity", lambda run, now: ("same", "same")):
            s = self.scenario()
        mesh, box = s["mesh"], s["box"]
        self.assertEqual(self.live(mesh["a"], box), set(s["before"][2:] + s["after"]))  # all of "new" missed


@requires_pg
class PostgresRestoreTests(SynchronousTestCase):
    def test_restore_postgres_gives_a_new_feed_identity_after_checking_the_counters(self) -> None:
        from meshrelay.store.postgres import PostgresStore

        dsn = create_schema(self.addCleanup, "mr_backup")
        store = PostgresStore(dsn, CAPS)
        store.start()
        sender, box = Identity(), Identity()
        for i in range(4):
            self.successResultOf(store.add_envelope(make_env(sender, box, b"%d" % i), T0))
        self.successResultOf(store.put_policy("m1", 1, "a" * 64, "{p1}"))
        self.successResultOf(store.put_policy("m2", 1, "b" * 64, "{p2}"))
        old_feed = store.feed_id
        self.assertTrue(self.successResultOf(store.acquire_lease("sync:http://peer.test", "old-process", 3600)))
        self.successResultOf(store.close())
        dsn_file = os.path.abspath(self.mktemp())
        with open(dsn_file, "w") as fh:
            fh.write(dsn)
        os.chmod(dsn_file, 0o600)
        code, text, err = run_cli("restore", "--postgres", "--dsn-file", dsn_file)
        self.assertEqual((code, err), (0, ""))
        self.assertIn(f"from store {old_feed}", text)
        self.assertIn("4 envelopes, 0 acks, 0 tombstones, 2 policies", text)
        reopened = PostgresStore(dsn, CAPS)
        reopened.start()
        self.addCleanup(reopened.close)
        self.assertNotEqual(reopened.feed_id, old_feed)
        self.assertIn(f"new feed id {reopened.feed_id}", text)
        self.assertEqual(sql(dsn, "SELECT value FROM meta WHERE key = 'restored_from'"), [(old_feed,)])
        pseqs = [r[0] for r in sql(dsn, "SELECT pseq FROM policies ORDER BY pseq")]
        self.assertGreater(pseqs[0], 10**15)
        self.assertEqual(len(self.successResultOf(reopened.policies_since(2, 10))), 2)
        # The lost processes' leases are gone: a new process syncs at once.
        self.assertTrue(self.successResultOf(reopened.acquire_lease("sync:http://peer.test", "new-process", 30)))
        # Counters that disagree with the rows are refused, and nothing changes.
        sql(dsn, "UPDATE meta SET value = '99' WHERE key = 'stored_count'")
        code, _, err = run_cli("restore", "--postgres", "--dsn-file", dsn_file)
        self.assertEqual(code, 1)
        self.assertIn("stored_count 99 but 4 envelope rows", err)
        self.assertEqual(sql(dsn, "SELECT value FROM meta WHERE key = 'feed_id'"), [(reopened.feed_id,)])

    @pytest.mark.integration
    def test_pg_dump_and_pg_restore_then_restore_postgres_bring_the_store_back(self) -> None:
        """The procedure of docs/postgresql.md: dump the schema, lose it, pg_restore it, meshrelay restore --postgres."""
        from meshrelay.store.postgres import PostgresStore

        tools = [shutil.which(t) for t in ("pg_dump", "pg_restore")]
        if None in tools:
            if os.environ.get("CI") == "true":
                self.fail("pg_dump and pg_restore are missing: .ci/run installs postgresql-client")
            raise unittest.SkipTest("pg_dump/pg_restore are not installed (Debian: postgresql-client)")
        dsn = create_schema(self.addCleanup, "mr_backup")
        (schema,) = sql(dsn, "SELECT current_schema()")[0]
        store = PostgresStore(dsn, CAPS)
        store.start()
        sender, box = Identity(), Identity()
        ids = []
        for i in range(5):
            env = make_env(sender, box, b"%d" % i)
            self.successResultOf(store.add_envelope(env, T0))
            ids.append(env.msg_id)
        ack = make_ack(box, ids[:2])
        self.successResultOf(store.apply_ack(ack, tomb(ack)))
        self.successResultOf(store.put_policy("m1", 1, "a" * 64, "{p1}"))
        before, old_feed = dump_live(store, T0), store.feed_id
        self.successResultOf(store.close())
        dump = os.path.abspath(self.mktemp())
        base = base_dsn()
        assert base is not None
        run = subprocess.run(
            ["pg_dump", "--format=custom", f"--schema={schema}", f"--file={dump}", f"--dbname={base}"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.assertEqual(run.returncode, 0, run.stderr)
        sql(base, f'DROP SCHEMA "{schema}" CASCADE')
        run = subprocess.run(
            ["pg_restore", "--no-owner", f"--dbname={base}", dump], capture_output=True, text=True, timeout=120
        )
        self.assertEqual(run.returncode, 0, run.stderr)
        conf = os.path.abspath(self.mktemp())
        with open(conf, "w") as fh:
            fh.write(f'[store]\nbackend = "postgresql"\ndsn = "{dsn}"\n')
        code, text, err = run_cli("restore", "--postgres", "--config", conf)
        self.assertEqual((code, err), (0, ""))
        self.assertIn("3 envelopes, 1 acks, 2 tombstones, 1 policies", text)
        restored = PostgresStore(dsn, CAPS)
        restored.start()
        self.addCleanup(restored.close)
        self.assertEqual(dump_live(restored, T0), before)
        self.assertNotEqual(restored.feed_id, old_feed)
        # The restored schema still commits (the dump carries the commit function too).
        env = make_env(sender, box, b"after")
        self.assertEqual(self.successResultOf(restored.add_envelope(env, T0)).status, ACCEPTED)
