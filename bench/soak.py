"""Soak: a three-node mesh under steady mixed load, sampling RSS, descriptors and store size.

Run from the repository root (the nodes run this checkout's code)::

    python bench/soak.py --minutes 30 --png docs/soak.png      # the run of record
    python bench/soak.py --minutes 3                           # a quick check of the tool

Three ``twistd meshrelay`` nodes, fully peered, on 127.0.0.1 ports.  A treq
load generator in this process runs, open loop, for ``--minutes``:

- ``--rate`` deposits/s (default 150) spread over the three nodes, into
  ``--mailboxes`` read mailboxes and a few *abandoned* ones (never read: their
  envelopes, ttl 60-120 s, expire and are swept);
- readers: every read mailbox is polled in turn (``--poll-rate`` polls/s, a
  random node, 5% with ``fetch_remote``), each poll acking what the previous
  poll of that mailbox returned;
- ``--long-polls`` long-polls (``wait=10``) kept waiting on random mailboxes at
  random nodes, each re-issued (acking what it got) when it answers;
- ``--invalid-rate`` invalid requests/s of ten kinds (bad JSON, wrong
  Content-Type, bad signature, oversize body, unknown path, wrong method,
  replayed nonce, stale poll, bad ttl, unauthenticated peer call), each
  checked against the status it must get.

Every ``--sample`` seconds it records, per node: RSS (``VmRSS``) and open file
descriptors (``/proc/PID/fd``) of the node and its store writer process, data directory bytes and
``meshrelay_stored_envelopes``.  At *quiet checkpoints* (when the steady state
starts, every ``--quiet-every`` minutes, and at the end) it pauses the load,
closes its own connections and reads every node at rest: descriptors by kind
and TCP sockets by state.  Under load the descriptor count follows the load's
connections; at rest it must come back to the same level (beyond what the
peer connection pools may hold) with no half-closed (``CLOSE_WAIT``) socket,
which is the descriptor verdict.  At the end it prints start / end / max and a
flatness verdict for each, over the steady state: after a warm-up of the
tombstones' lifetime plus a minute (at least 20% of the run, at most half),
the least-squares slope and the growth from the first to the last quarter of
those samples (medians, so connections opening and closing with the load do
not count).  It writes the samples and figures as JSON and
draws the PNG (matplotlib, ``pip install '.[bench]'``).  Tombstones and
signed acks live ``max_ttl + 2 x clock_skew``; the nodes run with ``max_ttl =
300`` and ``clock_skew = 30`` (6 minutes) so that the store reaches its steady
state early in the run.

The load is bounded by ``--minutes``; in-flight requests are capped
(``--max-inflight``; beyond it work is shed and counted).  Exit status 1 when
a request got an unexpected status (any 5xx among them), a node logged a
traceback, or RSS or descriptors are not flat.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common
import treq
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet import defer, task
from twisted.web.client import Agent, HTTPConnectionPool

from meshrelay import envelope as E
from meshrelay.replication import PeerEndpoints
from tests.harness import NodeProcess
from tests.helpers import link_secret

NAMES = ("a", "b", "c")
SEND = "/api/mesh/dm/send"
POLL = "/api/mesh/dm/poll"
COUNT = "/api/mesh/dm/count"
JSON = {"Content-Type": ["application/json"]}
LOG_MARKERS = ("Traceback", "Unhandled error", "Unhandled Error")
#: seconds a long-poll waits
LONG_WAIT = 10
#: a request that has not finished after this long is counted as a timeout (a failure guard)
REQUEST_GUARD = 60
#: node limits: tombstones (and signed acks) live max_ttl + 2 x clock_skew = 6 minutes, so the
#: store reaches its steady state early in the run
MAX_TTL = 300
CLOCK_SKEW = 30
TOMBSTONE_LIFE = MAX_TTL + 2 * CLOCK_SKEW
#: at rest a node's peer connections may come and go within its pools: (push_inflight_max + 2)
#: each way per peer, two peers
PEER_POOL_SLACK = 24


def pid_rss_kb(pid: int) -> int:
    """RSS of a node and its store writer process."""
    return int(common.tree_rss_mb(pid) * 1024)


def pid_fds(pid: int) -> int:
    """Open descriptors of a node and its store writer process."""
    total = 0
    for p in [pid, *common.child_pids(pid)]:
        try:
            total += len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            continue
    return total


_TCP_STATES = {"01": "established", "06": "time_wait", "08": "close_wait", "0A": "listen"}


def fd_kinds(pid: int) -> dict[str, Any]:
    """A process's descriptors: total, sockets, others, and its TCP sockets by state."""
    inodes: set[str] = set()
    others = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
        else:
            others += 1
    states: Counter[str] = Counter()
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fh:
                next(fh)
                for line in fh:
                    cols = line.split()
                    if cols[9] in inodes:
                        found.add(cols[9])
                        states[_TCP_STATES.get(cols[3], "other")] += 1
        except OSError:
            pass
    if len(inodes) > len(found):
        states["not_tcp"] = len(inodes) - len(found)
    return {
        "fds": len(inodes) + others,
        "sockets": len(inodes),
        "other_fds": others,
        "tcp": dict(sorted(states.items())),
    }


