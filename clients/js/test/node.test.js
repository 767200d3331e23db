// The JS client against real `twistd meshrelay` nodes, and interop with the Python client both ways.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdtemp, readFile, rm, writeFile, stat, unlink } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { execFile } from "node:child_process";
import { promisify } from "node:util";
import {
  BadSignatureError,
  Identity,
  NodeClient,
  ReplayedError,
  SenderCapError,
  UnsupportedMediaTypeError,
  STATUS_BY_CODE,
} from "../src/index.js";
import { loadIdentity, saveIdentity } from "../src/node.js";
import { REPO, PYTHON, eventually, meshrelayCli, missingPython, pythonEnv, startMesh } from "./harness.js";

const skip = missingPython() ?? false;
const HERE = path.dirname(fileURLToPath(import.meta.url));
let mesh;
let keys;

before(async () => {
  if (skip) return;
  mesh = await startMesh(2);
  keys = await mkdtemp(path.join(tmpdir(), "meshrelay-js-keys-"));
});
after(async () => {
  await mesh?.stop();
  if (keys) await rm(keys, { recursive: true, force: true });
});

test("send, poll, ack and count against a real node; the ack spreads to the peer", { skip }, async () => {
  const [a, b] = mesh.nodes.map((n) => new NodeClient(n.url));
  const alice = await Identity.generate();
  const bob = await Identity.generate();
  const sent = await a.send(alice.message(bob.address, "hello bob"));
  assert.deepEqual([sent.ok, sent.duplicate], [true, false]);
  assert.equal((await a.send((await a.poll(bob)).messages[0])).duplicate, true, "a repeat is a duplicate");
  // Pushed to the peer: bob reads it there.
  // An empty list is truthy in JS: wait for the message itself, not for any answer.
  const got = await eventually(async () => {
    const { messages } = await b.poll(bob);
    return messages.length ? messages : null;
  }, { what: "replication" });
  const msg = bob.openEnvelope(got[0]);
  assert.deepEqual([msg.sender, msg.text, msg.msgId], [alice.address, "hello bob", sent.msg_id]);
  assert.equal(await b.count(bob), 1);
  await b.ack(bob, [msg.msgId]);
  assert.equal(await b.count(bob), 0);
  await eventually(async () => (await a.count(bob)) === 0, { what: "the ack reaching the other node" });
});

test("long-poll watch: a message sent after the watch began is delivered once, then acked", { skip }, async () => {
  const [a, b] = mesh.nodes.map((n) => new NodeClient(n.url));
  const alice = await Identity.generate();
  const bob = await Identity.generate();
  const stop = new AbortController();
  const seen = [];
  let deliver;
  const delivered = new Promise((r) => (deliver = r));
  const watching = b.watch(bob, { wait: 10, signal: stop.signal, onMessage: (m) => { seen.push(m.text); deliver(); } });
  await a.send(alice.message(bob.address, "live"));
  await delivered;
  stop.abort();
  await watching;
  assert.deepEqual(seen, ["live"]);
  // The watch acked it on the way out: gone on both nodes.
  await eventually(async () => (await a.count(bob)) === 0 && (await b.count(bob)) === 0, { what: "ack on both nodes" });
});

