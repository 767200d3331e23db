"""Regression tests for the bugs found by the chaos test, the soak, and the suite runs around them (each names its bug)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import time
from collections.abc import Callable
from typing import Any

import treq
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet import reactor
from twisted.internet.defer import Deferred, TimeoutError, inlineCallbacks
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, ResponseNeverReceived

from meshrelay import cli
from meshrelay import envelope as E
from meshrelay.envelope import verify_signature
from meshrelay.replication import APPLY_DEPTH, _describe
from tests.helpers import Identity, MemNode, Mesh, make_config
from tests.test_replication import MeshTestCase


class SyncOrderTests(MeshTestCase):
    names = ("a", "b")
    sync = {"interval": 30}
    limits = {"per_sender_pending": 1}

    def test_ack_in_a_page_frees_the_cap_for_a_later_envelope_of_that_page(self) -> None:
        """A's feed holds ack(m1) then m2 (same sender, cap 1): B pulls both in one page and ends with m2, like A."""
        sender = Identity()
        m1 = self.send("a", b"one", sender=sender)
        self.mesh.settle()
        self.assertEqual(self.live("b"), [m1["msg_id"]])
        self.mesh.set_mode("a", "b", "down")  # A's pushes to B fail; B still pulls from A
        self.poll("a", ack=[m1["msg_id"]])
        m2 = self.send("a", b"two", sender=sender)
        self.mesh.settle()  # the push of m2 fails too
        self.mesh.set_mode("a", "b", "up")
        self.mesh.advance(30, step=5)
        self.assertEqual(self.live("a"), [m2["msg_id"]])
        self.assertEqual(self.live("b"), [m2["msg_id"]])
        self.assertEqual(self.metric("b", "meshrelay_dm_replica_total", outcome="drop_per_sender_cap"), 0)


class HeldVerifier:
    """A verifier whose answers wait until the test releases them, oldest first (one verifier thread)."""

    def __init__(self) -> None:
        self.held: list[tuple[Deferred[Any], bool | list[bool]]] = []

    def verify(self, key: bytes, sig: bytes, msg: bytes) -> Deferred[bool]:
        d: Deferred[bool] = Deferred()
        self.held.append((d, verify_signature(key, sig, msg)))
        return d

    def verify_many(self, items: list[tuple[bytes, bytes, bytes]]) -> Deferred[list[bool]]:
        d: Deferred[list[bool]] = Deferred()
        self.held.append((d, [verify_signature(*item) for item in items]))
        return d

    def release_all(self, mesh: Mesh) -> None:
        for _ in range(1000):
            mesh.settle()
            if not self.held:
                return
            d, ok = self.held.pop(0)
            d.callback(ok)
        raise AssertionError("verifications kept coming")


class SyncPipelineOrderTests(MeshTestCase):
    names = ("a", "b")
    sync = {"interval": 3600, "page_limit": 2}
    limits = {"per_sender_pending": 1}

    def test_acks_of_one_page_are_applied_before_envelopes_of_the_next(self) -> None:
        """A's feed [ack x, ack m1 | m2] in pages of 2: B's pipelined pull still applies both acks before m2."""
        sender, carol = Identity(), Identity()
        m1 = self.send("a", b"one", sender=sender)
        self.mesh.settle()
        self.assertEqual(self.live("b"), [m1["msg_id"]])
        self.mesh.set_mode("a", "b", "down")
        self.poll("a", who=carol, ack=["00" * 32])  # an ack of another mailbox, first in A's feed
        self.poll("a", ack=[m1["msg_id"]])
        m2 = self.send("a", b"two", sender=sender)
        self.mesh.settle()  # the push of m2 fails too
        self.mesh.set_mode("a", "b", "up")
        held = HeldVerifier()
        self.mesh["b"].relay.verifier = held  # type: ignore[assignment]
        self.peer_client("b", "a").sync_now()
        held.release_all(self.mesh)
        self.assertEqual(self.live("a"), [m2["msg_id"]])
        self.assertEqual(self.live("b"), [m2["msg_id"]])


class SyncPipelineDepthTests(MeshTestCase):
    names = ("a", "b")
    sync = {"interval": 3600}

    def test_several_pages_are_applied_at_once_and_the_cursor_moves_in_order(self) -> None:
        """While page 1 waits for its verification, pages 2 and 3 are verified too (APPLY_DEPTH), not one by one."""
        self.mesh.set_mode("a", "b", "down", both=True)
        puller = self.peer_client("b", "a").puller
        puller.ids_limit = 2
        envs = [self.send("a", b"m%d" % i, sender=Identity()) for i in range(10)]
        self.mesh.set_mode("a", "b", "up", both=True)
        held = HeldVerifier()
        self.mesh["b"].relay.verifier = held  # type: ignore[assignment]
        puller.sync_now()
        self.mesh.settle()
        self.assertEqual(len(held.held), APPLY_DEPTH)  # three pages' verifications wait at once
        self.assertEqual(self.successResultOf(self.mesh["b"].store.get_cursor(Mesh.url("a"))).since, 0)
        held.release_all(self.mesh)
        self.assertEqual(sorted(self.live("b")), sorted(e["msg_id"] for e in envs))
        cursor = self.successResultOf(self.mesh["b"].store.get_cursor(Mesh.url("a")))
        self.assertEqual(cursor.since, 10)


