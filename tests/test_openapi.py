"""docs/openapi.yaml stays true: valid OpenAPI, the same routes as the code, and real answers that match it.

The answers come from real in-memory nodes through their real ``MeshSite`` (raw HTTP over a
fake transport), so the body caps, the error table and the peer gate all run. Every
(status, error code) an operation documents must be provoked here, and every answer provoked
must be documented: the spec can neither promise a code the node never gives nor hide one it does.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import jsonschema_rs
import schemathesis
from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR
from twisted.trial.unittest import SynchronousTestCase

from meshrelay import envelope as E
from meshrelay import policy as P
from meshrelay.api import ClientAPI
from meshrelay.config import build_config
from meshrelay.errors import STATUS_BY_CODE
from meshrelay.peer_api import PeerAPI
from meshrelay.web import PEER_PATHS
from tests.apispec import (
    documented_answers,
    documented_items,
    error_codes_of,
    error_shape_problems,
    exchange,
    load_spec,
    operations,
    peer_headers,
    resolve,
    response_schema,
    schema_errors,
    validator,
)
from tests.helpers import Identity, MemNode, dump_live

A_URL = "http://a.test"
B_URL = "http://b.test"
SECRET_B = "secret-of-the-a-b-link-for-openapi"

SEND = "/api/mesh/dm/send"
POLL = "/api/mesh/dm/poll"
POLICY = "/api/mesh/dm/policy"
POLICIES = "/api/mesh/dm/policies"
COUNT = "/api/mesh/dm/count"
HEALTH = "/api/mesh/health"
REPLICATE = "/api/mesh/dm/replicate-envelope"
ACK = "/api/mesh/dm/ack"
CHANGES = "/api/mesh/dm/changes"
FEATURES = "/api/mesh/dm/features"
BODIES = "/api/mesh/dm/bodies"


def klein_routes(app: Any) -> set[tuple[str, str]]:
    """(path, METHOD) of every route of a Klein app; werkzeug's automatic HEAD for GET is left out."""
    out = set()
    for rule in app.url_map.iter_rules():
        for method in rule.methods or ():
            if method == "HEAD" and "GET" in (rule.methods or ()):
                continue
            out.add((rule.rule, method))
    return out


class SpecTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.spec = load_spec()

    def test_is_valid_openapi(self) -> None:
        """The spec validates against the OpenAPI 3.1 meta-schema and loads in schemathesis."""
        self.assertEqual(self.spec["openapi"], "3.1.0")
        OPENAPI_31_VALIDATOR.validate(self.spec)
        schemathesis.openapi.from_dict(self.spec).validate()
        # The check can fail: a broken operation is refused.
        broken = load_spec()
        broken["paths"][HEALTH]["get"]["responses"] = "none"
        self.assertRaises(jsonschema_rs.ValidationError, OPENAPI_31_VALIDATOR.validate, broken)

    def test_every_schema_compiles(self) -> None:
        """Every component schema and every response schema compiles (all $refs resolve)."""
        for name in self.spec["components"]["schemas"]:
            validator(self.spec, {"$ref": f"#/components/schemas/{name}"})
        for (path, method), op in operations(self.spec).items():
            for status in op["responses"]:
                schema = response_schema(self.spec, path, method, int(status))
                self.assertIsNotNone(schema, (path, method, status))
                assert schema is not None
                validator(self.spec, schema)

    def test_routes_match_the_code(self) -> None:
        """Every Klein route of ClientAPI and PeerAPI is in the spec with the same methods, and vice versa."""
        code = klein_routes(ClientAPI.app) | klein_routes(PeerAPI.app)
        self.assertEqual(set(operations(self.spec)), code)
        peer_ops = {path for (path, _), op in operations(self.spec).items() if "peer" in op.get("tags", [])}
        self.assertEqual({p.encode() for p in peer_ops}, set(PEER_PATHS))
        self.assertEqual({path for path, _ in klein_routes(PeerAPI.app)}, peer_ops)

    def test_peer_operations_document_the_auth_headers(self) -> None:
        """Every peer operation takes the four required X-Peer-* headers and documents 403 forbidden."""
        wanted = {"X-Peer-Url", "X-Peer-Timestamp", "X-Peer-Nonce", "X-Peer-HMAC"}
        for (path, method), op in operations(self.spec).items():
            params = [resolve(self.spec, p) for p in op.get("parameters", [])]
            headers = {p["name"] for p in params if p["in"] == "header" and p["required"]}
            if path.encode() in PEER_PATHS:
                self.assertEqual(headers, wanted, path)
                self.assertIn((403, "forbidden"), documented_answers(self.spec, path, method))
            else:
                self.assertEqual(headers, set(), path)

    def test_error_codes_match_the_error_table(self) -> None:
        """The error code enum is the error table's, and each documented code sits under its own status."""
        schemas = self.spec["components"]["schemas"]
        self.assertEqual(set(schemas["ErrorCode"]["enum"]), set(STATUS_BY_CODE))
        for (path, method), op in operations(self.spec).items():
            for status in op["responses"]:
                if int(status) < 400:
                    continue
                schema = response_schema(self.spec, path, method, int(status))
                assert schema is not None
                for code in error_codes_of(self.spec, schema):
                    self.assertEqual(STATUS_BY_CODE[code], int(status), (path, code))

    def test_schemas_are_strict(self) -> None:
        """The spec refuses what the protocol refuses: unknown fields, bad b64u, non-canonical tails, floats for ints."""
        spec = self.spec
        alice, bob = Identity(), Identity()
        env = alice.envelope(bob, b"hello")
        envelope = {"$ref": "#/components/schemas/Envelope"}
        self.assertEqual(schema_errors(spec, envelope, env), [])
        for bad in (
            {**env, "extra": 1},
            {**env, "mailbox": env["mailbox"][:-1] + "B"},  # the unused low bits are not zero
            {**env, "sig": env["sig"] + "A"},
            {**env, "msg_id": env["msg_id"].upper()},
            {**env, "ttl": 10},
            {**env, "ts": -1},
            {**env, "v": 2},
            {k: v for k, v in env.items() if k != "sig"},
        ):
            self.assertNotEqual(schema_errors(spec, envelope, bad), [], bad)
        error = {"$ref": "#/components/schemas/Error"}
        self.assertEqual(schema_errors(spec, error, {"ok": False, "error": "stale", "detail": ""}), [])
        ok_cap = {"ok": False, "error": "sender_cap", "detail": "", "pending": 8, "limit": 8}
        self.assertEqual(schema_errors(spec, error, ok_cap), [])
        for bad_error in (
            {"ok": False, "error": "sender_cap", "detail": ""},
            {"ok": False, "error": "stale", "detail": "", "pending": 1, "limit": 1},
            {"ok": False, "error": "nope", "detail": ""},
            {"ok": True, "error": "stale", "detail": ""},
            {"ok": False, "error": "stale"},
        ):
            self.assertNotEqual(schema_errors(spec, error, bad_error), [], bad_error)


def node_config(tmpdir: str, **limits: Any) -> Any:
    limits.setdefault("client_rate", 0)
    return build_config(
        {
            "node": {"data_dir": tmpdir, "public_url": A_URL},
            "limits": limits,
            "sync": {"interval": 3600},
            "peers": [{"url": B_URL, "secret": SECRET_B}],
        }
    )


