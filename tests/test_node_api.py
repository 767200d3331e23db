"""The client API of one in-memory node: every rule of docs/protocol.md section 4 and bad input."""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from meshrelay import envelope as E
from tests.helpers import Identity, MemNode, dump_live

SEND = "/api/mesh/dm/send"
POLL = "/api/mesh/dm/poll"
COUNT = "/api/mesh/dm/count"


class NodeTestCase(SynchronousTestCase):
    limits: dict[str, Any] = {}

    def setUp(self) -> None:
        self.n = MemNode(self.mktemp(), **self.limits)
        self.addCleanup(self.n.stop)
        self.alice, self.bob, self.carol = Identity(), Identity(), Identity()

    def now(self) -> int:
        return int(self.n.clock.seconds())

    def env(self, sender: Identity, mailbox: Identity, text: bytes = b"hi", **kw: Any) -> dict[str, Any]:
        kw.setdefault("ts", self.now())
        return sender.envelope(mailbox, text, **kw)

    def assertError(self, result: tuple[int, Any], status: int, code: str) -> None:
        got_status, body = result
        self.assertEqual((got_status, body.get("error") if isinstance(body, dict) else body), (status, code))
        self.assertIs(body["ok"], False)
        self.assertIsInstance(body["detail"], str)

    def stored_ids(self) -> list[str]:
        return list(dump_live(self.n.store, self.now())["envelopes"])

    def polled_ids(self, who: Identity, **kw: Any) -> list[str]:
        status, body = self.n.poll(who, **kw)
        self.assertEqual(status, 200, body)
        return [m["msg_id"] for m in body["messages"]]


