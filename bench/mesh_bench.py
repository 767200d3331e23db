"""Mesh replication benchmarks: real ``twistd meshrelay`` nodes on loopback, a treq load generator.

Run from the repository root (the nodes run this checkout's code)::

    python bench/mesh_bench.py throughput [--rounds 3] [--count 3000] [--concurrency 32]
    python bench/mesh_bench.py cpu        [--rounds 3] [--count 3000] [--concurrency 32 | --wrk 32] [--interval 30]
    python bench/mesh_bench.py latency    [--count 2000] [--rate R] [--background 4 | --wrk 4]
    python bench/mesh_bench.py catchup    [--backlog 100000]
    python bench/mesh_bench.py ackprop    [--count 300] [--concurrency 4]

Each prints its figures (medians and percentiles) and the exact setup.  Every
load is bounded by a count and stops by itself; nodes listen on 127.0.0.1 only
and are stopped at the end.  Envelopes are signed before the timed phase, so the
client's signing cost is not measured.

- ``throughput``: deposits/s at a node with no peers (the baseline) and at a node
  with 2 peers (a full mesh of 3), alternating rounds in the same run; the
  figure is median(mesh) / median(baseline).
- ``cpu``: the origin's CPU per deposit (utime + stime of the node process and
  its store writer child, from ``/proc/<pid>/stat``) with no peers and with 2
  peers, alternating rounds in one run.  With peers, a round's CPU is counted
  from the first deposit until both peers hold every envelope *and* have each
  pulled A's feed again after the last deposit (so serving the sync of those
  envelopes is included); the figure is median(no peers) / median(2 peers).
  Each round also prints the node's kernel time and, with peers, the CPU spent
  after the last deposit (the round's sync), both peers' CPU and this client's.
  ``--rate R`` paces both cases at R/s: CPU per deposit depends on batching, so
  the ratio depends on the load.  ``--wrk N`` sends the deposits with ``wrk
  -t1 -cN`` (bench/deposit.lua, each pre-signed envelope once) instead of this
  process's treq client, as the issue measured: this client spends about as
  much CPU per deposit as the node, and on two cores that CPU is taken from the
  nodes.
- ``latency``: deposits at A at a fixed open-loop rate (half the sustainable
  rate measured first in the same run unless ``--rate``); for each envelope a
  long-poll waits at B on its own mailbox; latency = B's answer - deposit start.
  The sustainable rate is that of the same workload (a deposit at A and its
  long-poll at B), closed-loop with 32 at a time: on one machine the client's
  and B's work for the long-polls competes with A for the same cores, so the
  rate of bare deposits at A would not be sustainable here.  With
  ``--background N``, N more clients deposit at A closed-loop meanwhile (the
  issue's ``wrk -c4`` load, from this client's own reactor), and the rate is not
  halved but given or 50/s.  ``--wrk N`` runs the real ``wrk -t1 -cN`` at A instead
  (bench/deposit.lua, pre-signed envelopes), so the load does not share the
  measuring client's reactor.
- ``catchup``: A holds a backlog of ``--backlog`` envelopes; a fresh node B
  peered with A starts and pulls it by sync; rate = backlog / (time B holds all
  of it - B's launch).
- ``ackprop``: envelopes already on A, B and C (sync interval 3600, so only push
  moves acks); the recipient acks at A; propagation = time until the envelope
  is gone at both B and C (count polled every ms) - ack request start.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import treq
from common import percentile
from twisted.internet import defer, task, threads
from twisted.web.client import Agent, HTTPConnectionPool

from meshrelay import envelope as E
from meshrelay.replication import PeerEndpoints
from tests.harness import NodeProcess
from tests.helpers import Identity, link_secret

SEND = "/api/mesh/dm/send"
POLL = "/api/mesh/dm/poll"
COUNT = "/api/mesh/dm/count"
JSON = {"Content-Type": ["application/json"]}

#: limits that keep the caps out of the way of a benchmark (they are measured elsewhere)
#: failure guard: an ack not propagated by push after this long (sync is off) fails the run
ACK_GUARD = 60.0
BENCH_LIMITS = {"per_mailbox_pending": 100000, "per_sender_pending": 100000, "max_waiting_polls": 100000}


def make_client(reactor: Any, per_host: int) -> Any:
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = per_host
    return treq.client.HTTPClient(Agent.usingEndpointFactory(reactor, PeerEndpoints(reactor, 30), pool=pool)), pool


def reactor_of() -> Any:
    from twisted.internet import reactor

    return reactor


def ms(x: float) -> str:
    return f"{x * 1000:.1f} ms"


class Cluster:
    """Node processes in a temporary directory; peers are two-way links between named nodes."""

    def __init__(self, names: list[str], links: list[tuple[str, str]], config: dict[str, Any]) -> None:
        self.base = tempfile.mkdtemp(prefix="meshbench-")
        self.procs = {n: NodeProcess(self.base, n, config=config) for n in names}
        for a, b in links:
            self.procs[a].peers.append({"url": self.procs[b].url, "secret": link_secret(a, b)})
            self.procs[b].peers.append({"url": self.procs[a].url, "secret": link_secret(a, b)})

    def __getitem__(self, name: str) -> NodeProcess:
        return self.procs[name]

    def start(self, *names: str) -> None:
        for n in names or self.procs:
            self.procs[n].start(wait=False)
        for n in names or self.procs:
            self.procs[n].wait_ready(60)

    def stop(self) -> None:
        for p in self.procs.values():
            p.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def gauge_labelled(self, name: str, metric: str, **labels: str) -> float:
        """A metric's value summed over the samples whose labels include ``labels``; -1 when unreachable."""
        try:
            status, body = self.procs[name].admin("/api/mesh/metrics")
        except OSError:
            return -1.0
        assert status == 200, body
        return float(
            sum(
                s["value"]
                for s in body["metrics"].get(metric, [])
                if all(s["labels"].get(k) == v for k, v in labels.items())
            )
        )

    def gauge(self, name: str, metric: str) -> float:
        """A metric's value (summed over labels); -1 while the node is not answering yet."""
        try:
            status, body = self.procs[name].admin("/api/mesh/metrics")
        except OSError:
            return -1.0
        assert status == 200, body
        return float(sum(s["value"] for s in body["metrics"].get(metric, [])))


