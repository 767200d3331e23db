"""Attack soak: a three-node mesh under every attack of issue 10 at once, with honest clients on the side.

Run from the repository root (the nodes run this checkout's code)::

    python bench/abuse.py --minutes 2                      # the run of record
    python bench/abuse.py --minutes 1 --seed 10 --json bench/results/abuse.json
    python bench/abuse.py --seconds 8 --scale 0.1          # a smoke run of the tool
    python bench/abuse.py --only acks --seconds 30         # one attack alone
    python bench/abuse.py --each --seconds 30 --seed 10    # phase A, then each attack alone: contributions
    python bench/abuse.py --minutes 2 --seed 10 --trace    # also: where honest deposits wait inside the nodes

One invocation runs a no-attack phase and one or more attack phases, each on
three *fresh* ``twistd meshrelay`` nodes (new data directories, so one phase's
stored data, tombstones and nonces cannot bias the next), fully peered with
secrets, listening on 127.0.0.1:

- **phase A, no attack**: honest clients only, for ``--minutes``;
- **phase B, attack**: the same honest clients plus every attack in
  ``--attacks``, concurrently, for the same time (with ``--each``: one phase
  per attack, that attack alone).

**Processes.**  This process only orchestrates: it starts the nodes, samples
their data directories, reads their metrics and serves the hostile peer's
URL from a thread.  The honest clients run in a process of their own, and
every attack in another (``--role`` is internal), so the honest clients'
event loop is not shared with the load generator: their latencies are the
nodes', plus the honest process's own loop lag, which is measured (how late a
0.1 s timer fires) and reported.  A real attacker sends from another host and
does not take the nodes' CPU; on one machine the attackers' scheduling stands
in for that: ``--attack-sched idle`` runs them as ``SCHED_IDLE`` (they get only
the CPU no node, writer or honest client wants, and yield it the moment one
wakes), ``--attack-sched nice`` at ``--attack-nice`` (default 10; before
2026-12-04's third session the only way: at nice 10 the attackers still took
about 0.8 of the machine's 2 cores and delayed the nodes' wakeups).  Each
attacker's CPU and achieved request rate are reported either way, so what it
managed to send is known.  Two more knobs tell the load generators' own
scheduling from the nodes': ``--attack-cpus 1`` confines the attackers to
CPU 1 (their kernel work on loopback, which ``SCHED_IDLE`` does not shield,
then leaves CPU 0 alone), and ``--honest-nice -10`` raises the honest clients'
process above the nodes (a real client's event loop is not on the nodes'
cores; needs ``CAP_SYS_NICE``).  Both default to off.

Honest clients (each from its own loopback address, 127.0.1.x): ``--senders``
senders deposit at ``--honest-rate`` per second each (open loop) at "their"
node, always to a recipient who long-polls (``wait=10``) at *another* node, so
every message crosses the mesh; recipients ack what they got with their next
poll.  Measured per honest operation: a deposit succeeds on 200, a poll on 200,
a delivery when an accepted deposit reaches its recipient before the phase's
drain ends (``--drain`` s after the senders stop).  Latencies: the deposit's
answer, and deposit-sent to delivered.

Attacks (each from its own loopback source addresses, 127.0.0.x; rates are per
node, times ``--scale``):

``acks``          signed polls from throwaway mailboxes, each acking 500 made-up ids
``nonce``         client polls stamped ts = now + clock_skew - 1, filling the poll nonce cache
``peer_nonce``    a hostile peer (it has a peer secret) sending changes requests stamped
                  now + clock_skew - 1, filling the peer nonce cache
``idle``          one address holding many idle TCP connections per node
``longpolls``     a few addresses holding many waiting long-polls per node
``flood``         one address depositing big envelopes (max_message_bytes of ciphertext),
                  a fresh sender key for each, into fresh mailboxes, to fill the stores
``xff``           X-Forwarded-For junk through 127.0.0.1 as a trusted proxy (see ``--xff``)
``fetch_remote``  an attacker fills its own mailbox at node a (per_mailbox_pending big envelopes,
                  from several addresses, before the honest clients start), then polls it with
                  fetch_remote at every node, never acking
``log_flood``     peer requests naming a real peer with a bad HMAC

The nodes run the defaults an operator would keep, except caps scaled down so
that a run of a minute or two can reach them (``--cap-mb``, ``--max-nonces``,
``--max-waiting-polls``, ``--max-connections``; see ``node_config``), and a
fourth configured peer, the hostile one, whose URL is a sink served by this
process (it accepts whatever the nodes push to it and has no changes), in every
phase.  With ``--xff proxy`` (default) the nodes trust 127.0.0.1 as a reverse
proxy (``trusted_proxies``), as ``docs/operator.md`` says to do behind nginx,
and the xff attacker sends from 127.0.0.1 what ``$proxy_add_x_forwarded_for``
would pass on: junk followed by its real address; ``--xff direct`` sends the
junk alone (a proxy that passes the header through unchanged); ``--xff skip``
trusts no proxy and skips the attack.

``--trace`` loads ``bench/trace_node.py`` into every node (a prelude; it changes nothing the
node does) and prints, per node and phase, the honest deposits' time inside the node by segment
(read, checks, wait for a writer slot, writer, answer; p50/p99/p99.9) and the node's reactor
lateness (how late a 5 ms timer fires): what of the honest tail is the node's own, and what is
the wait before the reactor reads a request or outside the node.

At the end it prints, per phase, the honest success rate and p99 latencies,
every node's data directory (the sum of its files' sizes) against the cap
(``max_stored_bytes``), each node's log lines, the nodes' CPU, the honest
process's CPU and loop lag, each attacker's CPU, loop lag and requests by
outcome; then the verdict against the targets (honest success >= 99 %, honest
p99 <= 2x the no-attack run, every node's data within its cap), for every
attack phase.  Exit status 1 when a target is missed, 0 when all are met, 2
when the tool failed.  Everything is bounded by the phase length and
per-attack in-flight caps, and every process is stopped at the end.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import random
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common
import treq
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet import defer, protocol, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.web.client import Agent, HTTPConnectionPool

from meshrelay import envelope as E
from meshrelay.config import LimitsConfig
from meshrelay.peernet import QuietEndpoint
from meshrelay.peers import H_HMAC, H_NONCE, H_TS, H_URL, compute_mac, derive_key
from tests.harness import NodeProcess
from tests.helpers import link_secret

NAMES = ("a", "b", "c")
SEND = "/api/mesh/dm/send"
POLL = "/api/mesh/dm/poll"
REPLICATE = "/api/mesh/dm/replicate-envelope"
CHANGES = "/api/mesh/dm/changes"
JSON_HEADERS = {"Content-Type": ["application/json"]}
ATTACKS = ("acks", "nonce", "peer_nonce", "idle", "longpolls", "flood", "xff", "fetch_remote", "log_flood")
HOSTILE_SECRET = "hostile-peer-secret-0123456789abcdef"
#: node defaults kept (docs/operator.md); the bench changes only what node_config says
CLOCK_SKEW = 300
MAX_TTL = 259200
MAX_MESSAGE = 8192
PER_MAILBOX = 256
CLIENT_RATE = 100
#: a honest long-poll's wait (s); a request that has not finished after its wait + this is a failure
HONEST_WAIT = 10
GUARD = 30
#: how often an honest sender retries a deposit answered 429 (after Retry-After, at least a back-off)
HONEST_RETRIES = 3
#: attack rates per node per second (times --scale), sizes per node
ATTACK_RATES = {
    "acks": 2.0,
    "nonce": 30.0,
    "peer_nonce": 30.0,
    "flood": 40.0,
    "fetch_remote": 1.0,
    "log_flood": 30.0,
}
#: the xff attacker's rate (per second, at node a only): above client_rate, so that a 429 shows the
#: per-address limit held and its absence that the junk was believed
XFF_RATE = 120.0
IDLE_PER_NODE = 500
LONGPOLL_ADDRS = 3
LONGPOLLS_PER_ADDR_PER_NODE = 100
#: source addresses
HONEST_BASE = "127.0.1."
ATTACK_ADDR = {
    "acks": ["127.0.0.10", "127.0.0.11"],
    "nonce": ["127.0.0.20", "127.0.0.21"],
    "peer_nonce": ["127.0.0.30"],
    "idle": ["127.0.0.40"],
    "longpolls": [f"127.0.0.{50 + i}" for i in range(LONGPOLL_ADDRS)],
    "flood": ["127.0.0.60"],
    # the xff attacker's *real* address (what the proxy appends); it connects from the proxy's, 127.0.0.1
    "xff": ["127.0.0.70"],
    "fetch_remote": ["127.0.0.80"],
    "log_flood": ["127.0.0.90"],
}
#: the fetch_remote attacker fills its mailbox from these (each has its own deposit byte budget)
FETCH_REMOTE_FILL = [f"127.0.2.{i}" for i in range(1, 9)]
LOG_REFUSED = "peer request refused"
#: this directory (bench/), where trace_node.py is
HERE = os.path.dirname(os.path.abspath(__file__))


class BoundEndpoints:
    """An Agent endpoint factory whose connections leave from one loopback address."""

    def __init__(self, reactor: Any, source: str) -> None:
        self.reactor = reactor
        self.source = source

    def endpointForURI(self, uri: Any) -> QuietEndpoint:
        host = uri.host.decode() if isinstance(uri.host, bytes) else uri.host
        return QuietEndpoint(TCP4ClientEndpoint(self.reactor, host, uri.port, timeout=10, bindAddress=(self.source, 0)))


class Client:
    """A treq client whose connections come from ``source``."""

    def __init__(self, reactor: Any, source: str, per_host: int = 32) -> None:
        self.source = source
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = per_host
        self.http = treq.client.HTTPClient(
            Agent.usingEndpointFactory(reactor, BoundEndpoints(reactor, source), self.pool)
        )


class SinkHandler(http.server.BaseHTTPRequestHandler):
    """The hostile peer's URL: accepts every push, has an empty changes feed (served from a thread)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            for _ in range(1_000_000):
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
            return out
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _answer(self, obj: Any) -> None:
        raw = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:
        self._body()
        since = 0
        if "since=" in self.path:
            try:
                since = int(self.path.split("since=", 1)[1].split("&", 1)[0])
            except ValueError:
                since = 0
        self._answer({"ok": True, "feed": "hostile-sink", "items": [], "next": since, "more": False})

    def do_POST(self) -> None:
        raw = self._body()
        if self.path.split("?", 1)[0].endswith("/ack"):
            n, status = raw.count(b'"nonce"'), "applied"
        else:
            n, status = raw.count(b'"msg_id"'), "accepted"
        self._answer({"ok": True, "results": [{"status": status}] * n})