def dir_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def slope_per_hour(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (seconds), per hour."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var * 3600.0


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: str) -> None:
        from twisted.internet import reactor

        self.reactor: Any = reactor
        self.args = args
        self.workdir = workdir
        self.rng = random.Random(args.seed)
        self.counts: Counter[str] = Counter()
        self.unexpected: Counter[str] = Counter()
        self.samples: list[dict[str, Any]] = []
        self.inflight = 0
        self.stopping = False
        self.paused = False
        self.paused_seconds = 0.0
        self.quiet_samples: list[dict[str, Any]] = []
        self.t0 = 0.0
        self.nodes: dict[str, NodeProcess] = {}
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 64
        self.pool = pool
        self.http = treq.client.HTTPClient(Agent.usingEndpointFactory(reactor, PeerEndpoints(reactor, 30), pool=pool))
        rng = self.rng
        self.mailboxes = [Ed25519PrivateKey.from_private_bytes(rng.randbytes(32)) for _ in range(args.mailboxes)]
        self.abandoned = [Ed25519PrivateKey.from_private_bytes(rng.randbytes(32)) for _ in range(10)]
        self.pubs = {id(k): E.public_key_b64u(k) for k in self.mailboxes + self.abandoned}
        self.senders = [Ed25519PrivateKey.from_private_bytes(rng.randbytes(32)) for _ in range(16)]
        #: mailbox index -> ids the last poll of it returned (acked by the next one)
        self.to_ack: dict[int, list[str]] = {i: [] for i in range(len(self.mailboxes))}
        self.next_box = 0
        self.deposits_issued = 0
        self.polls_issued = 0
        self.invalid_issued = 0
        self.used_poll: dict[str, Any] | None = None

    # ------------------------------------------------------------------ mesh

    def start_nodes(self) -> None:
        config = {
            "node": {"sweep_interval": 10},
            "limits": {"max_ttl": MAX_TTL, "min_ttl": 30, "clock_skew": CLOCK_SKEW, "max_body_bytes": 65536},
            "sync": {"interval": 5, "push_timeout": 5},
        }
        self.nodes = {n: NodeProcess(self.workdir, n, config=config) for n in NAMES}
        for n, p in self.nodes.items():
            p.peers = [{"url": self.nodes[o].url, "secret": link_secret(n, o)} for o in NAMES if o != n]
        for p in self.nodes.values():
            p.start(wait=False)
        for p in self.nodes.values():
            p.wait_ready(60)

    def stop_nodes(self) -> None:
        for p in self.nodes.values():
            p.stop()

    # ------------------------------------------------------------------ requests

    def url(self, node: str, path: str) -> str:
        return f"http://127.0.0.1:{self.nodes[node].port}{path}"

    async def request(
        self, kind: str, node: str, path: str, body: Any, expect: tuple[int, ...], method: str = "POST", **kw: Any
    ) -> tuple[int, Any]:
        self.inflight += 1
        try:
            if isinstance(body, bytes | None):
                data = body
            else:
                data = json.dumps(body).encode()
            headers = kw.pop("headers", JSON)
            d = self.http.request(method, self.url(node, path), data=data, headers=headers, **kw)
            d.addTimeout(REQUEST_GUARD, self.reactor)
            resp = await d
            raw = await treq.content(resp)
            status = int(resp.code)
        except Exception as e:
            self.counts[f"{kind}:error"] += 1
            self.unexpected[f"{kind}: {type(e).__name__}"] += 1
            return 0, None
        finally:
            self.inflight -= 1
        self.counts[f"{kind}:{status}"] += 1
        if status not in expect:
            self.unexpected[f"{kind}: HTTP {status} {raw[:120]!r}"] += 1
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, None

    def spawn(self, coro: Any) -> None:
        d = defer.Deferred.fromCoroutine(coro)
        d.addErrback(lambda f: self.unexpected.update([f"generator: {f.getErrorMessage()}"]))

    def shed(self) -> bool:
        if self.inflight >= self.args.max_inflight:
            self.counts["shed"] += 1
            return True
        return False

    # ------------------------------------------------------------------ load

    def envelope(self, box: Ed25519PrivateKey, ttl: int) -> dict[str, Any]:
        sender = self.rng.choice(self.senders)
        ct = self.rng.randbytes(self.rng.randint(100, 1500))
        return E.make_envelope(sender, self.pubs[id(box)], ct, int(time.time()), ttl)

    async def deposit(self) -> None:
        if self.rng.random() < 0.05:
            box, ttl = self.rng.choice(self.abandoned), self.rng.randint(60, 120)
        else:
            box, ttl = self.rng.choice(self.mailboxes), MAX_TTL
        node = self.rng.choice(NAMES)
        await self.request("deposit", node, SEND, self.envelope(box, ttl), (200, 429))

    def poll_body(self, box: Ed25519PrivateKey, ack: list[str], **extra: Any) -> dict[str, Any]:
        body = E.make_signed_request(box, int(time.time()), os.urandom(16), ack)
        body.update(extra)
        return body

    async def poll(self) -> None:
        i = self.next_box
        self.next_box = (i + 1) % len(self.mailboxes)
        ack, self.to_ack[i] = self.to_ack[i], []
        extra: dict[str, Any] = {"limit": 100}
        if self.rng.random() < 0.05:
            extra["fetch_remote"] = True
        node = self.rng.choice(NAMES)
        kind = "poll_remote" if "fetch_remote" in extra else "poll"
        status, body = await self.request(kind, node, POLL, self.poll_body(self.mailboxes[i], ack, **extra), (200,))
        if status == 200 and body is not None:
            self.to_ack[i] = [m["msg_id"] for m in body["messages"]]
        else:
            self.to_ack[i] = ack  # try again next time

    async def long_poller(self) -> None:
        ack: list[str] = []
        for _ in range(1_000_000):
            while self.paused and not self.stopping:
                await task.deferLater(self.reactor, 0.2, lambda: None)
            if self.stopping:
                return
            i = self.rng.randrange(len(self.mailboxes))
            node = self.rng.choice(NAMES)
            body = self.poll_body(self.mailboxes[i], ack, wait=LONG_WAIT)
            status, answer = await self.request("long_poll", node, POLL, body, (200,))
            ack = [m["msg_id"] for m in answer["messages"]] if status == 200 and answer else []
            # acks go to the same mailbox only: ack now, at a random node
            if ack:
                await self.request("ack", self.rng.choice(NAMES), POLL, self.poll_body(self.mailboxes[i], ack), (200,))
                ack = []

    async def invalid(self, index: int) -> None:
        kinds = (
            "bad_json",
            "content_type",
            "bad_signature",
            "oversize",
            "unknown_path",
            "wrong_method",
            "replayed",
            "stale",
            "bad_ttl",
            "peer_unauthenticated",
        )
        kind = kinds[index % len(kinds)]
        node = self.rng.choice(NAMES)
        box = self.rng.choice(self.mailboxes)
        if kind == "bad_json":
            await self.request(kind, node, SEND, b'{"v": 1,', (400,))
        elif kind == "content_type":
            env = self.envelope(box, MAX_TTL)
            await self.request(kind, node, SEND, env, (415,), headers={"Content-Type": ["text/plain"]})
        elif kind == "bad_signature":
            env = self.envelope(box, MAX_TTL)
            env["sig"] = E.b64u_encode(bytes(64))
            await self.request(kind, node, SEND, env, (400,))
        elif kind == "oversize":
            await self.request(kind, node, SEND, b"x" * 70000, (413,))
        elif kind == "unknown_path":
            await self.request(kind, node, "/api/mesh/dm/nothing", b"{}", (404,))
        elif kind == "wrong_method":
            await self.request(kind, node, SEND, None, (405,), method="GET")
        elif kind == "replayed":
            body = self.poll_body(box, [], limit=1)
            await self.request("replay_first", node, COUNT, body, (200,))
            await self.request(kind, node, COUNT, body, (403,))
        elif kind == "stale":
            body = E.make_signed_request(box, int(time.time()) - 10 * CLOCK_SKEW, os.urandom(16), [])
            await self.request(kind, node, COUNT, body, (403,))
        elif kind == "bad_ttl":
            await self.request(kind, node, SEND, self.envelope(box, 10**6), (422,))
        else:
            await self.request(kind, node, "/api/mesh/dm/changes?since=0", None, (403,), method="GET")

    def tick(self) -> None:
        """Issue what the rates say is due by now (open loop, capped in flight)."""
        if self.stopping or self.paused:
            return
        elapsed = time.monotonic() - self.t0 - self.paused_seconds
        a = self.args
        for _ in range(max(0, int(a.rate * elapsed) - self.deposits_issued)):
            self.deposits_issued += 1
            if not self.shed():
                self.spawn(self.deposit())
        for _ in range(max(0, int(a.poll_rate * elapsed) - self.polls_issued)):
            self.polls_issued += 1
            if not self.shed():
                self.spawn(self.poll())
        for _ in range(max(0, int(a.invalid_rate * elapsed) - self.invalid_issued)):
            self.invalid_issued += 1
            if not self.shed():
                self.spawn(self.invalid(self.invalid_issued))

    # ------------------------------------------------------------------ sampling

    async def sample(self) -> None:
        if self.paused:
            return
        row: dict[str, Any] = {"t": round(time.monotonic() - self.t0, 2)}
        for n, p in self.nodes.items():
            assert p.proc is not None
            pid = p.proc.pid
            rss, fds, data = pid_rss_kb(pid), pid_fds(pid), dir_bytes(p.data_dir)
            stored = None
            try:
                resp = await self.http.get(f"http://127.0.0.1:{p.admin_port}/api/mesh/metrics").addTimeout(
                    30, self.reactor
                )
                body = json.loads(await treq.content(resp))
                stored = body["metrics"]["meshrelay_stored_envelopes"][0]["value"]
            except Exception as e:
                self.unexpected[f"metrics scrape: {type(e).__name__}"] += 1
            row[n] = {"rss_kb": rss, "fds": fds, "data_bytes": data, "stored": stored}
        row["inflight"] = self.inflight
        self.samples.append(row)

    async def quiet(self) -> None:
        """Pause the load, close this generator's connections, then read every node at rest.

        At rest a node holds its files, its two listeners and its peer
        connections (pooled, at most ``push_inflight_max + 2`` each way per
        peer) and no client connection: what it holds beyond that is a leak.
        """
        self.paused = True
        started = time.monotonic()
        for _ in range(REQUEST_GUARD + LONG_WAIT + 5):
            if self.inflight == 0:
                break
            await task.deferLater(self.reactor, 1.0, lambda: None)
        await self.pool.closeCachedConnections()
        await task.deferLater(self.reactor, 3.0, lambda: None)
        row: dict[str, Any] = {"t": round(time.monotonic() - self.t0, 2)}
        for n, p in self.nodes.items():
            assert p.proc is not None
            row[n] = {"rss_kb": pid_rss_kb(p.proc.pid), **fd_kinds(p.proc.pid)}
        self.quiet_samples.append(row)
        print(
            f"  quiet at {row['t'] / 60:.1f} min: "
            + "  ".join(f"{n}: fds {row[n]['fds']} ({row[n]['tcp']})" for n in NAMES),
            flush=True,
        )
        self.paused_seconds += time.monotonic() - started
        self.paused = False

    # ------------------------------------------------------------------ run

    async def run(self) -> None:
        a = self.args
        self.t0 = time.monotonic()
        await self.sample()
        ticker = task.LoopingCall(self.tick)
        ticker.start(0.05)
        sampler = task.LoopingCall(lambda: self.spawn(self.sample()))
        sampler.start(a.sample, now=False)
        pollers = [defer.Deferred.fromCoroutine(self.long_poller()) for _ in range(a.long_polls)]
        last_report = 0.0
        total = a.minutes * 60
        # Quiet checkpoints: when the steady state starts, every --quiet-every minutes, and at the end.
        checkpoints = [warm_up(total)]
        while checkpoints[-1] + a.quiet_every * 60 < total - 30:
            checkpoints.append(checkpoints[-1] + a.quiet_every * 60)
        for _ in range(int(total) + 10000):
            # time under load (the quiet pauses do not count)
            loaded = time.monotonic() - self.t0 - self.paused_seconds
            if loaded >= total:
                break
            if checkpoints and loaded >= checkpoints[0]:
                checkpoints.pop(0)
                await self.quiet()
                continue
            await task.deferLater(self.reactor, 1.0, lambda: None)
            if time.monotonic() - last_report >= 60:
                last_report = time.monotonic()
                self.report_progress()
        self.stopping = True
        ticker.stop()
        sampler.stop()
        for _ in range(REQUEST_GUARD + LONG_WAIT):
            if self.inflight == 0:
                break
            await task.deferLater(self.reactor, 1.0, lambda: None)
        await defer.DeferredList(pollers, consumeErrors=True)
        await self.sample()
        await self.quiet()

    def report_progress(self) -> None:
        last = self.samples[-1] if self.samples else {}
        parts = [f"{(time.monotonic() - self.t0) / 60:5.1f} min"]
        for n in NAMES:
            s = last.get(n)
            if s:
                parts.append(f"{n}: rss {s['rss_kb'] / 1024:.1f} MB fds {s['fds']} stored {s['stored']}")
        ok = sum(v for k, v in self.counts.items() if k.startswith("deposit:200"))
        parts.append(f"deposits 200: {ok}, unexpected: {sum(self.unexpected.values())}")
        print("  ".join(parts), flush=True)