def make_envelopes(n: int, mailboxes: int = 1000) -> list[bytes]:
    """``n`` signed deposit bodies: a fresh sender each, spread over ``mailboxes`` mailboxes."""
    boxes = [Identity().pub for _ in range(mailboxes)]
    now = int(time.time())
    out = []
    for i in range(n):
        env = E.make_envelope(Identity().key, boxes[i % mailboxes], os.urandom(200), now, 3600)
        out.append(E.dumps_json(env))
    return out


async def post(client: Any, url: str, body: bytes) -> tuple[int, bytes]:
    resp = await client.post(url, data=body, headers=JSON)
    content = await resp.content()
    return int(resp.code), content


async def closed_loop(
    client: Any, url: str, bodies: list[bytes], concurrency: int, rate: float = 0.0
) -> tuple[float, int]:
    """POST every body with ``concurrency`` workers (at most ``rate`` per second if given); (seconds, failures)."""
    it = iter(bodies)
    failures = 0
    sent = 0

    async def worker() -> None:
        nonlocal failures, sent
        for body in it:
            if rate:
                sent += 1
                delay = started + sent / rate - time.perf_counter()
                if delay > 0:
                    await task.deferLater(reactor_of(), delay, lambda: None)
            try:
                status, _ = await post(client, url, body)
            except Exception:
                status = 0
            if status != 200:
                failures += 1

    started = time.perf_counter()
    await defer.gatherResults([defer.Deferred.fromCoroutine(worker()) for _ in range(concurrency)])
    return time.perf_counter() - started, failures


