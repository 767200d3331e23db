"""Wire v4 (docs/protocol.md 13): signed acks carry the ids the relaying node held.

The tombstone guarantee for real messages (issue 10): an ack that reaches a
node before the envelope it acks must still stop that envelope, even when
clients and peers have spent the node's junk budget on acks of made-up ids.
The node that deleted the message says so (``held``); its peers tombstone
those ids outside the junk budget.
"""

from __future__ import annotations

from typing import Any

from meshrelay import protocol as W
from meshrelay.store.base import tombstone_key
from tests.helpers import Identity, Mesh, dump_live, tkeys
from tests.test_peer_api import ACK, BODIES, CHANGES, PeerAPITestCase
from tests.test_replication import MeshTestCase

#: a junk budget of 64 KiB / 8 for clients (about 113 tombstones of ids never held, 72 bytes each on SQLite)
#: and 64 KiB / 4 in all
CAP = 64 * 1024


def junk_ids(tag: str, n: int, count: int = 100) -> list[str]:
    return [f"{ord(tag):02x}{n:06x}{i:056x}" for i in range(count)]


class HeldAckMeshTests(MeshTestCase):
    limits = {"max_stored_bytes": CAP, "per_mailbox_pending": 1000, "per_sender_pending": 1000}
    sync = {"interval": 600}

    def spend_junk(self) -> None:
        """Throwaway mailboxes ack made-up ids at B (its client share) and at A (relayed: B's peer share)."""
        for name in ("b", "a"):
            for n in range(4):
                status, _ = self.poll(name, Identity(), ack=junk_ids(name, n))
                self.assertEqual(status, 200)
        self.mesh.settle()
        # Both shares are spent: an unattested ack relayed by a peer gets no tombstone at B any more.
        carol, made_up = Identity(), junk_ids("x", 0, 1)[0]
        late = carol.poll_body(ts=self.now(), ack=[made_up])
        self.assertEqual(self.successResultOf(self.mesh["b"].relay.accept_acks([late])), [{"status": "applied"}])
        self.assertNotIn(tombstone_key(carol.pub, made_up), self.tombstones("b"))

    def deposit_missing_at_b(self) -> dict[str, Any]:
        """Bob's message, deposited at C, reaches A but not B (C's link to B is down)."""
        self.mesh.set_mode("c", "b", "down")
        env = self.send("c")
        self.mesh.settle()
        self.assertIn(env["msg_id"], self.live("a"))
        self.assertNotIn(env["msg_id"], self.live("b"))
        return env

    def assert_late_replica_stopped_at_b(self, env: dict[str, Any]) -> None:
        key = (self.bob.pub, env["msg_id"])
        self.assertIn(tombstone_key(*key), self.tombstones("b"))
        # the tombstone is not junk: B serves it as held in its turn
        self.assertEqual(self.successResultOf(self.mesh["b"].store.held_tombstones([key])), {key})
        results = self.successResultOf(self.mesh["b"].relay.accept_replicas([env]))
        self.assertEqual(results, [{"msg_id": env["msg_id"], "status": "duplicate"}])
        status, body = self.poll("b")
        self.assertEqual((status, body["messages"]), (200, []))

    def converge(self) -> None:
        for src in self.mesh.names:
            for dst in self.mesh.names:
                if src != dst:
                    self.mesh.set_mode(src, dst, "up")
        self.mesh.advance(1300, step=100)
        for name in self.mesh.names:
            self.assertEqual(self.live(name), [], name)

    def test_a_pushed_ack_with_held_ids_stops_the_late_replica_when_junk_is_spent(self) -> None:
        """Bob acks at A what A held; A's push says so; B tombstones it though its junk budget is spent."""
        env = self.deposit_missing_at_b()
        self.spend_junk()
        self.mesh.set_mode("a", "c", "down")  # C keeps its copy for now: the late replica's source
        status, body = self.poll("a", ack=[env["msg_id"]])
        self.assertEqual(status, 200)
        self.mesh.settle()
        self.assertNotIn(env["msg_id"], self.live("a"))
        self.assert_late_replica_stopped_at_b(env)
        self.converge()

    def test_a_synced_ack_brings_its_held_ids_too(self) -> None:
        """The same when B gets the ack by pulling A's feed (the push failed): bodies with held."""
        env = self.deposit_missing_at_b()
        self.spend_junk()
        self.mesh.set_mode("a", "c", "down")
        self.mesh.set_mode("a", "b", "down")  # A's push of the ack fails; sync repairs it
        self.assertEqual(self.poll("a", ack=[env["msg_id"]])[0], 200)
        self.mesh.settle()
        self.assertNotIn(tombstone_key(self.bob.pub, env["msg_id"]), self.tombstones("b"))
        self.mesh.set_mode("a", "b", "up")
        self.mesh.advance(700, step=100)  # B's next pull of A
        self.assert_late_replica_stopped_at_b(env)
        self.converge()

    def test_fetch_remote_pages_carry_held_ids(self) -> None:
        """A v1-form changes page (fetch_remote, mailbox=) from a v4 peer carries held lists as well."""
        env = self.deposit_missing_at_b()
        self.spend_junk()
        self.mesh.set_mode("a", "c", "down")
        self.mesh.set_mode("a", "b", "down")
        self.assertEqual(self.poll("a", ack=[env["msg_id"]])[0], 200)
        self.mesh.settle()
        self.mesh.set_mode("a", "b", "up")
        status, body = self.poll("b", fetch_remote=True)
        self.assertEqual(status, 200)
        self.assert_late_replica_stopped_at_b(env)