class Sink:
    def __init__(self) -> None:
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SinkHandler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="abuse-sink", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class IdleConn(protocol.Protocol):
    def __init__(self, owner: Worker, node: str) -> None:
        self.owner = owner
        self.node = node

    def connectionMade(self) -> None:
        self.owner.idle_open.add(self)
        self.owner.count("idle", "connected")

    def connectionLost(self, reason: Any) -> None:
        self.owner.idle_open.discard(self)
        self.owner.count("idle", "closed_by_node" if not self.owner.stop_attacks else "closed")
        self.owner.idle_reopen(self.node)


class _IdleFactory(protocol.ClientFactory):
    noisy = False

    def __init__(self, owner: Worker, node: str) -> None:
        self.owner = owner
        self.node = node

    def buildProtocol(self, addr: Any) -> IdleConn:
        return IdleConn(self.owner, self.node)

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        self.owner.count("idle", "connect_failed")
        self.owner.idle_reopen(self.node)


def table_rows(data_dir: str) -> dict[str, int]:
    """Rows per table of a stopped node's SQLite store (what fills its disk), read-only."""
    from meshrelay.store.sqlite import DB_NAME

    out: dict[str, int] = {}
    try:
        conn = sqlite3.connect(f"file:{os.path.join(data_dir, DB_NAME)}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error:
        return out
    try:
        for table in ("envelopes", "tombstones", "acks", "nonces"):
            try:
                out[table] = int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
            except sqlite3.Error:
                pass
    finally:
        conn.close()
    return out


def dir_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def p99(values: list[float]) -> float:
    return common.percentile(values, 99)


def ms(values: list[float], p: float) -> float:
    return round(common.percentile(values, p) * 1000, 1) if values else float("nan")


class NodeRef:
    """What a worker process knows of a node: where it listens."""

    def __init__(self, port: int, url: str) -> None:
        self.port = port
        self.url = url


class Worker:
    """One client process of a phase: the honest clients (role ``honest``) or one attack (``attack``)."""

    def __init__(self, args: argparse.Namespace, spec: dict[str, Any], role: str, attacks: list[str]) -> None:
        from twisted.internet import reactor

        self.reactor: Any = reactor
        self.args = args
        self.label = spec["label"]
        self.role = role
        self.attacks = attacks
        self.rng = random.Random(f"{args.seed}-{self.label}-{role}-{','.join(attacks)}")
        self.nodes = {n: NodeRef(int(v["port"]), str(v["url"])) for n, v in spec["nodes"].items()}
        self.sink_url = str(spec["sink_url"])
        self.hostile_key = derive_key(HOSTILE_SECRET, self.sink_url)
        self.clients: dict[str, Client] = {}
        self.counts: Counter[str] = Counter()
        self.inflight: Counter[str] = Counter()
        self.stop_senders = False
        self.stop_recipients = False
        self.stop_attacks = False
        self.idle_open: set[IdleConn] = set()
        self.idle_connectors: list[Any] = []
        # honest figures
        self.deposit_lat: list[float] = []
        self.delivery_lat: list[float] = []
        #: (seconds into the phase the deposit was sent, its latency, its node): when the slow ones happen
        self.deposit_series: list[tuple[float, float, str]] = []
        #: (seconds into the phase the deposit was sent, deposit to delivered)
        self.delivery_series: list[tuple[float, float]] = []
        self.deposits = Counter[str]()
        #: honest deposits retried after a 429, by the 429's outcome
        self.retries = Counter[str]()
        self.polls = Counter[str]()
        self.expected: dict[str, float] = {}
        self.delivered: dict[str, float] = {}
        self.early: dict[str, float] = {}
        self.fetch_remote_lat: list[float] = []
        self.measure_from = 0.0
        self.loop_lag: list[float] = []
        policy = os.sched_getscheduler(0) if hasattr(os, "sched_getscheduler") else -1
        #: this process's scheduling class and nice value, as started
        self.sched = {getattr(os, "SCHED_IDLE", -2): "idle", getattr(os, "SCHED_OTHER", -2): "normal"}.get(policy, "?")
        self.nice = os.nice(0)

    def client(self, source: str, per_host: int = 32) -> Client:
        c = self.clients.get(source)
        if c is None:
            c = self.clients[source] = Client(self.reactor, source, per_host)
        return c

    def url(self, node: str, path: str) -> str:
        return f"http://127.0.0.1:{self.nodes[node].port}{path}"

    # ------------------------------------------------------------------ plumbing

    def count(self, kind: str, outcome: str) -> None:
        self.counts[f"{kind}:{outcome}"] += 1

    async def call(
        self,
        source: str,
        kind: str,
        node: str,
        path: str,
        body: bytes | None,
        method: str = "POST",
        headers: dict[str, list[str]] | None = None,
        timeout: float = GUARD,
        retry_after: list[float] | None = None,
    ) -> tuple[int, bytes, float, str]:
        """One request from ``source``: status (0: no answer), body, seconds, outcome.

        The outcome is the status with the protocol's error code ("429 storage_full"), or the
        exception's name when there was no answer.
        """
        http = self.client(source).http
        t0 = time.monotonic()
        try:
            d = http.request(method, self.url(node, path), data=body, headers=headers or JSON_HEADERS)
            d.addTimeout(timeout, self.reactor)
            resp = await d
            raw = await treq.content(resp)
            status = int(resp.code)
            if retry_after is not None:
                value = resp.headers.getRawHeaders(b"retry-after") or [b""]
                retry_after.append(float(value[0]) if value[0].isdigit() else 1.0)
        except Exception as e:
            self.count(kind, type(e).__name__)
            return 0, b"", time.monotonic() - t0, type(e).__name__
        outcome = str(status)
        if status >= 400:
            try:
                outcome += " " + str(json.loads(raw)["error"])
            except (ValueError, KeyError, TypeError):
                pass
        self.count(kind, outcome)
        return status, raw, time.monotonic() - t0, outcome

    def spawn(self, kind: str, coro: Coroutine[Any, Any, Any]) -> None:
        self.inflight[kind] += 1
        d = defer.Deferred.fromCoroutine(coro)

        def done(result: Any) -> None:
            self.inflight[kind] -= 1
            if isinstance(result, Exception) or hasattr(result, "getErrorMessage"):
                self.count(kind, "generator_error:" + result.getErrorMessage()[:80])

        d.addBoth(done)

    async def sleep(self, seconds: float) -> None:
        await task.deferLater(self.reactor, max(0.0, seconds), lambda: None)

    async def paced(
        self, kind: str, rate: float, make: Callable[[int], Coroutine[Any, Any, Any]], max_inflight: int
    ) -> None:
        """Issue ``make(i)`` at ``rate``/s until the attacks stop; beyond ``max_inflight`` shed (counted)."""
        if rate <= 0:
            return
        t0 = time.monotonic()
        issued = 0
        limit = int(rate * (self.args.phase_seconds + self.args.drain + 120)) + 10
        while not self.stop_attacks and issued < limit:
            due = int(rate * (time.monotonic() - t0)) - issued
            for _ in range(max(0, due)):
                issued += 1
                if self.inflight[kind] >= max_inflight:
                    self.count(kind, "shed")
                    continue
                self.spawn(kind, make(issued))
            await self.sleep(0.05)

    def rate(self, kind: str) -> float:
        return ATTACK_RATES[kind] * self.args.scale * len(NAMES)

    def node_of(self, i: int) -> str:
        return NAMES[i % len(NAMES)]

    @staticmethod
    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

    # ------------------------------------------------------------------ honest clients

    def honest_setup(self) -> None:
        rng = self.rng
        a = self.args
        self.senders = [Ed25519PrivateKey.from_private_bytes(rng.randbytes(32)) for _ in range(a.senders)]
        self.recipients = [Ed25519PrivateKey.from_private_bytes(rng.randbytes(32)) for _ in range(a.recipients)]
        self.recipient_pub = [E.public_key_b64u(k) for k in self.recipients]

    async def honest_deposit(self, source: str, key: Ed25519PrivateKey, node: str, to: int) -> None:
        ct = self.rng.randbytes(self.rng.randint(200, 1000))
        env = E.make_envelope(key, self.recipient_pub[to], ct, int(time.time()), 3600)
        sent = time.monotonic()
        body = self.dumps(env)
        # a real client honours a 429's Retry-After (and backs off): a few retries, within the phase
        for attempt in range(HONEST_RETRIES + 1):
            wait: list[float] = []
            status, _, dt, outcome = await self.call(source, "honest_deposit", node, SEND, body, retry_after=wait)
            if status != 429 or attempt == HONEST_RETRIES or self.stop_senders:
                break
            self.retries[outcome] += 1
            await self.sleep(min(max(wait[-1] if wait else 1.0, 0.5 * 2**attempt), 10.0))
        dt = time.monotonic() - sent
        if sent < self.measure_from:
            return  # warm-up: sent, not measured
        if status != 200:
            self.deposits[outcome] += 1
            return
        mid = env["msg_id"]
        self.deposits["ok"] += 1
        self.deposit_lat.append(dt)
        self.deposit_series.append((round(sent - self.t0, 4), round(dt, 5), node))
        self.expected[mid] = sent
        early = self.early.pop(mid, None)
        if early is not None and mid not in self.delivered:
            # delivered before the deposit's answer came back
            self.delivered[mid] = max(0.0, early - sent)
            self.delivery_lat.append(self.delivered[mid])
            self.delivery_series.append((round(sent - self.t0, 4), round(self.delivered[mid], 5)))

    async def honest_sender(self, k: int) -> None:
        source = f"{HONEST_BASE}{k + 1}"
        node_i = k % len(NAMES)
        node = NAMES[node_i]
        # recipients who long-poll at another node
        others = [j for j in range(len(self.recipients)) if j % len(NAMES) != node_i]
        interval = 1.0 / self.args.honest_rate
        start = time.monotonic() + self.rng.random() * interval
        for i in range(10**7):
            if self.stop_senders:
                return
            due = start + i * interval
            await self.sleep(due - time.monotonic())
            if self.stop_senders:
                return
            if self.inflight["honest_deposit"] >= 200:
                self.deposits["shed"] += 1
                continue
            self.spawn("honest_deposit", self.honest_deposit(source, self.senders[k], node, self.rng.choice(others)))

    async def honest_recipient(self, j: int) -> None:
        source = f"{HONEST_BASE}{100 + j}"
        node = NAMES[j % len(NAMES)]
        key = self.recipients[j]
        ack: list[str] = []
        for _ in range(10**6):
            if self.stop_recipients:
                return
            body = E.make_signed_request(key, int(time.time()), os.urandom(16), ack)
            body.update(limit=100, wait=HONEST_WAIT)
            measured = time.monotonic() >= self.measure_from
            status, raw, _, outcome = await self.call(
                source, "honest_poll", node, POLL, self.dumps(body), timeout=HONEST_WAIT + GUARD
            )
            if status != 200:
                if measured:
                    self.polls[outcome] += 1
                await self.sleep(0.5)
                continue
            if measured:
                self.polls["ok"] += 1
            now = time.monotonic()
            ack = []
            for m in json.loads(raw)["messages"]:
                mid = m["msg_id"]
                ack.append(mid)
                if mid in self.delivered:
                    continue
                sent = self.expected.get(mid)
                if sent is None:
                    self.early[mid] = now  # its deposit's answer is not back yet
                    continue
                self.delivered[mid] = now - sent
                self.delivery_lat.append(now - sent)
                self.delivery_series.append((round(sent - self.t0, 4), round(now - sent, 5)))

    # ------------------------------------------------------------------ attacks

    def signed_poll(self, key: Ed25519PrivateKey, ts: int, ack: list[str] | None = None, **extra: Any) -> bytes:
        body = E.make_signed_request(key, ts, os.urandom(16), ack or [])
        body.update(extra)
        return self.dumps(body)

    async def attack_acks(self, i: int) -> None:
        source = ATTACK_ADDR["acks"][i % len(ATTACK_ADDR["acks"])]
        ids = [os.urandom(32).hex() for _ in range(E.MAX_ACK_IDS)]
        body = self.signed_poll(Ed25519PrivateKey.generate(), int(time.time()), ids, limit=1)
        await self.call(source, "acks", self.node_of(i), POLL, body)

    async def attack_nonce(self, i: int) -> None:
        source = ATTACK_ADDR["nonce"][i % len(ATTACK_ADDR["nonce"])]
        key = self.nonce_keys[source]
        body = self.signed_poll(key, int(time.time()) + CLOCK_SKEW - 1, limit=1)
        await self.call(source, "nonce", self.node_of(i), POLL, body)

    async def attack_peer_nonce(self, i: int) -> None:
        node = self.node_of(i)
        target = f"{CHANGES}?since=9000000000000&limit=1"
        ts = int(time.time()) + CLOCK_SKEW - 1
        nonce = E.b64u_encode(os.urandom(16))
        headers = {
            H_URL: [self.sink_url],
            H_TS: [str(ts)],
            H_NONCE: [nonce],
            H_HMAC: [compute_mac(self.hostile_key, "GET", target, ts, nonce, b"")],
        }
        await self.call(ATTACK_ADDR["peer_nonce"][0], "peer_nonce", node, target, None, "GET", headers)

    async def attack_log_flood(self, i: int) -> None:
        node = self.node_of(i)
        peer = self.nodes[self.node_of(i + 1)].url
        headers = {
            "Content-Type": ["application/json"],
            H_URL: [peer],
            H_TS: [str(int(time.time()))],
            H_NONCE: [E.b64u_encode(os.urandom(16))],
            H_HMAC: [os.urandom(32).hex()],
        }
        await self.call(ATTACK_ADDR["log_flood"][0], "log_flood", node, REPLICATE, b'{"envelopes":[]}', "POST", headers)

    def big_envelope(self, mailbox: str) -> bytes:
        sender = Ed25519PrivateKey.generate()
        return self.dumps(E.make_envelope(sender, mailbox, os.urandom(MAX_MESSAGE), int(time.time()), MAX_TTL))

    async def attack_flood(self, i: int) -> None:
        if i % 200 == 1:
            self.flood_mailbox = E.public_key_b64u(Ed25519PrivateKey.generate())
        await self.call(ATTACK_ADDR["flood"][0], "flood", self.node_of(i), SEND, self.big_envelope(self.flood_mailbox))

    async def attack_xff(self, i: int) -> None:
        rng = self.rng
        junk = [
            ".".join(str(rng.randrange(256)) for _ in range(4)),
            "unknown",
            "::1",
            "x" * rng.randrange(1, 200),
            f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}",
        ]
        hops = rng.sample(junk, rng.randint(1, len(junk)))
        if self.args.xff == "proxy":
            hops.append(ATTACK_ADDR["xff"][0])  # what nginx's $proxy_add_x_forwarded_for appends
        headers = {"Content-Type": ["application/json"], "X-Forwarded-For": [", ".join(hops)]}
        # a cheap body: a 400 means the request passed the per-address limit, a 429 that it did not
        await self.call("127.0.0.1", "xff", NAMES[0], SEND, b'{"v":1,', "POST", headers)

    async def fetch_remote_fill(self) -> None:
        """Fill the attacker's own mailbox at node a before the phase is measured.

        The fill comes from ``FETCH_REMOTE_FILL`` addresses in parallel (an attacker has many), so
        the per-address deposit byte budget does not stretch it over the phase; each envelope has
        a fresh sender key (``per_sender_pending``).
        """
        per = -(-PER_MAILBOX // len(FETCH_REMOTE_FILL))

        async def one(source: str) -> None:
            for _ in range(per):
                if self.stop_attacks:
                    return
                body = self.big_envelope(self.fr_pub)
                status, _, _, _ = await self.call(source, "fetch_remote_fill", NAMES[0], SEND, body)
                if status == 429:
                    await self.sleep(1.0)

        await defer.DeferredList([defer.Deferred.fromCoroutine(one(s)) for s in FETCH_REMOTE_FILL], consumeErrors=True)

    async def attack_fetch_remote(self, i: int) -> None:
        source = ATTACK_ADDR["fetch_remote"][0]
        body = self.signed_poll(self.fr_key, int(time.time()), limit=1, fetch_remote=True)
        status, _, dt, _ = await self.call(source, "fetch_remote", self.node_of(i), POLL, body)
        if status == 200:
            self.fetch_remote_lat.append(dt)

    async def longpoller(self, source: str, node: str) -> None:
        key = Ed25519PrivateKey.generate()
        for _ in range(10**6):
            if self.stop_attacks:
                return
            body = self.signed_poll(key, int(time.time()), limit=1, wait=30)
            self.count("longpolls", "issued")
            status, _, _, _ = await self.call(source, "longpolls", node, POLL, body, timeout=30 + GUARD)
            if status != 200:
                await self.sleep(1.0)

    def idle_open_one(self, node: str) -> None:
        if self.stop_attacks:
            return
        c = self.reactor.connectTCP(
            "127.0.0.1",
            self.nodes[node].port,
            _IdleFactory(self, node),
            timeout=10,
            bindAddress=(ATTACK_ADDR["idle"][0], 0),
        )
        self.idle_connectors.append(c)

    def idle_reopen(self, node: str) -> None:
        if not self.stop_attacks:
            self.reactor.callLater(1.0, self.idle_open_one, node)

    async def attack_idle(self) -> None:
        n = int(IDLE_PER_NODE * self.args.scale)
        for step in range(n):
            if self.stop_attacks:
                return
            for node in NAMES:
                self.idle_open_one(node)
            if step % 50 == 49:
                await self.sleep(0.1)

    def start_attacks(self) -> list[defer.Deferred[Any]]:
        a = self.args
        runs: list[Coroutine[Any, Any, Any]] = []
        if "acks" in self.attacks:
            runs.append(self.paced("acks", self.rate("acks"), self.attack_acks, 30))
        if "nonce" in self.attacks:
            self.nonce_keys = {s: Ed25519PrivateKey.generate() for s in ATTACK_ADDR["nonce"]}
            runs.append(self.paced("nonce", self.rate("nonce"), self.attack_nonce, 100))
        if "peer_nonce" in self.attacks:
            runs.append(self.paced("peer_nonce", self.rate("peer_nonce"), self.attack_peer_nonce, 100))
        if "flood" in self.attacks:
            runs.append(self.paced("flood", self.rate("flood"), self.attack_flood, 60))
        if "xff" in self.attacks and a.xff != "skip":
            runs.append(self.paced("xff", XFF_RATE * a.scale, self.attack_xff, 100))
        if "log_flood" in self.attacks:
            runs.append(self.paced("log_flood", self.rate("log_flood"), self.attack_log_flood, 100))
        if "fetch_remote" in self.attacks:
            self.fr_key = Ed25519PrivateKey.generate()
            self.fr_pub = E.public_key_b64u(self.fr_key)
            runs.append(self.paced("fetch_remote", self.rate("fetch_remote"), self.attack_fetch_remote, 10))
        if "idle" in self.attacks:
            runs.append(self.attack_idle())
        if "longpolls" in self.attacks:
            per = max(1, int(LONGPOLLS_PER_ADDR_PER_NODE * a.scale))
            for source in ATTACK_ADDR["longpolls"]:
                self.client(source, per_host=per + 10)
                for node in NAMES:
                    runs.extend(self.longpoller(source, node) for _ in range(per))
        return [defer.Deferred.fromCoroutine(r) for r in runs]

    # ------------------------------------------------------------------ run (worker side)

    def start_lagger(self) -> task.LoopingCall:
        """This process's event-loop lag: how late a 0.1 s timer fires (its latencies include it)."""
        due = [time.monotonic() + 0.1]

        def tick() -> None:
            now = time.monotonic()
            self.loop_lag.append(max(0.0, now - due[0]))
            due[0] = now + 0.1

        lagger = task.LoopingCall(tick)
        lagger.start(0.1, now=False)
        return lagger

    def process_figures(self, ru0: Any, t0: float) -> dict[str, Any]:
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        seconds = max(time.monotonic() - t0, 1e-9)
        return {
            "pid": os.getpid(),
            # as it ran (the orchestrator lifts a SCHED_IDLE attacker once the phase is over)
            "sched": self.sched,
            "nice": self.nice,
            "cpu_seconds": round(cpu, 1),
            "cpu_percent": round(100 * cpu / seconds, 1),
            "seconds": round(seconds, 1),
            "loop_lag_p50_ms": ms(self.loop_lag, 50),
            "loop_lag_p99_ms": ms(self.loop_lag, 99),
            "loop_lag_max_ms": round(max(self.loop_lag) * 1000, 1) if self.loop_lag else float("nan"),
        }

    async def run_honest(self) -> dict[str, Any]:
        a = self.args
        self.honest_setup()
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        self.t0 = time.monotonic()
        #: honest operations started in the first seconds (cold nodes, attacks ramping up) are not counted
        self.measure_from = self.t0 + min(5.0, 0.1 * a.phase_seconds)
        lagger = self.start_lagger()
        honest = [defer.Deferred.fromCoroutine(self.honest_recipient(j)) for j in range(a.recipients)]
        senders = [defer.Deferred.fromCoroutine(self.honest_sender(k)) for k in range(a.senders)]
        for _ in range(int(a.phase_seconds) + 1):
            left = a.phase_seconds - (time.monotonic() - self.t0)
            if left <= 0:
                break
            await self.sleep(min(1.0, left))
        self.stop_senders = True
        await defer.DeferredList(senders, consumeErrors=True)
        # drain: the recipients keep polling (attacks still running) until every accepted deposit is delivered
        drain_start = time.monotonic()
        for _ in range(int(a.drain * 10) + 1):
            if self.inflight["honest_deposit"] == 0 and all(m in self.delivered for m in self.expected):
                break
            if time.monotonic() - drain_start >= a.drain:
                break
            await self.sleep(0.1)
        loaded = time.monotonic() - self.t0
        lagger.stop()
        proc = self.process_figures(ru0, self.t0)
        # what happens after this (the waiting polls end) is not part of the measurement
        deposits, polls, counts = Counter(self.deposits), Counter(self.polls), Counter(self.counts)
        self.stop_recipients = True
        for c in self.clients.values():
            await c.pool.closeCachedConnections()
        # the recipients' waiting polls end within their wait
        await defer.DeferredList(honest, consumeErrors=True)
        dep_total = sum(deposits.values())
        poll_total = sum(polls.values())
        accepted = len(self.expected)
        delivered = sum(1 for m in self.expected if m in self.delivered)
        ops = dep_total + poll_total + accepted
        ok = deposits["ok"] + polls["ok"] + delivered
        return {
            "seconds": round(loaded, 1),
            "honest": {
                "success": ok / ops if ops else float("nan"),
                "operations": ops,
                "ok": ok,
                "deposits": dict(deposits),
                "deposit_retries": dict(self.retries),
                "polls": dict(polls),
                "accepted": accepted,
                "delivered": delivered,
                "deposit_p50_ms": ms(self.deposit_lat, 50),
                "deposit_p99_ms": ms(self.deposit_lat, 99),
                "delivery_p50_ms": ms(self.delivery_lat, 50),
                "delivery_p99_ms": ms(self.delivery_lat, 99),
                "deposit_series": self.deposit_series,
                "delivery_series": self.delivery_series,
            },
            "process": proc,
            "counts": dict(sorted(counts.items())),
        }

    async def run_attack(self, ready_file: str, stop_file: str) -> dict[str, Any]:
        """Run ``self.attacks`` until ``stop_file`` exists (or a deadline); ``ready_file`` once set up."""
        a = self.args
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.monotonic()
        if "fetch_remote" in self.attacks:
            self.fr_key = Ed25519PrivateKey.generate()
            self.fr_pub = E.public_key_b64u(self.fr_key)
            # the fill is the attacker's set-up, before the honest clients start
            await self.fetch_remote_fill()
        with open(ready_file, "w") as fh:
            fh.write("ready\n")
        lagger = self.start_lagger()
        t_attack = time.monotonic()
        runs = self.start_attacks()
        deadline = t_attack + a.phase_seconds + a.drain + 180
        for _ in range(10**7):
            if os.path.exists(stop_file) or time.monotonic() >= deadline:
                break
            await self.sleep(0.2)
        attacked = time.monotonic() - t_attack
        lagger.stop()
        proc = self.process_figures(ru0, t0)
        counts = Counter(self.counts)
        self.stop_attacks = True
        for c in list(self.idle_open):
            if c.transport is not None:
                c.transport.loseConnection()
        for c in self.idle_connectors:
            try:
                c.stopConnecting()
            except Exception:
                pass
        for c in self.clients.values():
            await c.pool.closeCachedConnections()
        # waiting long-polls end when the nodes stop (the orchestrator stops them after this file is written)
        # requests of the attack proper (the fetch_remote fill is its set-up, idle connections are not requests)
        sent = sum(
            v
            for k, v in counts.items()
            if not k.endswith(":shed") and not k.startswith(("idle:", "fetch_remote_fill:"))
        )
        return {
            "attacks": self.attacks,
            "seconds": round(attacked, 1),
            "requests_per_s": round(sent / max(attacked, 1e-9), 1),
            "process": proc,
            "counts": dict(sorted(counts.items())),
            "fetch_remote_lat": self.fetch_remote_lat,
            "tasks": len(runs),
        }


def worker_main(args: argparse.Namespace) -> int:
    """The body of a ``--role honest|attack`` child process: one run, its figures to ``--out``."""
    with open(args.spec) as fh:
        spec = json.load(fh)
    run_args = argparse.Namespace(**spec["args"])
    common.raise_nofile(16384)
    from twisted.internet import reactor

    attacks = [args.attack] if args.role == "attack" else []
    worker = Worker(run_args, spec, args.role, attacks)
    result: list[Any] = []

    async def go() -> dict[str, Any]:
        if args.role == "honest":
            return await worker.run_honest()
        out = await worker.run_attack(spec["ready"][args.attack], spec["stop_file"])
        # written now: the orchestrator stops the nodes once every attacker's figures are in
        common.write_json(args.out, out)
        return out

    def done(value: Any) -> None:
        result.append(value)
        reactor.stop()  # type: ignore[attr-defined]

    reactor.callWhenRunning(lambda: defer.Deferred.fromCoroutine(go()).addBoth(done))  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    if not result or hasattr(result[0], "raiseException"):
        if result:
            result[0].printTraceback()
        return 2
    common.write_json(args.out, result[0])
    return 0


# --------------------------------------------------------------------------- orchestrator


def node_config(args: argparse.Namespace) -> dict[str, Any]:
    limits: dict[str, Any] = {
        "client_rate": CLIENT_RATE,
        "client_burst": 2 * CLIENT_RATE,
        "max_stored_bytes": int(args.cap_mb * 1024 * 1024),
        "max_nonces": args.max_nonces,
        "max_waiting_polls": args.max_waiting_polls,
        "max_connections": args.max_connections,
        "clock_skew": CLOCK_SKEW,
        "max_ttl": MAX_TTL,
        "max_message_bytes": MAX_MESSAGE,
        "per_mailbox_pending": PER_MAILBOX,
    }
    # tests/harness.py turns the per-address shares off for tests (one test process is all the
    # load); an operator keeps the node's defaults, so the bench sets them back explicitly
    defaults = LimitsConfig()
    for key in ("deposit_bytes_rate", "deposit_bytes_burst", "max_waiting_polls_per_address"):
        limits[key] = getattr(defaults, key)
    if args.xff != "skip":
        limits["trusted_proxies"] = "127.0.0.1"
    return {"node": {"sweep_interval": 10}, "limits": limits, "sync": {"interval": 5}}


def node_metrics(node: NodeProcess) -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        status, body = node.admin("/api/mesh/metrics")
    except OSError:
        return out
    if status != 200:
        return out
    # every sample, for the JSON figures (request and refusal counts, commit batches, pushes...)
    out["metrics_all"] = body["metrics"]
    for prefix in (
        "meshrelay_stored_bytes",
        "meshrelay_stored_envelopes",
        "meshrelay_stored_tombstones",
        "meshrelay_waiting_polls",
        "meshrelay_http_refused",
        "meshrelay_peer_auth_failures",
    ):
        values = [s["value"] for name, v in body["metrics"].items() if name.startswith(prefix) for s in v]
        out[prefix] = float(sum(values))
    return out


def _worker_limits(nice: int, idle: bool = False, cpus: set[int] | None = None) -> Callable[[], None]:
    def pre() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = 16384 if hard == resource.RLIM_INFINITY else min(16384, hard)
        if soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if nice:
            os.nice(nice)
        if idle:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))

    return pre