async def wait_until(reactor: Any, predicate: Callable[[], bool], timeout: float, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out waiting for the mesh")
        await task.deferLater(reactor, step, lambda: None)


# --------------------------------------------------------------------------- throughput


async def throughput(reactor: Any, args: argparse.Namespace) -> None:
    cluster = Cluster(["solo", "a", "b", "c"], [("a", "b"), ("a", "c"), ("b", "c")], {"limits": BENCH_LIMITS})
    client, pool = make_client(reactor, args.concurrency)
    try:
        cluster.start()
        results: dict[str, list[float]] = {"solo": [], "a": []}
        print(f"throughput: {args.rounds} rounds x {args.count} deposits, concurrency {args.concurrency}")
        await closed_loop(client, cluster["solo"].url + SEND, make_envelopes(200), args.concurrency)  # warm-up
        await closed_loop(client, cluster["a"].url + SEND, make_envelopes(200), args.concurrency)
        for r in range(args.rounds):
            for name in ("solo", "a"):
                bodies = make_envelopes(args.count)
                seconds, failures = await closed_loop(client, cluster[name].url + SEND, bodies, args.concurrency)
                rate = (args.count - failures) / seconds
                results[name].append(rate)
                label = "no peers " if name == "solo" else "2 peers  "
                print(f"  round {r + 1} {label}: {rate:8.0f} deposits/s ({failures} failed)")
                if name == "a":
                    # Let the pushes drain before the next round.
                    target = cluster.gauge("a", "meshrelay_stored_envelopes")
                    for peer in ("b", "c"):
                        await wait_until(
                            reactor,
                            lambda p=peer, t=target: cluster.gauge(p, "meshrelay_stored_envelopes") >= t,  # type: ignore[misc]
                            120,
                            0.2,
                        )
        solo, mesh = statistics.median(results["solo"]), statistics.median(results["a"])
        print(f"median no peers: {solo:.0f}/s, median with 2 peers: {mesh:.0f}/s, ratio {mesh / solo:.2f}")
    finally:
        await pool.closeCachedConnections()
        cluster.stop()


# --------------------------------------------------------------------------- CPU per deposit

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float, float]:
    """(parent pid, utime + stime seconds, stime seconds) of a process."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK_TCK, int(fields[12]) / CLK_TCK


def node_sys(node: NodeProcess) -> float:
    """Kernel-mode CPU seconds used so far by a node process itself (loopback sends are charged here)."""
    assert node.proc is not None
    return _stat(node.proc.pid)[2]


def node_cpu(node: NodeProcess) -> tuple[float, float]:
    """CPU seconds used so far by a node process, and by its children (store writer, signature verifier)."""
    assert node.proc is not None
    pid = node.proc.pid
    own = _stat(pid)[1]
    children = 0.0
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != pid:
            try:
                ppid, used, _ = _stat(int(entry))
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                children += used
    return own, children


async def cpu(reactor: Any, args: argparse.Namespace) -> None:
    if args.wrk and not shutil.which("wrk"):
        raise SystemExit("cpu --wrk: wrk is not installed (apt-get install -y wrk)")
    config = {"limits": BENCH_LIMITS, "sync": {"interval": args.interval}}
    if args.linger is not None:
        config["sync"]["push_linger_ms"] = args.linger
    cluster = Cluster(["solo", "a", "b", "c"], [("a", "b"), ("a", "c"), ("b", "c")], config)
    client, pool = make_client(reactor, args.concurrency)

    def pushes_of_a() -> tuple[float, float]:
        """(push requests, items pushed) by A so far, to both peers."""
        base = "meshrelay_dm_replication_push_batch_size"
        return cluster.gauge("a", base + "_count"), cluster.gauge("a", base + "_sum")

    def pulls_from_a(peer: str) -> float:
        return cluster.gauge_labelled(peer, "meshrelay_sync_pull_total", peer=cluster["a"].url, outcome="ok")

    lua = os.path.join(os.path.dirname(os.path.abspath(__file__)), "deposit.lua")

    async def load(url: str, bodies: list[bytes]) -> tuple[float, int]:
        """Deposit every body once at ``url``: (seconds, failures)."""
        if not args.wrk:
            return await closed_loop(client, url + SEND, bodies, args.concurrency, args.rate)
        path = os.path.join(cluster.base, "cpu-envelopes.txt")
        with open(path, "wb") as fh:
            fh.writelines(body + b"\n" for body in bodies)
        # deposit.lua stops wrk's thread once every envelope is sent (requests still in flight on
        # other connections are dropped), but wrk itself runs for -d: it is stopped once the node
        # holds all but at most one envelope per connection, and what it stored is what counts.
        name = next(n for n in ("solo", "a") if cluster[n].url == url)
        before = cluster.gauge(name, "meshrelay_stored_envelopes")
        cmd = ["wrk", "-t1", f"-c{args.wrk}", "-d600s", "-s", lua, url, "--", path, "1"]
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        last = [before, started]

        def finished() -> bool:
            # All but the dropped in-flight ones stored, or nothing stored for 2 s (refusals count
            # as failures below).
            now, stored = time.perf_counter(), cluster.gauge(name, "meshrelay_stored_envelopes")
            if stored != last[0]:
                last[:] = [stored, now]
            return stored >= before + len(bodies) - args.wrk or now - last[1] > 2.0

        try:
            await wait_until(reactor, finished, 600, 0.1)
            seconds = last[1] - started
        finally:
            proc.kill()
            proc.wait()
        stored = cluster.gauge(name, "meshrelay_stored_envelopes") - before
        return seconds, len(bodies) - int(stored)

    try:
        cluster.start()
        per: dict[str, list[float]] = {"solo": [], "a": []}
        print(
            f"cpu: {args.rounds} rounds x {args.count} deposits, "
            + (f"wrk -t1 -c{args.wrk}, " if args.wrk else f"concurrency {args.concurrency}, ")
            + f"sync.interval {args.interval}s; CPU = node process + its children (store writer, signature verifier)"
        )
        await closed_loop(client, cluster["solo"].url + SEND, make_envelopes(200), args.concurrency)  # warm-up
        await closed_loop(client, cluster["a"].url + SEND, make_envelopes(200), args.concurrency)
        if args.wrk:
            # The warm-up's idle keep-alive connections would count toward the node's per-address
            # connection cap (max_connections_per_address) next to wrk's.
            await pool.closeCachedConnections()
        for r in range(args.rounds):
            for name in ("solo", "a"):
                bodies = make_envelopes(args.count)
                node = cluster[name]
                before, sys_before = node_cpu(node), node_sys(node)
                spies = start_profilers(args.profile and os.path.join(args.profile, f"{name}-{r + 1}"), {name: node})
                pushes_before = pushes_of_a() if name == "a" else (0.0, 0.0)
                peers_before = {p: sum(node_cpu(cluster[p])) for p in ("b", "c")} if name == "a" else {}
                client_before = time.process_time()
                seconds, failures = await load(node.url, bodies)
                if name == "a":
                    at_last_deposit = node_cpu(node)
                    batches = pushes_of_a()
                    marks = {p: pulls_from_a(p) for p in ("b", "c")}
                    target = cluster.gauge("a", "meshrelay_stored_envelopes")
                    for peer in ("b", "c"):
                        await wait_until(
                            reactor,
                            lambda p=peer, t=target, m=marks[peer]: (
                                cluster.gauge(p, "meshrelay_stored_envelopes")  # type: ignore[misc]
                                >= t
                                and pulls_from_a(p) > m
                            ),
                            args.interval * 3 + 120,
                            0.2,
                        )
                else:
                    await task.deferLater(reactor, 1.0, lambda: None)
                after, kernel = node_cpu(node), node_sys(node) - sys_before
                client_used = time.process_time() - client_before
                stop_profilers(spies)
                done = args.count - failures
                own, writer = (after[0] - before[0]) / done, (after[1] - before[1]) / done
                per[name].append(own + writer)
                label = "no peers " if name == "solo" else "2 peers  "
                pushed = ""
                if name == "a":
                    requests, items = batches[0] - pushes_before[0], batches[1] - pushes_before[1]
                    tail = sum(after) - sum(at_last_deposit)
                    peers_used = [(sum(node_cpu(cluster[p])) - peers_before[p]) / done * 1e6 for p in ("b", "c")]
                    pushed = (
                        f"; {requests:.0f} push requests, {items / max(requests, 1):.1f} items each; "
                        f"{tail / done * 1e6:.0f} us of it after the last deposit; "
                        f"peers b, c {peers_used[0]:.0f}, {peers_used[1]:.0f} us"
                    )
                print(
                    f"  round {r + 1} {label}: {(own + writer) * 1e6:7.0f} us CPU per deposit "
                    f"(node {own * 1e6:.0f}, of it kernel {kernel / done * 1e6:.0f}, + children {writer * 1e6:.0f}; {done / seconds:.0f} deposits/s, "
                    f"{failures} failed{pushed}; this client {client_used / done * 1e6:.0f} us)"
                )
        solo, mesh = statistics.median(per["solo"]), statistics.median(per["a"])
        # Each round measures both cases within a minute of each other: the ratio of one round is
        # less exposed to the host's drift (its speed changes by 2x over minutes) than the ratio of
        # the medians over the whole run.
        paired = [s / m for s, m in zip(per["solo"], per["a"])]
        print(
            f"median CPU per deposit: no peers {solo * 1e6:.0f} us, with 2 peers {mesh * 1e6:.0f} us, "
            f"ratio (no peers / 2 peers) {solo / mesh:.2f}; per round {', '.join(f'{r:.2f}' for r in paired)}, "
            f"median {statistics.median(paired):.2f}"
        )
    finally:
        await pool.closeCachedConnections()
        cluster.stop()


# --------------------------------------------------------------------------- latency


def latency_plan(count: int) -> list[tuple[bytes, bytes]]:
    """``count`` (envelope to a fresh mailbox, signed long-poll of that mailbox) pairs."""
    now = int(time.time())
    plan = []
    for _ in range(count):
        box, sender = Identity(), Identity()
        env = E.dumps_json(E.make_envelope(sender.key, box.pub, os.urandom(200), now, 3600))
        plan.append((env, E.dumps_json(box.poll_body(ts=now, wait=30))))
    return plan


async def latency(reactor: Any, args: argparse.Namespace) -> None:
    config: dict[str, Any] = {"limits": BENCH_LIMITS}
    if args.linger is not None:
        config["sync"] = {"push_linger_ms": args.linger}
    cluster = Cluster(["a", "b", "c"], [("a", "b"), ("a", "c"), ("b", "c")], config)
    client, pool = make_client(reactor, 1000)
    lat: list[float] = []
    local: list[float] = []
    errors = 0

    async def one(env: bytes, poll: bytes, lead: float, record: bool) -> None:
        """Long-poll the mailbox at B, ``lead`` s later deposit at A, wait for B's answer."""
        nonlocal errors
        waiter = defer.Deferred.fromCoroutine(post(client, cluster["b"].url + POLL, poll))
        if lead:
            await task.deferLater(reactor, lead, lambda: None)
        t0 = time.perf_counter()
        status, _ = await post(client, cluster["a"].url + SEND, env)
        t_local = time.perf_counter() - t0
        pstatus, body = await waiter
        t1 = time.perf_counter()
        if status != 200 or pstatus != 200 or b'"messages":[]' in body:
            errors += 1
        elif record:
            local.append(t_local)
            lat.append(t1 - t0)

    background_done = False

    async def background() -> None:
        """Closed-loop deposits at A (bounded: stops when the measurement ends or after 1M)."""
        for body in (b for _ in range(1000) for b in make_envelopes(1000)):
            if background_done:
                return
            try:
                await post(client, cluster["a"].url + SEND, body)
            except Exception:
                pass

    wrk: subprocess.Popen[bytes] | None = None
    try:
        cluster.start()
        rate = args.rate or (50.0 if args.background or args.wrk else 0.0)
        loaders = [defer.Deferred.fromCoroutine(background()) for _ in range(args.background)]
        if args.background:
            print(f"latency: {args.background} clients deposit at A closed-loop meanwhile")
        if args.wrk:
            # wrk -c N at A for the whole measurement (bench/deposit.lua: each envelope once).
            seconds = int(args.count / rate) + 4
            path = os.path.join(cluster.base, "wrk-envelopes.txt")
            with open(path, "wb") as fh:
                for body in make_envelopes(seconds * args.wrk_rate):
                    fh.write(body + b"\n")
            lua = os.path.join(os.path.dirname(os.path.abspath(__file__)), "deposit.lua")
            cmd = ["wrk", "-t1", f"-c{args.wrk}", f"-d{seconds}s", "-s", lua, cluster["a"].url, "--", path, "1"]
            wrk = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            print(f"latency: wrk -t1 -c{args.wrk} deposits at A meanwhile ({seconds} s)")
            await task.deferLater(reactor, 1.0, lambda: None)
        if not rate:
            # The sustainable rate of this workload: deposits at A *with* their
            # long-polls at B, closed-loop (all nodes and this client share the machine).
            pairs = iter(latency_plan(3000))

            async def worker() -> None:
                for env, poll in pairs:
                    await one(env, poll, 0, False)

            started = time.perf_counter()
            await defer.gatherResults([defer.Deferred.fromCoroutine(worker()) for _ in range(32)])
            sustainable = (3000 - errors) / (time.perf_counter() - started)
            rate = sustainable / 2
            print(
                f"latency: sustainable rate of deposits at A with a long-poll each at B (closed loop, 32 at a time) "
                f"measured {sustainable:.0f}/s; running at {rate:.0f}/s"
            )
            errors = 0
            await task.deferLater(reactor, 3, lambda: None)
        else:
            print(f"latency: running at {rate:.0f}/s")
        lead = 0.2
        plan = latency_plan(args.count)
        running = []
        interval = 1.0 / rate
        started = time.perf_counter()
        for i, (env, poll) in enumerate(plan):
            delay = started + i * interval - lead - time.perf_counter()
            if delay > 0:
                await task.deferLater(reactor, delay, lambda: None)
            running.append(defer.Deferred.fromCoroutine(one(env, poll, lead, True)))
        await defer.gatherResults(running)
        background_done = True
        await defer.gatherResults(loaders)
        if wrk is not None:
            out = await threads.deferToThread(wrk.communicate)
            wrk = None
            line = next((x for x in out[0].decode().splitlines() if x.startswith("WRKJSON")), "")
            print(f"  wrk at A: {line[8:] if line else 'no summary'}")
        print(
            f"  {len(lat)} envelopes: deposit at A -> available at B: p50 {ms(percentile(lat, 50))}, p99 {ms(percentile(lat, 99))}"
            f" (A's own answer p50 {ms(percentile(local, 50))}); {errors} errors"
        )
    finally:
        if wrk is not None:
            wrk.kill()
            wrk.wait()
        await pool.closeCachedConnections()
        cluster.stop()


