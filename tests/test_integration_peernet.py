"""Two real ``twistd meshrelay`` nodes peering through a real SOCKS5 proxy (Debian's dante), and over TLS.

- SOCKS5: both nodes dial each other only through ``danted`` on loopback (``node.peer_proxy``),
  by the host *name* ``localhost``, which the proxy resolves. Push, sync and ack go through it;
  with the proxy stopped the errors are counted and sync catches up once it is back.
- TLS: B serves its public listener as ``ssl:`` with a certificate from a CA made here; A
  verifies it with ``ca_file``. With the wrong CA the link is refused and counted, and nothing
  crashes; with the right one push and sync work.

``danted`` comes from the ``dante-server`` package (``.ci/run`` installs it): outside CI the proxy
test is skipped when it is missing; in CI (``CI=true``) it fails instead.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from typing import Any

import pytest
from twisted.trial.unittest import SynchronousTestCase

from tests.harness import NodeProcess, free_port, wait_for
from tests.helpers import Identity, link_secret
from tests.tlsca import TestCA

pytestmark = pytest.mark.integration

DANTED = shutil.which("danted") or (os.path.exists("/usr/sbin/danted") and "/usr/sbin/danted") or None


def answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


class Dante:
    """``danted`` on 127.0.0.1:<port>, no authentication, CONNECT to loopback only."""

    def __init__(self, directory: str) -> None:
        assert DANTED is not None
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        self.port = free_port()
        self.log_path = os.path.join(directory, "danted.log")
        self.conf = os.path.join(directory, "danted.conf")
        with open(self.conf, "w") as fh:
            fh.write(
                f"logoutput: {self.log_path}\n"
                f"internal: 127.0.0.1 port = {self.port}\n"
                "external: lo\n"
                "socksmethod: none\n"
                "clientmethod: none\n"
                "client pass {\n  from: 127.0.0.0/8 to: 0.0.0.0/0\n}\n"
                "socks pass {\n  from: 127.0.0.0/8 to: 127.0.0.0/8\n  command: connect\n  protocol: tcp\n"
                "  log: connect\n}\n"
            )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"socks5h://127.0.0.1:{self.port}"

    def start(self) -> None:
        out = open(os.path.join(self.dir, "danted.out"), "ab")
        # its own session: danted forks helpers, and stop() ends the whole group it made
        self.proc = subprocess.Popen(
            [DANTED, "-f", self.conf, "-p", os.path.join(self.dir, "danted.pid"), "-N", "1"],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        out.close()
        wait_for(lambda: answers(self.port) or self.proc is None or self.proc.poll() is not None, 30, "danted")
        if self.proc.poll() is not None:
            raise RuntimeError(f"danted exited with {self.proc.returncode}: {self.tail()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            # the whole group: a relaying child would otherwise keep an open session alive
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(15)
        self.proc = None
        wait_for(lambda: not answers(self.port), 15, "danted to stop listening")

    def tail(self) -> str:
        for name in ("danted.out", "danted.log"):
            try:
                with open(os.path.join(self.dir, name), "rb") as fh:
                    return fh.read()[-2000:].decode(errors="replace")
            except OSError:
                pass
        return ""


class TwoNodes(SynchronousTestCase):
    """Helpers shared by the two tests: deposits, reads, metrics, logs."""

    nodes: list[NodeProcess]

    def wait(self, predicate: Any, what: str, timeout: float = 60) -> None:
        """:func:`wait_for`, failing with the nodes' log tails."""
        try:
            wait_for(predicate, timeout, what)
        except AssertionError as e:
            tails = "\n".join(f"--- {p.name}\n{p.tail_log(25)}" for p in self.nodes)
            raise AssertionError(f"{e}\n{tails}") from None

    def node_logs_clean(self) -> None:
        for p in self.nodes:
            with open(p.log_path, "rb") as fh:
                text = fh.read().decode(errors="replace")
            for marker in ("Traceback", "Unhandled error", "Unhandled Error"):
                self.assertNotIn(marker, text, f"node {p.name} logged {marker!r}:\n{p.tail_log(60)}")

    def deposit(self, node: NodeProcess, box: Identity) -> str:
        env = Identity().envelope(box, os.urandom(16), ts=int(time.time()))
        status, body = node.send(env)
        self.assertEqual(status, 200, body)
        return str(env["msg_id"])

    def held(self, node: NodeProcess, box: Identity) -> set[str]:
        status, body = node.poll(box.poll_body(ts=int(time.time())))
        self.assertEqual(status, 200, body)
        return {m["msg_id"] for m in body["messages"]}

    def ack(self, node: NodeProcess, box: Identity, ids: set[str]) -> None:
        status, body = node.poll(box.poll_body(ts=int(time.time()), ack=sorted(ids)))
        self.assertEqual(status, 200, body)


