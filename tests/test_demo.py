"""``meshrelay demo-mesh``: three peered nodes in one step, stopped cleanly by Ctrl-C or SIGTERM."""

from __future__ import annotations

import os
import select
import shlex
import signal
import stat
import subprocess
import sys
import time

import pytest
from twisted.trial.unittest import SynchronousTestCase

from meshrelay.client import ClientError, NodeClient
from meshrelay.config import load_config
from tests.harness import REPO

pytestmark = pytest.mark.integration


class DemoMeshTests(SynchronousTestCase):
    def start(self) -> tuple[subprocess.Popen[bytes], list[str], str]:
        self.dir = os.path.abspath(self.mktemp())
        proc = subprocess.Popen(
            [sys.executable, "-m", "meshrelay.cli", "demo-mesh", "--dir", self.dir, "--base-port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=dict(os.environ, PYTHONPATH=REPO),
        )
        self.addCleanup(self._reap, proc)
        assert proc.stdout is not None
        out = b""
        deadline = time.monotonic() + 90
        while not out.endswith(b"ready\n") and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                out += chunk
        text = out.decode()
        self.assertTrue(
            text.endswith("ready\n"), text + (proc.stderr.read().decode() if proc.poll() is not None else "")
        )  # type: ignore[union-attr]
        urls = [line.split()[1] for line in text.splitlines() if line.startswith("  node-")]
        return proc, urls, text

    def _reap(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()

    def stop(self, proc: subprocess.Popen[bytes], sig: int, urls: list[str]) -> None:
        proc.send_signal(sig)
        self.assertEqual(proc.wait(90), 0)
        assert proc.stdout is not None and proc.stderr is not None
        tail = proc.stdout.read().decode()
        for name in ("node-a", "node-b", "node-c"):
            self.assertIn(f"stopped {name}\n", tail)
        self.assertNotIn(b"Traceback", proc.stderr.read())
        for url in urls:
            with self.assertRaises(ClientError):
                NodeClient(url, timeout=2).health()

    def test_three_peered_nodes_then_ctrl_c(self) -> None:
        """Three nodes answer, each lists the other two as peers with a shared secret per link; Ctrl-C stops all."""
        proc, urls, text = self.start()
        self.assertEqual(len(urls), 3)
        for url in urls:
            self.assertEqual(NodeClient(url).health()["peers"], 2)
        configs = {}
        for name in ("node-a", "node-b", "node-c"):
            cfg = load_config(os.path.join(self.dir, name, "meshrelay.toml"))
            configs[cfg.node.public_url] = cfg
        self.assertEqual(sorted(configs), sorted(urls))
        secrets = {}
        for url, cfg in configs.items():
            self.assertEqual(sorted(p.url for p in cfg.peers), sorted(u for u in urls if u != url))
            for p in cfg.peers:
                link = frozenset((url, p.url))
                self.assertEqual(secrets.setdefault(link, p.secret), p.secret, "both ends of a link share one secret")
        self.assertEqual(len(set(secrets.values())), 3, "each link has its own secret")
        for name in os.listdir(os.path.join(self.dir, "secrets")):
            mode = stat.S_IMODE(os.stat(os.path.join(self.dir, "secrets", name)).st_mode)
            self.assertEqual(mode, 0o600)
        # The printed send line works as printed.
        send_line = next(line for line in text.splitlines() if " send " in line)
        r = subprocess.run(
            shlex.split(send_line), capture_output=True, env=dict(os.environ, PYTHONPATH=REPO), timeout=60
        )
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("poll --key", text)
        self.stop(proc, signal.SIGINT, urls)

    def test_sigterm_stops_all_three(self) -> None:
        """SIGTERM to the demo stops the three nodes cleanly too."""
        proc, urls, _ = self.start()
        self.stop(proc, signal.SIGTERM, urls)


class DemoSetupErrorTests(SynchronousTestCase):
    def test_unusable_directory_is_a_client_error(self) -> None:
        """A --dir under a plain file is one clear error, not a traceback (nothing is started)."""
        from meshrelay.demo import run_demo

        blocker = os.path.abspath(self.mktemp())
        with open(blocker, "w") as fh:
            fh.write("x")
        with self.assertRaises(ClientError) as caught:
            run_demo(os.path.join(blocker, "mesh"), 0)
        self.assertIn("cannot use", str(caught.exception))
