// Stamps (docs/protocol.md section 12.4): proof of work bound to an envelope's msg_id.
//
// The work of an 8-byte stamp is the number of leading zero bits of
//   sha256("meshrelay/stamp/v1\n" || msg_id (64 hex) || "\n" || stamp)
// exactly as the node counts it (meshrelay/policy.py stamp_work). This module is pure (no sodium,
// no DOM, no Node API) so that the stamp worker (stamp-worker.js) can import it on its own;
// computeStamp (stamper.js) runs solveStamp off the main thread.

import { sha256 } from "@noble/hashes/sha2.js";
import { b64uDecode, b64uEncode, utf8 } from "./encoding.js";

export const STAMP_DOMAIN = "meshrelay/stamp/v1";
/** A stamp is this many bytes (11 base64url characters). */
export const STAMP_LEN = 8;
/** The highest difficulty a policy may ask for. */
export const MAX_DIFFICULTY = 32;

const MSG_ID_RE = /^[0-9a-f]{64}$/;

/**
 * @param {string} msgId
 * @returns {import("@noble/hashes/utils.js").Hash<any>} sha256 over the stamp's fixed prefix
 */
function prefixHash(msgId) {
  if (typeof msgId !== "string" || !MSG_ID_RE.test(msgId)) throw new TypeError("msg_id must be 64 lowercase hex characters");
  return sha256.create().update(utf8(`${STAMP_DOMAIN}\n${msgId}\n`));
}

/**
 * How many zero bits `digest` starts with.
 * @param {Uint8Array} digest
 * @returns {number}
 */
export function leadingZeroBits(digest) {
  let bits = 0;
  for (const byte of digest) {
    if (byte === 0) {
      bits += 8;
      continue;
    }
    return bits + Math.clz32(byte) - 24;
  }
  return bits;
}

/**
 * A stamp's bytes: canonical base64url of exactly 8 bytes, else a TypeError (the node's `400 bad_stamp`).
 * @param {unknown} stamp
 * @returns {Uint8Array}
 */
export function parseStamp(stamp) {
  if (typeof stamp !== "string") throw new TypeError("a stamp is a base64url string");
  const raw = b64uDecode(stamp); // TypeError when not canonical
  if (raw.length !== STAMP_LEN) throw new TypeError(`a stamp decodes to ${STAMP_LEN} bytes, not ${raw.length}`);
  return raw;
}

/**
 * The stamp's work in bits for `msgId` (the node's check).
 * @param {string} msgId
 * @param {string | Uint8Array} stamp  base64url text or its 8 bytes
 * @returns {number}
 */
export function stampWork(msgId, stamp) {
  const raw = typeof stamp === "string" ? parseStamp(stamp) : stamp;
  if (!(raw instanceof Uint8Array) || raw.length !== STAMP_LEN) throw new TypeError(`a stamp is ${STAMP_LEN} bytes`);
  return leadingZeroBits(prefixHash(msgId).update(raw).digest());
}

/**
 * True when `stamp` is well formed and has at least `difficulty` bits of work for `msgId`:
 * what a node accepts in a `stamps` mailbox of that difficulty (malformed: TypeError).
 * @param {string} msgId
 * @param {string} stamp
 * @param {number} difficulty
 * @returns {boolean}
 */
export function verifyStamp(msgId, stamp, difficulty) {
  return stampWork(msgId, stamp) >= difficulty;
}

/**
 * @param {number} difficulty
 */
export function checkDifficulty(difficulty) {
  if (!Number.isInteger(difficulty) || difficulty < 0 || difficulty > MAX_DIFFICULTY) {
    throw new RangeError(`difficulty must be an integer in [0, ${MAX_DIFFICULTY}]`);
  }
}

/**
 * @typedef {object} SolveOptions
 * @property {number} [start]  the first counter to try (default 0)
 * @property {number} [every]  tries between progress calls (default 65536)
 * @property {(tries: number) => void} [onProgress]
 */

/**
 * Find a stamp with at least `difficulty` bits for `msgId` ON THIS THREAD, trying the counters
 * start, start+1, ... as 8-byte big-endian values (the Python solver's order, so the first
 * solution is the same). Use computeStamp to run it in a worker.
 * @param {string} msgId
 * @param {number} difficulty
 * @param {SolveOptions} [opts]
 * @returns {{stamp: string, tries: number}}
 */
export function solveStamp(msgId, difficulty, { start = 0, every = 1 << 16, onProgress } = {}) {
  checkDifficulty(difficulty);
  if (!Number.isSafeInteger(start) || start < 0) throw new RangeError("start must be a non-negative safe integer");
  const base = prefixHash(msgId);
  const counter = new Uint8Array(STAMP_LEN);
  const view = new DataView(counter.buffer);
  const fullBytes = difficulty >> 3;
  const mask = (0xff00 >> (difficulty & 7)) & 0xff; // the top bits of the next byte that must be zero
  for (let n = start, tries = 0; ; n++) {
    view.setUint32(0, Math.floor(n / 2 ** 32));
    view.setUint32(4, n >>> 0);
    const digest = base.clone().update(counter).digest();
    tries++;
    let ok = true;
    for (let i = 0; i < fullBytes; i++) {
      if (digest[i] !== 0) {
        ok = false;
        break;
      }
    }
    if (ok && (mask === 0 || (digest[fullBytes] & mask) === 0)) return { stamp: b64uEncode(counter), tries };
    if (onProgress && tries % every === 0) onProgress(tries);
  }
}
