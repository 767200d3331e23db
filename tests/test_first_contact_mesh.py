"""First contact across an in-memory 3-node mesh: the flood test, hostile peers, policy convergence (v3)."""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from meshrelay import policy as P
from tests.helpers import Identity, Mesh

POLICY = "/api/mesh/dm/policy"
#: low difficulty: the attacker solves a thousand stamps in the test
BITS = 4


class MeshCase(SynchronousTestCase):
    limits: dict[str, Any] = {
        "per_mailbox_pending": 40,
        "per_sender_pending": 40,
        "client_rate": 0,
        "deposit_bytes_rate": 0,
    }

    def setUp(self) -> None:
        self.mesh = Mesh(self.mktemp(), limits=self.limits)
        self.addCleanup(self.mesh.stop)
        self.owner, self.friend = Identity(), Identity()

    def now(self) -> int:
        return int(self.mesh.clock.seconds())

    def set_policy(self, node: str, version: int, **kw: Any) -> tuple[int, Any]:
        pol = P.make_policy(self.owner.key, version=version, ts=self.now(), **kw)
        return self.mesh[node].request("POST", POLICY, pol)

    def policy_at(self, node: str) -> dict[str, Any] | None:
        status, body = self.mesh[node].request("GET", POLICY + "?mailbox=" + self.owner.pub)
        self.assertEqual(status, 200)
        policy: dict[str, Any] | None = body["policy"]
        return policy

    def contact_ids(self, node: str) -> set[str]:
        """msg_ids of the owner's mailbox held at ``node`` that came from the friend."""
        store: Any = self.mesh[node].store
        rows = store._wconn.execute("SELECT body FROM envelopes WHERE mailbox = ?", (self.owner.pub,)).fetchall()
        return {json.loads(b)["msg_id"] for (b,) in rows if json.loads(b)["sender"] == self.friend.pub}


