// Type-checked only (npm run typecheck): what a TypeScript consumer of the published types sees.
import { Identity, NodeClient, SenderCapError, ERROR_CLASSES, type Message } from "meshrelay-client";
import { loadIdentity } from "meshrelay-client/node";

const node = new NodeClient("http://127.0.0.1:8080", { retries: 1 });
const alice: Identity = await Identity.generate();
const bob: Identity = await loadIdentity("bob.key");
const sent: { ok: true; msg_id: string; duplicate: boolean } = await node.send(alice.message(bob.address, "hi"));
const count: number = await node.count(bob);
const { messages, hasMore } = await node.poll(bob, { wait: 25, ack: [sent.msg_id] });
const first: Message = bob.openEnvelope(messages[0]);
const text: string = first.text;
try {
  await node.send(alice.message(bob.address, "again"));
} catch (e) {
  if (e instanceof SenderCapError) console.log(e.pending, e.limit, e.retryAfter, e.status);
}
console.log(count, hasMore, text, Object.keys(ERROR_CLASSES));
// @ts-expect-error: send takes a signed envelope, not text
await node.send("hello");

// First contact (protocol v3)
import { PermitBook, StampRequiredError, makePermit, makePolicy, permitToken, computeStamp, type Policy } from "meshrelay-client";
const policy: Policy = makePolicy(bob, { version: 1, mode: "stamps", difficulty: 20 });
await node.setPolicy(policy);
const held: Policy | null = await node.getPolicy(bob.address);
const book = new PermitBook(alice.address);
book.add(permitToken(makePermit(bob, alice.address, { epoch: held?.epoch ?? 0 })));
const stop = new AbortController();
const stamp: string = await computeStamp(sent.msg_id, 8, { signal: stop.signal, onProgress: (p) => console.log(p.tries, p.expected) });
try {
  await new NodeClient("http://127.0.0.1:8080", { permits: book }).send(alice.message(bob.address, "hi"), { signal: stop.signal });
} catch (e) {
  if (e instanceof StampRequiredError) console.log(e.difficulty, stamp);
}
// @ts-expect-error: a policy mode is one of open, stamps, contacts
makePolicy(bob, { version: 2, mode: "closed" });
