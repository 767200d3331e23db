"""Bytes on disk per tombstone and per stored ack id (SQLite, and PostgreSQL with --dsn): is the stored form compact?

Run from the repository root::

    python bench/stored_form.py                 # 100 junk acks of 500 made-up ids each
    python bench/stored_form.py --acks 20 --ids 100
    python bench/stored_form.py --dsn postgresql://postgres@127.0.0.1:5432/test   # PostgreSQL too
    python bench/stored_form.py --churn 30      # then 30 rounds of expiry and new acks

It applies ``--acks`` signed acks from throwaway mailboxes, each listing ``--ids`` made-up ids (the
junk-ack attack of issue 10), to a fresh SQLite store with room for all of them, checkpoints the
WAL, and reports the pages each table and index takes (SQLite's ``dbstat``), per tombstone, next to
what the store accounts toward ``max_stored_bytes`` (``TOMBSTONE_BYTES`` per tombstone plus each
ack's canonical JSON).  Only a temporary directory is written; it is removed at the end.

With ``--dsn`` the same acks also go to a PostgreSQL store in a schema of its own (dropped at the
end), and it reports the size of each table (with its TOAST table) and index there (8 KiB pages, no
VACUUM: as a node that just took the flood; with ``--churn``, a VACUUM after each sweep, as if
autovacuum kept up).

With ``--churn R`` the acks get ten different expiry times, and then R rounds each sweep the
oldest tenth and apply a tenth more (new made-up ids, a later expiry): the live count stays the
same while the pages turn over, as on a node under a steady flood (sweeps free slots scattered over
the pages).  Run against an older commit, it measures the stored form of that commit.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from meshrelay import envelope as E
from meshrelay.store.base import Caps
from meshrelay.store.sqlite import DB_NAME, SQLiteStore
from tests.helpers import T0, Identity

try:
    from meshrelay.store.sqlite import TOMBSTONE_BYTES
except ImportError:  # before schema 6 (compact tombstones): one figure for both backends
    from meshrelay.store.base import TOMBSTONE_BYTES  # type: ignore[attr-defined,no-redef]

#: one step of the run: ("ack", signed ack, its tombstones' expiry) or ("sweep", now, 0)
Step = tuple[str, Any, int]


def junk_acks(n: int, ids: int) -> list[E.SignedAck]:
    return [
        E.parse_signed_ack(Identity().signed(ts=T0, ack=[os.urandom(32).hex() for _ in range(ids)])) for _ in range(n)
    ]


def steps(acks: int, ids: int, churn: int) -> list[Step]:
    """The acks to apply (and, with churn, the sweeps between them), the same for both backends."""
    if not churn:
        return [("ack", a, T0 + 3600) for a in junk_acks(acks, ids)]
    tenth = max(1, acks // 10)
    out: list[Step] = [("ack", a, T0 + 3600 + i * 10 // acks) for i, a in enumerate(junk_acks(acks, ids))]
    for k in range(churn):
        out += [("ack", a, T0 + 3600 + 10 + k) for a in junk_acks(tenth, ids)]
        out.append(("sweep", T0 + 3600 + k, 0))
    return out


def run(store: Any, plan: list[Step], after_sweep: Callable[[], None] | None = None) -> None:
    for kind, value, expires in plan:
        if kind == "ack":
            store.apply_ack(value, expires)
        else:
            store.sweep(value)
            if after_sweep is not None:
                after_sweep()


def postgres(dsn: str, plan: list[Step]) -> None:
    """The same acks in a PostgreSQL store of a schema of its own: bytes of each table and index."""
    import psycopg
    from psycopg.conninfo import make_conninfo

    from meshrelay.store.postgres import PostgresStore

    schema = f"stored_form_{secrets.token_hex(4)}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        store: Any = PostgresStore(
            make_conninfo(dsn, options=f"-csearch_path={schema}"), Caps(max_stored_bytes=1 << 40)
        )
        with psycopg.connect(dsn, autocommit=True) as conn:

            def vacuum() -> None:
                # as if autovacuum kept up: the space of swept rows is free for the next inserts
                conn.execute(f'VACUUM "{schema}".tombstones, "{schema}".acks')

            run(store, plan, vacuum)
        accounted = store.stats().bytes
        per_tombstone = getattr(store, "tombstone_bytes", TOMBSTONE_BYTES)
        store.close()
        with psycopg.connect(dsn, autocommit=True) as conn:
            (tombs,) = conn.execute(f'SELECT count(*) FROM "{schema}".tombstones').fetchone()  # type: ignore[misc]
            rows = conn.execute(
                "SELECT c.relname || CASE c.relkind WHEN 'r' THEN ' (with TOAST)' ELSE '' END, "
                "CASE c.relkind WHEN 'r' THEN pg_table_size(c.oid) ELSE pg_relation_size(c.oid) END "
                "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = %s AND (c.relname LIKE 'tombstones%%' OR c.relname LIKE 'acks%%') ORDER BY 2 DESC",
                (schema,),
            ).fetchall()
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    total = sum(int(size) for _, size in rows)
    print(f"\nPostgreSQL: {tombs} tombstones")
    print(f"{'table / index':28s} {'bytes':>14s} {'per tombstone':>14s}")
    for name, size in rows:
        print(f"{name:28s} {size:14d} {size / max(tombs, 1):14.1f}")
    print(f"tombstones and acks, tables and indexes: {total} bytes, {total / max(tombs, 1):.1f} per tombstone")
    print(
        f"accounted toward max_stored_bytes: {accounted} bytes ({per_tombstone} per tombstone + ack JSON):"
        f" {accounted / max(tombs, 1):.1f} per tombstone;"
        f" accounted / on disk = {accounted / max(total, 1):.2f}"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--acks", type=int, default=100)
    p.add_argument("--ids", type=int, default=500)
    p.add_argument("--dsn", help="also measure a PostgreSQL store (a schema of its own in this database)")
    p.add_argument("--churn", type=int, default=0, metavar="R", help="then R rounds of expiry and new acks")
    args = p.parse_args()
    plan = steps(args.acks, args.ids, args.churn)
    tmp = tempfile.mkdtemp(prefix="meshrelay-stored-form-")
    try:
        store = SQLiteStore(tmp, Caps(max_stored_bytes=1 << 40))
        started = time.perf_counter()
        run(store, plan)
        took = time.perf_counter() - started
        accounted = store.stats().bytes
        store.close()
        path = os.path.join(tmp, DB_NAME)
        conn = sqlite3.connect(path)
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            tombs = int(conn.execute("SELECT count(*) FROM tombstones").fetchone()[0])
            ack_rows, ack_bytes = conn.execute("SELECT count(*), sum(size) FROM acks").fetchone()
            try:
                pages = conn.execute(
                    "SELECT name, SUM(pgsize), SUM(payload) FROM dbstat GROUP BY name ORDER BY 2 DESC"
                ).fetchall()
            except sqlite3.Error as e:
                print(f"(no dbstat in this SQLite: {e})")
                pages = []
        finally:
            conn.close()
        size = os.path.getsize(path)
        print(f"{tombs} tombstones from {ack_rows} acks of {args.ids} ids ({ack_bytes} bytes of ack JSON)")
        applied = sum(len(v.ack) for k, v, _ in plan if k == "ack")
        print(f"applying them (inline writer, sweeps included): {took:.2f} s, {took / applied * 1e6:.1f} us per id")
        print(f"{'table / index':28s} {'pages, bytes':>14s} {'payload':>12s} {'per tombstone':>14s}")
        for name, pg, payload in pages[:6]:
            print(f"{name:28s} {pg:14d} {payload:12d} {pg / max(tombs, 1):14.1f}")
        print(f"database file {size} bytes: {size / max(tombs, 1):.1f} per tombstone, ack included")
        print(
            f"accounted toward max_stored_bytes: {accounted} bytes ({TOMBSTONE_BYTES} per tombstone + ack JSON):"
            f" {accounted / max(tombs, 1):.1f} per tombstone; accounted / file = {accounted / size:.2f}"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.dsn:
        postgres(args.dsn, plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
