"""The peer API and its gate: intake, the changes feed, and hostile peers (docs/protocol.md sections 5-7)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from meshrelay import envelope as E
from meshrelay.config import Config, build_config
from meshrelay.peers import H_HMAC, H_NONCE, H_TS, H_URL, compute_mac, derive_key
from tests.helpers import Identity, MemNode, dump_live, tkeys

A_URL = "http://a.test"
B_URL = "http://b.test"
C_URL = "http://c.test"
SECRET_B = "secret-of-the-a-b-link-0123"
SECRET_C = "secret-of-the-a-c-link-4567"

REPLICATE = "/api/mesh/dm/replicate-envelope"
ACK = "/api/mesh/dm/ack"
CHANGES = "/api/mesh/dm/changes"


class DownClient:
    """A peer HTTP client whose peer is never reachable (this node's own pushes and pulls fail)."""

    def request(self, method: str, url: str, **kw: Any) -> Deferred[Any]:
        return fail(ConnectionRefusedError(string="no peers in this test"))


def node_config(tmpdir: str, **limits: Any) -> Config:
    return build_config(
        {
            "node": {"data_dir": tmpdir, "public_url": A_URL},
            "limits": limits,
            "sync": {"interval": 3600},
            "peers": [{"url": B_URL, "secret": SECRET_B}, {"url": C_URL, "secret": SECRET_C}],
        }
    )


class PeerAPITestCase(SynchronousTestCase):
    """A node A with peers B and C; requests are signed as B unless a test says otherwise."""

    limits: dict[str, Any] = {}

    def setUp(self) -> None:
        self.dir = self.mktemp()
        self.start_node()
        self.mailbox = Identity()
        self.sender = Identity()

    def start_node(self) -> None:
        self.node = MemNode(
            self.dir, config=node_config(self.dir, **self.limits), peer_client_factory=lambda peer: DownClient()
        )
        self.addCleanup(self.node.stop)
        self.node.clock.advance(0)  # the start-up sync attempt (fails quietly: peers are down)

    def now(self) -> int:
        return int(self.node.clock.seconds())

    def signed_headers(
        self,
        method: str,
        target: str,
        body: bytes,
        *,
        caller: str = B_URL,
        secret: str = SECRET_B,
        key_url: str | None = None,
        ts: int | None = None,
        nonce: bytes | None = None,
    ) -> dict[str, str]:
        key = derive_key(secret, key_url or caller)
        ts = self.now() if ts is None else ts
        nonce_text = E.b64u_encode(nonce if nonce is not None else os.urandom(16))
        return {
            H_URL: caller,
            H_TS: str(ts),
            H_NONCE: nonce_text,
            H_HMAC: compute_mac(key, method, target, ts, nonce_text, body),
        }

    def peer(
        self,
        method: str,
        target: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
        **sign: Any,
    ) -> tuple[int, Any]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else b"")
        hdrs = headers if headers is not None else self.signed_headers(method, target, data, **sign)
        return self.node.request(method, target, raw=data, headers=hdrs)

    def snapshot(self) -> Any:
        now = self.now()
        page = self.node.store.changes(0, 1000, now)
        items: list[Any] = []
        page.addCallback(lambda p: items.extend((i.seq, i.kind, i.body) for i in p.items))
        return dump_live(self.node.store, now), items

    def failures(self, reason: str) -> float:
        return self.node.metrics.value("meshrelay_peer_auth_failures_total", reason=reason)

    def stored_envelope(self, text: bytes = b"stored") -> dict[str, Any]:
        env = self.sender.envelope(self.mailbox, text, ts=self.now())
        status, _ = self.node.send(env)
        self.assertEqual(status, 200)
        return env


