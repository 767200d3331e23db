// Identities, signing and the sealed-box message convention, exactly as meshrelay/client.py.
//
// - An identity is one Ed25519 key; its public key (b64u) is the mailbox address and the sender key.
// - Its X25519 key is derived from the Ed25519 key with libsodium's conversion
//   (crypto_sign_ed25519_{pk,sk}_to_curve25519), so an address is all a sender needs to encrypt.
// - A message is crypto_box_seal("MRT1" || sender public key || text) to the recipient's X25519 key.
// - Envelopes and poll/count bodies are signed as docs/protocol.md sections 3.2 and 4.3 say.

import sodium from "libsodium-wrappers";
import { sha256 } from "@noble/hashes/sha2.js";
import { b64uDecode, b64uEncode, concat, fromHex, fromUtf8, toHex, utf8 } from "./encoding.js";
import {
  BadAddressError,
  BadMessageError,
  DecryptError,
  KeyFileError,
  SenderMismatchError,
} from "./errors.js";

/** The first bytes of every sealed plaintext (version of the payload convention). */
export const MAGIC = utf8("MRT1");
/** Key file / stored identity format marker (the Python client's key file format). */
export const KEY_FILE_FORMAT = "meshrelay-identity-v1";
/** Default envelope lifetime: one day. */
export const DEFAULT_TTL = 86400;
/** At most this many ack ids per poll. */
export const MAX_ACK_IDS = 500;
const KEY_LEN = 32;
const SIG_LEN = 64;
const MAX_INT = 2 ** 53 - 1;
const HEX64 = /^[0-9a-f]{64}$/;
const ENVELOPE_KEYS = ["v", "msg_id", "mailbox", "sender", "ts", "ttl", "ciphertext", "sig"];

/** Wait for libsodium to load (every other function needs it; Identity factories wait themselves). */
export async function ready() {
  await sodium.ready;
}

/** @returns {number} the current Unix time in whole seconds */
export const unixNow = () => Math.floor(Date.now() / 1000);

/**
 * The 32 raw bytes of a mailbox address.
 * @param {string} address
 * @returns {Uint8Array}
 */
export function parseAddress(address) {
  let raw;
  try {
    raw = b64uDecode(String(address).trim());
  } catch {
    throw new BadAddressError(`not a mailbox address (43 base64url characters expected): ${String(address).slice(0, 60)}`);
  }
  if (raw.length !== KEY_LEN) {
    throw new BadAddressError(`not a mailbox address (must decode to 32 bytes, got ${raw.length})`);
  }
  return raw;
}

/**
 * The X25519 key derived from a mailbox address (to seal to it).
 * @param {string} address
 * @returns {Uint8Array}
 */
export function encryptionKeyFor(address) {
  const raw = parseAddress(address);
  try {
    return sodium.crypto_sign_ed25519_pk_to_curve25519(raw);
  } catch {
    throw new BadAddressError("not a mailbox address (not an Ed25519 public key)");
  }
}

/**
 * sha256, hex.
 * @param {Uint8Array} bytes
 */
export const sha256Hex = (bytes) => toHex(sha256(bytes));

/**
 * The signed bytes of an envelope (docs/protocol.md 3.2).
 * @param {{mailbox: string, sender: string, ts: number, ttl: number, ciphertext: Uint8Array}} e
 * @returns {Uint8Array}
 */
export function envelopeSignedBytes(e) {
  return utf8(["meshrelay/envelope/v1", e.mailbox, e.sender, String(e.ts), String(e.ttl), sha256Hex(e.ciphertext)].join("\n"));
}

/**
 * The signed bytes of a poll, count or signed ack (docs/protocol.md 4.3).
 * @param {{mailbox: string, ts: number, nonce: string, ack: readonly string[]}} r
 * @returns {Uint8Array}
 */
export function pollSignedBytes(r) {
  return utf8(["meshrelay/poll/v1", r.mailbox, String(r.ts), r.nonce, r.ack.join(",")].join("\n"));
}

/**
 * @typedef {object} Envelope
 * @property {1} v
 * @property {string} msg_id
 * @property {string} mailbox
 * @property {string} sender
 * @property {number} ts
 * @property {number} ttl
 * @property {string} ciphertext
 * @property {string} sig
 */

/**
 * @typedef {object} SignedRequest
 * @property {string} mailbox
 * @property {number} ts
 * @property {string} nonce
 * @property {string[]} ack
 * @property {string} sig
 */

/**
 * @typedef {object} Message A verified, decrypted message.
 * @property {string} msgId
 * @property {string} sender  the sender's address
 * @property {number} ts
 * @property {number} ttl
 * @property {Uint8Array} bytes  the plaintext
 * @property {string} text  the plaintext as UTF-8 (invalid sequences replaced)
 */

