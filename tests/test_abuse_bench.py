"""A smoke run of the attack soak, bench/abuse.py: a few seconds per phase at a twentieth of its load."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from twisted.trial.unittest import SynchronousTestCase

from tests.harness import REPO

pytestmark = pytest.mark.integration

ATTACKS = ("acks", "nonce", "peer_nonce", "idle", "longpolls", "flood", "xff", "fetch_remote", "log_flood")


class AbuseBenchSmokeTests(SynchronousTestCase):
    def test_abuse_tool_runs_both_phases_and_every_attack(self) -> None:
        """bench/abuse.py runs a no-attack and an attack phase, sends every attack and writes its figures."""
        out = os.path.abspath(self.mktemp()) + ".json"
        proc = subprocess.run(
            [sys.executable, os.path.join(REPO, "bench", "abuse.py"), "--seconds", "4", "--scale", "0.05"]
            + ["--drain", "10", "--seed", "1", "--json", out],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=240,
        )
        # 0: every target met, 1: some missed (expected while the attacks are not fixed); 2: the tool failed
        self.assertIn(proc.returncode, (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:])
        with open(out) as fh:
            result = json.load(fh)
        base, attack = result["phases"]
        self.assertEqual(base["attacks"], [])
        self.assertEqual(attack["attacks"], list(ATTACKS))
        # without attacks every honest operation succeeds: deposits, polls, deliveries
        self.assertGreater(base["honest"]["accepted"], 0)
        self.assertEqual(base["honest"]["ok"], base["honest"]["operations"], base["honest"])
        # every attack reached the nodes; a bad peer HMAC is refused and logged at every node
        sent = {key.split(":", 1)[0] for key, n in attack["counts"].items() if n and not key.endswith(":shed")}
        self.assertLessEqual(set(ATTACKS) - {"fetch_remote"}, sent, attack["counts"])
        self.assertIn("fetch_remote_fill", sent, attack["counts"])
        self.assertGreater(attack["counts"].get("log_flood:403 forbidden", 0), 0, attack["counts"])
        for name, node in attack["nodes"].items():
            self.assertGreater(node["log_refused_lines"], 0, name)
            self.assertEqual(node["cap_bytes"], 64 * 2**20)
            self.assertGreater(node["data_bytes_max"], 0)
        self.assertIn("honest success under attack", proc.stdout)