class V3PeerTests(MeshTestCase):
    """A v4 node never sends a held list to a peer that speaks only v1-v3, and still converges with it."""

    def setUp(self) -> None:
        self.mesh = Mesh(self.mktemp(), names=("a", "b", "c"), sync={"interval": 600}, v3_only=("b",))
        self.addCleanup(self.mesh.stop)
        self.mesh.settle()
        self.bob = Identity()
        self.alice = Identity()

    def test_acks_reach_a_v3_peer_without_held_and_converge(self) -> None:
        env = self.send("c")
        self.mesh.settle()
        self.mesh.set_mode("a", "b", "down")
        self.assertEqual(self.poll("a", ack=[env["msg_id"]])[0], 200)
        self.mesh.settle()
        self.mesh.set_mode("a", "b", "up")
        # B pulls A (as v3: no held asked), A pulls B (B says v1-v3: no held asked)
        self.mesh.advance(1300, step=100)
        for name in ("a", "b", "c"):
            self.assertEqual(self.live(name), [], name)
            self.assertIn(tombstone_key(self.bob.pub, env["msg_id"]), self.tombstones(name))
        # bob acks another message at A while every link is up: pushed to B without held
        errors, ok = self.push_count("a", "b", "error"), self.push_count("a", "b", "ok")
        env2 = self.send("a")
        self.mesh.settle()
        self.assertEqual(self.poll("a", ack=[env2["msg_id"]])[0], 200)
        self.mesh.settle()
        self.assertEqual(self.live("b"), [])
        self.assertEqual(self.mesh.held_offers, [])
        self.assertEqual(self.push_count("a", "b", "error"), errors)
        self.assertEqual(self.push_count("a", "b", "ok"), ok + 2)  # the envelope, then its ack


