"""Regression tests for the bugs the chaos test and the soak found (each names the bug it pins)."""

from __future__ import annotations

from twisted.internet.defer import Deferred

from meshrelay.envelope import verify_signature
from tests.helpers import Identity, Mesh
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
        self.held: list[tuple[Deferred[bool], bool]] = []

    def verify(self, key: bytes, sig: bytes, msg: bytes) -> Deferred[bool]:
        d: Deferred[bool] = Deferred()
        self.held.append((d, verify_signature(key, sig, msg)))
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