class _Silent(Protocol):
    """Accepts, reads, never answers (a black-holed peer)."""

    def connectionMade(self) -> None:
        self.factory.connections += 1  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.factory.received += len(data)  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.closed += 1  # type: ignore[attr-defined]


class _SilentFactory(Factory):
    protocol = _Silent
    connections = 0
    closed = 0
    received = 0


class RealClientCancelTests(TestCase):
    """Pushes through a real treq/Agent client (tests elsewhere use StubTreq, which cancels differently)."""

    def setUp(self) -> None:
        self.server = _SilentFactory()
        self.port = reactor.listenTCP(0, self.server, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(self.port.stopListening)
        # Runs after the node stopped: the server's side of every connection must be closed
        # too before the test ends (trial fails a test that leaves a socket open).
        self.addCleanup(lambda: self.wait_for(lambda: self.server.closed == self.server.connections, "closes"))
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        agent = Agent(reactor, pool=self.pool)
        client = treq.client.HTTPClient(agent)
        port = self.port.getHost().port
        tmp = self.mktemp()
        peers = [{"url": "http://b.test", "secret": "b-secret-0123456789", "connect": f"http://127.0.0.1:{port}"}]
        config = make_config(tmp, peers=peers)
        config = config.replace(sync=dataclasses.replace(config.sync, interval=3600, push_timeout=5))
        self.node = MemNode(tmp, config=config, peer_client_factory=lambda peer: client)
        self.addCleanup(lambda: self.node.node.running and self.node.stop())
        replication = self.node.node.replication
        assert replication is not None
        self.peer = replication.peers[0]

    @inlineCallbacks
    def wait_for(self, predicate: Callable[[], bool], what: str) -> Any:
        deadline = time.monotonic() + 20
        while not predicate():
            self.assertLess(time.monotonic(), deadline, f"gave up waiting for {what}")
            yield deferLater(reactor, 0.01, lambda: None)

    @inlineCallbacks
    def push_in_flight(self) -> Any:
        status, _ = self.node.send(Identity().envelope(Identity(), b"hi", ts=int(self.node.clock.seconds())))
        self.assertEqual(status, 200)
        self.node.clock.advance(0)  # the push leaves (the start-up pull too)
        yield self.wait_for(lambda: self.server.received > 0 and self.peer.push.inflight == 1, "the push on the wire")

    def warnings(self) -> list[str]:
        return [formatEvent(e) for e in self.events if e.get("log_level") == LogLevel.warn]

    @inlineCallbacks
    def test_push_timeout_is_reported_as_a_timeout(self) -> Any:
        """A push the peer never answers fails after push_timeout as "timed out", counted once as an error."""
        yield self.push_in_flight()
        self.node.clock.advance(5)
        yield self.wait_for(lambda: self.peer.push.inflight == 0, "the push to fail")
        self.assertEqual(self.peer.push._pushed["error"]._value.get(), 1)
        # The pull that started with the push timed out too; the peer is marked down once.
        [warning] = self.warnings()
        self.assertRegex(warning, r"^peer http://b.test down: (push|sync) failed: timed out$")

    @inlineCallbacks
    def test_shutdown_cancels_a_push_in_flight_quietly(self) -> Any:
        """Stopping the node with a push in flight counts no error and logs no "peer down"."""
        yield self.push_in_flight()
        self.node.stop()
        yield self.wait_for(lambda: not self.peer.transport.outstanding, "the push to be cancelled")
        self.assertEqual(self.peer.push._pushed["error"]._value.get(), 0)
        self.assertEqual(self.warnings(), [])


class DescribeTests(SynchronousTestCase):
    def test_agent_failures_are_described_by_their_reasons(self) -> None:
        """A wrapped Agent failure is logged as what went wrong, not as a list of Failure reprs."""
        wrapped = Failure(ResponseNeverReceived([Failure(ConnectionLost("gone"))]))
        self.assertEqual(_describe(wrapped), "Connection to the other side was lost in a non-clean fashion: gone.")
        self.assertEqual(_describe(Failure(TimeoutError())), "timed out")


class DashAddressTests(SynchronousTestCase):
    def test_send_to_an_address_that_starts_with_a_dash(self) -> None:
        """`meshrelay send --to -Xy...` takes the address (1 in 64 mailbox addresses start with "-")."""
        address = "-" + E.public_key_b64u(Ed25519PrivateKey.generate())[1:]
        out, err = io.StringIO(), io.StringIO()
        key = os.path.join(self.mktemp(), "none.key")
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(["send", "--key", key, "--node", "http://127.0.0.1:9", "--to", address, "hi"])
            except SystemExit as e:
                code = int(e.code or 0)
        self.assertNotEqual(code, 0)
        self.assertNotIn("expected one argument", err.getvalue())
        self.assertIn("no key file", err.getvalue())  # parsing got past --to, to the missing key
        self.assertEqual(
            cli.attach_dash_values(["send", "--to", "-a", "--", "--to", "-b"]), ["send", "--to=-a", "--", "--to", "-b"]
        )
