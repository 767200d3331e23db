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
