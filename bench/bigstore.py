"""Start-up time and RSS of a node on a store of 1,000,000 envelopes.

    python bench/bigstore.py [--n 1000000] [--data-dir DIR] [--starts 3] [--polls 500] [--deposits 1000]

With no ``--data-dir`` it fills a fresh one with ``bench/fill_store.py``
(signed ~1 KiB envelopes, consistent ``meta``) and removes it at the end; with
``--data-dir`` it reuses a filled one (and its ``DIR.keys.json``).

Then, ``--starts`` times: start ``twistd -n meshrelay`` on it and measure
start-up time = from process start (``Popen``) to the first 200 from
``GET /api/mesh/health`` (polled every 5 ms), and the node's RSS (VmRSS from
``/proc/PID/status``, summed over the node and its child processes: the store writer and the
signature verifier) right after start-up; stop it with SIGTERM.  After the
last start it also measures RSS after ``--polls`` polls (distinct mailboxes,
``limit=100``, no acks, so each returns ~100 KiB) and ``--deposits`` deposits,
and the peak (VmHWM, summed over the same processes), and prints the last figure by process.  It checks that the node reports the filled count
(``meshrelay_stored_envelopes``) and that polls return the stored envelopes.

Targets (issue 2): start-up < 5 s, RSS < 150 MB.

The node config raises ``limits.max_stored_bytes`` to 4 GiB (1,000,000 envelopes
of ~1 KiB are ~1.05 GB, just under the 1 GiB default) and keeps every other default.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common
import fill_store

from meshrelay import envelope as E

HERE = os.path.dirname(os.path.abspath(__file__))


def poll_body(key: Any, limit: int = 100) -> dict[str, Any]:
    body = E.make_signed_request(key, int(time.time()), os.urandom(16))
    body["limit"] = limit
    return body


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="envelopes to fill (without --data-dir)")
    p.add_argument("--data-dir", help="an already filled data dir (see fill_store.py)")
    p.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1))
    p.add_argument("--starts", type=int, default=3, help="start-up measurements (median reported)")
    p.add_argument("--polls", type=int, default=500)
    p.add_argument("--deposits", type=int, default=1000)
    p.add_argument("--out", default=os.path.join(HERE, "results", "bigstore.json"))
    args = p.parse_args(argv)

    workdir = tempfile.mkdtemp(prefix="meshrelay-bench-bigstore-")
    report: dict[str, Any] = {"benchmark": "bigstore", "machine": common.machine_info()}
    try:
        if args.data_dir:
            data_dir = os.path.abspath(args.data_dir)
        else:
            data_dir = os.path.join(workdir, "data")
            print(f"filling {data_dir} with {args.n} envelopes ...", flush=True)
            report["fill"] = fill_store.fill(
                data_dir, args.n, args.workers, 259200, common.CIPHERTEXT_BYTES, quiet=False
            )
            print(f"filled in {report['fill']['fill_s']}s", flush=True)
        with open(data_dir.rstrip("/") + ".keys.json") as fh:
            keys = json.load(fh)
        n = int(keys["n"])
        mailboxes = [common.key_from_hex(h) for h in keys["mailboxes"]]
        if int(keys["ts"]) + int(keys["ttl"]) <= time.time() + 60:
            raise SystemExit("the filled envelopes have (nearly) expired: fill a new data dir")

        startups: list[float] = []
        rss_after_start: list[float] = []
        problems: list[str] = []
        server: common.Server | None = None
        for k in range(args.starts):
            server, admin = common.meshrelay_node(workdir, f"node-{k}", data_dir, limits={"max_stored_bytes": 4 << 30})
            server.start(timeout=120)
            startups.append(server.startup_s)
            rss_after_start.append(common.tree_rss_mb(server.pid))
            samples = common.parse_metrics(common.metrics_text(admin))
            stored = samples.get("meshrelay_stored_envelopes")
            if stored != float(n):
                problems.append(f"start {k}: node reports {stored} stored envelopes, expected {n}")
            print(f"start {k}: {server.startup_s:.2f}s to the first 200, RSS {rss_after_start[-1]:.1f} MB", flush=True)
            if k < args.starts - 1:
                server.stop()
        assert server is not None

        # polls: distinct mailboxes, limit 100, no acks (nothing is deleted)
        t0 = time.monotonic()
        got = 0
        for i in range(min(args.polls, len(mailboxes))):
            status, body = common.request(server.port, "POST", "/api/mesh/dm/poll", poll_body(mailboxes[i]))
            if status != 200:
                problems.append(f"poll answered {status}: {body}")
                break
            got += len(body["messages"])
        poll_s = time.monotonic() - t0
        expected = sum(min(100, len(range(i, n, len(mailboxes)))) for i in range(min(args.polls, len(mailboxes))))
        if got != expected:
            problems.append(f"polls returned {got} envelopes, expected {expected}")
        rss_after_polls = common.tree_rss_mb(server.pid)

        # deposits: one new sender, distinct mailboxes (no cap is reached)
        sender = common.new_key()
        sender_b64 = common.key_b64u(sender)
        t0 = time.monotonic()
        for i in range(args.deposits):
            box = common.key_b64u(mailboxes[i % len(mailboxes)])
            _, text = common.envelope_text(
                sender, sender_b64, box, os.urandom(common.CIPHERTEXT_BYTES), int(time.time()), 86400
            )
            status, body = common.request(server.port, "POST", "/api/mesh/dm/send", text.encode())
            if status != 200 or body.get("duplicate") is not False:
                problems.append(f"deposit answered {status}: {body}")
                break
        deposit_s = time.monotonic() - t0
        rss_after_deposits = common.tree_rss_mb(server.pid)
        peak_rss = common.tree_rss_mb(server.pid, "VmHWM")
        by_process = common.rss_by_process(server.pid)
        server.stop()

        report.update(
            {
                "n": n,
                "startup_s": [round(s, 3) for s in startups],
                "startup_s_median": round(common.median(startups), 3),
                "rss_after_start_mb": [round(r, 1) for r in rss_after_start],
                "rss_after_start_mb_median": round(common.median(rss_after_start), 1),
                "polls": args.polls,
                "envelopes_polled": got,
                "poll_s": round(poll_s, 2),
                "rss_after_polls_mb": round(rss_after_polls, 1),
                "deposits": args.deposits,
                "deposit_s": round(deposit_s, 2),
                "rss_after_deposits_mb": round(rss_after_deposits, 1),
                "peak_rss_mb": round(peak_rss, 1),
                "rss_by_process_mb": by_process,
                "problems": problems,
            }
        )
        print()
        print(f"store: {n} envelopes")
        print(
            f"start-up (Popen -> first 200 on /api/mesh/health): median {report['startup_s_median']:.2f}s "
            f"of {report['startup_s']}   target < 5 s"
        )
        print(f"RSS after start-up:            median {report['rss_after_start_mb_median']:.1f} MB   target < 150 MB")
        print(f"RSS after {args.polls} polls ({got} envelopes): {report['rss_after_polls_mb']:.1f} MB")
        print(
            f"RSS after {args.deposits} deposits:      {report['rss_after_deposits_mb']:.1f} MB "
            f"(peak {report['peak_rss_mb']:.1f} MB)"
        )
        print("  of it, by process: " + ", ".join(f"{k} {v:.1f} MB" for k, v in by_process.items()))
        for prob in problems:
            print(f"PROBLEM: {prob}")
        common.write_json(args.out, report)
        print(f"wrote {args.out}")
        return 1 if problems else 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