class FloodTests(MeshCase):
    def test_thousand_fresh_keys_cannot_push_out_a_contact(self) -> None:
        """1,000 fresh keys with valid stamps flood the mailbox; every contact message lands on every node.

        Fails on v1 code (and on a v3 node without buckets): the strangers fill per_mailbox_pending
        at every node and the contact's messages are refused mailbox_full.
        """
        self.assertEqual(self.set_policy("a", 1, mode="stamps", difficulty=BITS, stranger_cap=16)[0], 200)
        self.mesh.sync_all()
        for name in "abc":
            self.assertEqual((self.policy_at(name) or {}).get("version"), 1, name)
        permit = P.make_permit(self.owner.key, self.friend.pub, self.now() + 86400, 0)
        sent: list[str] = []
        nodes = "abc"
        for i in range(1000):
            attacker = Identity()
            env = attacker.envelope(self.owner, b"spam %d" % i, ts=self.now())
            env["stamp"] = P.solve_stamp(env["msg_id"], BITS)
            status, body = self.mesh[nodes[i % 3]].send(env)
            self.assertIn((status, body.get("error")), [(200, None), (429, "stranger_full")])
            if i % 40 == 0:
                # The contact writes in the middle of the flood, at varying nodes.
                mine = self.friend.envelope(self.owner, b"hello %d" % i, ts=self.now())
                mine["permit"] = permit
                status, body = self.mesh[nodes[(i // 40) % 3]].send(mine)
                self.assertEqual(status, 200, body)
                sent.append(mine["msg_id"])
            if i % 100 == 0:
                self.mesh.settle()
        self.mesh.sync_all()
        self.mesh.sync_all()
        self.assertEqual(len(sent), 25)
        for name in "abc":
            self.assertEqual(self.contact_ids(name), set(sent), name)
            count = (
                self.mesh[name]
                .store._wconn.execute(  # type: ignore[attr-defined]
                    "SELECT COUNT(*) FROM envelopes WHERE mailbox = ?", (self.owner.pub,)
                )
                .fetchone()[0]
            )
            self.assertEqual(count, 25 + 16, name)


class HostilePeerTests(MeshCase):
    def test_old_policy_replayed_by_a_peer_is_refused(self) -> None:
        """A peer pushing an older policy over a newer one gets stale_policy; the newer one stays everywhere."""
        old = P.make_policy(self.owner.key, version=1, mode="open", ts=self.now())
        self.assertEqual(self.set_policy("a", 2, mode="contacts")[0], 200)
        self.mesh.sync_all()
        results = self.successResultOf(self.mesh["b"].relay.accept_policies([old, {"mailbox": "x"}]))
        self.assertEqual([r.get("error") for r in results], ["stale_policy", "bad_policy"])
        for name in "abc":
            self.assertEqual((self.policy_at(name) or {}).get("mode"), "contacts", name)


class ConvergenceTests(MeshCase):
    def test_policy_changes_converge_across_a_partition(self) -> None:
        """Policies set on both sides of a partition converge to the highest version everywhere once it heals."""
        self.assertEqual(self.set_policy("a", 1, mode="open")[0], 200)
        self.mesh.sync_all()
        for a, b in (("a", "b"), ("a", "c")):
            self.mesh.set_mode(a, b, "down", both=True)
        self.assertEqual(self.set_policy("a", 2, mode="stamps", difficulty=BITS)[0], 200)
        self.assertEqual(self.set_policy("c", 3, mode="contacts", epoch=1)[0], 200)
        self.mesh.advance(60)
        self.assertEqual((self.policy_at("a") or {}).get("version"), 2)
        self.assertEqual((self.policy_at("b") or {}).get("version"), 3)
        for a, b in (("a", "b"), ("a", "c")):
            self.mesh.set_mode(a, b, "up", both=True)
        self.mesh.advance(120)
        for name in "abc":
            self.assertEqual((self.policy_at(name) or {}).get("version"), 3, name)
        # ... and each node enforces it: a stranger is refused everywhere.
        for name in "abc":
            env = Identity().envelope(self.owner, b"x", ts=self.now())
            self.assertEqual(self.mesh[name].send(env)[1].get("error"), "contacts_only", name)


class StrippingTests(MeshCase):
    def body_at(self, node: str, msg_id: str) -> dict[str, Any]:
        store: Any = self.mesh[node].store
        (body,) = store._wconn.execute("SELECT body FROM envelopes WHERE msg_id = ?", (msg_id,)).fetchone()
        result: dict[str, Any] = json.loads(body)
        return result

    def test_peer_before_v3_gets_v1_text_and_the_real_copy_upgrades_it(self) -> None:
        """Pushes to a peer not known to speak v3 carry no permit; the copy a fetch_remote pulls (ext=1) upgrades it."""
        a_to_c = next(p for p in self.mesh["a"].node.replication.peers if "c.test" in p.url)  # type: ignore[union-attr]
        assert a_to_c.policy_peer is not None
        a_to_c.policy_peer.stop()
        a_to_c.policy_peer.speaks_v3 = False
        self.mesh.set_mode("c", "a", "down")
        self.mesh.set_mode("c", "b", "down")
        permit = P.make_permit(self.owner.key, self.friend.pub, self.now() + 3600, 0)
        env = {**self.friend.envelope(self.owner, b"hi", ts=self.now()), "permit": permit}
        self.assertEqual(self.mesh["a"].send(env)[0], 200)
        self.mesh.settle()
        self.assertEqual(self.body_at("b", env["msg_id"])["permit"], permit)
        self.assertNotIn("permit", self.body_at("c", env["msg_id"]))
        self.mesh.set_mode("c", "a", "up")
        self.mesh.sync_all()
        # ids-first sync does not fetch what c holds; a poll with fetch_remote reads a's pages with ext=1.
        status, _ = self.mesh["c"].poll(self.owner, fetch_remote=True)
        self.assertEqual(status, 200)
        self.mesh.settle()
        self.assertEqual(self.body_at("c", env["msg_id"])["permit"], permit)
        contacts = self.mesh["c"].store._wconn.execute("SELECT COUNT(*) FROM contacts").fetchone()[0]  # type: ignore[attr-defined]
        self.assertEqual(contacts, 1)
