// What this library supports beyond protocol v1's client API (kept for code that checked it):
// mailbox policies and permits (policy.js, NodeClient.getPolicy/setPolicy/send) and stamps
// computed off the main thread (stamp.js, stamper.js, stamp-worker.js), docs/protocol.md section 12.

/** Protocol version 3 (first contact) is supported. */
export const supported = Object.freeze({ mailboxPolicies: true, permits: true, stamps: true });
