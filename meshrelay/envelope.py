"""Envelopes, polls and signed acks: parsing, canonical signed bytes, verification.

Pure: no I/O, no clock (callers pass ``now``), no randomness.  Everything a
client or a peer sends goes through here before the relay core touches it,
and every refusal raises the protocol's error (``meshrelay.errors``).

Wire rules (docs/protocol.md sections 1-4):

- ``b64u`` is base64url without padding; only the canonical encoding of a
  value is accepted, so one key cannot travel under two spellings.
- envelope signed bytes: ``meshrelay/envelope/v1``, mailbox, sender, ts, ttl,
  hex(sha256(ciphertext bytes)), ``\\n``-joined; ``msg_id`` is their sha256.
- poll signed bytes: ``meshrelay/poll/v1``, mailbox, ts, nonce, the ack ids
  joined by ``,``.
"""

from __future__ import annotations

import binascii
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from meshrelay.errors import (
    BadEnvelope,
    BadJSON,
    BadRequest,
    BadSignature,
    BadTimestamp,
    BadTTL,
    Stale,
    TooLarge,
)
from meshrelay.sigcheck import KEY_LEN as KEY_LEN
from meshrelay.sigcheck import SIG_LEN as SIG_LEN
from meshrelay.sigcheck import verify_all as verify_all
from meshrelay.sigcheck import verify_signature as verify_signature

ENVELOPE_DOMAIN = "meshrelay/envelope/v1"
POLL_DOMAIN = "meshrelay/poll/v1"

ENVELOPE_FIELDS = frozenset(("v", "msg_id", "mailbox", "sender", "ts", "ttl", "ciphertext", "sig"))
ACK_FIELDS = frozenset(("mailbox", "ts", "nonce", "ack", "sig"))
POLL_FIELDS = ACK_FIELDS | {"limit", "wait", "fetch_remote"}

NONCE_LEN = 16
MAX_ACK_IDS = 500
MAX_POLL_LIMIT = 100
MAX_WAIT = 30
#: Integers on the wire are JSON-safe: 0 <= n <= 2**53 - 1.
MAX_INT = 2**53 - 1

#: 64 lowercase hex digits (a msg_id, a peer HMAC)
HEX64_RE = re.compile(r"[0-9a-f]{64}")
#: the one item length of a valid ack list (``_all_hex64``)
_LEN_64 = {64}
_URL_TO_STD = bytes.maketrans(b"-_", b"+/")
_STD_TO_URL = bytes.maketrans(b"+/", b"-_")


# --------------------------------------------------------------------------- b64u


def b64u_encode(data: bytes) -> str:
    """Encode ``data`` as base64url without padding."""
    return binascii.b2a_base64(data, newline=False).translate(_STD_TO_URL).rstrip(b"=").decode("ascii")


def b64u_decode(text: str) -> bytes:
    """Decode canonical base64url without padding; raise ``ValueError`` otherwise."""
    if not isinstance(text, str):
        raise ValueError("not base64url")
    try:
        raw_text = text.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError("not base64url") from None
    # Strict a2b_base64 refuses any byte outside the standard alphabet (and
    # misplaced padding), so after "-_" -> "+/" only the standard alphabet's own
    # "+", "/" and "=" need refusing here.
    if len(raw_text) % 4 == 1 or b"+" in raw_text or b"/" in raw_text or b"=" in raw_text:
        raise ValueError("not base64url")
    try:
        raw = binascii.a2b_base64(raw_text.translate(_URL_TO_STD) + b"=" * (-len(raw_text) % 4), strict_mode=True)
    except binascii.Error as e:
        raise ValueError("not base64url") from e
    # The last partial group (tail bytes -> tail + 1 chars) must re-encode to
    # itself, i.e. its unused low bits are zero: one spelling per value.
    tail = len(raw) % 3
    if tail and b64u_encode(raw[-tail:]) != text[-(tail + 1) :]:
        raise ValueError("non-canonical base64url")
    return raw


def _decode_field(obj: dict[str, Any], name: str, length: int | None, err: type[Exception]) -> bytes:
    value = obj.get(name)
    if not isinstance(value, str):
        raise err(f"{name} must be a base64url string")
    try:
        raw = b64u_decode(value)
    except ValueError:
        raise err(f"{name} is not canonical base64url") from None
    if length is not None and len(raw) != length:
        raise err(f"{name} must decode to {length} bytes, got {len(raw)}")
    return raw


