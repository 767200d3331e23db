"""SQLite's write side: the schema migration, the write operations and the group commit.

Everything the store's writer runs lives here, free of Twisted: the writer
child process (:mod:`meshrelay.store.writer_child`) imports this module and
what it needs (the store's records, the migrations, the envelope codec,
libsodium) and none of the node's framework, so it starts in a fraction of
the time the node's imports take, and holds less memory.
:class:`~meshrelay.store.sqlite.SQLiteStore` (the reactor side) hands
batches of these operations to the writer thread or process, or runs them
inline.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from meshrelay.envelope import Envelope, verify_signature
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
    Caps,
    bucket_refusal,
    junk_budget,
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
#: of the mailbox's entries in envelopes_by_mailbox, which holds the sender (schema 7).  An id is
#: tombstoned by a live tombstone row, or by being listed in the mailbox's oldest ack row when that
#: ack is junk: a mailbox's first ack that deleted nothing keeps its ids there instead of in
#: tombstone rows (schema 8, ``_op_ack``); at most one ack body is read, and only for such mailboxes.
#: It is searched for the quoted id, not parsed: in a signed ack's canonical text (``json_text``) the
#: only quoted 64-character strings are its ids (a mailbox key has 43, a nonce 22, a signature 86),
#: and neither kind of id has a character JSON escapes.  (A deposit into such a mailbox: about 150 us
#: more of the writer with a JSON parse of a 500-id ack, a few with the search.)
#: (parameters: msg_id, mailbox, now, sender, tombstone_key(mailbox, msg_id))
_ADD_CHECKS = """
SELECT
    EXISTS (SELECT 1 FROM envelopes WHERE msg_id = ?1),
    EXISTS (SELECT 1 FROM tombstones WHERE digest = ?5 AND expires > ?3)
    OR EXISTS (SELECT 1 FROM acks AS f WHERE f.mailbox = ?2
               AND f.seq = (SELECT MIN(seq) FROM acks WHERE mailbox = ?2)
               AND f.expires > ?3 AND f.junk = 1
               AND instr(f.body, '"' || ?1 || '"') > 0),
    c.n, c.s
FROM (SELECT COUNT(*) AS n, COALESCE(SUM(sender = ?4), 0) AS s
      FROM envelopes WHERE mailbox = ?2 AND expires > ?3) AS c