class ReplicateTests(PeerAPITestCase):
    def test_single_envelope_is_accepted_then_duplicate(self) -> None:
        """{"envelope": ...} stores a replica once; the second copy is a duplicate."""
        env = self.sender.envelope(self.mailbox, ts=self.now())
        status, body = self.peer("POST", REPLICATE, {"envelope": env})
        self.assertEqual(
            (status, body), (200, {"ok": True, "results": [{"msg_id": env["msg_id"], "status": "accepted"}]})
        )
        status, body = self.peer("POST", REPLICATE, {"envelope": env})
        self.assertEqual(body["results"], [{"msg_id": env["msg_id"], "status": "duplicate"}])
        self.assertEqual(dump_live(self.node.store, self.now())["envelopes"], [env["msg_id"]])

    def test_batch_reports_one_result_per_envelope_in_order(self) -> None:
        """A batch answers a result per envelope, rejections included, in request order."""
        good = [Identity().envelope(self.mailbox, b"x%d" % i, ts=self.now()) for i in range(3)]
        bad = dict(good[0], ciphertext=E.b64u_encode(b"tampered"))
        status, body = self.peer("POST", REPLICATE, {"envelopes": [good[0], bad, good[1], "junk", good[2]]})
        self.assertEqual(status, 200)
        self.assertEqual(
            [(r["msg_id"], r["status"], r.get("error")) for r in body["results"]],
            [
                (good[0]["msg_id"], "accepted", None),
                (good[0]["msg_id"], "rejected", "bad_envelope"),
                (good[1]["msg_id"], "accepted", None),
                (None, "rejected", "bad_envelope"),
                (good[2]["msg_id"], "accepted", None),
            ],
        )

    def test_empty_batch_answers_no_results(self) -> None:
        """{"envelopes": []} is a valid, empty batch."""
        self.assertEqual(self.peer("POST", REPLICATE, {"envelopes": []}), (200, {"ok": True, "results": []}))

    def test_replica_in_the_future_or_expired_is_rejected(self) -> None:
        """The replica time rule: not beyond skew in the future, not expired."""
        future = self.sender.envelope(self.mailbox, ts=self.now() + 301)
        expired = self.sender.envelope(self.mailbox, ts=self.now() - 4000, ttl=3600)
        old_but_live = self.sender.envelope(self.mailbox, ts=self.now() - 3000, ttl=3600)
        _, body = self.peer("POST", REPLICATE, {"envelopes": [future, expired, old_but_live]})
        self.assertEqual(
            [(r["status"], r.get("error")) for r in body["results"]],
            [("rejected", "bad_timestamp"), ("rejected", "bad_timestamp"), ("accepted", None)],
        )

    def test_bad_shapes_answer_400(self) -> None:
        """Anything but {"envelope": {...}} or {"envelopes": [...]} is 400 bad_request."""
        env = self.sender.envelope(self.mailbox, ts=self.now())
        for body in (
            {},
            [env],
            {"envelope": env, "extra": 1},
            {"envelopes": env},
            {"envelopes": [env], "envelope": env},
            {"envelopes": [env] * 501},
            "envelope",
            None,
        ):
            status, answer = self.peer("POST", REPLICATE, raw=json.dumps(body).encode())
            self.assertEqual(
                (status, answer["error"]), (400, "bad_request"), body if not isinstance(body, dict) else list(body)
            )
        self.assertEqual(dump_live(self.node.store, self.now())["envelopes"], [])

    def test_bad_json_and_media_type(self) -> None:
        """Signed but malformed bodies answer 400 bad_json / 415, never 500."""
        for raw in (b"{", b"\xff\xfe", b'{"envelope": NaN}', b'{"envelopes": [], "envelopes": []}'):
            status, answer = self.peer("POST", REPLICATE, raw=raw)
            self.assertEqual((status, answer["error"]), (400, "bad_json"), raw)
        data = b'{"envelopes": []}'
        hdrs = self.signed_headers("POST", REPLICATE, data)
        hdrs["Content-Type"] = "text/plain"
        status, answer = self.node.request("POST", REPLICATE, raw=data, headers=hdrs)
        self.assertEqual((status, answer["error"]), (415, "unsupported_media_type"))

    def test_wrong_method_is_405(self) -> None:
        """GET on a POST-only peer route is 405, not 500."""
        status, answer = self.peer("GET", REPLICATE)
        self.assertEqual(status, 405)


class HostileEnvelopeTests(PeerAPITestCase):
    def test_forged_envelope_is_refused_and_stores_nothing(self) -> None:
        """An envelope with a signature by someone else is rejected per envelope and not stored."""
        env = self.sender.envelope(self.mailbox, ts=self.now())
        impostor = Identity()
        forged = dict(env, sig=E.b64u_encode(impostor.key.sign(b"whatever")))
        before = self.snapshot()
        status, body = self.peer("POST", REPLICATE, {"envelope": forged})
        self.assertEqual(status, 200)
        self.assertEqual(body["results"], [{"msg_id": env["msg_id"], "status": "rejected", "error": "bad_signature"}])
        self.assertEqual(self.snapshot(), before)

    def test_envelope_with_a_reused_msg_id_cannot_shadow_the_real_one(self) -> None:
        """A replica whose msg_id does not match its content is refused; the real one is untouched."""
        real = self.stored_envelope(b"the real one")
        shadow = self.sender.envelope(self.mailbox, b"a shadow", ts=self.now())
        shadow["msg_id"] = real["msg_id"]
        before = self.snapshot()
        _, body = self.peer("POST", REPLICATE, {"envelope": shadow})
        self.assertEqual(body["results"][0]["status"], "rejected")
        self.assertEqual(self.snapshot(), before)
        _, polled = self.node.poll(self.mailbox)
        self.assertEqual(polled["messages"], [real])


