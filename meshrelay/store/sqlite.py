"""The embedded SQLite store (the default backend).

Writes go through one writer thread that commits many operations per
transaction (group commit): an operation is queued, the writer takes
everything queued so far, runs each inside a savepoint, commits once, and
only then fires each operation's Deferred.  While one batch commits, the next
one fills, so the batch size follows the load.  Reads run on their own
connections in a small reader pool (WAL mode lets them run beside the writer).

``durability = "normal"`` uses ``synchronous=NORMAL`` in WAL mode: a
committed transaction survives the process being killed (kill -9).
``"full"`` uses ``synchronous=FULL``: every commit is fsynced, so it also
survives power loss.

Start-up reads a few rows of ``meta``; nothing proportional to the stored data
is loaded into memory.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from meshrelay.envelope import Envelope, SignedAck, dumps_json
from meshrelay.executor import Executor, InlineExecutor
from meshrelay.store import migrations
from meshrelay.store.base import (
    ACCEPTED,
    DUPLICATE,
    MAILBOX_FULL,
    SENDER_CAP,
    STORAGE_FULL,
    AckResult,
    AddResult,
    Caps,
    ChangesPage,
    Cursor,
    FeedItem,
    StoreError,
    StoreStats,
    SweepResult,
)

T = TypeVar("T")

DB_NAME = "meshrelay.sqlite3"
#: the largest seq a 64-bit column holds: a larger ``since`` simply has nothing after it
MAX_SEQ = 2**63 - 1
#: rows deleted per sweeper transaction, so deposits interleave with a big sweep
SWEEP_CHUNK = 5000

#: dedup, tombstone and both cap counts of a deposit in one statement
#: (parameters: msg_id, mailbox, now, sender)
_ADD_CHECKS = """
SELECT
    EXISTS (SELECT 1 FROM envelopes WHERE msg_id = ?1),
    EXISTS (SELECT 1 FROM tombstones WHERE mailbox = ?2 AND msg_id = ?1 AND expires > ?3),
    (SELECT COUNT(*) FROM envelopes WHERE mailbox = ?2 AND expires > ?3),
    (SELECT COUNT(*) FROM envelopes WHERE mailbox = ?2 AND sender = ?4 AND expires > ?3)
"""


def _connect(path: str, durability: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=" + ("FULL" if durability == "full" else "NORMAL"))
    conn.execute("PRAGMA cache_size=-8000")
    conn.execute("PRAGMA temp_store=MEMORY")
    return conn


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
    return current


class _Batch:
    """Per-transaction scratch state the writer's operations update."""

    __slots__ = ("seq", "count", "bytes")

    def __init__(self, seq: int, count: int, nbytes: int) -> None:
        self.seq = seq
        self.count = count
        self.bytes = nbytes


WriteOp = Callable[[sqlite3.Connection, _Batch], Any]


