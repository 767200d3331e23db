"""Experiment: time the writer's group-commit batches and the verifier's batches inside a node.

Loaded into a bench node through ``MESHRELAY_BENCH_PRELUDE`` (see
``bench/common.py``); it wraps ``WriterCore.run_batch`` (the group commit) and the verifier's
batch function to add up their wall and thread-CPU time, and writes the totals
to ``$MESHRELAY_BENCH_STATS`` when the reactor shuts down::

    python bench/deposit.py --instrument --rounds 1 --targets normal,full --duration 10

(which sets ``MESHRELAY_BENCH_PRELUDE`` and ``MESHRELAY_BENCH_STATS`` for each node, and runs
the nodes with ``node.store_writer = "thread"``: a writer process would run unpatched code).

A worker thread whose wall time per batch is far above its CPU time is waiting
for the GIL (``verify_signature`` itself releases it).  Nothing here changes
what the node does.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from twisted.internet import reactor

from meshrelay import verifier as _verifier
from meshrelay.store import sqlite as _sqlite

STATS: dict[str, float] = {
    "writer_batches": 0,
    "writer_ops": 0,
    "writer_wall_s": 0.0,
    "writer_cpu_s": 0.0,
    "verify_batches": 0,
    "verify_items": 0,
    "verify_wall_s": 0.0,
    "verify_cpu_s": 0.0,
}

_run_batch = _sqlite.WriterCore.run_batch
_verify_all = _verifier._verify_all


def _timed_run_batch(self: Any, ops: list[Any]) -> Any:
    wall, cpu = time.perf_counter(), time.thread_time()
    try:
        return _run_batch(self, ops)
    finally:
        STATS["writer_batches"] += 1
        STATS["writer_ops"] += len(ops)
        STATS["writer_wall_s"] += time.perf_counter() - wall
        STATS["writer_cpu_s"] += time.thread_time() - cpu


def _timed_verify_all(items: list[Any]) -> list[bool]:
    wall, cpu = time.perf_counter(), time.thread_time()
    try:
        return _verify_all(items)
    finally:
        STATS["verify_batches"] += 1
        STATS["verify_items"] += len(items)
        STATS["verify_wall_s"] += time.perf_counter() - wall
        STATS["verify_cpu_s"] += time.thread_time() - cpu


def _dump() -> None:
    path = os.environ.get("MESHRELAY_BENCH_STATS", "meshrelay-bench-stats.json")
    with open(path, "w") as fh:
        json.dump(STATS, fh, indent=2)


_sqlite.WriterCore.run_batch = _timed_run_batch  # type: ignore[method-assign]
_verifier._verify_all = _timed_verify_all
reactor.addSystemEventTrigger("before", "shutdown", _dump)  # type: ignore[attr-defined]