class TracedNode(NodeProcess):
    """A node with ``bench/trace_node.py`` loaded (``--trace``): its figures go to ``trace.json``."""

    def command(self) -> list[str]:
        cmd = super().command()
        i = cmd.index("-c")
        cmd[i + 1] = f"import sys; sys.path.insert(0, {HERE!r}); import trace_node; " + cmd[i + 1]
        return cmd

    def env(self) -> dict[str, str]:
        env = super().env()
        env["MESHRELAY_TRACE_OUT"] = self.trace_path
        env["MESHRELAY_TRACE_SOURCES"] = HONEST_BASE
        return env

    @property
    def trace_path(self) -> str:
        return os.path.join(self.dir, "trace.json")


def trace_figures(path: str) -> dict[str, Any] | None:
    """Percentiles (ms) of a traced node's deposit segments and loop lag (``bench/trace_node.py``)."""
    try:
        with open(path) as fh:
            raw = json.load(fh)
    except (OSError, ValueError):
        return None
    out: dict[str, Any] = {"deposits": raw["deposits"]}
    for name, values in [*raw["segments"].items(), ("loop_lag", raw["loop_lag"])]:
        out[name] = (
            {f"p{p:g}": round(1000 * common.percentile(values, p), 2) for p in (50, 99, 99.9)} if values else None
        )
    return out


