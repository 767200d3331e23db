"""``meshrelay migrate-store``: a SQLite node copied into PostgreSQL, interrupted and resumed."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import sqlite3
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from typing import Any

import pytest
from twisted.trial.unittest import SynchronousTestCase

from meshrelay import migrate
from meshrelay.store import migrations
from meshrelay.store.base import DUPLICATE, AddResult, Caps, Cursor
from meshrelay.store.sqlite import DB_NAME, TOMBSTONE_BYTES, SQLiteStore
from tests.harness import REPO
from tests.helpers import T0, Identity
from tests.pgtest import create_schema, requires_pg
from tests.test_postgres import result_of
from tests.test_store import make_ack, make_env, schema_statements, tomb


class Interrupted(Exception):
    """Stands in for Ctrl-C or a kill in the middle of a run."""


def fill(data_dir: str) -> dict[str, Any]:
    """A SQLite store with envelopes, acks, tombstones, cursors and nonces; returns what it holds."""
    store = SQLiteStore(data_dir, Caps(per_sender_pending=1000))
    store.start()
    owners = [Identity() for _ in range(4)]
    sender = Identity()
    envs = [make_env(sender, owners[i % 4], b"msg %d" % i) for i in range(60)]
    for e in envs:
        assert result_of(store.add_envelope(e, T0)).status == "accepted"
    for owner in owners[:2]:
        ids = [e.msg_id for e in envs if e.mailbox == owner.pub][:5]
        ack = make_ack(owner, ids)
        result_of(store.apply_ack(ack, tomb(ack)))
    result_of(store.set_cursor(Cursor("http://b.test", "f" * 32, 41, 1234.5)))
    result_of(store.set_cursor(Cursor("http://c.test", "e" * 32, 7, 0.0)))
    for i in range(9):
        result_of(store.claim_nonce("poll:x", f"nonce{i}", T0 + 600))
    info = {"feed_id": store.feed_id, "owners": owners, "stats": store.stats(), "last_seq": store._seq}
    result_of(store.close())
    return info


def sqlite_content(data_dir: str) -> dict[str, Any]:
    conn = sqlite3.connect(os.path.join(data_dir, DB_NAME))
    try:
        return migrate.content_sqlite(conn)
    finally:
        conn.close()


def pg_content(dsn: str) -> dict[str, Any]:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        return migrate.content_pg(conn)


def run_main(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = migrate.main(list(argv))
    return code, out.getvalue(), err.getvalue()


@requires_pg
class MigrateStoreTests(SynchronousTestCase):
    """Copying a SQLite node into PostgreSQL."""

    def setUp(self) -> None:
        self.dsn = create_schema(self.addCleanup)
        self.data_dir = self.mktemp()
        self.info = fill(self.data_dir)

    def open_pg(self) -> Any:
        from meshrelay.store.postgres import PostgresStore

        store = PostgresStore(self.dsn, Caps())
        store.start()
        self.addCleanup(store.close)
        return store

    def test_interrupted_then_resumed_migration_is_identical(self) -> None:
        """A run stopped after a few chunks, then run again, leaves the target identical to the source."""
        chunks: list[tuple[str, int]] = []

        def stop_after_four(table: str, n: int) -> None:
            chunks.append((table, n))
            if len(chunks) == 4:
                raise Interrupted()

        m = migrate.Migrator(self.data_dir, self.dsn, chunk=7, after_chunk=stop_after_four)
        self.assertRaises(Interrupted, m.run)
        partial = pg_content(self.dsn)
        self.assertEqual(len(partial["envelopes"]), 28)  # four chunks of 7 committed, no more
        code, out, err = run_main("--from", self.data_dir, "--to", self.dsn, "--chunk", "7")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("resumed store " + self.info["feed_id"], out)
        self.assertIn("copied 22 envelopes", out)  # only what the first run had not copied
        source = sqlite_content(self.data_dir)
        self.assertEqual(pg_content(self.dsn), source)
        self.assertEqual(len(source["envelopes"]), 50)
        self.assertEqual(len(source["acks"]), 2)
        self.assertEqual(len(source["tombstones"]), 10)
        self.assertEqual(len(source["peer_cursors"]), 2)
        self.assertEqual(len(source["nonces"]), 9)

    def test_migrated_store_serves_the_same_feed_and_continues_its_seq(self) -> None:
        """After migrating, the PostgreSQL store has the feed id, totals, feed and seq of the SQLite node."""
        self.assertEqual(run_main("--from", self.data_dir, "--to", self.dsn, "--quiet"), (0, "", ""))
        sqlite_store = SQLiteStore(self.data_dir, Caps())
        self.addCleanup(sqlite_store.close)
        pg = self.open_pg()
        self.assertEqual(pg.feed_id, self.info["feed_id"])
        # the same totals, a tombstone counted at PostgreSQL's size (10 tombstones)
        stats = self.info["stats"]
        self.assertEqual(pg.tombstone_bytes, migrations.TOMBSTONE_BYTES_V6["postgresql"])
        self.assertEqual(
            pg.stats(), dataclasses.replace(stats, bytes=stats.bytes + 10 * (pg.tombstone_bytes - TOMBSTONE_BYTES))
        )
        self.assertEqual(result_of(pg.changes(0, 500, T0)), result_of(sqlite_store.changes(0, 500, T0)))
        owner = self.info["owners"][3]
        self.assertEqual(result_of(pg.fetch(owner.pub, T0, 100)), result_of(sqlite_store.fetch(owner.pub, T0, 100)))
        self.assertEqual(result_of(pg.get_cursor("http://b.test")), Cursor("http://b.test", "f" * 32, 41, 1234.5))
        self.assertFalse(result_of(pg.claim_nonce("poll:x", "nonce3", T0 + 600)))
        new = result_of(pg.add_envelope(make_env(Identity(), owner), T0))
        self.assertEqual(new.seq, self.info["last_seq"] + 1)

    def test_rerun_after_the_source_changed_repairs_the_difference(self) -> None:
        """Running again after the source changed (an ack, a new envelope) makes the target match again."""
        self.assertEqual(run_main("--from", self.data_dir, "--to", self.dsn, "--quiet")[0], 0)
        store = SQLiteStore(self.data_dir, Caps())
        owner = self.info["owners"][2]
        bodies, _ = result_of(store.fetch(owner.pub, T0, 1))
        msg_id = bodies[0].split('"msg_id":"')[1].split('"')[0]
        ack = make_ack(owner, [msg_id])
        result_of(store.apply_ack(ack, tomb(ack)))
        result_of(store.add_envelope(make_env(Identity(), owner, b"late"), T0))
        result_of(store.set_cursor(Cursor("http://b.test", "f" * 32, 99, 2.0)))
        result_of(store.close())
        code, out, _ = run_main("--from", self.data_dir, "--to", self.dsn)
        self.assertEqual(code, 0)
        self.assertIn("resumed", out)
        self.assertEqual(pg_content(self.dsn), sqlite_content(self.data_dir))

    def test_a_resumed_run_restarts_tombstones_from_an_older_checkpoint(self) -> None:
        """A checkpoint of tombstones by (mailbox, msg_id) (an older meshrelay's run) restarts that table."""
        chunks: list[str] = []

        def stop_in_tombstones(table: str, n: int) -> None:
            chunks.append(table)
            if table == "tombstones":
                raise Interrupted()

        m = migrate.Migrator(self.data_dir, self.dsn, chunk=3, after_chunk=stop_in_tombstones)
        self.assertRaises(Interrupted, m.run)
        self.assertEqual(len(pg_content(self.dsn)["tombstones"]), 3)
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(
                "UPDATE meta SET value = %s WHERE key = 'migration_ckpt_tombstones'",
                (json.dumps([Identity().pub, "ab" * 32]),),
            )
        code, out, err = run_main("--from", self.data_dir, "--to", self.dsn, "--chunk", "3")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("copied 0 envelopes, 0 acks, 10 tombstones", out)
        self.assertEqual(pg_content(self.dsn), sqlite_content(self.data_dir))

    def test_a_source_at_schema_5_is_upgraded_and_its_tombstones_still_stop_envelopes(self) -> None:
        """A SQLite store of schema 5 (tombstones by mailbox and msg_id) migrates; PostgreSQL refuses those envelopes."""
        data_dir = self.mktemp()
        os.makedirs(data_dir)
        bob, alice = Identity(), Identity()
        acked = [make_env(alice, bob, b"acked %d" % i) for i in range(3)]
        statements = schema_statements("sqlite", 5) + [
            (
                "INSERT INTO tombstones (mailbox, msg_id, expires, junk) VALUES (?, ?, ?, ?)",
                (bob.pub, e.msg_id, T0 + 600, i % 2),
            )
            for i, e in enumerate(acked)
        ]
        statements.append(
            ("UPDATE meta SET value = ? WHERE key = 'stored_bytes'", (str(3 * migrations.TOMBSTONE_BYTES_V4),))
        )
        conn = sqlite3.connect(os.path.join(data_dir, DB_NAME), isolation_level=None)
        try:
            for stmt, args in statements:
                conn.execute(stmt, args)
        finally:
            conn.close()
        code, out, err = run_main("--from", data_dir, "--to", self.dsn)
        self.assertEqual((code, err), (0, ""))
        self.assertIn("3 tombstones", out)
        pg = self.open_pg()
        self.assertEqual(pg.stats().bytes, 3 * pg.tombstone_bytes)
        for e in acked:
            self.assertEqual(result_of(pg.add_envelope(e, T0)), AddResult(DUPLICATE))
        self.assertEqual(result_of(pg.add_envelope(make_env(alice, bob, b"new"), T0)).status, "accepted")

    def test_a_compact_junk_acks_ids_become_tombstones_in_postgresql(self) -> None:
        """Schema 8: the ids a SQLite store keeps in a mailbox's first junk ack are junk tombstones after the move."""
        data_dir = self.mktemp()
        store = SQLiteStore(data_dir, Caps())
        store.start()
        bob, alice = Identity(), Identity()
        early = [make_env(alice, bob, b"early %d" % i) for i in range(3)]
        ack = make_ack(bob, [e.msg_id for e in early] + ["ab" * 32])
        result_of(store.apply_ack(ack, tomb(ack)))
        self.assertEqual(result_of(store.tombstone_count()), 0)  # the ids are in the ack's row
        result_of(store.close())
        code, out, err = run_main("--from", data_dir, "--to", self.dsn)
        self.assertEqual((code, err), (0, ""))
        self.assertIn("4 tombstones", out)
        self.assertEqual(sqlite_content(data_dir), pg_content(self.dsn))
        pg = self.open_pg()
        for e in early:
            self.assertEqual(result_of(pg.add_envelope(e, T0)), AddResult(DUPLICATE))
        self.assertEqual(result_of(pg.add_envelope(make_env(alice, bob, b"new"), T0)).status, "accepted")

    def test_refuses_a_target_that_holds_another_store(self) -> None:
        """A database already used by a PostgreSQL node is not overwritten."""
        pg = self.open_pg()
        result_of(pg.add_envelope(make_env(Identity(), Identity()), T0))
        code, out, err = run_main("--from", self.data_dir, "--to", self.dsn)
        self.assertEqual(code, 1)
        self.assertIn("already holds a meshrelay store", err)
        self.assertEqual(err.count("\n"), 1)

    def test_config_names_source_and_target(self) -> None:
        """--config takes the source from node.data_dir and the target from store.dsn_file."""
        conf_dir = self.mktemp()
        os.makedirs(conf_dir)
        with open(os.path.join(conf_dir, "dsn"), "w") as fh:
            fh.write(self.dsn + "\n")
        os.chmod(os.path.join(conf_dir, "dsn"), 0o600)
        path = os.path.join(conf_dir, "meshrelay.toml")
        with open(path, "w") as fh:
            fh.write(
                f'[node]\ndata_dir = "{os.path.abspath(self.data_dir)}"\n\n'
                '[store]\nbackend = "postgresql"\ndsn_file = "dsn"\n'
            )
        code, out, err = run_main("--config", path)
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(pg_content(self.dsn), sqlite_content(self.data_dir))


class MigrateCommandLineTests(SynchronousTestCase):
    """Usage errors of migrate-store (no database needed)."""

    def test_missing_source_is_one_line(self) -> None:
        """A data directory without a store fails with one line naming it."""
        missing = os.path.abspath(self.mktemp())
        code, _, err = run_main("--from", missing, "--to", "postgresql://127.0.0.1:1/x")
        self.assertEqual(code, 1)
        self.assertIn(missing, err)
        self.assertEqual(err.count("\n"), 1)

    def test_target_is_required(self) -> None:
        """Without --to, --to-file or a config naming a DSN, it says what to give."""
        code, _, err = run_main("--from", self.mktemp())
        self.assertEqual(code, 1)
        self.assertIn("give --to DSN", err)

    def test_open_dsn_file_is_refused(self) -> None:
        """--to-file refuses a DSN file that group or others may access, in one line, like store.dsn_file."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as fh:
            fh.write("postgresql://u:pw@127.0.0.1:1/x\n")
        os.chmod(path, 0o644)
        code, _, err = run_main("--from", self.mktemp(), "--to-file", path)
        self.assertEqual(code, 1)
        self.assertEqual(err.count("\n"), 1)
        self.assertIn("--to-file", err)
        self.assertIn(f"chmod 600 {path}", err)
        self.assertNotIn("pw@", err)

    @pytest.mark.integration
    def test_runs_as_a_module(self) -> None:
        """python -m meshrelay.migrate --help works from a checkout."""
        env = dict(os.environ, PYTHONPATH=REPO)
        proc = subprocess.run(
            [sys.executable, "-m", "meshrelay.migrate", "--help"], env=env, capture_output=True, text=True, timeout=60
        )
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("--from DATA_DIR", proc.stdout)
