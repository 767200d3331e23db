"""First contact without spam: mailbox policies, send permits and stamps (protocol version 3).

Pure: no I/O, no clock (callers pass ``now``), no randomness except in the
signing helpers that a client uses.  Every refusal raises its own protocol
error (``meshrelay.errors``).

- A **policy** is signed by the mailbox key and says how a node treats mail
  from strangers to that mailbox: ``open`` (v1 behaviour), ``stamps``
  (strangers attach a proof-of-work stamp of ``difficulty`` bits) or
  ``contacts`` (strangers are refused).  ``stranger_cap`` bounds the stranger
  bucket; ``epoch`` revokes every permit of an older epoch at once;
  ``version`` orders policies (the highest wins; ties are broken by the
  policy id so every node keeps the same one).
- A **permit** is signed by the mailbox key for one sender key: mailbox,
  sender, expiry, epoch.  An envelope that carries a valid one is contact
  mail.  It names the sender, so a relay cannot move it to another sender's
  envelope, and it verifies offline against the mailbox address.
- A **stamp** is 8 bytes such that ``sha256(STAMP_DOMAIN "\\n" msg_id "\\n" ||
  stamp)`` starts with at least ``difficulty`` zero bits (hashcash).  It is
  bound to the envelope's ``msg_id``, which commits to mailbox, sender,
  times and ciphertext, so a stamp can neither be reused for another
  envelope nor for another mailbox.  Verifying one is one SHA-256.

The envelope's signed bytes and ``msg_id`` are exactly v1's: ``permit`` and
``stamp`` travel as unsigned top-level envelope fields between version-3
nodes only (see docs/protocol.md section 12).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshrelay import envelope as E
from meshrelay.errors import (
    BadPermit,
    BadPolicy,
    BadSignature,
    BadStamp,
    BadTimestamp,
    ContactsOnly,
    PermitExpired,
    PermitMismatch,
    PermitRevoked,
    StampRequired,
    WeakStamp,
)

POLICY_DOMAIN = "meshrelay/policy/v1"
PERMIT_DOMAIN = "meshrelay/permit/v1"
STAMP_DOMAIN = "meshrelay/stamp/v1"

OPEN = "open"
STAMPS = "stamps"
CONTACTS = "contacts"
MODES = (OPEN, STAMPS, CONTACTS)

#: envelope buckets
CONTACT = "contact"
STRANGER = "stranger"

#: a stamp's length in bytes (11 b64u characters)
STAMP_LEN = 8
#: highest difficulty a policy may ask for (2^32 SHA-256 tries: about an hour of one core)
MAX_DIFFICULTY = 32
#: the default difficulty of a ``stamps`` policy; chosen with bench/stamps.py (docs/benchmarks.md)
DEFAULT_DIFFICULTY = 20
#: the default stranger cap of a policy the CLI writes
DEFAULT_STRANGER_CAP = 64

POLICY_FIELDS = frozenset(("mailbox", "version", "mode", "difficulty", "stranger_cap", "epoch", "ts", "sig"))
PERMIT_FIELDS = frozenset(("mailbox", "sender", "expires", "epoch", "sig"))
#: the unsigned top-level envelope fields of version 3
EXTRA_FIELDS = ("permit", "stamp")

#: the printable permit token: prefix + b64u(mailbox 32 | sender 32 | expires u64 | epoch u64 | sig 64)
TOKEN_PREFIX = "mrp1."
_TOKEN_LEN = 32 + 32 + 8 + 8 + 64


# --------------------------------------------------------------------------- policies


def policy_signed_bytes(
    mailbox: str, version: int, mode: str, difficulty: int, stranger_cap: int, epoch: int, ts: int
) -> bytes:
    """The canonical bytes a policy's ``sig`` covers (eight ``\\n``-joined lines, no trailing newline)."""
    return f"{POLICY_DOMAIN}\n{mailbox}\n{version}\n{mode}\n{difficulty}\n{stranger_cap}\n{epoch}\n{ts}".encode("ascii")


