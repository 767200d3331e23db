"""Domain errors and the one table that maps them to HTTP statuses.

Core code raises a :class:`MeshError` subclass; the web layer turns it into
``{"ok": false, "error": code, "detail": ...}`` with the status below.  The
codes and statuses are the protocol's (docs/protocol.md section 4.1).
"""

from __future__ import annotations

import math
from typing import Any

#: error code -> HTTP status, exactly the protocol's table.
STATUS_BY_CODE: dict[str, int] = {
    "bad_json": 400,
    "bad_envelope": 400,
    "bad_signature": 400,
    "bad_request": 400,
    "replayed": 403,
    "stale": 403,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "too_large": 413,
    "unsupported_media_type": 415,
    "bad_timestamp": 422,
    "bad_ttl": 422,
    "sender_cap": 429,
    "mailbox_full": 429,
    "rate_limited": 429,
    "storage_full": 429,
    # version 3: first contact (meshrelay.policy, docs/protocol.md section 12)
    "bad_policy": 400,
    "bad_stamp": 400,
    "bad_permit": 403,
    "permit_mismatch": 403,
    "permit_expired": 403,
    "permit_revoked": 403,
    "contacts_only": 403,
    "stamp_required": 403,
    "weak_stamp": 403,
    "stale_policy": 409,
    "stranger_full": 429,
    "unavailable": 503,
    "internal": 500,
}


#: seconds a 429 asks the caller to wait (the ``Retry-After`` header); every 429 carries one.
#: A rate limit refills within a second; a cap frees up only when envelopes are acked or expire.
RETRY_AFTER_BY_CODE: dict[str, int] = {
    "rate_limited": 1,
    "sender_cap": 60,
    "mailbox_full": 60,
    "storage_full": 60,
}
#: Retry-After for a 429 whose code has no entry above
DEFAULT_RETRY_AFTER = 1


class MeshError(Exception):
    """A refusal with a protocol error code; ``extra`` is merged into the body."""

    code = "bad_request"
    _retry_after = 0

    def __init__(self, detail: str = "", code: str | None = None, **extra: Any) -> None:
        super().__init__(detail)
        if code is not None:
            self.code = code
        self.detail = detail
        self.extra = extra

    @property
    def status(self) -> int:
        return STATUS_BY_CODE[self.code]

    @property
    def retry_after(self) -> int | None:
        """Seconds for the ``Retry-After`` header of a 429; None for other statuses."""
        if self.status != 429:
            return None
        return self._retry_after or RETRY_AFTER_BY_CODE.get(self.code, DEFAULT_RETRY_AFTER)

    def wait(self, seconds: float) -> MeshError:
        """Ask for ``seconds`` (rounded up, at least 1) in this 429's ``Retry-After``; returns self."""
        self._retry_after = max(1, math.ceil(seconds))
        return self

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": False, "error": self.code, "detail": self.detail}
        out.update(self.extra)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {self.detail!r})"


class BadJSON(MeshError):
    code = "bad_json"


class BadEnvelope(MeshError):
    code = "bad_envelope"


class BadSignature(MeshError):
    code = "bad_signature"


class BadRequest(MeshError):
    code = "bad_request"


class Replayed(MeshError):
    code = "replayed"


class Stale(MeshError):
    code = "stale"


class Forbidden(MeshError):
    code = "forbidden"


class TooLarge(MeshError):
    code = "too_large"


class UnsupportedMediaType(MeshError):
    code = "unsupported_media_type"


class BadTimestamp(MeshError):
    code = "bad_timestamp"


class BadTTL(MeshError):
    code = "bad_ttl"


class SenderCap(MeshError):
    code = "sender_cap"


class MailboxFull(MeshError):
    code = "mailbox_full"


class RateLimited(MeshError):
    code = "rate_limited"


class StorageFull(MeshError):
    code = "storage_full"


class Unavailable(MeshError):
    """The node cannot serve the request right now (store failure, shutting down)."""

    code = "unavailable"


# --------------------------------------------------------------------------- version 3: first contact


class BadPolicy(MeshError):
    """A mailbox policy's shape or values are wrong."""

    code = "bad_policy"


class BadStamp(MeshError):
    """An envelope's stamp is not canonical b64u of 8 bytes."""

    code = "bad_stamp"


class BadPermit(MeshError):
    """A permit is malformed or not signed by the mailbox key (forged)."""

    code = "bad_permit"


class PermitMismatch(MeshError):
    """A permit names another mailbox or another sender than the envelope carrying it."""

    code = "permit_mismatch"


class PermitExpired(MeshError):
    """A permit had expired when the envelope was made."""

    code = "permit_expired"


class PermitRevoked(MeshError):
    """A permit's epoch is older than the mailbox policy's epoch."""

    code = "permit_revoked"


class ContactsOnly(MeshError):
    """The mailbox policy refuses mail from strangers."""

    code = "contacts_only"


class StampRequired(MeshError):
    """The mailbox policy asks strangers for a stamp and there is none."""

    code = "stamp_required"


class WeakStamp(MeshError):
    """The stamp has less work than the mailbox policy asks for."""

    code = "weak_stamp"


class StalePolicy(MeshError):
    """A policy not newer than the one the node holds."""

    code = "stale_policy"


class StrangerFull(MeshError):
    """The mailbox's stranger bucket is at its cap (contact mail is unaffected)."""

    code = "stranger_full"
