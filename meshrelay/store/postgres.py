"""The PostgreSQL store: several meshrelay processes behind one public URL share one database.

Same interface and semantics as :mod:`meshrelay.store.sqlite`; what differs
is that any number of processes, on one machine or several, write to the same
tables at once.  Nothing that guards correctness lives in one process's
memory: caps, dedup, tombstones, nonces, cursors and leases are decided inside
PostgreSQL transactions.

Driver and threads
    psycopg 3 on this module's own worker threads (the project's
    :class:`~meshrelay.executor.Executor`), not ``twisted.enterprise.adbapi``:
    group commit needs one long-lived writer connection fed by a queue that
    fills while the previous batch commits, and LISTEN needs one connection
    blocked in ``notifies()`` on a thread of its own; adbapi's
    one-transaction-per-interaction pool gives neither.  The executor also lets
    the tests run this store synchronously (inline) like the SQLite one.

Group commit, in two phases
    Writes queue on the reactor; the writer thread takes up to ``MAX_BATCH``
    of them and runs them in one transaction:

    1. it takes, in sorted order, a transaction-scoped advisory lock for every
       key the batch touches (each mailbox written, each nonce claimed, each
       cursor and lease), then runs the operations in arrival order: dedup,
       tombstone and cap checks, ack deletions and tombstones, nonce claims.
       New envelopes and acks are *not inserted yet*: they wait in the batch.
    2. right before COMMIT, one call of the server-side function
       ``meshrelay_commit_rows`` (created by the migrations) takes the
       store's *sequence lock* -- the row locks on the counters
       (``last_seq``, ``stored_count``, ``stored_bytes`` in ``meta``) --,
       applies the storage cap in operation order, numbers the new rows,
       inserts them, updates the counters and NOTIFYs the mailboxes that got
       mail; COMMIT is pipelined right behind it.  The lock is held for the
       server's work and the commit only, never across a round trip to a
       busy meshrelay process.

    Because every lock is taken in one global order (sorted advisory keys,
    then the counter rows, whose holder waits for nothing else), batches of
    different processes never deadlock.  The mailbox lock serializes
    deposits to one mailbox across processes, so the per-sender and
    per-mailbox caps can never be exceeded; the sequence lock makes the shared
    byte total exact.

The changes feed never skips
    ``seq`` values are assigned while holding the sequence lock, which is only
    released by COMMIT, so ``seq`` order is commit order: a reader can see
    ``seq`` n only after every row below n has committed (or was rejected
    before being numbered).  A transaction still open in phase 1 has no
    ``seq`` yet and will receive one above everything committed before it.
    ``last_seq`` lives in ``meta`` and only grows, so a ``seq`` is never
    reused, even when the highest row is deleted.

Wake-ups across processes
    Phase 2 NOTIFYs the mailboxes that received envelopes (delivered only on
    COMMIT).  Each process keeps one listening connection on its own thread
    and hands the notifications to the reactor (``callFromThread``), which
    calls the wake callback the node set (``relay.wake``).  While that
    connection is down, the store re-checks every ``FALLBACK_INTERVAL``
    seconds which waiting mailboxes have mail (and once more when it is back),
    and reconnects with backoff.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from meshrelay.envelope import Envelope, SignedAck
from meshrelay.executor import Executor, InlineExecutor
from meshrelay.store import migrations
from meshrelay.store.base import (
    ACCEPTED,
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
    one_line,
    tombstone_key,
)
from meshrelay.store.settle import add_each, settle_batch

T = TypeVar("T")

#: bytes a tombstone counts for in the stored total (see ``Store.tombstone_bytes``)
TOMBSTONE_BYTES = migrations.tombstone_bytes(migrations.LATEST_VERSION, "postgresql")
Conn = psycopg.Connection[Any]
Cur = psycopg.Cursor[Any]

#: the largest seq a BIGINT holds: a larger ``since`` simply has nothing after it
MAX_SEQ = 2**63 - 1
#: operations per transaction (each may hold an advisory lock until commit)
MAX_BATCH = 256
#: rows deleted per table per sweeper transaction
SWEEP_CHUNK = 5000
#: seconds between wake re-checks while the listening connection is down
FALLBACK_INTERVAL = 2.0
#: the listener wakes this often to check for shutdown, and pings after LISTEN_PING idle seconds
LISTEN_POLL = 0.5
LISTEN_PING = 5.0
BACKOFF_MIN = 0.2
BACKOFF_MAX = 5.0
#: whole-batch retries after a deadlock or serialization failure (should never happen)
MAX_RETRIES = 3

#: session settings of the writer connection: a stuck peer process cannot hold
#: a mailbox lock for ever (the server ends an idle transaction), and a batch
#: that cannot get a lock fails (503) instead of hanging the writer
WRITER_SETTINGS = (
    ("lock_timeout", "20s"),
    ("statement_timeout", "120s"),
    ("idle_in_transaction_session_timeout", "60s"),
)
READER_SETTINGS = (("statement_timeout", "60s"),)


def _digest(parts: tuple[str, ...], size: int) -> int:
    h = hashlib.blake2b("\x00".join(parts).encode("utf-8"), digest_size=size).digest()
    return int.from_bytes(h, "big", signed=True)


def lock_key(*parts: str) -> int:
    """A 64-bit advisory lock key (the one-argument key space)."""
    return _digest(parts, 8)


def lock_class(*parts: str) -> int:
    """A 32-bit advisory lock class (the two-argument key space, disjoint from the 64-bit one)."""
    return _digest(parts, 4)


#: held (session level) while a process creates or upgrades the schema
MIGRATE_LOCK = (lock_class("meshrelay", "migrate"), 0)


def describe(dsn: str) -> str:
    """``host:port/dbname`` of a DSN, without the password (for error messages)."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "the configured DSN"
    host = str(params.get("host") or params.get("hostaddr") or "localhost")
    port = str(params.get("port") or "5432")
    return f"{host}:{port}/{params.get('dbname') or params.get('user') or ''}"


def connect(dsn: str, role: str, *, autocommit: bool = True, settings: Iterable[tuple[str, str]] = ()) -> Conn:
    """A connection named ``meshrelay-<role>`` (unless the DSN names it) with ``settings`` applied."""
    params = conninfo_to_dict(dsn)
    extra: dict[str, Any] = {}
    if "application_name" not in params:
        extra["application_name"] = f"meshrelay-{role}"
    if "connect_timeout" not in params:
        extra["connect_timeout"] = 10
    if "keepalives_idle" not in params:
        extra.update(keepalives=1, keepalives_idle=30, keepalives_interval=10, keepalives_count=3)
    conn = psycopg.connect(dsn, autocommit=True, **extra)
    try:
        for name, value in settings:
            conn.execute(sql.SQL("SET {} = {}").format(sql.Identifier(name), sql.Literal(value)))
        conn.autocommit = autocommit
    except BaseException:
        conn.close()
        raise
    return conn


def meta_get(conn: Conn | Cur, key: str) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key = %s", (key,)).fetchone()
    return None if row is None else str(row[0])


def meta_set(conn: Conn | Cur, key: str, value: object) -> None:
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (%s, %s) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, str(value)),
    )


def migrate_schema(conn: Conn) -> int:
    """Create or upgrade the schema (an autocommit connection); returns the version it started from.

    Runs under a session advisory lock, so processes starting together take
    turns: the first applies the migrations, the others find them applied.
    """
    conn.autocommit = True
    conn.execute("SELECT pg_advisory_lock(%s, %s)", MIGRATE_LOCK)
    try:
        conn.execute(migrations.MIGRATIONS[0].render("postgresql")[0])  # CREATE TABLE IF NOT EXISTS meta
        current = int(meta_get(conn, "schema_version") or 0)
        for m in migrations.pending(current):
            with conn.transaction():
                for stmt in m.render("postgresql"):
                    conn.execute(stmt)
                for key, value in migrations.seed_meta(m.version).items():
                    meta_set(conn, key, value)
                meta_set(conn, "schema_version", m.version)
        return current
    finally:
        if not conn.broken:
            conn.execute("SELECT pg_advisory_unlock(%s, %s)", MIGRATE_LOCK)


