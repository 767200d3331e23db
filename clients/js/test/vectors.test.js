// docs/protocol.md Appendix A and the docs/client.md worked example, reproduced byte for byte.
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  Identity,
  b64uEncode,
  computeStamp,
  envelopeSignedBytes,
  fromHex,
  makePermit,
  makePolicy,
  parsePermitToken,
  permitToken,
  pollSignedBytes,
  solveStamp,
  stampWork,
  toHex,
  verifyPermit,
  verifyPolicy,
} from "../src/index.js";

const seq = (start, n) => Uint8Array.from({ length: n }, (_, i) => start + i);

test("Appendix A.1: the envelope's signed bytes, msg_id, sig and canonical JSON", async () => {
  const sender = await Identity.fromSeed(fromHex("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"));
  const mailbox = await Identity.fromSeed(fromHex("202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f"));
  assert.equal(sender.address, "A6EHv_POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg");
  assert.equal(mailbox.address, "Kay64UG8yvCyLhqU000LxzYeUm0L_hLIl5S8kyKWbdc");
  const ciphertext = fromHex("70726f746f636f6c2e6d64207465737420766563746f7200feff");
  assert.equal(b64uEncode(ciphertext), "cHJvdG9jb2wubWQgdGVzdCB2ZWN0b3IA_v8");
  const signed = envelopeSignedBytes({ mailbox: mailbox.address, sender: sender.address, ts: 1800000000, ttl: 3600, ciphertext });
  assert.equal(
    toHex(signed),
    "6d65736872656c61792f656e76656c6f70652f76310a4b61793634554738797643794c6871553030304c787a5965556d304c5f684c496c3553386b794b576264630a41364548765f504f454c3464634e3059353076416d57666b316a436270513166486479475a424a564d62670a313830303030303030300a333630300a31343338353334386166343337333939633566613566316265373265663330353235363334633265306232613336313730393732653461613564346666653436",
  );
  const env = sender.envelope(mailbox.address, ciphertext, { ttl: 3600, now: 1800000000 });
  assert.equal(env.msg_id, "57ccbe063da1a1b7ff26af604c26763f552c4453b76a425fefd538313c44ef4c");
  assert.equal(env.sig, "CGdwrHPb5SXzsXNw9OgKdshqTv3WWE941dI5N82frWctF-Q-mTB4boFN12mr8X9IVz-dsv7TGERJ0GY8LG8UBQ");
  const canonical = JSON.stringify(env);
  assert.equal(
    canonical,
    '{"v":1,"msg_id":"57ccbe063da1a1b7ff26af604c26763f552c4453b76a425fefd538313c44ef4c","mailbox":"Kay64UG8yvCyLhqU000LxzYeUm0L_hLIl5S8kyKWbdc","sender":"A6EHv_POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg","ts":1800000000,"ttl":3600,"ciphertext":"cHJvdG9jb2wubWQgdGVzdCB2ZWN0b3IA_v8","sig":"CGdwrHPb5SXzsXNw9OgKdshqTv3WWE941dI5N82frWctF-Q-mTB4boFN12mr8X9IVz-dsv7TGERJ0GY8LG8UBQ"}',
  );
  assert.equal(canonical.length, 367);
});

test("Appendix A.2: poll signed bytes and signatures, with and without acks", async () => {
  const mailbox = await Identity.fromSeed(fromHex("202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f"));
  const empty = mailbox.signedRequest({ now: 1800000060, nonce: seq(0, 16) });
  assert.equal(empty.nonce, "AAECAwQFBgcICQoLDA0ODw");
  assert.equal(
    toHex(pollSignedBytes(empty)),
    "6d65736872656c61792f706f6c6c2f76310a4b61793634554738797643794c6871553030304c787a5965556d304c5f684c496c3553386b794b576264630a313830303030303036300a41414543417751464267634943516f4c4441304f44770a",
  );
  assert.equal(empty.sig, "GIhp-B8E8d7wRLFuIowF1EM-f8ep8ON7C-MlC41N24cSG80d0x-4na5grd7nQUg9lj_QJJmMX_FcJxXGDZqVDw");
  const acking = mailbox.signedRequest({
    now: 1800000120,
    nonce: seq(16, 16),
    ack: ["57ccbe063da1a1b7ff26af604c26763f552c4453b76a425fefd538313c44ef4c"],
  });
  assert.equal(acking.nonce, "EBESExQVFhcYGRobHB0eHw");
  assert.equal(acking.sig, "fji9tX3RkM9q_KUEXjViKG2FyX94wYb4iKBggwil1hVXZAMcUC75PjpWFamQMtjUYGtZheSmhbMMcrGXARb8BA");
  assert.equal(
    JSON.stringify(acking),
    '{"mailbox":"Kay64UG8yvCyLhqU000LxzYeUm0L_hLIl5S8kyKWbdc","ts":1800000120,"nonce":"EBESExQVFhcYGRobHB0eHw","ack":["57ccbe063da1a1b7ff26af604c26763f552c4453b76a425fefd538313c44ef4c"],"sig":"fji9tX3RkM9q_KUEXjViKG2FyX94wYb4iKBggwil1hVXZAMcUC75PjpWFamQMtjUYGtZheSmhbMMcrGXARb8BA"}',
  );
});

