// computeStamp: a stamp solved off the main thread (a Web Worker in browsers, worker_threads in
// Node) with progress reports and cancellation by AbortSignal. The worker is stamp-worker.js.

import { MeshrelayError } from "./errors.js";
import { checkDifficulty, verifyStamp } from "./stamp.js";

/**
 * @typedef {object} StampProgress
 * @property {number} tries  hashes tried so far
 * @property {number} difficulty
 * @property {number} expected  tries needed on average (2^difficulty)
 */

/**
 * @typedef {object} ComputeStampOptions
 * @property {AbortSignal} [signal]  aborting it stops the worker; computeStamp then rejects with the signal's reason
 * @property {(p: StampProgress) => void} [onProgress]
 * @property {number} [every]  tries between progress reports (default 65536)
 * @property {string | URL} [workerUrl]  where stamp-worker.js is served (bundled pages; default: beside this module)
 */

/** The stamp worker could not be started or failed. */
export class StampWorkerError extends MeshrelayError {}

/**
 * The small adapter: one interface over a browser Worker and a Node worker_threads Worker.
 * @param {URL} url
 * @returns {Promise<{post: (m: object) => void, onMessage: (f: (m: any) => void) => void, onError: (f: (e: unknown) => void) => void, terminate: () => void}>}
 */
async function startWorker(url) {
  if (typeof globalThis.Worker === "function" && typeof (/** @type {any} */ (globalThis).process?.versions?.node) !== "string") {
    const w = new globalThis.Worker(url, { type: "module", name: "meshrelay-stamp" });
    return {
      post: (m) => w.postMessage(m),
      onMessage: (f) => w.addEventListener("message", (ev) => f(ev.data)),
      onError: (f) => w.addEventListener("error", (ev) => f(ev.message || "the stamp worker failed to load")),
      terminate: () => w.terminate(),
    };
  }
  const { Worker } = await import("node:worker_threads");
  const w = new Worker(url);
  w.unref(); // a forgotten computation never keeps a process alive
  return {
    post: (m) => w.postMessage(m),
    onMessage: (f) => w.on("message", f),
    onError: (f) => {
      w.on("error", f);
      w.on("exit", (code) => f(`the stamp worker exited (${code})`));
    },
    terminate: () => void w.terminate(),
  };
}

/**
 * Compute a stamp with at least `difficulty` bits for `msgId` in a worker. Resolves to the
 * stamp (base64url) after checking it as a node does; rejects with the signal's reason when aborted.
 * @param {string} msgId
 * @param {number} difficulty
 * @param {ComputeStampOptions} [opts]
 * @returns {Promise<string>}
 */
export async function computeStamp(msgId, difficulty, { signal, onProgress, every = 1 << 16, workerUrl } = {}) {
  checkDifficulty(difficulty);
  if (typeof msgId !== "string" || !/^[0-9a-f]{64}$/.test(msgId)) throw new TypeError("msg_id must be 64 lowercase hex characters");
  signal?.throwIfAborted();
  const url = workerUrl ? new URL(workerUrl, globalThis.location?.href) : new URL("./stamp-worker.js", import.meta.url);
  const worker = await startWorker(url);
  if (signal?.aborted) {
    worker.terminate(); // aborted while the worker was starting
    throw signal.reason;
  }
  return new Promise((resolve, reject) => {
    let finished = false;
    const finish = (/** @type {() => void} */ settle) => {
      if (finished) return;
      finished = true;
      signal?.removeEventListener("abort", onAbort);
      worker.terminate();
      settle();
    };
    const onAbort = () => finish(() => reject(signal?.reason));
    signal?.addEventListener("abort", onAbort, { once: true });
    worker.onMessage((msg) => {
      if (msg?.type === "progress") {
        if (!finished) onProgress?.({ tries: msg.tries, difficulty, expected: 2 ** difficulty });
      } else if (msg?.type === "done" && typeof msg.stamp === "string" && verifyStamp(msgId, msg.stamp, difficulty)) {
        finish(() => resolve(msg.stamp));
      } else {
        finish(() => reject(new StampWorkerError(`the stamp worker failed: ${msg?.message ?? "a wrong answer"}`)));
      }
    });
    worker.onError((e) => finish(() => reject(new StampWorkerError(`the stamp worker failed: ${e instanceof Error ? e.message : String(e)}`))));
    worker.post({ msgId, difficulty, every });
  });
}
