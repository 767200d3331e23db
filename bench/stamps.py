"""What stamps cost: solving at each difficulty, verifying, and the attacker against a first contact.

    python bench/stamps.py [--difficulties 12-20] [--samples 40] [--out bench/results/stamps.json]

Everything runs in this process on one core (the solver is single-threaded
pure Python, as ``meshrelay send`` runs it).  Printed and written as JSON:

- **solve**: for each difficulty, the wall time of ``solve_stamp`` over
  ``--samples`` envelopes (each a fresh msg_id, so each is an independent
  draw of the geometric number of tries): median and p90 in seconds, and the
  measured SHA-256 tries per second;
- **verify**: per envelope, microseconds for ``parse_stamp`` + ``stamp_work``
  (the node's whole stamp check), and for comparison one Ed25519 permit
  verification and one Argon2id evaluation at 1 MiB / 8 MiB (what a
  memory-hard stamp would cost the node per envelope, if available in the
  installed ``cryptography``);
- **attack**: the CPU an attacker spends to keep one mailbox's stranger
  bucket full for 24 hours at the default difficulty, against one first
  contact's cost (one stamp).  Expected tries are ``2^d`` per stamp; the
  attacker needs ``stranger_cap`` stamps each time the bucket empties (the
  recipient acks, or the envelopes expire at ``max_ttl`` at the latest).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from meshrelay import envelope as E  # noqa: E402
from meshrelay import policy as P  # noqa: E402


def _range(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


def bench_solve(difficulties: list[int], samples: int) -> list[dict[str, float]]:
    out = []
    for d in difficulties:
        times, tries = [], 0
        for i in range(samples):
            msg_id = hashlib.sha256(f"bench {d} {i}".encode()).hexdigest()
            t = time.perf_counter()
            stamp = P.solve_stamp(msg_id, d)
            times.append(time.perf_counter() - t)
            tries += int.from_bytes(E.b64u_decode(stamp), "big") + 1
        total = sum(times)
        row = {
            "difficulty": d,
            "median_s": statistics.median(times),
            "p90_s": _p90(times),
            "mean_s": total / samples,
            "tries_per_s": tries / total if total else 0.0,
        }
        print(
            f"difficulty {d:2d}: median {row['median_s']:.3f} s  p90 {row['p90_s']:.3f} s  "
            f"mean {row['mean_s']:.3f} s  ({row['tries_per_s'] / 1e6:.2f} M tries/s)",
            flush=True,
        )
        out.append(row)
    return out


def _per_call_us(fn: object, n: int) -> float:
    assert callable(fn)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
    return best * 1e6


def bench_verify() -> dict[str, float]:
    msg_id = hashlib.sha256(b"verify").hexdigest()
    stamp = P.solve_stamp(msg_id, 12)
    key = Ed25519PrivateKey.generate()
    permit = P.parse_permit(P.make_permit(key, E.public_key_b64u(key), 2_000_000_000, 0))
    out = {
        "stamp_check_us": _per_call_us(lambda: P.stamp_work(msg_id, P.parse_stamp(stamp)), 20000),
        "permit_verify_us": _per_call_us(lambda: P.verify_permit(permit), 2000),
    }
    try:
        from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
    except ImportError:  # older cryptography: no Argon2id to compare with
        Argon2id = None  # type: ignore[assignment,misc]
    if Argon2id is not None:
        for mib in (1, 8):

            def one(mib: int = mib) -> None:
                Argon2id(salt=b"meshrelay-stamp!", length=32, iterations=1, lanes=1, memory_cost=mib * 1024).derive(
                    msg_id.encode()
                )

            out[f"argon2id_{mib}mib_us"] = _per_call_us(one, 5)
    for k, v in out.items():
        print(f"verify {k}: {v:.1f}", flush=True)
    return out


def attack(solve: list[dict[str, float]], difficulty: int, stranger_cap: int, max_ttl: int) -> dict[str, float]:
    rate = statistics.median(r["tries_per_s"] for r in solve)
    per_stamp = 2**difficulty / rate
    day = 86400
    scenarios = {
        # the recipient never reads strangers: the bucket empties only as envelopes expire
        "refill_at_max_ttl": stranger_cap * max(1, day / max_ttl),
        # a client that polls and acks every 10 minutes
        "refill_every_10_min": stranger_cap * day / 600,
        # a client that polls and acks every minute
        "refill_every_1_min": stranger_cap * day / 60,
    }
    out: dict[str, float] = {
        "difficulty": difficulty,
        "stranger_cap": stranger_cap,
        "first_contact_cpu_s": per_stamp,
    }
    for name, stamps in scenarios.items():
        out[f"{name}_stamps"] = stamps
        out[f"{name}_cpu_s"] = stamps * per_stamp
        out[f"{name}_ratio"] = stamps
        print(
            f"attack {name}: {stamps:.0f} stamps, {stamps * per_stamp / 3600:.2f} core-hours "
            f"= {stamps:.0f} x one first contact ({per_stamp:.2f} s)",
            flush=True,
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--difficulties", type=_range, default=_range("12-20"))
    ap.add_argument("--samples", type=int, default=40)
    ap.add_argument("--stranger-cap", type=int, default=P.DEFAULT_STRANGER_CAP)
    ap.add_argument("--max-ttl", type=int, default=259200)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    solve = bench_solve(args.difficulties, args.samples)
    verify = bench_verify()
    result = {
        "solve": solve,
        "verify": verify,
        "attack": attack(solve, P.DEFAULT_DIFFICULTY, args.stranger_cap, args.max_ttl),
        "default_difficulty": P.DEFAULT_DIFFICULTY,
    }
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
