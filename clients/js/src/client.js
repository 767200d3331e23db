// NodeClient: JSON over HTTP (fetch) to one node's client API (docs/protocol.md section 4).

import { MAX_ACK_IDS, parseAddress, ready } from "./identity.js";
import {
  BadEnvelopeError,
  MeshrelayError,
  MessageError,
  NodeUnreachableError,
  NotFoundError,
  ProtocolError,
  RemoteError,
  StampRefusedError,
  errorFromResponse,
} from "./errors.js";
import { PermitError, parsePermit, parsePermitToken, parsePolicy, verifyPolicy } from "./policy.js";
import { computeStamp } from "./stamper.js";
import { b64uEncode } from "./encoding.js";

/** @typedef {import("./identity.js").Identity} Identity */
/** @typedef {import("./identity.js").Envelope} Envelope */
/** @typedef {import("./identity.js").Message} Message */
/** @typedef {import("./policy.js").Policy} Policy */
/** @typedef {import("./policy.js").Permit} Permit */
/** @typedef {import("./policy.js").PermitBook} PermitBook */
/** @typedef {import("./stamper.js").StampProgress} StampProgress */

/**
 * @typedef {object} SendRequest What goes on the wire for one deposit; a beforeSend hook may change it.
 * @property {Envelope & {permit?: Permit, stamp?: string}} envelope
 * @property {Record<string, string>} headers
 */

/**
 * @typedef {object} ClientOptions
 * @property {typeof globalThis.fetch} [fetch]  the fetch to use (default: the global one)
 * @property {number} [timeout]  seconds a request may take (a long-poll: plus its wait); default 30
 * @property {number} [retries]  how often a request answered 429 is retried; default 3
 * @property {number} [maxRetryDelay]  the longest wait (s) before a retry; a longer Retry-After is thrown; default 30
 * @property {(seconds: number, signal?: AbortSignal) => Promise<void>} [sleep]  how to wait (tests inject one)
 * @property {(req: SendRequest) => Promise<void> | void} [beforeSend]
 *   Called with the envelope (its permit or stamp attached) and the request headers before each
 *   deposit; it may change both.
 * @property {PermitBook | {get(mailbox: string): Permit | null}} [permits]
 *   The permits this sender was given (PermitBook): send attaches the one for the recipient's mailbox.
 * @property {string | URL} [stampWorkerUrl]  where stamp-worker.js is served (default: beside stamper.js)
 */

/**
 * @typedef {object} SendOptions
 * @property {AbortSignal} [signal]  aborts the request, and a stamp being computed
 * @property {Permit | string | null} [permit]  a permit (object or token) for this mailbox; default: from `permits`
 * @property {boolean} [firstContact]  read the mailbox's policy and attach a stamp when it asks for one (default true)
 * @property {(p: StampProgress) => void} [onProgress]  progress of a stamp being computed
 */

/**
 * @typedef {object} PollOptions
 * @property {readonly string[]} [ack]  msg_ids to delete (applied before the read)
 * @property {number} [limit]  1..100, default 100
 * @property {number} [wait]  long-poll seconds, 0..30, default 0
 * @property {boolean} [fetchRemote]
 * @property {AbortSignal} [signal]
 */

/**
 * @typedef {object} WatchOptions
 * @property {(msg: Message) => unknown} onMessage  called once per new message; it is acked when this returns
 * @property {(err: unknown) => void} [onError]  bad messages (left in the mailbox) and failed polls
 * @property {AbortSignal} [signal]  stops the watch
 * @property {number} [wait]  long-poll seconds per poll, default 25
 * @property {number} [limit]
 * @property {boolean} [discardBad]  ack messages that fail to verify or decrypt (default: leave them)
 * @property {number} [maxBackoff]  the longest pause (s) between failed polls, default 30
 */

/**
 * Wait `seconds`, or less if `signal` aborts.
 * @param {number} seconds
 * @param {AbortSignal} [signal]
 * @returns {Promise<void>}
 */
export function sleep(seconds, signal) {
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve();
    const done = () => {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve();
    };
    const timer = setTimeout(done, seconds * 1000);
    signal?.addEventListener("abort", done, { once: true });
  });
}