def warm_up(seconds: float) -> float:
    """Where the steady state starts: after the tombstones' lifetime (and 20% of the run), at most half of it."""
    return min(0.5 * seconds, max(0.2 * seconds, TOMBSTONE_LIFE + 60))


def flatness(samples: list[dict[str, Any]], node: str, key: str, scale: float) -> dict[str, Any]:
    """start / end / max, and after the warm-up: slope per hour and growth from the first to the last quarter."""
    pts = [(s["t"], s[node][key] / scale) for s in samples if s.get(node) and s[node][key] is not None]
    ys = [y for _, y in pts]
    warm = [(t, y) for t, y in pts if t >= warm_up(pts[-1][0])]
    k = max(1, len(warm) // 4)
    head = sorted(y for _, y in warm[:k])[k // 2]
    tail = sorted(y for _, y in warm[-k:])[k // 2]
    return {
        "start": round(ys[0], 2),
        "end": round(ys[-1], 2),
        "max": round(max(ys), 2),
        "warm_start_median": round(head, 2),
        "warm_end_median": round(tail, 2),
        "growth": round(tail - head, 2),
        "slope_per_hour": round(slope_per_hour([t for t, _ in warm], [y for _, y in warm]), 2),
    }


def summarize(samples: list[dict[str, Any]], quiet: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n in NAMES:
        out[n] = {
            "rss_mb": flatness(samples, n, "rss_kb", 1024.0),
            "fds": flatness(samples, n, "fds", 1.0),
            "data_mb": flatness(samples, n, "data_bytes", 1024.0 * 1024.0),
            "stored": flatness(samples, n, "stored", 1.0),
            "quiet": [{"t": q["t"], **q[n]} for q in quiet],
        }
        rss = out[n]["rss_mb"]
        first, last = quiet[0][n], quiet[-1][n]
        # Flat RSS: over the steady state it grows by at most 5% (at least 5 MB is allowed).
        out[n]["rss_flat"] = rss["growth"] <= max(5.0, 0.05 * rss["warm_start_median"])
        # Flat descriptors: at rest, no socket left half-closed, and no more descriptors at the end
        # than at the start of the steady state beyond what the peer pools may hold.
        out[n]["quiet_fds_growth"] = last["fds"] - first["fds"]
        out[n]["fds_flat"] = out[n]["quiet_fds_growth"] <= PEER_POOL_SLACK and last["tcp"].get("close_wait", 0) == 0
    return out


def plot(samples: list[dict[str, Any]], quiet: list[dict[str, Any]], path: str, title: str, steady: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(9, 11), sharex=True)
    series = (
        ("rss_kb", 1024.0, "RSS (MB)"),
        ("fds", 1.0, "open file descriptors"),
        ("data_bytes", 1024.0 * 1024.0, "data directory (MB)"),
        ("stored", 1.0, "meshrelay_stored_envelopes"),
    )
    for ax, (key, scale, label) in zip(axes, series):
        for n in NAMES:
            pts = [(s["t"] / 60.0, s[n][key] / scale) for s in samples if s.get(n) and s[n][key] is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=f"node {n}", linewidth=1)
        if key == "fds":
            for n in NAMES:
                ax.plot(
                    [q["t"] / 60.0 for q in quiet],
                    [q[n]["fds"] for q in quiet],
                    "x",
                    label=f"node {n} at rest",
                )
            ax.legend(loc="lower right", fontsize="small", ncol=2)
        ax.axvline(steady / 60.0, linestyle=":", color="grey")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
    axes[0].legend(loc="lower right")
    axes[-1].set_xlabel("minutes (dotted line: the steady state starts)")
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--rate", type=float, default=150.0, help="deposits/s over the three nodes")
    p.add_argument("--poll-rate", type=float, default=60.0, help="reader polls/s")
    p.add_argument("--long-polls", type=int, default=20, help="long-polls kept waiting")
    p.add_argument("--invalid-rate", type=float, default=5.0, help="invalid requests/s")
    p.add_argument("--mailboxes", type=int, default=300)
    p.add_argument("--sample", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--max-inflight", type=int, default=200)
    p.add_argument("--quiet-every", type=float, default=5.0, help="minutes between quiet checkpoints")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--png", default="bench/results/soak.png")
    p.add_argument("--json", default="bench/results/soak.json")
    p.add_argument("--keep", action="store_true", help="keep the nodes' directories")
    args = p.parse_args()
    try:
        import matplotlib  # noqa: F401  (the plot at the end; fail now, not after the run)
    except ImportError:
        p.error("the plot needs matplotlib: pip install '.[bench]'")
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**32)
    workdir = tempfile.mkdtemp(prefix="meshrelay-soak-")
    print(
        f"soak: {args.minutes} min, {args.rate} deposits/s, {args.poll_rate} polls/s, {args.long_polls} long-polls, "
        f"{args.invalid_rate} invalid/s, seed {args.seed}, dir {workdir}",
        flush=True,
    )
    soak = Soak(args, workdir)
    soak.start_nodes()
    failed = False
    try:
        from twisted.internet import reactor

        result: list[Any] = []

        def done(r: Any) -> None:
            result.append(r)
            reactor.stop()  # type: ignore[attr-defined]

        reactor.callWhenRunning(  # type: ignore[attr-defined]
            lambda: defer.Deferred.fromCoroutine(soak.run()).addBoth(done)
        )
        reactor.run()  # type: ignore[attr-defined]
        if result and hasattr(result[0], "raiseException"):
            result[0].raiseException()
    finally:
        soak.stop_nodes()
    logs = {}
    for n, node in soak.nodes.items():
        with open(node.log_path, "rb") as fh:
            text = fh.read().decode(errors="replace")
        logs[n] = [m for m in LOG_MARKERS if m in text]
    figures = summarize(soak.samples, soak.quiet_samples)
    seconds = soak.samples[-1]["t"]
    loaded = seconds - soak.paused_seconds
    deposits_ok = soak.counts.get("deposit:200", 0)
    print("\nrequests (kind:status -> count):")
    for k, v in sorted(soak.counts.items()):
        print(f"  {k:28s} {v}")
    print(
        f"deposits answered 200: {deposits_ok} ({deposits_ok / loaded:.1f}/s over {loaded / 60:.1f} min under load;"
        f" {soak.paused_seconds:.0f} s of quiet checkpoints)"
    )
    if soak.unexpected:
        failed = True
        print("UNEXPECTED answers:")
        for k, v in soak.unexpected.most_common(20):
            print(f"  {v:6d}  {k}")
    print(f"\nsteady state (warm part) from minute {warm_up(seconds) / 60:.1f} to {seconds / 60:.1f}")
    print("node  measure      start      end      max   warm start  warm end  growth  slope/h   verdict")
    for n in NAMES:
        for key, label in (("rss_mb", "RSS MB"), ("fds", "fds (load)"), ("data_mb", "data MB"), ("stored", "stored")):
            f = figures[n][key]
            verdict = ""
            if key == "rss_mb":
                verdict = "flat" if figures[n]["rss_flat"] else "GROWING"
            print(
                f"{n:4s}  {label:9s} {f['start']:8.1f} {f['end']:8.1f} {f['max']:8.1f} {f['warm_start_median']:10.1f}"
                f" {f['warm_end_median']:9.1f} {f['growth']:7.1f} {f['slope_per_hour']:8.1f}   {verdict}"
            )
            if verdict == "GROWING":
                failed = True
        quiet = " -> ".join(f"{q['fds']} ({q['t'] / 60:.0f} min)" for q in figures[n]["quiet"])
        close_wait = figures[n]["quiet"][-1]["tcp"].get("close_wait", 0)
        verdict = "flat" if figures[n]["fds_flat"] else "GROWING"
        print(f"{n:4s}  fds at rest {quiet}; half-closed at the end: {close_wait}   {verdict}")
        if verdict == "GROWING":
            failed = True
        if logs[n]:
            failed = True
            print(f"node {n} logged {logs[n]}")
    out = {
        "args": vars(args),
        "seconds": seconds,
        "paused_seconds": soak.paused_seconds,
        "warm_up_seconds": warm_up(seconds),
        "counts": dict(soak.counts),
        "unexpected": dict(soak.unexpected),
        "figures": figures,
        "log_markers": logs,
        "samples": soak.samples,
        "quiet_samples": soak.quiet_samples,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(out, fh, indent=1, sort_keys=True)
    plot(
        soak.samples,
        soak.quiet_samples,
        args.png,
        f"meshrelay soak: 3 nodes, {args.rate:.0f} deposits/s + polls, long-polls, invalid requests, "
        f"{seconds / 60:.0f} min",
        warm_up(seconds),
    )
    print(f"\nwrote {args.json} and {args.png}")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"kept {workdir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