class SQLiteStore:
    """A :class:`~meshrelay.store.base.Store` on one SQLite file in ``data_dir``."""

    log = Logger()

    def __init__(
        self,
        data_dir: str,
        caps: Caps,
        durability: str = "normal",
        writer: Executor | None = None,
        readers: Executor | None = None,
        metrics: Any = None,
    ) -> None:
        self.path = os.path.join(data_dir, DB_NAME)
        self.caps = caps
        self._metrics = metrics
        self._durability = durability
        try:
            os.makedirs(data_dir, exist_ok=True)
            self._wconn = _connect(self.path, durability)
            self.migrated_from = migrate(self._wconn)
            self.feed_id = _meta_get(self._wconn, "feed_id") or ""
            self._seq = int(_meta_get(self._wconn, "last_seq") or 0)
            self._count = int(_meta_get(self._wconn, "stored_count") or 0)
            self._bytes = int(_meta_get(self._wconn, "stored_bytes") or 0)
        except (sqlite3.Error, OSError, ValueError) as e:
            raise StoreError(f"cannot open the store at {self.path}: {e}") from e
        self._writer = writer or InlineExecutor()
        self._readers = readers
        self._local = threading.local()
        self._pending: list[tuple[WriteOp, Deferred[Any]]] = []
        self._busy = False
        self._firing = False
        self._closed = False
        self._idle: list[Deferred[None]] = []

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._writer.start()
        if self._readers is not None:
            self._readers.start()

    def close(self) -> Deferred[None]:
        """Let queued writes commit, then stop the threads and close the files."""
        self._closed = True
        d: Deferred[None] = Deferred()
        if self._busy or self._pending:
            self._idle.append(d)
        else:
            d.callback(None)

        def shut(_: object) -> None:
            self._writer.stop()
            if self._readers is not None:
                self._readers.stop()
            self._wconn.close()

        return d.addCallback(shut)

    def stats(self) -> StoreStats:
        return StoreStats(envelopes=self._count, bytes=self._bytes)

    # ------------------------------------------------------------------ plumbing

    def _write(self, op: WriteOp) -> Deferred[Any]:
        if self._closed:
            return fail(StoreError("the store is closed"))
        d: Deferred[Any] = Deferred()
        self._pending.append((op, d))
        if not self._busy and not self._firing:
            self._flush()
        return d

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        self._busy = True
        ops = [op for op, _ in batch]
        self._writer.run(self._run_batch, ops).addBoth(self._batch_done, batch)

    def _run_batch(self, ops: list[WriteOp]) -> tuple[list[tuple[bool, Any]], _Batch]:
        """Writer thread: run ``ops`` in one transaction; one savepoint each."""
        conn = self._wconn
        state = _Batch(self._seq, self._count, self._bytes)
        results: list[tuple[bool, Any]] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for op in ops:
                # An op whose only write is its last statement needs no
                # savepoint: SQLite undoes a failed statement by itself.
                guarded = not getattr(op, "single_write", False)
                if guarded:
                    conn.execute("SAVEPOINT op")
                saved = (state.seq, state.count, state.bytes)
                try:
                    results.append((True, op(conn, state)))
                except Exception as e:
                    if guarded:
                        conn.execute("ROLLBACK TO op")
                    state.seq, state.count, state.bytes = saved
                    results.append((False, e))
                if guarded:
                    conn.execute("RELEASE op")
            if (state.seq, state.count, state.bytes) != (self._seq, self._count, self._bytes):
                conn.executemany(
                    "UPDATE meta SET value = ? WHERE key = ?",
                    (
                        (str(state.seq), "last_seq"),
                        (str(state.count), "stored_count"),
                        (str(state.bytes), "stored_bytes"),
                    ),
                )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return results, state

    def _batch_done(self, outcome: Any, batch: list[tuple[WriteOp, Deferred[Any]]]) -> None:
        self._busy = False
        self._firing = True
        try:
            if isinstance(outcome, Failure):
                err = StoreError(f"store write failed: {outcome.getErrorMessage()}")
                self.log.error("store write of {n} operations failed: {err}", n=len(batch), err=outcome.value)
                if self._metrics is not None:
                    self._metrics.store_errors_total.inc(len(batch))
                for _, d in batch:
                    d.errback(err)
            else:
                results, state = outcome
                self._seq, self._count, self._bytes = state.seq, state.count, state.bytes
                if self._metrics is not None:
                    self._metrics.commit_batch_size.observe(len(batch))
                for (ok, value), (_, d) in zip(results, batch):
                    if ok:
                        d.callback(value)
                    else:
                        if self._metrics is not None:
                            self._metrics.store_errors_total.inc()
                        self.log.error("store operation failed: {err!r}", err=value)
                        d.errback(value if isinstance(value, StoreError) else StoreError(str(value)))
        finally:
            self._firing = False
        if self._pending:
            self._flush()
        elif self._idle:
            waiting, self._idle = self._idle, []
            for d in waiting:
                d.callback(None)

    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> Deferred[T]:
        if self._readers is None:
            return InlineExecutor().run(self._guard, fn, self._wconn)
        return self._readers.run(self._read_in_thread, fn)

    def _read_in_thread(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = _connect(self.path, self._durability)
        return self._guard(fn, conn)

    @staticmethod
    def _guard(fn: Callable[[sqlite3.Connection], T], conn: sqlite3.Connection) -> T:
        try:
            return fn(conn)
        except sqlite3.Error as e:
            raise StoreError(f"store read failed: {e}") from e

    # ------------------------------------------------------------------ writes

    def add_envelope(self, env: Envelope, now: int) -> Deferred[AddResult]:
        caps = self.caps
        body = env.raw
        size = len(body)
        keys = (env.msg_id, env.mailbox, now, env.sender)

        def op(conn: sqlite3.Connection, st: _Batch) -> AddResult:
            # One statement for every check (each statement costs the writer
            # thread a GIL round trip), then the insert.
            stored, tombstoned, in_mailbox, from_sender = conn.execute(_ADD_CHECKS, keys).fetchone()
            if stored or tombstoned:
                return AddResult(DUPLICATE)
            if st.bytes + size > caps.max_stored_bytes:
                return AddResult(STORAGE_FULL)
            if in_mailbox >= caps.per_mailbox_pending:
                return AddResult(MAILBOX_FULL, pending=in_mailbox, limit=caps.per_mailbox_pending)
            if from_sender >= caps.per_sender_pending:
                return AddResult(SENDER_CAP, pending=from_sender, limit=caps.per_sender_pending)
            conn.execute(
                "INSERT INTO envelopes (seq, msg_id, mailbox, sender, expires, size, body) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (st.seq + 1, env.msg_id, env.mailbox, env.sender, env.expires, size, body),
            )
            st.seq += 1
            st.count += 1
            st.bytes += size
            return AddResult(ACCEPTED, seq=st.seq)

        op.single_write = True  # type: ignore[attr-defined]
        return self._write(op)

    def apply_ack(self, ack: SignedAck, tombstone_expires: int) -> Deferred[AckResult]:
        body = dumps_json(ack.to_json()).decode("utf-8")

        def op(conn: sqlite3.Connection, st: _Batch) -> AckResult:
            deleted = []
            for msg_id in dict.fromkeys(ack.ack):
                row = conn.execute(
                    "DELETE FROM envelopes WHERE msg_id = ? AND mailbox = ? RETURNING size",
                    (msg_id, ack.mailbox),
                ).fetchall()
                if row:
                    deleted.append(msg_id)
                    st.count -= 1
                    st.bytes -= row[0][0]
                conn.execute(
                    "INSERT INTO tombstones (mailbox, msg_id, expires) VALUES (?, ?, ?) "
                    "ON CONFLICT (mailbox, msg_id) DO UPDATE SET expires = MAX(expires, excluded.expires)",
                    (ack.mailbox, msg_id, tombstone_expires),
                )
            if conn.execute("SELECT 1 FROM acks WHERE mailbox = ? AND nonce = ?", (ack.mailbox, ack.nonce)).fetchone():
                return AckResult(deleted=tuple(deleted), new=False)
            st.seq += 1
            conn.execute(
                "INSERT INTO acks (seq, mailbox, nonce, expires, body) VALUES (?, ?, ?, ?, ?)",
                (st.seq, ack.mailbox, ack.nonce, tombstone_expires, body),
            )
            return AckResult(deleted=tuple(deleted), new=True, seq=st.seq)

        return self._write(op)

    def claim_nonce(self, scope: str, nonce: str, expires: int) -> Deferred[bool]:
        def op(conn: sqlite3.Connection, st: _Batch) -> bool:
            cur = conn.execute(
                "INSERT INTO nonces (scope, nonce, expires) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                (scope, nonce, expires),
            )
            return cur.rowcount == 1

        op.single_write = True  # type: ignore[attr-defined]
        return self._write(op)

    def set_cursor(self, cursor: Cursor) -> Deferred[None]:
        def op(conn: sqlite3.Connection, st: _Batch) -> None:
            conn.execute(
                "INSERT INTO peer_cursors (peer, feed_id, since, synced_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (peer) DO UPDATE SET feed_id = excluded.feed_id, since = excluded.since, "
                "synced_at = excluded.synced_at",
                (cursor.peer, cursor.feed_id, cursor.since, cursor.synced_at),
            )

        op.single_write = True  # type: ignore[attr-defined]
        return self._write(op)

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
        totals = {"envelopes": 0, "tombstones": 0, "acks": 0, "nonces": 0}

        def op(conn: sqlite3.Connection, st: _Batch) -> bool:
            rows = conn.execute(
                "DELETE FROM envelopes WHERE seq IN "
                "(SELECT seq FROM envelopes WHERE expires <= ? LIMIT ?) RETURNING size",
                (now, SWEEP_CHUNK),
            ).fetchall()
            st.count -= len(rows)
            st.bytes -= sum(r[0] for r in rows)
            totals["envelopes"] += len(rows)
            more = len(rows) == SWEEP_CHUNK
            for table, key in (("tombstones", "mailbox, msg_id"), ("acks", "seq"), ("nonces", "scope, nonce")):
                n = conn.execute(
                    f"DELETE FROM {table} WHERE ({key}) IN (SELECT {key} FROM {table} WHERE expires <= ? LIMIT ?)",
                    (now, SWEEP_CHUNK),
                ).rowcount
                totals[table] += n
                more = more or n == SWEEP_CHUNK
            return more

        def step(more: bool) -> Deferred[SweepResult] | SweepResult:
            if more:
                return self._write(op).addCallback(step)
            return SweepResult(**totals)

        return self._write(op).addCallback(step)

    # ------------------------------------------------------------------ reads

    def fetch(self, mailbox: str, now: int, limit: int) -> Deferred[tuple[list[str], bool]]:
        def q(conn: sqlite3.Connection) -> tuple[list[str], bool]:
            rows = conn.execute(
                "SELECT body FROM envelopes WHERE mailbox = ? AND expires > ? ORDER BY seq LIMIT ?",
                (mailbox, now, limit + 1),
            ).fetchall()
            return [r[0] for r in rows[:limit]], len(rows) > limit

        return self._read(q)

    def count(self, mailbox: str, now: int) -> Deferred[int]:
        def q(conn: sqlite3.Connection) -> int:
            (n,) = conn.execute(
                "SELECT COUNT(*) FROM envelopes WHERE mailbox = ? AND expires > ?", (mailbox, now)
            ).fetchone()
            return int(n)

        return self._read(q)

    def changes(self, since: int, limit: int, now: int, mailbox: str | None = None) -> Deferred[ChangesPage]:
        feed = self.feed_id

        def q(conn: sqlite3.Connection) -> ChangesPage:
            where = "seq > ? AND expires > ?"
            args: tuple[Any, ...] = (min(since, MAX_SEQ), now)
            if mailbox is not None:
                where = "mailbox = ? AND " + where
                args = (mailbox, *args)
            env = conn.execute(
                f"SELECT seq, body FROM envelopes WHERE {where} ORDER BY seq LIMIT ?", (*args, limit + 1)
            ).fetchall()
            acks = conn.execute(
                f"SELECT seq, body FROM acks WHERE {where} ORDER BY seq LIMIT ?", (*args, limit + 1)
            ).fetchall()
            merged = sorted(
                [FeedItem(s, "envelope", b) for s, b in env] + [FeedItem(s, "ack", b) for s, b in acks],
                key=lambda i: i.seq,
            )
            items = merged[:limit]
            return ChangesPage(feed=feed, items=items, next=items[-1].seq if items else since, more=len(merged) > limit)

        return self._read(q)

    def get_cursor(self, peer: str) -> Deferred[Cursor | None]:
        def q(conn: sqlite3.Connection) -> Cursor | None:
            row = conn.execute("SELECT feed_id, since, synced_at FROM peer_cursors WHERE peer = ?", (peer,)).fetchone()
            return None if row is None else Cursor(peer, row[0], int(row[1]), float(row[2]))

        return self._read(q)

    # ------------------------------------------------------------------ test and tool helpers

    def dump_live(self, now: int) -> dict[str, Any]:
        """Synchronous snapshot of live content (tests, ``migrate-store`` checks)."""
        c = self._wconn
        return {
            "envelopes": sorted(r[0] for r in c.execute("SELECT msg_id FROM envelopes WHERE expires > ?", (now,))),
            "tombstones": sorted(
                (r[0], r[1]) for r in c.execute("SELECT mailbox, msg_id FROM tombstones WHERE expires > ?", (now,))
            ),
        }
