"""The embedded SQLite store (the default backend).

Writes go through one writer (a child process by default, see
``writer_process.py``, or a thread) that commits many operations per
transaction (group commit): an operation is queued, the writer takes
everything queued so far, runs each atomically (inside a savepoint when it
writes more than once), commits once, and only then fires each operation's
Deferred.  While one batch commits, the next one fills, so the batch size
follows the load; with the writer process, the writes made in one reactor
turn leave together.  Reads run on their own connections in a small reader
pool (WAL mode lets them run beside the writer).

``durability = "normal"`` uses ``synchronous=NORMAL`` in WAL mode: a
committed transaction survives the process being killed (kill -9).
``"full"`` uses ``synchronous=FULL``: every commit is fsynced, so it also
survives power loss.

Start-up reads a few rows of ``meta``; nothing proportional to the stored data
is loaded into memory.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from meshrelay.envelope import Envelope, SignedAck, verify_signature
from meshrelay.executor import Executor, InlineExecutor
from meshrelay.files import private_dir, private_file
from meshrelay.store import migrations
from meshrelay.store.base import (
    ACCEPTED,
    BAD_PERMIT,
    BAD_SIGNATURE,
    CAP_REFUSALS,
    DUPLICATE,
    POLICY_ACCEPTED,
    POLICY_DUPLICATE,
    POLICY_FULL,
    POLICY_STALE,
    SENDER_CAP,
    STORAGE_FULL,
    AckResult,
    AddResult,
    Bodies,
    Caps,
    ChangesPage,
    Cursor,
    FeedItem,
    Refused,
    StoreError,
    StoreStats,
    SweepResult,
    bucket_refusal,
    cut_page,
    fill_bodies,
    junk_budget,
    settle_batch,
    settle_items,
    tombstone_key,
)

T = TypeVar("T")

DB_NAME = "meshrelay.sqlite3"
#: bytes a tombstone counts for in the stored total (see ``Store.tombstone_bytes``)
TOMBSTONE_BYTES = migrations.tombstone_bytes(migrations.LATEST_VERSION, "sqlite")
#: the largest seq a 64-bit column holds: a larger ``since`` simply has nothing after it
MAX_SEQ = 2**63 - 1
#: rows deleted per sweeper transaction, so deposits interleave with a big sweep
SWEEP_CHUNK = 5000
#: WAL pages (4 KiB) after which the writer checkpoints by itself, should the
#: checkpointer thread fall behind: at most this many, and an eighth of the
#: storage cap for smaller caps (``wal_backstop_pages``)
WAL_BACKSTOP_PAGES = 20000
#: ... and at least this many
WAL_BACKSTOP_MIN_PAGES = 256
WAL_PAGE = 4096
#: the size the WAL file is cut back to when a checkpoint lets it restart (``journal_size_limit``,
#: at most the backstop): without it the file keeps the size of its largest burst.  Not much smaller:
#: at 4 MiB a node under load cut the file back after every checkpoint and re-grew it inside its
#: commits, and the deposit-to-peer p99 rose from about 40 to 60-120 ms (bench/mesh_bench.py latency)
WAL_KEEP_BYTES = 64 * 1024 * 1024


def wal_backstop_pages(max_stored_bytes: int) -> int:
    """WAL pages after which the writer checkpoints by itself: a store's WAL slack during a burst."""
    return max(WAL_BACKSTOP_MIN_PAGES, min(WAL_BACKSTOP_PAGES, max_stored_bytes // 8 // WAL_PAGE))


def wal_keep_bytes(max_stored_bytes: int) -> int:
    """The WAL's size once a checkpoint let it restart (journal_size_limit): its slack after a burst."""
    return min(WAL_KEEP_BYTES, wal_backstop_pages(max_stored_bytes) * WAL_PAGE)


#: dedup, tombstone and both cap counts of a deposit in one statement; both counts come from one scan
#: of the mailbox's entries in envelopes_by_mailbox, which holds the sender (schema 7)
#: (parameters: msg_id, mailbox, now, sender, tombstone_key(mailbox, msg_id))
_ADD_CHECKS = """
SELECT
    EXISTS (SELECT 1 FROM envelopes WHERE msg_id = ?1),
    EXISTS (SELECT 1 FROM tombstones WHERE digest = ?5 AND expires > ?3),
    c.n, c.s
FROM (SELECT COUNT(*) AS n, COALESCE(SUM(sender = ?4), 0) AS s
      FROM envelopes WHERE mailbox = ?2 AND expires > ?3) AS c
"""


#: missing(): the msg_ids of a JSON array (by index) no stored envelope has, in input order (their
#: tombstones are looked up next, by keys computed in Python: see ``_keyed``)
_UNSTORED_IDS = """
SELECT CAST(j.key AS INTEGER) FROM json_each(:items) AS j
WHERE NOT EXISTS (SELECT 1 FROM envelopes WHERE msg_id = j.value)
ORDER BY j.key
"""
_LACKING_ACKS = """
SELECT CAST(j.key AS INTEGER) FROM json_each(:items) AS j
WHERE NOT EXISTS (SELECT 1 FROM acks WHERE mailbox = json_extract(j.value, '$[0]')
                  AND nonce = json_extract(j.value, '$[1]'))
ORDER BY j.key
"""
#: bodies(): per requested id (by index, in request order) its size and body, or NULLs when not held
_BODIES_ENVELOPES = """
SELECT CAST(j.key AS INTEGER), e.size, e.body FROM json_each(:items) AS j
LEFT JOIN envelopes AS e ON e.msg_id = j.value AND e.expires > :now
ORDER BY j.key
"""
_BODIES_ACKS = """
SELECT CAST(j.key AS INTEGER), a.size, a.body FROM json_each(:items) AS j
LEFT JOIN acks AS a ON a.mailbox = json_extract(j.value, '$[0]') AND a.nonce = json_extract(j.value, '$[1]')
    AND a.expires > :now
ORDER BY j.key
"""


def _changes_sql(by_mailbox: bool, ids_only: bool, budget: bool) -> str:
    """One statement for a page of the feed: envelopes and acks merged by seq under one snapshot.

    Columns: seq, kind, mailbox, key, size, body.  With a byte budget the
    rows stop after the first one whose running size passes ``:max`` (that
    one is returned too, and always the first two rows, so the caller knows
    when there is more), so at most one body beyond the page is read.
    """
    where = "seq > :since AND expires > :now" + (" AND mailbox = :mb" if by_mailbox else "")
    body_e = "''" if ids_only else "body"
    body_a = "''" if ids_only else "body"
    merged = (
        f"SELECT * FROM (SELECT seq, 'envelope' AS kind, mailbox, msg_id AS key, size, {body_e} AS body "
        f"FROM envelopes WHERE {where} ORDER BY seq LIMIT :n) "
        f"UNION ALL SELECT * FROM (SELECT seq, 'ack', mailbox, nonce, size, {body_a} "
        f"FROM acks WHERE {where} ORDER BY seq LIMIT :n) ORDER BY seq LIMIT :n"
    )
    if not budget:
        return merged
    return (
        f"SELECT seq, kind, mailbox, key, size, body FROM ("
        f"SELECT m.*, SUM(size) OVER (ORDER BY seq ROWS UNBOUNDED PRECEDING) AS run, "
        f"ROW_NUMBER() OVER (ORDER BY seq) AS rn FROM ({merged}) AS m"
        f") WHERE run - size <= :max OR rn <= 2 ORDER BY seq"
    )


def _sql_tombstone_key(mailbox: object, msg_id: object) -> bytes | None:
    """``tombstone_key`` as a SQL function (NULL unless both are text)."""
    if isinstance(mailbox, str) and isinstance(msg_id, str):
        return tombstone_key(mailbox, msg_id)
    return None


def register_functions(conn: sqlite3.Connection) -> None:
    """The SQL functions the store's statements and migrations use (``meshrelay_tombstone_key``)."""
    conn.create_function(migrations.SQLITE_TOMBSTONE_KEY, 2, _sql_tombstone_key, deterministic=True)


#: page cache of a reader connection, KiB
READER_CACHE_KIB = 8_000
#: page cache of the writer's connection, KiB (an upper bound: SQLite fills it only as pages are used).
#: Every insert updates three indexes at places spread over them (msg_id, mailbox, sender); at a
#: hundred thousand envelopes those indexes alone outgrow 8 MiB, and each miss is a read of the
#: file.  A 100k catch-up (bench/mesh_bench.py catchup) spent 101-102 us per envelope in the
#: children with 64 MiB against 104-108 with 8 MiB (docs/benchmarks.md, fourth session).
WRITER_CACHE_KIB = 65_536


def _connect(path: str, durability: str, cache_kib: int = READER_CACHE_KIB) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    register_functions(conn)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=" + ("FULL" if durability == "full" else "NORMAL"))
    conn.execute(f"PRAGMA cache_size=-{int(cache_kib)}")
    conn.execute("PRAGMA temp_store=MEMORY")
    return conn


def checkpoint(conn: sqlite3.Connection) -> None:
    """One passive WAL checkpoint (never waits for the writer); the checkpointer thread's tick."""
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


def _meta_get(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def _meta_set(conn: sqlite3.Connection, key: str, value: object) -> None:
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, str(value)),
    )


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema up to date; returns the version it started from."""
    register_functions(conn)
    conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    current = int(_meta_get(conn, "schema_version") or 0)
    for m in migrations.pending(current):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for stmt in m.render("sqlite"):
                conn.execute(stmt)
            for key, value in migrations.seed_meta(m.version).items():
                _meta_set(conn, key, value)
            _meta_set(conn, "schema_version", m.version)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    if current and current < migrations.LATEST_VERSION:
        # A migration may rewrite whole tables (schema 6: every tombstone, and the old pages zeroed
        # where SQLite is built with SECURE_DELETE): move them into the file and cut the WAL back now.
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    return current


class _Batch:
    """Per-transaction scratch state the writer's operations update."""

    __slots__ = ("seq", "count", "bytes", "junk")

    def __init__(self, seq: int, count: int, nbytes: int, junk: int = 0) -> None:
        self.seq = seq
        self.count = count
        #: everything accounted: envelopes, signed acks and tombstones
        self.bytes = nbytes
        #: the part of ``bytes`` anyone can create without holding mail here (see ``junk_budget``)
        self.junk = junk


# ---------------------------------------------------------------------- write operations
#
# A write operation is data: ``(name, args)``.  The same functions run in the
# writer thread, inline (tests) or in the writer process, so the group commit
# has one implementation whichever place it runs in.


def _remember_refusal(conn: sqlite3.Connection, caps: Caps, refused: tuple[str, str, str, int, str, int]) -> bool:
    """Remember a replica refused at a cap, within the two bounds; False when a bound stopped it.

    ``refused`` is (msg_id, peer, mailbox, expires, reason, now).  Its only
    write is its last statement.
    """
    msg_id, peer, mailbox = refused[0], refused[1], refused[2]
    known = conn.execute("SELECT 1 FROM refused WHERE msg_id = ? AND peer = ?", (msg_id, peer)).fetchone()
    if not known:
        (per_mailbox,) = conn.execute(
            "SELECT COUNT(*) FROM refused WHERE peer = ? AND mailbox = ?", (peer, mailbox)
        ).fetchone()
        if per_mailbox >= caps.per_mailbox_pending:
            return False
        (total,) = conn.execute("SELECT COUNT(*) FROM refused").fetchone()
        if total >= caps.max_refused:
            return False
    conn.execute(
        "INSERT INTO refused (msg_id, peer, mailbox, expires, reason, at) VALUES (?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (msg_id, peer) DO UPDATE SET reason = excluded.reason, expires = excluded.expires",
        refused,
    )
    return True


def _op_add(conn: sqlite3.Connection, st: _Batch, caps: Caps, args: tuple[Any, ...]) -> AddResult:
    result = _add(conn, st, caps, args)
    peer = args[8]
    if peer is not None and result.status in CAP_REFUSALS:
        msg_id, mailbox, _, expires, _, _, now, _, _ = args[:9]
        remembered = _remember_refusal(conn, caps, (msg_id, peer, mailbox, expires, result.status, now))
        return AddResult(result.status, pending=result.pending, limit=result.limit, remembered=remembered)
    return result


def _add(conn: sqlite3.Connection, st: _Batch, caps: Caps, args: tuple[Any, ...]) -> AddResult:
    msg_id, mailbox, sender, expires, size, body, now, check, _peer, contact, stranger_cap = args
    replica = False
    if check is not None:
        key, sig, signed, replica, permit_check = check
        if not replica:
            # A deposit's signature is checked before dedup (docs/protocol.md 4.2).
            if not verify_signature(key, sig, signed):
                return AddResult(BAD_SIGNATURE)
            # v3: then its permit's, when the relay left that to the writer too.
            if permit_check is not None and not verify_signature(*permit_check):
                return AddResult(BAD_PERMIT)
    stored, tombstoned, in_mailbox, from_sender = conn.execute(
        _ADD_CHECKS, (msg_id, mailbox, now, sender, tombstone_key(mailbox, msg_id))
    ).fetchone()
    # v3: a contact copy of a stored envelope may upgrade it (from stranger mail to contact mail).
    upgrade = stored and contact
    if (stored or tombstoned) and not upgrade:
        # A replica of something already here (or tombstoned) is a duplicate
        # whatever its signature says: nothing is stored either way, and sync
        # re-sends such copies all the time.
        return AddResult(DUPLICATE)
    if replica and not verify_signature(key, sig, signed):
        # A new replica, or a contact copy that may upgrade a stored one: its
        # signature is checked first, so an upgrade never stores a forged text.
        return AddResult(BAD_SIGNATURE)
    if upgrade:
        return _upgrade(conn, st, msg_id, mailbox, expires, size, body)
    if st.bytes + size > caps.max_stored_bytes:
        return AddResult(STORAGE_FULL)
    refusal = bucket_refusal(contact, stranger_cap, in_mailbox, lambda: _count_contacts(conn, mailbox, now), caps)
    if refusal is not None:
        return refusal
    if from_sender >= caps.per_sender_pending:
        return AddResult(SENDER_CAP, pending=from_sender, limit=caps.per_sender_pending)
    # Accepted: forget its remembered refusals first, so that the insert stays
    # the last write (no savepoint).  Should the insert fail, a forgotten
    # refusal only loses a hint.
    conn.execute("DELETE FROM refused WHERE msg_id = ?", (msg_id,))
    conn.execute(
        "INSERT INTO envelopes (seq, msg_id, mailbox, sender, expires, size, body) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (st.seq + 1, msg_id, mailbox, sender, expires, size, body),
    )
    if contact:
        # After the envelope: should this fail alone, the envelope stays, as stranger mail.
        conn.execute(
            "INSERT OR IGNORE INTO contacts (msg_id, mailbox, expires) VALUES (?, ?, ?)", (msg_id, mailbox, expires)
        )
    st.seq += 1
    st.count += 1
    st.bytes += size
    return AddResult(ACCEPTED, seq=st.seq)


def _add_args(env: Envelope, now: int, verify: str | None, peer: str | None) -> tuple[Any, ...]:
    """The ``add`` operation's arguments (plain values: they cross to the writer process)."""
    body = env.raw
    check = (
        None if verify is None else (env.sender_key, env.sig_bytes, env.signed, verify == "replica", env.permit_check)
    )
    return (
        env.msg_id,
        env.mailbox,
        env.sender,
        env.expires,
        len(body),
        body,
        now,
        check,
        peer,
        env.contact,
        env.stranger_cap,
    )


def _count_contacts(conn: sqlite3.Connection, mailbox: str, now: int) -> int:
    """Live contact envelopes of ``mailbox`` (protocol v3)."""
    (n,) = conn.execute(
        "SELECT COUNT(*) FROM contacts c JOIN envelopes e ON e.msg_id = c.msg_id "
        "WHERE c.mailbox = ? AND c.expires > ? AND e.expires > ?",
        (mailbox, now, now),
    ).fetchone()
    return int(n)


def _upgrade(
    conn: sqlite3.Connection, st: _Batch, msg_id: str, mailbox: str, expires: int, size: int, body: str
) -> AddResult:
    """A contact copy of a stored envelope: the stored copy becomes contact mail, with its permit (v3, 12.5)."""
    if conn.execute("SELECT 1 FROM contacts WHERE msg_id = ?", (msg_id,)).fetchone() is not None:
        return AddResult(DUPLICATE)
    row = conn.execute("SELECT size FROM envelopes WHERE msg_id = ? AND mailbox = ?", (msg_id, mailbox)).fetchone()
    if row is None:
        return AddResult(DUPLICATE)
    conn.execute("UPDATE envelopes SET body = ?, size = ? WHERE msg_id = ?", (body, size, msg_id))
    conn.execute("INSERT INTO contacts (msg_id, mailbox, expires) VALUES (?, ?, ?)", (msg_id, mailbox, expires))
    st.bytes += size - int(row[0])
    return AddResult(DUPLICATE, upgraded=True)


#: how many tombstone keys one statement lists (``digest IN (?, ...)``): a list is cut into pieces
#: of the largest size and each piece padded with its last key up to the smallest size that holds
#: it, so such statements come in three shapes (compiled once each, kept in the statement cache),
#: and an ack of up to MAX_ACK_IDS ids is one statement
_KEY_LIST_SIZES = (8, 64, 512)


#: the placeholder list of each size: ``(?, ?, ...)``
_IN_KEYS = {n: "(" + ", ".join("?" * n) + ")" for n in _KEY_LIST_SIZES}


def _key_chunks(keys: list[bytes]) -> Iterator[tuple[str, list[bytes]]]:
    """``(placeholders, keys)`` pieces of ``keys``, each padded to one of ``_KEY_LIST_SIZES``."""
    largest = _KEY_LIST_SIZES[-1]
    for i in range(0, len(keys), largest):
        chunk = keys[i : i + largest]
        size = next(n for n in _KEY_LIST_SIZES if n >= len(chunk))
        yield _IN_KEYS[size], chunk + [chunk[-1]] * (size - len(chunk))


def _keyed(conn: sqlite3.Connection, keys: dict[bytes, T], sql: str, *params: Any) -> set[T]:
    """Run ``sql`` over ``keys`` (tombstone key -> anything); the values of the digests it returns.

    ``{keys}`` in ``sql`` stands for one piece of the key list (``_key_chunks``), bound after
    ``params``.  The keys come from Python (``tombstone_key``): as a SQL function called per row
    inside a json_each they cost a sync page's ``missing()`` 3.6 instead of 2.3 us per id, a 500-id
    ack about twice as much, and every call took the interpreter lock back in a reader thread.
    """
    found: set[T] = set()
    for in_keys, chunk in _key_chunks(list(keys)):
        for (digest,) in conn.execute(sql.format(keys=in_keys), (*params, *chunk)):
            found.add(keys[digest])
    return found


def _extend_tombstones(conn: sqlite3.Connection, keys: dict[bytes, str], expires: int) -> set[str]:
    """Extend the tombstones of ``keys`` (tombstone key -> msg_id) that exist to at least ``expires``; the ids that had one."""
    if not keys:
        return set()
    sql = "UPDATE tombstones SET expires = MAX(expires, ?) WHERE digest IN {keys} RETURNING digest"
    return _keyed(conn, keys, sql, expires)


#: a mailbox's tombstones read in one range scan (``_tombstoned``) when there are at most this many
#: per id asked about, plus ``_RANGE_SLACK``; past that, each id is looked up by its key
_RANGE_PER_ID = 4
_RANGE_SLACK = 64


def _tombstoned(
    conn: sqlite3.Connection,
    mailbox: str,
    ids: Sequence[str],
    keys: Mapping[str, bytes] | None = None,
    real_only: bool = False,
) -> set[str]:
    """The ``ids`` of ``mailbox`` that have a tombstone, live or not (``real_only``: one that is not junk).

    ``keys`` (msg_id -> tombstone key) when the caller has them already.  A
    mailbox's tombstone keys share their first bytes (``tombstone_prefix``), so
    its tombstones sit side by side in the table: one range scan finds them all,
    and no key is computed when it finds none.  For a junk ack from a throwaway
    mailbox that is one B-tree probe, where looking up each of 500 ids took about
    0.45 ms of the writer (and computing and looking up the keys for the ``held``
    lists of the acks a node serves was 24 % of a peer's interpreter-lock samples
    while junk acks crossed a mesh).  A mailbox with many more tombstones than
    ids asked about is looked up id by id instead.
    """
    if not ids:
        return set()
    if keys is None:
        keys = {}
    real = " AND junk = 0" if real_only else ""

    def key_of() -> Mapping[str, bytes]:
        return keys or dict(zip(ids, migrations.tombstone_keys(mailbox, list(ids)), strict=True))

    head = migrations.tombstone_prefix(mailbox)
    end = int.from_bytes(head, "big") + 1
    if end < 1 << (8 * len(head)):
        bounds = (head, end.to_bytes(len(head), "big"))
        limit = _RANGE_PER_ID * len(ids) + _RANGE_SLACK
        (n,) = conn.execute(
            "SELECT count(*) FROM (SELECT 1 FROM tombstones WHERE digest >= ? AND digest < ? LIMIT ?)",
            (*bounds, limit + 1),
        ).fetchone()
        if not n:
            return set()
        if n <= limit:
            found = {
                d
                for (d,) in conn.execute(
                    f"SELECT digest FROM tombstones WHERE digest >= ? AND digest < ?{real}", bounds
                )
            }
            if not found:
                return set()
            known = key_of()
            return {m for m in ids if known[m] in found}
    known = key_of()
    return _keyed(conn, {known[m]: m for m in ids}, "SELECT digest FROM tombstones WHERE digest IN {keys}" + real)


def _op_ack(conn: sqlite3.Connection, st: _Batch, caps: Caps, args: tuple[Any, ...]) -> AckResult:
    """Delete and tombstone the held envelopes acked, tombstone unheld ids within the junk budget, record the ack.

    What was held is always deleted and tombstoned (that frees space: a
    tombstone costs far less than any envelope), even at the storage cap.
    Tombstones of ids this node does not hold, and the signed ack when it
    deleted nothing here, are "junk": anyone with a key can make them, so
    they are kept only while they fit ``junk_budget(caps)`` and the storage
    cap.  The signed ack of held mail is recorded when it fits the storage
    cap; when it does not, it is applied but not recorded (``stored=False``).
    An ack relayed by a peer (``from_peer``) has a second junk share that
    clients cannot fill (see ``junk_budget``).
    """
    mailbox, nonce, ids, tombstone_expires, body = args[:5]
    from_peer = bool(args[5]) if len(args) > 5 else False
    #: v4 (docs/protocol.md 13): ids the relaying peer attests it held; not junk here
    attested = frozenset(args[6]) if len(args) > 6 else frozenset()
    size = len(body.encode("utf-8"))
    budget = junk_budget(caps, from_peer)
    # A few statements for the whole list (json_each), not a few per id: a 500-id ack ran about
    # 1,900 statements and held the writer about 9 ms, and every write queued behind it waited
    # (issue 10's junk acks: 6 a second per node, with their pushes).  Ids listed twice are
    # applied once; what is skipped over the budget counts each time it is listed.
    unique = list(dict.fromkeys(ids))
    listed = json.dumps(unique)
    held = dict(
        conn.execute(
            "DELETE FROM envelopes WHERE mailbox = ? AND msg_id IN (SELECT value FROM json_each(?)) "
            "RETURNING msg_id, size",
            (mailbox, listed),
        ).fetchall()
    )
    keys = dict(zip(unique, migrations.tombstone_keys(mailbox, unique), strict=True))
    deleted = [m for m in unique if m in held]
    unheld = [m for m in unique if m not in held]
    # Which ids already have a tombstone (to extend, not insert): for a junk ack usually none.
    tombstoned = _tombstoned(conn, mailbox, unique, keys)
    if deleted:
        st.count -= len(deleted)
        st.bytes -= sum(held.values())
        # Tombstone what was held (or extend the tombstone it already had).
        _extend_tombstones(conn, {keys[m]: m for m in deleted if m in tombstoned}, tombstone_expires)
        fresh = [(keys[m], tombstone_expires) for m in deleted if m not in tombstoned]
        conn.executemany("INSERT INTO tombstones (digest, expires, junk) VALUES (?, ?, 0)", fresh)
        st.bytes += TOMBSTONE_BYTES * len(fresh)
    skipped = 0
    vouched = [m for m in unheld if m in attested]
    if any(m in tombstoned for m in vouched):
        # Junk tombstones made real by a peer that held the message: they leave the junk budget.
        sql = "UPDATE tombstones SET junk = 0 WHERE junk = 1 AND digest IN {keys} RETURNING digest"
        made_real = len(_keyed(conn, {keys[m]: m for m in vouched if m in tombstoned}, sql))
        st.junk -= TOMBSTONE_BYTES * made_real
    extended = _extend_tombstones(conn, {keys[m]: m for m in unheld if m in tombstoned}, tombstone_expires)
    rows = []
    for msg_id in unheld:
        if msg_id in extended:
            continue
        real = msg_id in attested
        if st.bytes + TOMBSTONE_BYTES > caps.max_stored_bytes or (not real and st.junk + TOMBSTONE_BYTES > budget):
            skipped += ids.count(msg_id) if len(unique) < len(ids) else 1
            continue
        rows.append((keys[msg_id], tombstone_expires, 0 if real else 1))
        st.bytes += TOMBSTONE_BYTES
        if not real:
            st.junk += TOMBSTONE_BYTES
    if rows:
        # in key order: the inserts walk the tombstone index once instead of jumping around it
        rows.sort()
        conn.executemany("INSERT INTO tombstones (digest, expires, junk) VALUES (?, ?, ?)", rows)
    vouched_any = bool(vouched)
    if ids:
        conn.execute(
            "DELETE FROM refused WHERE mailbox = ? AND msg_id IN (SELECT value FROM json_each(?))", (mailbox, listed)
        )
    if conn.execute("SELECT 1 FROM acks WHERE mailbox = ? AND nonce = ?", (mailbox, nonce)).fetchone():
        return AckResult(deleted=tuple(deleted), new=False, skipped=skipped)
    junk = 0 if deleted or vouched_any else 1
    if st.bytes + size > caps.max_stored_bytes or (junk and st.junk + size > budget):
        return AckResult(deleted=tuple(deleted), new=True, stored=False, skipped=skipped)
    st.seq += 1
    conn.execute(
        "INSERT INTO acks (seq, mailbox, nonce, expires, body, size, junk) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (st.seq, mailbox, nonce, tombstone_expires, body, size, junk),
    )
    st.bytes += size
    st.junk += size * junk
    return AckResult(deleted=tuple(deleted), new=True, seq=st.seq, skipped=skipped)


def _op_nonce(conn: sqlite3.Connection, st: _Batch, caps: Caps, args: tuple[Any, ...]) -> bool:
    cur = conn.execute("INSERT INTO nonces (scope, nonce, expires) VALUES (?, ?, ?) ON CONFLICT DO NOTHING", args)
    return cur.rowcount == 1


def _op_cursor(conn: sqlite3.Connection, st: _Batch, caps: Caps, args: tuple[Any, ...]) -> None:
    conn.execute(
        "INSERT INTO peer_cursors (peer, feed_id, since, synced_at) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (peer) DO UPDATE SET feed_id = excluded.feed_id, since = excluded.since, "
        "synced_at = excluded.synced_at",
        args,
    )


def _op_sweep(conn: sqlite3.Connection, st: _Batch, caps: Caps, args: tuple[Any, ...]) -> dict[str, int]:
    """One chunk of the expiry sweep; the counts it removed (``more`` when a chunk was full)."""
    (now,) = args
    rows = conn.execute(
        "DELETE FROM envelopes WHERE seq IN (SELECT seq FROM envelopes WHERE expires <= ? LIMIT ?) RETURNING size",
        (now, SWEEP_CHUNK),
    ).fetchall()
    st.count -= len(rows)
    st.bytes -= sum(r[0] for r in rows)
    out = {"envelopes": len(rows), "more": int(len(rows) == SWEEP_CHUNK)}
    # tombstones and acks are accounted too
    tombs = conn.execute(
        "DELETE FROM tombstones WHERE digest IN "
        "(SELECT digest FROM tombstones WHERE expires <= ? LIMIT ?) RETURNING junk",
        (now, SWEEP_CHUNK),
    ).fetchall()
    st.bytes -= TOMBSTONE_BYTES * len(tombs)
    st.junk -= TOMBSTONE_BYTES * sum(r[0] for r in tombs)
    acks = conn.execute(
        "DELETE FROM acks WHERE seq IN (SELECT seq FROM acks WHERE expires <= ? LIMIT ?) RETURNING size, junk",
        (now, SWEEP_CHUNK),
    ).fetchall()
    st.bytes -= sum(r[0] for r in acks)
    st.junk -= sum(r[0] * r[1] for r in acks)
    out["tombstones"], out["acks"] = len(tombs), len(acks)
    out["more"] |= int(SWEEP_CHUNK in (len(tombs), len(acks)))
    for table, key in (
        ("nonces", "scope, nonce"),
        ("refused", "msg_id, peer"),
    ):
        n = conn.execute(
            f"DELETE FROM {table} WHERE ({key}) IN (SELECT {key} FROM {table} WHERE expires <= ? LIMIT ?)",
            (now, SWEEP_CHUNK),
        ).rowcount
        out[table] = n
        out["more"] |= int(n == SWEEP_CHUNK)
    return out


def _op_contacts_sweep(conn: sqlite3.Connection, st: _Batch, caps: Caps, args: tuple[Any, ...]) -> int:
    """Drop contact-bucket rows of expired envelopes (v3)."""
    (now,) = args
    return conn.execute("DELETE FROM contacts WHERE expires <= ?", (now,)).rowcount


def _op_policy(conn: sqlite3.Connection, st: _Batch, caps: Caps, args: tuple[Any, ...]) -> str:
    """Keep a mailbox's policy when it is newer than the stored one (latest version wins)."""
    mailbox, version, policy_id, body = args
    row = conn.execute("SELECT version, policy_id FROM policies WHERE mailbox = ?", (mailbox,)).fetchone()
    if row is not None:
        if row[1] == policy_id:
            return POLICY_DUPLICATE
        if (int(row[0]), row[1]) > (version, policy_id):
            return POLICY_STALE
    elif conn.execute("SELECT COUNT(*) FROM policies").fetchone()[0] >= caps.max_policies:
        return POLICY_FULL
    conn.execute(
        "INSERT INTO policies (mailbox, version, policy_id, pseq, body) "
        "VALUES (?1, ?2, ?3, (SELECT COALESCE(MAX(pseq), 0) + 1 FROM policies), ?4) "
        "ON CONFLICT (mailbox) DO UPDATE SET version = ?2, policy_id = ?3, "
        "pseq = (SELECT COALESCE(MAX(pseq), 0) + 1 FROM policies), body = ?4",
        (mailbox, version, policy_id, body),
    )
    return POLICY_ACCEPTED


def _op_forget_refused(conn: sqlite3.Connection, st: _Batch, caps: Caps, args: tuple[Any, ...]) -> None:
    (items,) = args
    conn.executemany("DELETE FROM refused WHERE msg_id = ? AND peer = ?", items)


def _op_add_many(conn: sqlite3.Connection, st: _Batch, caps: Caps, args: tuple[Any, ...]) -> list[tuple[bool, Any]]:
    """Several adds as one operation (a page of replicas): ``(ok, AddResult or exception)`` each.

    Each add is isolated from the others' failures exactly as a lone ``add``
    op is in :meth:`WriterCore.run_batch` (its only write that can fail alone
    is its last statement, which SQLite undoes by itself).
    """
    (items,) = args
    out: list[tuple[bool, Any]] = []
    for item in items:
        saved = (st.seq, st.count, st.bytes, st.junk)
        try:
            out.append((True, _op_add(conn, st, caps, item)))
        except Exception as e:
            if not conn.in_transaction:
                raise
            st.seq, st.count, st.bytes, st.junk = saved
            out.append((False, e))
    return out


OpFunction = Callable[[sqlite3.Connection, _Batch, Caps, tuple[Any, ...]], Any]

#: name -> (function, its only write is its last statement)
OPS: dict[str, tuple[OpFunction, bool]] = {
    "add": (_op_add, True),
    "add_many": (_op_add_many, True),
    "ack": (_op_ack, False),
    "nonce": (_op_nonce, True),
    "cursor": (_op_cursor, True),
    "sweep": (_op_sweep, False),
    "policy": (_op_policy, True),
    "contacts_sweep": (_op_contacts_sweep, True),
    "forget_refused": (_op_forget_refused, False),
}

#: an operation: ``(name, args)``, or (in-process writers only) a callable ``f(conn, batch)``
WriteOp = tuple[str, tuple[Any, ...]] | Callable[[sqlite3.Connection, _Batch], Any]
#: what one batch gives back: per-op ``(ok, value or exception)`` and the new (seq, count, bytes)
BatchOutcome = tuple[list[tuple[bool, Any]], tuple[int, int, int]]


class WriterCore:
    """The group commit itself: runs a batch of operations in one transaction.

    It owns the writing connection and the counters (last seq, stored count and
    bytes), and runs wherever the writes run: the writer thread, the writer
    process, or inline.
    """

    def __init__(self, conn: sqlite3.Connection, caps: Caps) -> None:
        self.conn = conn
        self.caps = caps
        self.seq = int(_meta_get(conn, "last_seq") or 0)
        self.count = int(_meta_get(conn, "stored_count") or 0)
        self.bytes = int(_meta_get(conn, "stored_bytes") or 0)
        self.junk = int(_meta_get(conn, "junk_bytes") or 0)
        # The WAL's slack on disk: the writer checkpoints by itself past the backstop (the
        # checkpointer thread normally does it first), and the file shrinks back after a burst
        # instead of keeping its high-water size.
        conn.execute(f"PRAGMA wal_autocheckpoint={wal_backstop_pages(caps.max_stored_bytes)}").fetchall()
        conn.execute(f"PRAGMA journal_size_limit={wal_keep_bytes(caps.max_stored_bytes)}").fetchall()

    @property
    def state(self) -> tuple[int, int, int]:
        return (self.seq, self.count, self.bytes)

    def run_checkpointer(self, path: str, durability: str, interval: float = 1.0) -> threading.Event:
        """Checkpoint the WAL from a thread of its own; set the returned event to stop it.

        A checkpoint syncs the database file.  Left to SQLite's automatic
        checkpoints it would run inside a commit of the writer, and every write
        waiting behind that commit would wait for the disk too.  A passive
        checkpoint on another connection never blocks the writer; the writer's
        own automatic checkpoint stays on, at a much larger WAL size
        (``wal_backstop_pages``), only as a backstop if this thread falls behind.
        """
        stop = threading.Event()

        def loop() -> None:
            conn = _connect(path, durability)
            try:
                while not stop.wait(interval):
                    try:
                        checkpoint(conn)
                    except sqlite3.Error as e:
                        sys.stderr.write(f"wal checkpoint failed: {e}\n")
            finally:
                conn.close()

        threading.Thread(target=loop, name="meshrelay-checkpointer", daemon=True).start()
        return stop

    def run_batch(self, ops: list[WriteOp]) -> BatchOutcome:
        """Run ``ops`` in one transaction, each isolated from the others' failures."""
        conn = self.conn
        st = _Batch(self.seq, self.count, self.bytes, self.junk)
        results: list[tuple[bool, Any]] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for op in ops:
                # An op whose only write is its last statement needs no
                # savepoint: SQLite undoes a failed statement by itself.
                guarded = callable(op) or not OPS[op[0]][1]
                if guarded:
                    conn.execute("SAVEPOINT op")
                saved = (st.seq, st.count, st.bytes, st.junk)
                try:
                    if callable(op):
                        value = op(conn, st)
                    else:
                        value = OPS[op[0]][0](conn, st, self.caps, op[1])
                    results.append((True, value))
                except Exception as e:
                    if not conn.in_transaction:
                        # SQLite rolled back the whole transaction (disk full,
                        # I/O error): nothing of this batch may commit.
                        raise
                    if guarded:
                        conn.execute("ROLLBACK TO op")
                    st.seq, st.count, st.bytes, st.junk = saved
                    results.append((False, e))
                if guarded:
                    conn.execute("RELEASE op")
            if (st.seq, st.count, st.bytes, st.junk) != (*self.state, self.junk):
                conn.executemany(
                    "UPDATE meta SET value = ? WHERE key = ?",
                    (
                        (str(st.seq), "last_seq"),
                        (str(st.count), "stored_count"),
                        (str(st.bytes), "stored_bytes"),
                        (str(st.junk), "junk_bytes"),
                    ),
                )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self.seq, self.count, self.bytes, self.junk = st.seq, st.count, st.bytes, st.junk
        return results, self.state


class SQLiteStore:
    """A :class:`~meshrelay.store.base.Store` on one SQLite file in ``data_dir``.

    Where the writes run is chosen at construction: on ``writer`` (an
    executor: a thread, or inline for tests), or, with ``writer_process``, in
    a child process (:mod:`meshrelay.store.writer_process`) that also verifies
    deposit signatures, so neither holds this process's GIL.
    """

    log = Logger()
    #: deposits and replicas pass their signature check to ``add_envelope`` (see ``Store``)
    verifies_signatures = True
    tombstone_bytes = TOMBSTONE_BYTES

    def __init__(
        self,
        data_dir: str,
        caps: Caps,
        durability: str = "normal",
        writer: Executor | None = None,
        readers: Executor | None = None,
        metrics: Any = None,
        writer_process: Any = None,
    ) -> None:
        self.path = os.path.join(data_dir, DB_NAME)
        self._metrics = metrics
        self._durability = durability
        try:
            # 0700 directory, 0600 files whatever the umask (SQLite gives -wal/-shm the database's mode).
            private_dir(data_dir)
            for suffix in ("", "-wal", "-shm", "-journal"):
                private_file(self.path + suffix, create=not suffix)
            self._wconn = _connect(self.path, durability, WRITER_CACHE_KIB)
            self.migrated_from = migrate(self._wconn)
            self.feed_id = _meta_get(self._wconn, "feed_id") or ""
            self._core = WriterCore(self._wconn, caps)
        except (sqlite3.Error, OSError, ValueError) as e:
            raise StoreError(f"cannot open the store at {self.path}: {e}") from e
        self._seq, self._count, self._bytes = self._core.state
        self._writer = writer or InlineExecutor()
        #: a ProcessWriter (see writer_process.py) when writes run in a child process
        self._process = writer_process
        self._readers = readers
        self._local = threading.local()
        self._pending: list[tuple[WriteOp, Deferred[Any]]] = []
        #: batches sent and not answered yet, and how many may be: a writer
        #: process gets the next batch queued behind the one it runs, so it
        #: never waits for this process to send more
        self._inflight = 0
        self._depth = 2 if writer_process is not None else 1
        self._firing = False
        self._tick_call: Any = None
        self._closed = False
        self._idle: list[Deferred[None]] = []
        self._checkpointer: threading.Event | None = None
        self._shut = False
        self._closers: list[Deferred[None]] = []
        #: test seam: when set, reads run on a connection of their own and this is
        #: called after each statement they run (a test commits writes there)
        self.between_statements: Callable[[], None] | None = None
        self._hooked: sqlite3.Connection | None = None

    @property
    def caps(self) -> Caps:
        return self._core.caps

    @caps.setter
    def caps(self, caps: Caps) -> None:
        # A config reload: the in-process core, and a writer process (which takes them between batches).
        self._core.caps = caps
        if self._process is not None:
            self._process.set_caps(caps)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._process is not None:
            self._process.start()
        else:
            self._writer.start()
            if self._readers is not None:
                # A threaded node: checkpoints off the writer (tests run inline and skip this).
                self._checkpointer = self._core.run_checkpointer(self.path, self._durability)
        if self._readers is not None:
            self._readers.start()

    def close(self) -> Deferred[None]:
        """Let queued writes commit, then stop the writer and readers and close the files."""
        if self._closed:
            # Already closing or closed: one shutdown, whoever asks.
            if self._shut:
                return succeed(None)
            done: Deferred[None] = Deferred()
            self._closers.append(done)
            return done
        self._closed = True
        d: Deferred[None] = Deferred()
        if self._inflight or self._pending:
            self._idle.append(d)
        else:
            d.callback(None)

        def shut(_: object) -> Deferred[None] | None:
            if self._checkpointer is not None:
                self._checkpointer.set()
            if self._readers is not None:
                self._readers.stop()
            if self._process is not None:
                stopped: Deferred[None] = self._process.stop()
                return stopped.addBoth(lambda _: self._wconn.close())
            self._writer.stop()
            self._wconn.close()
            if self._hooked is not None:
                self._hooked.close()
            return None

        def finished(result: Any) -> Any:
            self._shut = True
            closers, self._closers = self._closers, []
            for c in closers:
                c.callback(None)
            return result

        return d.addCallback(shut).addBoth(finished)

    def stats(self) -> StoreStats:
        """Stored envelopes, and the bytes accounted for envelopes, signed acks and tombstones."""
        return StoreStats(envelopes=self._count, bytes=self._bytes)

    # ------------------------------------------------------------------ plumbing

    def _write(self, op: WriteOp) -> Deferred[Any]:
        if self._closed:
            return fail(StoreError("the store is closed"))
        d: Deferred[Any] = Deferred()
        self._pending.append((op, d))
        if self._inflight < self._depth and not self._firing:
            if self._process is not None:
                # Wait for the end of this reactor iteration: the other
                # requests read in it join the same batch, instead of the
                # first one leaving alone and taking a pipeline slot.
                if self._tick_call is None:
                    self._tick_call = self._process.reactor.callLater(0, self._tick_flush)
            else:
                self._flush()
        return d

    def _tick_flush(self) -> None:
        self._tick_call = None
        if self._pending and self._inflight < self._depth and not self._firing:
            self._flush()

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        self._inflight += 1
        ops = [op for op, _ in batch]
        if self._process is not None:
            d = self._process.run(ops)
        else:
            d = self._writer.run(self._core.run_batch, ops)
        d.addBoth(self._batch_done, batch)

    def _batch_done(self, outcome: BatchOutcome | Failure, batch: list[tuple[WriteOp, Deferred[Any]]]) -> None:
        self._inflight -= 1
        # Send the next batch before answering this one, so the writer works
        # while this thread runs the answers' callbacks.
        if self._pending and self._inflight < self._depth:
            self._flush()
        self._firing = True
        try:
            if isinstance(outcome, Failure):
                settle_batch(outcome, [d for _, d in batch], self._metrics, self.log)
            else:
                results, (self._seq, self._count, self._bytes) = outcome
                settle_batch(results, [d for _, d in batch], self._metrics, self.log)
        finally:
            self._firing = False
        if self._pending and self._inflight < self._depth:
            self._flush()
        elif not self._inflight and not self._pending and self._idle:
            waiting, self._idle = self._idle, []
            for d in waiting:
                d.callback(None)

    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> Deferred[T]:
        if self.between_statements is not None:
            return InlineExecutor().run(self._guard, fn, self._hooked_reader())
        if self._readers is None:
            return InlineExecutor().run(self._guard, fn, self._wconn)
        return self._readers.run(self._read_in_thread, fn)

    def _read_in_thread(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = _connect(self.path, self._durability)
        return self._guard(fn, conn)

    def _hooked_reader(self) -> Any:
        """Test seam: a reading connection of its own that calls ``between_statements`` after each statement."""
        if self._hooked is None:
            self._hooked = _connect(self.path, self._durability)
        conn, hook = self._hooked, self.between_statements

        class Hooked:
            def execute(self, *args: Any) -> sqlite3.Cursor:
                cur = conn.execute(*args)
                if hook is not None:
                    hook()
                return cur

            def __getattr__(self, name: str) -> Any:
                return getattr(conn, name)

        return Hooked()

    @staticmethod
    def _guard(fn: Callable[[sqlite3.Connection], T], conn: sqlite3.Connection) -> T:
        try:
            return fn(conn)
        except sqlite3.Error as e:
            raise StoreError(f"store read failed: {e}") from e

    # ------------------------------------------------------------------ writes

    def add_envelope(
        self, env: Envelope, now: int, verify: str | None = None, peer: str | None = None
    ) -> Deferred[AddResult]:
        """Add ``env``; with ``verify`` ("deposit" or "replica") check its signature in the writer too.

        A failed signature answers ``AddResult("bad_signature")``.  A deposit
        is verified before dedup; a replica only when it is not a duplicate.
        With ``peer``, a cap refusal is remembered (see ``refused``).
        """
        return self._write(("add", _add_args(env, now, verify, peer))).addCallback(self._count_forgotten)

    def add_envelopes(
        self, envs: Sequence[Envelope], now: int, verify: str | None = None, peer: str | None = None
    ) -> Deferred[list[AddResult]]:
        """``add_envelope`` for each, as one write operation (one Deferred, one round trip to the writer)."""
        if not envs:
            return succeed([])
        items = [_add_args(env, now, verify, peer) for env in envs]
        return self._write(("add_many", (items,))).addCallback(self._settle_many)

    def _settle_many(self, outcomes: list[tuple[bool, Any]]) -> list[AddResult]:
        return [self._count_forgotten(r) for r in settle_items(outcomes, self._metrics, self.log)]

    def _count_forgotten(self, result: AddResult) -> AddResult:
        if result.remembered is False and self._metrics is not None:
            self._metrics.replica_refusals_forgotten_total.inc()
        return result

    def forget_refused(self, items: Sequence[tuple[str, str]]) -> Deferred[None]:
        if not items:
            return succeed(None)
        return self._write(("forget_refused", ([(str(m), str(p)) for m, p in items],)))

    def apply_ack(
        self, ack: SignedAck, tombstone_expires: int, from_peer: bool = False, attested: Sequence[str] = ()
    ) -> Deferred[AckResult]:
        body = ack.json_text()
        ids = tuple(dict.fromkeys(ack.ack))
        vouched = tuple(str(m) for m in attested)
        return self._write(("ack", (ack.mailbox, ack.nonce, ids, tombstone_expires, body, from_peer, vouched)))

    def held_tombstones(self, pairs: Sequence[tuple[str, str]]) -> Deferred[set[tuple[str, str]]]:
        by_mailbox: dict[str, dict[str, None]] = {}
        for mb, m in pairs:
            by_mailbox.setdefault(str(mb), {})[str(m)] = None

        def q(conn: sqlite3.Connection) -> set[tuple[str, str]]:
            # The pairs whose tombstone is not junk (v4, docs/protocol.md 13).
            return {(mb, m) for mb, ids in by_mailbox.items() for m in _tombstoned(conn, mb, list(ids), real_only=True)}

        return self._read(q)

    def claim_nonce(self, scope: str, nonce: str, expires: int) -> Deferred[bool]:
        return self._write(("nonce", (scope, nonce, expires)))

    def set_cursor(self, cursor: Cursor) -> Deferred[None]:
        return self._write(("cursor", (cursor.peer, cursor.feed_id, cursor.since, cursor.synced_at)))

    def acquire_lease(self, name: str, holder: str, ttl: float) -> Deferred[bool]:
        # One process owns a SQLite store, so it holds every lease.
        return succeed(True)

    def set_wake_callback(
        self, wake: Callable[[str], None], waiting: Callable[[], Iterable[str]] | None = None
    ) -> None:
        # One process owns a SQLite store: the relay's own wake-ups are all there is.
        return None

    def sweep(self, now: int) -> Deferred[SweepResult]:
        """Delete expired rows, a chunk per transaction, until none is left."""
        totals = {"envelopes": 0, "tombstones": 0, "acks": 0, "nonces": 0, "refused": 0}

        def step(counts: dict[str, int]) -> Deferred[SweepResult] | SweepResult:
            for key in totals:
                totals[key] += counts.get(key, 0)
            if counts["more"]:
                return self._write(("sweep", (now,))).addCallback(step)
            # Then the contact-bucket rows of expired envelopes (v3), and how many tombstones are left.
            d = self.sweep_contacts(now).addCallback(lambda _: self.tombstone_count())
            return d.addCallback(lambda n: SweepResult(**totals, live_tombstones=n))

        return self._write(("sweep", (now,))).addCallback(step)

    # ------------------------------------------------------------------ reads

    def fetch(self, mailbox: str, now: int, limit: int) -> Deferred[tuple[list[str], bool]]:
        def q(conn: sqlite3.Connection) -> tuple[list[str], bool]:
            rows = conn.execute(
                "SELECT body FROM envelopes WHERE mailbox = ? AND expires > ? ORDER BY seq LIMIT ?",
                (mailbox, now, limit + 1),
            ).fetchall()
            return [r[0] for r in rows[:limit]], len(rows) > limit

        return self._read(q)

    def tombstone_count(self) -> Deferred[int]:
        """Tombstone rows stored (expired ones not yet swept included: they still take space)."""

        def q(conn: sqlite3.Connection) -> int:
            return int(conn.execute("SELECT COUNT(*) FROM tombstones").fetchone()[0])

        return self._read(q)

    def count(self, mailbox: str, now: int) -> Deferred[int]:
        def q(conn: sqlite3.Connection) -> int:
            (n,) = conn.execute(
                "SELECT COUNT(*) FROM envelopes WHERE mailbox = ? AND expires > ?", (mailbox, now)
            ).fetchone()
            return int(n)

        return self._read(q)

    def changes(
        self,
        since: int,
        limit: int,
        now: int,
        mailbox: str | None = None,
        max_bytes: int | None = None,
        ids_only: bool = False,
    ) -> Deferred[ChangesPage]:
        """One page of the feed, read by ONE statement (so under one snapshot: it never skips).

        Two statements (envelopes, then acks) let an ack commit between them
        move ``next`` past an envelope the first one missed.
        """
        feed = self.feed_id
        query = _changes_sql(mailbox is not None, ids_only, max_bytes is not None)
        args: dict[str, Any] = {"since": min(since, MAX_SEQ), "now": now, "mb": mailbox, "n": limit + 1}
        args["max"] = max_bytes

        def q(conn: sqlite3.Connection) -> ChangesPage:
            rows = [FeedItem(s, k, b, z, m, key) for s, k, m, key, z, b in conn.execute(query, args).fetchall()]
            items, more = cut_page(rows, limit, max_bytes)
            return ChangesPage(feed=feed, items=items, next=items[-1].seq if items else since, more=more)

        return self._read(q)

    def missing(
        self, envelopes: Sequence[tuple[str, str]], acks: Sequence[tuple[str, str]], now: int
    ) -> Deferred[tuple[list[tuple[str, str]], list[tuple[str, str]]]]:
        env_list = [(str(mb), str(m)) for mb, m in envelopes]
        ack_list = [(str(mb), str(n)) for mb, n in acks]

        def q(conn: sqlite3.Connection) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
            # One statement per kind for the whole page (json_each): the
            # per-id checks run in SQLite, not as one Python execute each.
            lack_env: list[tuple[str, str]] = []
            lack_ack: list[tuple[str, str]] = []
            if env_list:
                rows = conn.execute(_UNSTORED_IDS, {"items": json.dumps([m for _, m in env_list])})
                unstored = [env_list[i] for (i,) in rows]
                keys = {tombstone_key(mb, m): (mb, m) for mb, m in unstored}
                dead = _keyed(conn, keys, "SELECT digest FROM tombstones WHERE expires > ? AND digest IN {keys}", now)
                lack_env = [pair for pair in unstored if pair not in dead]
            if ack_list:
                rows = conn.execute(_LACKING_ACKS, {"items": json.dumps(ack_list)})
                lack_ack = [ack_list[i] for (i,) in rows]
            return lack_env, lack_ack

        return self._read(q)

    def bodies(
        self, msg_ids: Sequence[str], acks: Sequence[tuple[str, str]], now: int, max_bytes: int
    ) -> Deferred[Bodies]:
        ids = [str(m) for m in msg_ids]
        ack_keys = [(str(mb), str(n)) for mb, n in acks]

        def q(conn: sqlite3.Connection) -> Bodies:
            # One statement per kind (json_each keeps the request order); a
            # row without a body is not held (gone).
            env_rows = conn.execute(_BODIES_ENVELOPES, {"items": json.dumps(ids), "now": now}).fetchall() if ids else []
            ack_rows = (
                conn.execute(_BODIES_ACKS, {"items": json.dumps(ack_keys), "now": now}).fetchall() if ack_keys else []
            )
            return fill_bodies(
                ((ids[i], None if body is None else (size, body)) for i, size, body in env_rows),
                ((ack_keys[i], None if body is None else (size, body)) for i, size, body in ack_rows),
                max_bytes,
            )

        return self._read(q)

    def refused(self, now: int, limit: int, mailbox: str | None = None) -> Deferred[list[Refused]]:
        where = "expires > ?" + (" AND mailbox = ?" if mailbox is not None else "")
        args: tuple[Any, ...] = (now,) if mailbox is None else (now, mailbox)

        def q(conn: sqlite3.Connection) -> list[Refused]:
            rows = conn.execute(
                f"SELECT msg_id, mailbox, peer, reason, expires FROM refused WHERE {where} "
                "ORDER BY at, msg_id, peer LIMIT ?",
                (*args, limit),
            ).fetchall()
            return [Refused(m, mb, p, r, int(e)) for m, mb, p, r, e in rows]

        return self._read(q)

    # ------------------------------------------------------------------ policies (protocol v3)

    def sweep_contacts(self, now: int) -> Deferred[int]:
        """Forget the contact-bucket rows of expired envelopes (v3); how many."""
        return self._write(("contacts_sweep", (now,)))

    def put_policy(self, mailbox: str, version: int, policy_id: str, body: str) -> Deferred[str]:
        """Store a signed policy unless the stored one is newer: ``accepted``, ``duplicate`` or ``stale``."""
        return self._write(("policy", (mailbox, version, policy_id, body)))

    def policies_since(self, since: int, limit: int) -> Deferred[list[tuple[int, str]]]:
        """``(pseq, body)`` of the stored policies with ``pseq > since``, ascending, at most ``limit``."""

        def q(conn: sqlite3.Connection) -> list[tuple[int, str]]:
            rows = conn.execute(
                "SELECT pseq, body FROM policies WHERE pseq > ? ORDER BY pseq LIMIT ?", (min(since, MAX_SEQ), limit)
            ).fetchall()
            return [(int(r[0]), r[1]) for r in rows]

        return self._read(q)

    def load_policies(self) -> list[str]:
        """Every stored policy's text, read at once (the relay's policy book at start-up)."""
        return [r[0] for r in self._wconn.execute("SELECT body FROM policies")]

    def get_cursor(self, peer: str) -> Deferred[Cursor | None]:
        def q(conn: sqlite3.Connection) -> Cursor | None:
            row = conn.execute("SELECT feed_id, since, synced_at FROM peer_cursors WHERE peer = ?", (peer,)).fetchone()
            return None if row is None else Cursor(peer, row[0], int(row[1]), float(row[2]))

        return self._read(q)
