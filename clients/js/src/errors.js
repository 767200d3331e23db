// Errors: one class per protocol error code (docs/protocol.md section 4.1), plus the client's own.

/** Any error this library throws on purpose. */
export class MeshrelayError extends Error {
  /** @param {string} message */
  constructor(message) {
    super(message);
    this.name = new.target.name;
  }
}

/** Not a mailbox address (b64u of a 32-byte Ed25519 public key). */
export class BadAddressError extends MeshrelayError {}
/** A key file or stored identity that is malformed or damaged. */
export class KeyFileError extends MeshrelayError {}
/** The node could not be reached (refused, DNS, timeout, CORS refused by the browser). */
export class NodeUnreachableError extends MeshrelayError {}
/** The node answered something that is not the protocol (not JSON, wrong shape). */
export class ProtocolError extends MeshrelayError {}

/** A received envelope that could not be accepted; `msgId` names it. */
export class MessageError extends MeshrelayError {
  /** @param {string} msgId @param {string} reason */
  constructor(msgId, reason) {
    super(`message ${msgId.slice(0, 16)}: ${reason}`);
    this.msgId = msgId;
    this.reason = reason;
  }
}
/** The envelope's shape, msg_id, signature or mailbox is wrong. */
export class BadMessageError extends MessageError {}
/** The ciphertext does not open with this identity. */
export class DecryptError extends MessageError {}
/** The sender sealed inside the message is not the one who signed the envelope. */
export class SenderMismatchError extends MessageError {}

/**
 * The node refused a request with a protocol error code.
 * `retryAfter` is the Retry-After header in seconds (a 429 carries one), else null.
 */
export class RemoteError extends MeshrelayError {
  /** @type {string} */
  static code = "";
  /**
   * @param {number} status
   * @param {string} code
   * @param {string} detail
   * @param {Record<string, unknown>} [body]
   * @param {number | null} [retryAfter]
   */
  constructor(status, code, detail, body = {}, retryAfter = null) {
    super(`node refused the request (${status} ${detail ? `${code}: ${detail}` : code})`);
    this.status = status;
    this.code = code;
    this.detail = detail;
    this.body = body;
    this.retryAfter = retryAfter;
  }
}

/** The protocol's error table: code -> HTTP status (meshrelay/errors.py STATUS_BY_CODE). */
export const STATUS_BY_CODE = Object.freeze({
  bad_json: 400,
  bad_envelope: 400,
  bad_signature: 400,
  bad_request: 400,
  replayed: 403,
  stale: 403,
  forbidden: 403,
  not_found: 404,
  method_not_allowed: 405,
  too_large: 413,
  unsupported_media_type: 415,
  bad_timestamp: 422,
  bad_ttl: 422,
  sender_cap: 429,
  mailbox_full: 429,
  rate_limited: 429,
  storage_full: 429,
  // version 3: first contact (docs/protocol.md section 12)
  bad_policy: 400,
  bad_stamp: 400,
  bad_permit: 403,
  permit_mismatch: 403,
  permit_expired: 403,
  permit_revoked: 403,
  contacts_only: 403,
  stamp_required: 403,
  weak_stamp: 403,
  stale_policy: 409,
  stranger_full: 429,
  unavailable: 503,
  internal: 500,
});