class SendTests(NodeTestCase):
    def test_accept_then_duplicate(self) -> None:
        """A deposit answers 200 duplicate:false, the same envelope again duplicate:true."""
        env = self.env(self.alice, self.bob)
        self.assertEqual(self.n.send(env), (200, {"ok": True, "msg_id": env["msg_id"], "duplicate": False}))
        self.assertEqual(self.n.send(env), (200, {"ok": True, "msg_id": env["msg_id"], "duplicate": True}))
        self.assertEqual(self.stored_ids(), [env["msg_id"]])
        self.assertEqual(self.n.metrics.sample("meshrelay_dm_deposit_total", {"outcome": "accepted"}), 1)
        self.assertEqual(self.n.metrics.sample("meshrelay_dm_deposit_total", {"outcome": "duplicate"}), 1)
        self.assertEqual(self.n.metrics.sample("meshrelay_stored_envelopes"), 1)

    def test_bad_json(self) -> None:
        """Malformed, truncated and non-UTF-8 bodies answer 400 bad_json."""
        for raw in [b"", b"{", b'{"v": 1,', b"\xff\xff", b'{"a": NaN}', b"nul"]:
            with self.subTest(raw=raw):
                self.assertError(self.n.request("POST", SEND, raw=raw), 400, "bad_json")

    def test_wrong_media_type(self) -> None:
        """A body that is not declared application/json answers 415."""
        env = json.dumps(self.env(self.alice, self.bob)).encode()
        for ctype in ["text/plain", "application/x-www-form-urlencoded", "application/jsonx"]:
            self.assertError(
                self.n.request("POST", SEND, raw=env, headers={"Content-Type": ctype}), 415, "unsupported_media_type"
            )
        ok = self.n.request("POST", SEND, raw=env, headers={"Content-Type": "application/json; charset=utf-8"})
        self.assertEqual(ok[0], 200)

    def test_bad_shapes(self) -> None:
        """Non-objects, unknown fields and wrong types answer 400 bad_envelope."""
        env = self.env(self.alice, self.bob)
        for body in [[], "x", 5, dict(env, extra=1), dict(env, ts=str(env["ts"])), dict(env, ttl=3600.0)]:
            with self.subTest(body=body):
                self.assertError(self.n.send(body), 400, "bad_envelope")
        self.assertError(self.n.request("POST", SEND, raw=b"null"), 400, "bad_envelope")
        self.assertEqual(self.stored_ids(), [])

    def test_msg_id_mismatch(self) -> None:
        """Reusing another envelope's msg_id is refused, so a real message cannot be shadowed."""
        real = self.env(self.alice, self.bob, b"real")
        fake = dict(self.env(self.carol, self.bob, b"fake"), msg_id=real["msg_id"])
        self.assertError(self.n.send(fake), 400, "bad_envelope")
        self.assertEqual(self.n.send(real)[1]["duplicate"], False)

    def test_bad_signature(self) -> None:
        """A bit-flipped or foreign signature answers 400 bad_signature and stores nothing."""
        env = self.env(self.alice, self.bob)
        sig = bytearray(E.b64u_decode(env["sig"]))
        sig[10] ^= 0x04
        self.assertError(self.n.send(dict(env, sig=E.b64u_encode(bytes(sig)))), 400, "bad_signature")
        forged = self.env(self.carol, self.bob)
        self.assertError(self.n.send(dict(forged, sig=env["sig"])), 400, "bad_signature")
        self.assertEqual(self.stored_ids(), [])

    def test_bad_timestamp_and_ttl(self) -> None:
        """A ts outside the skew, an expired envelope or a ttl out of range answers 422."""
        self.assertError(self.n.send(self.env(self.alice, self.bob, ts=self.now() - 301)), 422, "bad_timestamp")
        self.assertError(self.n.send(self.env(self.alice, self.bob, ts=self.now() + 301)), 422, "bad_timestamp")
        self.assertError(self.n.send(self.env(self.alice, self.bob, ttl=59)), 422, "bad_ttl")
        self.assertError(self.n.send(self.env(self.alice, self.bob, ttl=259201)), 422, "bad_ttl")
        self.assertError(self.n.send(self.env(self.alice, self.bob, ts=self.now() - 200, ttl=60)), 422, "bad_timestamp")
        self.assertEqual(self.stored_ids(), [])

    def test_check_order(self) -> None:
        """Size before shape, signature before time, as 3.1 orders them."""
        big = dict(self.env(self.alice, self.bob, b"x" * 9000), extra=1)
        self.assertError(self.n.send(big), 413, "too_large")
        stale_and_forged = self.env(self.alice, self.bob, ts=self.now() - 1000)
        stale_and_forged["sig"] = self.env(self.alice, self.bob)["sig"]
        self.assertError(self.n.send(stale_and_forged), 400, "bad_signature")

    def test_ciphertext_too_large(self) -> None:
        """Ciphertext over max_message_bytes answers 413 too_large."""
        self.assertEqual(self.n.send(self.env(self.alice, self.bob, b"x" * 8192))[0], 200)
        self.assertError(self.n.send(self.env(self.alice, self.bob, b"x" * 8193)), 413, "too_large")
        self.assertEqual(self.n.metrics.sample("meshrelay_dm_deposit_total", {"outcome": "oversize"}), 1)

    def test_none_of_the_bad_inputs_answers_500(self) -> None:
        """A battery of hostile bodies gets 4xx, never 5xx, and leaves the store as it was."""
        env = self.env(self.alice, self.bob)
        self.assertEqual(self.n.send(env)[0], 200)
        bodies: list[Any] = [
            {},
            {"v": 1},
            dict(env, v=None),
            dict(env, ts=-1),
            dict(env, ts=10**400),
            dict(env, ttl=1e308),
            dict(env, mailbox=""),
            dict(env, mailbox="A" * 10000),
            dict(env, ciphertext=""),
            dict(env, sig=None),
            dict(env, msg_id=None),
            {"envelope": env},
            [env, env],
            "\u0000",
            {"\u0000": 1},
        ]
        for body in bodies:
            status, reply = self.n.send(body)
            self.assertTrue(400 <= status < 500, (body, status, reply))
            self.assertIs(reply["ok"], False)
        self.assertEqual(self.stored_ids(), [env["msg_id"]])


