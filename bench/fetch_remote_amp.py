"""fetch_remote amplification (issue 10, item 4): what polls with fetch_remote of a filled mailbox cost.

Starts two peered nodes A and B (real ``twistd`` processes on 127.0.0.1), fills
one mailbox at B to its cap (256 envelopes of 8 KiB ciphertext, about 2.9 MB
of JSON), then for ``--seconds`` runs, against A at the same time:

- an attacker loop: polls of that mailbox with ``fetch_remote: true`` (one
  connection, sequential, ``limit: 1``), counted as polls/s;
- an unrelated client: polls of another mailbox without ``fetch_remote``,
  whose latency is reported (median and p90).

Run from the repository root::

    .venv/bin/python bench/fetch_remote_amp.py --seconds 5

To measure another checkout's code, run its copy of this file from its root.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.harness import NodeProcess
from tests.helpers import Identity

SECRET = "fetch-remote-bench-secret"


def post(conn: http.client.HTTPConnection, path: str, body: object) -> tuple[int, bytes]:
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, resp.read()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    base = tempfile.mkdtemp(prefix="fetch-amp-")
    a = NodeProcess(base, "a")
    b = NodeProcess(base, "b")
    limits = {"peer_rate": 0}
    a.extra = {"limits": limits, "sync": {"interval": 3600}}
    b.extra = {"limits": limits, "sync": {"interval": 3600}}
    a.peers = [{"url": b.url, "secret": SECRET}]
    b.peers = [{"url": a.url, "secret": SECRET}]
    try:
        a.start()
        b.start()
        victim = Identity()
        conn = http.client.HTTPConnection("127.0.0.1", b.port, timeout=30)
        filled = 0
        for _ in range(32):
            sender = Identity()
            for _ in range(8):
                status, _ = post(
                    conn, "/api/mesh/dm/send", sender.envelope(victim, os.urandom(8192), ts=int(time.time()))
                )
                filled += status == 200
        conn.close()
        print(f"filled the mailbox at B with {filled} envelopes")
        stop = time.monotonic() + args.seconds
        attack = {"polls": 0, "errors": 0}

        def attacker() -> None:
            c = http.client.HTTPConnection("127.0.0.1", a.port, timeout=30)
            while time.monotonic() < stop:
                status, _ = post(
                    c, "/api/mesh/dm/poll", victim.poll_body(ts=int(time.time()), limit=1, fetch_remote=True)
                )
                attack["polls" if status == 200 else "errors"] += 1
            c.close()

        latencies: list[float] = []
        bystander = Identity()

        def unrelated() -> None:
            c = http.client.HTTPConnection("127.0.0.1", a.port, timeout=30)
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                post(c, "/api/mesh/dm/poll", bystander.poll_body(ts=int(time.time())))
                latencies.append(time.perf_counter() - t0)
                time.sleep(0.01)
            c.close()

        threads = [threading.Thread(target=attacker), threading.Thread(target=unrelated)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        latencies.sort()
        print(
            f"fetch_remote polls: {attack['polls'] / args.seconds:.0f}/s ({attack['errors']} non-200); "
            f"unrelated poll latency: median {statistics.median(latencies) * 1000:.1f} ms, "
            f"p90 {latencies[int(len(latencies) * 0.9)] * 1000:.1f} ms ({len(latencies)} polls)"
        )
    finally:
        a.stop()
        b.stop()


if __name__ == "__main__":
    main()