"""


#: the mailboxes of a JSON array whose oldest ack is live junk, with that ack's text (schema 8: a
#: mailbox's first junk ack keeps its ids in its row; see ``_ADD_CHECKS``)
_OLDEST_JUNK_ACKS = """
SELECT f.mailbox, f.body FROM json_each(:mailboxes) AS j
JOIN acks AS f ON f.mailbox = j.value AND f.seq = (SELECT MIN(seq) FROM acks WHERE mailbox = j.value)
WHERE f.junk = 1 AND f.expires > :now
"""


def acked_in_rows(conn: sqlite3.Connection, pairs: Sequence[tuple[str, str]], now: int) -> set[tuple[str, str]]:
    """The ``(mailbox, msg_id)`` pairs listed in their mailbox's oldest ack while it is live junk (schema 8).

    Those ids have no tombstone row and are dead all the same: the deposit check
    (``_ADD_CHECKS``) refuses them.  One index probe per distinct mailbox, and one
    ack text parsed per mailbox whose oldest ack is junk.
    """
    if not pairs:
        return set()
    mailboxes = sorted({mb for mb, _ in pairs})
    listed: dict[str, frozenset[str]] = {}
    for mailbox, body in conn.execute(_OLDEST_JUNK_ACKS, {"mailboxes": json.dumps(mailboxes), "now": now}):
        ids = json.loads(body).get("ack", [])
        listed[mailbox] = frozenset(m for m in ids if isinstance(m, str))
    return {(mb, m) for mb, m in pairs if m in listed.get(mb, ())}


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
#: Every insert updates indexes at places spread over them (msg_id and the mailbox index; before
#: schema 7 also the sender index); at a hundred thousand envelopes those indexes alone outgrow
#: 8 MiB, and each miss is a read of the file.  A 100k catch-up (bench/mesh_bench.py catchup) spent
#: 101-102 us per envelope in the children with 64 MiB against 104-108 with 8 MiB (docs/benchmarks.md,
#: fourth session, with the three indexes of schema 6).
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
    clients cannot fill (see ``junk_budget``).  A mailbox's first ack, when it
    is junk and fits, writes no tombstone rows: its stored row stands for its
    ids (schema 8, see ``_ADD_CHECKS``).
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
    deleted = [m for m in unique if m in held]
    unheld = [m for m in unique if m not in held]
    vouched = [m for m in unheld if m in attested]
    # A mailbox's first ack, when it deleted nothing and nothing of it is vouched for, keeps its ids
    # in its own row (junk, within the junk budget), and no tombstone row is written for them: the
    # deposit check (``_ADD_CHECKS``) reads the mailbox's oldest ack when it is junk.  A 500-id junk
    # ack from a throwaway key (issue 10) is then one row, not 500 index entries (schema 8).
    compact = (
        not deleted
        and not vouched
        and st.bytes + size <= caps.max_stored_bytes
        and st.junk + size <= budget
        and conn.execute("SELECT 1 FROM acks WHERE mailbox = ? LIMIT 1", (mailbox,)).fetchone() is None
    )

    def key_list() -> dict[str, bytes]:
        return dict(zip(unique, migrations.tombstone_keys(mailbox, unique), strict=True))

    # Keys are needed for what gets a row, or is looked up by key: held ids, vouched ids, and junk
    # while the junk budget has room.  A compact ack, or a junk ack past the budget (most of them
    # under a flood), of a mailbox without tombstones needs none: 500 hashes saved.
    room = st.junk + TOMBSTONE_BYTES <= budget and st.bytes + TOMBSTONE_BYTES <= caps.max_stored_bytes
    keys = key_list() if deleted or vouched or (room and not compact) else {}
    # Which ids already have a tombstone (to extend, not insert): for a junk ack usually none.
    tombstoned = _tombstoned(conn, mailbox, unique, keys)
    if tombstoned and not keys:
        keys = key_list()
    if deleted:
        st.count -= len(deleted)
        st.bytes -= sum(held.values())
        # Tombstone what was held (or extend the tombstone it already had).
        _extend_tombstones(conn, {keys[m]: m for m in deleted if m in tombstoned}, tombstone_expires)
        fresh = [(keys[m], tombstone_expires) for m in deleted if m not in tombstoned]
        conn.executemany("INSERT INTO tombstones (digest, expires, junk) VALUES (?, ?, 0)", fresh)
        st.bytes += TOMBSTONE_BYTES * len(fresh)
    skipped = 0
    if any(m in tombstoned for m in vouched):
        # Junk tombstones made real by a peer that held the message: they leave the junk budget.
        sql = "UPDATE tombstones SET junk = 0 WHERE junk = 1 AND digest IN {keys} RETURNING digest"
        made_real = len(_keyed(conn, {keys[m]: m for m in vouched if m in tombstoned}, sql))
        st.junk -= TOMBSTONE_BYTES * made_real
    extended = _extend_tombstones(conn, {keys[m]: m for m in unheld if m in tombstoned}, tombstone_expires)
    rows = []
    listed_once = len(unique) == len(ids)
    # No room for any of them (the state of a node under a junk flood): count them, no loop.
    counted = listed_once and not (compact or deleted or vouched or room)
    if counted:
        skipped = sum(1 for m in unheld if m not in extended) if extended else len(unheld)
    for msg_id in () if compact or counted else unheld:
        if msg_id in extended:
            continue
        real = msg_id in attested
        if st.bytes + TOMBSTONE_BYTES > caps.max_stored_bytes or (not real and st.junk + TOMBSTONE_BYTES > budget):
            skipped += 1 if listed_once else ids.count(msg_id)
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
    if not compact and conn.execute("SELECT 1 FROM acks WHERE mailbox = ? AND nonce = ?", (mailbox, nonce)).fetchone():
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