class CapTests(NodeTestCase):
    limits = {"per_sender_pending": 2, "per_mailbox_pending": 3}

    def test_per_sender_cap(self) -> None:
        """A third pending envelope from one sender to one mailbox answers 429 with pending and limit."""
        for i in range(2):
            self.assertEqual(self.n.send(self.env(self.alice, self.bob, b"%d" % i))[0], 200)
        status, body = self.n.send(self.env(self.alice, self.bob, b"x"))
        self.assertEqual((status, body["error"], body["pending"], body["limit"]), (429, "sender_cap", 2, 2))
        # The cap is per (sender, mailbox): alice may still write to carol.
        self.assertEqual(self.n.send(self.env(self.alice, self.carol))[0], 200)

    def test_mailbox_cap(self) -> None:
        """A mailbox holding per_mailbox_pending envelopes refuses more with mailbox_full."""
        senders = [Identity() for _ in range(4)]
        for s in senders[:3]:
            self.assertEqual(self.n.send(self.env(s, self.bob))[0], 200)
        self.assertError(self.n.send(self.env(senders[3], self.bob)), 429, "mailbox_full")

    def test_dedup_comes_before_caps(self) -> None:
        """Re-sending a stored envelope when the caps are reached still answers duplicate."""
        first = self.env(self.alice, self.bob, b"1")
        self.n.send(first)
        self.n.send(self.env(self.alice, self.bob, b"2"))
        self.assertEqual(self.n.send(first), (200, {"ok": True, "msg_id": first["msg_id"], "duplicate": True}))

    def test_ack_frees_the_cap(self) -> None:
        """Acking pending envelopes lets the sender write again."""
        ids = [self.n.send(self.env(self.alice, self.bob, b"%d" % i))[1]["msg_id"] for i in range(2)]
        self.assertError(self.n.send(self.env(self.alice, self.bob, b"x")), 429, "sender_cap")
        self.polled_ids(self.bob, ack=ids)
        self.assertEqual(self.n.send(self.env(self.alice, self.bob, b"x"))[0], 200)

    def test_expired_envelopes_do_not_count(self) -> None:
        """Envelopes past their ttl no longer count toward the caps, even before the sweep."""
        for i in range(2):
            self.n.send(self.env(self.alice, self.bob, b"%d" % i, ttl=60))
        self.n.clock.advance(61)
        self.assertEqual(self.n.send(self.env(self.alice, self.bob, b"later"))[0], 200)


class StorageCapTests(NodeTestCase):
    # room for one envelope and, once it is acked, its tombstone and signed ack beside the next one
    limits = {"max_stored_bytes": 2500}

    def test_storage_full_keeps_polls_and_acks_working(self) -> None:
        """Over max_stored_bytes deposits answer 429 storage_full; polls and acks still work."""
        first = self.env(self.alice, self.bob, b"x" * 1000)
        self.assertEqual(self.n.send(first)[0], 200)
        self.assertError(self.n.send(self.env(self.carol, self.bob, b"y" * 1000)), 429, "storage_full")
        self.assertEqual(self.polled_ids(self.bob, ack=[first["msg_id"]]), [])
        self.assertEqual(self.n.send(self.env(self.carol, self.bob, b"y" * 1000))[0], 200)


class JunkAckTests(NodeTestCase):
    # a junk budget of 64 KiB / 8 = 8 KiB: about 113 tombstones of ids never held (72 bytes each on SQLite)
    limits = {"max_stored_bytes": 64 * 1024}

    def test_junk_ack_flood_does_not_cost_a_peer_relayed_early_ack_its_tombstone(self) -> None:
        """After client junk acks spend the junk budget, a peer's ack arriving before its replica still stops it."""
        for n in range(4):
            junk = [f"{n:08x}{i:056x}" for i in range(100)]
            self.assertEqual(self.n.poll(Identity(), ack=junk)[0], 200)
        # the client share is spent: a client's own early ack gets no tombstone any more
        stray = self.env(self.alice, self.carol)
        self.n.poll(self.carol, ack=[stray["msg_id"]])
        self.assertEqual(self.successResultOf(self.n.relay.accept_replicas([stray]))[0]["status"], "accepted")
        # bob acked this message at a peer; his ack reaches this node before the replica does
        env = self.env(self.alice, self.bob)
        early = self.bob.poll_body(ts=self.now(), ack=[env["msg_id"]])
        self.assertEqual(self.successResultOf(self.n.relay.accept_acks([early])), [{"status": "applied"}])
        results = self.successResultOf(self.n.relay.accept_replicas([env]))
        self.assertEqual(results, [{"msg_id": env["msg_id"], "status": "duplicate"}])
        self.assertEqual(self.polled_ids(self.bob), [])
        self.assertLessEqual(self.n.store.stats().bytes, 64 * 1024)


