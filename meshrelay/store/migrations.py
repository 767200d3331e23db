"""Versioned schema migrations: one list, rendered for each SQL dialect.

Each migration is a list of statements written once, with ``{placeholders}``
for the few spellings that differ between SQLite and PostgreSQL.  A store
applies, in one transaction each, every migration above the version recorded
in its ``meta`` table.  Never edit a released migration: append a new one.
"""

from __future__ import annotations

import functools
import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

#: the SQL function a SQLite connection registers (``tombstone_key``) to compute a tombstone's key in SQL
SQLITE_TOMBSTONE_KEY = "meshrelay_tombstone_key"

#: bytes of a tombstone's key (``tombstone_key``)
TOMBSTONE_KEY_BYTES = 16

#: bytes a tombstone was accounted for at schema 4 and 5, on both backends (migration 4 counted existing ones so)
TOMBSTONE_BYTES_V4 = 300
#: bytes a tombstone is accounted for from schema 6 on, per backend: its row and its index entries on
#: disk once sweeps and new acks have turned the pages over (``bench/stored_form.py --churn``: about
#: 66 on SQLite, 150 on PostgreSQL with vacuum keeping up), rounded up (docs/benchmarks.md).
#: PostgreSQL's 24-byte tuple header and its index entries' alignment cost it about twice SQLite's.
TOMBSTONE_BYTES_V6 = {"sqlite": 72, "postgresql": 160}
#: the migration that keys tombstones by ``tombstone_key``
COMPACT_TOMBSTONES_VERSION = 6
#: the migration after which a SQLite store has one envelope index per mailbox (with the sender)
MAILBOX_INDEX_VERSION = 7
#: the version after which a SQLite store's tombstones include the ids listed in a mailbox's oldest
#: ack when it is junk (a mailbox's first ack that deleted nothing writes no tombstone rows)
COMPACT_JUNK_ACK_VERSION = 8

DIALECTS: dict[str, dict[str, str]] = {
    "sqlite": {
        "bigint": "INTEGER",
        "smallint": "INTEGER",
        "blob": "BLOB",
        "without_rowid": " WITHOUT ROWID",
        "octets": "length(CAST(body AS BLOB))",
        "tombstone_key": f"{SQLITE_TOMBSTONE_KEY}(mailbox, msg_id)",
        "tombstone_bytes_v6": str(TOMBSTONE_BYTES_V6["sqlite"]),
    },
    "postgresql": {
        "bigint": "BIGINT",
        "smallint": "SMALLINT",
        "blob": "BYTEA",
        "without_rowid": "",
        "octets": "octet_length(body)",
        # the same bytes as tombstone_key(): 4 bytes of SHA-256 of the mailbox, then 12 of SHA-256 of
        # the mailbox's UTF-8 length (4 bytes, big-endian), the mailbox and the msg_id
        "tombstone_key": "substring(sha256(convert_to(mailbox, 'UTF8')) FROM 1 FOR 4) "
        "|| substring(sha256(int4send(octet_length(convert_to(mailbox, 'UTF8'))) "
        "|| convert_to(mailbox, 'UTF8') || convert_to(msg_id, 'UTF8')) FROM 1 FOR 12)",
        "tombstone_bytes_v6": str(TOMBSTONE_BYTES_V6["postgresql"]),
    },
}


def tombstone_key(mailbox: str, msg_id: str) -> bytes:
    """The stored key of the tombstone of ``(mailbox, msg_id)`` (schema 6): 16 bytes.

    4 bytes of SHA-256 of the mailbox, then 12 of SHA-256 of the pair (the
    mailbox's length first, so no two pairs share an input).  The mailbox
    prefix keeps one ack's tombstones side by side in the table's B-tree: a
    500-id ack writes a few pages, not one page per id.  The pair part alone
    must match for an ack id of another mailbox (whose prefix an attacker can
    grind keys for) to stop a message: about 2**96 / (that mailbox's
    tombstones) hashes.  Text that is not valid UTF-8 (a lone surrogate) is
    hashed as Python's ``surrogatepass`` encodes it: such a pair is never
    stored, so it matches nothing.
    """
    return tombstone_keys(mailbox, [msg_id])[0]