class AckTests(PeerAPITestCase):
    def test_signed_ack_deletes_and_tombstones(self) -> None:
        """A mailbox owner's signed ack deletes its envelope; a later replica stays out."""
        env = self.stored_envelope()
        ack = self.mailbox.signed(ts=self.now(), ack=[env["msg_id"]])
        self.assertEqual(
            self.peer("POST", ACK, {"acks": [ack]}), (200, {"ok": True, "results": [{"status": "applied"}]})
        )
        live = dump_live(self.node.store, self.now())
        self.assertEqual(live["envelopes"], [])
        self.assertEqual(live["tombstones"], tkeys((self.mailbox.pub, env["msg_id"])))
        _, body = self.peer("POST", REPLICATE, {"envelope": env})
        self.assertEqual(body["results"], [{"msg_id": env["msg_id"], "status": "duplicate"}])
        self.assertEqual(dump_live(self.node.store, self.now())["envelopes"], [])

    def test_forged_ack_deletes_nothing(self) -> None:
        """An ack whose signature does not verify is rejected; nothing is deleted or tombstoned."""
        env = self.stored_envelope()
        ack = self.mailbox.signed(ts=self.now(), ack=[env["msg_id"]])
        ack["ack"] = [env["msg_id"], "0" * 64]  # changes what was signed
        before = self.snapshot()
        _, body = self.peer("POST", ACK, {"acks": [ack]})
        self.assertEqual(body["results"], [{"status": "rejected", "error": "bad_signature"}])
        self.assertEqual(self.snapshot(), before)

    def test_ack_signed_by_another_mailboxs_key_is_refused(self) -> None:
        """An ack naming mailbox M but signed by another key is rejected; M's mail stays."""
        env = self.stored_envelope()
        other = Identity()
        forged = other.signed(ts=self.now(), ack=[env["msg_id"]])
        forged["mailbox"] = self.mailbox.pub
        before = self.snapshot()
        _, body = self.peer("POST", ACK, {"acks": [forged]})
        self.assertEqual(body["results"], [{"status": "rejected", "error": "bad_signature"}])
        self.assertEqual(self.snapshot(), before)

    def test_another_mailboxs_valid_ack_deletes_nothing_of_this_mailbox(self) -> None:
        """A valid ack by mailbox M2 listing M1's msg_id neither deletes nor blocks M1's envelope."""
        env = self.stored_envelope()
        other = Identity()
        ack = other.signed(ts=self.now(), ack=[env["msg_id"]])
        _, body = self.peer("POST", ACK, {"acks": [ack]})
        self.assertEqual(body["results"], [{"status": "applied"}])
        self.assertEqual(dump_live(self.node.store, self.now())["envelopes"], [env["msg_id"]])
        _, polled = self.node.poll(self.mailbox)
        self.assertEqual(polled["messages"], [env])

    def test_ack_time_rule_and_shape(self) -> None:
        """Acks from the future or older than their tombstone, or with no ids, are rejected."""
        env = self.stored_envelope()
        future = self.mailbox.signed(ts=self.now() + 301, ack=[env["msg_id"]])
        ancient = self.mailbox.signed(ts=self.now() - 259200 - 601, ack=[env["msg_id"]])
        empty = self.mailbox.signed(ts=self.now(), ack=[])
        extra = dict(self.mailbox.signed(ts=self.now(), ack=[env["msg_id"]]), limit=5)
        before = self.snapshot()
        _, body = self.peer("POST", ACK, {"acks": [future, ancient, empty, extra, 7]})
        self.assertEqual(
            [(r["status"], r["error"]) for r in body["results"]],
            [
                ("rejected", "bad_timestamp"),
                ("rejected", "bad_timestamp"),
                ("rejected", "bad_request"),
                ("rejected", "bad_request"),
                ("rejected", "bad_request"),
            ],
        )
        self.assertEqual(self.snapshot(), before)

    def test_bad_ack_bodies_answer_400(self) -> None:
        """Anything but {"acks": [...]} (at most 500) is 400 bad_request."""
        ack = self.mailbox.signed(ts=self.now(), ack=["0" * 64])
        for body in ({}, {"acks": ack}, {"acks": [ack], "x": 1}, [ack], {"ack": [ack]}, {"acks": [ack] * 501}):
            status, answer = self.peer("POST", ACK, body)
            self.assertEqual((status, answer["error"]), (400, "bad_request"))


