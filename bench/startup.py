"""How long a node takes to start, and what its processes hold in memory.

Run from the repository root (the node runs this checkout's code)::

    python bench/startup.py [--rounds 7]

Each round starts one fresh ``twistd meshrelay`` node on 127.0.0.1 (embedded
defaults: SQLite, the store writer and the signature verifier as child
processes) and measures, from the moment the process is launched:

- **health**: the first ``GET /api/mesh/health`` answered 200 (polled every
  5 ms): the node listens;
- **first deposit**: a deposit sent right after that, answered 200: the writer
  and the verifier children are up and working (a deposit is verified by the
  verifier and committed by the writer);

then each process's resident memory (``VmRSS``: the node, and each child by
its role) and stops the node.  Printed: every round and the medians.  A node
restarted under load, or a fresh peer starting a catch-up
(``bench/mesh_bench.py catchup`` measures from the launch), does no write
until its writer child is ready.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import rss_by_process

from meshrelay import envelope as E
from tests.harness import NodeProcess, http_request
from tests.helpers import Identity


def one_round(base: str) -> dict[str, float]:
    node = NodeProcess(base, f"n{len(os.listdir(base))}")
    now = int(time.time())
    body = E.dumps_json(E.make_envelope(Identity().key, Identity().pub, os.urandom(200), now, 3600))
    launched = time.perf_counter()
    node.start(wait=False)
    try:
        node.wait_ready(60, interval=0.005)
        health = time.perf_counter() - launched
        status, answer = http_request(node.port, "POST", "/api/mesh/dm/send", body, timeout=60)
        deposit = time.perf_counter() - launched
        if status != 200:
            raise RuntimeError(f"the first deposit was answered {status}: {answer}")
        assert node.proc is not None
        memory = rss_by_process(node.proc.pid)
        return {"health": health, "deposit": deposit, **{f"rss_{k}": v for k, v in memory.items()}}
    finally:
        node.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    base = tempfile.mkdtemp(prefix="meshbench-startup-")
    try:
        rounds = []
        for i in range(args.rounds):
            r = one_round(base)
            rounds.append(r)
            mem = ", ".join(f"{k[4:]} {v:.1f}" for k, v in r.items() if k.startswith("rss_"))
            print(
                f"  round {i + 1}: health {r['health'] * 1000:.0f} ms, first deposit {r['deposit'] * 1000:.0f} ms "
                f"after launch; RSS MiB: {mem}",
                flush=True,
            )
        keys = sorted({k for r in rounds for k in r})
        med = {k: statistics.median(r.get(k, 0.0) for r in rounds) for k in keys}
        mem = ", ".join(f"{k[4:]} {med[k]:.1f}" for k in keys if k.startswith("rss_"))
        print(
            f"median of {args.rounds}: health {med['health'] * 1000:.0f} ms, first deposit "
            f"{med['deposit'] * 1000:.0f} ms after launch; RSS MiB: {mem}"
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