@functools.lru_cache(maxsize=4096)
def _mailbox_part(mailbox: str) -> tuple[bytes, Any]:
    """A mailbox's key prefix and its SHA-256 state for the pair part (copied, never updated, by callers).

    Remembered for recent mailboxes: a writer adding a page of replicas, or a
    puller checking an ids page, computes keys one id at a time, and hashing
    the mailbox twice per id was most of that cost (4,096 mailboxes, about
    1 MB at most).
    """
    mb = mailbox.encode("utf-8", "surrogatepass")
    return hashlib.sha256(mb).digest()[:4], hashlib.sha256(len(mb).to_bytes(4, "big") + mb)


#: bytes of a tombstone key that depend on the mailbox alone (``tombstone_key``)
TOMBSTONE_PREFIX_BYTES = 4


def tombstone_prefix(mailbox: str) -> bytes:
    """The first ``TOMBSTONE_PREFIX_BYTES`` of every tombstone key of ``mailbox``."""
    return _mailbox_part(mailbox)[0]


def tombstone_keys(mailbox: str, msg_ids: list[str]) -> list[bytes]:
    """``[tombstone_key(mailbox, m) for m in msg_ids]``, hashing the mailbox's part once (an ack's ids share it)."""
    head, pair = _mailbox_part(mailbox)
    out = []
    for msg_id in msg_ids:
        h = pair.copy()
        h.update(msg_id.encode("utf-8", "surrogatepass"))
        out.append(head + h.digest()[: TOMBSTONE_KEY_BYTES - 4])
    return out


#: the migration that adds first contact's tables (after the store's own migrations)
FIRST_CONTACT_VERSION = 5


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]
    #: (dialect, statement) pairs run only on that dialect, after the common ones, verbatim
    only: tuple[tuple[str, str], ...] = ()

    def render(self, dialect: str) -> list[str]:
        subst = DIALECTS[dialect]
        return [s.format(**subst) for s in self.statements] + [s for d, s in self.only if d == dialect]


#: PostgreSQL: the serial end of a write batch, run by the server in one call so that the
#: sequence lock is never held across a round trip to a (possibly busy) meshrelay process.
#: Locks the counter rows (the sequence lock), applies the storage cap in operation order,
#: numbers the new rows, inserts them, updates the counters and NOTIFYs the mailboxes that got
#: mail.  ``kinds`` has one letter per new row in operation order: ``e`` an envelope, ``d`` an
#: envelope acked within its own batch (numbered, not stored), ``a`` an ack.  Returns
#: ``[last_seq, stored_count, stored_bytes, microseconds the lock was held, seq of each row
#: (0: refused, storage full)...]``.  Tables resolve through the caller's search_path.
COMMIT_ROWS_V1 = """
CREATE OR REPLACE FUNCTION meshrelay_commit_rows(
    kinds TEXT,
    e_msg_id TEXT[], e_mailbox TEXT[], e_sender TEXT[], e_expires BIGINT[], e_size BIGINT[], e_body TEXT[],
    a_mailbox TEXT[], a_nonce TEXT[], a_expires BIGINT[], a_body TEXT[],
    d_count BIGINT, d_bytes BIGINT, max_bytes BIGINT, channel TEXT
) RETURNS BIGINT[] LANGUAGE plpgsql AS $fn$
DECLARE
    locked_at TIMESTAMPTZ;
    v_seq BIGINT;
    v_count BIGINT;
    v_bytes BIGINT;
    seqs BIGINT[] := ARRAY[]::BIGINT[];
    env_seq BIGINT[] := ARRAY[]::BIGINT[];
    env_idx INT[] := ARRAY[]::INT[];
    ack_seq BIGINT[] := ARRAY[]::BIGINT[];
    ei INT := 0;
    k TEXT;
BEGIN
    PERFORM 1 FROM meta WHERE key IN ('last_seq', 'stored_bytes', 'stored_count') ORDER BY key FOR UPDATE;
    locked_at := clock_timestamp();
    SELECT value::BIGINT INTO v_seq FROM meta WHERE key = 'last_seq';
    SELECT value::BIGINT + d_count INTO v_count FROM meta WHERE key = 'stored_count';
    SELECT value::BIGINT + d_bytes INTO v_bytes FROM meta WHERE key = 'stored_bytes';
    FOR n IN 1 .. length(kinds) LOOP
        k := substr(kinds, n, 1);
        IF k = 'a' THEN
            v_seq := v_seq + 1;
            ack_seq := ack_seq || v_seq;
            seqs := seqs || v_seq;
        ELSE
            ei := ei + 1;
            IF k = 'd' THEN
                v_seq := v_seq + 1;
                seqs := seqs || v_seq;
            ELSIF v_bytes + e_size[ei] > max_bytes THEN
                seqs := seqs || 0::BIGINT;
            ELSE
                v_seq := v_seq + 1;
                v_count := v_count + 1;
                v_bytes := v_bytes + e_size[ei];
                env_seq := env_seq || v_seq;
                env_idx := env_idx || ei;
                seqs := seqs || v_seq;
            END IF;
        END IF;
    END LOOP;
    INSERT INTO envelopes (seq, msg_id, mailbox, sender, expires, size, body)
        SELECT t.s, e_msg_id[t.ix], e_mailbox[t.ix], e_sender[t.ix], e_expires[t.ix], e_size[t.ix], e_body[t.ix]
        FROM unnest(env_seq, env_idx) AS t(s, ix);
    INSERT INTO acks (seq, mailbox, nonce, expires, body)
        SELECT * FROM unnest(ack_seq, a_mailbox, a_nonce, a_expires, a_body);
    UPDATE meta SET value = (CASE key WHEN 'last_seq' THEN v_seq WHEN 'stored_count' THEN v_count ELSE v_bytes END)::TEXT
        WHERE key IN ('last_seq', 'stored_count', 'stored_bytes');
    -- mailboxes are 43 characters: 150 of them stay under NOTIFY's 8000-byte payload limit
    PERFORM pg_notify(channel, string_agg(d.m, ','))
        FROM (SELECT u.m, (row_number() OVER () - 1) / 150 AS g
              FROM (SELECT DISTINCT e_mailbox[x.ix] AS m FROM unnest(env_idx) AS x(ix)) AS u) AS d
        GROUP BY d.g;
    RETURN ARRAY[v_seq, v_count, v_bytes, (extract(epoch FROM clock_timestamp() - locked_at) * 1000000)::BIGINT]
        || seqs;
END
$fn$
"""

