// Mailbox policies and send permits (docs/protocol.md sections 12.2 and 12.3), byte for byte as
// meshrelay/policy.py builds and checks them. Signing and verifying use libsodium: an Identity
// (or `await ready()`) must exist first.

import sodium from "libsodium-wrappers";
import { sha256 } from "@noble/hashes/sha2.js";
import { b64uDecode, b64uEncode, concat, toHex, utf8 } from "./encoding.js";
import { MeshrelayError } from "./errors.js";
import { parseAddress, unixNow } from "./identity.js";
import { MAX_DIFFICULTY } from "./stamp.js";


export const POLICY_DOMAIN = "meshrelay/policy/v1";
export const PERMIT_DOMAIN = "meshrelay/permit/v1";
/** The mailbox modes: `open` (v1 behaviour), `stamps` (strangers attach a stamp), `contacts` (strangers refused). */
export const MODES = Object.freeze(["open", "stamps", "contacts"]);
/** The difficulty `meshrelay policy set --mode stamps` uses when none is given. */
export const DEFAULT_DIFFICULTY = 20;
export const DEFAULT_STRANGER_CAP = 64;
export const PERMIT_TOKEN_PREFIX = "mrp1.";
const TOKEN_BYTES = 32 + 32 + 8 + 8 + 64;
const MAX_INT = 2 ** 53 - 1;
const POLICY_FIELDS = ["mailbox", "version", "mode", "difficulty", "stranger_cap", "epoch", "ts", "sig"];
const PERMIT_FIELDS = ["mailbox", "sender", "expires", "epoch", "sig"];

/**
 * @typedef {object} Policy A signed mailbox policy, as a node stores and serves it.
 * @property {string} mailbox
 * @property {number} version
 * @property {"open" | "stamps" | "contacts"} mode
 * @property {number} difficulty
 * @property {number} stranger_cap
 * @property {number} epoch
 * @property {number} ts
 * @property {string} sig
 */

/**
 * @typedef {object} Permit A send permit: `sender` may write to `mailbox` as a contact.
 * @property {string} mailbox
 * @property {string} sender
 * @property {number} expires
 * @property {number} epoch
 * @property {string} sig
 */

/** A policy or permit that is malformed, forged, or not usable by this sender. */
export class PolicyFormatError extends MeshrelayError {}
export class PermitError extends MeshrelayError {}

const isUint = (/** @type {unknown} */ v) => Number.isInteger(v) && /** @type {number} */ (v) >= 0 && /** @type {number} */ (v) <= MAX_INT;

/**
 * @param {Record<string, unknown>} obj
 * @param {string[]} fields
 */
function sameKeys(obj, fields) {
  const keys = Object.keys(obj);
  return keys.length === fields.length && fields.every((k) => Object.hasOwn(obj, k));
}

/**
 * @param {unknown} value
 * @param {number} len
 */
function isB64u(value, len) {
  if (typeof value !== "string") return false;
  try {
    return b64uDecode(value).length === len;
  } catch {
    return false;
  }
}

/**
 * The bytes a policy's `sig` covers: eight lines joined by "\n".
 * @param {Omit<Policy, "sig">} p
 * @returns {Uint8Array}
 */
export function policySignedBytes(p) {
  return utf8([POLICY_DOMAIN, p.mailbox, p.version, p.mode, p.difficulty, p.stranger_cap, p.epoch, p.ts].join("\n"));
}

/**
 * `hex(sha256(signed bytes))`: orders two policies of one version.
 * @param {Policy} p
 */
export const policyId = (p) => toHex(sha256(policySignedBytes(p)));

/**
 * Check a policy's shape as a node does (else PolicyFormatError); returns it typed.
 * @param {unknown} obj
 * @returns {Policy}
 */
export function parsePolicy(obj) {
  if (!obj || typeof obj !== "object" || Array.isArray(obj) || !sameKeys(/** @type {any} */ (obj), POLICY_FIELDS)) {
    throw new PolicyFormatError(`a policy is an object with exactly ${POLICY_FIELDS.join(", ")}`);
  }
  const p = /** @type {Record<string, unknown>} */ (obj);
  if (!isB64u(p.mailbox, 32)) throw new PolicyFormatError("policy mailbox is not an address");
  if (!isB64u(p.sig, 64)) throw new PolicyFormatError("policy sig is not 64 base64url bytes");
  for (const k of ["version", "difficulty", "stranger_cap", "epoch", "ts"]) {
    if (!isUint(p[k])) throw new PolicyFormatError(`policy ${k} must be an integer in [0, 2^53)`);
  }
  if (typeof p.mode !== "string" || !MODES.includes(p.mode)) throw new PolicyFormatError(`policy mode must be one of ${MODES.join(", ")}`);
  if (/** @type {number} */ (p.difficulty) > MAX_DIFFICULTY) throw new PolicyFormatError(`difficulty must be at most ${MAX_DIFFICULTY}`);
  if (p.mode === "stamps" && p.difficulty === 0) throw new PolicyFormatError("a stamps policy needs a difficulty of at least 1");
  return /** @type {Policy} */ (p);
}