class ChangesTests(PeerAPITestCase):
    def test_feed_lists_envelopes_and_acks_in_seq_order(self) -> None:
        """changes returns live envelopes and signed acks with seq, next and more."""
        e1 = self.stored_envelope(b"one")
        e2 = self.stored_envelope(b"two")
        _, polled = self.node.poll(self.mailbox, ack=[e1["msg_id"]])
        status, body = self.peer("GET", CHANGES + "?since=0")
        self.assertEqual(status, 200)
        self.assertEqual(body["feed"], self.node.store.feed_id)
        self.assertEqual([set(i) for i in body["items"]], [{"seq", "envelope"}, {"seq", "ack"}])
        self.assertEqual(body["items"][0]["envelope"], e2)
        self.assertEqual(body["items"][1]["ack"]["ack"], [e1["msg_id"]])
        self.assertEqual(body["next"], body["items"][1]["seq"])
        self.assertFalse(body["more"])
        status, after = self.peer("GET", CHANGES + f"?since={body['next']}")
        self.assertEqual((after["items"], after["next"], after["more"]), ([], body["next"], False))

    def test_paging_with_limit(self) -> None:
        """limit pages the feed; more is true until the last page; the default applies without one."""
        envs = [self.stored_envelope(b"m%d" % i) for i in range(5)]
        seen: list[str] = []
        since, pages = 0, 0
        while True:
            _, body = self.peer("GET", CHANGES + f"?since={since}&limit=2")
            seen.extend(i["envelope"]["msg_id"] for i in body["items"])
            since, pages = body["next"], pages + 1
            if not body["more"]:
                break
        self.assertEqual((seen, pages), ([e["msg_id"] for e in envs], 3))
        _, body = self.peer("GET", CHANGES)
        self.assertEqual(len(body["items"]), 5)

    def test_mailbox_filter(self) -> None:
        """mailbox= returns only that mailbox's envelopes and acks."""
        mine = self.stored_envelope(b"mine")
        other = Identity()
        self.node.send(self.sender.envelope(other, b"theirs", ts=self.now()))
        _, body = self.peer("GET", CHANGES + f"?since=0&mailbox={self.mailbox.pub}")
        self.assertEqual([i["envelope"]["msg_id"] for i in body["items"]], [mine["msg_id"]])

    def test_bad_query_values_answer_400(self) -> None:
        """since, limit and mailbox are validated; unknown or repeated parameters are refused."""
        for query in (
            "since=-1",
            "since=abc",
            "since=1.5",
            "since=01",
            "since=99999999999999999999",
            "limit=0",
            "limit=501",
            "limit=",
            "limit=1&limit=2",
            "mailbox=abc",
            f"mailbox={self.mailbox.pub}A",
            "mailbox=" + E.b64u_encode(b"\x00" * 31),
            "mailbox=%FF",
            "cursor=1",
        ):
            status, body = self.peer("GET", CHANGES + "?" + query)
            self.assertEqual((status, body["error"]), (400, "bad_request"), query)

    def test_limit_bounds_are_accepted(self) -> None:
        """limit=1 and limit=500 are valid."""
        for limit in (1, 500):
            self.assertEqual(self.peer("GET", CHANGES + f"?limit={limit}")[0], 200)