class HeldWireTests(PeerAPITestCase):
    """What a v4 node serves and takes: held lists in pushes, changes pages and bodies; malformed ones refused."""

    limits = {"max_stored_bytes": CAP}

    def ack_from_peer(self, ack: dict[str, Any]) -> dict[str, Any]:
        status, body = self.peer("POST", ACK, {"acks": [ack]})
        self.assertEqual(status, 200)
        return body["results"][0]  # type: ignore[no-any-return]

    def test_malformed_held_lists_are_refused_per_ack(self) -> None:
        """held must list distinct msg_ids of the ack's own ids; anything else is bad_request, nothing applied."""
        ids = junk_ids("m", 0, 3)
        base = self.mailbox.poll_body(ts=self.now(), ack=ids)
        for held in ("x", [ids[0], ids[0]], [junk_ids("n", 0, 1)[0]], ["NOT-HEX"], [1], {"a": 1}):
            with self.subTest(held=held):
                result = self.ack_from_peer(dict(base, held=held))
                self.assertEqual(result, {"status": "rejected", "error": "bad_request"})
        # Unhashable items (in held, or in the ack list beside a held list): refused the same way,
        # not a failed request (they once raised TypeError while the held list was checked).
        for held, ack in (([[ids[0]]], ids), ([{"id": ids[0]}], ids), ([ids[0]], [*ids, [ids[1]]]), ([ids[0]], [{}])):
            with self.subTest(held=held, ack=ack):
                result = self.ack_from_peer(dict(base, held=held, ack=ack))
                self.assertEqual(result, {"status": "rejected", "error": "bad_request"})
        self.assertEqual(dump_live(self.node.store, self.now())["tombstones"], [])

    def test_a_forged_ack_with_held_ids_changes_nothing(self) -> None:
        ids = junk_ids("f", 0, 2)
        forged = dict(Identity().poll_body(ts=self.now(), ack=ids), mailbox=self.mailbox.pub, held=ids)
        self.assertEqual(self.ack_from_peer(forged), {"status": "rejected", "error": "bad_signature"})
        self.assertEqual(dump_live(self.node.store, self.now())["tombstones"], [])

    def test_held_ids_are_tombstoned_outside_the_junk_budget(self) -> None:
        # spend every junk share with peer acks of made-up ids
        for n in range(8):
            self.ack_from_peer(Identity().poll_body(ts=self.now(), ack=junk_ids("j", n)))
        ids = junk_ids("h", 0, 4)
        ack = dict(self.mailbox.poll_body(ts=self.now(), ack=ids), held=ids[:2])
        self.assertEqual(self.ack_from_peer(ack), {"status": "applied"})
        ours = set(tkeys(*((self.mailbox.pub, m) for m in ids)))
        tombs = dump_live(self.node.store, self.now())["tombstones"]
        self.assertEqual(
            [k for k in tombs if k in ours], tkeys(*((self.mailbox.pub, m) for m in ids[:2])), "only the attested ids"
        )
        self.assertLessEqual(self.node.store.stats().bytes, CAP)

    def test_changes_and_bodies_serve_held_lists_to_a_caller_that_asks(self) -> None:
        env = self.sender.envelope(self.mailbox, ts=self.now())
        self.assertEqual(self.node.send(env)[0], 200)
        made_up = junk_ids("z", 0, 1)[0]
        status, _ = self.node.poll(self.mailbox, ack=[env["msg_id"], made_up])
        self.assertEqual(status, 200)
        # v1 form with held=1: the ack item carries the id this node held, not the made-up one
        status, page = self.peer("GET", CHANGES + "?since=0&held=1")
        self.assertEqual(status, 200)
        (item,) = [i for i in page["items"] if "ack" in i]
        self.assertEqual(item["ack"]["held"], [env["msg_id"]])
        # without it: the signed ack exactly as signed
        status, page = self.peer("GET", CHANGES + "?since=0")
        (item,) = [i for i in page["items"] if "ack" in i]
        self.assertNotIn("held", item["ack"])
        key = {"mailbox": self.mailbox.pub, "nonce": item["ack"]["nonce"]}
        status, body = self.peer("POST", BODIES, {"envelopes": [], "acks": [key], "held": True})
        self.assertEqual((status, body["acks"][0]["held"]), (200, [env["msg_id"]]))
        status, body = self.peer("POST", BODIES, {"envelopes": [], "acks": [key]})
        self.assertNotIn("held", body["acks"][0])
        # the served list round-trips through the parser a puller uses
        self.assertEqual(W.split_held(item["ack"] | {"held": [env["msg_id"]]})[1], (env["msg_id"],))

    def test_bad_held_flags_are_400(self) -> None:
        for target in (CHANGES + "?since=0&held=2", CHANGES + "?since=0&held=1&held=1"):
            with self.subTest(target=target):
                status, body = self.peer("GET", target)
                self.assertEqual((status, body["error"]), (400, "bad_request"))
        status, body = self.peer("POST", BODIES, {"envelopes": [], "acks": [], "held": 1})
        self.assertEqual((status, body["error"]), (400, "bad_request"))
