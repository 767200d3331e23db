// The client's own logic without a node: encodings, sealing, message checks, 429 retries, watch back-off.
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  BadMessageError,
  DecryptError,
  Identity,
  NodeClient,
  RateLimitedError,
  SenderCapError,
  SenderMismatchError,
  b64uDecode,
  b64uEncode,
  extensions,
  parseRetryAfter,
  sealText,
} from "../src/index.js";

/** A fetch that answers from a list of [status, body, headers] and records the requests. */
function scripted(answers) {
  const calls = [];
  const fetch = async (url, init) => {
    calls.push({ url, init, body: init.body ? JSON.parse(init.body) : null });
    const [status, body, headers = {}] = answers.shift() ?? [200, { ok: true }];
    return new Response(JSON.stringify(body), { status, headers });
  };
  return { fetch, calls };
}

test("b64u is canonical: padding, other alphabets, length 1 mod 4 and stray bits are refused", () => {
  for (const n of [0, 1, 2, 3, 16, 32, 64]) {
    const bytes = Uint8Array.from({ length: n }, (_, i) => (i * 37 + 250) & 255);
    assert.deepEqual(b64uDecode(b64uEncode(bytes)), bytes);
  }
  for (const bad of ["AA==", "A+/A", "AAAAA", "AB", "AAB", "Zm9v!"]) assert.throws(() => b64uDecode(bad), TypeError, bad);
});

test("a sealed message opens only for its recipient, and only under the sender who sealed it", async () => {
  const alice = await Identity.generate();
  const bob = await Identity.generate();
  const carol = await Identity.generate();
  const env = alice.message(bob.address, "for bob");
  assert.equal(bob.openEnvelope(env).text, "for bob");
  assert.throws(() => carol.openEnvelope({ ...env, mailbox: carol.address }), BadMessageError); // msg_id no longer matches
  assert.throws(() => carol.openEnvelope(carol.envelope(carol.address, b64uDecode(env.ciphertext))), DecryptError);
  // Carol re-signs alice's ciphertext to bob under her own name: the sealed sender gives her away.
  assert.throws(() => bob.openEnvelope(carol.envelope(bob.address, b64uDecode(env.ciphertext))), SenderMismatchError);
  assert.throws(() => bob.openEnvelope({ ...env, sig: alice.message(bob.address, "x").sig }), BadMessageError);
  assert.throws(() => bob.openEnvelope({ ...env, extra: 1 }), BadMessageError);
  assert.throws(() => bob.openEnvelope(bob.envelope(bob.address, sealText(bob.address, alice.address, "x").slice(1))), DecryptError);
});

test("identities round-trip through the Python key file format", async () => {
  const a = await Identity.generate();
  const b = await Identity.fromJSON(JSON.parse(JSON.stringify(a)));
  assert.equal(b.address, a.address);
  await assert.rejects(Identity.fromJSON({ ...a.toJSON(), address: (await Identity.generate()).address }));
  await assert.rejects(Identity.fromJSON({ format: "other" }));
});

test("a 429 is retried after its Retry-After, with a fresh nonce for each poll", async () => {
  const waits = [];
  const { fetch, calls } = scripted([
    [429, { ok: false, error: "rate_limited", detail: "slow" }, { "Retry-After": "2" }],
    [429, { ok: false, error: "rate_limited", detail: "slow" }, { "Retry-After": "1" }],
    [200, { ok: true, messages: [], has_more: false }],
  ]);
  const node = new NodeClient("http://node.test", { fetch, sleep: async (s) => void waits.push(s) });
  const bob = await Identity.generate();
  assert.deepEqual(await node.poll(bob), { messages: [], hasMore: false });
  assert.deepEqual(waits, [2, 1]);
  assert.equal(new Set(calls.map((c) => c.body.nonce)).size, 3, "each attempt is signed anew");
});

test("without Retry-After the client backs off exponentially; a too long Retry-After is thrown", async () => {
  const waits = [];
  const limited = [429, { ok: false, error: "rate_limited", detail: "" }];
  const { fetch } = scripted([limited, limited, limited, limited]);
  const node = new NodeClient("http://node.test", { fetch, sleep: async (s) => void waits.push(s) });
  await assert.rejects(node.health(), RateLimitedError);
  assert.equal(waits.length, 3);
  assert.ok(waits[0] < waits[1] && waits[1] < waits[2], String(waits));
  const cap = scripted([[429, { ok: false, error: "sender_cap", detail: "", pending: 8, limit: 8 }, { "Retry-After": "3600" }]]);
  const err = await new NodeClient("http://node.test", { fetch: cap.fetch }).send({}).catch((e) => e);
  assert.ok(err instanceof SenderCapError);
  assert.deepEqual([err.retryAfter, err.pending, err.limit], [3600, 8, 8]);
  assert.equal(parseRetryAfter("Wed, 21 Oct 2015 07:28:10 GMT", Date.parse("Wed, 21 Oct 2015 07:28:00 GMT")), 10);
});

test("watch backs off between failed polls (Retry-After when given) and stops on abort", async () => {
  const stop = new AbortController();
  const waits = [];
  const errors = [];
  const { fetch } = scripted([
    [503, { ok: false, error: "unavailable", detail: "" }],
    [503, { ok: false, error: "unavailable", detail: "" }],
    [429, { ok: false, error: "mailbox_full", detail: "" }, { "Retry-After": "7" }],
  ]);
  const node = new NodeClient("http://node.test", { fetch, retries: 0, sleep: async (s) => { waits.push(s); if (waits.length === 3) stop.abort(); } });
  await node.watch(await Identity.generate(), { signal: stop.signal, onMessage: () => {}, onError: (e) => errors.push(e.code) });
  assert.deepEqual(errors, ["unavailable", "unavailable", "mailbox_full"]);
  assert.ok(waits[0] < waits[1], String(waits));
  assert.equal(waits[2], 7);
});

test("the beforeSend extension point sees each deposit; no policy, permit or stamp is claimed", async () => {
  const { fetch, calls } = scripted([[200, { ok: true, msg_id: "x", duplicate: false }]]);
  const node = new NodeClient("http://node.test", { fetch, beforeSend: (req) => void (req.headers["X-Test"] = "1") });
  const alice = await Identity.generate();
  await node.send(alice.message(alice.address, "x"));
  assert.equal(calls[0].init.headers["X-Test"], "1");
  assert.deepEqual({ ...extensions.supported }, { mailboxPolicies: false, permits: false, stamps: false });
});