@dataclass(frozen=True, slots=True)
class Policy:
    """A parsed, shape-checked mailbox policy (signature not yet verified)."""

    mailbox: str
    version: int
    mode: str
    difficulty: int
    stranger_cap: int
    epoch: int
    ts: int
    sig: str
    mailbox_key: bytes
    sig_bytes: bytes

    @property
    def signed(self) -> bytes:
        return policy_signed_bytes(
            self.mailbox, self.version, self.mode, self.difficulty, self.stranger_cap, self.epoch, self.ts
        )

    @property
    def policy_id(self) -> str:
        """``hex(sha256(signed bytes))``: breaks ties between two policies of one version."""
        return hashlib.sha256(self.signed).hexdigest()

    def newer_than(self, other: Policy | None) -> bool:
        """True when this policy replaces ``other`` (higher version; equal version: higher id)."""
        if other is None:
            return True
        return (self.version, self.policy_id) > (other.version, other.policy_id)

    def to_json(self) -> dict[str, Any]:
        return {
            "mailbox": self.mailbox,
            "version": self.version,
            "mode": self.mode,
            "difficulty": self.difficulty,
            "stranger_cap": self.stranger_cap,
            "epoch": self.epoch,
            "ts": self.ts,
            "sig": self.sig,
        }

    @property
    def raw(self) -> str:
        """Canonical compact JSON (as stored, served and pushed)."""
        return E.dumps_json(self.to_json()).decode("ascii")


def parse_policy(obj: Any) -> Policy:
    """Check a policy's shape (``400 bad_policy``); the signature is checked by :func:`verify_policy`."""
    if not isinstance(obj, dict):
        raise BadPolicy("a policy must be a JSON object")
    if obj.keys() != POLICY_FIELDS:
        unknown = sorted(set(obj) - POLICY_FIELDS)
        missing = sorted(POLICY_FIELDS - set(obj))
        raise BadPolicy(
            f"unknown field(s): {', '.join(unknown)}" if unknown else f"missing field(s): {', '.join(missing)}"
        )
    mailbox_key = E._decode_field(obj, "mailbox", E.KEY_LEN, BadPolicy)
    sig_bytes = E._decode_field(obj, "sig", E.SIG_LEN, BadPolicy)
    version = E._int_field(obj, "version", BadPolicy)
    difficulty = E._int_field(obj, "difficulty", BadPolicy)
    stranger_cap = E._int_field(obj, "stranger_cap", BadPolicy)
    epoch = E._int_field(obj, "epoch", BadPolicy)
    ts = E._int_field(obj, "ts", BadPolicy)
    mode = obj["mode"]
    if mode not in MODES or not isinstance(mode, str):
        raise BadPolicy(f"mode must be one of {', '.join(MODES)}")
    if difficulty > MAX_DIFFICULTY:
        raise BadPolicy(f"difficulty must be at most {MAX_DIFFICULTY}")
    if mode == STAMPS and difficulty < 1:
        raise BadPolicy("a stamps policy needs a difficulty of at least 1")
    return Policy(
        mailbox=obj["mailbox"],
        version=version,
        mode=mode,
        difficulty=difficulty,
        stranger_cap=stranger_cap,
        epoch=epoch,
        ts=ts,
        sig=obj["sig"],
        mailbox_key=mailbox_key,
        sig_bytes=sig_bytes,
    )


def verify_policy(policy: Policy) -> bool:
    """True when the policy is signed by its mailbox key."""
    return E.verify_signature(policy.mailbox_key, policy.sig_bytes, policy.signed)


def check_policy_time(policy: Policy, now: int, clock_skew: int) -> None:
    """A policy may not come from the future (``422 bad_timestamp``); it never expires."""
    if policy.ts > now + clock_skew:
        raise BadTimestamp("policy ts is in the future")