class PeerAuthTests(PeerAPITestCase):
    """Every failure answers 403 forbidden, counts a reason, and changes nothing."""

    def assertRefused(self, answer: tuple[int, Any], reason: str) -> None:
        status, body = answer
        self.assertEqual((status, body["error"]), (403, "forbidden"))
        self.assertEqual(self.failures(reason), 1.0, reason)

    def body_and_state(self) -> tuple[bytes, Any]:
        env = self.sender.envelope(self.mailbox, ts=self.now())
        return json.dumps({"envelope": env}).encode(), self.snapshot()

    def test_valid_signature_is_accepted(self) -> None:
        """A correctly signed request by a configured peer passes."""
        data, _ = self.body_and_state()
        self.assertEqual(self.peer("POST", REPLICATE, raw=data)[0], 200)

    def test_no_headers(self) -> None:
        """A request with no peer headers is refused."""
        data, before = self.body_and_state()
        self.assertRefused(self.node.request("POST", REPLICATE, raw=data, headers={}), "missing_header")
        self.assertEqual(self.snapshot(), before)

    def test_no_hmac(self) -> None:
        """A request without X-Peer-HMAC is refused."""
        data, before = self.body_and_state()
        hdrs = self.signed_headers("POST", REPLICATE, data)
        del hdrs[H_HMAC]
        self.assertRefused(self.node.request("POST", REPLICATE, raw=data, headers=hdrs), "missing_header")
        self.assertEqual(self.snapshot(), before)

    def test_wrong_hmac(self) -> None:
        """A request with a wrong HMAC is refused."""
        data, before = self.body_and_state()
        hdrs = self.signed_headers("POST", REPLICATE, data)
        hdrs[H_HMAC] = "0" * 64
        self.assertRefused(self.node.request("POST", REPLICATE, raw=data, headers=hdrs), "bad_hmac")
        hdrs[H_HMAC] = "not hex"
        self.node.request("POST", REPLICATE, raw=data, headers=hdrs)
        self.assertEqual(self.failures("bad_hmac"), 2.0)
        self.assertEqual(self.snapshot(), before)

    def test_mac_covers_body_target_and_method(self) -> None:
        """A MAC made for another body, path, query or method is refused."""
        data, before = self.body_and_state()
        cases = [
            ("POST", REPLICATE, data, dict(self.signed_headers("POST", REPLICATE, b'{"envelopes":[]}'))),
            ("POST", REPLICATE, data, dict(self.signed_headers("POST", ACK, data))),
            ("POST", REPLICATE, data, dict(self.signed_headers("PUT", REPLICATE, data))),
            ("GET", CHANGES + "?since=0", b"", dict(self.signed_headers("GET", CHANGES + "?since=5", b""))),
            ("GET", CHANGES + "?since=0", b"", dict(self.signed_headers("GET", CHANGES, b""))),
        ]
        for method, target, body, hdrs in cases:
            status, answer = self.node.request(method, target, raw=body, headers=hdrs)
            self.assertEqual((status, answer["error"]), (403, "forbidden"), (method, target))
        self.assertEqual(self.failures("bad_hmac"), len(cases))
        self.assertEqual(self.snapshot(), before)

    def test_replayed_nonce(self) -> None:
        """The same signed request sent twice is refused the second time."""
        env = self.stored_envelope()
        ack = json.dumps({"acks": [self.mailbox.signed(ts=self.now(), ack=[env["msg_id"]])]}).encode()
        hdrs = self.signed_headers("POST", ACK, ack)
        self.assertEqual(self.node.request("POST", ACK, raw=ack, headers=hdrs)[0], 200)
        before = self.snapshot()
        self.assertRefused(self.node.request("POST", ACK, raw=ack, headers=hdrs), "replayed")
        self.assertEqual(self.snapshot(), before)

    def test_replayed_nonce_after_a_restart(self) -> None:
        """Nonces are kept in the store: a replay is refused after the node restarts."""
        data, _ = self.body_and_state()
        hdrs = self.signed_headers("POST", REPLICATE, data)
        self.assertEqual(self.node.request("POST", REPLICATE, raw=data, headers=hdrs)[0], 200)
        clock = self.node.clock
        self.node.stop()
        self.node = MemNode(
            self.dir, clock=clock, config=node_config(self.dir), peer_client_factory=lambda peer: DownClient()
        )
        self.addCleanup(self.node.stop)
        before = self.snapshot()
        self.assertRefused(self.node.request("POST", REPLICATE, raw=data, headers=hdrs), "replayed")
        self.assertEqual(self.snapshot(), before)

    def test_same_nonce_from_two_peers_is_two_nonces(self) -> None:
        """Nonces are per peer: B and C may (by chance) use the same one."""
        nonce = os.urandom(16)
        self.assertEqual(self.peer("GET", CHANGES, nonce=nonce)[0], 200)
        self.assertEqual(self.peer("GET", CHANGES, nonce=nonce, caller=C_URL, secret=SECRET_C)[0], 200)

    def test_stale_and_future_timestamps(self) -> None:
        """A timestamp outside clock_skew, either way, is refused; a malformed one too."""
        data, before = self.body_and_state()
        for ts in (self.now() - 301, self.now() + 301):
            status, _ = self.peer("POST", REPLICATE, raw=data, ts=ts)
            self.assertEqual(status, 403)
        self.assertEqual(self.failures("stale"), 2.0)
        for bad in ("", "-5", "1.5", "0x10", "١٢", "9" * 40):
            hdrs = self.signed_headers("POST", REPLICATE, data)
            hdrs[H_TS] = bad
            self.assertEqual(self.node.request("POST", REPLICATE, raw=data, headers=hdrs)[0], 403, bad)
        self.assertEqual(self.snapshot(), before)

    def test_edge_of_skew_is_accepted(self) -> None:
        """A timestamp exactly clock_skew away is still accepted."""
        self.assertEqual(self.peer("GET", CHANGES, ts=self.now() - 300)[0], 200)
        self.assertEqual(self.peer("GET", CHANGES, ts=self.now() + 300)[0], 200)

    def test_bad_nonce(self) -> None:
        """A nonce that is not b64u of 16 bytes is refused."""
        data, before = self.body_and_state()
        for bad in ("", "short", E.b64u_encode(b"x" * 15), E.b64u_encode(b"x" * 17), "A" * 21 + "B"):
            hdrs = self.signed_headers("POST", REPLICATE, data)
            key = derive_key(SECRET_B, B_URL)
            hdrs[H_NONCE] = bad
            hdrs[H_HMAC] = compute_mac(key, "POST", REPLICATE, int(hdrs[H_TS]), bad, data)
            self.assertEqual(self.node.request("POST", REPLICATE, raw=data, headers=hdrs)[0], 403, bad)
        self.assertEqual(self.snapshot(), before)

    def test_unknown_peer_url(self) -> None:
        """A caller that is not a configured peer is refused, whatever it signs with."""
        data, before = self.body_and_state()
        self.assertRefused(
            self.peer("POST", REPLICATE, raw=data, caller="http://evil.test", secret=SECRET_B), "unknown_peer"
        )
        # Not normalized: peers are matched on the exact normalized URL.
        self.peer("POST", REPLICATE, raw=data, caller="http://B.test/", secret=SECRET_B, key_url=B_URL)
        self.assertEqual(self.failures("unknown_peer"), 2.0)
        self.assertEqual(self.snapshot(), before)

    def test_peer_claiming_another_peers_url(self) -> None:
        """C cannot pass as B: it signs with its own secret, whichever URL it feeds the HKDF."""
        data, before = self.body_and_state()
        self.assertRefused(
            self.peer("POST", REPLICATE, raw=data, caller=B_URL, secret=SECRET_C, key_url=C_URL), "bad_hmac"
        )
        self.peer("POST", REPLICATE, raw=data, caller=B_URL, secret=SECRET_C, key_url=B_URL)
        self.assertEqual(self.failures("bad_hmac"), 2.0)
        self.assertEqual(self.snapshot(), before)

    def test_the_other_direction_key_is_refused(self) -> None:
        """B signing with A's direction key (a reflected request) is refused."""
        data, before = self.body_and_state()
        self.assertRefused(
            self.peer("POST", REPLICATE, raw=data, caller=B_URL, secret=SECRET_B, key_url=A_URL), "bad_hmac"
        )
        self.assertEqual(self.snapshot(), before)

    def test_auth_runs_before_the_body_is_parsed(self) -> None:
        """An unauthenticated malformed body gets 403, not 400: it is never parsed."""
        status, body = self.node.request("POST", REPLICATE, raw=b"{not json", headers={"Content-Type": "text/plain"})
        self.assertEqual((status, body["error"]), (403, "forbidden"))
        status, body = self.node.request("GET", CHANGES + "?since=-5", headers={})
        self.assertEqual((status, body["error"]), (403, "forbidden"))

    def test_duplicate_headers_are_refused(self) -> None:
        """A peer header given twice is refused."""
        data, _ = self.body_and_state()
        hdrs = self.signed_headers("POST", REPLICATE, data)
        d = self.node.http.request(
            "POST",
            "http://a.test" + REPLICATE,
            data=data,
            headers={**{k: [v] for k, v in hdrs.items()}, H_URL: [B_URL, C_URL], "Content-Type": ["application/json"]},
        )
        status, body = self.node.result(d)
        self.assertEqual((status, body["error"]), (403, "forbidden"))
        self.assertEqual(self.failures("malformed_header"), 1.0)