class PollTests(NodeTestCase):
    def test_arrival_order_limit_and_has_more(self) -> None:
        """Messages come oldest first, at most limit, with has_more when more are pending."""
        senders = [Identity() for _ in range(5)]
        ids = [self.n.send(self.env(s, self.bob, b"m"))[1]["msg_id"] for s in senders]
        status, body = self.n.poll(self.bob, limit=3)
        self.assertEqual([m["msg_id"] for m in body["messages"]], ids[:3])
        self.assertIs(body["has_more"], True)
        status, body = self.n.poll(self.bob)
        self.assertEqual([m["msg_id"] for m in body["messages"]], ids)
        self.assertIs(body["has_more"], False)

    def test_polling_does_not_delete(self) -> None:
        """Delivery is at-least-once: polling twice returns the same messages."""
        env = self.env(self.alice, self.bob)
        self.n.send(env)
        self.assertEqual(self.polled_ids(self.bob), [env["msg_id"]])
        self.assertEqual(self.polled_ids(self.bob), [env["msg_id"]])

    def test_returns_the_envelope_as_sent(self) -> None:
        """A polled envelope is byte-for-byte the fields that were deposited."""
        env = self.env(self.alice, self.bob, b"\x00\xffbinary")
        self.n.send(env)
        self.assertEqual(self.n.poll(self.bob)[1]["messages"], [env])

    def test_acks_apply_first(self) -> None:
        """Acked ids are deleted before the messages are chosen, in the same request."""
        a = self.env(self.alice, self.bob, b"1")
        b = self.env(self.carol, self.bob, b"2")
        self.n.send(a)
        self.n.send(b)
        self.assertEqual(self.polled_ids(self.bob, ack=[a["msg_id"]]), [b["msg_id"]])
        self.assertEqual(self.n.metrics.sample("meshrelay_dm_acks_total"), 1)

    def test_acked_message_is_never_delivered_again(self) -> None:
        """An acked envelope re-sent answers duplicate and never comes back."""
        env = self.env(self.alice, self.bob)
        self.n.send(env)
        self.polled_ids(self.bob, ack=[env["msg_id"]])
        self.assertEqual(self.n.send(env), (200, {"ok": True, "msg_id": env["msg_id"], "duplicate": True}))
        self.assertEqual(self.polled_ids(self.bob), [])
        self.assertEqual(self.stored_ids(), [])

    def test_ack_of_another_mailbox_deletes_nothing(self) -> None:
        """Bob acking an id of Carol's mailbox neither deletes nor blocks Carol's message."""
        for_carol = self.env(self.alice, self.carol)
        self.n.send(for_carol)
        self.polled_ids(self.bob, ack=[for_carol["msg_id"]])
        self.assertEqual(self.polled_ids(self.carol), [for_carol["msg_id"]])
        # Acked-by-the-wrong-mailbox before it even arrived: still not blocked.
        later = self.env(self.alice, self.carol, b"later")
        self.polled_ids(self.bob, ack=[later["msg_id"]])
        self.assertEqual(self.n.send(later)[1]["duplicate"], False)
        self.assertIn(later["msg_id"], self.polled_ids(self.carol))

    def test_ack_of_unknown_id_is_fine(self) -> None:
        """Acking ids that are not stored is not an error, and blocks them for this mailbox."""
        env = self.env(self.alice, self.bob)
        self.assertEqual(self.polled_ids(self.bob, ack=[env["msg_id"], "0" * 64]), [])
        self.assertEqual(self.n.send(env)[1]["duplicate"], True)

    def test_bad_signature(self) -> None:
        """A poll signed by another key, or with a changed ack list, is bad_signature."""
        body = self.bob.poll_body(ts=self.now())
        body["sig"] = self.carol.poll_body(ts=self.now())["sig"]
        self.assertError(self.n.request("POST", POLL, body), 400, "bad_signature")
        acked = self.bob.poll_body(ts=self.now(), ack=["a" * 64])
        acked["ack"] = ["b" * 64]
        self.assertError(self.n.request("POST", POLL, acked), 400, "bad_signature")

    def test_unsigned_fields_may_vary(self) -> None:
        """limit, wait and fetch_remote are not signed."""
        body = self.bob.poll_body(ts=self.now(), limit=7, fetch_remote=False)
        self.assertEqual(self.n.request("POST", POLL, body)[0], 200)

    def test_stale_poll(self) -> None:
        """A poll ts outside the skew answers 403 stale."""
        self.assertError(self.n.poll(self.bob, ts=self.now() - 301), 403, "stale")
        self.assertError(self.n.poll(self.bob, ts=self.now() + 301), 403, "stale")

    def test_replayed_poll(self) -> None:
        """The same poll body twice answers 403 replayed the second time, and acks nothing twice."""
        env = self.env(self.alice, self.bob)
        self.n.send(env)
        body = self.bob.poll_body(ts=self.now())
        self.assertEqual(self.n.request("POST", POLL, body)[0], 200)
        self.assertError(self.n.request("POST", POLL, body), 403, "replayed")
        self.assertError(self.n.request("POST", COUNT, body), 403, "replayed")

    def test_nonce_scope_is_per_mailbox(self) -> None:
        """Two mailboxes may use the same nonce."""
        nonce = b"\x01" * 16
        self.assertEqual(self.n.request("POST", POLL, self.bob.signed(ts=self.now(), nonce=nonce))[0], 200)
        self.assertEqual(self.n.request("POST", POLL, self.carol.signed(ts=self.now(), nonce=nonce))[0], 200)

    def test_replay_refused_after_restart(self) -> None:
        """A nonce used before a restart is still refused after it (the store remembers it)."""
        body = self.bob.poll_body(ts=self.now())
        self.assertEqual(self.n.request("POST", POLL, body)[0], 200)
        self.n.stop()
        again = MemNode(self.n.config.node.data_dir, clock=self.n.clock, config=self.n.config)
        self.addCleanup(again.stop)
        self.assertError(again.request("POST", POLL, body), 403, "replayed")

    def test_bad_poll_bodies(self) -> None:
        """Unknown fields, wrong types and bad values in a poll answer 400 bad_request."""
        base = self.bob.poll_body(ts=self.now())
        for change in [{"extra": 1}, {"limit": 0}, {"limit": 1000}, {"wait": 31}, {"wait": -1}, {"ack": [1]}]:
            with self.subTest(change=change):
                self.assertError(self.n.request("POST", POLL, dict(base, **change)), 400, "bad_request")
        self.assertError(self.n.request("POST", POLL, [base]), 400, "bad_request")
        self.assertError(self.n.request("POST", POLL, raw=b"{"), 400, "bad_json")

    def test_too_many_ack_ids(self) -> None:
        """More than 500 ack ids is bad_request; exactly 500 is fine."""
        ids = [f"{i:064x}" for i in range(501)]
        self.assertError(self.n.request("POST", POLL, self.bob.poll_body(ts=self.now(), ack=ids)), 400, "bad_request")
        self.assertEqual(self.n.request("POST", POLL, self.bob.poll_body(ts=self.now(), ack=ids[:500]))[0], 200)


