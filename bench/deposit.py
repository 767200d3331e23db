"""Durable deposit throughput: baseline vs meshrelay (normal) vs meshrelay (full), in one run.

Load generator: ``wrk`` (C, keep-alive connections) with ``bench/deposit.lua``,
which POSTs pre-signed ~1 KiB envelopes from a file, each exactly once (every
wrk thread takes a disjoint slice).  Install it with ``apt-get install -y wrk``.

Each round measures the three targets, in a rotating order, for the same
duration and connection count; every meshrelay measurement starts a fresh
node on an empty data dir.  The medians over the rounds are reported with the
ratios to the baseline's median.

    python bench/deposit.py --duration 30 --connections 32 --rounds 5

Envelopes: ``duration x --max-rate`` envelopes are signed up front (one file,
reused by every measurement, since each starts on an empty store), spread over
mailboxes and senders so that no cap is reached with the default caps
(at most 128 per mailbox, 8 per (sender, mailbox)).  The bench nodes keep every
default except ``limits.clock_skew = 3600``, so envelopes signed at the start
are still fresh for a run of up to an hour.

Every meshrelay measurement is checked: all answers were 200 with
``duplicate: false``, and the node's ``meshrelay_dm_deposit_total{outcome="accepted"}``
equals the number of 200s wrk saw (plus at most the requests in flight when wrk
stopped).  A measurement that ran out of envelopes is invalid and the tool
exits non-zero.

``--profile`` adds one more meshrelay-normal measurement with ``py-spy record``
attached to the node (``pip install py-spy``) and writes a flame graph and the
top functions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common

HERE = os.path.dirname(os.path.abspath(__file__))
LUA = os.path.join(HERE, "deposit.lua")
TARGETS = ("baseline", "normal", "full", "policies")
#: the stamp difficulty of the "policies" target (the node's check costs the same at any difficulty)
POLICY_BITS = 4
#: --set section.key=value overrides for the meshrelay nodes (experiments)
SETTINGS: dict[str, Any] = {}


def parse_setting(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or key.count(".") != 1 or key.split(".")[0] not in ("node", "limits"):
        raise argparse.ArgumentTypeError(f"expected node.KEY=VALUE or limits.KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def start_target(target: str, workdir: str, run_id: str) -> tuple[common.Server, int | None]:
    if target == "baseline":
        port = common.free_port()
        server = common.Server(
            f"baseline-{run_id}",
            workdir,
            port,
            [sys.executable, os.path.join(HERE, "baseline_app.py"), str(port)],
        )
        return server.start(), None
    if target == "policies":
        server, admin = start_target("normal", workdir, "policies-" + run_id)
        with open(os.path.join(workdir, "policies.jsonl")) as fh:
            for line in fh:
                status, body = common.request(server.port, "POST", "/api/mesh/dm/policy", json.loads(line))
                if status != 200:
                    raise SystemExit(f"setting a policy failed: {status} {body}")
        return server, admin
    data_dir = os.path.join(workdir, f"data-{run_id}")
    sections: dict[str, dict[str, Any]] = {"node": {}, "limits": {"clock_skew": 3600}}
    for key, value in SETTINGS.items():
        section, _, name = key.partition(".")
        sections.setdefault(section, {})[name] = value
    server, admin = common.meshrelay_node(
        workdir, f"{target}-{run_id}", data_dir, durability=target, node=sections["node"], limits=sections["limits"]
    )
    return server.start(), admin


def write_policy_files(workdir: str, n: int, ts: int, ttl: int) -> None:
    """The "policies" target's input: every mailbox has a ``stamps`` policy; 3 envelopes in 4 carry a
    stamp (stranger mail), 1 in 4 a permit for its sender (contact mail).  Written beside the
    plain envelope file, as ``envelopes-policies.jsonl`` and ``policies.jsonl``."""
    from meshrelay import policy as P

    pop = common.Population(n)
    with open(os.path.join(workdir, "policies.jsonl"), "w") as fh:
        for key in pop.mailboxes:
            fh.write(
                json.dumps(
                    P.make_policy(key, version=1, mode="stamps", difficulty=POLICY_BITS, stranger_cap=1000, ts=ts)
                )
            )
            fh.write("\n")
    permits: dict[tuple[int, int], str] = {}
    with open(os.path.join(workdir, "envelopes-policies.jsonl"), "w") as fh:
        for i, (mi, msg_id, text) in enumerate(pop.envelopes(ts, ttl)):
            si = (i // pop.m) % pop.s
            if i % 4 == 0:
                if (mi, si) not in permits:
                    permit = P.make_permit(pop.mailboxes[mi], pop.sender_b64[si], ts + 2 * ttl, 0)
                    permits[(mi, si)] = json.dumps(permit, separators=(",", ":"))
                extra = ',"permit":' + permits[(mi, si)]
            else:
                extra = ',"stamp":"' + P.solve_stamp(msg_id, POLICY_BITS) + '"'
            fh.write(text[:-1] + extra + "}\n")


def run_wrk(port: int, envelope_file: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        "wrk",
        "-t",
        str(args.threads),
        "-c",
        str(args.connections),
        "-d",
        f"{args.duration}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        LUA,
        f"http://127.0.0.1:{port}",
        "--",
        envelope_file,
        str(args.threads),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.duration + 120, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("WRKJSON "):
            return dict(json.loads(line[len("WRKJSON ") :]))
    raise RuntimeError(f"wrk printed no result (rc={out.returncode}):\n{out.stdout}\n{out.stderr}")


def check_counts(target: str, server: common.Server, admin: int | None, res: dict[str, Any], conns: int) -> list[str]:
    """Problems with a measurement (empty when it is valid)."""
    problems = []
    if res["overrun"]:
        problems.append(f"ran out of envelopes ({res['overrun']} threads): raise --max-rate")
    if res["non200"] or res["duplicate"] or res["ok"] != res["requests"]:
        problems.append(f"answers other than 200/duplicate:false: {res}")
    if target == "baseline":
        status, body = common.request(server.port, "GET", "/count")
        stored = int(body["count"])
    else:
        assert admin is not None
        samples = common.parse_metrics(common.metrics_text(admin))
        stored = int(samples.get('meshrelay_dm_deposit_total{outcome="accepted"}', 0))
        others = {
            k: v for k, v in samples.items() if k.startswith("meshrelay_dm_deposit_total{") and "accepted" not in k
        }
        if any(others.values()):
            problems.append(f"deposits with other outcomes: {others}")
        batch_n = samples.get("meshrelay_store_commit_batch_size_count", 0.0)
        res["commit_batches"] = int(batch_n)
        res["mean_commit_batch"] = (
            round(samples.get("meshrelay_store_commit_batch_size_sum", 0.0) / batch_n, 2) if batch_n else 0
        )
    res["stored"] = stored
    # wrk stops with up to one request in flight per connection: sent, not counted
    if not res["ok"] <= stored <= res["ok"] + conns:
        problems.append(f"stored {stored} but wrk saw {res['ok']} accepted")
    return problems


def measure(target: str, workdir: str, run_id: str, envelope_file: str, args: argparse.Namespace) -> dict[str, Any]:
    stats_path = os.path.join(workdir, f"stats-{target}-{run_id}.json")
    if args.instrument and target != "baseline":
        os.environ["MESHRELAY_BENCH_STATS"] = stats_path
        os.environ["MESHRELAY_BENCH_PRELUDE"] = f"import sys; sys.path.insert(0, {HERE!r}); import instrument_node"
    server, admin = start_target(target, workdir, run_id)
    os.environ.pop("MESHRELAY_BENCH_PRELUDE", None)
    server_pid = server.pid
    try:
        # The node's CPU includes its store writer process (a child).
        cpu0 = common.tree_cpu_seconds(server.pid)
        threads0 = common.thread_cpu_seconds(server.pid)
        res = run_wrk(server.port, envelope_file, args)
        cpu1 = common.tree_cpu_seconds(server.pid)
        threads1 = common.thread_cpu_seconds(server.pid)
        res["rss_mb"] = round(common.tree_rss_mb(server.pid), 1)
        problems = check_counts(target, server, admin, res, args.connections)
    finally:
        server.stop()
    secs = res["duration_us"] / 1e6
    res["target"] = target
    res["rps"] = res["requests"] / secs if secs else 0.0
    res["server_cpu_s"] = round(cpu1 - cpu0, 2)
    res["server_cpu_us_per_req"] = round((cpu1 - cpu0) / res["requests"] * 1e6, 1) if res["requests"] else None
    res["problems"] = problems
    if args.instrument and os.path.exists(stats_path):
        with open(stats_path) as fh:
            st = json.load(fh)
        if st["writer_batches"]:
            res["writer_batch_wall_ms"] = round(1000 * st["writer_wall_s"] / st["writer_batches"], 2)
            res["writer_batch_cpu_ms"] = round(1000 * st["writer_cpu_s"] / st["writer_batches"], 2)
        # (deposits are verified inside the writer's batches; the verifier serves polls and acks)
        if st["verify_items"]:
            res["verify_wall_us_per_item"] = round(1e6 * st["verify_wall_s"] / st["verify_items"], 1)
            res["verify_cpu_us_per_item"] = round(1e6 * st["verify_cpu_s"] / st["verify_items"], 1)
            res["verify_mean_batch"] = round(st["verify_items"] / st["verify_batches"], 2)
    # CPU per request of the main (reactor) thread and of all other threads together
    main = threads1.get(server_pid, 0.0) - threads0.get(server_pid, 0.0)
    n = max(1, res["requests"])
    res["reactor_cpu_us_per_req"] = round(main / n * 1e6, 1)
    res["other_threads_cpu_us_per_req"] = round(((cpu1 - cpu0) - main) / n * 1e6, 1)
    if not args.keep:
        shutil.rmtree(os.path.join(workdir, f"data-{run_id}"), ignore_errors=True)
    return res


def profile_run(workdir: str, envelope_file: str, args: argparse.Namespace) -> dict[str, Any]:
    """One meshrelay-normal measurement with py-spy attached; writes an SVG and collapsed stacks."""
    pyspy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(pyspy):
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    server, admin = start_target("normal", workdir, "profile")
    out_dir = os.path.abspath(args.profile_dir)
    os.makedirs(out_dir, exist_ok=True)
    collapsed = os.path.join(out_dir, "deposit-normal.collapsed.txt")
    svg = os.path.join(out_dir, "deposit-normal.svg")
    try:
        spies = [
            subprocess.Popen(
                [
                    pyspy,
                    "record",
                    "--pid",
                    str(server.pid),
                    "--duration",
                    str(args.duration),
                    "--rate",
                    "250",
                    "--threads",
                    "--nonblocking",
                    *args.profile_args.split(),
                    "--format",
                    fmt,
                    "--output",
                    path,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for fmt, path in (("raw", collapsed), ("flamegraph", svg))
        ]
        time.sleep(1.0)
        res = run_wrk(server.port, envelope_file, args)
        for spy in spies:
            spy.wait(args.duration + 60)
    finally:
        server.stop()
    res["collapsed"] = collapsed
    res["flamegraph"] = svg
    res["top"] = top_functions(collapsed, 80)
    return res


def top_functions(collapsed_path: str, n: int) -> dict[str, Any]:
    """Sample shares from py-spy's collapsed stacks: per thread, and self/inclusive on the reactor thread.

    Shares are of the reactor (MainThread) samples, which is the thread that
    holds the GIL for almost all of a deposit's Python work.
    """
    self_counts: dict[str, int] = {}
    incl: dict[str, int] = {}
    per_thread: dict[str, int] = {}
    total = main_total = 0
    with open(collapsed_path) as fh:
        for line in fh:
            stack, _, count_text = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            count = int(count_text)
            frames = stack.split(";")
            thread = frames[0]
            per_thread[thread] = per_thread.get(thread, 0) + count
            total += count
            if "MainThread" not in thread:
                continue
            main_total += count
            for f in set(frames[1:]):
                incl[f] = incl.get(f, 0) + count
            self_counts[frames[-1]] = self_counts.get(frames[-1], 0) + count

    def top(d: dict[str, int], of: int) -> list[tuple[str, float]]:
        return [(k, round(100.0 * v / max(1, of), 1)) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:n]]

    return {
        "samples": total,
        "threads": top(per_thread, total),
        "reactor_samples": main_total,
        "reactor_self_pct": top(self_counts, main_total),
        "reactor_inclusive_pct": top(incl, main_total),
    }


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for target in TARGETS:
        runs = [r for r in results if r["target"] == target and not r["problems"]]
        if not runs:
            continue
        summary[target] = {
            "runs": len(runs),
            "rps_median": round(common.median([r["rps"] for r in runs]), 1),
            "rps_all": [round(r["rps"], 1) for r in runs],
            "p50_ms_median": round(common.median([r["p50_us"] for r in runs]) / 1000, 2),
            "p99_ms_median": round(common.median([r["p99_us"] for r in runs]) / 1000, 2),
            "cpu_us_per_req_median": common.median([r["server_cpu_us_per_req"] for r in runs]),
            "rss_mb_median": common.median([r["rss_mb"] for r in runs]),
        }
        if target != "baseline":
            summary[target]["mean_commit_batch_median"] = common.median([r["mean_commit_batch"] for r in runs])
    base = summary.get("baseline", {}).get("rps_median")
    for target in ("normal", "full", "policies"):
        if base and target in summary:
            summary[target]["ratio_to_baseline"] = round(summary[target]["rps_median"] / base, 3)
    if "normal" in summary and "policies" in summary:
        # The cost of first contact's checks: the same node, envelopes checked by policy, permit and stamp.
        summary["policies"]["ratio_to_normal"] = round(
            summary["policies"]["rps_median"] / summary["normal"]["rps_median"], 3
        )
    return summary


def print_summary(summary: dict[str, Any], args: argparse.Namespace) -> None:
    print()
    print(
        f"deposits: {args.duration}s x {args.rounds} rounds, {args.connections} connections, "
        f"{args.threads} wrk threads (medians)"
    )
    print(f"{'target':<10} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'cpu us/req':>10} {'ratio':>7}  target ratio")
    goals = {"normal": ">= 0.60 (aim 0.75)", "full": ">= 0.45", "policies": ">= 0.95 x normal (ratio_to_normal)"}
    for target in TARGETS:
        s = summary.get(target)
        if s is None:
            print(f"{target:<10} (no valid run)")
            continue
        ratio = s.get("ratio_to_baseline")
        print(
            f"{target:<10} {s['rps_median']:>9.0f} {s['p50_ms_median']:>8.2f} {s['p99_ms_median']:>8.2f} "
            f"{s['cpu_us_per_req_median']:>10} {'' if ratio is None else f'{ratio:.3f}':>7}  {goals.get(target, '')}"
        )
    if "ratio_to_normal" in summary.get("policies", {}):
        print(f"policies / normal (first contact's checks): {summary['policies']['ratio_to_normal']:.3f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=int, default=30, help="seconds per measurement (default 30)")
    p.add_argument("--connections", type=int, default=32, help="keep-alive connections (default 32)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (default 1: leave the second core to the node)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of baseline/normal/full (default 5)")
    p.add_argument("--targets", default=",".join(TARGETS), help="subset of baseline,normal,full")
    p.add_argument("--max-rate", type=int, default=12000, help="envelopes signed per second of duration")
    p.add_argument("--out", default=os.path.join(HERE, "results", "deposit.json"), help="JSON result file")
    p.add_argument("--profile", action="store_true", help="add a py-spy profiled meshrelay-normal measurement")
    p.add_argument(
        "--profile-args", default="", help='extra py-spy record options, e.g. "--gil" (only GIL holders) or "--idle"'
    )
    p.add_argument("--profile-dir", default=os.path.join(HERE, "results"), help="where --profile writes")
    p.add_argument(
        "--instrument",
        action="store_true",
        help="time the writer's and verifier's batches inside the nodes (bench/instrument_node.py; "
        "runs them with node.store_writer = thread)",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument(
        "--switch-interval",
        type=float,
        default=None,
        help="experiment: run meshrelay nodes with sys.setswitchinterval(S) (default: Python's 0.005)",
    )
    p.add_argument(
        "--set",
        type=parse_setting,
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="experiment: a config value for the meshrelay nodes, e.g. node.verify_threads=0 (repeatable)",
    )
    args = p.parse_args(argv)
    if args.instrument:
        # instrument_node patches this process's code: the writer must run in it, not in a child.
        SETTINGS["node.store_writer"] = "thread"
    SETTINGS.update(dict(args.set))
    common.SWITCH_INTERVAL = args.switch_interval
    targets = [t for t in args.targets.split(",") if t]
    if not shutil.which("wrk"):
        print("wrk is not installed: apt-get install -y wrk", file=sys.stderr)
        return 2

    workdir = tempfile.mkdtemp(prefix="meshrelay-bench-deposit-")
    try:
        n = args.duration * args.max_rate
        env_file = os.path.join(workdir, "envelopes.jsonl")
        t0 = time.monotonic()
        mean_len = common.write_envelope_file(env_file, n, int(time.time()), 86400)
        print(f"signed {n} envelopes ({mean_len} bytes of JSON each) in {time.monotonic() - t0:.1f}s")
        if "policies" in targets:
            t0 = time.monotonic()
            write_policy_files(workdir, n, int(time.time()), 86400)
            print(f"signed {n} first-contact envelopes and their policies in {time.monotonic() - t0:.1f}s")

        results: list[dict[str, Any]] = []
        for rnd in range(args.rounds):
            order = targets[rnd % len(targets) :] + targets[: rnd % len(targets)]
            for target in order:
                target_file = os.path.join(workdir, "envelopes-policies.jsonl") if target == "policies" else env_file
                res = measure(target, workdir, f"{rnd}", target_file, args)
                res["round"] = rnd
                results.append(res)
                flag = "" if not res["problems"] else "  INVALID: " + "; ".join(res["problems"])
                print(
                    f"round {rnd} {target:<9} {res['rps']:8.0f} req/s  p50 {res['p50_us'] / 1000:6.2f} ms  "
                    f"p99 {res['p99_us'] / 1000:6.2f} ms  cpu us/req: {res['server_cpu_us_per_req']} "
                    f"(reactor {res['reactor_cpu_us_per_req']})"
                    + (f"  batch {res.get('mean_commit_batch')}" if target != "baseline" else "")
                    + (
                        f"  [writer batch {res['writer_batch_wall_ms']} ms wall / {res['writer_batch_cpu_ms']} ms cpu]"
                        if "writer_batch_wall_ms" in res
                        else ""
                    )
                    + (
                        f"  [verify {res['verify_wall_us_per_item']} us wall / {res['verify_cpu_us_per_item']} us cpu"
                        f" per item]"
                        if "verify_wall_us_per_item" in res
                        else ""
                    )
                    + flag,
                    flush=True,
                )
        summary = summarize(results)
        print_summary(summary, args)
        report: dict[str, Any] = {
            "benchmark": "deposit",
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": common.machine_info(),
            "params": {
                "settings": SETTINGS,
                "duration_s": args.duration,
                "connections": args.connections,
                "wrk_threads": args.threads,
                "rounds": args.rounds,
                "envelope_json_bytes": mean_len,
                "envelopes_signed": n,
            },
            "summary": summary,
            "runs": results,
        }
        if args.profile:
            prof = profile_run(workdir, env_file, args)
            report["profile"] = prof
            print(f"\nprofile ({prof['top']['samples']} samples, all threads): {prof['flamegraph']}")
            for name, pct in prof["top"]["threads"]:
                print(f"  thread {pct:5.1f}%  {name}")
            print("  reactor thread, self time:")
            for name, pct in prof["top"]["reactor_self_pct"][:20]:
                print(f"    {pct:5.1f}%  {name}")
            print("  reactor thread, inclusive time:")
            for name, pct in prof["top"]["reactor_inclusive_pct"][:60]:
                print(f"    {pct:5.1f}%  {name}")
        common.write_json(args.out, report)
        print(f"\nwrote {args.out}")
        invalid = [r for r in results if r["problems"]]
        return 1 if invalid else 0
    finally:
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
