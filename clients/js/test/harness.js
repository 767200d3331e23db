// Real `twistd meshrelay` nodes on loopback ports for the JS tests (the JS twin of tests/harness.py).
//
// The nodes run this checkout's Python code with the venv's interpreter: MESHRELAY_PYTHON, else
// <repo>/.venv/bin/python (CI makes .venv before the JS tests run).
import { spawn, execFile } from "node:child_process";
import { mkdtemp, mkdir, writeFile, readFile, rm } from "node:fs/promises";
import { existsSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");
export const PYTHON = process.env.MESHRELAY_PYTHON ?? path.join(REPO, ".venv", "bin", "python");
const run = promisify(execFile);
const handedOut = new Set();

/** The reason the node tests cannot run here, or null. */
export function missingPython() {
  return existsSync(PYTHON) ? null : `no Python venv at ${PYTHON} (make it: python3 -m venv .venv && .venv/bin/pip install -e '.[test]')`;
}

/** A TCP port on 127.0.0.1 below the ephemeral range, free a moment ago. */
export async function freePort() {
  for (let i = 0; i < 1000; i++) {
    const port = 20000 + Math.floor(Math.random() * 12000);
    if (handedOut.has(port)) continue;
    const free = await new Promise((resolve) => {
      const srv = createServer();
      srv.once("error", () => resolve(false));
      srv.listen(port, "127.0.0.1", () => srv.close(() => resolve(true)));
    });
    if (free) {
      handedOut.add(port);
      return port;
    }
  }
  throw new Error("no free port");
}

const tomlValue = (v) => (typeof v === "string" ? JSON.stringify(v) : String(v));

function toToml(raw) {
  const lines = [];
  for (const [section, table] of Object.entries(raw)) {
    if (section === "peers") continue;
    lines.push(`[${section}]`, ...Object.entries(table).map(([k, v]) => `${k} = ${tomlValue(v)}`), "");
  }
  for (const peer of raw.peers ?? []) {
    lines.push("[[peers]]", ...Object.entries(peer).map(([k, v]) => `${k} = ${tomlValue(v)}`), "");
  }
  return lines.join("\n");
}

/** The environment for Python children: this checkout's code first. */
export function pythonEnv() {
  return { ...process.env, PYTHONPATH: REPO + path.delimiter + (process.env.PYTHONPATH ?? "") };
}

export class NodeProcess {
  constructor(baseDir, name, { config = {}, peers = [] } = {}) {
    this.name = name;
    this.dir = path.join(baseDir, name);
    this.extra = config;
    this.peers = peers;
    this.proc = null;
  }

  async start() {
    this.port ??= await freePort();
    this.adminPort ??= await freePort();
    this.url = `http://127.0.0.1:${this.port}`;
    await mkdir(this.dir, { recursive: true });
    const raw = {
      node: {
        public_url: this.url,
        listen: `tcp:${this.port}:interface=127.0.0.1`,
        admin_listen: `tcp:${this.adminPort}:interface=127.0.0.1`,
        data_dir: path.join(this.dir, "data"),
      },
      limits: { client_rate: 0 },
    };
    for (const [section, table] of Object.entries(this.extra)) raw[section] = { ...(raw[section] ?? {}), ...table };
    if (this.peers.length) raw.peers = this.peers;
    this.configPath = path.join(this.dir, "meshrelay.toml");
    await writeFile(this.configPath, toToml(raw));
    const args = ["-c", "from twisted.scripts.twistd import run; run()", "-n", `--pidfile=${path.join(this.dir, "twistd.pid")}`, "meshrelay", "--config", this.configPath];
    this.logPath = path.join(this.dir, "twistd.log");
    const { openSync, closeSync } = await import("node:fs");
    const log = openSync(this.logPath, "a");
    this.proc = spawn(PYTHON, args, { cwd: this.dir, env: pythonEnv(), stdio: ["ignore", log, log] });
    closeSync(log);
    this.exited = new Promise((resolve) => this.proc.once("exit", (code) => resolve(code)));
    await this.waitReady();
    return this;
  }

  async waitReady(timeoutMs = 30000) {
    const deadline = Date.now() + timeoutMs;
    while (Date.now() < deadline) {
      if (this.proc.exitCode !== null) throw new Error(`node ${this.name} exited:\n${await this.tail()}`);
      try {
        const resp = await fetch(`${this.url}/api/mesh/health`, { signal: AbortSignal.timeout(2000) });
        if (resp.status === 200) return;
      } catch {
        // not listening yet
      }
      await new Promise((r) => setTimeout(r, 50));
    }
    throw new Error(`node ${this.name} did not become ready:\n${await this.tail()}`);
  }

  async tail() {
    try {
      return (await readFile(this.logPath, "utf8")).split("\n").slice(-40).join("\n");
    } catch {
      return "(no log)";
    }
  }

  async stop() {
    if (!this.proc || this.proc.exitCode !== null) return;
    this.proc.kill("SIGTERM");
    const timer = setTimeout(() => this.proc.kill("SIGKILL"), 30000);
    await this.exited;
    clearTimeout(timer);
  }
}

/**
 * Start `n` nodes, every pair peered with its own secret (a full mesh), in a fresh temp dir.
 * @returns {Promise<{nodes: NodeProcess[], dir: string, stop: () => Promise<void>}>}
 */
export async function startMesh(n, { config = {} } = {}) {
  const dir = await mkdtemp(path.join(tmpdir(), "meshrelay-js-"));
  const nodes = [];
  for (let i = 0; i < n; i++) {
    const node = new NodeProcess(dir, `node${i}`, { config });
    node.port = await freePort();
    node.adminPort = await freePort();
    node.url = `http://127.0.0.1:${node.port}`;
    nodes.push(node);
  }
  for (let i = 0; i < n; i++) {
    for (let j = i + 1; j < n; j++) {
      const secret = `js-test-secret-${i}-${j}-${Math.random().toString(36).slice(2)}`;
      nodes[i].peers.push({ url: nodes[j].url, secret });
      nodes[j].peers.push({ url: nodes[i].url, secret });
    }
  }
  try {
    await Promise.all(nodes.map((node) => node.start()));
  } catch (e) {
    await Promise.all(nodes.map((node) => node.stop()));
    throw e;
  }
  return {
    nodes,
    dir,
    stop: async () => {
      await Promise.all(nodes.map((node) => node.stop()));
      await rm(dir, { recursive: true, force: true });
    },
  };
}

/** Run the Python `meshrelay` command (this checkout's code); resolves to {stdout, stderr}. */
export async function meshrelayCli(args, opts = {}) {
  return run(PYTHON, ["-m", "meshrelay.cli", ...args], { env: pythonEnv(), timeout: 120000, ...opts });
}

/** Wait until `check()` is truthy, trying at most `tries` times `everyMs` apart; returns its value. */
export async function eventually(check, { tries = 600, everyMs = 50, what = "condition" } = {}) {
  let last;
  for (let i = 0; i < tries; i++) {
    last = await check();
    if (last) return last;
    await new Promise((r) => setTimeout(r, everyMs));
  }
  throw new Error(`${what} did not happen (last: ${JSON.stringify(last)})`);
}