class CountTests(NodeTestCase):
    def test_count(self) -> None:
        """count answers the number of pending envelopes and uses up its nonce."""
        for s in (self.alice, self.carol):
            self.n.send(self.env(s, self.bob))
        body = self.bob.poll_body(ts=self.now())
        self.assertEqual(self.n.request("POST", COUNT, body), (200, {"ok": True, "count": 2}))
        self.assertError(self.n.request("POST", COUNT, body), 403, "replayed")

    def test_count_refuses_acks(self) -> None:
        """A count with acks is bad_request and deletes nothing."""
        env = self.env(self.alice, self.bob)
        self.n.send(env)
        body = self.bob.poll_body(ts=self.now(), ack=[env["msg_id"]])
        self.assertError(self.n.request("POST", COUNT, body), 400, "bad_request")
        self.assertEqual(self.stored_ids(), [env["msg_id"]])

    def test_count_excludes_expired(self) -> None:
        """Expired envelopes are not counted."""
        self.n.send(self.env(self.alice, self.bob, ttl=60))
        self.n.clock.advance(60)
        self.assertEqual(self.n.request("POST", COUNT, self.bob.poll_body(ts=self.now()))[1]["count"], 0)


class HealthAndRoutingTests(NodeTestCase):
    def test_health(self) -> None:
        """health answers version and peer count and reveals no mailbox data."""
        status, body = self.n.request("GET", "/api/mesh/health")
        self.assertEqual(status, 200)
        self.assertEqual(set(body), {"ok", "version", "peers"})
        self.assertEqual(body["peers"], 0)

    def test_unknown_route_and_method(self) -> None:
        """Unknown paths answer a JSON 404 and wrong methods a JSON 405."""
        self.assertError(self.n.request("GET", "/nothing"), 404, "not_found")
        self.assertError(self.n.request("GET", SEND), 405, "method_not_allowed")
        self.assertError(self.n.request("POST", "/api/mesh/health", {}), 405, "method_not_allowed")


