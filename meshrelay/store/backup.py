"""Backup and restore of a node's store (``meshrelay backup`` / ``meshrelay restore``).

**Backup (SQLite).**  The copy is made with SQLite's online backup API while
the node serves.  The copying connection first opens a read transaction and
holds it to the end: in WAL mode that pins one snapshot, so every step of the
copy (``step_pages`` pages each) reads the same consistent database, while
the node's writer (another process) keeps committing to the WAL beside it:
deposits are never paused.  (Without the held snapshot, SQLite restarts a
backup from the first page whenever another connection commits, so under
steady load a stepped copy might never end.)  The copy goes to a private
(0600) temporary file beside ``out``, is switched to a self-contained
rollback-journal file, verified (:func:`verify`), synced, and only then takes
its name.

**Restore.**  The backup is copied into the new data directory, verified, and
given a **new feed identity** (:func:`renew_feed_identity`) before any node
opens it:

- a new random ``feed_id``: the restored store hands out ``seq`` values again
  that its peers' sync cursors have already passed (they recorded the lost
  store's later items); a puller whose cursor names another feed starts again
  from ``since=0`` (docs/protocol.md 6.4, 6.5 step 3; every protocol version),
  so nothing the restored node stores later is skipped.  The restored node's
  own cursors on its peers are kept: they are older than its peers' feeds, so
  it pulls again what it lost, including what it had pushed to them after the
  backup, and the acks made since.
- its policy feed (protocol v3, 12.5) has no feed id and peers follow it with
  an in-memory cursor, so the policies' ``pseq`` are moved above any value the
  lost store can have handed out (above the restore time in microseconds).

PostgreSQL is backed up with ``pg_dump`` (one snapshot); after ``pg_restore``,
:func:`restore_postgres` verifies the restored schema and renews its feed
identity the same way (docs/postgresql.md).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from meshrelay.files import PRIVATE_FILE, private_dir, private_file
from meshrelay.store import migrations
from meshrelay.store.sqlite import DB_NAME

#: pages (of 4 KiB) copied per backup step: 4 MiB
STEP_PAGES = 1024
#: the files SQLite keeps beside a database
SIDE_FILES = ("-wal", "-shm", "-journal")

#: ``run(sql, params) -> rows``: one statement on an open connection (``?`` placeholders)
Run = Callable[[str, Sequence[Any]], list[tuple[Any, ...]]]


class BackupError(Exception):
    """The backup or restore cannot go on; ``str(e)`` is one line."""


@dataclass(frozen=True)
class StoreSummary:
    """What a store holds, read from one snapshot and checked against its counters."""

    feed_id: str
    schema_version: int
    envelopes: int
    acks: int
    tombstones: int
    policies: int
    #: the accounted bytes (envelopes, signed acks, tombstones), as the store counts them
    stored_bytes: int
    #: the last ``seq`` the store handed out
    last_seq: int
    #: ``integrity_check`` or ``quick_check`` (SQLite), ``counters`` (PostgreSQL)
    checked: str

    def describe(self) -> str:
        return (
            f"{self.envelopes} envelopes, {self.acks} acks, {self.tombstones} tombstones, "
            f"{self.policies} policies, {self.stored_bytes} bytes stored, last seq {self.last_seq}"
        )


@dataclass(frozen=True)
class BackupReport:
    path: str
    summary: StoreSummary
    #: size of the backup file
    file_bytes: int
    #: steps the copy took (each at most ``step_pages`` pages)
    steps: int
    seconds: float


@dataclass(frozen=True)
class RestoreReport:
    #: the restored database file (SQLite) or where the PostgreSQL store is
    path: str
    summary: StoreSummary
    old_feed_id: str
    new_feed_id: str


# --------------------------------------------------------------------------- checks


def summarize(run: Run, checked: str, dialect: str) -> StoreSummary:
    """Read a store's meta and row counts and check that they agree; raises :class:`BackupError`.

    In one consistent snapshot the counters the writer keeps in ``meta`` match
    the rows exactly (they are updated in the same transaction): a mismatch
    means a torn or damaged copy.
    """
    try:
        meta: dict[str, str] = {str(k): str(v) for k, v in run("SELECT key, value FROM meta", ())}
    except Exception as e:  # sqlite3.Error or psycopg.Error: no meta table at all
        raise BackupError(f"not a meshrelay store ({_one_line(e)})") from None
    if "schema_version" not in meta or not meta.get("feed_id"):
        raise BackupError("not a meshrelay store (no schema_version or feed_id in meta)")
    try:
        version = int(meta["schema_version"])
        counters = {key: int(meta[key]) for key in migrations.COUNTER_KEYS}
    except (KeyError, ValueError) as e:
        raise BackupError(f"damaged store: meta is missing or garbles {e}") from None
    if version > migrations.LATEST_VERSION:
        raise BackupError(
            f"the store has schema version {version}, newer than this meshrelay knows "
            f"({migrations.LATEST_VERSION}); use the meshrelay that made it"
        )
    sized = version >= 4
    ((envelopes, env_bytes, env_top),) = run(
        "SELECT COUNT(*), COALESCE(SUM(size), 0), COALESCE(MAX(seq), 0) FROM envelopes", ()
    )
    ((acks, ack_bytes, ack_top),) = run(
        f"SELECT COUNT(*), {'COALESCE(SUM(size), 0)' if sized else '0'}, COALESCE(MAX(seq), 0) FROM acks", ()
    )
    ((tombstones,),) = run("SELECT COUNT(*) FROM tombstones", ())
    policies = 0
    if version >= migrations.FIRST_CONTACT_VERSION:
        ((policies,),) = run("SELECT COUNT(*) FROM policies", ())
    problems = []
    if counters["stored_count"] != envelopes:
        problems.append(f"stored_count {counters['stored_count']} but {envelopes} envelope rows")
    if counters["last_seq"] < max(env_top, ack_top):
        problems.append(f"last_seq {counters['last_seq']} but a row has seq {max(env_top, ack_top)}")
    # a tombstone counts as the schema (and backend) that made the store counted it
    accounted = int(env_bytes) + int(ack_bytes) + migrations.tombstone_bytes(version, dialect) * int(tombstones)
    if sized and counters["stored_bytes"] != accounted:
        problems.append(f"stored_bytes {counters['stored_bytes']} but the rows account for {accounted}")
    if problems:
        raise BackupError("the store's counters disagree with its rows (a torn copy?): " + "; ".join(problems))
    return StoreSummary(
        feed_id=meta["feed_id"],
        schema_version=version,
        envelopes=int(envelopes),
        acks=int(acks),
        tombstones=int(tombstones),
        policies=int(policies),
        stored_bytes=counters["stored_bytes"],
        last_seq=counters["last_seq"],
        checked=checked,
    )


def verify(conn: sqlite3.Connection, quick: bool = False) -> StoreSummary:
    """SQLite's own check of every page and index (``quick_check`` with ``quick``), then :func:`summarize`."""
    pragma = "quick_check" if quick else "integrity_check"
    try:
        rows = conn.execute(f"PRAGMA {pragma}").fetchall()
    except sqlite3.DatabaseError as e:
        raise BackupError(f"not a usable SQLite database ({pragma}: {e})") from None
    if [tuple(r) for r in rows] != [("ok",)]:
        first = "; ".join(str(r[0]) for r in rows[:3])
        raise BackupError(f"{pragma} failed: {first}")
    return summarize(_sqlite_run(conn), pragma, "sqlite")