/**
 * Retry-After as seconds (delta-seconds or an HTTP date), or null.
 * @param {string | null} value
 * @param {number} [nowMs]
 * @returns {number | null}
 */
export function parseRetryAfter(value, nowMs = Date.now()) {
  if (value == null) return null;
  const text = value.trim();
  if (/^\d+$/.test(text)) return Number(text);
  const at = Date.parse(text);
  return Number.isNaN(at) ? null : Math.max(0, Math.ceil((at - nowMs) / 1000));
}

/** Exponential back-off without a Retry-After: 1, 2, 4 ... seconds, with jitter, at most `cap`. */
const backoff = (/** @type {number} */ attempt, /** @type {number} */ cap) =>
  Math.min(cap, 2 ** attempt) * (0.75 + Math.random() * 0.5);

export class NodeClient {
  /**
   * @param {string} baseUrl  e.g. "http://127.0.0.1:8080"
   * @param {ClientOptions} [opts]
   */
  constructor(baseUrl, opts = {}) {
    let url;
    try {
      url = new URL(baseUrl);
    } catch {
      throw new MeshrelayError(`not a node URL (expected http://host:port): ${baseUrl}`);
    }
    if (url.protocol !== "http:" && url.protocol !== "https:") {
      throw new MeshrelayError(`not a node URL (expected http://host:port): ${baseUrl}`);
    }
    this.baseUrl = url.href.replace(/\/+$/, "");
    this.fetch = opts.fetch ?? globalThis.fetch.bind(globalThis);
    this.timeout = opts.timeout ?? 30;
    this.retries = opts.retries ?? 3;
    this.maxRetryDelay = opts.maxRetryDelay ?? 30;
    this.sleep = opts.sleep ?? sleep;
    this.beforeSend = opts.beforeSend;
    this.permits = opts.permits;
    this.stampWorkerUrl = opts.stampWorkerUrl;
  }

  /**
   * One request, retried on 429 (honouring Retry-After, else backing off). `body` is a
   * function so that each attempt of a poll is signed with a fresh nonce.
   * @param {string} method
   * @param {string} path
   * @param {(() => unknown) | null} [body]
   * @param {{timeout?: number, signal?: AbortSignal, headers?: Record<string, string>}} [opts]
   * @returns {Promise<Record<string, any>>} the `{"ok": true, ...}` answer
   */
  async request(method, path, body = null, opts = {}) {
    for (let attempt = 0; ; attempt++) {
      try {
        return await this.#once(method, path, body ? body() : null, opts);
      } catch (e) {
        if (!(e instanceof RemoteError) || e.status !== 429 || attempt >= this.retries) throw e;
        const delay = e.retryAfter ?? backoff(attempt, this.maxRetryDelay);
        if (delay > this.maxRetryDelay) throw e;
        await this.sleep(delay, opts.signal);
        if (opts.signal?.aborted) throw e;
      }
    }
  }

