"""A small client library for meshrelay nodes: keys, envelopes, encryption, HTTP.

The ``meshrelay`` command (:mod:`meshrelay.cli`) and the integration tests use
it; client developers can use it as a reference.  What it does:

- **Identity** (:class:`Identity`): one Ed25519 key.  Its public key is the
  mailbox address (b64u, 43 characters) and the sender key of what it sends.
  The X25519 key used for encryption is *derived* from it with libsodium's
  Ed25519 -> Curve25519 conversion (PyNaCl), so an address is all a sender
  needs to encrypt to someone.
- **Key files**: JSON, mode 0600, written atomically; loading refuses a file
  that others can read.
- **Messages**: :func:`seal_text` encrypts ``MAGIC || sender public key ||
  text`` to the recipient with a libsodium sealed box; :meth:`Identity.open_envelope`
  checks an envelope's ``msg_id`` and signature, decrypts it and checks that
  the sender inside matches the sender who signed (so nobody can re-sign
  someone else's ciphertext under their own name).
- **Signing**: envelopes and poll/count bodies are built with the same helpers
  the node's tests use (:func:`meshrelay.envelope.make_envelope`,
  :func:`meshrelay.envelope.make_signed_request`), each request with a fresh
  16-byte nonce.
- **HTTP** (:class:`NodeClient`): synchronous, standard library only; every
  protocol error code becomes its own exception class (:data:`ERROR_CLASSES`).
"""

from __future__ import annotations

import json
import os
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import nacl.exceptions
import nacl.public
import nacl.signing
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshrelay import envelope as E
from meshrelay import policy as P
from meshrelay.config import normalize_url
from meshrelay.errors import STATUS_BY_CODE, MeshError
from meshrelay.files import PrivateFileError, write_private_file

#: the first bytes of every plaintext the CLI seals (version of the payload convention)
MAGIC = b"MRT1"
#: key file format marker
KEY_FILE_FORMAT = "meshrelay-identity-v1"
#: the protocol's default ttl for messages sent by the CLI (one day)
DEFAULT_TTL = 86400
#: parse_envelope size cap on the client side (the node enforces its own, smaller limit)
_CLIENT_MAX_MESSAGE = 64 * 1024 * 1024


# --------------------------------------------------------------------------- errors


class ClientError(Exception):
    """A problem a user can act on; ``str(e)`` is one line."""


class KeyFileError(ClientError):
    """The key file is missing, unreadable, malformed or too widely readable."""


class BadAddress(ClientError):
    """Not a mailbox address (b64u of a 32-byte Ed25519 public key)."""


class NodeUnreachable(ClientError):
    """The node could not be reached (refused, DNS, timeout, TLS)."""


class ProtocolError(ClientError):
    """The node answered something that is not the protocol (not JSON, wrong shape)."""


class MessageError(ClientError):
    """A received envelope that could not be accepted; ``msg_id`` names it."""

    def __init__(self, msg_id: str, reason: str) -> None:
        super().__init__(f"message {msg_id[:16]}: {reason}")
        self.msg_id = msg_id
        self.reason = reason


class BadMessage(MessageError):
    """The envelope's shape, ``msg_id``, signature or mailbox is wrong."""


class DecryptError(MessageError):
    """The ciphertext does not open with this identity (wrong key or tampered)."""


class SenderMismatch(MessageError):
    """The sender sealed inside the message is not the one who signed the envelope."""


class RemoteError(ClientError):
    """The node refused a request with a protocol error code."""

    code = ""

    def __init__(self, status: int, code: str, detail: str, body: dict[str, Any] | None = None) -> None:
        text = f"{code}: {detail}" if detail else code
        super().__init__(f"node refused the request ({status} {text})")
        self.status = status
        self.code = code
        self.detail = detail
        self.body = body or {}


class SenderCapError(RemoteError):
    """Too many unacked envelopes from this sender in this mailbox (``pending`` of ``limit``)."""

    code = "sender_cap"

    def __init__(self, status: int, code: str, detail: str, body: dict[str, Any] | None = None) -> None:
        super().__init__(status, code, detail, body)
        pending, limit = self.body.get("pending"), self.body.get("limit")
        self.pending: int | None = pending if type(pending) is int else None
        self.limit: int | None = limit if type(limit) is int else None
        if self.pending is not None and self.limit is not None:
            self.args = (
                f"node refused the request ({status} sender_cap: {self.pending} of {self.limit} "
                "messages from you are still unread in that mailbox)",
            )


