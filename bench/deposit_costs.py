"""Per-deposit CPU costs of each step of the deposit path, measured in-process.

Complements ``bench/deposit.py`` (which measures the whole node over HTTP):
this tool times each step on its own, on the thread that would run it, so the
figures say where a deposit's CPU goes and what holds the GIL.

    python bench/deposit_costs.py [--n 5000] [--out bench/results/deposit_costs.json]

Steps (microseconds per deposit, median of 5 repetitions):

- ``json.loads`` (stdlib) vs ``meshrelay.envelope.loads_json`` (strict decoder)
- ``parse_envelope`` (shape, base64, msg_id recomputation)
- Ed25519 ``verify_signature`` (``cryptography`` releases the GIL here)
- ``add_envelope`` on a real ``SQLiteStore`` (group commit, batches of 16, both
  durabilities): the writer thread's share per deposit, commit included
- the response body: ``dumps_json`` vs ``json.dumps``
- the metrics a deposit touches (counter, histogram, two gauges)
- one thread hand-off round trip (``deferToThreadPool`` of a no-op): reactor
  thread CPU per hand-off; a deposit makes two (verifier, writer), amortised by
  their batching
- ``Relay.deposit`` end to end in-process (inline store and verifier, no HTTP)
- the same through the real Twisted HTTP stack and Klein routes, with a fake
  transport (``twisted.web.test.requesthelper`` style): what the reactor thread
  pays per request beyond the core

``--cprofile`` also prints the top functions of the in-process HTTP path.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from meshrelay import envelope as E
from meshrelay.config import build_config
from meshrelay.metrics import Metrics
from meshrelay.node import Node
from meshrelay.store import caps_from
from meshrelay.store.base import Caps
from meshrelay.store.sqlite import SQLiteStore
from meshrelay.verifier import Verifier


def per_call(fn: Callable[[], Any], n: int, reps: int = 5) -> float:
    """Median over ``reps`` of the thread CPU time of ``n`` calls, in microseconds per call."""
    times = []
    for _ in range(reps):
        t0 = time.thread_time()
        for _ in range(n):
            fn()
        times.append((time.thread_time() - t0) / n * 1e6)
    return round(statistics.median(times), 1)


def make_bodies(n: int, now: int) -> list[bytes]:
    pop = common.Population(n)
    return [text.encode() for _, _, text in pop.envelopes(now, 86400)]


def measure_sqlite(bodies: list[bytes], durability: str, now: int, batch: int = 16) -> tuple[float, float]:
    """Writer-thread CPU per add_envelope, in batches of ``batch`` (inline executor)."""
    envs = [E.parse_envelope(json.loads(b), 8192) for b in bodies]
    tmp = tempfile.mkdtemp(prefix="meshrelay-costs-")
    try:
        store = SQLiteStore(tmp, Caps(), durability=durability)
        store.start()
        t0 = time.thread_time()
        w0 = time.perf_counter()
        for i in range(0, len(envs), batch):
            # queue a whole batch while the store looks busy (as it does while the
            # writer thread commits), then run it as one transaction, inline
            store._inflight = store._depth
            ds = [store.add_envelope(env, now) for env in envs[i : i + batch]]
            store._inflight = 0
            store._flush()
            for d in ds:
                d.addErrback(lambda f: sys.exit(f"add_envelope failed: {f.value}"))
        cpu = (time.thread_time() - t0) / len(envs) * 1e6
        wall = (time.perf_counter() - w0) / len(envs) * 1e6
        store.close()
        return round(cpu, 1), round(wall, 1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def measure_handoff(n: int) -> float:
    """Reactor-thread CPU per deferToThreadPool round trip of a no-op."""
    from twisted.internet import reactor
    from twisted.internet.threads import deferToThreadPool
    from twisted.python.threadpool import ThreadPool

    pool = ThreadPool(1, 1, "costs")
    pool.start()
    result: dict[str, float] = {}

    def run() -> Any:
        async def go() -> None:
            t0 = time.thread_time()
            for _ in range(n):
                await deferToThreadPool(reactor, pool, lambda: None)
            result["us"] = (time.thread_time() - t0) / n * 1e6

        from twisted.internet.defer import Deferred

        return Deferred.fromCoroutine(go())

    d = run()
    d.addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]
    reactor.run(installSignalHandlers=False)  # type: ignore[attr-defined]
    pool.stop()
    return round(result.get("us", float("nan")), 1)


@contextlib.contextmanager
def inline_node(now: int) -> Iterator[Node]:
    """A node on a temporary data dir with an inline store and verifier, its clock at ``now``."""
    tmp = tempfile.mkdtemp(prefix="meshrelay-costs-")
    try:
        clock = task.Clock()
        clock.advance(now)
        node = Node(
            build_config({"node": {"data_dir": tmp}, "limits": {"clock_skew": 3600, "client_rate": 0}}),
            clock,
            store_factory=lambda config, reactor, metrics: SQLiteStore(
                config.node.data_dir, caps_from(config), durability=config.node.durability, metrics=metrics
            ),
            verifier=Verifier(),
        )
        node.startService()
        try:
            yield node
        finally:
            node.stopService()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def http_path_costs(bodies: list[bytes], now: int, profile: bool) -> dict[str, Any]:
    """Reactor CPU per deposit through HTTPChannel + MeshSite + Klein + relay, inline store/verifier."""
    with inline_node(now) as node:
        site = node.site()
        requests = [
            b"POST /api/mesh/dm/send HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(b), b)
            for b in bodies
        ]
        proto = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        proto.makeConnection(transport)
        half = len(requests) // 2
        # warm up on the first half, measure (or profile) on the second
        for r in requests[:half]:
            proto.dataReceived(r)
        answered_before = transport.value().count(b"HTTP/1.1 200 ")
        transport.clear()
        prof = cProfile.Profile() if profile else None
        t0 = time.thread_time()
        if prof:
            prof.enable()
        for r in requests[half:]:
            proto.dataReceived(r)
        if prof:
            prof.disable()
        us = (time.thread_time() - t0) / (len(requests) - half) * 1e6
        ok = transport.value().count(b"HTTP/1.1 200 ")
        if answered_before != half or ok != len(requests) - half:
            raise SystemExit(f"in-process HTTP deposits were not all answered 200 ({answered_before}, {ok})")
        out: dict[str, Any] = {"us": round(us, 1)}
        if prof:
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
            out["cprofile_tottime"] = s.getvalue()
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(40)
            out["cprofile_cumulative"] = s.getvalue()
        return out


def relay_costs(bodies: list[bytes], now: int) -> float:
    """Relay.deposit end to end (inline verifier and store), per deposit."""
    with inline_node(now) as node:
        objs = [json.loads(b) for b in bodies]
        failures: list[Any] = []
        t0 = time.thread_time()
        for obj in objs:
            node.relay.deposit(obj).addErrback(failures.append)
        us = (time.thread_time() - t0) / len(objs) * 1e6
    if failures:
        raise SystemExit(f"in-process deposits failed: {failures[0]}")
    return round(us, 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=5000, help="deposits per measurement (default 5000)")
    p.add_argument(
        "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "deposit_costs.json")
    )
    p.add_argument("--cprofile", action="store_true", help="print cProfile of the in-process HTTP path")
    args = p.parse_args(argv)
    now = int(time.time())
    bodies = make_bodies(args.n, now)
    body = bodies[0]
    obj = json.loads(body)
    env = E.parse_envelope(obj, 8192)
    answer = {"ok": True, "msg_id": env.msg_id, "duplicate": False}
    metrics = Metrics()

    def touch_metrics() -> None:
        metrics.deposit_total.labels("accepted").inc()
        metrics.deposit_latency.observe(0.001)
        metrics.stored_envelopes.set(1)
        metrics.stored_bytes.set(1)

    n = args.n
    costs: dict[str, Any] = {
        "json.loads (stdlib)": per_call(lambda: json.loads(body), n),
        "loads_json (strict)": per_call(lambda: E.loads_json(body), n),
        "parse_envelope": per_call(lambda: E.parse_envelope(obj, 8192), n),
        "verify_signature (GIL released)": per_call(
            lambda: E.verify_signature(env.sender_key, env.sig_bytes, env.signed), n
        ),
        "json.dumps answer": per_call(lambda: json.dumps(answer).encode(), n),
        "dumps_json answer": per_call(lambda: E.dumps_json(answer), n),
        "metrics per deposit": per_call(touch_metrics, n),
    }
    for durability in ("normal", "full"):
        cpu, wall = measure_sqlite(bodies, durability, now)
        costs[f"sqlite add_envelope, {durability} (cpu, batch 16)"] = cpu
        costs[f"sqlite add_envelope, {durability} (wall, batch 16)"] = wall
    costs["thread hand-off round trip (reactor cpu)"] = measure_handoff(min(n, 3000))
    costs["Relay.deposit in-process (inline verify + store)"] = relay_costs(bodies, now)
    http = http_path_costs(bodies, now, args.cprofile)
    costs["HTTP + Klein + Relay.deposit in-process (inline)"] = http["us"]
    width = max(len(k) for k in costs)
    print(f"per-deposit CPU, microseconds (n={n}, median of 5 where repeated)")
    for k, v in costs.items():
        print(f"  {k:<{width}}  {v:>8}")
    if args.cprofile:
        print(http["cprofile_tottime"])
        print(http["cprofile_cumulative"])
    common.write_json(args.out, {"benchmark": "deposit_costs", "machine": common.machine_info(), "n": n, "us": costs})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