def make_policy(
    mailbox_key: Ed25519PrivateKey,
    *,
    version: int,
    mode: str = OPEN,
    difficulty: int = 0,
    stranger_cap: int = DEFAULT_STRANGER_CAP,
    epoch: int = 0,
    ts: int,
) -> dict[str, Any]:
    """Build and sign a policy as a mailbox owner does."""
    mailbox = E.public_key_b64u(mailbox_key)
    signed = policy_signed_bytes(mailbox, version, mode, difficulty, stranger_cap, epoch, ts)
    return {
        "mailbox": mailbox,
        "version": version,
        "mode": mode,
        "difficulty": difficulty,
        "stranger_cap": stranger_cap,
        "epoch": epoch,
        "ts": ts,
        "sig": E.b64u_encode(mailbox_key.sign(signed)),
    }


# --------------------------------------------------------------------------- permits


def permit_signed_bytes(mailbox: str, sender: str, expires: int, epoch: int) -> bytes:
    """The canonical bytes a permit's ``sig`` covers (five ``\\n``-joined lines, no trailing newline)."""
    return f"{PERMIT_DOMAIN}\n{mailbox}\n{sender}\n{expires}\n{epoch}".encode("ascii")


@dataclass(frozen=True, slots=True)
class Permit:
    """A parsed permit (signature not yet verified)."""

    mailbox: str
    sender: str
    expires: int
    epoch: int
    sig: str
    mailbox_key: bytes
    sig_bytes: bytes

    @property
    def signed(self) -> bytes:
        return permit_signed_bytes(self.mailbox, self.sender, self.expires, self.epoch)

    def to_json(self) -> dict[str, Any]:
        return {
            "mailbox": self.mailbox,
            "sender": self.sender,
            "expires": self.expires,
            "epoch": self.epoch,
            "sig": self.sig,
        }

    def token(self) -> str:
        """The short printable form, for handing a permit over out of band."""
        raw = (
            self.mailbox_key
            + E.b64u_decode(self.sender)
            + struct.pack(">QQ", self.expires, self.epoch)
            + self.sig_bytes
        )
        return TOKEN_PREFIX + E.b64u_encode(raw)


def parse_permit(obj: Any) -> Permit:
    """Check a permit's shape (``403 bad_permit``)."""
    if not isinstance(obj, dict) or obj.keys() != PERMIT_FIELDS:
        raise BadPermit("a permit is an object with exactly mailbox, sender, expires, epoch, sig")
    mailbox_key = E._decode_field(obj, "mailbox", E.KEY_LEN, BadPermit)
    E._decode_field(obj, "sender", E.KEY_LEN, BadPermit)
    sig_bytes = E._decode_field(obj, "sig", E.SIG_LEN, BadPermit)
    expires = E._int_field(obj, "expires", BadPermit)
    epoch = E._int_field(obj, "epoch", BadPermit)
    return Permit(
        mailbox=obj["mailbox"],
        sender=obj["sender"],
        expires=expires,
        epoch=epoch,
        sig=obj["sig"],
        mailbox_key=mailbox_key,
        sig_bytes=sig_bytes,
    )


def parse_permit_token(token: str) -> Permit:
    """Parse the printable form (``mrp1.`` + b64u); raise ``bad_permit``."""
    text = token.strip()
    if not text.startswith(TOKEN_PREFIX):
        raise BadPermit(f"a permit token starts with {TOKEN_PREFIX!r}")
    try:
        raw = E.b64u_decode(text[len(TOKEN_PREFIX) :])
    except ValueError:
        raise BadPermit("a permit token is base64url after its prefix") from None
    if len(raw) != _TOKEN_LEN:
        raise BadPermit(f"a permit token holds {_TOKEN_LEN} bytes, not {len(raw)}")
    expires, epoch = struct.unpack(">QQ", raw[64:80])
    return parse_permit(
        {
            "mailbox": E.b64u_encode(raw[:32]),
            "sender": E.b64u_encode(raw[32:64]),
            "expires": expires,
            "epoch": epoch,
            "sig": E.b64u_encode(raw[80:]),
        }
    )