# --------------------------------------------------------------------------- catch-up


async def catchup(reactor: Any, args: argparse.Namespace) -> None:
    config = {"limits": BENCH_LIMITS, "sync": {"interval": 3600}, "node": {"verifier": args.verifier}}
    cluster = Cluster(["a", "b"], [("a", "b")], config)
    client, pool = make_client(reactor, 32)
    try:
        cluster.start("a")
        print(f"catchup: building a backlog of {args.backlog} envelopes at A ...")
        done = 0
        while done < args.backlog:
            n = min(10000, args.backlog - done)
            seconds, failures = await closed_loop(client, cluster["a"].url + SEND, make_envelopes(n), 32)
            assert failures == 0, failures
            done += n
        a_before = node_cpu(cluster["a"])
        launched = time.perf_counter()
        cluster["b"].start(wait=False)
        spies = start_profilers(args.profile, {"a": cluster["a"], "b": cluster["b"]})
        # B answers its admin API once it has started (and begun to sync).
        await wait_until(reactor, lambda: cluster.gauge("b", "meshrelay_stored_envelopes") >= 0, 60, 0.02)
        ready = time.perf_counter() - launched
        await wait_until(reactor, lambda: cluster.gauge("b", "meshrelay_stored_envelopes") >= args.backlog, 3600, 0.1)
        seconds = time.perf_counter() - launched
        a_after, b_used = node_cpu(cluster["a"]), node_cpu(cluster["b"])
        stop_profilers(spies)
        a_cpu = sum(a_after) - sum(a_before)
        print(
            f"  fresh node B holds all {args.backlog} after {seconds:.1f} s from its launch: "
            f"{args.backlog / seconds:.0f} envelopes/s ({ready:.1f} s to start; "
            f"{args.backlog / (seconds - ready):.0f} envelopes/s once started)"
        )
        print(
            f"  CPU per envelope: A {a_cpu / args.backlog * 1e6:.0f} us, B {sum(b_used) / args.backlog * 1e6:.0f} us "
            f"(node {b_used[0] / args.backlog * 1e6:.0f} + children {b_used[1] / args.backlog * 1e6:.0f}, "
            f"its start-up included)"
        )
    finally:
        await pool.closeCachedConnections()
        cluster.stop()