class LongPollTests(NodeTestCase):
    def test_woken_by_a_deposit(self) -> None:
        """A waiting poll is answered as soon as an envelope for its mailbox arrives."""
        d = self.n.start_request("POST", POLL, self.bob.poll_body(ts=self.now(), wait=30))
        self.n.http.flush()
        self.assertEqual(self.n.relay.waiting, 1)
        self.assertNoResult(d)
        # A deposit for another mailbox does not wake it.
        self.n.send(self.env(self.alice, self.carol))
        self.assertNoResult(d)
        env = self.env(self.alice, self.bob)
        self.n.send(env)
        status, body = self.n.result(d)
        self.assertEqual((status, [m["msg_id"] for m in body["messages"]]), (200, [env["msg_id"]]))
        self.assertEqual(self.n.relay.waiting, 0)

    def test_times_out_empty(self) -> None:
        """A waiting poll with no arrival answers an empty list when wait runs out."""
        d = self.n.start_request("POST", POLL, self.bob.poll_body(ts=self.now(), wait=5))
        self.n.http.flush()
        self.n.clock.advance(4.9)
        self.assertNoResult(d)
        self.n.clock.advance(0.2)
        self.assertEqual(self.n.result(d), (200, {"ok": True, "messages": [], "has_more": False}))
        self.assertEqual(self.n.relay.waiting, 0)
        self.assertEqual(self.n.clock.getDelayedCalls(), [c for c in self.n.clock.getDelayedCalls() if c.active()])

    def test_pending_messages_answer_at_once(self) -> None:
        """With something pending, a poll with wait answers immediately."""
        env = self.env(self.alice, self.bob)
        self.n.send(env)
        status, body = self.n.poll(self.bob, wait=30)
        self.assertEqual([m["msg_id"] for m in body["messages"]], [env["msg_id"]])

    def test_disconnect_unregisters(self) -> None:
        """Cancelling a waiting poll (client gone) removes its waiter and its timer."""
        before = len(self.n.clock.getDelayedCalls())
        d = self.n.relay.poll(self.bob.poll_body(ts=self.now(), wait=30))
        self.assertEqual(self.n.relay.waiting, 1)
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual(self.n.relay.waiting, 0)
        self.assertEqual(len(self.n.clock.getDelayedCalls()), before)
        self.assertEqual(self.n.metrics.sample("meshrelay_waiting_polls"), 0)

    def test_waiting_polls_are_bounded(self) -> None:
        """Past max_waiting_polls a long-poll answers 429 rate_limited."""
        n = MemNode(self.mktemp(), max_waiting_polls=2)
        self.addCleanup(n.stop)
        waiting = [n.relay.poll(Identity().poll_body(ts=self.now(), wait=30)) for _ in range(2)]
        self.assertEqual(n.relay.waiting, 2)
        self.assertError(n.request("POST", POLL, self.bob.poll_body(ts=self.now(), wait=30)), 429, "rate_limited")
        # A poll without wait is still served.
        self.assertEqual(n.request("POST", POLL, self.bob.poll_body(ts=self.now()))[0], 200)
        for d in waiting:
            d.cancel()
            self.failureResultOf(d)

    def test_woken_by_a_replica(self) -> None:
        """An envelope arriving by replication wakes the waiting poll too."""
        d = self.n.relay.poll(self.bob.poll_body(ts=self.now(), wait=30))
        self.assertNoResult(d)
        env = self.env(self.alice, self.bob)
        results = self.successResultOf(self.n.relay.accept_replicas([env]))
        self.assertEqual(results, [{"msg_id": env["msg_id"], "status": "accepted"}])
        self.assertEqual([json.loads(m)["msg_id"] for m in self.successResultOf(d)["messages"]], [env["msg_id"]])