class PeerRateLimitTests(PeerAPITestCase):
    """The optional per-peer limiter runs after authentication, keyed by the peer URL."""

    def test_limited_peer_gets_429_after_auth(self) -> None:
        """An authenticated peer over its limit is 429 rate_limited; others and forgers are not counted."""
        seen: list[str] = []

        class OnlyC:
            def allow(self, key: str) -> bool:
                seen.append(key)
                return key == C_URL

        self.node.node.peer_api.limiter = OnlyC()
        status, body = self.peer("GET", CHANGES)
        self.assertEqual((status, body["error"]), (429, "rate_limited"))
        self.assertEqual(self.peer("GET", CHANGES, caller=C_URL, secret=SECRET_C)[0], 200)
        status, _ = self.peer("GET", CHANGES, caller=C_URL, secret=SECRET_B)
        self.assertEqual(status, 403)
        self.assertEqual(seen, [B_URL, C_URL])


class BodyCapTests(PeerAPITestCase):
    """Oversize peer bodies are cut off by the request itself (max_replicate_body_bytes)."""

    limits = {"max_body_bytes": 1024, "max_replicate_body_bytes": 4096}

    def exchange(self, data: bytes) -> bytes:
        site = self.node.node.site()
        proto = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        assert proto is not None
        transport = StringTransport()
        proto.makeConnection(transport)
        try:
            proto.dataReceived(data)
            return transport.value()  # type: ignore[no-any-return]
        finally:
            proto.connectionLost(Failure(ConnectionDone()))

    def request_bytes(self, body: bytes, chunked: bool = False, path: str = REPLICATE) -> bytes:
        hdrs = self.signed_headers("POST", path, body)
        head = [f"POST {path} HTTP/1.1", "Host: a.test", "Content-Type: application/json"]
        head += [f"{k}: {v}" for k, v in hdrs.items()]
        if chunked:
            head.append("Transfer-Encoding: chunked")
            chunks = b"".join(
                b"%x\r\n%s\r\n" % (len(body[i : i + 1000]), body[i : i + 1000]) for i in range(0, len(body), 1000)
            )
            payload = chunks + b"0\r\n\r\n"
        else:
            head.append(f"Content-Length: {len(body)}")
            payload = body
        return ("\r\n".join(head) + "\r\n\r\n").encode() + payload

    def batch_of_size(self, size: int) -> bytes:
        envs = []
        while True:
            envs.append(Identity().envelope(self.mailbox, os.urandom(100), ts=self.now()))
            candidate = json.dumps({"envelopes": envs}).encode()
            if len(candidate) > size:
                return candidate

    def test_oversize_with_content_length_is_413_and_stores_nothing(self) -> None:
        """A signed peer body over the cap with Content-Length answers 413 before it is read."""
        data = self.batch_of_size(4096)
        self.assertGreater(len(data), 4096)
        before = self.snapshot()
        out = self.exchange(self.request_bytes(data)[: -len(data)])  # headers only: refused on the length
        self.assertTrue(out.startswith(b"HTTP/1.1 413 "), out[:80])
        self.assertIn(b'"too_large"', out)
        self.assertEqual(self.snapshot(), before)

    def test_oversize_chunked_without_content_length_is_413_and_stores_nothing(self) -> None:
        """A chunked peer body is counted while it arrives and refused past the cap."""
        data = self.batch_of_size(4096)
        before = self.snapshot()
        out = self.exchange(self.request_bytes(data, chunked=True))
        self.assertTrue(out.startswith(b"HTTP/1.1 413 "), out[:80])
        self.assertEqual(out.count(b"HTTP/1.1"), 1)
        self.assertEqual(self.snapshot(), before)
        self.assertEqual(self.node.metrics.sample("meshrelay_dm_replica_total", {"outcome": "accepted"}), None)

    def test_peer_cap_not_client_cap_applies_to_peer_routes(self) -> None:
        """A 2 KB signed batch (over max_body_bytes, under the peer cap) is accepted, chunked or not."""
        for chunked in (False, True):
            data = self.batch_of_size(2048)
            self.assertGreater(len(data), 1024)
            out = self.exchange(self.request_bytes(data, chunked=chunked))
            self.assertTrue(out.startswith(b"HTTP/1.1 200 "), out[:200])
            self.assertIn(b'"accepted"', out)


