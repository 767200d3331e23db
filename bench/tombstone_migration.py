"""How long schema migration 6 (compact tombstones) takes on a large store, SQLite and PostgreSQL.

Run from the repository root::

    python bench/tombstone_migration.py                          # 500,000 tombstones, SQLite
    python bench/tombstone_migration.py --tombstones 100000 --dsn postgresql://postgres@127.0.0.1:5432/test

It makes a store at schema 5 (tombstones keyed by mailbox and msg_id text) holding ``--tombstones``
tombstones (500 per mailbox, a third of them junk), then times the migration a node runs when it
starts (``sqlite.migrate``, ``postgres.migrate_schema``: every pending migration, here the one to
schema 6), and prints the sizes before and after, and the time to open the store with nothing to
migrate, for comparison.  It checks that a sample of the converted tombstones still stops its
envelope (``missing``).  Only a temporary directory (and, with ``--dsn``, a schema of its own) is
written; both are removed at the end.
"""

from __future__ import annotations

import argparse
import base64
import os
import random
import secrets
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from meshrelay.store import migrations
from meshrelay.store import sqlite as sqlite_store
from meshrelay.store.base import Caps

T0 = 1_800_000_000
FROM_VERSION = migrations.COMPACT_TOMBSTONES_VERSION - 1


def tombstones(n: int, seed: int) -> Iterator[tuple[str, str, int, int]]:
    """``n`` tombstone rows of schema 5: (mailbox, msg_id, expires, junk)."""
    rng = random.Random(seed)
    mailbox = ""
    for i in range(n):
        if i % 500 == 0:
            mailbox = base64.urlsafe_b64encode(rng.randbytes(32)).rstrip(b"=").decode()
        yield mailbox, rng.randbytes(32).hex(), T0 + rng.randrange(259_800), int(i % 3 == 0)


def schema(dialect: str) -> list[str]:
    out = ["CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"]
    for m in migrations.MIGRATIONS[:FROM_VERSION]:
        out += m.render(dialect)
    return out


def meta_rows(n: int) -> list[tuple[str, str]]:
    rows = {"schema_version": str(FROM_VERSION), "feed_id": secrets.token_hex(16), "last_seq": "0"}
    rows |= {"stored_count": "0", "stored_bytes": str(migrations.TOMBSTONE_BYTES_V4 * n)}
    rows["junk_bytes"] = str(migrations.TOMBSTONE_BYTES_V4 * sum(1 for i in range(n) if i % 3 == 0))
    return list(rows.items())


def sample(n: int, seed: int, k: int = 1000) -> list[tuple[str, str]]:
    picks = set(random.Random(seed + 1).sample(range(n), min(k, n)))
    return [(mb, m) for i, (mb, m, _, _) in enumerate(tombstones(n, seed)) if i in picks]


def file_sizes(path: str) -> str:
    sizes = [os.path.getsize(path + s) if os.path.exists(path + s) else 0 for s in ("", "-wal")]
    return f"file {sizes[0] / 1e6:.1f} MB, WAL {sizes[1] / 1e6:.1f} MB"


def run_sqlite(n: int, seed: int) -> None:
    tmp = tempfile.mkdtemp(prefix="meshrelay-tomb-migration-")
    try:
        path = os.path.join(tmp, sqlite_store.DB_NAME)
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("BEGIN")
        for stmt in schema("sqlite"):
            conn.execute(stmt)
        conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", meta_rows(n))
        conn.executemany(
            "INSERT INTO tombstones (mailbox, msg_id, expires, junk) VALUES (?, ?, ?, ?)", tombstones(n, seed)
        )
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        conn.close()
        print(f"SQLite, {n} tombstones at schema {FROM_VERSION}: {file_sizes(path)}")
        conn = sqlite_store._connect(path, "normal")
        started = time.perf_counter()
        sqlite_store.migrate(conn)
        took = time.perf_counter() - started
        (free,) = conn.execute("PRAGMA freelist_count").fetchone()
        conn.close()
        print(
            f"  migration to schema {migrations.LATEST_VERSION} (its WAL checkpoint included): {took:.2f} s; "
            f"{file_sizes(path)}, of which {free * 4096 / 1e6:.1f} MB free pages (reused by later writes)"
        )
        started = time.perf_counter()
        store = sqlite_store.SQLiteStore(tmp, Caps(max_stored_bytes=1 << 40))
        opened = time.perf_counter() - started
        check(store, n, seed, sqlite_store.TOMBSTONE_BYTES)
        store.close()
        print(f"  opening the migrated store: {opened:.3f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_postgres(dsn: str, n: int, seed: int) -> None:
    import psycopg
    from psycopg.conninfo import make_conninfo

    from meshrelay.store import postgres

    name = f"tomb_migration_{secrets.token_hex(4)}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{name}"')
    target = make_conninfo(dsn, options=f"-csearch_path={name}")
    try:
        with psycopg.connect(target) as conn:
            for stmt in schema("postgresql"):
                conn.execute(stmt)
            with conn.cursor() as cur:
                cur.executemany("INSERT INTO meta (key, value) VALUES (%s, %s)", meta_rows(n))
                with cur.copy("COPY tombstones (mailbox, msg_id, expires, junk) FROM STDIN") as copy:
                    for row in tombstones(n, seed):
                        copy.write_row(row)
        with psycopg.connect(target, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE tombstones")
            print(f"PostgreSQL, {n} tombstones at schema {FROM_VERSION}: {pg_size(conn)}")
            started = time.perf_counter()
            postgres.migrate_schema(conn)
            took = time.perf_counter() - started
            print(f"  migration to schema {migrations.LATEST_VERSION}: {took:.2f} s; {pg_size(conn)}")
        started = time.perf_counter()
        store: Any = postgres.PostgresStore(target, Caps(max_stored_bytes=1 << 40))
        opened = time.perf_counter() - started
        check(store, n, seed, postgres.TOMBSTONE_BYTES)
        store.close()
        print(f"  opening the migrated store: {opened:.3f} s")
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{name}" CASCADE')


def pg_size(conn: Any) -> str:
    (size,) = conn.execute("SELECT pg_total_relation_size('tombstones')").fetchone()
    return f"tombstones with their indexes {size / 1e6:.1f} MB"


def check(store: Any, n: int, seed: int, per_tombstone: int) -> None:
    """A sample of the migrated tombstones still stops its envelopes; the totals count the new size."""
    pairs = sample(n, seed)
    lacking, _ = store.missing(pairs, [], T0).result
    assert lacking == [], f"{len(lacking)} of {len(pairs)} sampled tombstones were lost"
    assert store.stats().bytes == per_tombstone * n, (store.stats().bytes, per_tombstone * n)
    print(f"  checked: {len(pairs)} sampled tombstones still stop their envelopes; stored_bytes {per_tombstone} x {n}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--tombstones", type=int, default=500_000)
    p.add_argument("--seed", type=int, default=10)
    p.add_argument("--dsn", help="also measure PostgreSQL (a schema of its own in this database)")
    p.add_argument("--no-sqlite", action="store_true", help="PostgreSQL only")
    args = p.parse_args()
    if not args.no_sqlite:
        run_sqlite(args.tombstones, args.seed)
    if args.dsn:
        run_postgres(args.dsn, args.tombstones, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
