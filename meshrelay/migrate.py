"""``meshrelay migrate-store``: copy a SQLite node's store into PostgreSQL, resumably.

::

    python -m meshrelay.migrate --from ./meshrelay-data --to postgresql://meshrelay@db/meshrelay
    python -m meshrelay.migrate --config meshrelay.toml      # node.data_dir -> store.dsn / dsn_file

What is copied: envelopes and acks with their ``seq``, tombstones (by their
16-byte key, schema 6; the ids a mailbox's first junk ack keeps in its row,
schema 8, become junk tombstones), sync cursors, unexpired nonces, and the feed id, so
peers that follow this node's ``changes`` feed carry on from their cursors.
``last_seq`` becomes at least the source's, so a ``seq`` is never handed out
twice.  The stored totals are counted again on the target, a tombstone at
PostgreSQL's size (``postgres.TOMBSTONE_BYTES``).  Not copied: the
remembered cap refusals (table ``refused``, schema 3): they are hints for
fetching refused replicas again, the target starts with none, and replicas
refused before the move still arrive by sync or are fetched by clients.

Resumable: each table is copied in chunks in key order, and each chunk
commits together with its checkpoint, so an interrupted run (Ctrl-C, kill,
a lost connection) continues where it stopped.  A final pass compares the
two stores row by row, in key order, and repairs any difference (rows the
source deleted or changed between runs), then recomputes the stored totals.
Stop the SQLite node first, and start the PostgreSQL nodes only afterwards.

The target must be an empty database (or schema) or one this command was
already copying this same source into; anything else is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from meshrelay.config import ConfigError, load_config, read_secret_file
from meshrelay.store import migrations
from meshrelay.store.sqlite import DB_NAME
from meshrelay.store.sqlite import migrate as sqlite_migrate
from meshrelay.store.sqlite_core import register_functions

DEFAULT_CHUNK = 2000


class MigrationError(Exception):
    """Why the migration cannot go on; ``str(e)`` is one line."""


@dataclass(frozen=True)
class Table:
    name: str
    key: tuple[str, ...]
    columns: tuple[str, ...]
    #: compared and repaired by the final pass (nonces expire within minutes: copied only)
    verify: bool = True
    #: key columns that are not text (ordered as numbers or bytes on both sides, no collation)
    plain_keys: tuple[str, ...] = ("seq",)
    #: where the SQLite side's rows are read, when not from the table of that name
    source: str = ""

    def key_of(self, row: Sequence[Any]) -> tuple[Any, ...]:
        return tuple(row[self.columns.index(k)] for k in self.key)


TABLES = (
    Table("envelopes", ("seq",), ("seq", "msg_id", "mailbox", "sender", "expires", "size", "body")),
    Table("acks", ("seq",), ("seq", "mailbox", "nonce", "expires", "body", "size", "junk")),
    # keyed by tombstone_key(mailbox, msg_id) since schema 6: 16 bytes, BLOB and BYTEA both order bytewise;
    # read from the source with the ids of its compact junk acks (schema 8: ``_all_tombstones``)
    Table(
        "tombstones", ("digest",), ("digest", "expires", "junk"), plain_keys=("digest",), source="temp.all_tombstones"
    ),
    Table("peer_cursors", ("peer",), ("peer", "feed_id", "since", "synced_at")),
    Table("nonces", ("scope", "nonce"), ("scope", "nonce", "expires"), verify=False),
)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# --------------------------------------------------------------------------- reading both sides


def _all_tombstones(conn: sqlite3.Connection) -> None:
    """Collect the source's tombstones into the temporary table ``all_tombstones``: its rows, and the ids of its compact junk acks.

    From schema 8 a SQLite store's first junk ack of a mailbox keeps its ids in
    its own row instead of tombstone rows (``sqlite_core._op_ack``), and the
    deposit check reads them there; PostgreSQL keeps a tombstone row per id,
    so those ids are copied as junk tombstones (the ack's expiry).  The table
    lives in the connection's temporary database: the source file is not
    written.
    """
    register_functions(conn)
    conn.execute("DROP TABLE IF EXISTS temp.all_tombstones")
    conn.execute(
        "CREATE TEMP TABLE all_tombstones (digest BLOB NOT NULL PRIMARY KEY, expires INTEGER NOT NULL, "
        "junk INTEGER NOT NULL) WITHOUT ROWID"
    )
    conn.execute(
        "INSERT INTO temp.all_tombstones (digest, expires, junk) SELECT digest, expires, junk FROM main.tombstones"
    )
    conn.execute(
        f"INSERT INTO temp.all_tombstones (digest, expires, junk) "
        f"SELECT {migrations.SQLITE_TOMBSTONE_KEY}(a.mailbox, j.value), a.expires, 1 "
        "FROM main.acks AS a, json_each(a.body, '$.ack') AS j "
        "WHERE a.junk = 1 AND a.seq = (SELECT MIN(seq) FROM main.acks WHERE mailbox = a.mailbox) "
        "AND j.type = 'text' "
        "ON CONFLICT (digest) DO UPDATE SET expires = MAX(expires, excluded.expires), junk = MIN(junk, excluded.junk)"
    )


def _sqlite_page(conn: sqlite3.Connection, t: Table, after: tuple[Any, ...] | None, n: int) -> list[tuple[Any, ...]]:
    cols = ", ".join(t.columns)
    keys = ", ".join(t.key)
    name = t.source or t.name
    if after is None:
        return conn.execute(f"SELECT {cols} FROM {name} ORDER BY {keys} LIMIT ?", (n,)).fetchall()
    marks = ", ".join("?" * len(t.key))
    return conn.execute(
        f"SELECT {cols} FROM {name} WHERE ({keys}) > ({marks}) ORDER BY {keys} LIMIT ?", (*after, n)
    ).fetchall()


def _pg_keys(t: Table) -> str:
    # byte order for text keys, the order SQLite uses
    return ", ".join(k if k in t.plain_keys else f'{k} COLLATE "C"' for k in t.key)


def _checkpoint_text(after: tuple[Any, ...]) -> str:
    """A chunk's last key as JSON (a bytes value as ``{"hex": ...}``)."""
    return json.dumps([{"hex": v.hex()} if isinstance(v, bytes) else v for v in after])


def _checkpoint_key(t: Table, text: str) -> tuple[Any, ...] | None:
    """The key a checkpoint names, or None (start the table again) when it is not a key of ``t``.

    A run interrupted by an older meshrelay recorded tombstones by (mailbox, msg_id), their
    key before schema 6: that table is copied again from its start (rows already there are upserted).
    """
    values = json.loads(text)
    after = tuple(bytes.fromhex(v["hex"]) if isinstance(v, dict) else v for v in values)
    return after if len(after) == len(t.key) else None


def _pg_page(conn: Any, t: Table, after: tuple[Any, ...] | None, n: int) -> list[tuple[Any, ...]]:
    cols = ", ".join(t.columns)
    keys = _pg_keys(t)
    if after is None:
        return list(conn.execute(f"SELECT {cols} FROM {t.name} ORDER BY {keys} LIMIT %s", (n,)).fetchall())
    marks = ", ".join(["%s"] * len(t.key))
    return list(
        conn.execute(
            f"SELECT {cols} FROM {t.name} WHERE ({keys}) > ({marks}) ORDER BY {keys} LIMIT %s", (*after, n)
        ).fetchall()
    )


def _rows(page: Callable[[tuple[Any, ...] | None], list[tuple[Any, ...]]], t: Table) -> Iterator[tuple[Any, ...]]:
    after: tuple[Any, ...] | None = None
    while True:
        rows = page(after)
        yield from (tuple(r) for r in rows)
        if not rows:
            return
        after = t.key_of(rows[-1])


def _upsert_sql(t: Table) -> str:
    cols = ", ".join(t.columns)
    marks = ", ".join(["%s"] * len(t.columns))
    keys = ", ".join(t.key)
    rest = [c for c in t.columns if c not in t.key]
    update = ", ".join(f"{c} = excluded.{c}" for c in rest)
    return f"INSERT INTO {t.name} ({cols}) VALUES ({marks}) ON CONFLICT ({keys}) DO UPDATE SET {update}"


def _all_rows(
    read: Callable[[Any, Table, tuple[Any, ...] | None, int], list[tuple[Any, ...]]], conn: Any, t: Table
) -> list[tuple[Any, ...]]:
    return list(_rows(lambda after: read(conn, t, after, 5000), t))


def content_sqlite(conn: sqlite3.Connection) -> dict[str, Any]:
    """Everything ``migrate-store`` copies, as plain data (for comparisons)."""
    _all_tombstones(conn)
    out: dict[str, Any] = {t.name: _all_rows(_sqlite_page, conn, t) for t in TABLES}
    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    out["feed_id"] = meta.get("feed_id")
    return out


def content_pg(conn: Any) -> dict[str, Any]:
    """The same data read from PostgreSQL."""
    out: dict[str, Any] = {t.name: _all_rows(_pg_page, conn, t) for t in TABLES}
    out["feed_id"] = conn.execute("SELECT value FROM meta WHERE key = 'feed_id'").fetchone()[0]
    return out


# --------------------------------------------------------------------------- the migration


@dataclass
class Report:
    copied: dict[str, int]
    repaired: dict[str, int]
    resumed: bool
    feed_id: str
    last_seq: int
    envelopes: int
    bytes: int


class Migrator:
    """Copies one SQLite store into one PostgreSQL database."""

    def __init__(
        self,
        data_dir: str,
        dsn: str,
        chunk: int = DEFAULT_CHUNK,
        after_chunk: Callable[[str, int], None] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.dsn = dsn
        self.chunk = chunk
        #: called after each committed chunk with (table, rows); tests use it to interrupt a run
        self.after_chunk = after_chunk

    def run(self) -> Report:
        try:
            from meshrelay.store import postgres
        except ImportError as e:
            raise MigrationError(
                f"migrating to PostgreSQL needs psycopg 3 ({e}): pip install 'meshrelay[postgresql]'"
            ) from e
        import psycopg

        src = self._open_source()
        try:
            try:
                dst = postgres.connect(self.dsn, "migrate")
            except psycopg.Error as e:
                raise MigrationError(
                    f"cannot connect to PostgreSQL at {postgres.describe(self.dsn)}: {_one_line(e)}"
                ) from e
            try:
                return self._migrate(src, dst, postgres)
            except psycopg.Error as e:
                raise MigrationError(f"PostgreSQL failed: {_one_line(e)} (run the command again to resume)") from e
            finally:
                dst.close()
        except sqlite3.Error as e:
            raise MigrationError(
                f"reading {self.data_dir} failed: {_one_line(e)} (run the command again to resume)"
            ) from e
        finally:
            src.close()

    def _open_source(self) -> sqlite3.Connection:
        path = os.path.join(self.data_dir, DB_NAME)
        if not os.path.isfile(path):
            raise MigrationError(f"no SQLite store at {path}")
        try:
            conn = sqlite3.connect(path, isolation_level=None, timeout=30.0)
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.Error as e:
            raise MigrationError(f"cannot read the SQLite store at {path}: {_one_line(e)}") from e
        version = int(row[0]) if row else 0
        if not 1 <= version <= migrations.LATEST_VERSION:
            conn.close()
            raise MigrationError(
                f"the SQLite store at {path} has schema version {version}; this meshrelay knows 1..{migrations.LATEST_VERSION}"
            )
        if version < migrations.LATEST_VERSION:
            # Bring the source to this version's schema first (what starting the node would do).
            try:
                sqlite_migrate(conn)
            except sqlite3.Error as e:
                conn.close()
                raise MigrationError(f"cannot upgrade the SQLite store at {path}: {_one_line(e)}") from e
        # One read transaction: the whole run copies one consistent snapshot.
        conn.execute("BEGIN")
        try:
            _all_tombstones(conn)
        except sqlite3.Error as e:
            conn.close()
            raise MigrationError(f"cannot read the SQLite store at {path}: {_one_line(e)}") from e
        return conn

    def _migrate(self, src: sqlite3.Connection, dst: Any, postgres: ModuleType) -> Report:
        meta = dict(src.execute("SELECT key, value FROM meta").fetchall())
        feed = meta["feed_id"]
        src_last_seq = int(meta.get("last_seq", 0))
        postgres.migrate_schema(dst)
        resumed = self._claim(dst, feed)
        copied = {t.name: self._copy(src, dst, t) for t in TABLES}
        repaired = {t.name: self._reconcile(src, dst, t) for t in TABLES if t.verify}
        last_seq, count, nbytes = self._finish(dst, postgres, feed, src_last_seq)
        return Report(copied, repaired, resumed, feed, last_seq, count, nbytes)

    def _claim(self, dst: Any, feed: str) -> bool:
        """Mark the target as this source's copy; True when resuming an earlier run."""
        with dst.transaction():
            meta = dict(dst.execute("SELECT key, value FROM meta FOR UPDATE").fetchall())
            source = meta.get("migration_source")
            if source == feed:
                return True
            if source is not None:
                raise MigrationError(
                    f"the target holds a migration of another store (feed {source}); use an empty database or schema"
                )
            used = any(dst.execute(f"SELECT EXISTS (SELECT 1 FROM {t.name})").fetchone()[0] for t in TABLES if t.verify)
            if used or meta.get("last_seq", "0") != "0":
                raise MigrationError(
                    f"the target already holds a meshrelay store (feed {meta.get('feed_id')}); "
                    "migrate into an empty database or schema"
                )
            for key, value in (("feed_id", feed), ("migration_source", feed), ("migration_state", "copying")):
                dst.execute(
                    "INSERT INTO meta (key, value) VALUES (%s, %s) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (key, value),
                )
        return False

    def _copy(self, src: sqlite3.Connection, dst: Any, t: Table) -> int:
        ckpt_key = f"migration_ckpt_{t.name}"
        row = dst.execute("SELECT value FROM meta WHERE key = %s", (ckpt_key,)).fetchone()
        after = _checkpoint_key(t, row[0]) if row else None
        upsert = _upsert_sql(t)
        total = 0
        while True:
            rows = _sqlite_page(src, t, after, self.chunk)
            if not rows:
                return total
            after = t.key_of(rows[-1])
            with dst.transaction():
                with dst.cursor() as cur:
                    cur.executemany(upsert, rows)
                dst.execute(
                    "INSERT INTO meta (key, value) VALUES (%s, %s) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (ckpt_key, _checkpoint_text(after)),
                )
            total += len(rows)
            if self.after_chunk is not None:
                self.after_chunk(t.name, len(rows))

    def _reconcile(self, src: sqlite3.Connection, dst: Any, t: Table) -> int:
        """Compare both sides in key order; make the target equal the source.  Returns rows repaired."""
        source = _rows(lambda a: _sqlite_page(src, t, a, self.chunk), t)
        target = _rows(lambda a: _pg_page(dst, t, a, self.chunk), t)
        upserts: list[tuple[Any, ...]] = []
        deletes: list[tuple[Any, ...]] = []
        s = next(source, None)
        d = next(target, None)
        while s is not None or d is not None:
            if d is None or (s is not None and t.key_of(s) < t.key_of(d)):
                upserts.append(s)  # type: ignore[arg-type]
                s = next(source, None)
            elif s is None or t.key_of(d) < t.key_of(s):
                deletes.append(t.key_of(d))
                d = next(target, None)
            else:
                if s != d:
                    upserts.append(s)
                s = next(source, None)
                d = next(target, None)
        if upserts or deletes:
            where = " AND ".join(f"{k} = %s" for k in t.key)
            with dst.transaction():
                with dst.cursor() as cur:
                    if deletes:
                        cur.executemany(f"DELETE FROM {t.name} WHERE {where}", deletes)
                    if upserts:
                        cur.executemany(_upsert_sql(t), upserts)
        return len(upserts) + len(deletes)

    def _finish(self, dst: Any, postgres: ModuleType, feed: str, src_last_seq: int) -> tuple[int, int, int]:
        with dst.transaction():
            # The lock every PostgreSQL node takes to number rows (none should be running yet).
            dst.execute(postgres.LOCK_COUNTERS, (list(migrations.COUNTER_KEYS),))
            current = int(dst.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone()[0])
            top = dst.execute(
                "SELECT greatest((SELECT max(seq) FROM envelopes), (SELECT max(seq) FROM acks))"
            ).fetchone()[0]
            last_seq = max(current, src_last_seq, int(top or 0))
            count, nbytes = dst.execute("SELECT count(*), coalesce(sum(size), 0) FROM envelopes").fetchone()
            # acks and tombstones are storage too (schema 4)
            ack_bytes, ack_junk = dst.execute(
                "SELECT coalesce(sum(size), 0), coalesce(sum(size * junk), 0) FROM acks"
            ).fetchone()
            tombs, tomb_junk = dst.execute("SELECT count(*), coalesce(sum(junk), 0) FROM tombstones").fetchone()
            nbytes = int(nbytes) + int(ack_bytes) + postgres.TOMBSTONE_BYTES * int(tombs)
            junk = int(ack_junk) + postgres.TOMBSTONE_BYTES * int(tomb_junk)
            for key, value in (
                ("last_seq", last_seq),
                ("stored_count", count),
                ("stored_bytes", nbytes),
                ("junk_bytes", junk),
                ("migration_state", "done"),
            ):
                dst.execute("UPDATE meta SET value = %s WHERE key = %s", (str(value), key))
        return last_seq, int(count), int(nbytes)


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="meshrelay migrate-store",
        description="Copy a SQLite meshrelay store into PostgreSQL (resumable: run it again after an interruption).",
    )
    p.add_argument(
        "--config", metavar="FILE", help="meshrelay config: --from defaults to node.data_dir, --to to store.dsn"
    )
    p.add_argument("--from", dest="source", metavar="DATA_DIR", help="the SQLite node's data directory")
    to = p.add_mutually_exclusive_group()
    to.add_argument("--to", dest="dsn", metavar="DSN", help="PostgreSQL DSN of the target database")
    to.add_argument("--to-file", metavar="PATH", help="a file holding the DSN (keeps a password off the command line)")
    p.add_argument(
        "--chunk", type=int, default=DEFAULT_CHUNK, metavar="N", help=f"rows per transaction (default {DEFAULT_CHUNK})"
    )
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    return p


def _resolve(args: argparse.Namespace) -> tuple[str, str]:
    source: str | None = args.source
    dsn: str | None = args.dsn
    if args.to_file:
        try:
            # Same rule as store.dsn_file: refused when group or others may access it.
            dsn = read_secret_file("--to-file", args.to_file, ".")
        except ConfigError as e:
            raise MigrationError(str(e)) from None
    if args.config:
        try:
            cfg = load_config(args.config)
        except ConfigError as e:
            raise MigrationError(f"config error: {e}") from None
        source = source or cfg.node.data_dir
        dsn = dsn or cfg.store.dsn or None
    if not source:
        raise MigrationError("give --from DATA_DIR (or --config FILE)")
    if not dsn:
        raise MigrationError("give --to DSN, --to-file PATH, or a --config whose [store] has dsn or dsn_file")
    return source, dsn


def main(argv: list[str] | None = None) -> int:
    """Run ``migrate-store``; returns the exit status (0 done, 1 failed, 2 usage)."""
    args = _parser().parse_args(argv)
    if args.chunk < 1:
        sys.stderr.write("meshrelay migrate-store: --chunk must be at least 1\n")
        return 2
    try:
        source, dsn = _resolve(args)
        report = Migrator(source, dsn, chunk=args.chunk).run()
    except MigrationError as e:
        sys.stderr.write(f"meshrelay migrate-store: {e}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("meshrelay migrate-store: interrupted; run the same command again to resume\n")
        return 1
    if not args.quiet:
        copied = ", ".join(f"{n} {name}" for name, n in report.copied.items())
        repaired = sum(report.repaired.values())
        sys.stdout.write(
            f"{'resumed' if report.resumed else 'migrated'} store {report.feed_id}: copied {copied}; "
            f"verified identical ({repaired} rows repaired); last_seq {report.last_seq}, "
            f"{report.envelopes} envelopes ({report.bytes} bytes) stored\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