/**
 * @typedef {object} IdentityJSON The key file format of the Python client (meshrelay keygen).
 * @property {string} format
 * @property {string} ed25519_seed
 * @property {string} address
 */

/**
 * Seal `text` to `to`: crypto_box_seal(MAGIC || sender public key || text).
 * @param {string} to  the recipient's address
 * @param {string} sender  the sender's address (sealed inside, checked by the recipient)
 * @param {Uint8Array | string} text
 * @returns {Uint8Array}
 */
export function sealText(to, sender, text) {
  const body = typeof text === "string" ? utf8(text) : text;
  return sodium.crypto_box_seal(concat(MAGIC, parseAddress(sender), body), encryptionKeyFor(to));
}

/**
 * @param {unknown} v
 * @returns {v is number}
 */
const isUint = (v) => Number.isInteger(v) && /** @type {number} */ (v) >= 0 && /** @type {number} */ (v) <= MAX_INT;

/**
 * Check an envelope's shape, msg_id and signature; return it with its decoded ciphertext.
 * @param {unknown} obj
 * @returns {{env: Envelope, ciphertext: Uint8Array}}
 */
export function verifyEnvelope(obj) {
  const doc = /** @type {Record<string, unknown>} */ (obj && typeof obj === "object" ? obj : {});
  const label = typeof doc.msg_id === "string" ? doc.msg_id : "(no msg_id)";
  const bad = (/** @type {string} */ why) => new BadMessageError(label, `malformed envelope (${why})`);
  const keys = Object.keys(doc);
  if (keys.length !== ENVELOPE_KEYS.length || !ENVELOPE_KEYS.every((k) => keys.includes(k))) throw bad("wrong keys");
  if (doc.v !== 1) throw bad("v must be 1");
  if (typeof doc.msg_id !== "string" || !HEX64.test(doc.msg_id)) throw bad("msg_id");
  if (!isUint(doc.ts) || !isUint(doc.ttl)) throw bad("ts/ttl");
  /** @type {Uint8Array} */ let sender;
  /** @type {Uint8Array} */ let sig;
  /** @type {Uint8Array} */ let ciphertext;
  try {
    if (b64uDecode(/** @type {string} */ (doc.mailbox)).length !== KEY_LEN) throw new TypeError();
    sender = b64uDecode(/** @type {string} */ (doc.sender));
    sig = b64uDecode(/** @type {string} */ (doc.sig));
    ciphertext = b64uDecode(/** @type {string} */ (doc.ciphertext));
  } catch {
    throw bad("encoding");
  }
  if (sender.length !== KEY_LEN || sig.length !== SIG_LEN) throw bad("key or signature length");
  const env = /** @type {Envelope} */ (/** @type {unknown} */ (doc));
  const signed = envelopeSignedBytes({ ...env, ciphertext });
  if (sha256Hex(signed) !== env.msg_id) throw new BadMessageError(env.msg_id, "msg_id does not match the envelope");
  if (!sodium.crypto_sign_verify_detached(sig, signed, sender)) {
    throw new BadMessageError(env.msg_id, "the sender's signature does not verify");
  }
  return { env, ciphertext };
}

/** An Ed25519 identity: a mailbox address and a sender key, plus its derived X25519 key. */
export class Identity {
  /** @type {Uint8Array} */ #seed;
  /** @type {Uint8Array} */ #signKey;
  /** @type {Uint8Array} */ #boxSecret;
  /** @type {Uint8Array} */ #boxPublic;

  /**
   * Use the async factories (they wait for libsodium): generate, fromSeed, fromJSON.
   * @param {Uint8Array} seed  32 bytes
   */
  constructor(seed) {
    if (!(seed instanceof Uint8Array) || seed.length !== 32) throw new TypeError("an Ed25519 seed is 32 bytes");
    const kp = sodium.crypto_sign_seed_keypair(seed);
    this.#seed = Uint8Array.from(seed);
    this.#signKey = kp.privateKey;
    /** The raw 32-byte Ed25519 public key. */
    this.publicKey = kp.publicKey;
    /** The mailbox address: b64u of the public key. */
    this.address = b64uEncode(kp.publicKey);
    this.#boxSecret = sodium.crypto_sign_ed25519_sk_to_curve25519(kp.privateKey);
    this.#boxPublic = sodium.crypto_sign_ed25519_pk_to_curve25519(kp.publicKey);
  }

  /** @returns {Promise<Identity>} a new random identity */
  static async generate() {
    await ready();
    return new Identity(sodium.randombytes_buf(32));
  }

  /** @param {Uint8Array} seed @returns {Promise<Identity>} */
  static async fromSeed(seed) {
    await ready();
    return new Identity(seed);
  }