class Phase:
    """One phase, run by the orchestrator: fresh nodes, the honest process, one process per attack."""

    def __init__(self, args: argparse.Namespace, workdir: str, attacks: list[str], label: str, sink: Sink) -> None:
        self.args = args
        self.label = label
        self.workdir = os.path.join(workdir, label.split()[0] + ("-" + "-".join(attacks) if attacks else ""))
        self.attacks = attacks
        self.sink = sink
        self.nodes: dict[str, NodeProcess] = {}
        self.workers: list[tuple[str, subprocess.Popen[bytes], str]] = []
        self.samples: list[dict[str, Any]] = []
        self.data_max: dict[str, int] = {n: 0 for n in NAMES}

    def start_nodes(self) -> None:
        config = node_config(self.args)
        kind = TracedNode if self.args.trace else NodeProcess
        self.nodes = {n: kind(self.workdir, n, config=config) for n in NAMES}
        for n, p in self.nodes.items():
            p.peers = [{"url": self.nodes[o].url, "secret": link_secret(n, o)} for o in NAMES if o != n]
            p.peers.append({"url": self.sink.url, "secret": HOSTILE_SECRET})
        for p in self.nodes.values():
            p.start(wait=False)
        for p in self.nodes.values():
            p.wait_ready(120)

    def stop(self) -> None:
        for _, proc, _ in self.workers:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
        for p in self.nodes.values():
            p.stop()

    def sample(self, t0: float) -> None:
        row: dict[str, Any] = {"t": round(time.monotonic() - t0, 1)}
        for n, p in self.nodes.items():
            size = dir_bytes(p.data_dir)
            self.data_max[n] = max(self.data_max[n], size)
            row[n] = size
        self.samples.append(row)

    def spawn(self, role: str, spec_path: str, attack: str = "") -> tuple[str, subprocess.Popen[bytes], str]:
        name = attack or role
        out = os.path.join(self.workdir, f"worker-{name}.json")
        log = open(os.path.join(self.workdir, f"worker-{name}.log"), "ab")
        cmd = [sys.executable, os.path.abspath(__file__), "--role", role, "--spec", spec_path, "--out", out]
        if attack:
            cmd += ["--attack", attack]
        proc = subprocess.Popen(
            cmd,
            env=common.child_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_worker_limits(
                (self.args.attack_nice if self.args.attack_sched == "nice" else 0) if attack else self.args.honest_nice,
                bool(attack) and self.args.attack_sched == "idle",
                {int(c) for c in self.args.attack_cpus.split(",")} if attack and self.args.attack_cpus else None,
            ),
        )
        log.close()
        entry = (name, proc, out)
        self.workers.append(entry)
        return entry

    def worker_failed(self, name: str) -> RuntimeError:
        try:
            with open(os.path.join(self.workdir, f"worker-{name}.log"), "rb") as fh:
                tail = fh.read()[-3000:].decode(errors="replace")
        except OSError:
            tail = "(no log)"
        return RuntimeError(f"phase {self.label}: the {name} process failed:\n{tail}")

    def run(self) -> dict[str, Any]:
        a = self.args
        print(f"phase {self.label}: starting 3 fresh nodes", flush=True)
        self.start_nodes()
        stop_file = os.path.join(self.workdir, "stop-attacks")
        spec = {
            "label": self.label,
            "nodes": {n: {"port": p.port, "url": p.url} for n, p in self.nodes.items()},
            "sink_url": self.sink.url,
            "args": {k: v for k, v in vars(a).items()},
            "stop_file": stop_file,
            "ready": {x: os.path.join(self.workdir, f"ready-{x}") for x in self.attacks},
        }
        spec_path = os.path.join(self.workdir, "spec.json")
        common.write_json(spec_path, spec)
        cpu0 = {n: common.tree_cpu_seconds(p.proc.pid) for n, p in self.nodes.items() if p.proc}
        attackers = [self.spawn("attack", spec_path, x) for x in self.attacks if not (x == "xff" and a.xff == "skip")]
        # every attacker set up (the fetch_remote fill) before the honest clients start
        t_ready = time.monotonic()
        for name, proc, _ in attackers:
            for _ in range(10**6):
                if os.path.exists(spec["ready"][name]):
                    break
                if proc.poll() is not None:
                    raise self.worker_failed(name)
                if time.monotonic() - t_ready > 180:
                    raise RuntimeError(f"phase {self.label}: attacker {name} not ready within 180 s")
                time.sleep(0.1)
        print(
            f"  [{self.label}] running {a.phase_seconds:.0f} s; attacks: {', '.join(self.attacks) or 'none'}"
            f" (set-up {time.monotonic() - t_ready:.1f} s)",
            flush=True,
        )
        t0 = time.monotonic()
        name, honest, honest_out = self.spawn("honest", spec_path)
        limit = a.phase_seconds + a.drain + HONEST_WAIT + GUARD + 120
        next_sample = t0
        for _ in range(10**7):
            if honest.poll() is not None:
                break
            if time.monotonic() - t0 > limit:
                raise RuntimeError(f"phase {self.label}: the honest process did not finish within {limit:.0f} s")
            if time.monotonic() >= next_sample:
                self.sample(t0)
                next_sample += 5.0
            time.sleep(0.1)
        loaded = time.monotonic() - t0
        if honest.returncode != 0:
            raise self.worker_failed("honest")
        self.sample(t0)
        cpu1 = {n: common.tree_cpu_seconds(p.proc.pid) for n, p in self.nodes.items() if p.proc}
        metrics = {n: node_metrics(p) for n, p in self.nodes.items()}
        rss = {n: round(common.tree_rss_mb(p.proc.pid), 1) for n, p in self.nodes.items() if p.proc}
        with open(stop_file, "w") as fh:
            fh.write("stop\n")
        if a.attack_sched == "idle":
            # The measurement is over: an attacker starved of CPU on a busy machine must still get
            # to write its figures (as SCHED_IDLE it may not run at all while the cores are busy).
            for _, proc, _ in attackers:
                try:
                    os.sched_setscheduler(proc.pid, os.SCHED_OTHER, os.sched_param(0))
                except OSError:
                    pass
        attack_results: dict[str, Any] = {}
        for name, proc, out in attackers:
            for _ in range(600):
                if os.path.exists(out) or proc.poll() is not None:
                    break
                time.sleep(0.1)
            try:
                with open(out) as fh:
                    attack_results[name] = json.load(fh)
            except (OSError, ValueError):
                raise self.worker_failed(name) from None
        self.stop()
        rows = {n: table_rows(p.data_dir) for n, p in self.nodes.items()}
        with open(honest_out) as fh:
            honest_result = json.load(fh)
        print(f"phase {self.label}: done", flush=True)
        return self.figures(loaded, honest_result, attack_results, cpu0, cpu1, metrics, rss, rows)

    def figures(
        self,
        loaded: float,
        honest: dict[str, Any],
        attackers: dict[str, Any],
        cpu0: dict[str, float],
        cpu1: dict[str, float],
        metrics: dict[str, dict[str, float]],
        rss: dict[str, float],
        rows: dict[str, dict[str, int]],
    ) -> dict[str, Any]:
        nodes: dict[str, Any] = {}
        cap = int(self.args.cap_mb * 1024 * 1024)
        for n, p in self.nodes.items():
            with open(p.log_path, "rb") as fh:
                log = fh.read()
            lines = log.splitlines()
            end = self.samples[-1][n] if self.samples else 0
            nodes[n] = {
                "data_bytes_end": end,
                "data_bytes_max": self.data_max[n],
                "cap_bytes": cap,
                "within_cap": self.data_max[n] <= cap,
                "log_lines": len(lines),
                "log_bytes": len(log),
                "log_refused_lines": sum(1 for line in lines if LOG_REFUSED.encode() in line),
                "log_tracebacks": log.count(b"Traceback"),
                "cpu_seconds": round(cpu1.get(n, 0.0) - cpu0.get(n, 0.0), 1),
                "rss_mb": rss.get(n),
                "rows": rows[n],
                **{k: v for k, v in metrics[n].items()},
            }
            if isinstance(p, TracedNode):
                nodes[n]["trace"] = trace_figures(p.trace_path)
        counts: Counter[str] = Counter(honest["counts"])
        fr_lat: list[float] = []
        for r in attackers.values():
            counts.update(r["counts"])
            fr_lat.extend(r.get("fetch_remote_lat", []))
        return {
            "label": self.label,
            "attacks": self.attacks,
            "seconds": round(loaded, 1),
            "honest": honest["honest"],
            "honest_process": honest["process"],
            "attackers": {
                name: {"process": r["process"], "requests_per_s": r["requests_per_s"], "seconds": r["seconds"]}
                for name, r in attackers.items()
            },
            "fetch_remote_p50_ms": ms(fr_lat, 50),
            "nodes": nodes,
            "counts": dict(sorted(counts.items())),
            "samples": self.samples,
        }