# --------------------------------------------------------------------------- batch state


class _Pending:
    """An operation result that is only known once phase 2 has numbered the batch."""

    def value(self) -> Any:
        raise NotImplementedError


class _NewEnvelope(_Pending):
    __slots__ = ("msg_id", "mailbox", "sender", "expires", "size", "body", "deleted", "result")

    def __init__(self, env: Envelope, body: str) -> None:
        self.msg_id = env.msg_id
        self.mailbox = env.mailbox
        self.sender = env.sender
        self.expires = env.expires
        self.size = len(body)
        self.body = body
        #: acked by a later operation of the same batch (numbered, never inserted)
        self.deleted = False
        self.result: AddResult | None = None

    def value(self) -> AddResult:
        assert self.result is not None
        return self.result


class _SameAs(_Pending):
    """A second deposit of an envelope queued earlier in the same batch."""

    __slots__ = ("first",)

    def __init__(self, first: _NewEnvelope) -> None:
        self.first = first

    def value(self) -> AddResult:
        first = self.first.value()
        return AddResult(DUPLICATE) if first.status == ACCEPTED else first


class _NewAck(_Pending):
    __slots__ = ("mailbox", "nonce", "expires", "body", "size", "junk", "deleted", "skipped", "result")

    def __init__(
        self, ack: SignedAck, expires: int, body: str, deleted: tuple[str, ...], size: int, junk: int, skipped: int
    ) -> None:
        self.mailbox = ack.mailbox
        self.nonce = ack.nonce
        self.expires = expires
        self.body = body
        self.size = size
        self.junk = junk
        self.deleted = deleted
        self.skipped = skipped
        self.result: AckResult | None = None

    def value(self) -> AckResult:
        assert self.result is not None
        return self.result


class _Tx:
    """What the operations of one batch transaction have done so far (phase 1)."""

    def __init__(self) -> None:
        self.envelopes: dict[str, _NewEnvelope] = {}
        self.acks: set[tuple[str, str]] = set()
        #: new rows in operation order; phase 2 numbers them in this order
        self.order: list[_NewEnvelope | _NewAck] = []
        self.in_mailbox: Counter[str] = Counter()
        self.from_sender: Counter[tuple[str, str]] = Counter()
        #: changes to the stored totals by deletions in this batch
        self.d_count = 0
        self.d_bytes = 0
        #: deposit checks read for the whole batch at its start, by _Check
        self.checked: dict[_Check, tuple[bool, bool, int, int]] = {}
        #: mailboxes whose rows an earlier operation of this batch changed (their checks are re-read)
        self.dirty: set[str] = set()
        self.swept = False
        #: the shared junk total (read under its row lock by the first operation that needs it)
        self.junk: int | None = None
        self.junk_delta = 0

    def junk_now(self, cur: Cur) -> int:
        """The junk bytes stored, with this batch's changes; locks the counter row until commit."""
        if self.junk is None:
            cur.execute("SELECT value FROM meta WHERE key = 'junk_bytes' FOR UPDATE")
            row = cur.fetchone()
            self.junk = int(row[0]) if row else 0
        return self.junk + self.junk_delta

    def check(self, cur: Cur, key: _Check) -> tuple[bool, bool, int, int]:
        """(stored, tombstoned, live in mailbox, live from sender) for a deposit, as of now in this batch."""
        row = self.checked.get(key)
        if row is None or self.swept or key[1] in self.dirty:
            msg_id, mailbox, sender, now = key
            cur.execute(
                _CHECK_ENVELOPE,
                {"id": msg_id, "mb": mailbox, "s": sender, "now": now, "key": tombstone_key(mailbox, msg_id)},
            )
            row = cur.fetchone()
            assert row is not None
        return row


#: (msg_id, mailbox, sender, now) of a deposit
_Check = tuple[str, str, str, int]


class _Write:
    __slots__ = ("keys", "fn", "check")

    def __init__(self, keys: tuple[int, ...], fn: Callable[[Cur, _Tx], Any], check: _Check | None = None) -> None:
        self.keys = keys
        self.fn = fn
        #: a deposit's check, read together with every other deposit's at the start of the batch
        self.check = check


class _OpFailed(Exception):
    def __init__(self, index: int, error: BaseException) -> None:
        super().__init__(str(error))
        self.index = index
        self.error = error


#: errors after which the whole batch is simply tried again (class 40; should never happen given the lock order)
_RETRYABLE = (pg_errors.TransactionRollback, pg_errors.SerializationFailure, pg_errors.DeadlockDetected)

#: (last_seq, stored_count, stored_bytes) as committed by a batch
Totals = tuple[int, int, int]

#: the same checks for every deposit of a batch, in one statement (run right after the locks)
#: live contact envelopes of a mailbox (protocol v3)
_COUNT_CONTACTS = """
SELECT COUNT(*) FROM contacts c JOIN envelopes e ON e.msg_id = c.msg_id
WHERE c.mailbox = %(mb)s AND c.expires > %(now)s AND e.expires > %(now)s
"""

#: (the last array: each deposit's tombstone_key)
_CHECK_ENVELOPES = """
SELECT t.id, t.mb, t.s, t.now,
       EXISTS (SELECT 1 FROM envelopes e WHERE e.msg_id = t.id),
       EXISTS (SELECT 1 FROM tombstones b WHERE b.digest = t.k AND b.expires > t.now),
       (SELECT count(*) FROM envelopes e WHERE e.mailbox = t.mb AND e.expires > t.now),
       (SELECT count(*) FROM envelopes e WHERE e.mailbox = t.mb AND e.sender = t.s AND e.expires > t.now)
FROM unnest(%s::text[], %s::text[], %s::text[], %s::bigint[], %s::bytea[]) AS t(id, mb, s, now, k)
"""

_CHECK_ENVELOPE = """
SELECT EXISTS (SELECT 1 FROM envelopes WHERE msg_id = %(id)s),
       EXISTS (SELECT 1 FROM tombstones WHERE digest = %(key)s AND expires > %(now)s),
       (SELECT count(*) FROM envelopes WHERE mailbox = %(mb)s AND expires > %(now)s),
       (SELECT count(*) FROM envelopes WHERE mailbox = %(mb)s AND sender = %(s)s AND expires > %(now)s)
"""


#: an envelope the store holds, or whose live tombstone stops it (``key``: each pair's tombstone_key)
_HELD_ENVELOPES = """
SELECT t.mb, t.id,
       EXISTS (SELECT 1 FROM envelopes e WHERE e.msg_id = t.id)
       OR EXISTS (SELECT 1 FROM tombstones b WHERE b.digest = t.k AND b.expires > %(now)s)
FROM unnest(%(mb)s::text[], %(id)s::text[], %(key)s::bytea[]) WITH ORDINALITY AS t(mb, id, k, i) ORDER BY t.i
"""

#: held_tombstones(): the tombstone keys asked for whose tombstone is not junk (v4, 13)
_HELD_TOMBSTONES = """
SELECT digest FROM tombstones WHERE digest = ANY(%(key)s::bytea[]) AND junk = 0
"""
_HELD_ACKS = """
SELECT t.mb, t.n, EXISTS (SELECT 1 FROM acks a WHERE a.mailbox = t.mb AND a.nonce = t.n)
FROM unnest(%(mb)s::text[], %(n)s::text[]) WITH ORDINALITY AS t(mb, n, i) ORDER BY t.i
"""


