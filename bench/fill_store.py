"""Fill a meshrelay SQLite data dir with N signed envelopes, fast.

    python bench/fill_store.py DATA_DIR [--n 1000000] [--workers 2]

The store is created through the node's own code path (``meshrelay.store.sqlite``'s
``migrate``: same schema, same migrations, same ``meta`` rows), then the rows are
bulk-inserted exactly as ``SQLiteStore.add_envelope`` writes them (``seq``,
``msg_id``, ``mailbox``, ``sender``, ``expires``, ``size``, ``body`` = the
canonical JSON text) and ``meta`` gets ``last_seq``, ``stored_count`` and
``stored_bytes``, so a node started on it sees a consistent store.

Every envelope is really signed (Ed25519, by ``--workers`` processes) and valid
for ``--ttl`` seconds (default 3 days, the default ``max_ttl``).  They are spread
so that no cap is exceeded: at most 128 per mailbox and 8 per (sender, mailbox).
The mailbox and sender private keys go to ``DATA_DIR.keys.json`` so that other
tools can poll the mailboxes.

At ~1 KiB per envelope, 1,000,000 envelopes are about 1.05 GB of envelope bytes:
above 1 GiB nodes on such a store need ``limits.max_stored_bytes`` raised
(``bench/bigstore.py`` does).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sqlite3
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common

from meshrelay.store.sqlite import DB_NAME, migrate

CHUNK = 20000

_POP: common.Population | None = None
_ARGS: tuple[int, int, int] = (0, 0, 0)


def _init_worker(keys: dict[str, Any], n: int, ts: int, ttl: int, ct_bytes: int) -> None:
    global _POP, _ARGS
    _POP = population_from_keys(keys, n)
    _ARGS = (ts, ttl, ct_bytes)


def population_from_keys(keys: dict[str, Any], n: int) -> common.Population:
    pop = common.Population.__new__(common.Population)
    pop.n = n
    pop.mailboxes = [common.key_from_hex(h) for h in keys["mailboxes"]]
    pop.senders = [common.key_from_hex(h) for h in keys["senders"]]
    pop.m, pop.s = len(pop.mailboxes), len(pop.senders)
    pop.mailbox_b64 = [common.key_b64u(k) for k in pop.mailboxes]
    pop.sender_b64 = [common.key_b64u(k) for k in pop.senders]
    return pop


def _rows(bounds: tuple[int, int]) -> list[tuple[Any, ...]]:
    assert _POP is not None
    ts, ttl, ct_bytes = _ARGS
    start, stop = bounds
    out = []
    for offset, (mi, msg_id, text) in enumerate(_POP.envelopes(ts, ttl, ct_bytes, start, stop)):
        i = start + offset
        si = (i // _POP.m) % _POP.s
        out.append((i + 1, msg_id, _POP.mailbox_b64[mi], _POP.sender_b64[si], ts + ttl, len(text), text))
    return out


def fill(data_dir: str, n: int, workers: int, ttl: int, ct_bytes: int, quiet: bool = False) -> dict[str, Any]:
    os.makedirs(data_dir, exist_ok=True)
    path = os.path.join(data_dir, DB_NAME)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    migrate(conn)
    (existing,) = conn.execute("SELECT COUNT(*) FROM envelopes").fetchone()
    if existing:
        raise SystemExit(f"{path} already holds {existing} envelopes; fill an empty data dir")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA cache_size=-1000000")

    pop = common.Population(n)
    keys = {
        "n": n,
        "mailboxes": [common.private_hex(k) for k in pop.mailboxes],
        "senders": [common.private_hex(k) for k in pop.senders],
    }
    ts = int(time.time())
    keys.update({"ts": ts, "ttl": ttl})
    with open(data_dir.rstrip("/") + ".keys.json", "w") as fh:
        json.dump(keys, fh)

    t0 = time.monotonic()
    total_bytes = 0
    bounds = [(i, min(n, i + CHUNK)) for i in range(0, n, CHUNK)]
    conn.execute("BEGIN")
    with multiprocessing.get_context("fork").Pool(
        workers, initializer=_init_worker, initargs=(keys, n, ts, ttl, ct_bytes)
    ) as pool:
        for k, rows in enumerate(pool.imap(_rows, bounds)):
            conn.executemany(
                "INSERT INTO envelopes (seq, msg_id, mailbox, sender, expires, size, body) VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            total_bytes += sum(r[5] for r in rows)
            if not quiet and k % 10 == 9:
                done = bounds[k][1]
                print(f"  {done} envelopes, {time.monotonic() - t0:.0f}s", flush=True)
    for key, value in (("last_seq", n), ("stored_count", n), ("stored_bytes", total_bytes)):
        conn.execute("UPDATE meta SET value = ? WHERE key = ?", (str(value), key))
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    elapsed = time.monotonic() - t0
    size = os.path.getsize(path)
    return {"n": n, "stored_bytes": total_bytes, "db_file_bytes": size, "fill_s": round(elapsed, 1), "path": path}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir")
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1), help="signing processes")
    p.add_argument("--ttl", type=int, default=259200)
    p.add_argument("--ciphertext-bytes", type=int, default=common.CIPHERTEXT_BYTES)
    args = p.parse_args(argv)
    info = fill(args.data_dir, args.n, args.workers, args.ttl, args.ciphertext_bytes)
    print(
        f"filled {info['path']}: {info['n']} envelopes, {info['stored_bytes'] / 1e6:.0f} MB of envelopes, "
        f"{info['db_file_bytes'] / 1e6:.0f} MB file, in {info['fill_s']}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