/**
 * True when the policy (shape-checked) is signed by its mailbox key.
 * @param {Policy} policy
 */
export function verifyPolicy(policy) {
  return sodium.crypto_sign_verify_detached(b64uDecode(policy.sig), policySignedBytes(policy), b64uDecode(policy.mailbox));
}

/**
 * @typedef {object} PolicyFields
 * @property {number} version  higher than the mailbox's current policy's
 * @property {"open" | "stamps" | "contacts"} [mode]  default "open"
 * @property {number} [difficulty]  default 0 (DEFAULT_DIFFICULTY in stamps mode)
 * @property {number} [strangerCap]  default 64
 * @property {number} [epoch]  permits of a lower epoch are revoked; default 0
 * @property {number} [now]  signing time (Unix seconds)
 */

/**
 * Build and sign a policy for `identity`'s mailbox (store it with NodeClient.setPolicy).
 * @param {import("./identity.js").Identity} identity
 * @param {PolicyFields} fields
 * @returns {Policy}
 */
export function makePolicy(identity, { version, mode = "open", difficulty, strangerCap = DEFAULT_STRANGER_CAP, epoch = 0, now = unixNow() }) {
  /** @type {Omit<Policy, "sig">} */
  const body = {
    mailbox: identity.address,
    version,
    mode,
    difficulty: difficulty ?? (mode === "stamps" ? DEFAULT_DIFFICULTY : 0),
    stranger_cap: strangerCap,
    epoch,
    ts: now,
  };
  const policy = { ...body, sig: b64uEncode(identity.sign(policySignedBytes(body))) };
  return parsePolicy(policy); // refuses what a node would refuse, before it is sent
}

/**
 * The bytes a permit's `sig` covers: five lines joined by "\n".
 * @param {Omit<Permit, "sig">} p
 * @returns {Uint8Array}
 */
export function permitSignedBytes(p) {
  return utf8([PERMIT_DOMAIN, p.mailbox, p.sender, p.expires, p.epoch].join("\n"));
}

/**
 * Check a permit's shape as a node does (else PermitError).
 * @param {unknown} obj
 * @returns {Permit}
 */
export function parsePermit(obj) {
  if (!obj || typeof obj !== "object" || Array.isArray(obj) || !sameKeys(/** @type {any} */ (obj), PERMIT_FIELDS)) {
    throw new PermitError(`a permit is an object with exactly ${PERMIT_FIELDS.join(", ")}`);
  }
  const p = /** @type {Record<string, unknown>} */ (obj);
  if (!isB64u(p.mailbox, 32) || !isB64u(p.sender, 32)) throw new PermitError("permit mailbox and sender must be addresses");
  if (!isB64u(p.sig, 64)) throw new PermitError("permit sig is not 64 base64url bytes");
  if (!isUint(p.expires) || !isUint(p.epoch)) throw new PermitError("permit expires and epoch must be integers in [0, 2^53)");
  return /** @type {Permit} */ (p);
}

/**
 * True when the permit is signed by the key of the mailbox it names.
 * @param {Permit} permit
 */
export function verifyPermit(permit) {
  return sodium.crypto_sign_verify_detached(b64uDecode(permit.sig), permitSignedBytes(permit), b64uDecode(permit.mailbox));
}

/**
 * Sign a permit for `sender` to `identity`'s mailbox. Use the mailbox policy's `epoch`
 * (a lower one is revoked). `expires` is Unix seconds (default: 30 days from now).
 * @param {import("./identity.js").Identity} identity
 * @param {string} sender
 * @param {{expires?: number, epoch?: number}} [opts]
 * @returns {Permit}
 */
export function makePermit(identity, sender, { expires = unixNow() + 30 * 86400, epoch = 0 } = {}) {
  const body = { mailbox: identity.address, sender: b64uEncode(parseAddress(sender)), expires, epoch };
  return parsePermit({ ...body, sig: b64uEncode(identity.sign(permitSignedBytes(body))) });
}