def _sqlite_run(conn: sqlite3.Connection) -> Run:
    def run(query: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in conn.execute(query, tuple(params)).fetchall()]

    return run


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# --------------------------------------------------------------------------- feed identity


def renew_feed_identity(run: Run, now: float) -> tuple[str, str]:
    """Give a store a new feed id and move its policy feed ahead; returns ``(old, new)`` feed ids.

    Run it inside one transaction, before any node opens the restored store.
    The old id is kept in ``meta.restored_from`` (and the time in
    ``restored_at``), for the operator.
    """
    rows = run("SELECT value FROM meta WHERE key = 'feed_id'", ())
    old = str(rows[0][0]) if rows else ""
    new = secrets.token_hex(16)
    while new == old:  # pragma: no cover - 128 random bits
        new = secrets.token_hex(16)
    for key, value in (("feed_id", new), ("restored_from", old), ("restored_at", str(int(now)))):
        run(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )
    version = int(run("SELECT value FROM meta WHERE key = 'schema_version'", ())[0][0])
    if version >= migrations.FIRST_CONTACT_VERSION:
        ((low, high),) = run("SELECT MIN(pseq), MAX(pseq) FROM policies", ())
        if low is not None:
            # Above every pseq the lost store handed out: it counted up by one per policy write from
            # below its own restore time (or from 0), far fewer than a microsecond each.  Every new
            # value is above every old one, so no row meets another's old value on the way.
            base = max(int(now * 1_000_000), int(high))
            run("UPDATE policies SET pseq = pseq + ?", (base - int(low) + 1,))
    return old, new


# --------------------------------------------------------------------------- SQLite backup


