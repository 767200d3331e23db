"""The node's side of first contact: the newest policy per mailbox, and admitting an envelope.

:class:`PolicyBook` holds, in memory, the newest policy of every mailbox the
node knows (loaded from the store at start-up, updated as policies commit).
:func:`admit` is the one check every path runs (deposit, push, sync,
``bodies``, refetch, ``fetch_remote``): it verifies a permit's signature on
the verifier, classifies the envelope under the mailbox's policy
(:func:`meshrelay.policy.classify`) and returns it marked for its bucket, with
its version-3 fields kept for the store and for v3 peers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet.defer import Deferred, succeed

from meshrelay import envelope as E
from meshrelay import policy as P

#: outcomes of :meth:`PolicyBook.offer`
NEWER = "accepted"
SAME = "duplicate"
OLDER = "stale"


class PolicyBook:
    """The newest known policy of each mailbox (latest version wins; ties by policy id)."""

    def __init__(self) -> None:
        self._by_mailbox: dict[str, P.Policy] = {}

    def __len__(self) -> int:
        return len(self._by_mailbox)

    def get(self, mailbox: str) -> P.Policy | None:
        return self._by_mailbox.get(mailbox)

    def judge(self, policy: P.Policy) -> str:
        """:data:`NEWER`, :data:`SAME` or :data:`OLDER` than the one held."""
        held = self._by_mailbox.get(policy.mailbox)
        if held is not None and held.signed == policy.signed and held.sig == policy.sig:
            return SAME
        return NEWER if policy.newer_than(held) else OLDER

    def put(self, policy: P.Policy) -> None:
        """Keep ``policy`` if it is newer than the one held (idempotent, order-independent)."""
        if policy.newer_than(self._by_mailbox.get(policy.mailbox)):
            self._by_mailbox[policy.mailbox] = policy

    def load(self, policies: Iterable[P.Policy]) -> None:
        for policy in policies:
            self.put(policy)


class PermitCache:
    """Permits whose signature verified, so a contact's every message costs one Ed25519 check, not two.

    Keyed by everything the signature covers plus the signature itself, so a
    hit is exactly a permit seen valid before.  Bounded: the oldest entries go.
    """

    def __init__(self, size: int = 65536) -> None:
        self.size = size
        self._seen: dict[tuple[bytes, bytes], None] = {}

    def known(self, permit: P.Permit) -> bool:
        return (permit.signed, permit.sig_bytes) in self._seen

    def add(self, permit: P.Permit) -> None:
        self.add_signed(permit.signed, permit.sig_bytes)

    def add_signed(self, signed: bytes, sig: bytes) -> None:
        """Remember a permit by its signed bytes and signature (as a store's writer verified them)."""
        if len(self._seen) >= self.size:
            del self._seen[next(iter(self._seen))]
        self._seen[(signed, sig)] = None


def verify_permit(verifier: Any, extras: P.Extras, cache: PermitCache | None = None) -> Deferred[bool]:
    """The permit's signature verdict on ``verifier`` (False without a permit); a cached one is True at once."""
    permit = extras.permit
    if permit is None:
        return succeed(False)
    if cache is not None and cache.known(permit):
        return succeed(True)
    d: Deferred[bool] = verifier.verify(permit.mailbox_key, permit.sig_bytes, permit.signed)
    if cache is not None:

        def remember(ok: bool) -> bool:
            if ok:
                cache.add(permit)
            return ok

        d.addCallback(remember)
    return d


def admitted(
    env: E.Envelope,
    extras: P.Extras,
    policy: P.Policy | None,
    permit_ok: bool,
    permit_check: tuple[bytes, bytes, bytes] | None = None,
) -> E.Envelope:
    """``env`` marked contact or stranger under ``policy`` with its v3 fields kept; raises the refusal.

    ``permit_check`` is left on the envelope for a store that verifies the permit in its writer.
    """
    bucket = P.classify(env, extras, policy, permit_ok)
    cap = policy.stranger_cap if policy is not None else None
    if bucket == P.STRANGER and not extras.suffix and cap is None:
        return env
    return E.Envelope(
        env.msg_id,
        env.mailbox,
        env.sender,
        env.ts,
        env.ttl,
        env.ciphertext,
        env.sig,
        env.mailbox_key,
        env.sender_key,
        env.sig_bytes,
        env.signed,
        env.ct_size,
        extras.suffix,
        bucket == P.CONTACT,
        cap,
        permit_check,
    )