class PeerNonceLockoutTests(PeerAPITestCase):
    """Issue 10 item 2, peers: one peer's future-stamped flood cannot lock the other peers out."""

    limits = {"max_nonces": 100}

    def flood(self, n: int = 150) -> None:
        for _ in range(n):
            self.assertEqual(self.peer("GET", CHANGES, ts=self.now() + 300)[0], 200)

    def test_future_stamped_flood_does_not_lock_out_another_peer(self) -> None:
        """After 1.5x max_nonces requests from B stamped now+clock_skew, C's (and B's) in-window requests pass."""
        self.flood()
        self.assertEqual(self.peer("GET", CHANGES, caller=C_URL, secret=SECRET_C)[0], 200)
        self.assertEqual(self.peer("GET", CHANGES, caller=C_URL, secret=SECRET_C, ts=self.now() - 100)[0], 200)
        self.assertEqual(self.peer("GET", CHANGES)[0], 200)
        self.assertEqual(self.failures("stale"), 0.0)

    def test_replay_is_refused_after_the_cache_forgot_it(self) -> None:
        """A peer request replayed after its nonce left the in-memory cache is refused by the store's claim."""
        hdrs = self.signed_headers("GET", CHANGES, b"", caller=C_URL, secret=SECRET_C)
        self.assertEqual(self.node.request("GET", CHANGES, raw=b"", headers=hdrs)[0], 200)
        self.flood()
        status, body = self.node.request("GET", CHANGES, raw=b"", headers=hdrs)
        self.assertEqual((status, body["error"]), (403, "forbidden"))
        self.assertEqual(self.failures("replayed"), 1.0)


FEATURES = "/api/mesh/dm/features"
BODIES = "/api/mesh/dm/bodies"