def _int_field(obj: dict[str, Any], name: str, err: type[Exception]) -> int:
    value = obj.get(name)
    # bool is a subclass of int; JSON true must not pass as 1.
    if type(value) is not int:
        raise err(f"{name} must be an integer")
    if not 0 <= value <= MAX_INT:
        raise err(f"{name} out of range")
    return value


# --------------------------------------------------------------------------- JSON


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key")
    return out


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, object_pairs_hook=_no_duplicate_keys)


def loads_json(body: bytes) -> Any:
    """Parse a request body as strict JSON (UTF-8, no NaN/Infinity, no duplicate keys)."""
    try:
        return _DECODER.decode(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise BadJSON(f"body is not valid JSON: {e}") from None


class RawJSON(str):
    """A JSON text that :func:`dumps_json` splices in as-is (stored envelopes, acks)."""

    __slots__ = ()


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_CONTAINERS = (RawJSON, dict, list, tuple)


def _flat(value: Any) -> bool:
    """A dict whose values hold no container (so no RawJSON): the C encoder takes it whole."""
    return type(value) is dict and not any(isinstance(v, _CONTAINERS) for v in value.values())


def _encode(value: Any) -> str:
    if isinstance(value, RawJSON):
        return value
    if isinstance(value, dict):
        if _flat(value):
            return _ENCODER.encode(value)
        return "{" + ",".join(_ENCODER.encode(str(k)) + ":" + _encode(v) for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        if all(not isinstance(v, _CONTAINERS) or _flat(v) for v in value):
            # Lists of scalars or flat objects (ids pages, push results): one C call.
            return _ENCODER.encode(value)
        return "[" + ",".join(_encode(v) for v in value) + "]"
    return _ENCODER.encode(value)


def dumps_json(value: Any) -> bytes:
    """Serialise ``value`` compactly as UTF-8 JSON, splicing in :class:`RawJSON` texts."""
    if _flat(value):
        # The common flat answer: the C encoder in one call.
        return _ENCODER.encode(value).encode("utf-8")
    return _encode(value).encode("utf-8")


def require_object(value: Any, what: str = "body") -> dict[str, Any]:
    """Return ``value`` if it is a JSON object, else raise ``bad_request``."""
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object")
    return value


# --------------------------------------------------------------------------- envelopes


def envelope_signed_bytes(mailbox: str, sender: str, ts: int, ttl: int, ciphertext: bytes) -> bytes:
    """The canonical bytes an envelope's ``sig`` covers."""
    digest = hashlib.sha256(ciphertext).hexdigest()
    return f"{ENVELOPE_DOMAIN}\n{mailbox}\n{sender}\n{ts}\n{ttl}\n{digest}".encode("ascii")


@dataclass(frozen=True, slots=True)
class Envelope:
    """A parsed, shape-checked envelope.  ``raw`` is its canonical JSON text."""

    msg_id: str
    mailbox: str
    sender: str
    ts: int
    ttl: int
    ciphertext: str
    sig: str
    mailbox_key: bytes
    sender_key: bytes
    sig_bytes: bytes
    signed: bytes
    ct_size: int
    #: version 3 (meshrelay.policy): the canonical text of its unsigned ``permit`` / ``stamp``
    #: fields, ``,"permit":{...},"stamp":"..."`` (empty: none), kept in :attr:`raw`
    suffix: str = ""
    #: version 3: True when a valid permit makes this envelope contact mail (its mailbox's contact bucket)
    contact: bool = False
    #: version 3: the stranger bucket's cap under the mailbox policy it was admitted by (None: no
    #: policy; the store then uses its ``per_mailbox_pending``, and clamps any cap to it)
    stranger_cap: int | None = None
    #: version 3: ``(mailbox key, sig, signed bytes)`` of a permit whose signature a store that
    #: verifies signatures checks in its writer, after the envelope's (None: nothing to check)
    permit_check: tuple[bytes, bytes, bytes] | None = None

    @property
    def expires(self) -> int:
        return self.ts + self.ttl

    def to_json(self) -> dict[str, Any]:
        return {
            "v": 1,
            "msg_id": self.msg_id,
            "mailbox": self.mailbox,
            "sender": self.sender,
            "ts": self.ts,
            "ttl": self.ttl,
            "ciphertext": self.ciphertext,
            "sig": self.sig,
        }

    @property
    def raw(self) -> str:
        """Canonical compact JSON, as stored and as returned by changes (with the v3 fields, if any)."""
        return (
            f'{{"v":1,"msg_id":"{self.msg_id}","mailbox":"{self.mailbox}","sender":"{self.sender}",'
            f'"ts":{self.ts},"ttl":{self.ttl},"ciphertext":"{self.ciphertext}","sig":"{self.sig}"{self.suffix}}}'
        )

    @property
    def raw_v1(self) -> str:
        """The canonical v1 text (without ``permit``/``stamp``): what a client or a v1/v2 peer gets."""
        return strip_v3_fields(self.raw) if self.suffix else self.raw


_SIG_KEY = '","sig":"'
#: where a canonical envelope's v1 text ends, counted from the start of ``","sig":"``
_V1_TAIL = len(_SIG_KEY) + 86 + 1


def strip_v3_fields(raw: str) -> str:
    """A stored canonical envelope text without its version-3 ``permit``/``stamp`` fields.

    The v1 fields come first in canonical order and ``sig`` (86 b64u
    characters) is the last of them, so the v1 text ends right after it.
    """
    i = raw.find(_SIG_KEY)
    end = i + _V1_TAIL
    if i < 0 or end >= len(raw) - 1:
        return raw
    return raw[:end] + "}"


def parse_envelope(obj: Any, max_message_bytes: int) -> Envelope:
    """Check an envelope's size and shape and recompute its ``msg_id``.

    Raises ``too_large`` (ciphertext over the limit), ``bad_envelope`` (shape,
    unknown fields, ``msg_id`` mismatch).  The signature is checked separately
    by :func:`verify_envelope` so that it can run off the reactor thread.
    """
    if not isinstance(obj, dict):
        raise BadEnvelope("envelope must be a JSON object")
    ct_text = obj.get("ciphertext")
    if isinstance(ct_text, str) and len(ct_text) * 3 // 4 > max_message_bytes:
        # Size first, before decoding anything large.
        raise TooLarge(f"ciphertext over {max_message_bytes} bytes")
    keys = obj.keys()
    if keys != ENVELOPE_FIELDS:
        unknown = sorted(set(keys) - ENVELOPE_FIELDS)
        if unknown:
            raise BadEnvelope(f"unknown field(s): {', '.join(unknown)}")
        missing = sorted(ENVELOPE_FIELDS - set(keys))
        raise BadEnvelope(f"missing field(s): {', '.join(missing)}")
    v = obj["v"]
    if type(v) is not int or v != 1:
        raise BadEnvelope("unsupported envelope version")
    msg_id = obj["msg_id"]
    if not isinstance(msg_id, str) or HEX64_RE.fullmatch(msg_id) is None:
        raise BadEnvelope("msg_id must be 64 lowercase hex characters")
    mailbox_key = _decode_field(obj, "mailbox", KEY_LEN, BadEnvelope)
    sender_key = _decode_field(obj, "sender", KEY_LEN, BadEnvelope)
    sig_bytes = _decode_field(obj, "sig", SIG_LEN, BadEnvelope)
    ts = _int_field(obj, "ts", BadEnvelope)
    ttl = _int_field(obj, "ttl", BadEnvelope)
    ciphertext = _decode_field(obj, "ciphertext", None, BadEnvelope)
    if len(ciphertext) > max_message_bytes:
        raise TooLarge(f"ciphertext over {max_message_bytes} bytes")
    mailbox: str = obj["mailbox"]
    sender: str = obj["sender"]
    signed = envelope_signed_bytes(mailbox, sender, ts, ttl, ciphertext)
    if hashlib.sha256(signed).hexdigest() != msg_id:
        raise BadEnvelope("msg_id does not match the envelope")
    return Envelope(
        msg_id=msg_id,
        mailbox=mailbox,
        sender=sender,
        ts=ts,
        ttl=ttl,
        ciphertext=obj["ciphertext"],
        sig=obj["sig"],
        mailbox_key=mailbox_key,
        sender_key=sender_key,
        sig_bytes=sig_bytes,
        signed=signed,
        ct_size=len(ciphertext),
    )


def verify_envelope(env: Envelope) -> bool:
    """True when the envelope's signature is the sender's."""
    return verify_signature(env.sender_key, env.sig_bytes, env.signed)


def check_ttl(ttl: int, min_ttl: int, max_ttl: int) -> None:
    """Raise ``bad_ttl`` unless ``min_ttl <= ttl <= max_ttl``."""
    if not min_ttl <= ttl <= max_ttl:
        raise BadTTL(f"ttl must be in [{min_ttl}, {max_ttl}]")


def check_deposit_time(env: Envelope, now: int, clock_skew: int, min_ttl: int, max_ttl: int) -> None:
    """The deposit time rule: ``ts`` within skew of ``now``, not expired, ttl in range."""
    check_ttl(env.ttl, min_ttl, max_ttl)
    if abs(env.ts - now) > clock_skew:
        raise BadTimestamp(f"ts must be within {clock_skew}s of the node's clock ({now})")
    if env.expires <= now:
        raise BadTimestamp("envelope has expired")


def check_replica_time(env: Envelope, now: int, clock_skew: int, min_ttl: int, max_ttl: int) -> None:
    """The replica time rule: not more than skew in the future, not expired."""
    check_ttl(env.ttl, min_ttl, max_ttl)
    if env.ts > now + clock_skew:
        raise BadTimestamp("ts is in the future")
    if env.expires <= now:
        raise BadTimestamp("envelope has expired")


# --------------------------------------------------------------------------- polls and acks


def poll_signed_bytes(mailbox: str, ts: int, nonce: str, ack: list[str] | tuple[str, ...]) -> bytes:
    """The canonical bytes a poll's (or a signed ack's) ``sig`` covers."""
    return f"{POLL_DOMAIN}\n{mailbox}\n{ts}\n{nonce}\n{','.join(ack)}".encode("ascii")


@dataclass(frozen=True, slots=True)
class SignedAck:
    """A mailbox owner's signed request: a poll, a count, or an ack carried to peers."""

    mailbox: str
    ts: int
    nonce: str
    ack: tuple[str, ...]
    sig: str
    mailbox_key: bytes
    sig_bytes: bytes

    @property
    def signed(self) -> bytes:
        return poll_signed_bytes(self.mailbox, self.ts, self.nonce, self.ack)

    def to_json(self) -> dict[str, Any]:
        """The signed ack exactly as propagated to peers (5.2)."""
        return {
            "mailbox": self.mailbox,
            "ts": self.ts,
            "nonce": self.nonce,
            "ack": list(self.ack),
            "sig": self.sig,
        }

    def json_text(self) -> str:
        """``dumps_json(self.to_json())`` as text, built without the encoder walking the ids.

        Every node stores and pushes each signed ack it applies; for a 500-id
        ack (issue 10's junk acks) the generic encoder took about 140 us, on
        the reactor thread, twice per ack.  The ids are 64-hex strings
        (``_parse_signed``, the only constructor, checked them), so they need
        no escaping; the other strings go through the encoder.
        """
        ids = '"' + '","'.join(self.ack) + '"' if self.ack else ""
        mailbox, nonce, sig = (_ENCODER.encode(v) for v in (self.mailbox, self.nonce, self.sig))
        return f'{{"mailbox":{mailbox},"ts":{int(self.ts)},"nonce":{nonce},"ack":[{ids}],"sig":{sig}}}'


@dataclass(frozen=True, slots=True)
class PollRequest:
    """A parsed poll or count body."""

    auth: SignedAck
    limit: int
    wait: int
    fetch_remote: bool


def _all_hex64(items: list[Any]) -> bool:
    """Every item is a string of exactly 64 lowercase hex characters.

    Checked in a few C calls rather than one regex match per id: a junk ack
    of 500 ids is parsed on every node of the mesh, on the reactor thread.
    """
    if not items:
        return True
    try:
        joined = "".join(items)
    except TypeError:  # an item that is not a string
        return False
    if set(map(len, items)) != _LEN_64:
        return False
    # Hex that decodes and encodes back to the same text: lowercase, no whitespace (which
    # fromhex skips), nothing outside ASCII.  About half the time of one regex over the text.
    try:
        return bytes.fromhex(joined).hex() == joined
    except ValueError:
        return False


def _parse_signed(obj: dict[str, Any], err: type[Exception]) -> SignedAck:
    mailbox_key = _decode_field(obj, "mailbox", KEY_LEN, err)
    ts = _int_field(obj, "ts", err)
    _decode_field(obj, "nonce", NONCE_LEN, err)
    sig_bytes = _decode_field(obj, "sig", SIG_LEN, err)
    ack = obj.get("ack", [])
    if not isinstance(ack, list):
        raise err("ack must be a list of msg_ids")
    if len(ack) > MAX_ACK_IDS:
        raise err(f"at most {MAX_ACK_IDS} ack ids per request")
    if not _all_hex64(ack):
        raise err("each ack id must be 64 lowercase hex characters")
    return SignedAck(
        mailbox=obj["mailbox"],
        ts=ts,
        nonce=obj["nonce"],
        ack=tuple(ack),
        sig=obj["sig"],
        mailbox_key=mailbox_key,
        sig_bytes=sig_bytes,
    )


def parse_poll(obj: Any, *, count: bool = False) -> PollRequest:
    """Check a poll (or, with ``count=True``, a count) body's shape.

    Raises ``bad_request`` for unknown fields, wrong types and out-of-range
    ``limit``/``wait``, and for a count with a non-empty ``ack``.
    """
    obj = require_object(obj)
    unknown = set(obj) - POLL_FIELDS
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
    for name in ("mailbox", "ts", "nonce", "sig"):
        if name not in obj:
            raise BadRequest(f"missing field: {name}")
    auth = _parse_signed(obj, BadRequest)
    if count and auth.ack:
        raise BadRequest("count takes no ack ids")
    limit = obj.get("limit", MAX_POLL_LIMIT)
    if type(limit) is not int or not 1 <= limit <= MAX_POLL_LIMIT:
        raise BadRequest(f"limit must be an integer in [1, {MAX_POLL_LIMIT}]")
    wait = obj.get("wait", 0)
    if type(wait) is not int or not 0 <= wait <= MAX_WAIT:
        raise BadRequest(f"wait must be an integer in [0, {MAX_WAIT}]")
    fetch_remote = obj.get("fetch_remote", False)
    if type(fetch_remote) is not bool:
        raise BadRequest("fetch_remote must be a boolean")
    return PollRequest(auth=auth, limit=limit, wait=wait, fetch_remote=fetch_remote)


def parse_signed_ack(obj: Any) -> SignedAck:
    """Check the shape of a signed ack carried between peers (5.2)."""
    if not isinstance(obj, dict):
        raise BadRequest("ack must be a JSON object")
    if obj.keys() != ACK_FIELDS:
        raise BadRequest("an ack has exactly the fields mailbox, ts, nonce, ack, sig")
    return _parse_signed(obj, BadRequest)


def verify_signed(auth: SignedAck) -> bool:
    """True when the poll/ack signature is the mailbox owner's."""
    return verify_signature(auth.mailbox_key, auth.sig_bytes, auth.signed)


def check_poll_time(auth: SignedAck, now: int, clock_skew: int) -> None:
    """A poll's ``ts`` must be within skew of the node's clock (403 ``stale``)."""
    if abs(auth.ts - now) > clock_skew:
        raise Stale(f"ts must be within {clock_skew}s of the node's clock ({now})")


def check_ack_replica_time(auth: SignedAck, now: int, clock_skew: int, max_ttl: int) -> None:
    """The replica time rule for acks: not in the future, not older than its tombstone."""
    if auth.ts > now + clock_skew:
        raise BadTimestamp("ack ts is in the future")
    if auth.ts < now - max_ttl - 2 * clock_skew:
        raise BadTimestamp("ack is older than its tombstone lifetime")


def tombstone_expiry(ack_ts: int, max_ttl: int, clock_skew: int) -> int:
    """When a tombstone made by an ack signed at ``ack_ts`` may be forgotten."""
    return ack_ts + max_ttl + 2 * clock_skew


def require_valid_signature(ok: bool) -> None:
    """Raise ``bad_signature`` when ``ok`` is False."""
    if not ok:
        raise BadSignature("signature does not verify")


# --------------------------------------------------------------------------- signing (clients, tests)


def public_key_b64u(private: Ed25519PrivateKey) -> str:
    """The b64u mailbox/sender address of a private key."""
    return b64u_encode(private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))


def make_envelope(sender: Ed25519PrivateKey, mailbox: str, ciphertext: bytes, ts: int, ttl: int) -> dict[str, Any]:
    """Build and sign an envelope as a client does."""
    sender_b64 = public_key_b64u(sender)
    signed = envelope_signed_bytes(mailbox, sender_b64, ts, ttl, ciphertext)
    return {
        "v": 1,
        "msg_id": hashlib.sha256(signed).hexdigest(),
        "mailbox": mailbox,
        "sender": sender_b64,
        "ts": ts,
        "ttl": ttl,
        "ciphertext": b64u_encode(ciphertext),
        "sig": b64u_encode(sender.sign(signed)),
    }


def make_signed_request(
    mailbox_key: Ed25519PrivateKey, ts: int, nonce: bytes, ack: list[str] | tuple[str, ...] = ()
) -> dict[str, Any]:
    """Build the signed part of a poll/count body (mailbox, ts, nonce, ack, sig)."""
    mailbox = public_key_b64u(mailbox_key)
    nonce_b64 = b64u_encode(nonce)
    sig = mailbox_key.sign(poll_signed_bytes(mailbox, ts, nonce_b64, list(ack)))
    return {"mailbox": mailbox, "ts": ts, "nonce": nonce_b64, "ack": list(ack), "sig": b64u_encode(sig)}