#: words of an error code spelled as acronyms in its class name
_ACRONYMS = {"json": "JSON", "ttl": "TTL"}


def error_class_name(code: str) -> str:
    """``bad_ttl`` -> ``BadTTLError``: the name of the exception class of a protocol error code."""
    return "".join(_ACRONYMS.get(word, word.capitalize()) for word in code.split("_")) + "Error"


def _derive_error_classes() -> dict[str, type[RemoteError]]:
    """One :class:`RemoteError` subclass per code of the node's error table (:data:`STATUS_BY_CODE`).

    Codes whose answers carry more than ``detail`` have a hand-written class
    (:class:`SenderCapError`); every other class is made here, so a code
    added to the table gets its class without a second list to keep in step.
    """
    written: dict[str, type[RemoteError]] = {SenderCapError.code: SenderCapError}
    classes: dict[str, type[RemoteError]] = {}
    for code in STATUS_BY_CODE:
        cls = written.get(code)
        if cls is None:
            doc = f"The node refused the request with ``{code}`` (HTTP {STATUS_BY_CODE[code]})."
            cls = cast(
                "type[RemoteError]",
                type(error_class_name(code), (RemoteError,), {"code": code, "__doc__": doc, "__module__": __name__}),
            )
        classes[code] = cls
    return classes


#: protocol error code -> exception class, one per code in meshrelay.errors.STATUS_BY_CODE; each class is
#: also a name of this module (``meshrelay.client.MailboxFullError``)
ERROR_CLASSES: dict[str, type[RemoteError]] = _derive_error_classes()
globals().update({cls.__name__: cls for cls in ERROR_CLASSES.values()})


def error_from_response(status: int, body: Any) -> ClientError:
    """The exception for a non-2xx answer: the code's class, or a ProtocolError."""
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        code = body["error"]
        detail = body.get("detail")
        cls = ERROR_CLASSES.get(code, RemoteError)
        return cls(status, code, detail if isinstance(detail, str) else "", body)
    return ProtocolError(f"node answered HTTP {status} without a protocol error body")


# --------------------------------------------------------------------------- keys


def parse_address(address: str) -> bytes:
    """The 32 raw bytes of a mailbox address; raise :class:`BadAddress` otherwise."""
    try:
        raw = E.b64u_decode(address.strip())
    except ValueError:
        raise BadAddress(f"not a mailbox address (43 base64url characters expected): {address[:60]!r}") from None
    if len(raw) != E.KEY_LEN:
        raise BadAddress(f"not a mailbox address (must decode to 32 bytes, got {len(raw)}): {address[:60]!r}")
    return raw


def encryption_key_for(address: str) -> nacl.public.PublicKey:
    """The X25519 key derived from a mailbox address (for sealing to it)."""
    raw = parse_address(address)
    try:
        return nacl.signing.VerifyKey(raw).to_curve25519_public_key()
    except (nacl.exceptions.CryptoError, nacl.exceptions.RuntimeError, ValueError):
        raise BadAddress(f"not a mailbox address (not an Ed25519 public key): {address[:60]!r}") from None