class WireV2Tests(PeerAPITestCase):
    """features, changes?ids=1, bodies and byte-bounded pages (wire v2)."""

    def test_features(self) -> None:
        """features answers the versions, this node's page_bytes and the v2 limits; a query is 400."""
        self.assertEqual(
            self.peer("GET", FEATURES),
            (
                200,
                {
                    "ok": True,
                    "versions": [1, 2, 3, 4, 5],
                    "page_bytes": 1048576,
                    "max_ids": 5000,
                    "max_bodies": 500,
                    "key_ids": True,
                },
            ),
        )
        status, body = self.peer("GET", FEATURES + "?x=1")
        self.assertEqual((status, body["error"]), (400, "bad_request"))
        status, body = self.node.request("GET", FEATURES, headers={})
        self.assertEqual((status, body["error"]), (403, "forbidden"))

    def test_ids_page(self) -> None:
        """ids=1 lists seq, kind, mailbox, msg_id or nonce and the body's size, in feed order."""
        env = self.stored_envelope()
        ack = self.mailbox.signed(ts=self.now(), ack=[env["msg_id"]])
        self.peer("POST", ACK, {"acks": [ack]})
        other = self.stored_envelope(b"second")
        _, full = self.peer("GET", CHANGES)
        status, body = self.peer("GET", CHANGES + "?since=0&ids=1")
        self.assertEqual(status, 200)
        sizes = [
            len(json.dumps(i.get("envelope") or i.get("ack"), separators=(",", ":")).encode()) for i in full["items"]
        ]
        self.assertEqual(
            [(i["kind"], i.get("msg_id") or i.get("nonce"), i["mailbox"], i["size"]) for i in body["items"]],
            [
                ("ack", ack["nonce"], self.mailbox.pub, sizes[0]),
                ("envelope", other["msg_id"], self.mailbox.pub, sizes[1]),
            ],
        )
        self.assertEqual((body["next"], body["more"], body["feed"]), (full["next"], False, full["feed"]))

    def test_ids_query_values(self) -> None:
        """ids must be exactly 1; with ids, limit goes up to 5000."""
        for query in ("ids=2", "ids=true", "ids=", "ids=1&ids=1", "ids=1&limit=5001", "ids=1&limit=0", "limit=501"):
            status, body = self.peer("GET", CHANGES + "?" + query)
            self.assertEqual((status, body["error"]), (400, "bad_request"), query)
        self.assertEqual(self.peer("GET", CHANGES + "?ids=1&limit=5000")[0], 200)

    def test_bodies(self) -> None:
        """bodies returns held items in request order and lists what it does not hold as gone."""
        e1, e2 = self.stored_envelope(b"one"), self.stored_envelope(b"two")
        ack = self.mailbox.signed(ts=self.now(), ack=[os.urandom(32).hex()])
        self.peer("POST", ACK, {"acks": [ack]})
        unknown_id, unknown_ack = (
            os.urandom(32).hex(),
            {"mailbox": Identity().pub, "nonce": E.b64u_encode(os.urandom(16))},
        )
        status, body = self.peer(
            "POST",
            BODIES,
            {
                "envelopes": [e2["msg_id"], unknown_id, e1["msg_id"]],
                "acks": [{"mailbox": ack["mailbox"], "nonce": ack["nonce"]}, unknown_ack],
            },
        )
        self.assertEqual(status, 200)
        self.assertEqual(body["envelopes"], [e2, e1])
        self.assertEqual(body["acks"], [ack])
        self.assertEqual(body["gone"], {"envelopes": [unknown_id], "acks": [unknown_ack]})

    def test_bad_bodies_requests_answer_400(self) -> None:
        """Missing or extra keys, wrong types, malformed ids and more than 500 entries are 400 bad_request."""
        mid = os.urandom(32).hex()
        key = {"mailbox": Identity().pub, "nonce": E.b64u_encode(os.urandom(16))}
        for body in (
            {},
            {"envelopes": []},
            {"acks": []},
            {"envelopes": [], "acks": [], "x": 1},
            {"envelopes": mid, "acks": []},
            {"envelopes": [mid.upper()], "acks": []},
            {"envelopes": [1], "acks": []},
            {"envelopes": [], "acks": [dict(key, nonce="short")]},
            {"envelopes": [], "acks": [dict(key, extra=1)]},
            {"envelopes": [], "acks": [[key["mailbox"], key["nonce"]]]},
            {"envelopes": [mid] * 300, "acks": [key] * 201},
            [],
        ):
            status, answer = self.peer("POST", BODIES, body)
            self.assertEqual((status, answer["error"]), (400, "bad_request"), body)
        self.assertEqual(self.peer("POST", BODIES, {"envelopes": [mid] * 300, "acks": [key] * 200})[0], 200)

    def test_pages_and_bodies_are_bounded_in_bytes(self) -> None:
        """A v1 page and a bodies answer stop at sync.page_bytes (the first item always goes)."""
        cfg = self.node.relay.config
        self.node.relay.config = cfg.replace(sync=dataclasses.replace(cfg.sync, page_bytes=65536))
        envs = [Identity().envelope(self.mailbox, os.urandom(7000), ts=self.now()) for _ in range(10)]
        for env in envs:
            self.assertEqual(self.node.send(env)[0], 200)
        _, page = self.peer("GET", CHANGES + "?limit=500")
        self.assertTrue(page["more"])
        self.assertEqual(len(page["items"]), 6)  # about 9.6 KB each
        self.assertEqual(page["next"], page["items"][-1]["seq"])
        _, answer = self.peer("POST", BODIES, {"envelopes": [e["msg_id"] for e in envs], "acks": []})
        self.assertEqual((len(answer["envelopes"]), answer["gone"]["envelopes"]), (6, []))
