"""Versioned schema migrations: one list, rendered for each SQL dialect.

Each migration is a list of statements written once, with ``{placeholders}``
for the few spellings that differ between SQLite and PostgreSQL.  A store
applies, in one transaction each, every migration above the version recorded
in its ``meta`` table.  Never edit a released migration: append a new one.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

DIALECTS: dict[str, dict[str, str]] = {
    "sqlite": {
        "bigint": "INTEGER",
        "without_rowid": " WITHOUT ROWID",
    },
    "postgresql": {
        "bigint": "BIGINT",
        "without_rowid": "",
    },
}


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]

    def render(self, dialect: str) -> list[str]:
        subst = DIALECTS[dialect]
        return [s.format(**subst) for s in self.statements]


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
    ),
)

#: meta rows that hold the store's counters (the feed position and the stored totals)
COUNTER_KEYS = ("last_seq", "stored_count", "stored_bytes")


def seed_meta(version: int) -> dict[str, str]:
    """The ``meta`` rows a migration creates along with its tables (both dialects)."""
    if version == 1:
        return {"feed_id": secrets.token_hex(16), **{key: "0" for key in COUNTER_KEYS}}
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
