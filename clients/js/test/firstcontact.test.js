// First contact (docs/protocol.md section 12) against real `twistd meshrelay` nodes: policies,
// stamps computed in a worker, permits, and permit tokens between the JS client and the Python CLI.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import {
  ContactsOnlyError,
  Identity,
  NodeClient,
  PermitBook,
  StalePolicyError,
  StampRequiredError,
  makePermit,
  makePolicy,
  permitToken,
  stampWork,
} from "../src/index.js";
import { loadIdentity, saveIdentity } from "../src/node.js";
import { meshrelayCli, missingPython, startMesh } from "./harness.js";

const skip = missingPython() ?? false;
/** A low difficulty: a stamp takes a few hundred hashes. */
const DIFFICULTY = 8;
let mesh;
let keys;

before(async () => {
  if (skip) return;
  mesh = await startMesh(1);
  keys = await mkdtemp(path.join(tmpdir(), "meshrelay-js-fc-"));
});
after(async () => {
  await mesh?.stop();
  if (keys) await rm(keys, { recursive: true, force: true });
});

test("a stamps mailbox: a stranger's send without a stamp is refused stamp_required, with a computed stamp it is taken", { skip }, async () => {
  const node = new NodeClient(mesh.nodes[0].url, { retries: 0 });
  const bob = await Identity.generate();
  const alice = await Identity.generate();
  assert.equal(await node.getPolicy(bob.address), null, "no policy yet");
  const policy = makePolicy(bob, { version: 1, mode: "stamps", difficulty: DIFFICULTY });
  assert.deepEqual(await node.setPolicy(policy), { ok: true, version: 1, duplicate: false });
  assert.deepEqual(await node.getPolicy(bob.address), policy);
  await assert.rejects(node.setPolicy(makePolicy(bob, { version: 0 })), StalePolicyError);

  const plain = alice.message(bob.address, "no stamp");
  const refused = await node.send(plain, { firstContact: false }).catch((e) => e);
  assert.ok(refused instanceof StampRequiredError, String(refused));
  assert.deepEqual([refused.status, refused.difficulty], [403, DIFFICULTY]);

  let stamp;
  const stamping = new NodeClient(mesh.nodes[0].url, { retries: 0, beforeSend: (req) => void (stamp = req.envelope.stamp) });
  const env = alice.message(bob.address, "hello, with a stamp");
  const result = await stamping.send(env);
  assert.deepEqual([result.ok, result.msg_id, result.duplicate], [true, env.msg_id, false]);
  // The node took the stamp the worker computed; the client's check agrees with the node's.
  assert.ok(stampWork(env.msg_id, stamp) >= DIFFICULTY, stamp);
  const { messages } = await node.poll(bob);
  assert.deepEqual(messages.map((m) => bob.openEnvelope(m).text), ["hello, with a stamp"]);
});

test("a contacts mailbox: a stranger is refused contacts_only, a contact with a permit gets through", { skip }, async () => {
  const node = new NodeClient(mesh.nodes[0].url, { retries: 0 });
  const bob = await Identity.generate();
  const friend = await Identity.generate();
  const stranger = await Identity.generate();
  await node.setPolicy(makePolicy(bob, { version: 1, mode: "contacts", epoch: 2 }));
  await assert.rejects(node.send(stranger.message(bob.address, "let me in")), ContactsOnlyError);

  const permits = new PermitBook(friend.address);
  permits.add(permitToken(makePermit(bob, friend.address, { epoch: 2 })));
  const withPermits = new NodeClient(mesh.nodes[0].url, { retries: 0, permits });
  await withPermits.send(friend.message(bob.address, "it's me"));
  const { messages } = await node.poll(bob);
  assert.deepEqual(messages.map((m) => [m.sender, bob.openEnvelope(m).text]), [[friend.address, "it's me"]]);
});

test("interop: a permit token from `meshrelay permit issue` admits the JS client to a contacts mailbox", { skip }, async () => {
  const url = mesh.nodes[0].url;
  const bobKey = path.join(keys, "bob.key");
  await meshrelayCli(["keygen", "--key", bobKey]);
  const bob = await loadIdentity(bobKey);
  await meshrelayCli(["policy", "set", "--key", bobKey, "--node", url, "--mode", "contacts"]);
  const policy = await new NodeClient(url).getPolicy(bob.address);
  assert.equal(policy?.mode, "contacts");
  const friend = await Identity.generate();
  const { stdout: token } = await meshrelayCli(["permit", "issue", "--key", bobKey, "--for", friend.address, "--node", url]);
  const permits = new PermitBook(friend.address);
  permits.add(token.trim());
  await new NodeClient(url, { permits }).send(friend.message(bob.address, "from JS with a Python permit"));
  const { messages } = await new NodeClient(url).poll(bob);
  assert.deepEqual(messages.map((m) => bob.openEnvelope(m).text), ["from JS with a Python permit"]);
});

test("interop: a JS-made permit token lets the Python CLI's send into a contacts mailbox", { skip }, async () => {
  const url = mesh.nodes[0].url;
  const node = new NodeClient(url, { retries: 0 });
  const bob = await Identity.generate();
  await node.setPolicy(makePolicy(bob, { version: 3, mode: "contacts" }));
  const friendKey = path.join(keys, "friend.key");
  const friend = await Identity.generate();
  await saveIdentity(friend, friendKey);
  const token = permitToken(makePermit(bob, friend.address));
  // Without the permit the CLI refuses before sending; with it the node takes the envelope.
  await assert.rejects(meshrelayCli(["send", "--key", friendKey, "--node", url, "--to", bob.address, "no permit"]), (e) => /contacts/.test(e.stderr));
  await meshrelayCli(["send", "--key", friendKey, "--node", url, "--to", bob.address, "--permit", token, "from Python with a JS permit"]);
  const { messages } = await node.poll(bob);
  assert.deepEqual(messages.map((m) => [m.sender, bob.openEnvelope(m).text]), [[friend.address, "from Python with a JS permit"]]);
});
