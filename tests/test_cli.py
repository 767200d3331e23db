"""The ``meshrelay`` command against a real ``twistd meshrelay`` node: round trip, failures, watch."""

from __future__ import annotations

import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from typing import Any

import pytest
from twisted.trial.unittest import SynchronousTestCase

from meshrelay import client as C
from meshrelay import envelope as E
from tests.adminhelpers import parse_metrics
from tests.harness import REPO, NodeProcess, http_request

pytestmark = pytest.mark.integration


def run_cli(*args: str, stdin: bytes | None = None, timeout: float = 60.0) -> subprocess.CompletedProcess[bytes]:
    """``python -m meshrelay.cli ARGS`` with this checkout on the path."""
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("MESHRELAY_NODE", None)
    env.pop("MESHRELAY_KEY", None)
    return subprocess.run(
        [sys.executable, "-m", "meshrelay.cli", *args],
        input=stdin if stdin is not None else b"",
        capture_output=True,
        env=env,
        timeout=timeout,
        cwd=REPO,
    )


def _default_sigint() -> None:
    """In a child before exec: SIGINT back to its default, whatever this process inherited."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class CLIAgainstNodeTests(SynchronousTestCase):
    def setUp(self) -> None:
        # One node per test (trial has no setUpClass); it starts in well under a second.
        self.base = tempfile.mkdtemp(prefix="meshrelay-cli-")
        self.addCleanup(shutil.rmtree, self.base, True)
        self.node = NodeProcess(self.base, "node", config={"limits": {"per_sender_pending": 3}}).start()
        self.addCleanup(self.node.stop)
        self.dir = tempfile.mkdtemp(dir=self.base)

    def keygen(self, name: str) -> tuple[str, str]:
        path = os.path.join(self.dir, name + ".key")
        r = run_cli("keygen", "--key", path)
        self.assertEqual(r.returncode, 0, r.stderr)
        return path, r.stdout.decode().strip()

    def assertCleanFailure(self, r: subprocess.CompletedProcess[bytes], *needles: str) -> str:
        """Non-zero exit, one line on stderr starting with 'meshrelay', no traceback."""
        err = r.stderr.decode()
        self.assertNotEqual(r.returncode, 0)
        self.assertNotIn("Traceback", err)
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertTrue(err.startswith("meshrelay"), err)
        for needle in needles:
            self.assertIn(needle, err)
        return err

    def pending(self, key_path: str) -> int:
        return C.NodeClient(self.node.url).count(C.Identity.load(key_path))

    def test_round_trip(self) -> None:
        """keygen for two people, send, poll (decrypt) without and with --ack, and the mailbox is empty."""
        alice_key, alice = self.keygen("alice")
        bob_key, bob = self.keygen("bob")
        self.assertEqual(stat.S_IMODE(os.stat(bob_key).st_mode), 0o600)
        r = run_cli("address", "--key", bob_key)
        self.assertEqual(r.stdout.decode().strip(), bob)
        r = run_cli("send", "--key", alice_key, "--node", self.node.url, "--to", bob, "hello bob")
        self.assertEqual(r.returncode, 0, r.stderr)
        first_id = r.stdout.decode().strip()
        self.assertEqual(len(first_id), 64)
        r = run_cli("send", "--key", alice_key, "--node", self.node.url, "--to", bob, "-", stdin=b"line 1\nline 2\n")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(self.pending(bob_key), 2)

        r = run_cli("poll", "--key", bob_key, "--node", self.node.url)
        self.assertEqual(r.returncode, 0, r.stderr)
        out = r.stdout.decode()
        self.assertIn(f"from {alice}", out)
        self.assertIn("hello bob\n", out)
        self.assertIn("line 1\nline 2\n", out)
        self.assertEqual(self.pending(bob_key), 2, "poll without --ack must not delete")

        r = run_cli("poll", "--key", bob_key, "--node", self.node.url, "--ack", "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        lines = [line for line in r.stdout.decode().splitlines() if line]
        self.assertEqual(len(lines), 2)
        self.assertIn(f'"msg_id": "{first_id}"', lines[0])
        self.assertIn('"text": "hello bob"', lines[0])
        self.assertEqual(self.pending(bob_key), 0)
        r = run_cli("poll", "--key", bob_key, "--node", self.node.url, "--ack")
        self.assertEqual((r.returncode, r.stdout), (0, b""))

    def test_first_contact(self) -> None:
        """policy set/show, permit issue/add: a stranger is refused in contacts mode, a stamp is computed in
        stamps mode (with a progress line), the contact with a permit gets through, and bob reads both."""
        owner_key, owner = self.keygen("owner")
        friend_key, friend = self.keygen("friend")
        stranger_key, _ = self.keygen("stranger")
        r = run_cli("policy", "set", "--key", owner_key, "--node", self.node.url, "--mode", "contacts")
        self.assertEqual(r.returncode, 0, r.stderr)
        r = run_cli("policy", "show", "--key", owner_key, "--node", self.node.url, "--mailbox", owner)
        self.assertIn("mode contacts", r.stdout.decode())
        self.assertCleanFailure(
            run_cli("send", "--key", stranger_key, "--node", self.node.url, "--to", owner, "hi"), "permit"
        )
        r = run_cli("permit", "issue", "--key", owner_key, "--for", friend, "--node", self.node.url)
        self.assertEqual(r.returncode, 0, r.stderr)
        token = r.stdout.decode().strip()
        self.assertEqual(run_cli("permit", "add", token, "--key", friend_key).returncode, 0)
        r = run_cli("send", "--key", friend_key, "--node", self.node.url, "--to", owner, "from a contact")
        self.assertEqual(r.returncode, 0, r.stderr)
        r = run_cli(
            "policy", "set", "--key", owner_key, "--node", self.node.url, "--mode", "stamps", "--difficulty", "12"
        )
        self.assertEqual(r.returncode, 0, r.stderr)
        r = run_cli("send", "--key", stranger_key, "--node", self.node.url, "--to", owner, "first contact")
        self.assertEqual(r.returncode, 0, r.stderr)
        r = run_cli("poll", "--key", owner_key, "--node", self.node.url)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("from a contact", r.stdout.decode())
        self.assertIn("first contact", r.stdout.decode())

    def deposit(self, env: dict[str, Any]) -> None:
        status, body = self.node.send(env)
        self.assertEqual(status, 200, body)

    def test_wrong_key_fails_cleanly(self) -> None:
        """A message not encrypted to the poller's key: one line, exit 1, not acked unless --discard-bad."""
        bob_key, bob = self.keygen("bob")
        alice, carol = C.Identity.generate(), C.Identity.generate()
        self.deposit(alice.envelope(bob, alice.seal_text(carol.address, b"for carol")))
        r = run_cli("poll", "--key", bob_key, "--node", self.node.url, "--ack")
        self.assertCleanFailure(r, "cannot decrypt", "not acked")
        self.assertEqual(r.stdout, b"")
        self.assertEqual(self.pending(bob_key), 1)
        r = run_cli("poll", "--key", bob_key, "--node", self.node.url, "--ack", "--discard-bad")
        self.assertCleanFailure(r, "cannot decrypt", "dropped")
        self.assertEqual(self.pending(bob_key), 0)

    def test_tampered_ciphertext_fails_cleanly(self) -> None:
        """A ciphertext altered (and re-signed) fails cleanly while good messages are still printed and acked."""
        bob_key, bob = self.keygen("bob")
        alice = C.Identity.generate()
        good = alice.envelope(bob, alice.seal_text(bob, b"good one"))
        env = alice.envelope(bob, alice.seal_text(bob, b"pay 10 coins"))
        ct = bytearray(E.b64u_decode(env["ciphertext"]))
        ct[len(ct) // 2] ^= 0x01
        self.deposit(E.make_envelope(alice.signing_key, bob, bytes(ct), env["ts"], env["ttl"]))
        self.deposit(good)
        r = run_cli("poll", "--key", bob_key, "--node", self.node.url, "--ack")
        self.assertCleanFailure(r, "cannot decrypt")
        self.assertIn(b"good one", r.stdout)
        self.assertNotIn(b"pay 10", r.stdout)
        self.assertEqual(self.pending(bob_key), 1)

    def test_user_mistakes_are_one_line(self) -> None:
        """Bad key file, existing key, unreachable node, bad URL, bad address: one line each, no traceback."""
        alice_key, _ = self.keygen("alice")
        _, bob = self.keygen("bob")
        garbage = os.path.join(self.dir, "garbage.key")
        fd = os.open(garbage, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"\x00\xffnot a key")
        os.close(fd)
        url = self.node.url
        cases = [
            (("send", "--key", garbage, "--node", url, "--to", bob, "x"), "not a meshrelay key file"),
            (("send", "--key", os.path.join(self.dir, "none.key"), "--node", url, "--to", bob, "x"), "no key file"),
            (("keygen", "--key", alice_key), "already exists"),
            (("send", "--key", alice_key, "--node", "http://127.0.0.1:9", "--to", bob, "x"), "cannot reach"),
            (("send", "--key", alice_key, "--node", "127.0.0.1:9", "--to", bob, "x"), "not a node URL"),
            (("send", "--key", alice_key, "--node", url, "--to", "bob@example", "x"), "not a mailbox address"),
            (("send", "--key", alice_key, "--node", url, "--to", bob, "--ttl", "5", "x"), "bad_ttl"),
            (("poll", "--key", alice_key, "--node", url, "--wait", "31"), "--wait"),
            (("poll", "--key", garbage, "--node", url), "not a meshrelay key file"),
        ]
        for args, needle in cases:
            self.assertCleanFailure(run_cli(*args), needle)

    def test_sender_cap_reports_pending_and_limit(self) -> None:
        """Over the per-sender cap, send says how many are pending of the limit."""
        alice_key, _ = self.keygen("alice")
        _, bob = self.keygen("bob")
        for i in range(3):
            r = run_cli("send", "--key", alice_key, "--node", self.node.url, "--to", bob, f"m{i}")
            self.assertEqual(r.returncode, 0, r.stderr)
        r = run_cli("send", "--key", alice_key, "--node", self.node.url, "--to", bob, "one too many")
        self.assertCleanFailure(r, "sender_cap", "3 of 3")

    def test_watch_prints_and_acks_until_interrupted(self) -> None:
        """watch prints a message sent while it waits, acks it, and exits 0 on Ctrl-C (SIGINT)."""
        alice_key, _ = self.keygen("alice")
        bob_key, bob = self.keygen("bob")
        env = dict(os.environ, PYTHONPATH=REPO)
        proc = subprocess.Popen(
            [sys.executable, "-m", "meshrelay.cli", "watch", "--key", bob_key, "--node", self.node.url, "--wait", "5"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=env,
            # Ctrl-C's default: a suite started as a background job (`cmd &` without job control,
            # as a CI wrapper may) passes SIGINT down ignored, and Python keeps it ignored.
            preexec_fn=_default_sigint,
        )
        try:
            # Send once watch's long-poll is waiting, so the wake-up path is what delivers it.
            deadline = time.monotonic() + 30
            while self.node.metric("meshrelay_waiting_polls") < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            r = run_cli("send", "--key", alice_key, "--node", self.node.url, "--to", bob, "are you there?")
            self.assertEqual(r.returncode, 0, r.stderr)
            assert proc.stdout is not None
            seen = b""
            deadline = time.monotonic() + 30
            while b"are you there?" not in seen and time.monotonic() < deadline:
                ready, _, _ = select.select([proc.stdout], [], [], 1.0)
                if ready:
                    chunk = os.read(proc.stdout.fileno(), 4096)
                    if not chunk:
                        break
                    seen += chunk
            self.assertIn(b"are you there?", seen)
            # The ack rides on the next long-poll; wait (bounded) until it has landed.
            deadline = time.monotonic() + 30
            while self.pending(bob_key) and time.monotonic() < deadline:
                time.sleep(0.1)
            self.assertEqual(self.pending(bob_key), 0)
            proc.send_signal(signal.SIGINT)
            self.assertEqual(proc.wait(30), 0)
            assert proc.stderr is not None
            self.assertNotIn(b"Traceback", proc.stderr.read())
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()

    def test_gen_secret(self) -> None:
        """gen-secret prints a fresh secret long enough for a peer, or writes it with mode 0600."""
        a, b = run_cli("gen-secret"), run_cli("gen-secret")
        self.assertEqual((a.returncode, b.returncode), (0, 0))
        self.assertNotEqual(a.stdout, b.stdout)
        self.assertGreaterEqual(len(a.stdout.strip()), 32)
        out = os.path.join(self.dir, "peer.secret")
        self.assertEqual(run_cli("gen-secret", "--out", out).returncode, 0)
        self.assertEqual(stat.S_IMODE(os.stat(out).st_mode), 0o600)
        self.assertCleanFailure(run_cli("gen-secret", "--out", out), "already exists")

    def test_status_and_metrics_on_a_real_node(self) -> None:
        """The real admin listener serves /status as HTML and counts an oversize body as an oversize deposit."""
        status, body = http_request(self.node.port, "POST", "/api/mesh/dm/send", b"{" + b" " * 70000 + b"}")
        self.assertEqual(status, 413)
        status, page = self.node.admin("/status")
        self.assertEqual(status, 200)
        self.assertIn(self.node.url.encode(), page)
        self.assertIn(b'http-equiv="refresh"', page)
        status, text = self.node.admin("/metrics")
        m = parse_metrics(text.decode())
        self.assertGreaterEqual(m[("meshrelay_dm_deposit_total", frozenset({("outcome", "oversize")}))], 1)