class RealAnswersTests(SynchronousTestCase):
    """Provoke every documented answer of each operation on real nodes and validate it against the spec."""

    def setUp(self) -> None:
        self.spec = load_spec()
        #: (path, METHOD) -> the (status, code) answers seen
        self.seen: dict[tuple[str, str], set[tuple[int, str | None]]] = {}
        #: item schema name -> the (status, error) per-item results seen
        self.items: dict[str, set[tuple[str, str | None]]] = {"ReplicaResult": set(), "AckItemResult": set()}
        self.alice, self.bob, self.carol, self.dave = Identity(), Identity(), Identity(), Identity()

    # ------------------------------------------------------------------ plumbing

    def node(self, **limits: Any) -> MemNode:
        d = self.mktemp()
        n = MemNode(d, config=node_config(d, **limits))
        self.addCleanup(n.stop)
        n.site = n.node.site()  # type: ignore[attr-defined]
        return n

    def now(self, n: MemNode) -> int:
        return int(n.clock.seconds())

    def break_store(self, n: MemNode) -> None:
        """Make every write of ``n``'s store fail (a read-only data dir)."""
        store: Any = n.store
        writable = store._wconn
        ro = sqlite3.connect(f"file:{store.path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
        # The group commit (WriterCore) holds the writing connection too.
        store._wconn = store._core.conn = ro

        def restore() -> None:
            store._wconn = store._core.conn = writable
            ro.close()

        self.addCleanup(restore)

    def call(
        self,
        n: MemNode,
        method: str,
        target: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        ctype: str | None = "application/json",
        headers: dict[str, str] | None = None,
        sign: bool = True,
    ) -> tuple[int, Any]:
        """One request; the answer is checked against the spec and recorded."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        hdrs = dict(headers or {})
        if ctype is not None and method == "POST":
            hdrs.setdefault("Content-Type", ctype)
        path = target.split("?", 1)[0]
        if sign and headers is None and path.encode() in PEER_PATHS:
            hdrs.update(peer_headers(B_URL, SECRET_B, method, target, data or b"", n.clock.seconds()))
        status, resp_headers, answer = exchange(n.site, method, target, data, hdrs)  # type: ignore[attr-defined]
        self.assertEqual(resp_headers.get("content-type"), "application/json", (target, status))
        schema = response_schema(self.spec, path, method, status)
        self.assertIsNotNone(schema, f"{method} {path} answered {status}, which the spec does not document: {answer}")
        assert schema is not None
        self.assertEqual(schema_errors(self.spec, schema, answer), [], (method, path, status, answer))
        if status >= 400:
            self.assertEqual(error_shape_problems(status, answer), [], answer)
        self.seen.setdefault((path, method), set()).add((status, answer["error"] if status >= 400 else None))
        if status == 200 and path in (REPLICATE, ACK):
            name = "ReplicaResult" if path == REPLICATE else "AckItemResult"
            self.items[name].update((r["status"], r.get("error")) for r in answer["results"])
        return status, answer

    def assert_all_seen(self, path: str, method: str) -> None:
        self.assertEqual(self.seen.get((path, method), set()), documented_answers(self.spec, path, method))

    def signed(self, who: Identity, n: MemNode, **kw: Any) -> dict[str, Any]:
        ts = kw.pop("ts", self.now(n))
        return who.poll_body(ts=ts, **kw)

    def forged(self, body: dict[str, Any]) -> dict[str, Any]:
        """``body`` with its sig replaced by a signature of the same bytes under another key."""
        return {**body, "sig": E.b64u_encode(Identity().key.sign(b"something else"))}

    # ------------------------------------------------------------------ client API

    def test_send(self) -> None:
        """Every documented answer of send is real and matches its schema."""
        n = self.node(per_sender_pending=1, per_mailbox_pending=2, max_body_bytes=2048, max_message_bytes=1000)
        now = self.now(n)
        first = self.alice.envelope(self.bob, b"one", ts=now)
        self.assertEqual(
            self.call(n, "POST", SEND, first), (200, {"ok": True, "msg_id": first["msg_id"], "duplicate": False})
        )
        self.assertEqual(self.call(n, "POST", SEND, first)[1]["duplicate"], True)
        status, answer = self.call(n, "POST", SEND, self.alice.envelope(self.bob, b"two", ts=now))
        self.assertEqual((status, answer["error"], answer["pending"], answer["limit"]), (429, "sender_cap", 1, 1))
        self.assertEqual(self.call(n, "POST", SEND, self.carol.envelope(self.bob, b"three", ts=now))[0], 200)
        self.assertEqual(
            self.call(n, "POST", SEND, self.dave.envelope(self.bob, b"four", ts=now))[1]["error"], "mailbox_full"
        )
        self.assertEqual(self.call(n, "POST", SEND, raw=b"{nope")[1]["error"], "bad_json")
        self.assertEqual(self.call(n, "POST", SEND, {})[1]["error"], "bad_envelope")
        self.assertEqual(
            self.call(n, "POST", SEND, self.forged(self.alice.envelope(self.carol, ts=now)))[1]["error"],
            "bad_signature",
        )
        big = self.alice.envelope(self.carol, b"x" * 1100, ts=now)
        self.assertEqual(self.call(n, "POST", SEND, big)[:1], (413,))
        self.assertEqual(self.call(n, "POST", SEND, raw=b" " * 3000)[1]["error"], "too_large")
        self.assertEqual(self.call(n, "POST", SEND, first, ctype="text/plain")[1]["error"], "unsupported_media_type")
        self.assertEqual(
            self.call(n, "POST", SEND, self.alice.envelope(self.dave, ts=now - 1000))[1]["error"], "bad_timestamp"
        )
        self.assertEqual(
            self.call(n, "POST", SEND, self.alice.envelope(self.dave, ts=now, ttl=10))[1]["error"], "bad_ttl"
        )
        full = self.node(max_stored_bytes=600)
        self.assertEqual(self.call(full, "POST", SEND, self.alice.envelope(self.bob, b"a", ts=now))[0], 200)
        self.assertEqual(
            self.call(full, "POST", SEND, self.carol.envelope(self.bob, b"b", ts=now))[1]["error"], "storage_full"
        )
        limited = self.node(client_rate=1, client_burst=1)
        self.call(limited, "POST", SEND, self.alice.envelope(self.bob, ts=now))
        self.assertEqual(
            self.call(limited, "POST", SEND, self.carol.envelope(self.bob, ts=now))[1]["error"], "rate_limited"
        )
        broken = self.node()
        self.break_store(broken)
        self.assertEqual(
            self.call(broken, "POST", SEND, self.alice.envelope(self.bob, ts=now))[1]["error"], "unavailable"
        )
        self._first_contact_send_answers()
        self.assert_all_seen(SEND, "POST")

    def _first_contact_send_answers(self) -> None:
        """The v3 answers of send: the policy's refusals, each permit refusal, the stranger bucket."""
        n = self.node(per_mailbox_pending=4)
        now = self.now(n)
        owner, friend = Identity(), Identity()

        def policy(version: int, **kw: Any) -> None:
            pol = P.make_policy(owner.key, version=version, ts=now, **kw)
            self.assertEqual(self.call(n, "POST", POLICY, pol)[0], 200)

        def send(sender: Identity, text: bytes, **extra: Any) -> str:
            env = {**sender.envelope(owner, text, ts=now), **extra}
            if extra.get("stamp") is True:
                env["stamp"] = P.solve_stamp(env["msg_id"], 2)
            status, answer = self.call(n, "POST", SEND, env)
            return "ok" if status == 200 else str(answer["error"])

        policy(1, mode="stamps", difficulty=2, stranger_cap=1, epoch=1)
        self.assertEqual(send(Identity(), b"s"), "stamp_required")
        self.assertEqual(send(Identity(), b"s", stamp="AAAA"), "bad_stamp")
        weak = next(
            e
            for e in (Identity().envelope(owner, b"w%d" % i, ts=now) for i in range(200))
            if P.stamp_work(e["msg_id"], bytes(8)) < 2
        )
        self.assertEqual(self.call(n, "POST", SEND, {**weak, "stamp": "AAAAAAAAAAA"})[1]["error"], "weak_stamp")
        self.assertEqual(send(Identity(), b"s1", stamp=True), "ok")
        self.assertEqual(send(Identity(), b"s2", stamp=True), "stranger_full")
        permit = P.make_permit(owner.key, friend.pub, now + 60, 1)
        self.assertEqual(send(friend, b"c", permit=permit), "ok")
        self.assertEqual(send(friend, b"m", permit={"mailbox": owner.pub}), "bad_permit")
        self.assertEqual(send(Identity(), b"o", permit=permit), "permit_mismatch")
        self.assertEqual(send(friend, b"e", permit=P.make_permit(owner.key, friend.pub, now, 1)), "permit_expired")
        self.assertEqual(send(friend, b"r", permit=P.make_permit(owner.key, friend.pub, now + 60, 0)), "permit_revoked")
        policy(2, mode="contacts")
        self.assertEqual(send(Identity(), b"x", stamp=True), "contacts_only")

    def test_policy(self) -> None:
        """Every documented answer of the policy routes (v3) is real and matches its schema."""
        n = self.node(max_body_bytes=1024)
        now = self.now(n)
        owner = Identity()
        pol = P.make_policy(owner.key, version=2, mode="stamps", difficulty=8, ts=now)
        self.assertEqual(self.call(n, "GET", POLICY + "?mailbox=" + owner.pub), (200, {"ok": True, "policy": None}))
        self.assertEqual(self.call(n, "POST", POLICY, pol), (200, {"ok": True, "version": 2, "duplicate": False}))
        self.assertEqual(self.call(n, "GET", POLICY + "?mailbox=" + owner.pub)[1]["policy"], pol)
        old = P.make_policy(owner.key, version=1, mode="open", ts=now)
        self.assertEqual(self.call(n, "POST", POLICY, old)[1]["error"], "stale_policy")
        self.assertEqual(self.call(n, "POST", POLICY, raw=b"{")[1]["error"], "bad_json")
        self.assertEqual(self.call(n, "POST", POLICY, {"mailbox": owner.pub})[1]["error"], "bad_policy")
        self.assertEqual(self.call(n, "POST", POLICY, self.forged(pol))[1]["error"], "bad_signature")
        future = P.make_policy(owner.key, version=3, ts=now + 3600)
        self.assertEqual(self.call(n, "POST", POLICY, future)[1]["error"], "bad_timestamp")
        self.assertEqual(self.call(n, "POST", POLICY, raw=b" " * 2000)[1]["error"], "too_large")
        self.assertEqual(self.call(n, "POST", POLICY, pol, ctype="text/plain")[1]["error"], "unsupported_media_type")
        self.assertEqual(self.call(n, "GET", POLICY + "?mailbox=nope")[1]["error"], "bad_request")
        limited = self.node(client_rate=1, client_burst=1)
        self.call(limited, "GET", POLICY + "?mailbox=" + owner.pub)
        self.assertEqual(self.call(limited, "GET", POLICY + "?mailbox=" + owner.pub)[1]["error"], "rate_limited")
        self.assertEqual(self.call(limited, "POST", POLICY, pol)[1]["error"], "rate_limited")
        full = self.node(max_policies=1)
        self.assertEqual(self.call(full, "POST", POLICY, pol)[0], 200)
        other = P.make_policy(Identity().key, version=1, ts=now)
        self.assertEqual(self.call(full, "POST", POLICY, other)[1]["error"], "storage_full")
        broken = self.node()
        self.break_store(broken)
        self.assertEqual(self.call(broken, "POST", POLICY, pol)[1]["error"], "unavailable")
        self.assert_all_seen(POLICY, "POST")
        self.assert_all_seen(POLICY, "GET")

    def _signed_request_answers(self, path: str) -> None:
        n = self.node(max_waiting_polls=0, max_body_bytes=1024)
        now = self.now(n)
        env = self.alice.envelope(self.bob, b"pending", ts=now)
        self.assertEqual(self.call(n, "POST", SEND, env)[0], 200)
        status, answer = self.call(n, "POST", path, self.signed(self.bob, n))
        self.assertEqual(status, 200)
        if path == POLL:
            self.assertEqual(answer["messages"], [env])
            self.assertEqual(
                self.call(n, "POST", path, self.signed(self.bob, n, ack=[env["msg_id"]]))[1]["messages"], []
            )
            self.assertEqual(self.call(n, "POST", path, self.signed(self.carol, n, wait=1))[1]["error"], "rate_limited")
        else:
            self.assertEqual(answer["count"], 1)
            limited = self.node(client_rate=1, client_burst=1)
            self.call(limited, "POST", path, self.signed(self.bob, limited))
            self.assertEqual(
                self.call(limited, "POST", path, self.signed(self.bob, limited))[1]["error"], "rate_limited"
            )
        self.assertEqual(self.call(n, "POST", path, raw=b"[")[1]["error"], "bad_json")
        self.assertEqual(self.call(n, "POST", path, {})[1]["error"], "bad_request")
        self.assertEqual(self.call(n, "POST", path, self.forged(self.signed(self.bob, n)))[1]["error"], "bad_signature")
        once = self.signed(self.bob, n)
        self.assertEqual(self.call(n, "POST", path, once)[0], 200)
        self.assertEqual(self.call(n, "POST", path, once)[1]["error"], "replayed")
        self.assertEqual(self.call(n, "POST", path, self.signed(self.bob, n, ts=now - 1000))[1]["error"], "stale")
        self.assertEqual(self.call(n, "POST", path, raw=b" " * 2000)[1]["error"], "too_large")
        self.assertEqual(
            self.call(n, "POST", path, self.signed(self.bob, n), ctype=None)[1]["error"], "unsupported_media_type"
        )
        broken = self.node()
        self.break_store(broken)
        self.assertEqual(self.call(broken, "POST", path, self.signed(self.bob, broken))[1]["error"], "unavailable")
        self.assert_all_seen(path, "POST")

    def test_poll(self) -> None:
        """Every documented answer of poll is real and matches its schema."""
        self._signed_request_answers(POLL)

    def test_count(self) -> None:
        """Every documented answer of count is real and matches its schema."""
        self._signed_request_answers(COUNT)

    def test_health(self) -> None:
        """Every documented answer of health is real and matches its schema."""
        n = self.node(max_body_bytes=1024)
        status, answer = self.call(n, "GET", HEALTH)
        self.assertEqual((status, answer["peers"]), (200, 1))
        self.assertEqual(self.call(n, "GET", HEALTH, raw=b" " * 2000)[1]["error"], "too_large")
        limited = self.node(client_rate=1, client_burst=1)
        self.call(limited, "GET", HEALTH)
        self.assertEqual(self.call(limited, "GET", HEALTH)[1]["error"], "rate_limited")
        self.assert_all_seen(HEALTH, "GET")

    def test_unknown_path_and_method(self) -> None:
        """Unknown paths answer 404 not_found and known paths with a wrong method 405, in the error shape."""
        n = self.node()
        error = {"$ref": "#/components/schemas/Error"}
        for method, target, status, code in (
            ("GET", "/api/mesh/nope", 404, "not_found"),
            ("GET", SEND, 405, "method_not_allowed"),
            ("POST", HEALTH, 405, "method_not_allowed"),
            ("DELETE", POLL, 405, "method_not_allowed"),
        ):
            got, _, answer = exchange(n.site, method, target)  # type: ignore[attr-defined]
            self.assertEqual((got, answer["error"]), (status, code))
            self.assertEqual(schema_errors(self.spec, error, answer), [])
            self.assertEqual(error_shape_problems(got, answer), [])

    # ------------------------------------------------------------------ peer API

    def _peer_gate_answers(self, path: str, method: str, body: Any) -> None:
        """403, 413, 429 and 503: the answers every peer operation shares."""
        n = self.node(max_replicate_body_bytes=1024)
        self.assertEqual(self.call(n, method, path, body, sign=False)[1]["error"], "forbidden")
        hdrs = peer_headers(
            B_URL, "not-the-secret-of-this-link", method, path, json.dumps(body).encode() if body else b"", self.now(n)
        )
        self.assertEqual(self.call(n, method, path, body, headers=hdrs)[1]["error"], "forbidden")
        self.assertEqual(self.call(n, method, path, raw=b" " * 2000)[1]["error"], "too_large")
        limited = self.node(peer_rate=1, peer_burst=1)
        self.call(limited, method, path, body)
        self.assertEqual(self.call(limited, method, path, body)[1]["error"], "rate_limited")
        broken = self.node()
        self.break_store(broken)
        self.assertEqual(self.call(broken, method, path, body)[1]["error"], "unavailable")

    def test_replicate_envelope(self) -> None:
        """Every documented answer and per-envelope result of replicate-envelope is real and matches its schema."""
        n = self.node(
            per_sender_pending=1, per_mailbox_pending=2, max_message_bytes=1000, max_replicate_body_bytes=8192
        )
        now = self.now(n)
        first = self.alice.envelope(self.bob, b"one", ts=now)
        batch = [
            first,
            first,
            self.alice.envelope(self.bob, b"two", ts=now),  # sender_cap
            self.carol.envelope(self.bob, b"three", ts=now),
            self.dave.envelope(self.bob, b"four", ts=now),  # mailbox_full
            {},
            "not an object",
            self.alice.envelope(self.carol, b"x" * 1100, ts=now),
            self.forged(self.alice.envelope(self.carol, ts=now)),
            self.alice.envelope(self.carol, ts=now + 1000),
            self.alice.envelope(self.carol, ts=now - 10000, ttl=60),
            self.alice.envelope(self.carol, ts=now, ttl=10),
            {**self.alice.envelope(self.carol, ts=now), "msg_id": "f" * 64},
        ]
        status, answer = self.call(n, "POST", REPLICATE, {"envelopes": batch})
        self.assertEqual(status, 200)
        self.assertEqual(
            [(r["status"], r.get("error")) for r in answer["results"]],
            [
                ("accepted", None),
                ("duplicate", None),
                ("rejected", "sender_cap"),
                ("accepted", None),
                ("rejected", "mailbox_full"),
                ("rejected", "bad_envelope"),
                ("rejected", "bad_envelope"),
                ("rejected", "too_large"),
                ("rejected", "bad_signature"),
                ("rejected", "bad_timestamp"),
                ("rejected", "bad_timestamp"),
                ("rejected", "bad_ttl"),
                ("rejected", "bad_envelope"),
            ],
        )
        self.assertEqual(answer["results"][6]["msg_id"], None)
        self.assertEqual(answer["results"][12]["msg_id"], "f" * 64)
        self.assertEqual(self.call(n, "POST", REPLICATE, {"envelopes": []})[1]["results"], [])
        single = self.call(n, "POST", REPLICATE, {"envelope": self.alice.envelope(self.dave, ts=now)})[1]
        self.assertEqual(single["results"][0]["status"], "accepted")
        full = self.node(max_stored_bytes=600)
        answer = self.call(
            full,
            "POST",
            REPLICATE,
            {"envelopes": [self.alice.envelope(self.bob, ts=now), self.carol.envelope(self.bob, ts=now)]},
        )[1]
        self.assertEqual(answer["results"][1]["error"], "storage_full")
        self.assertEqual(self.call(n, "POST", REPLICATE, raw=b"{")[1]["error"], "bad_json")
        self.assertEqual(self.call(n, "POST", REPLICATE, {"envelope": first, "extra": 1})[1]["error"], "bad_request")
        self.assertEqual(
            self.call(n, "POST", REPLICATE, {"envelope": first}, ctype="text/plain")[1]["error"],
            "unsupported_media_type",
        )
        self._peer_gate_answers(REPLICATE, "POST", {"envelopes": []})
        self.assert_all_seen(REPLICATE, "POST")
        self.assertEqual(self.items["ReplicaResult"], documented_items(self.spec, "ReplicaResult"))

    def test_ack(self) -> None:
        """Every documented answer and per-ack result of ack is real and matches its schema."""
        n = self.node()
        now = self.now(n)
        env = self.alice.envelope(self.bob, ts=now)
        self.assertEqual(self.call(n, "POST", SEND, env)[0], 200)
        good = self.bob.signed(ts=now, ack=[env["msg_id"]])
        acks = [
            good,
            self.bob.signed(ts=now, ack=[]),
            {**good, "extra": 1},
            self.forged(self.bob.signed(ts=now, ack=[env["msg_id"]])),
            self.bob.signed(ts=now + 1000, ack=[env["msg_id"]]),
        ]
        status, answer = self.call(n, "POST", ACK, {"acks": acks})
        self.assertEqual(status, 200)
        self.assertEqual(
            [(r["status"], r.get("error")) for r in answer["results"]],
            [
                ("applied", None),
                ("rejected", "bad_request"),
                ("rejected", "bad_request"),
                ("rejected", "bad_signature"),
                ("rejected", "bad_timestamp"),
            ],
        )
        self.assertEqual(dump_live(n.store, now)["envelopes"], [])
        self.assertEqual(self.call(n, "POST", ACK, raw=b"{")[1]["error"], "bad_json")
        self.assertEqual(self.call(n, "POST", ACK, {"ack": []})[1]["error"], "bad_request")
        self.assertEqual(
            self.call(n, "POST", ACK, {"acks": []}, ctype="text/plain")[1]["error"], "unsupported_media_type"
        )
        self._peer_gate_answers(ACK, "POST", {"acks": []})
        self.assert_all_seen(ACK, "POST")
        self.assertEqual(self.items["AckItemResult"], documented_items(self.spec, "AckItemResult"))

    def test_policies_peer_routes(self) -> None:
        """Every documented answer of the v3 policy push and policy feed is real and matches its schema."""
        n = self.node()
        now = self.now(n)
        owner = Identity()
        pol = P.make_policy(owner.key, version=2, mode="contacts", ts=now)
        old = P.make_policy(owner.key, version=1, mode="open", ts=now)
        status, answer = self.call(n, "POST", POLICIES, {"policies": [pol, pol, old, {"x": 1}]})
        self.assertEqual(status, 200)
        self.assertEqual(
            [(r["status"], r.get("error")) for r in answer["results"]],
            [("accepted", None), ("duplicate", None), ("rejected", "stale_policy"), ("rejected", "bad_policy")],
        )
        self.assertEqual(self.call(n, "POST", POLICIES, raw=b"{")[1]["error"], "bad_json")
        self.assertEqual(self.call(n, "POST", POLICIES, {"policy": []})[1]["error"], "bad_request")
        self.assertEqual(
            self.call(n, "POST", POLICIES, {"policies": []}, ctype="text/plain")[1]["error"], "unsupported_media_type"
        )
        self._peer_gate_answers(POLICIES, "POST", {"policies": []})
        self.assert_all_seen(POLICIES, "POST")
        status, page = self.call(n, "GET", POLICIES + "?since=0&limit=10")
        self.assertEqual((status, [i["policy"] for i in page["items"]], page["more"]), (200, [pol], False))
        self.assertEqual(self.call(n, "GET", POLICIES + "?since=x")[1]["error"], "bad_request")
        self._peer_gate_answers(POLICIES, "GET", None)
        self.assert_all_seen(POLICIES, "GET")

    def test_changes(self) -> None:
        """Every documented answer of changes is real and matches its schema, items of both kinds included."""
        n = self.node()
        now = self.now(n)
        kept = self.alice.envelope(self.bob, b"kept", ts=now)
        gone = self.alice.envelope(self.bob, b"gone", ts=now)
        for env in (kept, gone):
            self.assertEqual(self.call(n, "POST", SEND, env)[0], 200)
        self.assertEqual(self.call(n, "POST", POLL, self.signed(self.bob, n, ack=[gone["msg_id"]]))[0], 200)
        status, page = self.call(n, "GET", CHANGES)
        self.assertEqual(status, 200)
        self.assertEqual([sorted(item) for item in page["items"]], [["envelope", "seq"], ["ack", "seq"]])
        self.assertEqual(page["items"][0]["envelope"], kept)
        mailbox = self.call(n, "GET", f"{CHANGES}?since=0&limit=1&mailbox={self.bob.pub}")[1]
        self.assertEqual((len(mailbox["items"]), mailbox["more"]), (1, True))
        for query in ("since=-1", "limit=0", "limit=501", "since=01", "mailbox=x", "other=1", "since=1&since=2"):
            self.assertEqual(self.call(n, "GET", f"{CHANGES}?{query}")[1]["error"], "bad_request", query)
        ids = self.call(n, "GET", f"{CHANGES}?ids=1")[1]
        self.assertEqual([item["kind"] for item in ids["items"]], ["envelope", "ack"])
        self.assertEqual(self.call(n, "GET", f"{CHANGES}?ids=2")[1]["error"], "bad_request")
        self._peer_gate_answers(CHANGES, "GET", None)
        self.assert_all_seen(CHANGES, "GET")

    def test_features(self) -> None:
        """Every documented answer of features is real and matches its schema."""
        n = self.node()
        self.assertEqual(self.call(n, "GET", FEATURES)[1]["versions"], [1, 2, 3, 4, 5])
        self.assertEqual(self.call(n, "GET", FEATURES + "?x=1")[1]["error"], "bad_request")
        self._peer_gate_answers(FEATURES, "GET", None)
        self.assert_all_seen(FEATURES, "GET")

    def test_bodies(self) -> None:
        """Every documented answer of bodies is real and matches its schema, gone items included."""
        n = self.node()
        now = self.now(n)
        env = self.alice.envelope(self.bob, b"held", ts=now)
        self.assertEqual(self.call(n, "POST", SEND, env)[0], 200)
        ack = self.bob.signed(ts=now, ack=["e" * 64])
        self.assertEqual(self.call(n, "POST", ACK, {"acks": [ack]})[1]["results"], [{"status": "applied"}])
        answer = self.call(
            n,
            "POST",
            BODIES,
            {
                "envelopes": [env["msg_id"], "f" * 64],
                "acks": [
                    {"mailbox": ack["mailbox"], "nonce": ack["nonce"]},
                    {"mailbox": self.bob.pub, "nonce": "A" * 22},
                ],
            },
        )[1]
        self.assertEqual((answer["envelopes"], answer["acks"], answer["gone"]["envelopes"]), ([env], [ack], ["f" * 64]))
        self.assertEqual(self.call(n, "POST", BODIES, {"envelopes": []})[1]["error"], "bad_request")
        self.assertEqual(self.call(n, "POST", BODIES, raw=b"{")[1]["error"], "bad_json")
        self.assertEqual(
            self.call(n, "POST", BODIES, {"envelopes": [], "acks": []}, ctype="text/plain")[1]["error"],
            "unsupported_media_type",
        )
        self._peer_gate_answers(BODIES, "POST", {"envelopes": [], "acks": []})
        self.assert_all_seen(BODIES, "POST")