  /**
   * @param {string} method
   * @param {string} path
   * @param {unknown} body
   * @param {{timeout?: number, signal?: AbortSignal, headers?: Record<string, string>}} opts
   */
  async #once(method, path, body, opts) {
    const timeout = AbortSignal.timeout((opts.timeout ?? this.timeout) * 1000);
    const signal = opts.signal ? AbortSignal.any([opts.signal, timeout]) : timeout;
    /** @type {Record<string, string>} */
    const headers = { Accept: "application/json", ...opts.headers };
    if (body !== null) headers["Content-Type"] = "application/json";
    let resp;
    let text;
    try {
      resp = await this.fetch(this.baseUrl + path, {
        method,
        headers,
        body: body === null ? undefined : JSON.stringify(body),
        signal,
        credentials: "omit",
        cache: "no-store",
      });
      text = await resp.text();
    } catch (e) {
      if (opts.signal?.aborted) throw e;
      const why = timeout.aborted ? "did not answer in time" : `cannot be reached (${/** @type {Error} */ (e).message})`;
      throw new NodeUnreachableError(`the node at ${this.baseUrl} ${why}`);
    }
    let doc = null;
    try {
      doc = JSON.parse(text);
    } catch {
      doc = null;
    }
    if (!resp.ok) throw errorFromResponse(resp.status, doc, parseRetryAfter(resp.headers.get("retry-after")));
    if (!doc || typeof doc !== "object" || doc.ok !== true) {
      throw new ProtocolError(`node answered HTTP ${resp.status} with an unexpected body`);
    }
    return doc;
  }

  /** @returns {Promise<{ok: true, version: string, peers: number}>} */
  async health() {
    return /** @type {any} */ (await this.request("GET", "/api/mesh/health"));
  }

  /**
   * The mailbox's policy at this node (public; shape and signature checked), or null when it has
   * none. A node before protocol version 3 answers 404: also null (it treats every sender the v1 way).
   * @param {string} mailbox
   * @param {{signal?: AbortSignal}} [opts]
   * @returns {Promise<Policy | null>}
   */
  async getPolicy(mailbox, { signal } = {}) {
    const address = b64uEncode(parseAddress(mailbox));
    let doc;
    try {
      doc = await this.request("GET", `/api/mesh/dm/policy?mailbox=${address}`, null, { signal });
    } catch (e) {
      if (e instanceof NotFoundError) return null;
      throw e;
    }
    if (doc.policy === null) return null;
    await ready();
    let policy;
    try {
      policy = parsePolicy(doc.policy);
    } catch (e) {
      throw new ProtocolError(`the node served a malformed policy: ${/** @type {Error} */ (e).message}`);
    }
    if (policy.mailbox !== address || !verifyPolicy(policy)) {
      throw new ProtocolError("the node served a policy not signed by this mailbox");
    }
    return policy;
  }

  /**
   * Store a signed policy (makePolicy); `stale_policy` (StalePolicyError) when it does not order
   * above the policy the node holds.
   * @param {Policy} policy
   * @returns {Promise<{ok: true, version: number, duplicate: boolean}>}
   */
  async setPolicy(policy) {
    return /** @type {any} */ (await this.request("POST", "/api/mesh/dm/policy", () => policy));
  }

  /**
   * Deposit a signed envelope (idempotent: a repeat answers duplicate: true), with what the
   * mailbox asks of this sender (docs/protocol.md section 12): the permit for its mailbox when
   * there is one (from `opts.permit` or the client's `permits`), else, when the mailbox's policy
   * is `stamps`, a stamp computed in a worker. A node whose policy is newer than the one read
   * answers stamp_required/weak_stamp with its difficulty: the stamp is solved again once.
   * @param {Envelope} envelope
   * @param {SendOptions} [opts]
   * @returns {Promise<{ok: true, msg_id: string, duplicate: boolean}>}
   */
  async send(envelope, { signal, permit, firstContact = true, onProgress } = {}) {
    const given = permit === undefined ? (this.permits?.get(envelope.mailbox) ?? null) : permit;
    const usable = given === null ? null : typeof given === "string" ? parsePermitToken(given) : parsePermit(given);
    if (usable) {
      if (usable.mailbox !== envelope.mailbox) throw new PermitError("the permit is for another mailbox");
      if (usable.sender !== envelope.sender) throw new PermitError("the permit is for another sender");
      try {
        return await this.#deposit({ ...envelope, permit: usable }, signal);
      } catch (e) {
        // A node before protocol v3 refuses the unknown permit field: it takes the v1 envelope.
        if (!(e instanceof BadEnvelopeError)) throw e;
        return await this.#deposit(envelope, signal);
      }
    }
    if (!firstContact) return await this.#deposit(envelope, signal);
    const policy = await this.getPolicy(envelope.mailbox, { signal });
    /** @param {number} difficulty */
    const stamped = async (difficulty) => ({
      ...envelope,
      stamp: await computeStamp(envelope.msg_id, difficulty, { signal, onProgress, workerUrl: this.stampWorkerUrl }),
    });
    const first = policy?.mode === "stamps" ? await stamped(policy.difficulty) : envelope;
    try {
      return await this.#deposit(first, signal);
    } catch (e) {
      // The policy changed since we read it (or another node of the mesh has a newer one): once more.
      if (!(e instanceof StampRefusedError) || e.difficulty === null || e.difficulty < 1) throw e;
      return await this.#deposit(await stamped(e.difficulty), signal);
    }
  }

  /**
   * @param {Envelope & {permit?: Permit, stamp?: string}} envelope
   * @param {AbortSignal} [signal]
   * @returns {Promise<{ok: true, msg_id: string, duplicate: boolean}>}
   */
  async #deposit(envelope, signal) {
    /** @type {SendRequest} */
    const req = { envelope, headers: {} };
    if (this.beforeSend) await this.beforeSend(req);
    return /** @type {any} */ (
      await this.request("POST", "/api/mesh/dm/send", () => req.envelope, { headers: req.headers, signal })
    );
  }

  /**
   * Ack `ack` and fetch up to `limit` pending envelopes, long-polling `wait` seconds.
   * @param {Identity} identity
   * @param {PollOptions} [opts]
   * @returns {Promise<{messages: Envelope[], hasMore: boolean}>}
   */
  async poll(identity, { ack = [], limit = 100, wait = 0, fetchRemote = false, signal } = {}) {
    const body = () => ({ ...identity.signedRequest({ ack }), limit, wait, fetch_remote: fetchRemote });
    const doc = await this.request("POST", "/api/mesh/dm/poll", body, { timeout: this.timeout + wait, signal });
    if (!Array.isArray(doc.messages) || typeof (doc.has_more ?? false) !== "boolean") {
      throw new ProtocolError("poll answer has no messages list");
    }
    return { messages: doc.messages, hasMore: doc.has_more ?? false };
  }

  /**
   * Ack `ids` (polls with limit 1 whose messages are ignored).
   * @param {Identity} identity
   * @param {readonly string[]} ids
   */
  async ack(identity, ids) {
    for (let i = 0; i < ids.length; i += MAX_ACK_IDS) {
      await this.poll(identity, { ack: ids.slice(i, i + MAX_ACK_IDS), limit: 1 });
    }
  }

  /**
   * The number of live envelopes in `identity`'s mailbox.
   * @param {Identity} identity
   * @returns {Promise<number>}
   */
  async count(identity) {
    const doc = await this.request("POST", "/api/mesh/dm/count", () => identity.signedRequest());
    if (!Number.isInteger(doc.count)) throw new ProtocolError("count answer has no integer count");
    return doc.count;
  }

  /**
   * Long-poll `identity`'s mailbox until `signal` aborts: verify and decrypt each message,
   * hand it to `onMessage` once, and ack it on the next poll once `onMessage` returned.
   * Failed polls are retried with exponential back-off (Retry-After when the node gives one).
   * @param {Identity} identity
   * @param {WatchOptions} opts
   * @returns {Promise<void>} resolves when the signal aborts
   */
  async watch(identity, opts) {
    const { onMessage, onError = () => {}, signal, wait = 25, limit = 100, discardBad = false, maxBackoff = 30 } = opts;
    /** @type {string[]} */
    let ack = [];
    /** @type {Set<string>} delivered ids, bounded (a redelivery of an older one is acked again, not shown) */
    const seen = new Set();
    let failures = 0;
    while (!signal?.aborted) {
      let result;
      try {
        result = await this.poll(identity, { ack, wait, limit, signal });
      } catch (e) {
        if (signal?.aborted) break;
        onError(e);
        const hinted = e instanceof RemoteError ? e.retryAfter : null;
        await this.sleep(hinted ?? backoff(failures, maxBackoff), signal);
        failures++;
        continue;
      }
      ack = [];
      failures = 0;
      let handlerFailed = false;
      for (const obj of result.messages) {
        let msg;
        try {
          msg = identity.openEnvelope(obj);
        } catch (e) {
          onError(e);
          if (discardBad && e instanceof MessageError) ack.push(e.msgId);
          continue;
        }
        if (!seen.has(msg.msgId)) {
          try {
            await onMessage(msg);
          } catch (e) {
            onError(e);
            handlerFailed = true;
            continue;
          }
          seen.add(msg.msgId);
          if (seen.size > 10000) seen.delete(/** @type {string} */ (seen.values().next().value));
        }
        ack.push(msg.msgId);
      }
      if (handlerFailed || (result.messages.length > 0 && ack.length === 0 && !result.hasMore)) {
        // Messages we could not take stay pending: pause rather than spin on them.
        await this.sleep(backoff(failures++, maxBackoff), signal);
      }
    }
    if (ack.length) {
      try {
        await this.ack(identity, ack);
      } catch (e) {
        onError(e);
      }
    }
  }
}