def verify_permit(permit: Permit) -> bool:
    """True when the permit is signed by the key of the mailbox it names (offline check)."""
    return E.verify_signature(permit.mailbox_key, permit.sig_bytes, permit.signed)


def make_permit(mailbox_key: Ed25519PrivateKey, sender: str, expires: int, epoch: int) -> dict[str, Any]:
    """Sign a permit for ``sender`` as the owner of ``mailbox_key``'s mailbox."""
    mailbox = E.public_key_b64u(mailbox_key)
    sig = mailbox_key.sign(permit_signed_bytes(mailbox, sender, expires, epoch))
    return {"mailbox": mailbox, "sender": sender, "expires": expires, "epoch": epoch, "sig": E.b64u_encode(sig)}


# --------------------------------------------------------------------------- stamps


def _stamp_prefix(msg_id: str) -> Any:
    return hashlib.sha256(f"{STAMP_DOMAIN}\n{msg_id}\n".encode("ascii"))


def leading_zero_bits(digest: bytes) -> int:
    """How many zero bits ``digest`` starts with."""
    value = int.from_bytes(digest, "big")
    return len(digest) * 8 - value.bit_length()


def stamp_work(msg_id: str, stamp: bytes) -> int:
    """The stamp's work in bits: leading zero bits of ``sha256(STAMP_DOMAIN\\n msg_id\\n || stamp)``."""
    h = _stamp_prefix(msg_id)
    h.update(stamp)
    return leading_zero_bits(h.digest())


def parse_stamp(value: Any) -> bytes:
    """A stamp's bytes: canonical b64u of exactly 8 bytes, else ``400 bad_stamp``."""
    if not isinstance(value, str):
        raise BadStamp("stamp must be a base64url string")
    try:
        raw = E.b64u_decode(value)
    except ValueError:
        raise BadStamp("stamp is not canonical base64url") from None
    if len(raw) != STAMP_LEN:
        raise BadStamp(f"stamp must decode to {STAMP_LEN} bytes")
    return raw


def solve_stamp(
    msg_id: str,
    difficulty: int,
    start: int = 0,
    progress: Callable[[int], None] | None = None,
    every: int = 1 << 18,
) -> str:
    """Find a stamp of at least ``difficulty`` bits for ``msg_id`` (b64u); ``progress(tries)`` now and then."""
    if not 0 <= difficulty <= MAX_DIFFICULTY:
        raise ValueError(f"difficulty must be in [0, {MAX_DIFFICULTY}]")
    base = _stamp_prefix(msg_id)
    # A digest below 2^(256 - difficulty) starts with ``difficulty`` zero bits.
    bound = 1 << (256 - difficulty)
    counter = start
    pack = struct.Struct(">Q").pack
    from_bytes = int.from_bytes
    while True:
        stop = counter + every
        while counter < stop:
            h = base.copy()
            h.update(pack(counter))
            if from_bytes(h.digest(), "big") < bound:
                return E.b64u_encode(pack(counter))
            counter += 1
        if progress is not None:
            progress(counter - start)


# --------------------------------------------------------------------------- admission


@dataclass(frozen=True, slots=True)
class Extras:
    """The version-3 fields an envelope carried, parsed (signatures not verified)."""

    permit: Permit | None = None
    stamp: bytes | None = None
    #: the canonical JSON text of the fields, spliced after the v1 fields: ``,"permit":{...},"stamp":"..."``
    suffix: str = ""


NO_EXTRAS = Extras()


