"""Deposit throughput on PostgreSQL with 1 and 2 meshrelay processes, against SQLite, in one run.

::

    MESHRELAY_TEST_PG_DSN=postgresql://postgres@127.0.0.1:5432/test \\
        /tmp/v1/bin/python bench/pg_bench.py --deposits 20000 --rounds 5

For each round it runs three phases on fresh stores, in this order, with the
same pre-signed envelopes: ``sqlite`` (one node, embedded store), ``pg-1``
(one process on PostgreSQL), ``pg-2`` (two processes, one public URL, one
database; connections split between them).  Each phase sends ``--deposits``
client deposits over ``--connections`` keep-alive HTTP/1.1 connections
(closed loop) after a warm-up, and records:

- deposits/s (200 answers per wall second of the measured part);
- CPU seconds per 1,000 deposits, from ``/proc/PID/stat`` (utime + stime):
  the meshrelay processes (with a SQLite node's store writer process);
  this run's PostgreSQL backends (found by the ``application_name`` the
  bench puts in the DSN); PostgreSQL's shared
  background processes (walwriter, checkpointer, ...: shared with anything
  else using the server, so noisy on a busy machine); and the load generator;
- how busy the store's one serial section is, per wall second: the time
  the server held the sequence lock (``meshrelay_store_seq_lock_seconds``,
  summed over processes) plus one COMMIT per batch (the median cost of a
  small commit on this server, measured right after the phase).

It prints the median of each figure over the rounds, then an extrapolation:
how many meshrelay processes (each on its own core) one PostgreSQL server
like this one carries before PostgreSQL is the bottleneck -- by CPU
(cores x meshrelay CPU / PostgreSQL CPU per deposit) and by the serial
section (throughput / its busy fraction) -- the smaller of the two.
Every run is bounded: it sends exactly the deposits asked for and stops.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from common import child_pids  # noqa: E402  (bench/common.py: this script's directory is on sys.path)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from meshrelay.envelope import dumps_json, make_envelope, public_key_b64u  # noqa: E402
from tests.harness import NodeProcess  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
PG_AUX = ("walwriter", "checkpointer", "background writer", "autovacuum launcher", "autovacuum worker")
LIMITS = {
    "per_sender_pending": 1_000_000,
    "per_mailbox_pending": 1_000_000,
    "clock_skew": 3600,
    "max_waiting_polls": 100,
}


# --------------------------------------------------------------------------- load


def make_requests(n: int, senders: int = 64, mailboxes: int = 512) -> list[bytes]:
    """``n`` signed deposits as ready-to-send HTTP/1.1 requests (distinct envelopes)."""
    sender_keys = [Ed25519PrivateKey.generate() for _ in range(senders)]
    boxes = [public_key_b64u(Ed25519PrivateKey.generate()) for _ in range(mailboxes)]
    ts = int(time.time())
    out = []
    for i in range(n):
        env = make_envelope(sender_keys[i % senders], boxes[i % mailboxes], secrets.token_bytes(200), ts, 7200)
        body = dumps_json(env)
        head = (
            "POST /api/mesh/dm/send HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        out.append(head + body)
    return out


async def _read_response(reader: asyncio.StreamReader) -> int:
    status = int((await reader.readline()).split()[1])
    length, chunked = 0, False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    else:
        await reader.readexactly(length)
    return status


async def _connection(port: int, requests: list[bytes], statuses: Counter[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for req in requests:
            writer.write(req)
            statuses[await _read_response(reader)] += 1
    finally:
        writer.close()


def send_all(ports: list[int], requests: list[bytes], connections: int) -> tuple[float, Counter[int]]:
    """Send every request (closed loop, ``connections`` at once, spread over ``ports``); returns (seconds, statuses)."""
    statuses: Counter[int] = Counter()
    shares = [requests[i::connections] for i in range(connections)]

    async def run() -> float:
        started = time.perf_counter()
        await asyncio.gather(*(_connection(ports[i % len(ports)], s, statuses) for i, s in enumerate(shares)))
        return time.perf_counter() - started

    return asyncio.run(run()), statuses


# --------------------------------------------------------------------------- CPU accounting


def cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def pg_pids(admin_dsn: str, app: str) -> dict[str, list[int]]:
    import psycopg

    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid, backend_type, application_name FROM pg_stat_activity "
            "WHERE application_name LIKE %s OR backend_type = ANY(%s)",
            (app + "%", list(PG_AUX)),
        ).fetchall()
    out: dict[str, list[int]] = {"backends": [], "aux": []}
    for pid, _kind, name in rows:
        out["backends" if name and name.startswith(app) else "aux"].append(pid)
    return out


@dataclass
class CpuSnapshot:
    values: dict[str, dict[int, float]] = field(default_factory=dict)

    @classmethod
    def take(cls, groups: dict[str, list[int]]) -> CpuSnapshot:
        snap = cls()
        for group, pids in groups.items():
            snap.values[group] = {p: v for p in pids if (v := cpu_seconds(p)) is not None}
        return snap

    def minus(self, before: CpuSnapshot) -> dict[str, float]:
        """CPU per group since ``before`` (a process that appeared meanwhile counts from zero)."""
        out = {}
        for group, now in self.values.items():
            then = before.values.get(group, {})
            out[group] = sum(v - then.get(p, 0.0) for p, v in now.items())
        return out


def seq_lock(nodes: list[NodeProcess]) -> tuple[float, float]:
    """(seconds held before COMMIT as measured by the server, batches that took it), summed over ``nodes``."""
    held = batches = 0.0
    for node in nodes:
        status, text = node.admin("/metrics")
        if status == 200 and isinstance(text, bytes):
            for suffix in ("sum", "count"):
                m = re.search(rb"^meshrelay_store_seq_lock_seconds_" + suffix.encode() + rb" (\S+)$", text, re.M)
                if m and suffix == "sum":
                    held += float(m.group(1))
                elif m:
                    batches += float(m.group(1))
    return held, batches


def commit_cost(dsn: str, n: int = 300) -> float:
    """Median seconds of a one-row INSERT + COMMIT on this server (the WAL flush every batch pays)."""
    import psycopg

    times = []
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE TEMP TABLE commit_probe (x int)")
        conn.commit()
        for _ in range(n):
            t = time.perf_counter()
            conn.execute("INSERT INTO commit_probe VALUES (1)")
            conn.commit()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


# --------------------------------------------------------------------------- phases


@dataclass
class PhaseResult:
    name: str
    rate: float
    cpu: dict[str, float]  # CPU seconds per 1,000 deposits, by group
    lock_busy: float  # seconds the sequence lock was held (server time + one COMMIT per batch) per wall second
    errors: int


def run_phase(
    name: str,
    processes: int,
    backend: str,
    work_dir: str,
    base_dsn: str | None,
    warmup: list[bytes],
    measured: list[bytes],
    connections: int,
) -> PhaseResult:
    app = f"meshrelay-bench-{secrets.token_hex(4)}"
    schema = f"mr_bench_{secrets.token_hex(4)}"
    nodes: list[NodeProcess] = []
    admin_dsn = base_dsn or ""
    try:
        config: dict[str, Any] = {"limits": LIMITS}
        if backend == "postgresql":
            import psycopg
            from psycopg.conninfo import make_conninfo

            with psycopg.connect(admin_dsn, autocommit=True) as conn:
                conn.execute(f'CREATE SCHEMA "{schema}"')
            dsn = make_conninfo(admin_dsn, options=f"-csearch_path={schema}", application_name=app)
            config["store"] = {"backend": "postgresql", "dsn": dsn}
        phase_dir = os.path.join(work_dir, f"{name}-{secrets.token_hex(3)}")
        for i in range(processes):
            node = NodeProcess(phase_dir, f"p{i + 1}")
            nodes.append(node)
        for node in nodes:
            node.extra = {**config, "node": {"public_url": nodes[0].url}}
            node.start()
        ports = [n.port for n in nodes]
        send_all(ports, warmup, connections)
        # Each node and its children (a SQLite node's store writer process, started by the warm-up).
        pids = [n.proc.pid for n in nodes if n.proc is not None]
        groups: dict[str, list[int]] = {"meshrelay": pids + [c for p in pids for c in child_pids(p)]}
        if backend == "postgresql":
            groups.update(pg_pids(admin_dsn, app))
        held0, batches0 = seq_lock(nodes)
        self0 = resource.getrusage(resource.RUSAGE_SELF)
        before = CpuSnapshot.take(groups)
        seconds, statuses = send_all(ports, measured, connections)
        if backend == "postgresql":
            groups.update(pg_pids(admin_dsn, app))  # connections opened during the run
        after = CpuSnapshot.take(groups)
        self1 = resource.getrusage(resource.RUSAGE_SELF)
        held1, batches1 = seq_lock(nodes)
        commit = commit_cost(admin_dsn) if backend == "postgresql" else 0.0
        lock = (held1 - held0) + (batches1 - batches0) * commit
    finally:
        for node in nodes:
            node.stop()
        if backend == "postgresql":
            import psycopg

            with psycopg.connect(admin_dsn, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    ok = statuses[200]
    per_k = 1000.0 / max(ok, 1)
    cpu = {k: v * per_k for k, v in after.minus(before).items()}
    cpu["loadgen"] = (self1.ru_utime + self1.ru_stime - self0.ru_utime - self0.ru_stime) * per_k
    return PhaseResult(name, ok / seconds, cpu, lock / seconds, sum(statuses.values()) - ok)


# --------------------------------------------------------------------------- report


def med(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def report(results: list[PhaseResult], cores: int) -> str:
    by: dict[str, list[PhaseResult]] = {}
    for r in results:
        by.setdefault(r.name, []).append(r)
    lines = [
        f"{'phase':<8} {'deposits/s':>11} {'meshrelay':>10} {'pg backends':>12} {'pg aux':>8} {'loadgen':>8} "
        f"{'seq lock busy':>14} {'errors':>7}",
        f"{'':<8} {'(median)':>11} {'CPU s per 1,000 deposits (median)':^40} {'(fraction)':>14}",
    ]
    for name, rs in by.items():
        c = {k: med([r.cpu.get(k, 0.0) for r in rs]) for k in ("meshrelay", "backends", "aux", "loadgen")}
        lines.append(
            f"{name:<8} {med([r.rate for r in rs]):>11.0f} {c['meshrelay']:>10.3f} {c['backends']:>12.3f} "
            f"{c['aux']:>8.3f} {c['loadgen']:>8.3f} {med([r.lock_busy for r in rs]):>14.3f} "
            f"{sum(r.errors for r in rs):>7}"
        )
    pg = by.get("pg-2") or by.get("pg-1")
    if pg:
        rate = med([r.rate for r in pg])
        mr = med([r.cpu.get("meshrelay", 0.0) for r in pg])
        pg_cpu = med([r.cpu.get("backends", 0.0) + r.cpu.get("aux", 0.0) for r in pg])
        busy = med([r.lock_busy for r in pg])
        per_process = 1000.0 / mr if mr else 0.0
        by_cpu = cores * mr / pg_cpu if pg_cpu else float("inf")
        by_lock = (rate / busy) / per_process if busy and per_process else float("inf")
        lines += [
            "",
            f"extrapolation from {pg[0].name} (medians):",
            f"  one meshrelay process, CPU-bound on one core: {per_process:.0f} deposits/s",
            f"  PostgreSQL CPU per deposit is {pg_cpu / mr if mr else 0:.2f}x meshrelay's; on {cores} cores it "
            f"carries ~{by_cpu:.1f} processes",
            f"  the serial section (sequence lock) was busy {busy:.1%} at {rate:.0f}/s: it saturates near "
            f"{rate / busy if busy else float('inf'):.0f}/s = ~{by_lock:.1f} processes (conservative: batches "
            "grow with load)",
            f"  => one PostgreSQL server of this kind carries ~{min(by_cpu, by_lock):.1f} meshrelay processes",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--dsn", default=os.environ.get("MESHRELAY_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
    )
    p.add_argument("--deposits", type=int, default=20000, help="measured deposits per phase")
    p.add_argument("--warmup", type=int, default=1000, help="deposits sent before measuring")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--phases", default="sqlite,pg-1,pg-2")
    args = p.parse_args(argv)
    phases = {"sqlite": (1, "sqlite"), "pg-1": (1, "postgresql"), "pg-2": (2, "postgresql")}
    chosen = [x.strip() for x in args.phases.split(",") if x.strip()]
    for name in chosen:
        if name not in phases:
            p.error(f"unknown phase {name!r} (known: {', '.join(phases)})")
    sys.stderr.write(f"signing {args.warmup + args.deposits} envelopes...\n")
    warmup = make_requests(args.warmup)
    measured = make_requests(args.deposits)
    work = tempfile.mkdtemp(prefix="meshrelay-pgbench-")
    results: list[PhaseResult] = []
    try:
        for rnd in range(args.rounds):
            for name in chosen:
                n, backend = phases[name]
                r = run_phase(name, n, backend, work, args.dsn, warmup, measured, args.connections)
                sys.stderr.write(f"round {rnd + 1} {name}: {r.rate:.0f} deposits/s, errors {r.errors}\n")
                results.append(r)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"# {args.rounds} rounds x {args.deposits} deposits per phase, {args.connections} connections, "
        f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}"
    )
    print(report(results, os.cpu_count() or 1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