def _open_source(data_dir: str) -> sqlite3.Connection:
    path = os.path.join(data_dir, DB_NAME)
    if not os.path.isfile(path):
        raise BackupError(f"no meshrelay store at {path}")
    try:
        # mode=rw: never create a database where none is
        conn = sqlite3.connect(f"file:{_uri_path(path)}?mode=rw", uri=True, isolation_level=None, timeout=30.0)
        conn.execute("PRAGMA query_only=1")
    except sqlite3.Error as e:
        raise BackupError(f"cannot open {path}: {e}") from None
    return conn


def _uri_path(path: str) -> str:
    from urllib.parse import quote

    return quote(os.path.abspath(path))


def _fsync(path: str) -> None:
    """Flush a file, or a directory's entries (a rename in it), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _discard(path: str) -> None:
    for suffix in ("", *SIDE_FILES):
        try:
            os.unlink(path + suffix)
        except FileNotFoundError:
            pass


@contextlib.contextmanager
def _discarded_on_failure(tmp: str, what: str) -> Iterator[None]:
    """Remove the half-written ``tmp`` when the body fails; SQLite and OS errors become one-line BackupErrors."""
    try:
        yield
    except sqlite3.Error as e:
        _discard(tmp)
        raise BackupError(f"{what} failed: {e}") from None
    except OSError as e:
        _discard(tmp)
        raise BackupError(f"{what} failed: {e.strerror or e}") from None
    except BaseException:
        _discard(tmp)
        raise


def backup_sqlite(
    data_dir: str,
    out: str,
    *,
    force: bool = False,
    step_pages: int = STEP_PAGES,
    quick: bool = False,
    progress: Callable[[int, int], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> BackupReport:
    """Copy the store in ``data_dir`` to the file ``out`` (0600) while it serves; verify the copy.

    ``progress(remaining, total)`` (pages) is called after each step, while
    the snapshot is held (a test seam, and the command's progress).  Refuses
    an existing ``out`` unless ``force``.
    """
    if step_pages < 1:
        raise BackupError("step_pages must be at least 1")
    out = os.path.abspath(os.path.expanduser(out))
    if os.path.isdir(out):
        raise BackupError(f"{out} is a directory; give the backup file's name")
    if os.path.lexists(out) and not force:
        raise BackupError(f"{out} already exists (use --force to replace it)")
    directory = os.path.dirname(out)
    if os.path.realpath(directory) == os.path.realpath(data_dir):
        raise BackupError("write the backup outside the data directory")
    started = clock()
    src = _open_source(data_dir)
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".meshrelay-backup-", suffix=".sqlite3", dir=directory)
    except OSError as e:
        src.close()
        raise BackupError(f"cannot write in {directory}: {e.strerror or e}") from None
    os.fchmod(fd, PRIVATE_FILE)
    os.close(fd)
    steps = 0
    try:
        with _discarded_on_failure(tmp, "backup"):
            dst = sqlite3.connect(tmp, isolation_level=None)
            try:
                # One snapshot for the whole copy (see the module docstring): BEGIN
                # alone takes none, the first read does.
                src.execute("BEGIN")
                src.execute("SELECT COUNT(*) FROM meta").fetchone()

                def step(status: int, remaining: int, total: int) -> None:
                    nonlocal steps
                    steps += 1
                    if progress is not None:
                        progress(remaining, total)

                src.backup(dst, pages=step_pages, progress=step)
                src.execute("COMMIT")
                # A file of its own: no -wal beside it is needed to read it.
                dst.execute("PRAGMA journal_mode=DELETE").fetchone()
                summary = verify(dst, quick)
            finally:
                dst.close()
            private_file(tmp)
            _fsync(tmp)
            if force:
                os.replace(tmp, out)
            else:
                try:
                    os.link(tmp, out)
                except FileExistsError:
                    raise BackupError(f"{out} already exists (use --force to replace it)") from None
                os.unlink(tmp)
            _fsync(directory)
    finally:
        src.close()
    return BackupReport(out, summary, os.path.getsize(out), steps, clock() - started)


# --------------------------------------------------------------------------- SQLite restore


def check_backup(path: str, quick: bool = False) -> StoreSummary:
    """Verify a backup file, read-only (``meshrelay restore BACKUP --check``)."""
    path = os.path.abspath(os.path.expanduser(path))
    _check_backup_file(path)
    try:
        conn = sqlite3.connect(f"file:{_uri_path(path)}?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error as e:
        raise BackupError(f"cannot open {path}: {e}") from None
    try:
        return verify(conn, quick)
    except sqlite3.Error as e:
        raise BackupError(f"cannot read {path}: {e}") from None
    finally:
        conn.close()


def _check_backup_file(path: str) -> None:
    if not os.path.isfile(path):
        raise BackupError(f"no backup file at {path}")
    if os.path.exists(path + "-wal"):
        raise BackupError(
            f"{path}-wal exists: {path} is a live database, not a finished backup (make one with meshrelay backup)"
        )


def _store_in_use(path: str) -> bool:
    """Whether some connection (a running node, its writer process) has the SQLite store open.

    Taking SQLite's exclusive locking mode fails while any other connection
    has a WAL database open, even an idle one.
    """
    conn = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        conn.execute("BEGIN EXCLUSIVE")
        conn.execute("COMMIT")
        return False
    except sqlite3.Error as e:
        # Anything but "busy" (a damaged file, say) is not a sign of use: it is about to be replaced.
        return getattr(e, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    finally:
        conn.close()


def restore_sqlite(
    backup: str, data_dir: str, *, force: bool = False, quick: bool = False, now: float | None = None
) -> RestoreReport:
    """Make ``data_dir`` hold the store in ``backup``, with a new feed identity; verified.

    ``data_dir`` must be missing or empty, or (``force``) hold a store no
    process has open, which is replaced.
    """
    backup = os.path.abspath(os.path.expanduser(backup))
    _check_backup_file(backup)
    data_dir = os.path.abspath(os.path.expanduser(data_dir))
    target = os.path.join(data_dir, DB_NAME)
    if os.path.exists(data_dir):
        if not os.path.isdir(data_dir):
            raise BackupError(f"{data_dir} is not a directory")
        if os.listdir(data_dir) and not force:
            raise BackupError(f"{data_dir} is not empty (use --force to replace the store in it)")
        if os.path.exists(target) and _store_in_use(target):
            raise BackupError(f"the store in {data_dir} is open in another process: stop the node first")
    try:
        private_dir(data_dir)
        fd, tmp = tempfile.mkstemp(prefix=".meshrelay-restore-", suffix=".sqlite3", dir=data_dir)
    except OSError as e:
        raise BackupError(f"cannot write in {data_dir}: {e.strerror or e}") from None
    os.fchmod(fd, PRIVATE_FILE)
    os.close(fd)
    when = time.time() if now is None else now
    with _discarded_on_failure(tmp, "restore"):
        shutil.copyfile(backup, tmp)
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            before = verify(conn, quick)
            conn.execute("BEGIN IMMEDIATE")
            old, new = renew_feed_identity(_sqlite_run(conn), when)
            conn.execute("COMMIT")
            # The mode the node runs in; set now, so the file the node opens is already a WAL database.
            conn.execute("PRAGMA journal_mode=WAL").fetchone()
            after = summarize(_sqlite_run(conn), before.checked, "sqlite")
        finally:
            conn.close()
        private_file(tmp)
        _fsync(tmp)
        # A -wal left by the replaced store would be replayed into the new file: remove it first.
        for suffix in SIDE_FILES:
            try:
                os.unlink(target + suffix)
            except FileNotFoundError:
                pass
        os.replace(tmp, target)
        _fsync(data_dir)
    return RestoreReport(target, after, old, new)


# --------------------------------------------------------------------------- PostgreSQL


def restore_postgres(dsn: str, *, now: float | None = None) -> RestoreReport:
    """Finish a ``pg_restore``: verify the restored schema (counters against rows) and renew its feed identity.

    Also forgets the sync leases of the processes that held them.

    Run it with every meshrelay process of that store stopped (they read the
    feed id when they start).
    """
    import psycopg

    from meshrelay.store.postgres import connect, describe

    where = describe(dsn)
    try:
        conn = connect(dsn, "restore", autocommit=False)
    except psycopg.Error as e:
        raise BackupError(f"cannot connect to PostgreSQL at {where}: {_one_line(e)}") from None

    def run(query: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        cur = conn.execute(query.replace("?", "%s"), tuple(params))
        return [tuple(r) for r in cur.fetchall()] if cur.description else []

    try:
        with conn.transaction():
            # No process may write while the identity changes (a running one waits, or this does).
            try:
                run("LOCK TABLE meta IN EXCLUSIVE MODE", ())
            except psycopg.errors.UndefinedTable:
                raise BackupError(f"no meshrelay store at {where} (no meta table: did pg_restore run?)") from None
            summarize(run, "counters", "postgresql")
            old, new = renew_feed_identity(run, time.time() if now is None else now)
            # Held by processes of the lost store: nobody renews them, so they would only delay the
            # new processes' sync runs until they expire.
            run("DELETE FROM leases", ())
            after = summarize(run, "counters", "postgresql")
    except psycopg.Error as e:
        raise BackupError(f"restore failed at {where}: {_one_line(e)}") from None
    finally:
        conn.close()
    return RestoreReport(where, after, old, new)
