// The client's own logic without a node: encodings, sealing, message checks, 429 retries, watch back-off.
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  BadMessageError,
  ContactsOnlyError,
  ERROR_CLASSES,
  PermitBook,
  PermitError,
  PolicyFormatError,
  ProtocolError,
  STATUS_BY_CODE,
  StampRefusedError,
  WeakStampError,
  checkPermitToken,
  computeStamp,
  errorFromResponse,
  leadingZeroBits,
  makePermit,
  makePolicy,
  parsePermitToken,
  parsePolicy,
  parseStamp,
  permitToken,
  policyId,
  solveStamp,
  stampWork,
  verifyPolicy,
  verifyStamp,
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
  const err = await new NodeClient("http://node.test", { fetch: cap.fetch }).send(/** @type {any} */ ({}), { firstContact: false }).catch((e) => e);
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

test("every protocol error code has its class, and a refusal with a difficulty carries it", () => {
  assert.deepEqual(Object.keys(ERROR_CLASSES).sort(), Object.keys(STATUS_BY_CODE).sort());
  for (const [code, cls] of Object.entries(ERROR_CLASSES)) assert.equal(cls.code, code);
  const weak = errorFromResponse(403, { ok: false, error: "weak_stamp", detail: "", difficulty: 9 });
  assert.ok(weak instanceof WeakStampError && weak instanceof StampRefusedError);
  assert.equal(/** @type {WeakStampError} */ (weak).difficulty, 9);
  assert.ok(errorFromResponse(403, { ok: false, error: "contacts_only", detail: "" }) instanceof ContactsOnlyError);
});

test("permit tokens: round trip, and every malformed, forged, foreign or expired token is refused", async () => {
  const owner = await Identity.generate();
  const friend = await Identity.generate();
  const other = await Identity.generate();
  const permit = makePermit(owner, friend.address, { expires: 2000000000, epoch: 3 });
  const token = permitToken(permit);
  assert.match(token, /^mrp1\.[A-Za-z0-9_-]{192}$/);
  assert.deepEqual(checkPermitToken(token, friend.address, { now: 1900000000 }), permit);
  assert.throws(() => checkPermitToken(token, other.address, { now: 1900000000 }), PermitError, "another sender");
  assert.throws(() => checkPermitToken(token, friend.address, { now: 2000000000 }), PermitError, "expired");
  const forged = permitToken({ ...permit, epoch: 4 });
  assert.throws(() => checkPermitToken(forged, friend.address, { now: 0 }), /not signed/);
  for (const bad of ["", "mrp2." + token.slice(5), token.slice(0, -1), token + "A", "mrp1.+" + token.slice(6)]) {
    assert.throws(() => parsePermitToken(bad), PermitError, bad.slice(0, 10));
  }
  const book = new PermitBook(friend.address);
  book.add(token, { now: 1900000000 });
  assert.deepEqual(book.get(owner.address, { now: 1900000000 }), permit);
  assert.equal(book.get(owner.address, { now: 2000000000 }), null, "an expired permit is not used");
  assert.deepEqual(PermitBook.fromJSON(friend.address, JSON.parse(JSON.stringify(book))).toJSON(), { [owner.address]: token });
  assert.deepEqual(PermitBook.fromJSON(other.address, book.toJSON()).toJSON(), {}, "a permit for another key is skipped");
});

test("policies: built as a node checks them; a malformed or foreign one is refused", async () => {
  const owner = await Identity.generate();
  const p = makePolicy(owner, { version: 1, mode: "stamps" });
  assert.deepEqual([p.mode, p.difficulty, p.stranger_cap, p.epoch], ["stamps", 20, 64, 0]);
  assert.ok(verifyPolicy(p));
  assert.ok(!verifyPolicy({ ...p, version: 2 }));
  assert.ok(policyId(p).match(/^[0-9a-f]{64}$/));
  assert.throws(() => makePolicy(owner, { version: 1, mode: "stamps", difficulty: 0 }), PolicyFormatError);
  assert.throws(() => makePolicy(owner, { version: 1, mode: "stamps", difficulty: 33 }), PolicyFormatError);
  assert.throws(() => makePolicy(owner, { version: 1, mode: /** @type {any} */ ("closed") }), PolicyFormatError);
  assert.throws(() => parsePolicy({ ...p, extra: 1 }), PolicyFormatError);
  assert.throws(() => parsePolicy({ ...p, version: true }), PolicyFormatError);
  assert.throws(() => parsePolicy({ ...p, epoch: -1 }), PolicyFormatError);
});

