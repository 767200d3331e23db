"""The storage interface every backend implements, and its result types.

The relay core talks only to :class:`Store`.  Every method that touches disk
returns a Deferred and never blocks the reactor; writes resolve only after
their transaction has committed (:mod:`meshrelay.store.settle` answers a
batch's Deferreds).  A backend raises :class:`StoreError` (or
fails the Deferred with it) when the disk or database fails; the web layer
answers 503 ``unavailable`` and nothing half-written is left behind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from meshrelay.envelope import Envelope, SignedAck
from meshrelay.store.migrations import tombstone_key as tombstone_key

if TYPE_CHECKING:
    # Annotations only: this module is imported by the store writer's child process, which
    # runs without Twisted (``meshrelay.store.sqlite_core``).
    from twisted.internet.defer import Deferred
    from twisted.logger import Logger

#: add_envelope outcomes
ACCEPTED = "accepted"
DUPLICATE = "duplicate"
SENDER_CAP = "sender_cap"
MAILBOX_FULL = "mailbox_full"
STORAGE_FULL = "storage_full"
#: only from a store that checks signatures itself (``Store.verifies_signatures``)
BAD_SIGNATURE = "bad_signature"
#: protocol v3: the mailbox's stranger bucket is full (contact mail is counted apart)
STRANGER_FULL = "stranger_full"
#: protocol v3, only from a store that checks signatures itself: the permit's signature failed
BAD_PERMIT = "bad_permit"

#: put_policy outcomes (protocol v3)
POLICY_ACCEPTED = "accepted"
POLICY_DUPLICATE = "duplicate"
POLICY_STALE = "stale"
#: the store holds ``max_policies`` policies and this one is for a new mailbox
POLICY_FULL = "storage_full"


class StoreError(Exception):
    """The backend could not complete an operation (I/O error, disk full, read-only)."""


def one_line(e: BaseException) -> str:
    """An exception's message on one line (psycopg's span several)."""
    return " ".join(str(e).split()) or type(e).__name__


@dataclass(frozen=True)
class Caps:
    """The bounds a store enforces inside its write transaction."""

    per_sender_pending: int = 8
    per_mailbox_pending: int = 256
    max_stored_bytes: int = 1 << 30
    #: remembered cap refusals of replicas (the ``refused`` table), in all
    max_refused: int = 100000
    #: protocol v3: mailboxes with a stored policy (a policy for one more answers POLICY_FULL)
    max_policies: int = 1000000


@dataclass(frozen=True)
class AddResult:
    status: str
    seq: int = 0
    #: for ``sender_cap``: the sender's pending count and the cap
    pending: int = 0
    limit: int = 0
    #: protocol v3: a duplicate whose stored copy was stranger mail and is now contact mail
    upgraded: bool = False
    #: for a replica refused at a cap with a peer given: whether the refusal was remembered
    remembered: bool | None = None


def bucket_refusal(
    contact: bool, stranger_cap: int | None, in_mailbox: int, count_contacts: Callable[[], int], caps: Caps
) -> AddResult | None:
    """The two buckets of a mailbox (protocol v3, 12.1): the refusal for a new envelope, or None.

    Contact mail is capped by ``per_mailbox_pending`` and stranger mail by the
    policy's ``stranger_cap`` (never above it; ``per_mailbox_pending`` when the
    mailbox has no policy), counted apart, so strangers never take a contact's
    place.  ``count_contacts()`` (live contact envelopes of the mailbox, a
    query) runs only when the mailbox's total reaches a cap, so a mailbox
    below its caps costs nothing more than in v1.
    """
    limit = caps.per_mailbox_pending
    if contact:
        if in_mailbox >= limit:
            contacts = count_contacts()
            if contacts >= limit:
                return AddResult(MAILBOX_FULL, pending=contacts, limit=limit)
        return None
    cap = limit if stranger_cap is None else min(stranger_cap, limit)
    if in_mailbox >= cap:
        strangers = in_mailbox - count_contacts()
        if strangers >= cap:
            # Without a policy the v1 answer: mailbox_full.
            return AddResult(MAILBOX_FULL if stranger_cap is None else STRANGER_FULL, pending=strangers, limit=cap)
    return None


@dataclass(frozen=True)
class AckResult:
    #: msg_ids of this mailbox that were stored and are now deleted
    deleted: tuple[str, ...] = ()
    #: False when this signed ack (mailbox, nonce) was already recorded
    new: bool = True
    seq: int = 0
    #: False when the signed ack was applied but not recorded (it did not fit the storage
    #: cap, or deleted nothing here and did not fit the junk budget): it is not in the feed
    stored: bool = True
    #: ids of mail never held here that got no tombstone (the junk budget was spent)
    skipped: int = 0


@dataclass(frozen=True)
class FeedItem:
    seq: int
    #: "envelope" or "ack"
    kind: str
    #: the canonical JSON text of the envelope or signed ack ("" in an ids-only page)
    body: str
    #: UTF-8 bytes of the canonical JSON body
    size: int = 0
    mailbox: str = ""
    #: envelope: its msg_id; ack: its nonce
    key: str = ""


@dataclass(frozen=True)
class Bodies:
    """What ``bodies`` found: held items in request order, and what the node does not hold.

    An id in neither list was cut by the byte budget (ask again).
    """

    envelopes: list[str] = field(default_factory=list)
    acks: list[str] = field(default_factory=list)
    gone_envelopes: list[str] = field(default_factory=list)
    #: (mailbox, nonce)
    gone_acks: list[tuple[str, str]] = field(default_factory=list)


#: one requested item as a backend found it: (size, body), or None when not held
Found = tuple[int, str] | None


def fill_bodies(
    envelopes: Iterable[tuple[str, Found]], acks: Iterable[tuple[tuple[str, str], Found]], max_bytes: int
) -> Bodies:
    """A ``bodies`` answer from the items in request order (envelopes, then acks), for both backends.

    Held items go in while their sizes stay within ``max_bytes`` (the first one always); once one
    does not fit, the rest are cut (neither returned nor gone). An item not held is gone.
    """
    out = Bodies()
    total = taken = 0
    cut = False

    def take(size: int) -> bool:
        nonlocal total, taken, cut
        if cut or (taken and total + size > max_bytes):
            cut = True
            return False
        total += size
        taken += 1
        return True

    for msg_id, found in envelopes:
        if found is None:
            out.gone_envelopes.append(msg_id)
        elif take(found[0]):
            out.envelopes.append(found[1])
    for key, found in acks:
        if found is None:
            out.gone_acks.append(key)
        elif take(found[0]):
            out.acks.append(found[1])
    return out


@dataclass(frozen=True)
class Refused:
    """A replica refused at a cap, remembered so it can be obtained again when space frees."""

    msg_id: str
    mailbox: str
    #: the peer that offered it
    peer: str
    #: sender_cap, mailbox_full or storage_full
    reason: str
    #: the envelope's own expiry
    expires: int


#: the share of ``max_stored_bytes`` that tombstones of ids never held here and signed acks that
#: deleted nothing here may take in all (anyone with a key pair can create those)
JUNK_SHARE = 8


def junk_budget(caps: Caps, from_peer: bool = False) -> int:
    """Bytes of tombstones of unheld ids and of acks that deleted nothing a store keeps at most.

    Junk brought by a client may fill one share; an ack relayed by an
    authenticated peer may fill a second share on top, which no client can
    reach: a flood of junk acks from throwaway mailboxes at this node cannot
    take away the tombstones of a real message acked at a peer before its
    replica arrives here (docs/protocol-notes.md, "Acks are storage").
    """
    return caps.max_stored_bytes // JUNK_SHARE * (2 if from_peer else 1)


#: add_envelope outcomes that are remembered for a replica offered by a peer
CAP_REFUSALS = frozenset({"sender_cap", "mailbox_full", "storage_full", "stranger_full"})


def cut_page(rows: Sequence[FeedItem], limit: int, max_bytes: int | None) -> tuple[list[FeedItem], bool]:
    """The items of a page: at most ``limit``, and while their sizes sum to at most ``max_bytes``.

    The first item is always included, however big.  ``rows`` may hold more
    than the page (up to ``limit + 1``); the second value is ``more``.
    """
    items: list[FeedItem] = []
    total = 0
    for item in rows:
        if len(items) >= limit:
            return items, True
        if items and max_bytes is not None and total + item.size > max_bytes:
            return items, True
        items.append(item)
        total += item.size
    return items, False


@dataclass(frozen=True)
class ChangesPage:
    feed: str
    items: list[FeedItem] = field(default_factory=list)
    next: int = 0
    more: bool = False


@dataclass(frozen=True)
class Cursor:
    peer: str
    feed_id: str
    since: int
    #: Unix time of the last pull that reached ``more: false`` (0 = never)
    synced_at: float = 0.0


@dataclass(frozen=True)
class SweepResult:
    envelopes: int = 0
    tombstones: int = 0
    acks: int = 0
    nonces: int = 0
    refused: int = 0
    #: tombstone rows the store holds once the sweep ended (the ``meshrelay_stored_tombstones`` gauge)
    live_tombstones: int = 0


@dataclass(frozen=True)
class StoreStats:
    envelopes: int = 0
    bytes: int = 0


class Store(Protocol):
    """What the relay core needs from a backend."""

    #: where the store logs (the node gives it an aggregating logger: a failing disk fails every write)
    log: Logger
    #: random id fixed when the store was created (the ``changes`` feed id)
    feed_id: str
    #: the bounds enforced inside the write transaction; a config reload sets new ones
    caps: Caps
    #: the schema version the store had when it was opened (0: created just now)
    migrated_from: int
    #: bytes a tombstone counts for in the stored total and the junk budget: what its row (a 16-byte
    #: ``tombstone_key``, its expiry and junk flag) and its index entries take on this backend's disk
    tombstone_bytes: int
    #: True when ``add_envelope(verify=...)`` checks the signatures in the store's writer (answering
    #: ``bad_signature``/``bad_permit``); False when it ignores ``verify`` and the caller checks them
    verifies_signatures: bool

    def start(self) -> None:
        """Start worker threads or connection pools; called once by the node service."""

    def close(self) -> Deferred[None]:
        """Finish queued writes and release every resource."""

    def stats(self) -> StoreStats:
        """Stored envelope count and bytes as of the last commit (no I/O)."""

    def tombstone_count(self) -> Deferred[int]:
        """Tombstone rows stored (a read; the sweep reports it as ``live_tombstones``)."""

    def add_envelope(
        self, env: Envelope, now: int, verify: str | None = None, peer: str | None = None
    ) -> Deferred[AddResult]:
        """Store ``env`` after dedup, the tombstone check and the caps, in that order.

        With ``peer`` (a replica offered by that peer), a cap refusal is
        remembered (bounded, see ``refused``) in the same transaction, and an
        acceptance forgets every remembered refusal of that msg_id.
        """

    def add_envelopes(
        self, envs: Sequence[Envelope], now: int, verify: str | None = None, peer: str | None = None
    ) -> Deferred[list[AddResult]]:
        """``add_envelope`` for each of ``envs``, in order, one result each (a page of replicas).

        Fails with ``StoreError`` when any of them failed; those that did not
        are stored all the same.
        """

    def apply_ack(
        self, ack: SignedAck, tombstone_expires: int, from_peer: bool = False, attested: Sequence[str] = ()
    ) -> Deferred[AckResult]:
        """Delete and tombstone the held envelopes listed (always, even at the storage cap), record the ack.

        ``attested`` (wire v4, docs/protocol.md 13): ids of the ack that the
        relaying peer says it held; their tombstones are not junk here (they
        count toward the storage cap only), and an existing junk tombstone of
        such an id stops being junk.

        Tombstones of ids not held here, and the ack itself when it deleted
        nothing here, are kept only within ``junk_budget(caps, from_peer)``
        (``from_peer``: relayed by an authenticated peer, not a client's); a signed ack that
        does not fit the storage cap is applied but not recorded
        (``AckResult.stored`` false, ``skipped`` counts untombstoned ids).
        """

    def fetch(self, mailbox: str, now: int, limit: int) -> Deferred[tuple[list[str], bool]]:
        """Up to ``limit`` live envelopes of ``mailbox`` in arrival order, and has_more."""

    def count(self, mailbox: str, now: int) -> Deferred[int]:
        """Live envelopes pending in ``mailbox``."""

    def changes(
        self,
        since: int,
        limit: int,
        now: int,
        mailbox: str | None = None,
        max_bytes: int | None = None,
        ids_only: bool = False,
    ) -> Deferred[ChangesPage]:
        """Live envelopes and acks with ``seq > since``, ascending, read under one snapshot.

        At most ``limit`` items, and (with ``max_bytes``) while the items' body
        sizes sum to at most ``max_bytes`` -- the first item always.  With
        ``ids_only`` the items carry no body (size, mailbox and key only).
        """

    def held_tombstones(self, pairs: Sequence[tuple[str, str]]) -> Deferred[set[tuple[str, str]]]:
        """Which of ``pairs`` (mailbox, msg_id) have a tombstone that is not junk: mail held here or attested (v4)."""

    def missing(
        self, envelopes: Sequence[tuple[str, str]], acks: Sequence[tuple[str, str]], now: int
    ) -> Deferred[tuple[list[tuple[str, str]], list[tuple[str, str]]]]:
        """Which of ``envelopes`` (mailbox, msg_id) and ``acks`` (mailbox, nonce) this store lacks, input order.

        An envelope is lacking when no envelope with that msg_id is stored and
        no live tombstone (mailbox, msg_id) exists; an ack when (mailbox,
        nonce) is not recorded.
        """

    def bodies(
        self, msg_ids: Sequence[str], acks: Sequence[tuple[str, str]], now: int, max_bytes: int
    ) -> Deferred[Bodies]:
        """The held envelopes and acks asked for, in request order, within ``max_bytes`` (the first always)."""

    def refused(self, now: int, limit: int, mailbox: str | None = None) -> Deferred[list[Refused]]:
        """Remembered cap refusals that have not expired, oldest first."""

    def forget_refused(self, items: Sequence[tuple[str, str]]) -> Deferred[None]:
        """Drop the remembered refusals ``(msg_id, peer)``."""

    def put_policy(self, mailbox: str, version: int, policy_id: str, body: str) -> Deferred[str]:
        """Store a mailbox's signed policy unless the stored one orders at or above it (v3).

        ``accepted`` (stored, numbered in the policy feed), ``duplicate`` (the
        same policy) or ``stale`` (the stored one is newer: nothing changes).
        """

    def policies_since(self, since: int, limit: int) -> Deferred[list[tuple[int, str]]]:
        """The policy feed: ``(pseq, body)`` with ``pseq > since``, ascending (v3)."""

    def load_policies(self) -> list[str]:
        """Every stored policy's canonical text, synchronously (read once at start-up)."""

    def claim_nonce(self, scope: str, nonce: str, expires: int) -> Deferred[bool]:
        """Record a nonce; False when ``(scope, nonce)`` is already recorded."""

    def sweep(self, now: int) -> Deferred[SweepResult]:
        """Delete expired envelopes, tombstones, acks, nonces, remembered refusals and contact-bucket rows."""

    def get_cursor(self, peer: str) -> Deferred[Cursor | None]:
        """The stored sync cursor for ``peer``."""

    def set_cursor(self, cursor: Cursor) -> Deferred[None]:
        """Durably store a sync cursor."""

    def acquire_lease(self, name: str, holder: str, ttl: float) -> Deferred[bool]:
        """Hold the lease ``name`` for ``ttl`` seconds (or renew it); False if another holder has it.

        Several processes sharing one database use this so that exactly one of
        them runs each peer's sync puller.  A single-process backend always
        grants it.
        """

    def set_wake_callback(
        self, wake: Callable[[str], None], waiting: Callable[[], Iterable[str]] | None = None
    ) -> None:
        """Call ``wake(mailbox)`` when an envelope for ``mailbox`` commits through *another* process.

        ``waiting()`` lists the mailboxes with long-polls held here; a backend
        re-checks those when it may have missed notifications.  A store owned
        by one process has nothing to report and ignores this.
        """
