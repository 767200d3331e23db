"""The embedded SQLite store (the default backend).

Writes go through one writer (a child process by default, see
``writer_process.py``, or a thread) that commits many operations per
transaction (group commit; the operations and the commit itself are in
``sqlite_core.py``, which imports no Twisted): an operation is queued, the writer takes
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
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from meshrelay.envelope import Envelope, SignedAck
from meshrelay.executor import Executor, InlineExecutor
from meshrelay.files import private_dir, private_file
from meshrelay.store.base import (
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
    cut_page,
    fill_bodies,
    tombstone_key,
)
from meshrelay.store.emptiness import EmptyMailboxes
from meshrelay.store.settle import settle_batch, settle_items

# The write side (re-exported: the names the rest of the code and the tools know this module by).
from meshrelay.store.sqlite_core import DB_NAME as DB_NAME
from meshrelay.store.sqlite_core import (
    MAX_SEQ,
    BatchOutcome,
    T,
    WriteOp,
    _add_args,
    _keyed,
    _meta_get,
    _tombstoned,
    acked_in_rows,
)
from meshrelay.store.sqlite_core import READER_CACHE_KIB as READER_CACHE_KIB
from meshrelay.store.sqlite_core import TOMBSTONE_BYTES as TOMBSTONE_BYTES
from meshrelay.store.sqlite_core import WRITER_CACHE_KIB as WRITER_CACHE_KIB
from meshrelay.store.sqlite_core import WriterCore as WriterCore
from meshrelay.store.sqlite_core import _connect as _connect
from meshrelay.store.sqlite_core import checkpoint as checkpoint
from meshrelay.store.sqlite_core import migrate as migrate
from meshrelay.store.sqlite_core import wal_backstop_pages as wal_backstop_pages
from meshrelay.store.sqlite_core import wal_keep_bytes as wal_keep_bytes

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
        #: mailboxes a read found empty with no add sent since: polls of them need no read
        #: (only this process adds to a SQLite store; see emptiness.py)
        self.empty_mailboxes = EmptyMailboxes()

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
        if callable(op):
            self.empty_mailboxes.forget_all()  # a test's raw operation: it may add anything
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
        return self._adding([env.mailbox], ("add", _add_args(env, now, verify, peer))).addCallback(
            self._count_forgotten
        )

    def add_envelopes(
        self, envs: Sequence[Envelope], now: int, verify: str | None = None, peer: str | None = None
    ) -> Deferred[list[AddResult]]:
        """``add_envelope`` for each, as one write operation (one Deferred, one round trip to the writer)."""
        if not envs:
            return succeed([])
        items = [_add_args(env, now, verify, peer) for env in envs]
        return self._adding([env.mailbox for env in envs], ("add_many", (items,))).addCallback(self._settle_many)

    def _adding(self, mailboxes: list[str], op: WriteOp) -> Deferred[Any]:
        """Send an operation that adds envelopes to ``mailboxes``; they are no longer known empty."""
        self.empty_mailboxes.adding(mailboxes)

        def answered(result: Any) -> Any:
            self.empty_mailboxes.added(mailboxes)
            return result

        return self._write(op).addBoth(answered)

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
        if self.empty_mailboxes.known_empty(mailbox):
            self._skipped("empty_mailbox")
            return succeed(([], False))

        def q(conn: sqlite3.Connection) -> tuple[list[str], bool]:
            rows = conn.execute(
                "SELECT body FROM envelopes WHERE mailbox = ? AND expires > ? ORDER BY seq LIMIT ?",
                (mailbox, now, limit + 1),
            ).fetchall()
            return [r[0] for r in rows[:limit]], len(rows) > limit

        return self._read_mailbox(mailbox, q, lambda found: not found[0] and not found[1])

    def tombstone_count(self) -> Deferred[int]:
        """Tombstone rows stored (expired ones not yet swept included: they still take space)."""

        def q(conn: sqlite3.Connection) -> int:
            return int(conn.execute("SELECT COUNT(*) FROM tombstones").fetchone()[0])

        return self._read(q)

    def count(self, mailbox: str, now: int) -> Deferred[int]:
        if self.empty_mailboxes.known_empty(mailbox):
            self._skipped("empty_mailbox")
            return succeed(0)

        def q(conn: sqlite3.Connection) -> int:
            (n,) = conn.execute(
                "SELECT COUNT(*) FROM envelopes WHERE mailbox = ? AND expires > ?", (mailbox, now)
            ).fetchone()
            return int(n)

        return self._read_mailbox(mailbox, q, lambda n: n == 0)

    def _skipped(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.store_reads_skipped_total.labels(reason).inc()

    def _read_mailbox(
        self, mailbox: str, fn: Callable[[sqlite3.Connection], T], empty: Callable[[T], bool]
    ) -> Deferred[T]:
        """``_read(fn)`` of one mailbox's live envelopes; ``empty(result)``: it found none."""
        read = self.empty_mailboxes.begin_read(mailbox)

        def seen(result: T) -> T:
            self.empty_mailboxes.end_read(mailbox, read, empty(result))
            return result

        def failed(failure: Failure) -> Failure:
            self.empty_mailboxes.end_read(mailbox, read, False)
            return failure

        return self._read(fn).addCallbacks(seen, failed)

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
        if since >= self._seq:
            # Past the last seq this process has seen committed: nothing to read (a feed write
            # committed but not yet answered makes this an earlier snapshot, which a puller
            # cannot tell apart; only this process writes a SQLite store).
            self._skipped("feed_end")
            return succeed(ChangesPage(feed=feed, items=[], next=since, more=False))
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
                # and ids a mailbox's first junk ack keeps in its row (schema 8)
                dead = acked_in_rows(conn, lack_env, now)
                lack_env = [pair for pair in lack_env if pair not in dead]
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