export class BadJSONError extends RemoteError { static code = "bad_json"; }
export class BadEnvelopeError extends RemoteError { static code = "bad_envelope"; }
export class BadSignatureError extends RemoteError { static code = "bad_signature"; }
export class BadRequestError extends RemoteError { static code = "bad_request"; }
export class ReplayedError extends RemoteError { static code = "replayed"; }
export class StaleError extends RemoteError { static code = "stale"; }
export class ForbiddenError extends RemoteError { static code = "forbidden"; }
export class NotFoundError extends RemoteError { static code = "not_found"; }
export class MethodNotAllowedError extends RemoteError { static code = "method_not_allowed"; }
export class TooLargeError extends RemoteError { static code = "too_large"; }
export class UnsupportedMediaTypeError extends RemoteError { static code = "unsupported_media_type"; }
export class BadTimestampError extends RemoteError { static code = "bad_timestamp"; }
export class BadTTLError extends RemoteError { static code = "bad_ttl"; }
/** Too many unacked envelopes from this sender in this mailbox: `pending` of `limit`. */
export class SenderCapError extends RemoteError {
  static code = "sender_cap";
  /**
   * @param {number} status
   * @param {string} code
   * @param {string} detail
   * @param {Record<string, unknown>} [body]
   * @param {number | null} [retryAfter]
   */
  constructor(status, code, detail, body = {}, retryAfter = null) {
    super(status, code, detail, body, retryAfter);
    /** @type {number | null} */
    this.pending = Number.isInteger(body.pending) ? /** @type {number} */ (body.pending) : null;
    /** @type {number | null} */
    this.limit = Number.isInteger(body.limit) ? /** @type {number} */ (body.limit) : null;
  }
}
export class MailboxFullError extends RemoteError { static code = "mailbox_full"; }
export class RateLimitedError extends RemoteError { static code = "rate_limited"; }
export class StorageFullError extends RemoteError { static code = "storage_full"; }
/** Version 3's refusals of a stranger's envelope that carry the policy's `difficulty` (or null). */
export class StampRefusedError extends RemoteError {
  /**
   * @param {number} status
   * @param {string} code
   * @param {string} detail
   * @param {Record<string, unknown>} [body]
   * @param {number | null} [retryAfter]
   */
  constructor(status, code, detail, body = {}, retryAfter = null) {
    super(status, code, detail, body, retryAfter);
    /** @type {number | null} the difficulty the node's policy asks for: solve again at it */
    this.difficulty = Number.isInteger(body.difficulty) ? /** @type {number} */ (body.difficulty) : null;
  }
}
export class BadPolicyError extends RemoteError { static code = "bad_policy"; }
export class BadStampError extends RemoteError { static code = "bad_stamp"; }
export class BadPermitError extends RemoteError { static code = "bad_permit"; }
export class PermitMismatchError extends RemoteError { static code = "permit_mismatch"; }
export class PermitExpiredError extends RemoteError { static code = "permit_expired"; }
export class PermitRevokedError extends RemoteError { static code = "permit_revoked"; }
/** The mailbox takes mail only from its contacts: ask its owner for a permit. */
export class ContactsOnlyError extends RemoteError { static code = "contacts_only"; }
/** The mailbox asks strangers for a stamp of `difficulty` bits. */
export class StampRequiredError extends StampRefusedError { static code = "stamp_required"; }
/** The stamp has less work than the policy's `difficulty`. */
export class WeakStampError extends StampRefusedError { static code = "weak_stamp"; }
/** The policy does not order above the one the node holds (a higher `version` is needed). */
export class StalePolicyError extends RemoteError { static code = "stale_policy"; }
/** The mailbox's stranger bucket is full (contacts still get through). */
export class StrangerFullError extends RemoteError { static code = "stranger_full"; }
export class UnavailableError extends RemoteError { static code = "unavailable"; }
export class InternalError extends RemoteError { static code = "internal"; }

/** @type {Readonly<Record<string, typeof RemoteError>>} protocol error code -> class */
export const ERROR_CLASSES = Object.freeze(
  Object.fromEntries(
    [
      BadJSONError, BadEnvelopeError, BadSignatureError, BadRequestError, ReplayedError, StaleError,
      ForbiddenError, NotFoundError, MethodNotAllowedError, TooLargeError, UnsupportedMediaTypeError,
      BadTimestampError, BadTTLError, SenderCapError, MailboxFullError, RateLimitedError, StorageFullError,
      BadPolicyError, BadStampError, BadPermitError, PermitMismatchError, PermitExpiredError, PermitRevokedError,
      ContactsOnlyError, StampRequiredError, WeakStampError, StalePolicyError, StrangerFullError,
      UnavailableError, InternalError,
    ].map((cls) => [cls.code, cls]),
  ),
);

/**
 * The error for a non-2xx answer: the code's class, else a ProtocolError.
 * @param {number} status
 * @param {unknown} body
 * @param {number | null} [retryAfter]
 * @returns {MeshrelayError}
 */
export function errorFromResponse(status, body, retryAfter = null) {
  if (body && typeof body === "object" && typeof (/** @type {any} */ (body).error) === "string") {
    const doc = /** @type {Record<string, unknown>} */ (body);
    const code = /** @type {string} */ (doc.error);
    const detail = typeof doc.detail === "string" ? doc.detail : "";
    const cls = ERROR_CLASSES[code] ?? RemoteError;
    return new cls(status, code, detail, doc, retryAfter);
  }
  return new ProtocolError(`node answered HTTP ${status} without a protocol error body`);
}