def start_profilers(out_dir: str | None, nodes: dict[str, NodeProcess]) -> list[subprocess.Popen[bytes]]:
    """py-spy on each node (with its writer child), collapsed stacks into OUT_DIR/<name>.txt; none without a dir."""
    if not out_dir:
        return []
    os.makedirs(out_dir, exist_ok=True)
    spies = []
    for name, node in nodes.items():
        assert node.proc is not None
        out = os.path.join(out_dir, f"{name}.txt")
        cmd = ["py-spy", "record", "--pid", str(node.proc.pid), "--subprocesses", "--threads"]
        cmd += ["--format", "raw", "--rate", "200", "--nonblocking", "--output", out] + (
            ["--gil"] if os.environ.get("SPY_GIL") else []
        )
        spies.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return spies


def stop_profilers(spies: list[subprocess.Popen[bytes]]) -> None:
    for spy in spies:
        spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
    for spy in spies:
        spy.wait(timeout=60)


# --------------------------------------------------------------------------- ack propagation


async def ackprop(reactor: Any, args: argparse.Namespace) -> None:
    config = {"limits": BENCH_LIMITS, "sync": {"interval": 3600}}
    cluster = Cluster(["a", "b", "c"], [("a", "b"), ("a", "c"), ("b", "c")], config)
    client, pool = make_client(reactor, 64)
    try:
        cluster.start()
        now = int(time.time())
        items = []
        for _ in range(args.count):
            box = Identity()
            env = E.make_envelope(Identity().key, box.pub, os.urandom(200), now, 3600)
            items.append((box, env))
        seconds, failures = await closed_loop(
            client, cluster["a"].url + SEND, [E.dumps_json(env) for _, env in items], 16
        )
        assert failures == 0
        for peer in ("b", "c"):
            await wait_until(
                reactor,
                lambda p=peer: cluster.gauge(p, "meshrelay_stored_envelopes") >= args.count,
                60,  # type: ignore[misc]
            )
        print(f"ackprop: {args.count} acks at A, {args.concurrency} at a time; sync off (push only)")
        times: list[float] = []

        async def gone(node: str, box: Identity) -> None:
            deadline = time.monotonic() + ACK_GUARD
            while time.monotonic() < deadline:
                body = E.dumps_json(box.poll_body(ts=int(time.time())))
                status, answer = await post(client, cluster[node].url + COUNT, body)
                if status == 200 and b'"count":0' in answer:
                    return
                await task.deferLater(reactor, 0.001, lambda: None)
            raise RuntimeError(f"an ack at A did not reach {node} within {ACK_GUARD:.0f} s")

        async def one(box: Identity, env: dict[str, Any]) -> None:
            t0 = time.perf_counter()
            status, _ = await post(
                client,
                cluster["a"].url + POLL,
                E.dumps_json(box.poll_body(ts=int(time.time()), ack=[env["msg_id"]], limit=1)),
            )
            assert status == 200
            await defer.gatherResults([defer.Deferred.fromCoroutine(gone(n, box)) for n in ("b", "c")])
            times.append(time.perf_counter() - t0)

        it = iter(items)

        async def worker() -> None:
            for box, env in it:
                await one(box, env)

        await defer.gatherResults([defer.Deferred.fromCoroutine(worker()) for _ in range(args.concurrency)])
        print(
            f"  ack at A -> gone at B and C: p50 {ms(percentile(times, 50))}, p99 {ms(percentile(times, 99))}, max {ms(max(times))}"
        )
    finally:
        await pool.closeCachedConnections()
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("throughput")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--count", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=32)
    p = sub.add_parser("cpu")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--count", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--interval", type=int, default=30)
    p.add_argument("--rate", type=float, default=0.0, help="deposits/s offered in both cases (default: closed loop)")
    p.add_argument("--linger", type=int, default=None, help="sync.push_linger_ms of the nodes (default: the node's)")
    p.add_argument("--profile", default=None, help="py-spy the measured node in each round; collapsed stacks under DIR")
    p.add_argument("--wrk", type=int, default=0, help="deposit with wrk -t1 -cN instead of this client (no --rate)")
    p = sub.add_parser("latency")
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--rate", type=float, default=0.0)
    p.add_argument("--background", type=int, default=0)
    p.add_argument("--linger", type=int, default=None, help="sync.push_linger_ms of the nodes (default: the node's)")
    p.add_argument("--wrk", type=int, default=0, help="wrk connections depositing at A meanwhile (the issue's wrk -c4)")
    p.add_argument("--wrk-rate", type=int, default=3000, help="envelopes signed per second of wrk load (upper bound)")
    p = sub.add_parser("catchup")
    p.add_argument("--backlog", type=int, default=100000)
    p.add_argument("--profile", default=None, help="py-spy both nodes while B catches up; collapsed stacks to DIR")
    p.add_argument("--verifier", default="process", choices=("process", "thread"), help="node.verifier of the nodes")
    p = sub.add_parser("ackprop")
    p.add_argument("--count", type=int, default=300)
    p.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    fn = {"throughput": throughput, "cpu": cpu, "latency": latency, "catchup": catchup, "ackprop": ackprop}[args.cmd]
    task.react(lambda reactor: defer.Deferred.fromCoroutine(fn(reactor, args)))


if __name__ == "__main__":
    main()