  /**
   * Load the key file format of the Python client (`meshrelay keygen`), as parsed JSON.
   * @param {unknown} doc
   * @returns {Promise<Identity>}
   */
  static async fromJSON(doc) {
    await ready();
    const d = /** @type {Record<string, unknown>} */ (doc && typeof doc === "object" ? doc : {});
    if (d.format !== KEY_FILE_FORMAT) throw new KeyFileError(`not a meshrelay key (format is not ${KEY_FILE_FORMAT})`);
    let seed;
    try {
      seed = b64uDecode(/** @type {string} */ (d.ed25519_seed));
    } catch {
      seed = new Uint8Array(0);
    }
    if (seed.length !== 32) throw new KeyFileError("ed25519_seed must be base64url of 32 bytes");
    const ident = new Identity(seed);
    if (d.address !== undefined && d.address !== ident.address) {
      throw new KeyFileError("the address does not belong to the seed (the key is damaged)");
    }
    return ident;
  }

  /** @returns {IdentityJSON} the key file format (keep it secret: it holds the private seed) */
  toJSON() {
    return { format: KEY_FILE_FORMAT, ed25519_seed: b64uEncode(this.#seed), address: this.address };
  }

  /** @param {Uint8Array} bytes @returns {Uint8Array} a detached Ed25519 signature */
  sign(bytes) {
    return sodium.crypto_sign_detached(bytes, this.#signKey);
  }

  /**
   * A signed envelope from this identity to mailbox `to`.
   * @param {string} to
   * @param {Uint8Array} ciphertext
   * @param {{ttl?: number, now?: number}} [opts]
   * @returns {Envelope}
   */
  envelope(to, ciphertext, { ttl = DEFAULT_TTL, now = unixNow() } = {}) {
    const mailbox = b64uEncode(parseAddress(to));
    const signed = envelopeSignedBytes({ mailbox, sender: this.address, ts: now, ttl, ciphertext });
    return {
      v: 1,
      msg_id: sha256Hex(signed),
      mailbox,
      sender: this.address,
      ts: now,
      ttl,
      ciphertext: b64uEncode(ciphertext),
      sig: b64uEncode(this.sign(signed)),
    };
  }

  /**
   * The signed part of a poll or count body, with a fresh 16-byte nonce.
   * @param {{ack?: readonly string[], now?: number, nonce?: Uint8Array}} [opts]
   * @returns {SignedRequest}
   */
  signedRequest({ ack = [], now = unixNow(), nonce = sodium.randombytes_buf(16) } = {}) {
    const req = { mailbox: this.address, ts: now, nonce: b64uEncode(nonce), ack: [...ack] };
    return { ...req, sig: b64uEncode(this.sign(pollSignedBytes(req))) };
  }

  /**
   * Encrypt `text` to `to`, with this identity as the sealed sender.
   * @param {string} to
   * @param {Uint8Array | string} text
   */
  sealText(to, text) {
    return sealText(to, this.address, text);
  }

  /**
   * Seal `text` to `to` and sign the envelope: what `NodeClient.send` takes.
   * @param {string} to
   * @param {Uint8Array | string} text
   * @param {{ttl?: number, now?: number}} [opts]
   */
  message(to, text, opts) {
    return this.envelope(to, this.sealText(to, text), opts);
  }

  /**
   * Verify an envelope (shape, msg_id, signature, mailbox), decrypt it, check its sender.
   * @param {unknown} obj
   * @returns {Message}
   */
  openEnvelope(obj) {
    const { env, ciphertext } = verifyEnvelope(obj);
    if (env.mailbox !== this.address) throw new BadMessageError(env.msg_id, "addressed to another mailbox");
    let plain;
    try {
      plain = sodium.crypto_box_seal_open(ciphertext, this.#boxPublic, this.#boxSecret);
    } catch {
      throw new DecryptError(env.msg_id, "cannot decrypt (not encrypted to this key, or the ciphertext was altered)");
    }
    if (plain.length < MAGIC.length + KEY_LEN || !MAGIC.every((b, i) => plain[i] === b)) {
      throw new BadMessageError(env.msg_id, "not a meshrelay text message");
    }
    const inner = b64uEncode(plain.subarray(MAGIC.length, MAGIC.length + KEY_LEN));
    if (inner !== env.sender) {
      throw new SenderMismatchError(env.msg_id, "the sender inside the message is not the one who signed it");
    }
    const bytes = plain.slice(MAGIC.length + KEY_LEN);
    return { msgId: env.msg_id, sender: env.sender, ts: env.ts, ttl: env.ttl, bytes, text: fromUtf8(bytes) };
  }
}

export { fromHex };