@pytest.mark.skipif(
    DANTED is None and os.environ.get("CI") != "true",
    reason="danted (Debian package dante-server) is not installed; .ci/run installs it",
)
class SocksProxyTests(TwoNodes):
    def setUp(self) -> None:
        if DANTED is None:
            self.fail("CI=true but danted is missing: .ci/run must apt-get install dante-server")
        base = os.path.abspath(self.mktemp())
        self.proxy = Dante(os.path.join(base, "dante"))
        self.proxy.start()
        self.addCleanup(self.proxy.stop)
        # Both nodes dial only through the proxy, by a host name the proxy resolves.
        config = {"node": {"peer_proxy": self.proxy.url}, "sync": {"interval": 2, "push_timeout": 5}}
        self.a = NodeProcess(base, "a", config=config)
        self.b = NodeProcess(base, "b", config=config)
        self.nodes = [self.a, self.b]
        for p in self.nodes:
            p.url = f"http://localhost:{p.port}"
        self.a.peers = [{"url": self.b.url, "secret": link_secret("a", "b")}]
        self.b.peers = [{"url": self.a.url, "secret": link_secret("a", "b")}]
        self.addCleanup(self.node_logs_clean)
        for p in self.nodes:
            p.start(wait=False)
            self.addCleanup(p.stop)
        for p in self.nodes:
            p.wait_ready()

    def test_push_sync_and_ack_through_the_proxy_and_catch_up_after_it_was_down(self) -> None:
        a, b, bob = self.a, self.b, Identity()
        # Start-up sync both ways, through the proxy.
        self.wait(lambda: a.metric("meshrelay_sync_pull_total", peer=b.url, outcome="ok") > 0, "A's first sync")
        self.wait(lambda: b.metric("meshrelay_sync_pull_total", peer=a.url, outcome="ok") > 0, "B's first sync")

        # Push: a deposit at A reaches B.
        first = self.deposit(a, bob)
        self.wait(lambda: a.metric("meshrelay_dm_replication_push_total", peer=b.url, outcome="ok") >= 1, "A's push")
        self.wait(lambda: first in self.held(b, bob), "the deposit at B")
        # Ack at B: the ack goes back through the proxy and A forgets the message.
        self.ack(b, bob, {first})
        self.wait(lambda: first not in self.held(a, bob), "the ack at A")

        # The proxy goes away: pushes and pulls fail, and are counted.
        self.proxy.stop()
        push_errors = a.metric("meshrelay_dm_replication_push_total", peer=b.url, outcome="error")
        pull_errors = b.metric("meshrelay_sync_pull_total", peer=a.url, outcome="error")
        second = self.deposit(a, bob)
        self.wait(
            lambda: a.metric("meshrelay_dm_replication_push_total", peer=b.url, outcome="error") > push_errors,
            "A's push to B to fail and be counted",
        )
        self.wait(
            lambda: b.metric("meshrelay_sync_pull_total", peer=a.url, outcome="error") > pull_errors,
            "B's sync from A to fail and be counted",
        )
        self.assertNotIn(second, self.held(b, bob))
        self.assertTrue(a.running and b.running)

        # It comes back (same port): B's sync brings what the failed push could not.
        self.proxy.start()
        self.wait(lambda: second in self.held(b, bob), "B's sync to catch up through the proxy")
        self.ack(b, bob, {second})
        self.wait(lambda: second not in self.held(a, bob), "the second ack at A")
        # The peers really went through danted: it logged their connections to the nodes' ports.
        with open(self.proxy.log_path, "rb") as fh:
            dante_log = fh.read().decode(errors="replace")
        self.assertIn(f".{b.port}", dante_log)
        self.assertIn(f".{a.port}", dante_log)