test("typed errors: sender_cap with pending and limit, replayed, bad_signature, unsupported_media_type", { skip }, async () => {
  const node = new NodeClient(mesh.nodes[0].url, { retries: 0 });
  const alice = await Identity.generate();
  const bob = await Identity.generate();
  for (let i = 0; i < 8; i++) await node.send(alice.message(bob.address, `m${i}`));
  const capped = await node.send(alice.message(bob.address, "one too many")).catch((e) => e);
  assert.ok(capped instanceof SenderCapError, String(capped));
  assert.deepEqual([capped.status, capped.code, capped.pending, capped.limit], [429, "sender_cap", 8, 8]);
  const body = bob.signedRequest();
  await node.request("POST", "/api/mesh/dm/count", () => body);
  await assert.rejects(node.request("POST", "/api/mesh/dm/count", () => body), ReplayedError);
  const forged = { ...alice.message(bob.address, "x"), sig: alice.message(bob.address, "y").sig };
  await assert.rejects(node.send(forged), (e) => e instanceof BadSignatureError || e.code === "bad_envelope");
  const resp = await fetch(`${mesh.nodes[0].url}/api/mesh/dm/count`, { method: "POST", body: "{}", headers: { "Content-Type": "text/plain" } });
  assert.equal(resp.status, STATUS_BY_CODE.unsupported_media_type);
  assert.equal(UnsupportedMediaTypeError.code, (await resp.json()).error);
});

test("interop: sealed by the JS client, read by the Python CLI", { skip }, async () => {
  const node = new NodeClient(mesh.nodes[0].url);
  const alice = await Identity.generate();
  const bobKey = path.join(keys, "bob-from-js.key");
  const bob = await Identity.generate();
  await saveIdentity(bob, bobKey);
  assert.equal((await stat(bobKey)).mode & 0o777, 0o600);
  await node.send(alice.message(bob.address, "hej från JS ✓"));
  // Read at the other node: the push brings it there while the long-poll waits.
  const { stdout } = await meshrelayCli(["poll", "--key", bobKey, "--node", mesh.nodes[1].url, "--wait", "20", "--ack", "--json"]);
  const got = stdout.trim().split("\n").map((l) => JSON.parse(l));
  assert.equal(got.length, 1, stdout);
  assert.equal(got[0].from, alice.address);
  assert.equal(got[0].text, "hej från JS ✓");
  await eventually(async () => (await node.count(bob)) === 0, { what: "the CLI's ack reaching the first node" });
});

test("interop: sealed by the Python CLI (its key file), read by the JS client", { skip }, async () => {
  const aliceKey = path.join(keys, "alice-from-py.key");
  const { stdout: address } = await meshrelayCli(["keygen", "--key", aliceKey]);
  const alice = await loadIdentity(aliceKey);
  assert.ok(address.includes(alice.address), "the JS client reads the Python key file");
  const bob = await Identity.generate();
  await meshrelayCli(["send", "--key", aliceKey, "--node", mesh.nodes[0].url, "--to", bob.address, "hello from Python"]);
  const node = new NodeClient(mesh.nodes[0].url);
  const { messages } = await node.poll(bob);
  const msg = bob.openEnvelope(messages[0]);
  assert.deepEqual([msg.sender, msg.text], [alice.address, "hello from Python"]);
});

test("the error table is the node's: every code of meshrelay/errors.py, same status", { skip }, async () => {
  const run = promisify(execFile);
  const { stdout } = await run(PYTHON, ["-c", "import json; from meshrelay.errors import STATUS_BY_CODE; print(json.dumps(STATUS_BY_CODE))"], { env: pythonEnv() });
  assert.deepEqual({ ...STATUS_BY_CODE }, JSON.parse(stdout));
});

test("docs/client.md's JavaScript quick start runs as written", { skip }, async () => {
  const doc = await readFile(path.join(REPO, "docs", "client.md"), "utf8");
  const code = doc.split("## 6. JavaScript")[1]?.split("```js\n")[1]?.split("```")[0];
  assert.ok(code, "docs/client.md has a JavaScript section with a js block");
  const file = path.join(HERE, `.quickstart-${process.pid}.mjs`);
  await writeFile(file, code);
  try {
    const run = promisify(execFile);
    const { stdout } = await run(process.execPath, [file], {
      env: { ...process.env, MESHRELAY_NODE: mesh.nodes[0].url },
      timeout: 60000,
    });
    assert.match(stdout, /bob got "hello bob" from [A-Za-z0-9_-]{43}/);
  } finally {
    await unlink(file);
  }
});
