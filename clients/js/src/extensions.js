// Extension point for what the protocol does not have yet: mailbox policies, permits and stamps.
//
// NOTHING HERE IS IMPLEMENTED. The node does not know mailbox policies, permits or stamps today
// (docs/protocol.md has none of them), so this library sends none. When the protocol gains them:
//
// - a policy is read from the recipient's node (a new client route) before sending;
// - a permit or a stamp is attached to a deposit through `NodeClient`'s `beforeSend` hook, which
//   is called with `{envelope, headers}` before each send and may change both (it exists and is
//   tested; nothing uses it yet);
// - stamps (proof of work) are computed off the main thread: a Web Worker in browsers,
//   `worker_threads` in Node, so a page stays responsive while one is computed.
//
// Until then `supported` says so, and code can check it instead of guessing.

/** What this library supports beyond protocol v1's client API: nothing yet. */
export const supported = Object.freeze({ mailboxPolicies: false, permits: false, stamps: false });