class Identity:
    """An Ed25519 identity: a mailbox address and a sender key, plus its derived X25519 key."""

    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise ValueError("an Ed25519 seed is 32 bytes")
        self.seed = seed
        self.signing_key = Ed25519PrivateKey.from_private_bytes(seed)
        self.address = E.public_key_b64u(self.signing_key)
        self._box_key = nacl.signing.SigningKey(seed).to_curve25519_private_key()

    @classmethod
    def generate(cls) -> Identity:
        return cls(os.urandom(32))

    def __repr__(self) -> str:
        return f"Identity({self.address})"

    # ---------------------------------------------------------------- key files

    def to_json(self) -> dict[str, Any]:
        return {"format": KEY_FILE_FORMAT, "ed25519_seed": E.b64u_encode(self.seed), "address": self.address}

    def save(self, path: str, force: bool = False) -> None:
        """Write the key file with mode 0600; refuse to replace one unless ``force``."""
        try:
            write_private_file(path, json.dumps(self.to_json(), indent=2) + "\n", force=force)
        except PrivateFileError as e:
            raise KeyFileError(str(e)) from None

    @classmethod
    def load(cls, path: str) -> Identity:
        """Read a key file; any problem is a one-line :class:`KeyFileError`."""
        path = os.path.expanduser(path)
        try:
            st = os.stat(path)
            if os.name == "posix" and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise KeyFileError(
                    f"{path} is accessible by other users (mode {stat.S_IMODE(st.st_mode):o}); run: chmod 600 {path}"
                )
            with open(path, encoding="utf-8") as fh:
                text = fh.read(64 * 1024)
        except FileNotFoundError:
            raise KeyFileError(f"no key file at {path} (create one with: meshrelay keygen)") from None
        except UnicodeDecodeError:
            raise KeyFileError(f"{path} is not a meshrelay key file (not UTF-8 text)") from None
        except OSError as e:
            raise KeyFileError(f"cannot read key file {path}: {e.strerror or e}") from None
        try:
            doc = json.loads(text)
        except ValueError:
            raise KeyFileError(f"{path} is not a meshrelay key file (not JSON)") from None
        if not isinstance(doc, dict) or doc.get("format") != KEY_FILE_FORMAT:
            raise KeyFileError(f"{path} is not a meshrelay key file (format is not {KEY_FILE_FORMAT!r})")
        try:
            seed = E.b64u_decode(doc.get("ed25519_seed", ""))
        except ValueError:
            seed = b""
        if len(seed) != 32:
            raise KeyFileError(f"{path}: ed25519_seed must be base64url of 32 bytes")
        ident = cls(seed)
        if doc.get("address", ident.address) != ident.address:
            raise KeyFileError(f"{path}: the address does not belong to the seed (the file is damaged)")
        return ident

    # ---------------------------------------------------------------- signing

    def envelope(self, to: str, ciphertext: bytes, ttl: int = DEFAULT_TTL, now: int | None = None) -> dict[str, Any]:
        """A signed envelope from this identity to mailbox ``to``."""
        mailbox = E.b64u_encode(parse_address(to))  # canonical: no surrounding space
        ts = int(time.time()) if now is None else now
        return E.make_envelope(self.signing_key, mailbox, ciphertext, ts, ttl)

    def signed_request(
        self, ack: Sequence[str] = (), now: int | None = None, nonce: bytes | None = None
    ) -> dict[str, Any]:
        """The signed part of a poll or count body, with a fresh 16-byte nonce."""
        ts = int(time.time()) if now is None else now
        return E.make_signed_request(self.signing_key, ts, nonce if nonce is not None else os.urandom(16), list(ack))

    def policy(
        self,
        version: int,
        mode: str = P.OPEN,
        difficulty: int = 0,
        stranger_cap: int = P.DEFAULT_STRANGER_CAP,
        epoch: int = 0,
        now: int | None = None,
    ) -> dict[str, Any]:
        """A mailbox policy for this identity's mailbox, signed (``POST /api/mesh/dm/policy``)."""
        ts = int(time.time()) if now is None else now
        return P.make_policy(
            self.signing_key,
            version=version,
            mode=mode,
            difficulty=difficulty,
            stranger_cap=stranger_cap,
            epoch=epoch,
            ts=ts,
        )

    def permit(self, sender: str, expires: int, epoch: int = 0) -> str:
        """A send permit for ``sender`` to this mailbox, as a printable token (hand it over out of band)."""
        sender = E.b64u_encode(parse_address(sender))
        return P.parse_permit(P.make_permit(self.signing_key, sender, expires, epoch)).token()

    # ---------------------------------------------------------------- encryption

    def seal_text(self, to: str, text: bytes) -> bytes:
        """Encrypt ``text`` to ``to``'s derived X25519 key, with this identity as the sealed sender."""
        return seal_text(to, self.address, text)

    def decrypt(self, ciphertext: bytes) -> bytes:
        """Open a sealed box addressed to this identity; raises ``nacl`` CryptoError."""
        return bytes(nacl.public.SealedBox(self._box_key).decrypt(ciphertext))

    def open_envelope(self, obj: Any) -> Message:
        """Verify an envelope (shape, ``msg_id``, signature, mailbox), decrypt it, check its sender."""
        msg_id = obj.get("msg_id") if isinstance(obj, dict) else None
        label = msg_id if isinstance(msg_id, str) else "(no msg_id)"
        try:
            env = E.parse_envelope(obj, _CLIENT_MAX_MESSAGE)
        except MeshError as e:
            raise BadMessage(label, f"malformed envelope ({e.detail})") from None
        if not E.verify_envelope(env):
            raise BadMessage(env.msg_id, "the sender's signature does not verify")
        if env.mailbox != self.address:
            raise BadMessage(env.msg_id, "addressed to another mailbox")
        try:
            plain = self.decrypt(E.b64u_decode(env.ciphertext))
        except (nacl.exceptions.CryptoError, ValueError):
            raise DecryptError(
                env.msg_id, "cannot decrypt (not encrypted to this key, or the ciphertext was altered)"
            ) from None
        if not plain.startswith(MAGIC) or len(plain) < len(MAGIC) + E.KEY_LEN:
            raise BadMessage(env.msg_id, "not a meshrelay text message")
        inner_sender = E.b64u_encode(plain[len(MAGIC) : len(MAGIC) + E.KEY_LEN])
        if inner_sender != env.sender:
            raise SenderMismatch(env.msg_id, "the sender inside the message is not the one who signed it")
        return Message(
            msg_id=env.msg_id, sender=env.sender, ts=env.ts, ttl=env.ttl, text=plain[len(MAGIC) + E.KEY_LEN :]
        )


