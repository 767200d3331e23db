"""Real ``twistd meshrelay`` processes: SIGHUP reload, and a peer-secret rotation under traffic."""

from __future__ import annotations

import contextlib
import http.client
import io
import os
import signal
import threading
import time
from typing import Any

import pytest
from twisted.trial.unittest import SynchronousTestCase

from meshrelay import cli
from tests.harness import NodeProcess, changes_page, wait_for
from tests.helpers import Identity

pytestmark = pytest.mark.integration

OLD = "the-old-link-secret-0123456789abcdef"
NEW = "the-new-link-secret-0123456789abcdef"


def feed_envelopes(node: NodeProcess, reader: NodeProcess, secret: str) -> set[str]:
    ids: set[str] = set()
    since = 0
    for _ in range(10000):
        page = changes_page(node, reader.url, secret, since)
        ids.update(i["envelope"]["msg_id"] for i in page["items"] if "envelope" in i)
        since = page["next"]
        if not page["more"]:
            return ids
    raise AssertionError("the feed did not end")


def log_text(node: NodeProcess) -> str:
    with open(node.log_path, "rb") as fh:
        return fh.read().decode(errors="replace")


class ReloadIntegrationTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        base = os.path.abspath(self.mktemp())
        self.a = NodeProcess(base, "a", config={"sync": {"interval": 1}})
        self.b = NodeProcess(base, "b", config={"sync": {"interval": 1}})
        for p in (self.a, self.b):
            self.addCleanup(p.stop)
        self.addCleanup(self.check_logs)

    def check_logs(self) -> None:
        for p in (self.a, self.b):
            for marker in ("Traceback", "Unhandled error", "Unhandled Error"):
                self.assertNotIn(marker, log_text(p), f"node {p.name}:\n{p.tail_log(40)}")

    def hup(self, node: NodeProcess, generation: int) -> None:
        """Rewrite ``node``'s config file, send SIGHUP, wait until it runs config ``generation``."""
        node.write_config()
        assert node.proc is not None
        node.proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: node.metric("meshrelay_config_generation") == generation,
            30,
            f"{node.name} to reload\n{node.tail_log()}",
        )

    def secret_file(self, node: NodeProcess, name: str, secret: str) -> str:
        path = os.path.join(node.dir, name)
        with open(path, "w") as fh:
            fh.write(secret + "\n")
        os.chmod(path, 0o600)
        return path

    def test_sighup_adds_a_peer_and_an_invalid_file_changes_nothing(self) -> None:
        a, b = self.a, self.b
        a.start(wait=False)
        b.start()
        a.wait_ready()
        alice, bob = Identity(), Identity()
        env = alice.envelope(bob, b"before the link", ts=int(time.time()))
        self.assertEqual(a.send(env)[0], 200)
        # A client connection open across the reload (keep-alive) keeps working.
        conn = http.client.HTTPConnection("127.0.0.1", a.port, timeout=30)
        self.addCleanup(conn.close)

        def health_on_same_connection() -> int:
            conn.request("GET", "/api/mesh/health")
            resp = conn.getresponse()
            resp.read()
            return resp.status

        self.assertEqual(health_on_same_connection(), 200)

        # What a reload would change, asked of the running node.
        a.peers = [{"url": b.url, "secret_file": self.secret_file(a, "peer-b.secret", OLD)}]
        a.write_config()
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            self.assertEqual(cli.main(["check-config", a.config_path, "--diff-running"]), 0)
        self.assertIn(f"peers[{b.url}]: (none) -> added  (applies on reload)", out.getvalue())
        self.assertNotIn(OLD, out.getvalue())

        self.hup(a, 2)
        b.peers = [{"url": a.url, "secret": OLD}]
        self.hup(b, 2)
        # B gets what A held before the link existed (sync from its new cursor) and what comes after (push).
        env2 = alice.envelope(Identity(), b"after the link", ts=int(time.time()))
        self.assertEqual(a.send(env2)[0], 200)
        wait_for(
            lambda: {env["msg_id"], env2["msg_id"]} <= feed_envelopes(b, a, OLD),
            60,
            f"B to get A's envelopes\n{b.tail_log()}",
        )
        self.assertEqual(health_on_same_connection(), 200)
        self.assertIn("config reloaded (generation 2): applied peers[", log_text(a))

        # An invalid file: one line, the node keeps its config and serves.
        a.extra = {**a.extra, "limits": {"client_rate": -5}}
        a.write_config()
        assert a.proc is not None
        a.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: a.metric("meshrelay_config_reloads_total", outcome="failed") == 1, 30, "the failed reload")
        failed = [line for line in log_text(a).splitlines() if "config reload" in line and "failed" in line]
        self.assertEqual(len(failed), 1, failed)
        self.assertIn("still running generation 2", failed[0])
        self.assertIn("limits.client_rate", failed[0])
        self.assertEqual(a.metric("meshrelay_config_generation"), 2)
        env3 = Identity().envelope(bob, b"still serving", ts=int(time.time()))
        self.assertEqual(a.send(env3)[0], 200)
        wait_for(lambda: env3["msg_id"] in feed_envelopes(b, a, OLD), 60, "B to get the deposit after the failure")
        self.assertEqual(health_on_same_connection(), 200)

    def test_rotation_under_traffic_without_one_refusal(self) -> None:
        """The operator's procedure, by SIGHUP, with deposits on both nodes all along: no 403, all replicated."""
        a, b = self.a, self.b
        files = {}
        for node in (a, b):
            files[node.name] = (
                self.secret_file(node, "link.old.secret", OLD),
                self.secret_file(node, "link.new.secret", NEW),
            )
        a.peers = [{"url": b.url, "secret_file": files["a"][0]}]
        b.peers = [{"url": a.url, "secret_file": files["b"][0]}]
        a.start(wait=False)
        b.start()
        a.wait_ready()

        sent: list[str] = []
        errors: list[Any] = []
        stop = threading.Event()

        def traffic() -> None:
            box = Identity()
            for i in range(100000):
                if stop.is_set():
                    return
                if i % 100 == 99:
                    box = Identity()  # under per_mailbox_pending
                node = a if i % 2 else b
                env = Identity().envelope(box, b"m%d" % i, ts=int(time.time()))
                try:
                    status, body = node.send(env)
                except OSError as e:
                    errors.append(e)
                    return
                if status != 200:
                    errors.append((status, body))
                    return
                sent.append(env["msg_id"])
                time.sleep(0.02)

        worker = threading.Thread(target=traffic, daemon=True)
        worker.start()
        self.addCleanup(worker.join, 30)
        self.addCleanup(stop.set)

        def entries(node: NodeProcess, order: tuple[int, ...]) -> list[dict[str, str]]:
            ids = ("old", "new")
            return [{"id": ids[i], "secret_file": files[node.name][i]} for i in order]

        def step(order: tuple[int, ...], generation: int, first: NodeProcess) -> None:
            second = b if first is a else a
            for node in (first, second):
                other = b if node is a else a
                node.peers = [{"url": other.url, "secrets": entries(node, order)}]
                self.hup(node, generation)
                time.sleep(1.5)  # a sync interval or so with one end ahead of the other

        time.sleep(1.5)
        step((0, 1), 2, a)  # both accept the new secret, still signing with the old
        step((1, 0), 3, b)  # both sign with the new one
        for node, other in ((a, b), (b, a)):
            wait_for(
                lambda node=node, other=other: (
                    node.metric("meshrelay_peer_auth_keys_total", peer=other.url, key_id="new") > 0
                ),
                30,
                f"{node.name} to see the new key",
            )
        step((1,), 4, a)  # both drop the old one
        time.sleep(1.5)
        stop.set()
        worker.join(30)
        self.assertEqual(errors, [])
        self.assertGreater(len(sent), 20)
        want = set(sent)
        for node, reader in ((a, b), (b, a)):
            wait_for(
                lambda node=node, reader=reader: want <= feed_envelopes(node, reader, NEW),
                60,
                f"every envelope on {node.name}",
            )
        for node in (a, b):
            self.assertEqual(node.metric("meshrelay_peer_auth_failures_total"), 0, node.tail_log())
            self.assertEqual(node.metric("meshrelay_dm_replication_push_total", outcome="error"), 0)
            self.assertEqual(node.metric("meshrelay_config_reloads_total", outcome="ok"), 3)
