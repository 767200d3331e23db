"""Version 5: echo suppression (docs/protocol.md section 14).

A feed page served to a peer leaves out the envelopes that peer's current
process is known to hold: what it pushed here, and what it accepted from
here.  Nothing known about an earlier incarnation of a peer is used.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from meshrelay.echo import PeerHoldings, is_token, new_token
from meshrelay.store.base import FeedItem
from tests.helpers import Identity, Mesh
from tests.test_peer_api import CHANGES, REPLICATE, PeerAPITestCase
from tests.test_replication import MeshTestCase

B = "http://b.test"
LEFT_OUT = "meshrelay_sync_echo_left_out_total"


def env_item(seq: int, msg_id: str) -> FeedItem:
    return FeedItem(seq, "envelope", "", 100, "mb", msg_id)


class PeerHoldingsTests(SynchronousTestCase):
    def test_tokens(self) -> None:
        token = new_token()
        self.assertTrue(is_token(token))
        self.assertNotEqual(token, new_token())
        for bad in ("", "x" * 21, "x" * 23, "+" * 22, None, 5, ["a" * 22]):
            self.assertFalse(is_token(bad), bad)

    def test_what_a_peer_holds_is_left_out_once_and_only_for_its_incarnation(self) -> None:
        h = PeerHoldings()
        t1, t2 = new_token(), new_token()
        h.learn(B, t1, ["m1", "m2"])
        items = [env_item(1, "m1"), FeedItem(2, "ack", "", 10, "mb", "m2"), env_item(3, "m3")]
        # another incarnation of the same peer (it restarted) is told everything
        self.assertEqual(h.leave_out(B, t2, items), items)
        self.assertEqual(h.leave_out("http://c.test", t1, items), items)
        # acks are never left out (the key m2 is an envelope's)
        self.assertEqual(h.leave_out(B, t1, items), items[1:])
        self.assertEqual(h.size(B), 1)
        # once left out, an id is forgotten: the peer's cursor is past it
        self.assertEqual(h.leave_out(B, t1, items), items)

    def test_memory_is_bounded_in_ids_and_incarnations(self) -> None:
        h = PeerHoldings(max_ids=5, max_tokens=2)
        t1, t2, t3 = new_token(), new_token(), new_token()
        h.learn(B, t1, [f"a{i}" for i in range(4)])
        h.learn(B, t2, ["b0", "b1", "b2"])  # 7 > 5: the two oldest of t1 go
        self.assertEqual(h.size(B), 5)
        kept = h.leave_out(B, t1, [env_item(i, f"a{i}") for i in range(4)])
        self.assertEqual([i.key for i in kept], ["a0", "a1"])
        h.learn(B, t3, ["c0"])  # a third incarnation: the oldest (t1, now empty) is dropped
        self.assertEqual(h.size(B), 4)
        h.learn(B, t3, [f"c{i}" for i in range(1, 10)])  # more than the bound alone
        self.assertEqual(h.size(B), 5)
        self.assertEqual(h.leave_out(B, t2, [env_item(1, "b0")]), [env_item(1, "b0")])
        h.forget(B)
        self.assertEqual(h.size(B), 0)


class EchoWireTests(PeerAPITestCase):
    """What a v5 node takes and answers: ``inc`` on pushes and pages; malformed ones refused."""

    def envs(self, n: int) -> list[dict[str, Any]]:
        return [self.sender.envelope(self.mailbox, b"m%d" % i, ts=self.now()) for i in range(n)]

    def test_a_push_with_inc_is_answered_with_this_incarnation_and_left_out_of_pages(self) -> None:
        token = new_token()
        envs = self.envs(3)
        status, body = self.peer("POST", REPLICATE + "?inc=" + token, {"envelopes": envs[:2]})
        self.assertEqual(status, 200, body)
        self.assertEqual(body["inc"], self.node.node.relay.holdings.token)
        self.assertEqual([r["status"] for r in body["results"]], ["accepted", "accepted"])
        # without inc the answer is exactly v1's
        status, body = self.peer("POST", REPLICATE, {"envelopes": envs[2:]})
        self.assertEqual(set(body), {"ok", "results"})
        # B's pages name B's incarnation: what it pushed is left out, once; other pages are whole
        for query in ("ids=1", ""):
            status, page = self.peer("GET", f"{CHANGES}?since=0&{query}")
            self.assertEqual(len(page["items"]), 3, query)
        status, page = self.peer("GET", f"{CHANGES}?since=0&ids=1&inc={new_token()}")
        self.assertEqual(len(page["items"]), 3)
        status, page = self.peer("GET", f"{CHANGES}?since=0&ids=1&inc={token}")
        self.assertEqual(status, 200, page)
        self.assertEqual([i["msg_id"] for i in page["items"]], [envs[2]["msg_id"]])
        self.assertEqual(page["more"], False)
        self.assertEqual(page["next"], 3)
        self.assertEqual(self.node.metrics.value(LEFT_OUT, peer=B), 2)
        status, page = self.peer("GET", f"{CHANGES}?since=0&inc={token}")
        self.assertEqual(len(page["items"]), 3)  # forgotten once left out: the cursor is past them

    def test_mailbox_pages_leave_nothing_out(self) -> None:
        token = new_token()
        self.peer("POST", REPLICATE + "?inc=" + token, {"envelopes": self.envs(2)})
        status, page = self.peer("GET", f"{CHANGES}?since=0&mailbox={self.mailbox.pub}&inc={token}")
        self.assertEqual((status, len(page["items"])), (200, 2))

    def test_refused_pushes_are_not_taken_as_held(self) -> None:
        token = new_token()
        good, forged = self.envs(2)
        forged["ciphertext"] = "AAAA"
        _, body = self.peer("POST", REPLICATE + "?inc=" + token, {"envelopes": [good, forged]})
        self.assertEqual([r["status"] for r in body["results"]], ["accepted", "rejected"])
        self.assertEqual(self.node.node.relay.holdings.size(B), 1)

    def test_malformed_inc_and_unknown_parameters_are_refused(self) -> None:
        env = self.envs(1)
        for query in ("inc=short", "inc=" + "+" * 22, f"inc={new_token()}&inc={new_token()}", "x=1"):
            status, body = self.peer("POST", f"{REPLICATE}?{query}", {"envelopes": env})
            self.assertEqual((status, body["error"]), (400, "bad_request"), query)
            status, body = self.peer("GET", f"{CHANGES}?since=0&ids=1&{query}")
            self.assertEqual((status, body["error"]), (400, "bad_request"), query)
        self.assertEqual(self.node.node.relay.holdings.size(B), 0)


class EchoMeshTests(MeshTestCase):
    names = ("a", "b")
    sync = {"interval": 600}

    def sync_from(self, puller: str) -> None:
        self.replication(puller).sync_now()
        self.mesh.settle()

    def left_out(self, server: str, puller: str) -> float:
        return self.metric(server, LEFT_OUT, peer=Mesh.url(puller))

    def test_pushed_envelopes_are_left_out_of_both_feeds(self) -> None:
        envs = [self.send("a", b"m%d" % i, sender=Identity()) for i in range(3)]
        self.mesh.settle()
        ids = sorted(e["msg_id"] for e in envs)
        self.assertEqual(sorted(self.live("b")), ids)
        pushes = [url for m, url in self.mesh.link("a", "b").requests if m == "POST"]
        self.assertTrue(pushes and all("?inc=" in url for url in pushes), pushes)
        # B pulls A: A learned from B's push answers that B holds them
        self.sync_from("b")
        self.assertEqual(self.left_out("a", "b"), 3)
        # A pulls B: B learned from A's pushes that A holds them
        self.sync_from("a")
        self.assertEqual(self.left_out("b", "a"), 3)
        for name in ("a", "b"):
            self.assertEqual(sorted(self.live(name)), ids)
            self.assertEqual(self.metric(name, "meshrelay_sync_items_total", peer=Mesh.url("a"), kind="envelope"), 0)

    def test_a_peer_that_lost_its_data_gets_everything_again(self) -> None:
        envs = [self.send("a", b"m%d" % i, sender=Identity()) for i in range(3)]
        self.mesh.settle()
        ids = sorted(e["msg_id"] for e in envs)
        for lost, other in (("b", "a"), ("a", "b")):
            # a fresh store at the same URL: a new process, so a new incarnation
            self.mesh.replace(lost)
            self.mesh.settle()
            self.sync_from(lost)
            self.assertEqual(sorted(self.live(lost)), ids, lost)
            # what the other side learned about the old process is not used for the new one
            self.assertEqual(self.left_out(other, lost), 0)

    def test_envelopes_refused_at_a_cap_are_listed(self) -> None:
        self.mesh.overrides = {"b": {"limits": {"per_mailbox_pending": 1}}}
        self.mesh.replace("b")  # b with a cap of one pending envelope per mailbox
        self.mesh.settle()
        self.send("a", b"one", sender=Identity())
        self.send("a", b"two", sender=Identity())
        self.mesh.settle()
        self.assertEqual(len(self.live("b")), 1)
        self.assertEqual(self.push_count("a", "b", "rejected"), 1)
        self.sync_from("b")
        self.assertEqual(self.left_out("a", "b"), 1)  # the refused one was listed to B

    def test_a_push_answer_teaches_only_well_formed_ids_under_a_well_formed_token(self) -> None:
        """A peer's answer is untrusted: junk ids (any length) and malformed tokens teach nothing."""
        push = self.peer_client("a", "b").push
        holdings = self.mesh["a"].node.relay.holdings
        b = Mesh.url("b")
        before = holdings.size(b)
        results = [
            {"msg_id": "ab" * 32, "status": "accepted"},
            {"msg_id": "x" * 5000, "status": "accepted"},
            {"msg_id": "AB" * 32, "status": "duplicate"},
            {"msg_id": "cd" * 32, "status": "rejected", "error": "mailbox_full"},
        ]
        for token in ("short", 7, None, "+" * 22):
            answer = {"ok": True, "inc": token, "results": results}
            push._answered((200, json.dumps(answer).encode()), "envelope", len(results))
        self.assertEqual(holdings.size(b), before)
        answer = {"ok": True, "inc": new_token(), "results": results}
        push._answered((200, json.dumps(answer).encode()), "envelope", len(results))
        self.assertEqual(holdings.size(b), before + 1)
