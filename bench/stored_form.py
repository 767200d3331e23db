"""Bytes on disk per tombstone and per stored ack id (SQLite): is the stored form compact?

Run from the repository root::

    python bench/stored_form.py                 # 100 junk acks of 500 made-up ids each
    python bench/stored_form.py --acks 20 --ids 100

It applies ``--acks`` signed acks from throwaway mailboxes, each listing ``--ids`` made-up ids (the
junk-ack attack of issue 10), to a fresh SQLite store with room for all of them, checkpoints the
WAL, and reports the pages each table and index takes (SQLite's ``dbstat``), per tombstone, next to
what the store accounts toward ``max_stored_bytes`` (``TOMBSTONE_BYTES`` per tombstone plus each
ack's canonical JSON).  Only a temporary directory is written; it is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from meshrelay import envelope as E
from meshrelay.store.base import TOMBSTONE_BYTES, Caps
from meshrelay.store.sqlite import DB_NAME, SQLiteStore
from tests.helpers import T0, Identity


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--acks", type=int, default=100)
    p.add_argument("--ids", type=int, default=500)
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="meshrelay-stored-form-")
    try:
        store = SQLiteStore(tmp, Caps(max_stored_bytes=1 << 40))
        for _ in range(args.acks):
            ack = E.parse_signed_ack(Identity().signed(ts=T0, ack=[os.urandom(32).hex() for _ in range(args.ids)]))
            store.apply_ack(ack, T0 + 3600)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