class TLSPeerTests(TwoNodes):
    def setUp(self) -> None:
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        self.base = base
        ca = TestCA()
        self.ca_path = ca.write_ca(os.path.join(base, "ca.pem"))
        self.wrong_ca_path = TestCA("some other CA").write_ca(os.path.join(base, "wrong-ca.pem"))
        key, cert = ca.issue(base)
        self.tls_port = free_port()
        # B serves its public_url over TLS on tls_port (ssl: endpoint string, loopback only);
        # the plain tcp listener on b.port is for this test's own client requests.
        self.b = NodeProcess(
            base,
            "b",
            config={
                "node": {"listen": f"ssl:{self.tls_port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"},
                # B pulls from A only at start-up: what reaches B later came by A's push, over TLS
                "sync": {"interval": 3600},
            },
        )
        self.b.url = f"https://localhost:{self.tls_port}"
        self.a = NodeProcess(base, "a", config={"sync": {"interval": 2, "push_timeout": 5}})
        self.nodes = [self.a, self.b]
        self.b.peers = [{"url": self.a.url, "secret": link_secret("a", "b")}]
        self.b.write_config = self._b_config_with_plain_listener  # type: ignore[method-assign]
        self.addCleanup(self.node_logs_clean)

    def start(self, ca_file: str) -> None:
        self.a.peers = [{"url": self.b.url, "secret": link_secret("a", "b"), "ca_file": ca_file}]
        for p in self.nodes:
            if not p.running:
                p.start(wait=False)
                self.addCleanup(p.stop)
        for p in self.nodes:
            p.wait_ready()

    def test_private_ca_verifies_and_a_wrong_ca_is_refused_and_counted(self) -> None:
        a, b, bob = self.a, self.b, Identity()
        # The wrong CA: every request to B fails its TLS handshake; counted, nothing crashes.
        self.start(self.wrong_ca_path)
        # B's one sync from A (plain http) is done: from now on only A's pushes could bring B anything.
        self.wait(lambda: b.metric("meshrelay_sync_pull_total", peer=a.url, outcome="ok") > 0, "B's sync from A")
        # Runs of A's sync while B is up (A may have tried once before B listened) fail and count.
        before = a.metric("meshrelay_sync_pull_total", peer=b.url, outcome="error")
        self.wait(
            lambda: a.metric("meshrelay_sync_pull_total", peer=b.url, outcome="error") > before,
            "A's refused sync to be counted",
        )
        lost = self.deposit(a, bob)
        self.wait(
            lambda: a.metric("meshrelay_dm_replication_push_total", peer=b.url, outcome="error") >= 1,
            "A's refused push to be counted",
        )
        self.assertEqual(a.metric("meshrelay_sync_pull_total", peer=b.url, outcome="ok"), 0)
        self.assertNotIn(lost, self.held(b, bob))
        self.assertTrue(a.running and b.running)
        self.wait(lambda: "certificate verify failed" in a.tail_log(200), "A to log why B is refused")

        # The right CA (A restarted): sync from B over TLS, and a push to B over TLS.
        a.stop()
        self.start(self.ca_path)
        self.wait(lambda: a.metric("meshrelay_sync_pull_total", peer=b.url, outcome="ok") > 0, "A's sync over TLS")
        at_b = self.deposit(b, bob)
        self.wait(lambda: at_b in self.held(a, bob), "B's deposit at A")
        pushed = self.deposit(a, bob)
        self.wait(lambda: a.metric("meshrelay_dm_replication_push_total", peer=b.url, outcome="ok") >= 1, "A's push")
        self.wait(lambda: pushed in self.held(b, bob), "A's deposit at B, pushed over TLS")

    def _b_config_with_plain_listener(self) -> None:
        NodeProcess.write_config(self.b)
        with open(self.b.config_path, "a") as fh:
            fh.write(f'\n[[listeners]]\nendpoint = "tcp:{self.b.port}:interface=127.0.0.1"\n')
