"""What one operation costs the node: a signed poll over HTTP, and the writer's junk-ack operation.

Run from the repository root::

    python bench/op_costs.py poll [--n 3000] [--rounds 3] [--rate R]  # node CPU per signed poll (real node, HTTP)
    python bench/op_costs.py ack [--n 100] [--rounds 3]     # SQLite writer time per 500-id junk ack
    python bench/op_costs.py ackmesh [--n 200] [--rounds 3]  # junk acks: solo node against a 3-node mesh
    python bench/op_costs.py requests [--rounds 3]          # node CPU per request: health, refused deposit, 404
    python bench/op_costs.py all --json bench/results/op_costs.json

``poll``: one ``twistd meshrelay`` node on 127.0.0.1 (per-address rate limit
off), one client sending signed polls (``limit=1``, no wait) from a fresh
throwaway key each, one at a time on a keep-alive connection: the smallest
request that makes the node use both of its children (the signature in the
verifier, the nonce claim in the store's writer) and a reader thread (the
mailbox).  Then as many polls from one key, each with a fresh nonce: an empty
mailbox polled again and again, the shape of issue 10's ``nonce`` attack and of
a client that polls an empty mailbox (a SQLite node answers it from memory
after the first read).  ``--rate R`` sends R polls a second instead of as fast
as they are answered (a node's cost per request is higher when each request
wakes it alone).  Printed: the node's own CPU and its children's per poll (from
/proc), and polls per second; the median of ``--rounds``.

``ack``: the store writer's operation for one signed ack of 500 made-up ids
(what issue 10's ``acks`` attack sends), on a real SQLite store in this process
with the soak's 64 MiB cap: first while the junk budget is open (each id becomes
a junk tombstone), then once it is full (each id is looked up and skipped).
Printed: milliseconds of CPU per ack operation, the median of ``--rounds``
fresh stores.  Every other write of the node waits behind such an operation.

``ackmesh``: the same junk acks as signed polls over HTTP (fresh mailbox key,
500 made-up ids each, sequential on one connection), first to a node without
peers, then to node ``a`` of a 3-node mesh (``a``, ``b``, ``c``, each linked to
both others, ``sync.interval`` 5 s).  Printed: CPU per ack (node and
children) of the solo node, of ``a``, and of ``b`` and ``c``, which get each ack
pushed by ``a`` and see it in each other's feed; the mesh figures run until
``b`` and ``c`` have applied every ack and both have pulled from ``a`` and
from each other once more.  This is where issue 10's ``acks`` attack spends
the mesh's CPU.

``requests``: what the node's HTTP path itself costs per request: ``wrk``
(``apt-get install -y wrk``; 1 thread, 4 keep-alive connections, 3 s a
round) against one node (per-address rate limit off), for ``GET
/api/mesh/health`` (the smallest routed answer), a deposit refused as
``bad_request`` (``{"x": 1}``: read, parsed, refused by the error table) and
an unknown path (404, answered by Klein's own resource).  Printed: the node's
CPU per request, the median of ``--rounds``.  Most of a node's requests under
issue 10's attacks are refusals like these.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from mesh_bench import node_cpu

from meshrelay import envelope as E
from meshrelay.executor import InlineExecutor
from meshrelay.store.base import Caps, junk_budget
from meshrelay.store.sqlite import TOMBSTONE_BYTES, SQLiteStore
from tests.harness import NodeProcess

POLL = "/api/mesh/dm/poll"
ACK_IDS = E.MAX_ACK_IDS
CAP = 64 << 20


def poll_bodies(n: int, key: Ed25519PrivateKey | None = None) -> list[bytes]:
    """Signed polls (``limit`` 1, no wait): from a fresh key each, or all from ``key`` (fresh nonces)."""
    out = []
    for _ in range(n):
        signer = key if key is not None else Ed25519PrivateKey.generate()
        body = E.make_signed_request(signer, int(time.time()), os.urandom(16), [])
        body["limit"] = 1
        out.append(E.dumps_json(body))
    return out


def post_polls(conn: http.client.HTTPConnection, bodies: list[bytes], rate: float = 0.0) -> None:
    """POST each body to the poll route, one after another on ``conn`` (at most ``rate`` a second
    when it is not 0); each must answer 200."""
    t0 = time.perf_counter()
    for i, body in enumerate(bodies):
        conn.request("POST", POLL, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"poll answered {response.status}")
        if rate:
            time.sleep(max(0.0, t0 + (i + 1) / rate - time.perf_counter()))


def poll_round(n: int, rate: float = 0.0) -> dict[str, float]:
    workdir = tempfile.mkdtemp(prefix="meshrelay-opcost-")
    node = NodeProcess(workdir, "a", config={"limits": {"client_rate": 0}})
    try:
        node.start()
        conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=30)
        post_polls(conn, poll_bodies(200))
        out: dict[str, float] = {}
        # fresh keys (each poll reads its mailbox), then one key (an empty mailbox polled again and again)
        for prefix, bodies in (("", poll_bodies(n)), ("same_", poll_bodies(n, Ed25519PrivateKey.generate()))):
            before, t0 = node_cpu(node), time.perf_counter()
            post_polls(conn, bodies, rate)
            seconds, after = time.perf_counter() - t0, node_cpu(node)
            out[prefix + "node_us"] = 1e6 * (after[0] - before[0]) / n
            out[prefix + "children_us"] = 1e6 * (after[1] - before[1]) / n
            out[prefix + "polls_per_s"] = n / seconds
        conn.close()
        return out
    finally:
        node.stop()
        shutil.rmtree(workdir, ignore_errors=True)


#: (name, method, path, body) of ``requests``
REQUESTS = (
    ("health", "GET", "/api/mesh/health", None),
    ("refused deposit", "POST", "/api/mesh/dm/send", b'{"x": 1}'),
    ("unknown path", "GET", "/nope", None),
)


def requests_round(seconds: float = 3.0) -> dict[str, float]:
    """Node CPU (us) per request of each of ``REQUESTS``, under wrk."""
    workdir = tempfile.mkdtemp(prefix="meshrelay-opcost-")
    node = NodeProcess(workdir, "a", config={"limits": {"client_rate": 0}})
    try:
        node.start()
        out: dict[str, float] = {}
        for name, method, path, body in REQUESTS:
            script = os.path.join(workdir, "request.lua")
            with open(script, "w") as fh:
                fh.write(f'wrk.method = "{method}"\n')
                if body is not None:
                    fh.write('wrk.headers["Content-Type"] = "application/json"\n')
                    fh.write(f"wrk.body = '{body.decode()}'\n")
            url = f"http://127.0.0.1:{node.port}{path}"
            command = ["wrk", "-t1", "-c4", "-s", script]
            subprocess.run([*command, "-d1s", url], capture_output=True, check=True)  # warm-up
            before = node_cpu(node)
            done = subprocess.run([*command, f"-d{seconds:g}s", url], capture_output=True, text=True, check=True)
            after = node_cpu(node)
            match = re.search(r"(\d+) requests in", done.stdout)
            if match is None:
                raise RuntimeError(f"wrk printed no request count: {done.stdout!r}")
            out[name] = 1e6 * (after[0] - before[0]) / int(match.group(1))
        return out
    finally:
        node.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def junk_ack(i: int) -> tuple[str, tuple[Any, ...]]:
    mailbox = E.b64u_encode(hashlib.sha256(b"mailbox %d" % i).digest())
    ids = [os.urandom(32).hex() for _ in range(ACK_IDS)]
    return "ack", (mailbox, os.urandom(16).hex(), ids, int(time.time()) + 3600, "x" * 34_000, False, ())


def ack_round(n: int) -> dict[str, float]:
    workdir = tempfile.mkdtemp(prefix="meshrelay-opcost-")
    try:
        store = SQLiteStore(workdir, Caps(max_stored_bytes=CAP), writer=InlineExecutor())
        store.start()
        core = store._core  # the writer's own operations, as the writer process runs them

        def timed(acks: list[tuple[str, tuple[Any, ...]]]) -> float:
            t0 = time.process_time()
            for op in acks:
                core.run_batch([op])
            return 1e3 * (time.process_time() - t0) / len(acks)

        filling = int(junk_budget(Caps(max_stored_bytes=CAP)) / TOMBSTONE_BYTES / ACK_IDS)
        open_ms = timed([junk_ack(i) for i in range(min(n, filling // 2))])
        timed([junk_ack(i) for i in range(filling)])  # the rest of the budget, and past it
        full_ms = timed([junk_ack(i) for i in range(n)])
        store.close()
        return {"budget_open_ms": open_ms, "budget_full_ms": full_ms}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def ackmesh_round(n: int) -> dict[str, float]:
    from mesh_bench import Cluster

    cluster = Cluster(
        ["solo", "a", "b", "c"],
        [("a", "b"), ("a", "c"), ("b", "c")],
        {"limits": {"client_rate": 0, "max_stored_bytes": CAP}, "sync": {"interval": 5}},
    )

    def bodies() -> list[bytes]:
        out = []
        for _ in range(n):
            ids = [os.urandom(32).hex() for _ in range(ACK_IDS)]
            body = E.make_signed_request(Ed25519PrivateKey.generate(), int(time.time()), os.urandom(16), ids)
            body["limit"] = 1
            out.append(E.dumps_json(body))
        return out

    def send(node: NodeProcess, batch: list[bytes]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=30)
        post_polls(conn, batch)
        conn.close()

    def applied(name: str) -> float:
        return cluster.gauge_labelled(name, "meshrelay_dm_ack_intake_total", outcome="applied")

    def by_sync(name: str) -> float:
        return cluster.gauge_labelled(name, "meshrelay_sync_items_total", kind="ack")

    def pulls(name: str) -> float:
        return cluster.gauge_labelled(name, "meshrelay_sync_pull_total", outcome="ok")

    def wait(predicate: Any, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise RuntimeError("the mesh did not settle")
            time.sleep(0.1)

    try:
        cluster.start()
        send(cluster["solo"], bodies()[:20])  # warm-up
        send(cluster["a"], bodies()[:20])
        wait(lambda: applied("b") >= 20 and applied("c") >= 20)
        out: dict[str, float] = {}
        batch = bodies()
        before = node_cpu(cluster["solo"])
        send(cluster["solo"], batch)
        time.sleep(1.0)
        after = node_cpu(cluster["solo"])
        out["solo_node_ms"], out["solo_children_ms"] = (1e3 * (after[i] - before[i]) / n for i in (0, 1))
        batch = bodies()
        names = ("a", "b", "c")
        start = {m: node_cpu(cluster[m]) for m in names}
        base = {m: applied(m) for m in ("b", "c")}
        synced = {m: by_sync(m) for m in ("b", "c")}
        send(cluster["a"], batch)
        wait(lambda: all(applied(m) >= base[m] + n for m in ("b", "c")))
        marks = {m: pulls(m) for m in ("b", "c")}
        # Each of b and c pulls both of its peers once more (the feeds that now hold the acks).
        wait(lambda: all(pulls(m) >= marks[m] + 2 for m in ("b", "c")))
        for m in ("b", "c"):
            out[f"{m}_acks_applied"] = (applied(m) - base[m]) / n
            out[f"{m}_acks_by_sync"] = (by_sync(m) - synced[m]) / n
        for m in names:
            end = node_cpu(cluster[m])
            out[f"{m}_node_ms"], out[f"{m}_children_ms"] = (1e3 * (end[i] - start[m][i]) / n for i in (0, 1))
        return out
    finally:
        cluster.stop()


def medians(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("poll", "ack", "ackmesh", "requests", "all"))
    parser.add_argument("--n", type=int, default=0, help="operations per round (poll 3000, ack 100)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=0.0, help="poll: polls a second (default: as fast as answered)")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args()
    out: dict[str, Any] = {"machine": common.machine_info()}
    if args.what in ("poll", "all"):
        rounds = [poll_round(args.n or 3000, args.rate) for _ in range(args.rounds)]
        m = out["poll"] = medians(rounds)
        pace = f"at {args.rate:g}/s" if args.rate else "sequential"
        for what, prefix in (("fresh key", ""), ("one key", "same_")):
            for r in rounds:
                print(
                    f"  poll round ({what}): node {r[prefix + 'node_us']:.0f} us + children "
                    f"{r[prefix + 'children_us']:.0f} us, {r[prefix + 'polls_per_s']:.0f}/s"
                )
            print(
                f"signed poll ({what}, {pace}): node {m[prefix + 'node_us']:.0f} us + children "
                f"{m[prefix + 'children_us']:.0f} us CPU per poll; {m[prefix + 'polls_per_s']:.0f} polls/s "
                f"(medians of {args.rounds})"
            )
    if args.what in ("ack", "all"):
        rounds = [ack_round(args.n or 100) for _ in range(args.rounds)]
        m = out["ack"] = medians(rounds)
        for r in rounds:
            print(f"  ack round: budget open {r['budget_open_ms']:.2f} ms, full {r['budget_full_ms']:.2f} ms")
        print(
            f"junk ack of {ACK_IDS} ids, writer CPU per operation: junk budget open {m['budget_open_ms']:.2f} ms, "
            f"full {m['budget_full_ms']:.2f} ms (medians of {args.rounds})"
        )
    if args.what in ("ackmesh", "all"):
        rounds = [ackmesh_round(args.n or 200) for _ in range(args.rounds)]
        m = out["ackmesh"] = medians(rounds)
        print(f"junk acks of {ACK_IDS} ids over HTTP, CPU per ack (node + children; medians of {args.rounds}):")
        for name, label in (
            ("solo", "node without peers"),
            ("a", "mesh node a (the client's)"),
            ("b", "peer b"),
            ("c", "peer c"),
        ):
            print(f"  {label:28s} {m[name + '_node_ms']:6.2f} + {m[name + '_children_ms']:6.2f} ms")
        for name in ("b", "c"):
            print(
                f"  peer {name} applied {m[name + '_acks_applied']:.2f} acks per ack sent, "
                f"{m[name + '_acks_by_sync']:.2f} of them through sync"
            )
    if args.what in ("requests", "all"):
        rounds = [requests_round() for _ in range(args.rounds)]
        m = out["requests"] = medians(rounds)
        print(f"node CPU per request (wrk -c4, medians of {args.rounds}):")
        for name, *_ in REQUESTS:
            print(f"  {name:16s} {m[name]:6.1f} us   (rounds: {', '.join(f'{r[name]:.0f}' for r in rounds)})")
    if args.json:
        common.write_json(args.json, out)


if __name__ == "__main__":
    main()