#: migration 4's version of the PostgreSQL serial end: acks are inserted with their size and junk flag
#: (two more arrays); an overload, so migration 2's function is left as released
COMMIT_ROWS_V2 = COMMIT_ROWS_V1.replace(
    "a_mailbox TEXT[], a_nonce TEXT[], a_expires BIGINT[], a_body TEXT[],",
    "a_mailbox TEXT[], a_nonce TEXT[], a_expires BIGINT[], a_body TEXT[], a_size BIGINT[], a_junk BIGINT[],",
).replace(
    "INSERT INTO acks (seq, mailbox, nonce, expires, body)\n        SELECT * FROM unnest(ack_seq, a_mailbox, a_nonce, a_expires, a_body);",
    "INSERT INTO acks (seq, mailbox, nonce, expires, body, size, junk)\n"
    "        SELECT * FROM unnest(ack_seq, a_mailbox, a_nonce, a_expires, a_body, a_size, a_junk);",
)


def tombstone_bytes(version: int, dialect: str) -> int:
    """Bytes per tombstone in ``stored_bytes`` of a ``dialect`` store at schema ``version`` (0 before schema 4)."""
    if version < 4:
        return 0
    return TOMBSTONE_BYTES_V4 if version < COMPACT_TOMBSTONES_VERSION else TOMBSTONE_BYTES_V6[dialect]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "envelopes, acks, tombstones, nonces, cursors",
        (
            # meta holds schema_version, feed_id, last_seq, stored_count, stored_bytes
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
            # seq is the node's local arrival order, shared by envelopes and acks
            """CREATE TABLE envelopes (
                seq {bigint} PRIMARY KEY,
                msg_id TEXT NOT NULL UNIQUE,
                mailbox TEXT NOT NULL,
                sender TEXT NOT NULL,
                expires {bigint} NOT NULL,
                size {bigint} NOT NULL,
                body TEXT NOT NULL
            )""",
            "CREATE INDEX envelopes_by_mailbox ON envelopes (mailbox, seq, expires)",
            "CREATE INDEX envelopes_by_sender ON envelopes (mailbox, sender, expires)",
            "CREATE INDEX envelopes_by_expiry ON envelopes (expires)",
            """CREATE TABLE acks (
                seq {bigint} PRIMARY KEY,
                mailbox TEXT NOT NULL,
                nonce TEXT NOT NULL,
                expires {bigint} NOT NULL,
                body TEXT NOT NULL,
                UNIQUE (mailbox, nonce)
            )""",
            "CREATE INDEX acks_by_mailbox ON acks (mailbox, seq)",
            "CREATE INDEX acks_by_expiry ON acks (expires)",
            """CREATE TABLE tombstones (
                mailbox TEXT NOT NULL,
                msg_id TEXT NOT NULL,
                expires {bigint} NOT NULL,
                PRIMARY KEY (mailbox, msg_id)
            ){without_rowid}""",
            "CREATE INDEX tombstones_by_expiry ON tombstones (expires)",
            """CREATE TABLE nonces (
                scope TEXT NOT NULL,
                nonce TEXT NOT NULL,
                expires {bigint} NOT NULL,
                PRIMARY KEY (scope, nonce)
            ){without_rowid}""",
            "CREATE INDEX nonces_by_expiry ON nonces (expires)",
            """CREATE TABLE peer_cursors (
                peer TEXT PRIMARY KEY,
                feed_id TEXT NOT NULL,
                since {bigint} NOT NULL,
                synced_at DOUBLE PRECISION NOT NULL
            )""",
        ),
    ),
    Migration(
        2,
        "leases: one holder per named job across processes sharing a store",
        (
            # expires is Unix time of the database's clock (PostgreSQL) so that
            # processes on several machines agree on when a lease runs out.
            """CREATE TABLE leases (
                name TEXT PRIMARY KEY,
                holder TEXT NOT NULL,
                expires DOUBLE PRECISION NOT NULL
            )""",
        ),
        only=(("postgresql", COMMIT_ROWS_V1),),
    ),
    Migration(
        3,
        "refused: replicas refused at a cap, to obtain again when space frees",
        (
            # expires is the envelope's own expiry; reason is sender_cap, mailbox_full or storage_full;
            # at is the refusal's order (oldest first), unique within the table
            """CREATE TABLE refused (
                msg_id TEXT NOT NULL,
                peer TEXT NOT NULL,
                mailbox TEXT NOT NULL,
                expires {bigint} NOT NULL,
                reason TEXT NOT NULL,
                at {bigint} NOT NULL,
                PRIMARY KEY (msg_id, peer)
            ){without_rowid}""",
            "CREATE INDEX refused_by_mailbox ON refused (mailbox, at)",
            "CREATE INDEX refused_by_peer ON refused (peer, mailbox)",
            "CREATE INDEX refused_by_expiry ON refused (expires)",
            "CREATE INDEX refused_by_age ON refused (at)",
        ),
    ),
    Migration(
        4,
        "acks and tombstones are storage: sizes, junk flags, and a stored total that counts them",
        (
            # size: UTF-8 bytes of the body; junk: 1 when the ack deleted nothing here (it counts
            # toward the junk budget).  Acks and tombstones made before this migration are not junk.
            "ALTER TABLE acks ADD COLUMN size {bigint} NOT NULL DEFAULT 0",
            "ALTER TABLE acks ADD COLUMN junk {bigint} NOT NULL DEFAULT 0",
            "UPDATE acks SET size = {octets}",
            # junk: 1 for a tombstone of an id never held here
            "ALTER TABLE tombstones ADD COLUMN junk {bigint} NOT NULL DEFAULT 0",
            # stored_bytes now counts envelopes, acks and tombstones
            "UPDATE meta SET value = CAST((SELECT COALESCE(SUM(size), 0) FROM envelopes) "
            "+ (SELECT COALESCE(SUM(size), 0) FROM acks) "
            f"+ {TOMBSTONE_BYTES_V4} * (SELECT COUNT(*) FROM tombstones) AS TEXT) WHERE key = 'stored_bytes'",
        ),
        only=(("postgresql", COMMIT_ROWS_V2),),
    ),
    Migration(
        FIRST_CONTACT_VERSION,
        "first contact (protocol v3): mailbox policies and the contact bucket",
        (
            # the newest policy of each mailbox; pseq orders the policy feed (peers pull it by pseq)
            """CREATE TABLE policies (
                mailbox TEXT PRIMARY KEY,
                version {bigint} NOT NULL,
                policy_id TEXT NOT NULL,
                pseq {bigint} NOT NULL UNIQUE,
                body TEXT NOT NULL
            )""",
            # envelopes admitted as contact mail (a valid permit); every other envelope is stranger mail.
            # A row may outlive its envelope (acked): counts join envelopes, the sweeper drops expired rows.
            """CREATE TABLE contacts (
                msg_id TEXT PRIMARY KEY,
                mailbox TEXT NOT NULL,
                expires {bigint} NOT NULL
            ){without_rowid}""",
            "CREATE INDEX contacts_by_mailbox ON contacts (mailbox, expires)",
            "CREATE INDEX contacts_by_expiry ON contacts (expires)",
        ),
    ),
    Migration(
        COMPACT_TOMBSTONES_VERSION,
        "compact tombstones: keyed by 16 bytes (tombstone_key) of (mailbox, msg_id), not by the two texts",
        (
            # Nothing ever lists the ids of tombstones: every use asks about a (mailbox, msg_id) it
            # already has, so the key need not be reversible.  In this column order PostgreSQL pads
            # nothing (the 17-byte short bytea, the smallint, then the bigint at offset 48).
            """CREATE TABLE tombstones_v6 (
                digest {blob} NOT NULL PRIMARY KEY,
                junk {smallint} NOT NULL DEFAULT 0,
                expires {bigint} NOT NULL
            ){without_rowid}""",
            # two pairs with one key (a chance of 2**-96 per two pairs of one mailbox) keep one tombstone
            "INSERT INTO tombstones_v6 (digest, expires, junk) "
            "SELECT {tombstone_key}, MAX(expires), MIN(junk) FROM tombstones GROUP BY 1",
            "DROP TABLE tombstones",
            "ALTER TABLE tombstones_v6 RENAME TO tombstones",
            "CREATE INDEX tombstones_by_expiry ON tombstones (expires)",
            # stored_bytes and junk_bytes count a tombstone at its new size
            "UPDATE meta SET value = CAST((SELECT COALESCE(SUM(size), 0) FROM envelopes) "
            "+ (SELECT COALESCE(SUM(size), 0) FROM acks) "
            "+ {tombstone_bytes_v6} * (SELECT COUNT(*) FROM tombstones) AS TEXT) WHERE key = 'stored_bytes'",
            "UPDATE meta SET value = CAST((SELECT COALESCE(SUM(size * junk), 0) FROM acks) "
            "+ {tombstone_bytes_v6} * (SELECT COALESCE(SUM(junk), 0) FROM tombstones) AS TEXT) "
            "WHERE key = 'junk_bytes'",
        ),
        only=(("postgresql", "ALTER INDEX tombstones_v6_pkey RENAME TO tombstones_pkey"),),
    ),
    Migration(
        MAILBOX_INDEX_VERSION,
        "SQLite: one index per mailbox, holding the sender; the (mailbox, sender) index is dropped",
        (),
        # A deposit counts its mailbox's live envelopes anyway (a scan of the mailbox's index
        # entries): with the sender in those entries the same scan counts the sender's too, and
        # every insert updates three B-trees keyed at random instead of four (about 1 WAL page
        # per envelope less at each commit; docs/benchmarks.md, tenth session).  PostgreSQL keeps
        # its two indexes: its write path was not measured with one.
        only=(
            ("sqlite", "DROP INDEX envelopes_by_sender"),
            ("sqlite", "DROP INDEX envelopes_by_mailbox"),
            ("sqlite", "CREATE INDEX envelopes_by_mailbox ON envelopes (mailbox, seq, expires, sender)"),
        ),
    ),
    Migration(
        COMPACT_JUNK_ACK_VERSION,
        "SQLite: a mailbox's first junk ack keeps its ids in its own row, without tombstone rows",
        (),
        # No table changes: the rows of schema 7 keep their meaning, and the deposit check of
        # schema 8 reads a mailbox's oldest junk ack as well (``sqlite_core._ADD_CHECKS``).  The
        # version only stops an older meshrelay, whose check does not, from opening such a store
        # and letting through a message acked by such an ack.  PostgreSQL is unchanged.
    ),
)

#: meta rows that hold the store's counters (the feed position and the stored totals)
COUNTER_KEYS = ("last_seq", "stored_count", "stored_bytes")


def seed_meta(version: int) -> dict[str, str]:
    """The ``meta`` rows a migration creates along with its tables (both dialects)."""
    if version == 1:
        return {"feed_id": secrets.token_hex(16), **{key: "0" for key in COUNTER_KEYS}}
    if version == 4:
        return {"junk_bytes": "0"}
    return {}


LATEST_VERSION = MIGRATIONS[-1].version


def pending(current: int) -> list[Migration]:
    """The migrations to apply to a store at schema version ``current``."""
    if current > LATEST_VERSION:
        raise ValueError(
            f"the store has schema version {current}, newer than this meshrelay knows ({LATEST_VERSION}); "
            "upgrade meshrelay"
        )
    return [m for m in MIGRATIONS if m.version > current]