test("stamps: the node's work count, malformed stamps refused, solved stamps verify", () => {
  assert.equal(leadingZeroBits(Uint8Array.of(0, 0, 1)), 23);
  assert.equal(leadingZeroBits(Uint8Array.of(0x80)), 0);
  assert.equal(leadingZeroBits(new Uint8Array(32)), 256);
  const msgId = "ab".repeat(32);
  for (const bad of ["AAAAAAAAAA", "AAAAAAAAAAAA", "AAAAAAAAET=", "AAAAAAAAETF", 7]) assert.throws(() => parseStamp(bad), TypeError, String(bad));
  for (const d of [0, 1, 5, 8, 9, 13]) {
    const { stamp } = solveStamp(msgId, d);
    assert.ok(stampWork(msgId, stamp) >= d);
    assert.ok(verifyStamp(msgId, stamp, d));
  }
  assert.throws(() => solveStamp(msgId, 33), RangeError);
  assert.throws(() => solveStamp("AB".repeat(32), 1), TypeError);
});

test("computeStamp runs in a worker: progress is reported and an abort stops it", async () => {
  const msgId = "cd".repeat(32);
  const progress = [];
  const stop = new AbortController();
  const reason = new Error("cancelled by the test");
  const running = computeStamp(msgId, 32, {
    signal: stop.signal,
    every: 1000,
    onProgress: (p) => {
      progress.push(p);
      if (progress.length === 3) stop.abort(reason);
    },
  });
  await assert.rejects(running, (e) => e === reason);
  assert.deepEqual(progress.map((p) => p.tries), [1000, 2000, 3000]);
  assert.deepEqual([progress[0].difficulty, progress[0].expected], [32, 2 ** 32]);
  await assert.rejects(computeStamp(msgId, 8, { signal: AbortSignal.abort(reason) }), (e) => e === reason);
  const stamp = await computeStamp(msgId, 10);
  assert.ok(verifyStamp(msgId, stamp, 10));
});

test("send attaches the kept permit for the mailbox (no policy read); a pre-v3 node gets the v1 envelope", async () => {
  const owner = await Identity.generate();
  const friend = await Identity.generate();
  const permits = new PermitBook(friend.address);
  permits.add(permitToken(makePermit(owner, friend.address)));
  const { fetch, calls } = scripted([
    [400, { ok: false, error: "bad_envelope", detail: "unknown field permit" }],
    [200, { ok: true, msg_id: "x", duplicate: false }],
  ]);
  const node = new NodeClient("http://node.test", { fetch, permits, beforeSend: (req) => void (req.headers["X-Test"] = "1") });
  const env = friend.message(owner.address, "hi");
  await node.send(env);
  assert.deepEqual(calls.map((c) => c.url), ["http://node.test/api/mesh/dm/send", "http://node.test/api/mesh/dm/send"]);
  assert.deepEqual(calls[0].body.permit, permits.get(owner.address));
  assert.deepEqual(calls[1].body, env);
  assert.equal(calls[0].init.headers["X-Test"], "1", "the beforeSend hook sees each deposit");
  const stranger = await Identity.generate();
  await assert.rejects(node.send(stranger.message(owner.address, "x"), { permit: permitToken(makePermit(owner, friend.address)) }), /another sender/);
  assert.deepEqual({ ...extensions.supported }, { mailboxPolicies: true, permits: true, stamps: true });
});

test("send to a stamps mailbox: a stamp of the policy's difficulty, solved again once at a newer difficulty", async () => {
  const owner = await Identity.generate();
  const alice = await Identity.generate();
  const policy = makePolicy(owner, { version: 1, mode: "stamps", difficulty: 6 });
  const { fetch, calls } = scripted([
    [200, { ok: true, policy }],
    [403, { ok: false, error: "weak_stamp", detail: "", difficulty: 9 }],
    [200, { ok: true, msg_id: "x", duplicate: false }],
  ]);
  const node = new NodeClient("http://node.test", { fetch });
  const env = alice.message(owner.address, "hello stranger");
  await node.send(env);
  assert.equal(calls[0].url, `http://node.test/api/mesh/dm/policy?mailbox=${owner.address}`);
  assert.ok(verifyStamp(env.msg_id, calls[1].body.stamp, 6));
  assert.ok(verifyStamp(env.msg_id, calls[2].body.stamp, 9));
  // A policy not signed by the mailbox is the node's lie, not the owner's word.
  const lie = scripted([[200, { ok: true, policy: { ...policy, difficulty: 30 } }]]);
  await assert.rejects(new NodeClient("http://node.test", { fetch: lie.fetch }).getPolicy(owner.address), ProtocolError);
  const old = scripted([[404, { ok: false, error: "not_found", detail: "" }]]);
  assert.equal(await new NodeClient("http://node.test", { fetch: old.fetch }).getPolicy(owner.address), null, "a node before v3");
});