/** @param {number} n @returns {Uint8Array} 8 bytes big-endian */
function u64(n) {
  const out = new Uint8Array(8);
  const view = new DataView(out.buffer);
  view.setUint32(0, Math.floor(n / 2 ** 32));
  view.setUint32(4, n >>> 0);
  return out;
}

/**
 * The printable token of a permit: "mrp1." + b64u(mailbox || sender || expires || epoch || sig), 197 characters.
 * @param {Permit} permit
 * @returns {string}
 */
export function permitToken(permit) {
  const p = parsePermit(permit);
  const raw = concat(b64uDecode(p.mailbox), b64uDecode(p.sender), u64(p.expires), u64(p.epoch), b64uDecode(p.sig));
  return PERMIT_TOKEN_PREFIX + b64uEncode(raw);
}

/**
 * Decode a permit token (shape only; see checkPermitToken for the signature, sender and expiry).
 * @param {string} token
 * @returns {Permit}
 */
export function parsePermitToken(token) {
  const text = String(token).trim();
  if (!text.startsWith(PERMIT_TOKEN_PREFIX)) throw new PermitError(`a permit token starts with "${PERMIT_TOKEN_PREFIX}"`);
  let raw;
  try {
    raw = b64uDecode(text.slice(PERMIT_TOKEN_PREFIX.length));
  } catch {
    throw new PermitError("a permit token is base64url after its prefix");
  }
  if (raw.length !== TOKEN_BYTES) throw new PermitError(`a permit token holds ${TOKEN_BYTES} bytes, not ${raw.length}`);
  const view = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
  const big = (/** @type {number} */ at) => view.getUint32(at) * 2 ** 32 + view.getUint32(at + 4);
  const expires = big(64);
  const epoch = big(72);
  if (!isUint(expires) || !isUint(epoch)) throw new PermitError("permit expires and epoch must be below 2^53");
  return parsePermit({
    mailbox: b64uEncode(raw.subarray(0, 32)),
    sender: b64uEncode(raw.subarray(32, 64)),
    expires,
    epoch,
    sig: b64uEncode(raw.subarray(80)),
  });
}

/**
 * Decode a token and check it offline for use by `sender`: signed by the mailbox it names,
 * for this sender, not expired (PermitError otherwise) — what `meshrelay permit add` checks.
 * @param {string} token
 * @param {string} sender
 * @param {{now?: number}} [opts]
 * @returns {Permit}
 */
export function checkPermitToken(token, sender, { now = unixNow() } = {}) {
  const permit = parsePermitToken(token);
  if (!verifyPermit(permit)) throw new PermitError("the permit is not signed by the mailbox it names (forged or damaged)");
  if (permit.sender !== sender) throw new PermitError(`the permit is for the sender ${permit.sender}, not for this key (${sender})`);
  if (permit.expires <= now) throw new PermitError("the permit has expired; ask the mailbox owner for a new one");
  return permit;
}

/**
 * The permits a sender was given, one per mailbox (the JSON form is the Python client's
 * permits.json: an object of mailbox address -> token).
 */
export class PermitBook {
  /** @type {Map<string, Permit>} */
  #permits = new Map();

  /** @param {string} sender  the address these permits are for (the sending identity's) */
  constructor(sender) {
    this.sender = b64uEncode(parseAddress(sender));
  }

  /**
   * Keep a permit token (checked as checkPermitToken does); returns the permit.
   * @param {string} token
   * @param {{now?: number}} [opts]
   */
  add(token, opts) {
    const permit = checkPermitToken(token, this.sender, opts);
    this.#permits.set(permit.mailbox, permit);
    return permit;
  }

  /**
   * The usable permit for `mailbox`, or null (none, or expired by `now`).
   * @param {string} mailbox
   * @param {{now?: number}} [opts]
   * @returns {Permit | null}
   */
  get(mailbox, { now = unixNow() } = {}) {
    const permit = this.#permits.get(mailbox);
    return permit && permit.expires > now ? permit : null;
  }

  /** @param {string} mailbox */
  delete(mailbox) {
    return this.#permits.delete(mailbox);
  }

  /** @returns {Record<string, string>} mailbox -> token */
  toJSON() {
    return Object.fromEntries([...this.#permits].map(([mailbox, permit]) => [mailbox, permitToken(permit)]));
  }

  /**
   * A book from its JSON form; tokens that are not usable by `sender` are skipped (as the CLI does).
   * @param {string} sender
   * @param {Record<string, string>} doc
   */
  static fromJSON(sender, doc) {
    const book = new PermitBook(sender);
    for (const token of Object.values(doc ?? {})) {
      try {
        book.add(token, { now: 0 });
      } catch {
        // a permit for another key kept in the same file
      }
    }
    return book;
  }
}
