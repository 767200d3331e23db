// The browser inbox: one identity kept in IndexedDB, send, and live incoming mail through long-poll.
import {
  ContactsOnlyError,
  Identity,
  NodeClient,
  PermitBook,
  SenderCapError,
  makePermit,
  makePolicy,
  permitToken,
  ready,
} from "../../js/src/index.js";

const $ = (id) => /** @type {any} */ (document.getElementById(id));
const DB_NAME = "meshrelay-inbox";

// ------------------------------------------------------------------ IndexedDB

function openDb() {
  return new Promise((resolve, reject) => {
    const req = indexedDB.open(DB_NAME, 1);
    req.onupgradeneeded = () => {
      req.result.createObjectStore("kv");
      req.result.createObjectStore("messages", { keyPath: "msgId" });
    };
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

function tx(db, store, mode, fn) {
  return new Promise((resolve, reject) => {
    const t = db.transaction(store, mode);
    const req = fn(t.objectStore(store));
    t.oncomplete = () => resolve(req?.result);
    t.onerror = () => reject(t.error);
  });
}

// ------------------------------------------------------------------ state

let db;
let identity;
let node;
let watching = null;
/** the permits this identity was given (kept in IndexedDB as mailbox -> token) */
let permits;
/** this mailbox's policy at the node (null: none, open) */
let policy = null;

function defaultNodeUrl() {
  const param = new URLSearchParams(location.search).get("node");
  if (param) return param;
  if (location.protocol.startsWith("http") && location.pathname.startsWith("/inbox")) return location.origin;
  return "http://127.0.0.1:8080";
}

function setStatus(text, kind = "") {
  $("status").textContent = text;
  $("status").className = `status ${kind}`;
}

function render(messages) {
  const list = $("inbox");
  list.replaceChildren(
    ...messages
      .sort((a, b) => b.received - a.received)
      .map((m) => {
        const li = document.createElement("li");
        li.dataset.msgId = m.msgId;
        const meta = document.createElement("div");
        meta.className = "meta";
        meta.textContent = `from ${m.sender} · ${new Date(m.ts * 1000).toLocaleString()}`;
        const body = document.createElement("div");
        body.className = "body";
        body.textContent = m.text;
        li.append(meta, body);
        return li;
      }),
  );
  $("empty").hidden = messages.length > 0;
  $("count").textContent = messages.length ? `(${messages.length})` : "";
}

function describePolicy(p) {
  if (!p || p.mode === "open") return "Anyone may write to you (open).";
  const how = p.mode === "stamps" ? `strangers attach a stamp of ${p.difficulty} bits of work` : "only contacts with a permit";
  return `Version ${p.version}: ${how}; at most ${p.stranger_cap} unread messages from strangers.`;
}

async function loadPolicy() {
  try {
    policy = await node.getPolicy(identity.address);
    $("policy").textContent = describePolicy(policy);
    $("mode").value = policy?.mode ?? "open";
    if (policy?.mode === "stamps") $("difficulty").value = String(policy.difficulty);
    $("difficulty").hidden = $("mode").value !== "stamps";
  } catch (e) {
    $("policy").textContent = `cannot read your policy: ${e.message}`;
  }
}

async function loadPermits() {
  const stored = await tx(db, "kv", "readonly", (s) => s.get(`permits:${identity.address}`));
  permits = PermitBook.fromJSON(identity.address, stored ?? {});
  const kept = Object.keys(permits.toJSON());
  $("permits").textContent = kept.length ? `Kept for: ${kept.join(", ")}` : "None yet.";
  node.permits = permits;
}

async function refresh() {
  render(await tx(db, "messages", "readonly", (s) => s.getAll()));
}

// ------------------------------------------------------------------ watch

function startWatch() {
  watching?.abort();
  const stop = new AbortController();
  watching = stop;
  const me = identity;
  node.health().then(
    () => stop.signal.aborted || setStatus("live", "live"),
    (e) => stop.signal.aborted || setStatus(`cannot reach the node: ${e.message}`, "error"),
  );
  node.watch(me, {
    signal: stop.signal,
    wait: 25,
    onMessage: async (msg) => {
      // Store first; the watch acks it once this returns (delivery is at-least-once).
      await tx(db, "messages", "readwrite", (s) =>
        s.put({ msgId: msg.msgId, sender: msg.sender, ts: msg.ts, text: msg.text, received: Date.now() }),
      );
      await refresh();
      setStatus("live", "live");
    },
    onError: (e) => {
      if (!stop.signal.aborted) setStatus(`reconnecting: ${e.message}`, "error");
    },
  });
}

async function useIdentity(ident) {
  identity = ident;
  await tx(db, "kv", "readwrite", (s) => s.put(ident.toJSON(), "identity"));
  $("address").textContent = ident.address;
  $("key-json").value = "";
  startWatch();
  await loadPermits();
  await loadPolicy();
}

function useNode(url) {
  node = new NodeClient(url, { retries: 2, permits });
  $("node-url").value = node.baseUrl;
  localStorage.setItem("meshrelay-node", node.baseUrl);
  if (identity) {
    startWatch();
    loadPolicy();
  }
}

// ------------------------------------------------------------------ UI

async function main() {
  await ready();
  db = await openDb();
  useNode(new URLSearchParams(location.search).get("node") ?? localStorage.getItem("meshrelay-node") ?? defaultNodeUrl());
  const stored = await tx(db, "kv", "readonly", (s) => s.get("identity"));
  await useIdentity(stored ? await Identity.fromJSON(stored) : await Identity.generate());
  await refresh();

  $("node-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    try {
      useNode($("node-url").value);
    } catch (e) {
      setStatus(e.message, "error");
    }
  });
  $("copy").addEventListener("click", () => navigator.clipboard?.writeText(identity.address));
  $("new-identity").addEventListener("click", async () => {
    if (confirm("Replace this identity? Mail to the old address will no longer reach you.")) {
      await tx(db, "messages", "readwrite", (s) => s.clear());
      await useIdentity(await Identity.generate());
      await refresh();
    }
  });
  $("export").addEventListener("click", () => ($("key-json").value = JSON.stringify(identity.toJSON(), null, 2)));
  $("import").addEventListener("click", async () => {
    try {
      await useIdentity(await Identity.fromJSON(JSON.parse($("key-json").value)));
      await tx(db, "messages", "readwrite", (s) => s.clear());
      await refresh();
    } catch (e) {
      setStatus(`cannot import: ${e.message}`, "error");
    }
  });
  $("send-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const out = $("send-status");
    out.textContent = "sending…";
    try {
      const onProgress = (p) => (out.textContent = `computing a stamp (${p.difficulty} bits): ${Math.round((100 * p.tries) / p.expected)} % of the expected work`);
      const sent = await node.send(identity.message($("to").value.trim(), $("text").value), { onProgress });
      out.textContent = `sent ✓ ${sent.msg_id.slice(0, 12)}`;
      $("text").value = "";
    } catch (e) {
      out.textContent =
        e instanceof SenderCapError
          ? `not sent: they have not read ${e.pending} of your messages yet (limit ${e.limit})`
          : e instanceof ContactsOnlyError
            ? "not sent: this mailbox takes mail only from contacts; ask its owner for a permit"
            : `not sent: ${e.message}`;
    }
  });
  $("mode").addEventListener("change", () => ($("difficulty").hidden = $("mode").value !== "stamps"));
  $("policy-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      const mode = $("mode").value;
      const next = makePolicy(identity, {
        version: (policy?.version ?? 0) + 1,
        mode,
        difficulty: mode === "stamps" ? Number($("difficulty").value) : 0,
        strangerCap: policy?.stranger_cap,
        epoch: policy?.epoch ?? 0,
      });
      await node.setPolicy(next);
      await loadPolicy();
    } catch (e) {
      $("policy").textContent = `policy not saved: ${e.message}`;
    }
  });
  $("permit-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    try {
      const permit = makePermit(identity, $("permit-for").value.trim(), { epoch: policy?.epoch ?? 0 });
      $("permit-token").value = permitToken(permit);
    } catch (e) {
      $("permit-token").value = `no permit: ${e.message}`;
    }
  });
  $("keep-permit-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      permits.add($("keep-permit").value);
      await tx(db, "kv", "readwrite", (s) => s.put(permits.toJSON(), `permits:${identity.address}`));
      $("keep-permit").value = "";
      await loadPermits();
    } catch (e) {
      $("permits").textContent = `not kept: ${e.message}`;
    }
  });
  document.body.dataset.ready = "true";
}

main().catch((e) => setStatus(`failed to start: ${e.message}`, "error"));