test("docs/client.md worked example: envelope and ack poll", async () => {
  const alice = await Identity.fromSeed(fromHex("8cb76763f4d4ebaca416f1b56314414b1b9f11c8836f802a554b97271657da62"));
  const bob = await Identity.fromSeed(fromHex("f5934bc88bbcca9115b14558579f723d74fe3e2148b0109af6c7c2ea9c0508f1"));
  assert.equal(alice.address, "W44WA9GubSEhgpVRcL1GENrl1Qbdy0U1j8lHSPM1Edg");
  assert.equal(bob.address, "wX5l4bVoSzt3oJ-I_3OcREAwoINmCPrpzhR5Hu-YFAw");
  const ct = new TextEncoder().encode("example ciphertext: a real client sends a sealed box here");
  const env = alice.envelope(bob.address, ct, { ttl: 86400, now: 1795000000 });
  assert.equal(env.msg_id, "175308d320f04744f2e9f2a923e6964475a7754e20094895e57f659f79bd271c");
  assert.equal(env.sig, "m14h1wMuk3tpkzW1aLLHG_sJqMv9I_D7FIyekjWAd-gNa91BFr8d6BT_LZl6Gammu87oXWo3yx2dAffJsUJeDg");
  const ack = bob.signedRequest({ now: 1795000100, nonce: seq(0, 16), ack: [env.msg_id] });
  assert.equal(ack.sig, "NTP8OMBgij2EREQHyHj4GSPGfDfFB0dGiCB97f5W6NUQTPdAt2yYpCb2bt-4UKrUR5xEbv35hr802MbuVAe8Ag");
});

test("12.6: the policy, permit, token and stamp vectors of docs/protocol.md, byte for byte", async () => {
  const sender = await Identity.fromSeed(fromHex("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"));
  const mailbox = await Identity.fromSeed(fromHex("202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f"));
  const policy = makePolicy(mailbox, { version: 2, mode: "stamps", difficulty: 12, strangerCap: 64, epoch: 1, now: 1800000000 });
  assert.equal(policy.sig, "IgcGlapBhKdZ0GtASqqs9kgNNqj9R-p2HPVzBhyiGvF3a7UQhHbk9UOOPHT2_GsT3vZSC-DhzqGvFm0RQdZmDg");
  assert.deepEqual(Object.keys(policy), ["mailbox", "version", "mode", "difficulty", "stranger_cap", "epoch", "ts", "sig"]);
  assert.ok(verifyPolicy(policy));
  const permit = makePermit(mailbox, sender.address, { expires: 1800086400, epoch: 1 });
  assert.equal(permit.sig, "vtVO9ztkpQIAeEAeiMjGP4eIE930lzzZKRNMsnOxW2rlDC1FSICmZZ5aBEMBCElkpzylNfHBLMOfU8pKvbHbCA");
  const token =
    "mrp1.Kay64UG8yvCyLhqU000LxzYeUm0L_hLIl5S8kyKWbdcDoQe_884Qvh1w3RjnS8CZZ-TWMJulDV8d3IZkElUxuAAAAABrSyOAAAAAAAAAAAG-1U73O2SlAgB4QB6IyMY_h4gT3fSXPNkpE0yyc7FbauUMLUVIgKZlnloEQwEISWSnPKU18cEsw59Tykq9sdsI";
  assert.equal(permitToken(permit), token);
  assert.equal(token.length, 197);
  assert.deepEqual(parsePermitToken(token), permit);
  assert.ok(verifyPermit(permit));
  const msgId = "57ccbe063da1a1b7ff26af604c26763f552c4453b76a425fefd538313c44ef4c";
  assert.deepEqual(solveStamp(msgId, 12), { stamp: "AAAAAAAAETE", tries: 4402 });
  assert.equal(b64uEncode(Uint8Array.of(0, 0, 0, 0, 0, 0, 0x11, 0x31)), "AAAAAAAAETE");
  assert.equal(stampWork(msgId, "AAAAAAAAETE"), 15);
  assert.equal(await computeStamp(msgId, 12), "AAAAAAAAETE", "the worker finds the same first solution");
});
