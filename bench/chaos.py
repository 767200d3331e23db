"""The chaos run, long: three real nodes through chaos proxies, minutes of load, SIGKILLs and partitions.

Run from the repository root (the nodes run this checkout's code)::

    python bench/chaos.py --minutes 5               # the long version (tests/test_chaos.py runs 60 s in CI)
    python bench/chaos.py --minutes 5 --seed 1234   # replay a run's fault schedule and client choices

It is :class:`tests.chaos.ChaosRun` (see that module for what it does and checks),
with a longer load phase and, by default, faults a little more often.  It prints
every fault as it happens, then the figures: operations by outcome, faults by
kind, what the nodes counted (pushes, replicas, pulls), how long the mesh took to
agree once healed, and every violation.  Exit status 1 when there is one.
Nodes and the proxy listen on 127.0.0.1 only; the load is bounded by
``--minutes`` and everything is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.chaos import ChaosRun, Settings


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--minutes", type=float, default=5.0, help="length of the load phase")
    p.add_argument("--seed", type=int, default=None, help="replay a run (default: a fresh random seed)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--fault-gap", type=float, nargs=2, default=(1.0, 3.0), metavar=("MIN", "MAX"))
    p.add_argument("--json", default="bench/results/chaos.json")
    p.add_argument("--keep", action="store_true", help="keep the nodes' directories and logs")
    args = p.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    workdir = tempfile.mkdtemp(prefix="meshrelay-chaos-")
    settings = Settings(
        seed=seed, load_seconds=args.minutes * 60, clients=args.clients, fault_gap=tuple(args.fault_gap)
    )
    print(f"chaos: seed {seed} (replay: --seed {seed}), {args.minutes} min, dir {workdir}", flush=True)
    run = ChaosRun(workdir, settings, say=lambda text: print(text, flush=True))
    figures = run.run()
    print("\nfigures:")
    print(json.dumps(figures, indent=2, sort_keys=True))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump({"figures": figures, "violations": run.violations, "events": run.events}, fh, indent=1)
    if run.violations:
        print(f"\n{len(run.violations)} VIOLATIONS (seed {seed}):")
        for v in run.violations:
            print(" -", v)
        print(f"kept {workdir} for the logs")
        return 1
    print(f"\nno violations (seed {seed})")
    if args.keep:
        print(f"kept {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