class ExpiryTests(NodeTestCase):
    def test_expired_messages_are_not_delivered_and_are_swept(self) -> None:
        """Past ts + ttl an envelope is not delivered, and the sweeper deletes it."""
        env = self.env(self.alice, self.bob, ts=self.now() - 30, ttl=60)
        self.n.send(env)
        self.n.clock.advance(30)
        self.assertEqual(self.polled_ids(self.bob), [])
        self.assertEqual(self.n.store.stats().envelopes, 1)
        self.n.clock.advance(self.n.config.node.sweep_interval)
        self.assertEqual(self.n.store.stats().envelopes, 0)
        self.assertEqual(self.n.metrics.sample("meshrelay_expired_total", {"kind": "envelopes"}), 1)
        self.assertEqual(self.n.metrics.sample("meshrelay_stored_envelopes"), 0)

    def test_the_tombstone_gauge_follows_the_store(self) -> None:
        """meshrelay_stored_tombstones is the store's tombstone count, set by the expiry sweep."""
        envs = [self.env(self.alice, self.bob, b"%d" % i) for i in range(2)]
        for env in envs:
            self.n.send(env)
        self.polled_ids(self.bob, ack=[envs[0]["msg_id"], "7" * 64])
        self.assertEqual(self.n.metrics.sample("meshrelay_stored_tombstones"), 0)
        self.n.clock.advance(self.n.config.node.sweep_interval)
        self.assertEqual(self.n.metrics.sample("meshrelay_stored_tombstones"), 2)
        self.polled_ids(self.bob, ack=[envs[1]["msg_id"]])
        self.n.clock.advance(self.n.config.node.sweep_interval)
        self.assertEqual(self.n.metrics.sample("meshrelay_stored_tombstones"), 3)
        lim = self.n.config.limits
        self.n.clock.advance(lim.max_ttl + 2 * lim.clock_skew + self.n.config.node.sweep_interval)
        self.assertEqual(self.n.metrics.sample("meshrelay_stored_tombstones"), 0)

    def test_tombstones_expire_after_their_lifetime(self) -> None:
        """A tombstone lives ack ts + max_ttl + 2 x skew, then the sweeper removes it."""
        env = self.env(self.alice, self.bob)
        self.n.send(env)
        self.polled_ids(self.bob, ack=[env["msg_id"]])
        lim = self.n.config.limits
        self.n.clock.advance(lim.max_ttl + 2 * lim.clock_skew - 1)
        self.assertEqual(len(dump_live(self.n.store, self.now())["tombstones"]), 1)
        self.n.clock.advance(2 + self.n.config.node.sweep_interval)
        self.assertGreaterEqual(self.n.metrics.sample("meshrelay_expired_total", {"kind": "tombstones"}), 1)
