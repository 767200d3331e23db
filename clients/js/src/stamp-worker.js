// The stamp worker: runs solveStamp (stamp.js) off the main thread, in a browser Worker
// (module type) or a Node worker_threads Worker; the adapter below is the only difference.
//
// In:  {msgId, difficulty, start?, every?}
// Out: {type: "progress", tries} now and then, then {type: "done", stamp, tries}
//      or {type: "error", message}. Cancellation is the main thread terminating the worker
//      (computeStamp in stamper.js does it when its AbortSignal aborts).

import { solveStamp } from "./stamp.js";

/** @typedef {{msgId: string, difficulty: number, start?: number, every?: number}} StampJob */

/** @param {StampJob} job @param {(msg: object) => void} post */
function run(job, post) {
  try {
    const { stamp, tries } = solveStamp(job.msgId, job.difficulty, {
      start: job.start ?? 0,
      every: job.every ?? 1 << 16,
      onProgress: (n) => post({ type: "progress", tries: n }),
    });
    post({ type: "done", stamp, tries });
  } catch (e) {
    post({ type: "error", message: e instanceof Error ? e.message : String(e) });
  }
}

const isNode = typeof (/** @type {any} */ (globalThis).process?.versions?.node) === "string";
if (isNode) {
  const { parentPort } = await import("node:worker_threads");
  if (parentPort) parentPort.once("message", (job) => run(job, (msg) => parentPort.postMessage(msg)));
} else {
  const scope = /** @type {any} */ (globalThis);
  scope.addEventListener("message", (/** @type {MessageEvent} */ ev) => run(ev.data, (msg) => scope.postMessage(msg)), { once: true });
}