def remember_refusal(cur: Cur, caps: Caps, refused: tuple[str, str, str, int, str, int]) -> bool:
    """Remember a replica refused at a cap, within the two bounds; False when a bound stopped it.

    ``refused`` is (msg_id, peer, mailbox, expires, reason, now).  The caller
    holds the mailbox lock, so the per-(peer, mailbox) bound is exact; the
    global bound may be passed by a few rows when several processes remember
    at the same instant.
    """
    msg_id, peer, mailbox = refused[0], refused[1], refused[2]
    cur.execute("SELECT 1 FROM refused WHERE msg_id = %s AND peer = %s", (msg_id, peer))
    if cur.fetchone() is None:
        cur.execute(
            "SELECT (SELECT count(*) FROM refused WHERE peer = %s AND mailbox = %s), (SELECT count(*) FROM refused)",
            (peer, mailbox),
        )
        row = cur.fetchone()
        assert row is not None
        if row[0] >= caps.per_mailbox_pending or row[1] >= caps.max_refused:
            return False
    cur.execute(
        "INSERT INTO refused (msg_id, peer, mailbox, expires, reason, at) VALUES (%s, %s, %s, %s, %s, %s) "
        "ON CONFLICT (msg_id, peer) DO UPDATE SET reason = excluded.reason, expires = excluded.expires",
        refused,
    )
    return True


LOCK_COUNTERS = "SELECT key, value FROM meta WHERE key = ANY(%s) ORDER BY key FOR UPDATE"
_COMMIT_ROWS = (
    "SELECT meshrelay_commit_rows(%s, %s::text[], %s::text[], %s::text[], %s::bigint[], %s::bigint[], %s::text[], "
    "%s::text[], %s::text[], %s::bigint[], %s::text[], %s::bigint[], %s::bigint[], %s, %s, %s, %s)"
)


def _sweep_sql(table: str) -> str:
    # SKIP LOCKED: the sweeper never waits for a row another transaction holds,
    # so it can never be part of a lock cycle; it gets that row next time.
    return (
        f"DELETE FROM {table} WHERE ctid = ANY(ARRAY("
        f"SELECT ctid FROM {table} WHERE expires <= %s LIMIT %s FOR UPDATE SKIP LOCKED))"
    )


class WriterObserver(Protocol):
    """Told, on the writer thread, where a batch's transaction is (the concurrency tests pause or fail it there).

    With an observer the numbering call and COMMIT are two round trips instead
    of one pipelined one, so that ``before_commit`` sees the rows numbered and
    locked but not committed.
    """

    def before_seq(self) -> None:
        """The batch's operations ran; its new rows are not numbered yet."""

    def before_commit(self) -> None:
        """The batch's rows are numbered (and the sequence lock held); nothing is committed."""