def split_extras(obj: Any, copy: bool = True) -> tuple[Any, Extras]:
    """Take ``permit`` and ``stamp`` off an envelope object; the rest is a v1 envelope.

    Raises ``bad_permit`` / ``bad_stamp`` for malformed values.  A non-object
    passes through unchanged (``parse_envelope`` refuses it).  With
    ``copy=False`` the two keys are removed from ``obj`` itself (a request body
    the caller owns: the deposit path saves the copy).
    """
    if not isinstance(obj, dict) or ("permit" not in obj and "stamp" not in obj):
        return obj, NO_EXTRAS
    has_permit, has_stamp = "permit" in obj, "stamp" in obj
    if copy:
        rest = {k: v for k, v in obj.items() if k != "permit" and k != "stamp"}
        permit_obj, stamp_text = obj.get("permit"), obj.get("stamp")
    else:
        rest = obj
        permit_obj, stamp_text = obj.pop("permit", None), obj.pop("stamp", None)
    permit = parse_permit(permit_obj) if has_permit else None
    stamp = parse_stamp(stamp_text) if has_stamp else None
    # Canonical text, built directly: every value is ASCII b64u or a decimal integer.
    suffix = ""
    if permit is not None:
        suffix = (
            f',"permit":{{"mailbox":"{permit.mailbox}","sender":"{permit.sender}",'
            f'"expires":{permit.expires},"epoch":{permit.epoch},"sig":"{permit.sig}"}}'
        )
    if stamp is not None:
        suffix += f',"stamp":"{stamp_text}"'
    return rest, Extras(permit=permit, stamp=stamp, suffix=suffix)


def with_extras(raw: str, suffix: str) -> str:
    """The canonical v1 envelope text ``raw`` with the version-3 fields ``suffix`` spliced in."""
    return raw[:-1] + suffix + "}" if suffix else raw


def check_permit(env: E.Envelope, permit: Permit, policy: Policy | None, verified: bool) -> None:
    """Refuse a permit that does not make ``env`` contact mail, each reason with its own code.

    ``verified`` is the result of :func:`verify_permit` (done by the caller,
    possibly off the reactor thread).  Expiry is judged at the envelope's
    ``ts``, so every node decides the same for one envelope whenever it
    arrives; the epoch against the newest policy the node holds.
    """
    if permit.mailbox != env.mailbox or permit.sender != env.sender:
        raise PermitMismatch("the permit is for another mailbox or another sender than this envelope")
    if not verified:
        raise BadPermit("the permit's signature is not the mailbox owner's")
    if permit.expires <= env.ts:
        raise PermitExpired("the permit had expired when the envelope was made")
    if policy is not None and permit.epoch < policy.epoch:
        raise PermitRevoked(f"the permit's epoch {permit.epoch} was revoked (policy epoch {policy.epoch})")


def classify(env: E.Envelope, extras: Extras, policy: Policy | None, permit_ok: bool) -> str:
    """:data:`CONTACT` or :data:`STRANGER` for ``env`` under ``policy`` (None: open), or raise.

    ``permit_ok`` is the verdict on the permit's signature (ignored without one).
    A present but invalid permit is refused, never quietly downgraded: the
    sender learns at once that it is not treated as a contact.
    """
    if extras.permit is not None:
        check_permit(env, extras.permit, policy, permit_ok)
        return CONTACT
    mode = policy.mode if policy is not None else OPEN
    if mode == CONTACTS:
        raise ContactsOnly("this mailbox takes mail only from its contacts (a permit is needed)")
    if mode == STAMPS:
        assert policy is not None
        if extras.stamp is None:
            raise StampRequired(
                f"this mailbox asks strangers for a stamp of {policy.difficulty} bits", difficulty=policy.difficulty
            )
        work = stamp_work(env.msg_id, extras.stamp)
        if work < policy.difficulty:
            raise WeakStamp(
                f"the stamp has {work} bits of work; this mailbox asks for {policy.difficulty}",
                difficulty=policy.difficulty,
            )
    return STRANGER


def stranger_cap(policy: Policy | None, per_mailbox_pending: int) -> int:
    """The stranger bucket's cap: the policy's, never above the node's ``per_mailbox_pending``."""
    if policy is None:
        return per_mailbox_pending
    return min(policy.stranger_cap, per_mailbox_pending)


def require_policy_signature(ok: bool) -> None:
    """``bad_signature`` for a policy whose signature does not verify."""
    if not ok:
        raise BadSignature("the policy's signature is not the mailbox owner's")
