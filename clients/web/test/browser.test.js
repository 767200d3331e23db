// The browser inbox in headless Debian Chromium (playwright-core), against two peered real nodes.
//
// Page A is served by node0 itself (web.inbox_dir) and talks to node0; page B comes from a plain
// static server on another origin and talks to node1 across origins (CORS). A message sent on
// page A appears live on page B, and B's ack removes it from both nodes.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { createServer } from "node:http";
import { existsSync } from "node:fs";
import { copyFile, readFile, mkdtemp } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { Identity, NodeClient } from "../../js/src/index.js";
import { eventually, freePort, missingPython, startMesh } from "../../js/test/harness.js";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const DIST = path.resolve(HERE, "..", "dist");
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";

function skipReason() {
  if (!existsSync(CHROMIUM)) return `no chromium at ${CHROMIUM} (apt-get install chromium, or set CHROMIUM)`;
  if (!existsSync(path.join(DIST, "index.html"))) return "the inbox is not built (npm run build)";
  return missingPython();
}
const skip = skipReason() ?? false;
if (skip) console.log(`# browser test skipped: ${skip}`);

let mesh;
let browser;
let staticServer;
let staticUrl;

const TYPES = { ".html": "text/html", ".js": "text/javascript", ".css": "text/css" };

before(async () => {
  if (skip) return;
  mesh = await startMesh(2, { config: { web: { inbox_dir: DIST } } });
  const port = await freePort();
  staticServer = createServer(async (req, res) => {
    const name = new URL(req.url, "http://x").pathname.slice(1) || "index.html";
    if (!/^[a-z-]+\.(html|js|css)$/.test(name)) return res.writeHead(404).end();
    try {
      const body = await readFile(path.join(DIST, name));
      res.writeHead(200, { "Content-Type": TYPES[path.extname(name)] }).end(body);
    } catch {
      res.writeHead(404).end();
    }
  });
  await new Promise((resolve) => staticServer.listen(port, "127.0.0.1", resolve));
  staticUrl = `http://127.0.0.1:${port}`;
  const { chromium } = await import("playwright-core");
  browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox"] });
});

after(async () => {
  await browser?.close();
  staticServer?.close();
  await mesh?.stop();
});

async function openInbox(url) {
  const context = await browser.newContext({ viewport: { width: 900, height: 1000 } });
  const page = await context.newPage();
  const problems = [];
  page.on("pageerror", (e) => problems.push(String(e)));
  page.on("console", (m) => m.type() === "error" && problems.push(m.text()));
  await page.goto(url);
  await page.waitForSelector("body[data-ready=true]");
  await page.waitForSelector('[data-testid=status].live');
  const address = (await page.textContent("[data-testid=address]")).trim();
  assert.match(address, /^[A-Za-z0-9_-]{43}$/);
  return { context, page, address, problems };
}

test("a message sent from one page appears live in the other; its ack removes it from both nodes", { skip, timeout: 120000 }, async () => {
  const [node0, node1] = mesh.nodes;
  const a = await openInbox(`${node0.url}/inbox/`);
  const b = await openInbox(`${staticUrl}/index.html?node=${encodeURIComponent(node1.url)}`);
  assert.notEqual(new URL(b.page.url()).origin, node1.url, "page B calls its node across origins");
  assert.notEqual(a.address, b.address);

  // The identity survives a reload (IndexedDB).
  await a.page.reload();
  await a.page.waitForSelector("body[data-ready=true]");
  assert.equal((await a.page.textContent("[data-testid=address]")).trim(), a.address);

  // B asks strangers for a stamp (a low difficulty) and issues a permit token: A's send below is
  // then stamped in A's browser, by the library's Worker.
  await b.page.selectOption("[data-testid=mode]", "stamps");
  await b.page.fill("[data-testid=difficulty]", "10");
  await b.page.click("[data-testid=save-policy]");
  await b.page.waitForFunction(() => document.querySelector("[data-testid=policy]").textContent.includes("stamp of 10 bits"));
  assert.equal((await new NodeClient(node1.url).getPolicy(b.address))?.difficulty, 10);
  await eventually(async () => (await new NodeClient(node0.url).getPolicy(b.address))?.mode === "stamps", { what: "the policy reaching node0" });
  await b.page.fill("[data-testid=permit-for]", a.address);
  await b.page.click("[data-testid=issue-permit]");
  assert.match(await b.page.inputValue("[data-testid=permit-token]"), /^mrp1\.[A-Za-z0-9_-]{192}$/);

  const text = `hello from page A ${Date.now()}`;
  await a.page.fill("[data-testid=to]", b.address);
  await a.page.fill("[data-testid=text]", text);
  await a.page.click("[data-testid=send]");
  await a.page.waitForFunction(() => document.querySelector("[data-testid=send-status]").textContent.startsWith("sent"));
  const item = await b.page.waitForSelector(`[data-testid=inbox] li:has-text("${text}")`);
  assert.match(await item.textContent(), new RegExp(`from ${a.address}`));

  // B's key, exported from its page, lets the test count B's mailbox on both nodes.
  await b.page.click("summary");
  await b.page.click("#export");
  const bob = await Identity.fromJSON(JSON.parse(await b.page.inputValue("[data-testid=key-json]")));
  assert.equal(bob.address, b.address);
  for (const node of [node1, node0]) {
    const client = new NodeClient(node.url);
    await eventually(async () => (await client.count(bob)) === 0, { what: `the ack removing the message from ${node.name}` });
  }
  await b.page.fill("[data-testid=key-json]", "");
  await b.page.click("summary");

  const shot = path.join(await mkdtemp(path.join(tmpdir(), "inbox-shot-")), "web-inbox.png");
  await b.page.screenshot({ path: shot, fullPage: true });
  if (process.env.MESHRELAY_SCREENSHOT) await copyFile(shot, path.resolve(process.env.MESHRELAY_SCREENSHOT));
  assert.deepEqual([...a.problems, ...b.problems], []);
  await a.context.close();
  await b.context.close();
});