class PostgresStore:
    """A :class:`~meshrelay.store.base.Store` in a PostgreSQL database shared by several processes."""

    log = Logger()
    #: ``add_envelope`` ignores ``verify``: the relay checks signatures before it calls
    verifies_signatures = False
    tombstone_bytes = TOMBSTONE_BYTES

    def __init__(
        self,
        dsn: str,
        caps: Caps,
        *,
        reactor: Any = None,
        writer: Executor | None = None,
        readers: Executor | None = None,
        metrics: Any = None,
        fallback_interval: float = FALLBACK_INTERVAL,
        observer: WriterObserver | None = None,
    ) -> None:
        self.dsn = dsn
        self.caps = caps
        self.where = describe(dsn)
        self._reactor = reactor
        self._metrics = metrics
        self._fallback_interval = fallback_interval
        try:
            conn = connect(dsn, "writer", settings=WRITER_SETTINGS)
        except psycopg.Error as e:
            raise StoreError(f"cannot connect to PostgreSQL at {self.where}: {one_line(e)}") from e
        try:
            self.migrated_from = migrate_schema(conn)
            self.feed_id = meta_get(conn, "feed_id") or ""
            self._seq, self._count, self._bytes = self._read_totals(conn)
            self._initial_policies = [r[0] for r in conn.execute("SELECT body FROM policies").fetchall()]
            conn.autocommit = False
        except (psycopg.Error, ValueError, KeyError) as e:
            conn.close()
            raise StoreError(f"cannot open the PostgreSQL store at {self.where}: {one_line(e)}") from e
        self._wconn: Conn | None = conn
        #: backend pid of the writer connection: our own NOTIFYs are skipped (the relay woke locally)
        self.writer_pid = conn.info.backend_pid
        self.channel = "meshrelay_" + hashlib.blake2b(self.feed_id.encode(), digest_size=8).hexdigest()
        self._writer = writer or InlineExecutor()
        self._readers = readers
        self._local = threading.local()
        self._reader_conns: list[Conn] = []
        self._conns_lock = threading.Lock()
        self._pending: list[tuple[_Write, Deferred[Any]]] = []
        self._busy = False
        self._firing = False
        self._closed = False
        self._started = False
        self._idle: list[Deferred[None]] = []
        self._wake: Callable[[str], None] | None = None
        self._waiting: Callable[[], Iterable[str]] | None = None
        self._listener: _Listener | None = None
        self._fallback: LoopingCall | None = None
        #: True while the listening connection is up (None: no listener)
        self.listening: bool | None = None
        self._recheck_failing = False
        self._observer = observer

    @staticmethod
    def _read_totals(conn: Conn | Cur) -> Totals:
        rows = dict(conn.execute("SELECT key, value FROM meta WHERE key = ANY(%s)", (list(migrations.COUNTER_KEYS),)))
        return int(rows["last_seq"]), int(rows["stored_count"]), int(rows["stored_bytes"])

    def _lock(self, kind: str, *parts: str) -> int:
        return lock_key(self.feed_id, kind, *parts)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._started = True
        self._writer.start()
        if self._readers is not None:
            self._readers.start()
        self._maybe_listen()

    def close(self) -> Deferred[None]:
        """Let queued writes commit, then stop the threads and close every connection."""
        self._closed = True
        d: Deferred[None] = Deferred()
        if self._busy or self._pending:
            self._idle.append(d)
        else:
            d.callback(None)

        def stop_listener(_: object) -> Deferred[None] | None:
            if self._fallback is not None and self._fallback.running:
                self._fallback.stop()
            if self._listener is not None:
                return self._listener.stop()
            return None

        def shut(_: object) -> None:
            self._writer.stop()
            if self._readers is not None:
                self._readers.stop()
            with self._conns_lock:
                conns, self._reader_conns = self._reader_conns, []
            if self._wconn is not None:
                conns.append(self._wconn)
                self._wconn = None
            for conn in conns:
                try:
                    conn.close()
                except psycopg.Error:
                    pass

        return d.addCallback(stop_listener).addCallback(shut)

    def stats(self) -> StoreStats:
        """Stored envelopes and bytes, for the whole database, as of this process's last commit or sweep."""
        return StoreStats(envelopes=self._count, bytes=self._bytes)

    # ------------------------------------------------------------------ wake-ups across processes

    def set_wake_callback(
        self, wake: Callable[[str], None], waiting: Callable[[], Iterable[str]] | None = None
    ) -> None:
        self._wake = wake
        self._waiting = waiting
        self._maybe_listen()

    def _maybe_listen(self) -> None:
        # Listening needs a real reactor (callFromThread) and worker threads;
        # the inline test configuration has neither.
        if not self._started or self._closed or self._wake is None or self._listener is not None:
            return
        if self._reactor is None or not hasattr(self._reactor, "callFromThread") or self._readers is None:
            return
        self._fallback = LoopingCall(self.recheck_waiting)
        self._fallback.clock = self._reactor
        self._listener = _Listener(self, self._reactor)
        self._listener.start()

    def _notified(self, payload: str, pid: int) -> None:
        """Reactor thread: a NOTIFY arrived."""
        if pid == self.writer_pid or self._wake is None:
            return
        for mailbox in payload.split(","):
            if mailbox:
                self._wake(mailbox)

    def _listener_state(self, up: bool) -> None:
        """Reactor thread: the listening connection came up or went down."""
        was, self.listening = self.listening, up
        fallback = self._fallback
        if fallback is None or self._closed:
            return
        if up:
            if fallback.running:
                fallback.stop()
            if was is False:
                self.log.info("PostgreSQL notifications for {where} are back", where=self.where)
                # Anything that committed while we were not listening.
                self.recheck_waiting()
        elif not fallback.running:
            self.log.warn(
                "lost the PostgreSQL notification connection to {where}: re-checking waiting polls "
                "every {interval}s until it is back",
                where=self.where,
                interval=self._fallback_interval,
            )
            fallback.start(self._fallback_interval, now=True)

    def recheck_waiting(self) -> Deferred[None]:
        """Wake the waiting mailboxes that have mail (used while notifications may have been missed)."""
        waiting = list(self._waiting()) if self._waiting is not None else []
        if not waiting or self._wake is None:
            return succeed(None)
        now = int(self._reactor.seconds()) if self._reactor is not None else int(time.time())

        def q(conn: Conn) -> list[str]:
            rows = conn.execute(
                "SELECT DISTINCT mailbox FROM envelopes WHERE mailbox = ANY(%s) AND expires > %s", (waiting, now)
            ).fetchall()
            return [r[0] for r in rows]

        def found(mailboxes: list[str]) -> None:
            self._recheck_failing = False
            if self._wake is not None:
                for mailbox in mailboxes:
                    self._wake(mailbox)

        def failed(f: Failure) -> None:
            # Once per outage: the re-check runs every few seconds while the database is away.
            if not self._recheck_failing:
                self.log.warn("wake re-check failed: {err}", err=f.getErrorMessage())
            self._recheck_failing = True

        return self._read(q).addCallbacks(found, failed)

    # ------------------------------------------------------------------ group commit (reactor side)

    def _write(
        self, keys: tuple[int, ...], fn: Callable[[Cur, _Tx], Any], check: _Check | None = None
    ) -> Deferred[Any]:
        if self._closed:
            return fail(StoreError("the store is closed"))
        d: Deferred[Any] = Deferred()
        self._pending.append((_Write(keys, fn, check), d))
        if not self._busy and not self._firing:
            self._flush()
        return d

    def _flush(self) -> None:
        batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
        self._busy = True
        self._writer.run(self._run_batch, [w for w, _ in batch]).addBoth(self._batch_done, batch)

    def _batch_done(self, outcome: Any, batch: list[tuple[_Write, Deferred[Any]]]) -> None:
        self._busy = False
        self._firing = True
        try:
            if isinstance(outcome, Failure):
                settle_batch(outcome, [d for _, d in batch], self._metrics, self.log)
            else:
                results, totals = outcome
                if totals is not None:
                    self._seq, self._count, self._bytes = totals
                settle_batch(results, [d for _, d in batch], self._metrics, self.log)
        finally:
            self._firing = False
        if self._pending:
            self._flush()
        elif self._idle:
            waiting, self._idle = self._idle, []
            for d in waiting:
                d.callback(None)

    # ------------------------------------------------------------------ group commit (writer thread)

    def _writer_connection(self) -> Conn:
        conn = self._wconn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        if conn is not None:
            conn.close()
            self._wconn = None
        conn = connect(self.dsn, "writer", autocommit=False, settings=WRITER_SETTINGS)
        self._wconn = conn
        self.writer_pid = conn.info.backend_pid
        return conn

    def _abort(self, conn: Conn) -> bool:
        """Roll back; returns True when the connection is gone (the batch's fate may be unknown)."""
        try:
            conn.rollback()
        except psycopg.Error:
            pass
        if conn.closed or conn.broken:
            conn.close()
            self._wconn = None
            return True
        return False

    def _run_batch(self, writes: list[_Write]) -> tuple[list[tuple[bool, Any]], Totals | None]:
        """Commit ``writes`` as one transaction; an operation that fails is dropped and the rest retried.

        A failure that cannot be pinned on one operation (in phase 2 or at
        COMMIT) makes each operation run in a transaction of its own.  A lost
        connection fails the whole batch: whether its COMMIT happened is
        unknown, and every operation is safe to repeat (dedup), so the
        callers get a StoreError (503) and may retry.
        """
        outcomes: list[tuple[bool, Any]] = [(False, StoreError("not run"))] * len(writes)
        live = list(range(len(writes)))
        totals: Totals | None = None
        retries = 0
        while live:
            try:
                conn = self._writer_connection()
            except psycopg.Error as e:
                raise StoreError(f"cannot reach PostgreSQL at {self.where}: {one_line(e)}") from e
            try:
                values, committed = self._commit(conn, [writes[i] for i in live])
            except _OpFailed as f:
                if self._abort(conn):
                    raise StoreError(f"store write failed: {one_line(f.error)}") from f.error
                i = live.pop(f.index)
                outcomes[i] = (False, f.error)
                continue
            except Exception as e:
                if self._abort(conn):
                    raise StoreError(f"store write failed: {one_line(e)}") from e
                if isinstance(e, _RETRYABLE) and retries < MAX_RETRIES:
                    retries += 1
                    continue
                if len(live) == 1 or isinstance(e, pg_errors.LockNotAvailable | pg_errors.QueryCanceled):
                    for i in live:
                        outcomes[i] = (False, e)
                    break
                # Not attributable to one operation: give each its own transaction.
                for i in live:
                    sub, sub_totals = self._run_batch([writes[i]])
                    outcomes[i] = sub[0]
                    totals = sub_totals or totals
                break
            for i, value in zip(live, values):
                outcomes[i] = (True, value.value() if isinstance(value, _Pending) else value)
            totals = committed or totals
            break
        return outcomes, totals

    def _commit(self, conn: Conn, writes: list[_Write]) -> tuple[list[Any], Totals | None]:
        tx = _Tx()
        keys = sorted({k for w in writes for k in w.keys})
        values: list[Any] = []
        checks = list(dict.fromkeys(w.check for w in writes if w.check is not None))
        with conn.cursor() as cur:
            # One round trip: the locks -- one statement, keys in ascending order: the global
            # lock order -- then, once they are held, every deposit's checks.
            with conn.pipeline():
                if keys:
                    cur.execute(
                        "SELECT pg_advisory_xact_lock(k) FROM unnest(%s::bigint[]) WITH ORDINALITY AS t(k, i) "
                        "ORDER BY i",
                        (keys,),
                    )
                if checks:
                    keys_of = [tombstone_key(mailbox, msg_id) for msg_id, mailbox, _, _ in checks]
                    cur.execute(_CHECK_ENVELOPES, [*(list(col) for col in zip(*checks)), keys_of])
            if checks:
                for msg_id, mailbox, sender, now, *found in cur.fetchall():
                    tx.checked[(msg_id, mailbox, sender, now)] = tuple(found)
            for i, w in enumerate(writes):
                try:
                    values.append(w.fn(cur, tx))
                except Exception as e:
                    raise _OpFailed(i, e) from e
            if tx.junk_delta:
                cur.execute(
                    "UPDATE meta SET value = (value::bigint + %s)::text WHERE key = 'junk_bytes'", (tx.junk_delta,)
                )
            observer = self._observer
            if observer is not None:
                observer.before_seq()
            call = self._phase2(tx)
            if call is None:
                conn.commit()
                return values, None
            if observer is not None:
                cur.execute(*call)  # numbered and locked, not committed: the observer sees this state
                observer.before_commit()
                conn.commit()
            else:
                # One round trip: the function and COMMIT, pipelined.
                with conn.pipeline():
                    cur.execute(*call)
                    conn.commit()
            row = cur.fetchone()
        assert row is not None
        totals = self._numbered(tx, row[0])
        return values, totals

    def _phase2(self, tx: _Tx) -> tuple[str, tuple[Any, ...]] | None:
        """The call of ``meshrelay_commit_rows`` that numbers and inserts the batch's new rows.

        The server runs the whole serial section (sequence lock, storage cap,
        numbering, inserts, counters, NOTIFY) inside that one call, and the
        lock is released by the COMMIT pipelined right after it, so no client
        round trip ever happens while it is held.
        """
        if not tx.order and not tx.d_count and not tx.d_bytes:
            return None
        kinds: list[str] = []
        env: list[list[Any]] = [[] for _ in range(6)]
        ack: list[list[Any]] = [[] for _ in range(6)]
        for item in tx.order:
            if isinstance(item, _NewEnvelope):
                kinds.append("d" if item.deleted else "e")
                for col, v in zip(env, (item.msg_id, item.mailbox, item.sender, item.expires, item.size, item.body)):
                    col.append(v)
            else:
                kinds.append("a")
                for col, v in zip(ack, (item.mailbox, item.nonce, item.expires, item.body, item.size, item.junk)):
                    col.append(v)
        args = ("".join(kinds), *env, *ack, tx.d_count, tx.d_bytes, self.caps.max_stored_bytes, self.channel)
        return _COMMIT_ROWS, args

    def _numbered(self, tx: _Tx, out: list[int]) -> Totals:
        """Give each new row of the batch its result from the numbers the server returned."""
        seq, count, nbytes, held_us = out[:4]
        for item, item_seq in zip(tx.order, out[4:]):
            if isinstance(item, _NewEnvelope):
                item.result = AddResult(ACCEPTED, seq=item_seq) if item_seq else AddResult(STORAGE_FULL)
            else:
                item.result = AckResult(deleted=item.deleted, new=True, seq=item_seq, skipped=item.skipped)
        if self._metrics is not None:
            self._metrics.store_seq_lock.observe(held_us / 1e6)
        return seq, count, nbytes

    # ------------------------------------------------------------------ writes

    def add_envelopes(
        self, envs: Sequence[Envelope], now: int, verify: str | None = None, peer: str | None = None
    ) -> Deferred[list[AddResult]]:
        # Single adds queued in one reactor turn already share one transaction here.
        return add_each(self.add_envelope, envs, now, verify, peer)

    def add_envelope(
        self, env: Envelope, now: int, verify: str | None = None, peer: str | None = None
    ) -> Deferred[AddResult]:
        """Add ``env`` (signatures are checked by the caller: ``verify`` is ignored).

        With ``peer``, a sender or mailbox cap refusal is remembered in the
        same transaction; a storage cap refusal (decided in phase 2, by the
        server) in a transaction right after, before the answer.
        """
        caps = self.caps
        body = env.raw

        def refuse(cur: Cur, result: AddResult) -> AddResult:
            if peer is None:
                return result
            remembered = remember_refusal(cur, caps, (env.msg_id, peer, env.mailbox, env.expires, result.status, now))
            return AddResult(result.status, pending=result.pending, limit=result.limit, remembered=remembered)

        def op(cur: Cur, tx: _Tx) -> AddResult | _Pending:
            earlier = tx.envelopes.get(env.msg_id)
            if earlier is not None:
                return _SameAs(earlier)
            stored, tombstoned, in_mailbox, from_sender = tx.check(cur, check)
            if stored or tombstoned:
                if stored and env.contact:
                    return self._upgrade(cur, tx, env, body)
                return AddResult(DUPLICATE)
            in_mailbox += tx.in_mailbox[env.mailbox]
            added: Counter[str] = tx.__dict__.setdefault("contacts_added", Counter())

            def count_contacts() -> int:
                cur.execute(_COUNT_CONTACTS, {"mb": env.mailbox, "now": now})
                row = cur.fetchone()
                return int(row[0] if row is not None else 0) + added[env.mailbox]

            refusal = bucket_refusal(env.contact, env.stranger_cap, in_mailbox, count_contacts, caps)
            if refusal is not None:
                return refuse(cur, refusal)
            from_sender += tx.from_sender[(env.mailbox, env.sender)]
            if from_sender >= caps.per_sender_pending:
                return refuse(cur, AddResult(SENDER_CAP, pending=from_sender, limit=caps.per_sender_pending))
            cur.execute("DELETE FROM refused WHERE msg_id = %s", (env.msg_id,))
            if env.contact:
                # Phase 1, before the row exists: a contacts row names a msg_id proven contact mail by
                # a valid permit, so one left by a refusal in phase 2 (storage full) is still true.
                cur.execute(
                    "INSERT INTO contacts (msg_id, mailbox, expires) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                    (env.msg_id, env.mailbox, env.expires),
                )
                added[env.mailbox] += 1
            new = _NewEnvelope(env, body)
            tx.envelopes[env.msg_id] = new
            tx.order.append(new)
            tx.in_mailbox[env.mailbox] += 1
            tx.from_sender[(env.mailbox, env.sender)] += 1
            return new

        def storage_full(cur: Cur, tx: _Tx) -> AddResult:
            return refuse(cur, AddResult(STORAGE_FULL))

        def done(result: AddResult) -> AddResult | Deferred[AddResult]:
            if result.status == STORAGE_FULL and peer is not None and result.remembered is None:
                return self._write((self._lock("m", env.mailbox),), storage_full).addCallback(done)
            if result.remembered is False and self._metrics is not None:
                self._metrics.replica_refusals_forgotten_total.inc()
            return result

        check = (env.msg_id, env.mailbox, env.sender, now)
        return self._write((self._lock("m", env.mailbox),), op, check).addCallback(done)

    def forget_refused(self, items: Sequence[tuple[str, str]]) -> Deferred[None]:
        pairs = [(str(m), str(p)) for m, p in items]
        if not pairs:
            return succeed(None)

        def op(cur: Cur, tx: _Tx) -> None:
            cur.execute(
                "DELETE FROM refused r USING unnest(%s::text[], %s::text[]) AS t(m, p) "
                "WHERE r.msg_id = t.m AND r.peer = t.p",
                ([m for m, _ in pairs], [p for _, p in pairs]),
            )

        return self._write((), op)

    @staticmethod
    def _upgrade(cur: Cur, tx: _Tx, env: Envelope, body: str) -> AddResult:
        """A contact copy of a stored envelope: the stored copy becomes contact mail, with its permit (v3)."""
        cur.execute("SELECT size FROM envelopes WHERE msg_id = %s AND mailbox = %s", (env.msg_id, env.mailbox))
        row = cur.fetchone()
        if row is None:
            return AddResult(DUPLICATE)
        cur.execute(
            "INSERT INTO contacts (msg_id, mailbox, expires) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
            (env.msg_id, env.mailbox, env.expires),
        )
        if cur.rowcount != 1:
            return AddResult(DUPLICATE)
        cur.execute("UPDATE envelopes SET body = %s, size = %s WHERE msg_id = %s", (body, len(body), env.msg_id))
        tx.d_bytes += len(body) - int(row[0])
        return AddResult(DUPLICATE, upgraded=True)

    def apply_ack(
        self, ack: SignedAck, tombstone_expires: int, from_peer: bool = False, attested: Sequence[str] = ()
    ) -> Deferred[AckResult]:
        """Delete and tombstone held mail, tombstone unheld ids within the junk budget, record the ack.

        The same rules as the SQLite store (``sqlite._op_ack``), attested ids (v4) included.
        """
        vouched_ids = frozenset(str(m) for m in attested)
        body = ack.json_text()
        size = len(body.encode("utf-8"))
        mailbox = ack.mailbox
        caps = self.caps
        budget = junk_budget(caps, from_peer)

        def op(cur: Cur, tx: _Tx) -> AckResult | _Pending:
            ids = list(dict.fromkeys(ack.ack))
            tx.dirty.add(mailbox)
            gone: set[str] = set()
            stored: list[str] = []
            for msg_id in ids:
                new = tx.envelopes.get(msg_id)
                if new is not None and new.mailbox == mailbox and not new.deleted:
                    new.deleted = True
                    tx.in_mailbox[mailbox] -= 1
                    tx.from_sender[(mailbox, new.sender)] -= 1
                    gone.add(msg_id)
                else:
                    stored.append(msg_id)
            if stored:
                cur.execute(
                    "DELETE FROM envelopes WHERE mailbox = %s AND msg_id = ANY(%s) RETURNING msg_id, size",
                    (mailbox, stored),
                )
                for msg_id, freed in cur.fetchall():
                    gone.add(msg_id)
                    tx.d_count -= 1
                    tx.d_bytes -= freed
            deleted = tuple(m for m in ids if m in gone)
            tkey = {m: tombstone_key(mailbox, m) for m in ids}
            held = [tkey[m] for m in deleted]
            unheld = [m for m in ids if m not in gone]
            if held:
                cur.execute(
                    "INSERT INTO tombstones (digest, expires, junk) SELECT k, %s, 0 "
                    "FROM unnest(%s::bytea[]) AS k ON CONFLICT (digest) DO UPDATE "
                    "SET expires = GREATEST(tombstones.expires, excluded.expires) RETURNING (xmax = 0)",
                    (tombstone_expires, held),
                )
                tx.d_bytes += TOMBSTONE_BYTES * sum(1 for (inserted,) in cur.fetchall() if inserted)
            skipped = 0
            vouched = [m for m in unheld if m in vouched_ids]
            if vouched:
                # v4 (13): a junk tombstone made real by a peer that held the message leaves the junk budget.
                cur.execute(
                    "UPDATE tombstones SET junk = 0 WHERE digest = ANY(%s::bytea[]) AND junk = 1",
                    ([tkey[m] for m in vouched],),
                )
                tx.junk_delta -= TOMBSTONE_BYTES * cur.rowcount
            if unheld:
                cur.execute(
                    "UPDATE tombstones SET expires = GREATEST(expires, %s) WHERE digest = ANY(%s::bytea[]) "
                    "RETURNING digest",
                    (tombstone_expires, [tkey[m] for m in unheld]),
                )
                known = {bytes(r[0]) for r in cur.fetchall()}
                for junk_flag in (0, 1):
                    # Attested ids (v4) are not junk: only the storage cap bounds them.
                    # For junk, the shared total is this process's last view plus this batch
                    # (another process's batch may add a little); the junk total is exact (row lock).
                    rest = [tkey[m] for m in unheld if tkey[m] not in known and (m in vouched_ids) != bool(junk_flag)]
                    if not rest:
                        continue
                    room = caps.max_stored_bytes - self._bytes - tx.d_bytes
                    if junk_flag:
                        room = min(room, budget - tx.junk_now(cur))
                    take = rest[: max(0, room // TOMBSTONE_BYTES)]
                    skipped += len(rest) - len(take)
                    if take:
                        cur.execute(
                            "INSERT INTO tombstones (digest, expires, junk) SELECT k, %s, %s "
                            "FROM unnest(%s::bytea[]) AS k ON CONFLICT (digest) DO NOTHING",
                            (tombstone_expires, junk_flag, take),
                        )
                        tx.d_bytes += TOMBSTONE_BYTES * cur.rowcount
                        tx.junk_delta += TOMBSTONE_BYTES * cur.rowcount * junk_flag
            if ids:
                cur.execute("DELETE FROM refused WHERE mailbox = %s AND msg_id = ANY(%s)", (mailbox, ids))
            key = (mailbox, ack.nonce)
            if key in tx.acks:
                return AckResult(deleted=deleted, new=False, skipped=skipped)
            cur.execute("SELECT 1 FROM acks WHERE mailbox = %s AND nonce = %s", key)
            if cur.fetchone() is not None:
                return AckResult(deleted=deleted, new=False, skipped=skipped)
            junk = 0 if deleted or vouched else 1
            if self._bytes + tx.d_bytes + size > caps.max_stored_bytes or (junk and tx.junk_now(cur) + size > budget):
                return AckResult(deleted=deleted, new=True, stored=False, skipped=skipped)
            tx.acks.add(key)
            tx.d_bytes += size
            tx.junk_delta += size * junk
            new_ack = _NewAck(ack, tombstone_expires, body, deleted, size, junk, skipped)
            tx.order.append(new_ack)
            return new_ack

        return self._write((self._lock("m", mailbox),), op)

    def claim_nonce(self, scope: str, nonce: str, expires: int) -> Deferred[bool]:
        def op(cur: Cur, tx: _Tx) -> bool:
            cur.execute(
                "INSERT INTO nonces (scope, nonce, expires) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                (scope, nonce, expires),
            )
            return cur.rowcount == 1

        return self._write((self._lock("n", scope, nonce),), op)

    def set_cursor(self, cursor: Cursor) -> Deferred[None]:
        def op(cur: Cur, tx: _Tx) -> None:
            cur.execute(
                "INSERT INTO peer_cursors (peer, feed_id, since, synced_at) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (peer) DO UPDATE SET feed_id = excluded.feed_id, since = excluded.since, "
                "synced_at = excluded.synced_at",
                (cursor.peer, cursor.feed_id, cursor.since, cursor.synced_at),
            )

        return self._write((self._lock("c", cursor.peer),), op)

    def acquire_lease(self, name: str, holder: str, ttl: float) -> Deferred[bool]:
        """Hold ``name`` for ``ttl`` seconds of the database's clock, or renew it; False if another holds it."""
        if not (isinstance(ttl, int | float) and math.isfinite(ttl) and ttl > 0):
            return fail(ValueError(f"lease ttl must be a positive number of seconds, got {ttl!r}"))

        def op(cur: Cur, tx: _Tx) -> bool:
            cur.execute(
                "INSERT INTO leases (name, holder, expires) "
                "VALUES (%(n)s, %(h)s, extract(epoch FROM clock_timestamp()) + %(ttl)s) "
                "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires = excluded.expires "
                "WHERE leases.holder = excluded.holder OR leases.expires <= extract(epoch FROM clock_timestamp()) "
                "RETURNING 1",
                {"n": name, "h": holder, "ttl": float(ttl)},
            )
            return cur.fetchone() is not None

        return self._write((self._lock("l", name),), op)

    def sweep(self, now: int) -> Deferred[SweepResult]:
        """Delete expired rows, a chunk per table per transaction, until none is left."""
        totals = [0, 0, 0, 0, 0]

        def op(cur: Cur, tx: _Tx) -> tuple[tuple[int, int, int, int, int], bool]:
            cur.execute(
                "DELETE FROM envelopes WHERE seq = ANY(ARRAY("
                "SELECT seq FROM envelopes WHERE expires <= %s LIMIT %s FOR UPDATE SKIP LOCKED)) RETURNING size",
                (now, SWEEP_CHUNK),
            )
            sizes = [r[0] for r in cur.fetchall()]
            tx.swept = True
            tx.d_count -= len(sizes)
            tx.d_bytes -= sum(sizes)
            counts = [len(sizes)]
            # tombstones and acks are accounted too
            cur.execute(_sweep_sql("tombstones") + " RETURNING junk", (now, SWEEP_CHUNK))
            tombs = cur.fetchall()
            cur.execute(_sweep_sql("acks") + " RETURNING size, junk", (now, SWEEP_CHUNK))
            acks = cur.fetchall()
            freed_junk = TOMBSTONE_BYTES * sum(r[0] for r in tombs) + sum(r[0] * r[1] for r in acks)
            tx.d_bytes -= TOMBSTONE_BYTES * len(tombs) + sum(r[0] for r in acks)
            if freed_junk:
                tx.junk_now(cur)
                tx.junk_delta -= freed_junk
            counts += [len(tombs), len(acks)]
            for table in ("nonces", "refused"):
                cur.execute(_sweep_sql(table), (now, SWEEP_CHUNK))
                counts.append(cur.rowcount)
            return (counts[0], counts[1], counts[2], counts[3], counts[4]), any(n == SWEEP_CHUNK for n in counts)

        def step(result: tuple[tuple[int, int, int, int, int], bool]) -> Deferred[SweepResult] | SweepResult:
            counts, more = result
            for i, n in enumerate(counts):
                totals[i] += n
            if more and not self._closed:
                return self._write((), op).addCallback(step)
            # Then the contact-bucket rows of expired envelopes (v3), and the shared totals.
            d = self.sweep_contacts(now).addCallback(lambda _: self._refresh_stats())
            d.addCallback(lambda _: self.tombstone_count())
            return d.addCallback(
                lambda n: SweepResult(
                    envelopes=totals[0],
                    tombstones=totals[1],
                    acks=totals[2],
                    nonces=totals[3],
                    refused=totals[4],
                    live_tombstones=n,
                )
            )

        return self._write((), op).addCallback(step)

    def tombstone_count(self) -> Deferred[int]:
        """Tombstone rows stored (expired ones not yet swept included: they still take space)."""

        def q(conn: Conn) -> int:
            row = conn.execute("SELECT count(*) FROM tombstones").fetchone()
            return int(row[0]) if row else 0

        return self._read(q)

    def _refresh_stats(self) -> Deferred[None]:
        """Re-read the shared totals (other processes change them too)."""

        def got(totals: Totals) -> None:
            self._seq, self._count, self._bytes = totals

        def failed(f: Failure) -> None:
            self.log.warn("could not refresh the store totals: {err}", err=f.getErrorMessage())

        return self._read(self._read_totals).addCallbacks(got, failed)

    # ------------------------------------------------------------------ reads

    def _read(self, fn: Callable[[Conn], T]) -> Deferred[T]:
        if self._readers is None:
            return InlineExecutor().run(self._read_blocking, fn)
        return self._readers.run(self._read_blocking, fn)

    def _reader_connection(self) -> Conn:
        conn: Conn | None = getattr(self._local, "conn", None)
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        if conn is not None:
            with self._conns_lock:
                if conn in self._reader_conns:
                    self._reader_conns.remove(conn)
            conn.close()
        conn = connect(self.dsn, "reader", settings=READER_SETTINGS)
        with self._conns_lock:
            self._reader_conns.append(conn)
        self._local.conn = conn
        return conn

    def _read_blocking(self, fn: Callable[[Conn], T]) -> T:
        for attempt in (1, 2):
            try:
                conn = self._reader_connection()
            except psycopg.Error as e:
                raise StoreError(f"cannot reach PostgreSQL at {self.where}: {one_line(e)}") from e
            try:
                return fn(conn)
            except psycopg.Error as e:
                if attempt == 1 and (conn.closed or conn.broken):
                    continue  # a read is safe to repeat on a fresh connection
                raise StoreError(f"store read failed: {one_line(e)}") from e
        raise AssertionError("unreachable")

    def fetch(self, mailbox: str, now: int, limit: int) -> Deferred[tuple[list[str], bool]]:
        def q(conn: Conn) -> tuple[list[str], bool]:
            rows = conn.execute(
                "SELECT body FROM envelopes WHERE mailbox = %s AND expires > %s ORDER BY seq LIMIT %s",
                (mailbox, now, limit + 1),
            ).fetchall()
            return [r[0] for r in rows[:limit]], len(rows) > limit

        return self._read(q)

    def count(self, mailbox: str, now: int) -> Deferred[int]:
        def q(conn: Conn) -> int:
            row = conn.execute(
                "SELECT count(*) FROM envelopes WHERE mailbox = %s AND expires > %s", (mailbox, now)
            ).fetchone()
            return int(row[0]) if row else 0

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
        feed = self.feed_id
        where = "seq > %(since)s AND expires > %(now)s" + (" AND mailbox = %(mb)s" if mailbox is not None else "")
        body = "''" if ids_only else "body"
        # One statement, so envelopes and acks come from one snapshot.
        query = (
            f"(SELECT seq, 'envelope' AS kind, mailbox, msg_id AS key, size, {body} AS body FROM envelopes "
            f"WHERE {where} ORDER BY seq LIMIT %(n)s) UNION ALL "
            f"(SELECT seq, 'ack', mailbox, nonce, size, {body} FROM acks "
            f"WHERE {where} ORDER BY seq LIMIT %(n)s) ORDER BY 1 LIMIT %(n)s"
        )
        if max_bytes is not None:
            # Stop after the first row past the budget (returned so the caller knows there is more).
            query = (
                "SELECT seq, kind, mailbox, key, size, body FROM (SELECT m.*, "
                "sum(size) OVER (ORDER BY seq ROWS UNBOUNDED PRECEDING) AS run, "
                "row_number() OVER (ORDER BY seq) AS rn "
                f"FROM ({query}) AS m) AS r WHERE run - size <= %(max)s OR rn <= 2 ORDER BY seq"
            )
        args = {"since": min(since, MAX_SEQ), "now": now, "mb": mailbox, "n": limit + 1, "max": max_bytes}

        def q(conn: Conn) -> ChangesPage:
            rows = [
                FeedItem(int(s), k, b, int(z), m, key) for s, k, m, key, z, b in conn.execute(query, args).fetchall()
            ]
            items, more = cut_page(rows, limit, max_bytes)
            return ChangesPage(feed=feed, items=items, next=items[-1].seq if items else since, more=more)

        return self._read(q)

    def missing(
        self, envelopes: Sequence[tuple[str, str]], acks: Sequence[tuple[str, str]], now: int
    ) -> Deferred[tuple[list[tuple[str, str]], list[tuple[str, str]]]]:
        env_list = [(str(mb), str(m)) for mb, m in envelopes]
        ack_list = [(str(mb), str(n)) for mb, n in acks]

        def q(conn: Conn) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
            lack_env: list[tuple[str, str]] = []
            lack_ack: list[tuple[str, str]] = []
            if env_list:
                rows = conn.execute(
                    _HELD_ENVELOPES,
                    {
                        "now": now,
                        "mb": [mb for mb, _ in env_list],
                        "id": [m for _, m in env_list],
                        "key": [tombstone_key(mb, m) for mb, m in env_list],
                    },
                ).fetchall()
                lack_env = [(mb, m) for mb, m, held in rows if not held]
            if ack_list:
                rows = conn.execute(
                    _HELD_ACKS, {"mb": [mb for mb, _ in ack_list], "n": [n for _, n in ack_list]}
                ).fetchall()
                lack_ack = [(mb, n) for mb, n, held in rows if not held]
            return lack_env, lack_ack

        return self._read(q)

    def held_tombstones(self, pairs: Sequence[tuple[str, str]]) -> Deferred[set[tuple[str, str]]]:
        items = [(str(mb), str(m)) for mb, m in pairs]

        def q(conn: Conn) -> set[tuple[str, str]]:
            if not items:
                return set()
            keys = {tombstone_key(mb, m): (mb, m) for mb, m in items}
            rows = conn.execute(_HELD_TOMBSTONES, {"key": list(keys)}).fetchall()
            return {keys[bytes(k)] for (k,) in rows}

        return self._read(q)

    def bodies(
        self, msg_ids: Sequence[str], acks: Sequence[tuple[str, str]], now: int, max_bytes: int
    ) -> Deferred[Bodies]:
        ids = [str(m) for m in msg_ids]
        ack_keys = [(str(mb), str(n)) for mb, n in acks]

        def q(conn: Conn) -> Bodies:
            env_rows: dict[str, tuple[int, str]] = {}
            ack_rows: dict[tuple[str, str], tuple[int, str]] = {}
            if ids:
                for m, z, b in conn.execute(
                    "SELECT msg_id, size, body FROM envelopes WHERE msg_id = ANY(%s) AND expires > %s", (ids, now)
                ).fetchall():
                    env_rows[m] = (int(z), b)
            if ack_keys:
                for mb, n, z, b in conn.execute(
                    "SELECT a.mailbox, a.nonce, a.size, a.body FROM acks a "
                    "JOIN unnest(%s::text[], %s::text[]) AS t(mb, n) ON a.mailbox = t.mb AND a.nonce = t.n "
                    "WHERE a.expires > %s",
                    ([mb for mb, _ in ack_keys], [n for _, n in ack_keys], now),
                ).fetchall():
                    ack_rows[(mb, n)] = (int(z), b)
            return fill_bodies(((m, env_rows.get(m)) for m in ids), ((k, ack_rows.get(k)) for k in ack_keys), max_bytes)

        return self._read(q)

    def refused(self, now: int, limit: int, mailbox: str | None = None) -> Deferred[list[Refused]]:
        where = "expires > %s" + (" AND mailbox = %s" if mailbox is not None else "")
        args: tuple[Any, ...] = (now,) if mailbox is None else (now, mailbox)

        def q(conn: Conn) -> list[Refused]:
            rows = conn.execute(
                f"SELECT msg_id, mailbox, peer, reason, expires FROM refused WHERE {where} "
                "ORDER BY at, msg_id, peer LIMIT %s",
                (*args, limit),
            ).fetchall()
            return [Refused(m, mb, p, r, int(e)) for m, mb, p, r, e in rows]

        return self._read(q)

    # ------------------------------------------------------------------ policies (protocol v3)

    def sweep_contacts(self, now: int) -> Deferred[int]:
        """Forget the contact-bucket rows of expired envelopes (v3); how many."""

        def op(cur: Cur, tx: _Tx) -> int:
            cur.execute("DELETE FROM contacts WHERE expires <= %s", (now,))
            return int(cur.rowcount)

        return self._write((self._lock("contacts-sweep"),), op)

    def put_policy(self, mailbox: str, version: int, policy_id: str, body: str) -> Deferred[str]:
        """Store a signed policy unless the stored one is newer: ``accepted``, ``duplicate`` or ``stale``."""

        def op(cur: Cur, tx: _Tx) -> str:
            cur.execute("SELECT version, policy_id FROM policies WHERE mailbox = %s", (mailbox,))
            row = cur.fetchone()
            if row is not None:
                if row[1] == policy_id:
                    return POLICY_DUPLICATE
                if (int(row[0]), row[1]) > (version, policy_id):
                    return POLICY_STALE
            else:
                cur.execute("SELECT COUNT(*) FROM policies")
                counted = cur.fetchone()
                if counted is not None and int(counted[0]) >= self.caps.max_policies:
                    return POLICY_FULL
            cur.execute(
                "INSERT INTO policies (mailbox, version, policy_id, pseq, body) "
                "VALUES (%(mb)s, %(v)s, %(id)s, (SELECT COALESCE(MAX(pseq), 0) + 1 FROM policies), %(b)s) "
                "ON CONFLICT (mailbox) DO UPDATE SET version = %(v)s, policy_id = %(id)s, "
                "pseq = (SELECT COALESCE(MAX(pseq), 0) + 1 FROM policies), body = %(b)s",
                {"mb": mailbox, "v": version, "id": policy_id, "b": body},
            )
            return POLICY_ACCEPTED

        # One lock for every policy write: the policy feed's pseq is MAX + 1 (policies are rare).
        return self._write((self._lock("policies"),), op)

    def policies_since(self, since: int, limit: int) -> Deferred[list[tuple[int, str]]]:
        """``(pseq, body)`` of the stored policies with ``pseq > since``, ascending, at most ``limit``."""

        def q(conn: Conn) -> list[tuple[int, str]]:
            rows = conn.execute(
                "SELECT pseq, body FROM policies WHERE pseq > %s ORDER BY pseq LIMIT %s", (min(since, 2**63 - 1), limit)
            ).fetchall()
            return [(int(r[0]), r[1]) for r in rows]

        return self._read(q)

    def load_policies(self) -> list[str]:
        """The stored policies' texts as read when the store opened (the relay's policy book)."""
        return list(self._initial_policies)

    def get_cursor(self, peer: str) -> Deferred[Cursor | None]:
        def q(conn: Conn) -> Cursor | None:
            row = conn.execute("SELECT feed_id, since, synced_at FROM peer_cursors WHERE peer = %s", (peer,)).fetchone()
            return None if row is None else Cursor(peer, row[0], int(row[1]), float(row[2]))

        return self._read(q)


class _Listener:
    """A thread holding one LISTEN connection; hands notifications to the reactor."""

    log = Logger()

    def __init__(self, store: PostgresStore, reactor: Any) -> None:
        self.store = store
        self.reactor = reactor
        self._stop = threading.Event()
        self._done: Deferred[None] = Deferred()
        self._thread = threading.Thread(target=self._run, name="meshrelay-pg-listener", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> Deferred[None]:
        """Ask the thread to finish; fires once it has closed its connection."""
        self._stop.set()
        return self._done

    def _run(self) -> None:
        store = self.store
        backoff = BACKOFF_MIN
        try:
            while not self._stop.is_set():
                try:
                    conn = connect(store.dsn, "listener")
                except psycopg.Error as e:
                    self.log.debug("cannot open the notification connection: {err}", err=one_line(e))
                    self.reactor.callFromThread(store._listener_state, False)
                else:
                    try:
                        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(store.channel)))
                        self.reactor.callFromThread(store._listener_state, True)
                        backoff = BACKOFF_MIN
                        self._listen(conn)
                    except psycopg.Error as e:
                        if not self._stop.is_set():
                            self.log.debug("notification connection failed: {err}", err=one_line(e))
                            self.reactor.callFromThread(store._listener_state, False)
                    finally:
                        conn.close()
                if self._stop.wait(backoff):
                    break
                backoff = min(backoff * 2, BACKOFF_MAX)
        finally:
            self.reactor.callFromThread(self._done.callback, None)

    def _listen(self, conn: Conn) -> None:
        last = time.monotonic()
        while not self._stop.is_set():
            for n in conn.notifies(timeout=LISTEN_POLL):
                self.reactor.callFromThread(self.store._notified, n.payload, n.pid)
                last = time.monotonic()
            if time.monotonic() - last > LISTEN_PING:
                # A dead peer that never closed the socket shows up here.
                conn.execute("SELECT 1")
                last = time.monotonic()
