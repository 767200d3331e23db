// meshrelay-client: a JavaScript client for meshrelay nodes (browsers and Node 20+).
export * from "./encoding.js";
export * from "./errors.js";
export * from "./identity.js";
export * from "./policy.js";
export { MAX_DIFFICULTY, STAMP_LEN, leadingZeroBits, parseStamp, solveStamp, stampWork, verifyStamp } from "./stamp.js";
export { StampWorkerError, computeStamp } from "./stamper.js";
export { NodeClient, parseRetryAfter, sleep } from "./client.js";
export * as extensions from "./extensions.js";