def check_permit_token(token: str, sender: str, now: int | None = None) -> P.Permit:
    """Parse a permit token and check it offline: signed by its mailbox, for ``sender``, not expired."""
    try:
        permit = P.parse_permit_token(token)
    except MeshError as e:
        raise ClientError(f"not a permit token: {e.detail}") from None
    if not P.verify_permit(permit):
        raise ClientError("the permit is not signed by the mailbox it names (forged or damaged)")
    if permit.sender != sender:
        raise ClientError(f"the permit is for the sender {permit.sender}, not for this key ({sender})")
    if permit.expires <= (int(time.time()) if now is None else now):
        raise ClientError("the permit has expired; ask the mailbox owner for a new one")
    return permit


def first_contact(
    envelope: dict[str, Any],
    permit: P.Permit | None,
    policy: dict[str, Any] | None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """The envelope with what the mailbox's policy asks for: a permit when there is one, else a stamp.

    ``policy`` is the mailbox's policy as the node serves it (None: no policy,
    or a node before protocol version 3, which gets the plain v1 envelope).
    A ``contacts`` policy without a permit is a :class:`ClientError` (the node
    would refuse it).  ``progress(tries, difficulty)`` is called while a stamp
    is being computed.
    """
    if permit is not None:
        if permit.mailbox != envelope["mailbox"]:
            raise ClientError("the permit is for another mailbox")
        return {**envelope, "permit": permit.to_json()}
    if policy is None:
        return envelope
    mode, difficulty = policy.get("mode"), policy.get("difficulty")
    if mode == P.CONTACTS:
        raise ClientError("this mailbox takes mail only from its contacts: ask its owner for a permit")
    if mode == P.STAMPS and type(difficulty) is int and 0 < difficulty <= P.MAX_DIFFICULTY:
        d = difficulty
        stamp = P.solve_stamp(
            envelope["msg_id"], d, progress=None if progress is None else (lambda tries: progress(tries, d))
        )
        return {**envelope, "stamp": stamp}
    return envelope


def seal_text(to: str, sender: str, text: bytes) -> bytes:
    """``SealedBox(to's X25519 key).encrypt(MAGIC || sender public key || text)``."""
    box = nacl.public.SealedBox(encryption_key_for(to))
    return bytes(box.encrypt(MAGIC + parse_address(sender) + text))


@dataclass(frozen=True)
class Message:
    """A verified, decrypted message."""

    msg_id: str
    sender: str
    ts: int
    ttl: int
    text: bytes


@dataclass(frozen=True)
class PollResult:
    messages: list[dict[str, Any]]
    has_more: bool


# --------------------------------------------------------------------------- HTTP


def check_node_url(url: str) -> str:
    """The node's base URL without a trailing ``/``; raise :class:`ClientError` if it is not http(s)."""
    try:
        normalize_url(url)
    except ValueError:
        raise ClientError(f"not a node URL (expected http://host:port): {url!r}") from None
    return url.strip().rstrip("/")


class NodeClient:
    """Blocking JSON-over-HTTP access to one node's client API."""

    def __init__(self, base_url: str, timeout: float = 30.0) -> None:
        self.base_url = check_node_url(base_url)
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> dict[str, Any]:
        """One request; the decoded ``{"ok": true, ...}`` body, else a :class:`ClientError`."""
        data = None if body is None else json.dumps(body, separators=(",", ":")).encode("utf-8")
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        req.add_header("Accept", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            try:
                raw_err = e.read()
            except OSError:
                raw_err = b""
            finally:
                e.close()
            raise error_from_response(e.code, _json_or_none(raw_err)) from None
        except urllib.error.URLError as e:
            raise NodeUnreachable(f"cannot reach the node at {self.base_url}: {_reason(e.reason)}") from None
        except TimeoutError:
            raise NodeUnreachable(f"the node at {self.base_url} did not answer in time") from None
        except OSError as e:
            raise NodeUnreachable(f"connection to {self.base_url} failed: {_reason(e)}") from None
        doc = _json_or_none(raw)
        if not isinstance(doc, dict) or doc.get("ok") is not True:
            raise ProtocolError(f"node answered HTTP {status} with an unexpected body")
        return doc

    def health(self) -> dict[str, Any]:
        return self.request("GET", "/api/mesh/health")

    def send(self, envelope: dict[str, Any]) -> dict[str, Any]:
        """Deposit a signed envelope; ``{"ok", "msg_id", "duplicate"}``."""
        return self.request("POST", "/api/mesh/dm/send", envelope)

    def get_policy(self, mailbox: str) -> dict[str, Any] | None:
        """The mailbox's policy at this node (public), or None when it has none.

        A node before protocol version 3 answers ``404 not_found``: also None
        (it treats every sender the v1 way).
        """
        query = urllib.parse.urlencode({"mailbox": E.b64u_encode(parse_address(mailbox))})
        try:
            doc = self.request("GET", "/api/mesh/dm/policy?" + query)
        except ERROR_CLASSES["not_found"]:
            return None
        policy = doc.get("policy")
        if policy is not None and not isinstance(policy, dict):
            raise ProtocolError("policy answer has no policy object")
        return policy

    def set_policy(self, policy: dict[str, Any]) -> dict[str, Any]:
        """Store a signed policy; ``{"ok", "version", "duplicate"}`` (``stale_policy`` when not newer)."""
        return self.request("POST", "/api/mesh/dm/policy", policy)

    def poll(
        self,
        identity: Identity,
        ack: Sequence[str] = (),
        limit: int = 100,
        wait: int = 0,
        fetch_remote: bool = False,
    ) -> PollResult:
        """Ack ``ack`` and fetch up to ``limit`` pending envelopes (long-polling ``wait`` s)."""
        body = identity.signed_request(ack)
        body.update(limit=limit, wait=wait, fetch_remote=fetch_remote)
        doc = self.request("POST", "/api/mesh/dm/poll", body, timeout=self.timeout + wait)
        messages, more = doc.get("messages"), doc.get("has_more", False)
        if not isinstance(messages, list) or not isinstance(more, bool):
            raise ProtocolError("poll answer has no messages list")
        return PollResult(messages=messages, has_more=more)

    def ack(self, identity: Identity, ids: Sequence[str]) -> None:
        """Ack ``ids`` (a poll with limit 1 whose messages are ignored)."""
        for start in range(0, len(ids), E.MAX_ACK_IDS):
            self.poll(identity, ack=ids[start : start + E.MAX_ACK_IDS], limit=1)

    def count(self, identity: Identity) -> int:
        doc = self.request("POST", "/api/mesh/dm/count", identity.signed_request())
        n = doc.get("count")
        if type(n) is not int:
            raise ProtocolError("count answer has no integer count")
        return n


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _reason(reason: Any) -> str:
    if isinstance(reason, OSError) and reason.strerror:
        return str(reason.strerror)
    return str(reason) or type(reason).__name__