# --------------------------------------------------------------------------- report


def verdicts(base: dict[str, Any], attack: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """(measure, figure, target, met) rows."""
    out: list[tuple[str, str, str, bool]] = []
    s = attack["honest"]["success"]
    out.append(("honest success under attack", f"{100 * s:.2f} %", ">= 99 %", s >= 0.99))
    for key, label in (("deposit_p99_ms", "honest deposit p99"), ("delivery_p99_ms", "honest delivery p99")):
        b, x = base["honest"][key], attack["honest"][key]
        ratio = x / b if b and b == b and x == x else float("nan")
        out.append((label, f"{x:.0f} ms vs {b:.0f} ms ({ratio:.1f}x)", "<= 2x", ratio <= 2.0))
    for n, f in attack["nodes"].items():
        out.append(
            (
                f"node {n} data dir (max)",
                f"{f['data_bytes_max'] / 2**20:.1f} MiB of {f['cap_bytes'] / 2**20:.0f} MiB",
                "within cap",
                bool(f["within_cap"]),
            )
        )
    return out


def print_traces(phases: list[dict[str, Any]]) -> None:
    """--trace: each node's part of the honest deposits' latency, and its reactor's lateness (ms)."""
    names = ("read", "checks", "slot", "writer", "answer", "node", "loop_lag")
    print("\nhonest deposits inside each node (--trace; ms, p50/p99/p99.9 of each segment; bench/trace_node.py)")
    print(f"phase            node  deposits  {'  '.join(f'{n:>17s}' for n in names)}")
    for ph in phases:
        for n, f in ph["nodes"].items():
            t = f.get("trace")
            if not t:
                continue
            cells = ["/".join(f"{t[k][p]:g}" for p in ("p50", "p99", "p99.9")) if t.get(k) else "-" for k in names]
            print(f"{ph['label']:15s} {n:4s}  {t['deposits']:8d}  {'  '.join(f'{c:>17s}' for c in cells)}")


def print_report(phases: list[dict[str, Any]]) -> bool:
    nan = float("nan")
    print(
        "\nphase            honest ok    success  deposits ok  polls ok  delivered   dep p50/p99 ms  deliv p50/p99 ms"
        "  honest loop lag p50/p99 ms"
    )
    for ph in phases:
        h = ph["honest"]
        hp = ph["honest_process"]
        print(
            f"{ph['label']:15s} {h['ok']:5d}/{h['operations']:<6d} {100 * h['success']:7.2f} %"
            f" {h['deposits'].get('ok', 0):5d}/{sum(h['deposits'].values()):<5d}"
            f" {h['polls'].get('ok', 0):4d}/{sum(h['polls'].values()):<4d}"
            f" {h['delivered']:5d}/{h['accepted']:<5d}"
            f" {h['deposit_p50_ms']:7.0f}/{h['deposit_p99_ms']:<7.0f} {h['delivery_p50_ms']:7.0f}/{h['delivery_p99_ms']:<8.0f}"
            f"  {hp['loop_lag_p50_ms']}/{hp['loop_lag_p99_ms']}"
        )
        fails = {f"deposit {k}": v for k, v in h["deposits"].items() if k != "ok"}
        fails.update({f"poll {k}": v for k, v in h["polls"].items() if k != "ok"})
        if fails:
            print(f"{'':15s} failures: {fails}")
        if h.get("deposit_retries"):
            print(f"{'':15s} deposits retried after a 429 (Retry-After): {h['deposit_retries']}")
    print(
        "\nphase            node  data dir MiB (end / max / cap)  stored MiB  rows: envelopes/tombstones/acks/nonces"
        "  waiting  refused conns  log lines (refused)  CPU s  RSS MB"
    )
    for ph in phases:
        for n, f in ph["nodes"].items():
            print(
                f"{ph['label']:15s} {n:4s}  {f['data_bytes_end'] / 2**20:8.1f} / {f['data_bytes_max'] / 2**20:6.1f}"
                f" / {f['cap_bytes'] / 2**20:4.0f}      {f.get('meshrelay_stored_bytes', nan) / 2**20:8.1f}"
                f"  {'/'.join(str(f['rows'].get(t, '?')) for t in ('envelopes', 'tombstones', 'acks', 'nonces')):>36s}"
                f"  {f.get('meshrelay_waiting_polls', nan):7.0f}"
                f"  {f.get('meshrelay_http_refused', nan):13.0f}"
                f"  {f['log_lines']:9d} ({f['log_refused_lines']})    {f['cpu_seconds']:7.1f}  {f['rss_mb']}"
            )
        hp = ph["honest_process"]
        print(
            f"{ph['label']:15s} honest process: CPU {hp['cpu_percent']} % of a core,"
            f" loop lag p50 / p99 / max {hp['loop_lag_p50_ms']} / {hp['loop_lag_p99_ms']} / {hp['loop_lag_max_ms']} ms"
        )
        for name, w in ph["attackers"].items():
            pr = w["process"]
            print(
                f"{ph['label']:15s} attacker {name:12s}: {w['requests_per_s']:7.1f} req/s, CPU {pr['cpu_percent']} %"
                f" of a core, loop lag p50 / p99 {pr['loop_lag_p50_ms']} / {pr['loop_lag_p99_ms']} ms"
            )
    if any(f.get("trace") for ph in phases for f in ph["nodes"].values()):
        print_traces(phases)
    ok = True
    for attack in phases[1:]:
        if attack["counts"]:
            print("\nattack requests (kind:outcome -> count), phase", attack["label"])
            for k, v in attack["counts"].items():
                if not k.startswith("honest"):
                    print(f"  {k:40s} {v}")
            if attack["fetch_remote_p50_ms"] == attack["fetch_remote_p50_ms"]:
                print(f"  fetch_remote poll p50: {attack['fetch_remote_p50_ms']} ms")
    for attack in phases[1:]:
        rows = verdicts(phases[0], attack)
        print(f"\nphase {attack['label']}: target     figure                                   target      verdict")
        for measure, figure, target, met in rows:
            print(f"{measure:31s} {figure:40s} {target:11s} {'met' if met else 'MISSED'}")
        ok = ok and all(met for *_, met in rows)
    if len(phases) > 2:
        print("\nper attack (each alone against phase A):")
        print("attack          success   dep p99 ms (x A)   deliv p99 ms (x A)   honest lag p99 ms  attacker req/s")
        a_dep, a_del = phases[0]["honest"]["deposit_p99_ms"], phases[0]["honest"]["delivery_p99_ms"]
        for ph in phases[1:]:
            h = ph["honest"]
            rate = sum(w["requests_per_s"] for w in ph["attackers"].values())
            print(
                f"{','.join(ph['attacks']):15s} {100 * h['success']:6.2f} %"
                f"  {h['deposit_p99_ms']:7.0f} ({h['deposit_p99_ms'] / a_dep if a_dep else nan:5.1f}x)"
                f"  {h['delivery_p99_ms']:9.0f} ({h['delivery_p99_ms'] / a_del if a_del else nan:5.1f}x)"
                f"  {ph['honest_process']['loop_lag_p99_ms']:14}  {rate:12.1f}"
            )
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--minutes", type=float, default=2.0, help="length of each phase")
    p.add_argument("--seconds", type=float, default=None, help="length of each phase in seconds (overrides --minutes)")
    p.add_argument("--attacks", default=",".join(ATTACKS), help=f"comma list of: {','.join(ATTACKS)}")
    p.add_argument("--only", default=None, choices=ATTACKS, help="one attack alone (same as --attacks ATTACK)")
    p.add_argument("--each", action="store_true", help="one attack phase per attack in --attacks, each alone")
    p.add_argument("--seed", type=int, default=None, help="replay the honest clients' and attackers' choices")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every attack's rate and size")
    p.add_argument("--senders", type=int, default=4)
    p.add_argument("--recipients", type=int, default=4)
    p.add_argument("--honest-rate", type=float, default=1.5, help="deposits/s per honest sender")
    p.add_argument("--drain", type=float, default=20.0, help="seconds to wait for deliveries after the senders stop")
    p.add_argument("--cap-mb", type=float, default=64.0, help="max_stored_bytes of every node, MiB")
    p.add_argument("--max-nonces", type=int, default=1000, help="limits.max_nonces (default 200000)")
    p.add_argument("--max-waiting-polls", type=int, default=250, help="limits.max_waiting_polls (default 10000)")
    p.add_argument("--max-connections", type=int, default=800, help="limits.max_connections (default 10240)")
    p.add_argument("--xff", choices=("proxy", "direct", "skip"), default="proxy")
    p.add_argument("--attack-nice", type=int, default=10, help="nice value of the attacker processes (0: as the nodes)")
    p.add_argument(
        "--attack-sched",
        choices=("idle", "nice"),
        default="idle",
        help="attackers as SCHED_IDLE (idle) or at --attack-nice (nice)",
    )
    p.add_argument(
        "--honest-nice",
        type=int,
        default=0,
        help="nice value of the honest clients' process (negative needs CAP_SYS_NICE; default 0: as the nodes)",
    )
    p.add_argument(
        "--attack-cpus",
        default="",
        help="confine the attacker processes to these CPUs (comma list; default: any)",
    )
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--keep", action="store_true", help="keep the nodes' directories and logs")
    p.add_argument(
        "--trace",
        action="store_true",
        help="load bench/trace_node.py into the nodes: print where the honest deposits' time goes in each node",
    )
    # internal: a worker process of a phase
    p.add_argument("--role", choices=("honest", "attack"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--attack", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role:
        return worker_main(args)
    args.phase_seconds = args.seconds if args.seconds is not None else args.minutes * 60
    attacks = [args.only] if args.only else [x.strip() for x in args.attacks.split(",") if x.strip()]
    unknown = set(attacks) - set(ATTACKS)
    if unknown:
        p.error(f"unknown attack(s): {', '.join(sorted(unknown))}")
    if "xff" in attacks and args.xff == "skip":
        print("xff: skipped (--xff skip: the nodes trust no proxy, so X-Forwarded-For is never read)")
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**32)
    common.raise_nofile(16384)
    workdir = tempfile.mkdtemp(prefix="meshrelay-abuse-")
    plan: list[tuple[str, list[str]]] = [("A no attack", [])]
    if args.each:
        plan += [(f"B {x}", [x]) for x in attacks]
    else:
        plan.append(("B attack", attacks))
    print(
        f"abuse: {len(plan)} phases of {args.phase_seconds:.0f} s, scale {args.scale}, seed {args.seed}, dir {workdir}\n"
        f"  caps: max_stored_bytes {args.cap_mb} MiB, max_nonces {args.max_nonces}, max_waiting_polls"
        f" {args.max_waiting_polls}, max_connections {args.max_connections}, client_rate {CLIENT_RATE}/s;"
        f" xff mode {args.xff}; attackers "
        + ("SCHED_IDLE" if args.attack_sched == "idle" else f"at nice {args.attack_nice}")
        + (f" on CPUs {args.attack_cpus}" if args.attack_cpus else "")
        + (f"; honest clients at nice {args.honest_nice}" if args.honest_nice else "")
        + f"; machine {common.machine_info()}",
        flush=True,
    )
    sink = Sink()
    phases: list[dict[str, Any]] = []
    try:
        for label, chosen in plan:
            phase = Phase(args, workdir, chosen, label, sink)
            try:
                phases.append(phase.run())
            finally:
                phase.stop()
    except Exception:
        import traceback

        traceback.print_exc()
        print(f"kept {workdir}")
        return 2
    finally:
        sink.close()
    met = print_report(phases)
    if args.json:
        common.write_json(args.json, {"args": {k: v for k, v in vars(args).items()}, "phases": phases, "met": met})
        print(f"\nwrote {args.json}")
    if args.keep:
        print(f"kept {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
