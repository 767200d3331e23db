"""Schema fuzzing (schemathesis) of a live ``twistd meshrelay`` node, client routes and HMAC-gated peer routes.

Requests are generated from ``docs/openapi.yaml``, valid by the schema (positive) and invalid
(negative), and sent over a real loopback socket to a real node process. Peer routes are fuzzed
twice: signed with valid peer auth as a configured peer (a hook MACs each request exactly as
sent, so the fuzzer reaches past the gate), and unsigned (every answer must be 403). Some
positive cases are re-signed with real keys (client envelopes and polls, replicas, peer acks),
so the fuzzer also reaches the store: deposits, caps, dedup, acks, nonces.

Every answer must be: never 5xx; every non-2xx in the protocol's error shape; conforming to the
spec (status documented, content type, body schema); negative data refused. Afterwards the store
must be unharmed: envelopes deposited before fuzzing are intact and pollable, a tombstone made
before still stops its envelope, the node answers health, and after a clean stop SQLite's
``integrity_check`` is ok and the node's counters match its rows.

Bounded and reproducible by default (a fixed number of examples per operation and mode,
derandomized). A longer fuzz: ``MESHRELAY_FUZZ_EXAMPLES=2000`` (examples per operation and mode),
optionally ``MESHRELAY_FUZZ_SEED=<int>`` for a random but replayable run (docs/testing.md).
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, reject, seed, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from twisted.trial.unittest import TestCase

from meshrelay import envelope as E
from meshrelay.peers import H_HMAC, H_NONCE, H_TS, H_URL
from meshrelay.store.sqlite import DB_NAME, TOMBSTONE_BYTES
from tests.apispec import error_shape_problems, load_spec, peer_headers
from tests.harness import NodeProcess, free_port
from tests.helpers import Identity

pytestmark = pytest.mark.integration

#: examples per operation and generation mode
DEFAULT_EXAMPLES = 40
EXAMPLES = int(os.environ.get("MESHRELAY_FUZZ_EXAMPLES", str(DEFAULT_EXAMPLES)))
#: a seed makes the run random but replayable; without one it is derandomized (the same every time)
SEED = os.environ.get("MESHRELAY_FUZZ_SEED")
#: failure guard for one request (never an assertion on speed)
GUARD = 30.0

PEER_URL = "http://peer-b.test"
PEER_SECRET = "fuzz-link-secret-0123456789"
CLOCK_SKEW = 300
AUTH_HEADERS = (H_URL, H_TS, H_NONCE, H_HMAC)

CLIENT_OPS = [
    ("/api/mesh/dm/send", "POST"),
    ("/api/mesh/dm/poll", "POST"),
    ("/api/mesh/dm/count", "POST"),
    ("/api/mesh/health", "GET"),
]
PEER_OPS = [("/api/mesh/dm/replicate-envelope", "POST"), ("/api/mesh/dm/ack", "POST"), ("/api/mesh/dm/changes", "GET")]

#: negative data must be refused with one of these (413: a value over a documented maxLength)
REFUSALS = ["400", "403", "404", "405", "413", "415", "422", "429"]


def fuzz_settings(fn: Any, examples: int = EXAMPLES) -> Any:
    """Bounded, reproducible hypothesis settings (no deadline: a live node answers when it answers)."""
    fn = settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=SEED is None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )(fn)
    return seed(int(SEED))(fn) if SEED is not None else fn


def load_schema() -> Any:
    config = SchemathesisConfig.from_dict({"checks": {"negative_data_rejection": {"expected-statuses": REFUSALS}}})
    return schemathesis.openapi.from_dict(load_spec(), config=config)


def _is_key(value: Any) -> bool:
    try:
        return isinstance(value, str) and len(E.b64u_decode(value)) == E.KEY_LEN
    except ValueError:
        return False


class LiveNodeFuzzTests(TestCase):
    """One real node per test; a set of envelopes (and one tombstone) deposited before fuzzing."""

    timeout = 600

    def setUp(self) -> None:
        self.schema = load_schema()
        # The peer's URL is an identity; it dials a closed local port, so this node's own
        # pulls and fetch_remote fail at once instead of waiting on DNS.
        peer = {"url": PEER_URL, "secret": PEER_SECRET, "connect": f"http://127.0.0.1:{free_port()}"}
        self.node = NodeProcess(
            self.mktemp(),
            "fuzz",
            peers=[peer],
            config={"limits": {"clock_skew": CLOCK_SKEW}, "sync": {"interval": 3600, "fetch_remote_timeout": 1}},
        ).start()
        self.addCleanup(self.node.kill)
        self.session = requests.Session()
        self.addCleanup(self.session.close)
        # The mailbox whose mail must survive: the fuzzer never holds its key.
        self.keep_box, self.keep_sender = Identity(), Identity()
        # The mailbox and sender the fuzzer re-signs with (its cases reach the store).
        self.fuzz_box, self.fuzz_sender = Identity(), Identity()
        now = int(time.time())
        self.kept = [self.keep_sender.envelope(self.keep_box, b"kept %d" % i, ts=now) for i in range(5)]
        self.acked = self.keep_sender.envelope(self.keep_box, b"acked before fuzzing", ts=now)
        for env in [*self.kept, self.acked]:
            self.assertEqual(self.node.send(env)[0], 200)
        self.assertEqual(self.poll_keep(ack=[self.acked["msg_id"]])[0], 200)
        #: (path, status, code) answers seen, and per-item results of the peer intake
        self.seen: set[tuple[str, int, str | None]] = set()
        self.items: set[tuple[str, str, str | None]] = set()

    # ------------------------------------------------------------------ the keep mailbox

    def poll_keep(self, ack: list[str] | None = None) -> tuple[int, Any]:
        body = self.keep_box.poll_body(ts=int(time.time()), ack=ack or ())
        return self.node.request("POST", "/api/mesh/dm/poll", body)

    def assert_unharmed(self) -> None:
        """The mail deposited before fuzzing is intact; the node is healthy; SQLite is consistent."""
        status, health = self.node.request("GET", "/api/mesh/health")
        self.assertEqual((status, health["ok"]), (200, True))
        status, body = self.poll_keep()
        self.assertEqual(status, 200, body)
        self.assertEqual(body["messages"], self.kept)
        status, body = self.node.request("POST", "/api/mesh/dm/count", self.keep_box.poll_body(ts=int(time.time())))
        self.assertEqual((status, body["count"]), (200, len(self.kept)))
        # The tombstone made before fuzzing still stops its envelope.
        self.assertEqual(
            self.node.send(self.acked), (200, {"ok": True, "msg_id": self.acked["msg_id"], "duplicate": True})
        )
        self.assertEqual(self.poll_keep()[1]["messages"], self.kept)
        code = self.node.stop()
        self.assertIn(code, (0, -15))
        db = sqlite3.connect(os.path.join(self.node.data_dir, DB_NAME))
        try:
            self.assertEqual(db.execute("PRAGMA integrity_check").fetchall(), [("ok",)])
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            count, size = db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM envelopes").fetchone()
            # acks and tombstones are storage too
            (acked,) = db.execute("SELECT COALESCE(SUM(size), 0) FROM acks").fetchone()
            (tombs,) = db.execute("SELECT COUNT(*) FROM tombstones").fetchone()
            size += acked + TOMBSTONE_BYTES * tombs
            self.assertEqual((int(meta["stored_count"]), int(meta["stored_bytes"])), (count, size))
            (last_seq,) = db.execute(
                "SELECT MAX(seq) FROM (SELECT seq FROM envelopes UNION ALL SELECT seq FROM acks)"
            ).fetchone()
            self.assertGreaterEqual(int(meta["last_seq"]), last_seq or 0)
            for env in self.kept:
                (stored,) = db.execute("SELECT body FROM envelopes WHERE msg_id = ?", (env["msg_id"],)).fetchone()
                self.assertEqual(json.loads(stored), env)
        finally:
            db.close()

    # ------------------------------------------------------------------ re-signing positive cases

    def _envelope(self, data: Any, obj: Any) -> Any:
        """A generated envelope re-signed by the fuzz sender (its ciphertext and ttl kept; ts near now)."""
        if not isinstance(obj, dict):
            return obj
        text = obj.get("ciphertext")
        try:
            ciphertext = E.b64u_decode(text) if isinstance(text, str) else b""
        except ValueError:
            ciphertext = text.encode("utf-8", "replace")[:4096]  # type: ignore[union-attr]
        ttl = obj.get("ttl")
        if isinstance(ttl, float) and ttl.is_integer() and 0 <= ttl <= E.MAX_INT:
            ttl = int(ttl)
        if type(ttl) is not int:
            ttl = 3600
        given_box = obj.get("mailbox")
        mailbox = (
            given_box
            if isinstance(given_box, str) and _is_key(given_box) and data.draw(st.booleans())
            else self.fuzz_box.pub
        )
        ts = int(time.time()) + data.draw(st.integers(-2 * CLOCK_SKEW, 2 * CLOCK_SKEW), label="ts offset")
        return E.make_envelope(self.fuzz_sender.key, mailbox, ciphertext, ts, ttl)

    def _signed(self, data: Any, obj: Any, count: bool = False) -> Any:
        """A generated poll/count/ack re-signed by the fuzz mailbox; sometimes it tries to ack the kept mail."""
        if not isinstance(obj, dict) or not isinstance(obj.get("ack", []), list):
            return obj
        ack = [] if count else [a for a in obj.get("ack", []) if isinstance(a, str)]
        if not count and data.draw(st.booleans(), label="ack another mailbox's mail"):
            ack += [env["msg_id"] for env in self.kept]
        nonce = obj.get("nonce")
        try:
            nonce_bytes = E.b64u_decode(nonce) if isinstance(nonce, str) else b""
        except ValueError:
            nonce_bytes = b""
        if len(nonce_bytes) != E.NONCE_LEN:
            nonce_bytes = os.urandom(E.NONCE_LEN)
        ts = int(time.time()) + data.draw(st.integers(-2 * CLOCK_SKEW, 2 * CLOCK_SKEW), label="ts offset")
        try:
            signed = E.make_signed_request(self.fuzz_box.key, ts, nonce_bytes, ack)
        except UnicodeEncodeError:
            return obj
        out = {**obj, **signed}
        if "wait" in out:
            out["wait"] = 0  # a valid long-poll on an empty mailbox would hold its answer for up to 30 s
        return out

    def resign(self, path: str, body: Any, data: Any) -> Any:
        if path.endswith("/send"):
            return self._envelope(data, body)
        if path.endswith("/poll") or path.endswith("/count"):
            return self._signed(data, body, count=path.endswith("/count"))
        if path.endswith("/replicate-envelope") and isinstance(body, dict):
            if "envelope" in body:
                return {**body, "envelope": self._envelope(data, body["envelope"])}
            if isinstance(body.get("envelopes"), list):
                return {**body, "envelopes": [self._envelope(data, e) for e in body["envelopes"]]}
        if path.endswith("/ack") and isinstance(body, dict) and isinstance(body.get("acks"), list):
            return {**body, "acks": [self._signed(data, a) for a in body["acks"]]}
        return body

    # ------------------------------------------------------------------ one case

    def send_case(self, case: Any, data: Any, mode: GenerationMode, signed: bool) -> None:
        path = case.path
        resigned = False
        if mode == GenerationMode.POSITIVE and (signed or not path.endswith(("/replicate-envelope", "/ack"))):
            if isinstance(case.body, dict) and data.draw(st.booleans(), label="re-sign"):
                case.body = self.resign(path, case.body, data)
                resigned = True
        kw = case.as_transport_kwargs(base_url=self.node.url)
        fields = ("method", "url", "headers", "params", "data", "json", "cookies")
        try:
            prepared = self.session.prepare_request(requests.Request(**{k: kw[k] for k in fields if k in kw}))
            if signed:
                body = prepared.body or b""
                assert isinstance(body, (bytes, str)), type(body)
                raw = body.encode("utf-8") if isinstance(body, str) else body
                headers = peer_headers(
                    PEER_URL, PEER_SECRET, prepared.method or "", prepared.path_url, raw, time.time()
                )
                for name in headers:
                    prepared.headers.pop(name, None)
                prepared.headers.update(headers)
            response = self.session.send(prepared, timeout=GUARD)
        except (requests.exceptions.InvalidHeader, requests.exceptions.InvalidURL, UnicodeError) as e:
            # Not sendable by an HTTP client (a header with a line break, say): not a request at all.
            reject()
            raise AssertionError("unreachable") from e
        where = f"{prepared.method} {prepared.url}\nbody: {str(prepared.body)[:500]}\nanswer: {response.text[:500]}"
        self.assertLess(response.status_code, 500, where)
        try:
            answer = response.json()
        except ValueError:
            self.fail(f"answer is not JSON\n{where}")
        if response.status_code >= 400:
            self.assertEqual(error_shape_problems(response.status_code, answer), [], where)
        else:
            self.assertIs(answer.get("ok"), True, where)
        if path.endswith(("/replicate-envelope", "/ack", "/changes")) and not signed:
            # The gate refuses every unsigned request; only the body cap comes before it (4).
            refusal = (response.status_code, answer["error"])
            self.assertIn(refusal, ((403, "forbidden"), (413, "too_large")), where)
        checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
        if not resigned:
            checks.append(negative_data_rejection)
        case.validate_response(response, checks=checks)
        self.seen.add((path, response.status_code, answer.get("error")))
        if response.status_code == 200 and path.endswith(("/replicate-envelope", "/ack")):
            self.items.update((path, r["status"], r.get("error")) for r in answer["results"])

    def fuzz(self, ops: list[tuple[str, str]], signed: bool) -> None:
        for path, method in ops:
            op = self.schema[path][method]
            modes = [GenerationMode.POSITIVE]
            if op.body or op.query or op.headers:
                modes.append(GenerationMode.NEGATIVE)
            for mode in modes:
                self.fuzz_one(op, mode, signed)

    def fuzz_one(self, op: Any, mode: GenerationMode, signed: bool) -> None:
        # Signed, the X-Peer-* headers are the hook's: fixed here, so negative cases
        # are negative in their body or query, which is what reaches the node.
        fixed = dict.fromkeys(AUTH_HEADERS, "0") if signed else None

        @fuzz_settings
        @given(case=op.as_strategy(generation_mode=mode, headers=fixed), data=st.data())
        def run(case: Any, data: Any) -> None:
            self.send_case(case, data, mode, signed)

        run()

    def assert_reached(self, wanted: set[Any], seen: set[Any]) -> None:
        """The fuzz got past parsing into the store (with at least the CI number of examples)."""
        if EXAMPLES >= DEFAULT_EXAMPLES:
            self.assertEqual(wanted - seen, set())

    # ------------------------------------------------------------------ the tests

    def test_client_routes(self) -> None:
        """Fuzzed client requests: no 5xx, the error shape, the spec's answers; the store is unharmed."""
        self.fuzz(CLIENT_OPS, signed=False)
        self.assert_reached(
            {("/api/mesh/dm/send", 200, None), ("/api/mesh/dm/poll", 200, None), ("/api/mesh/dm/count", 200, None)},
            self.seen,
        )
        self.assert_unharmed()

    def test_peer_routes_signed(self) -> None:
        """Fuzzed peer requests with valid peer auth: the same checks, and the gate was passed."""
        self.fuzz(PEER_OPS, signed=True)
        self.assert_reached({("/api/mesh/dm/changes", 200, None)}, self.seen)
        self.assert_reached(
            {("/api/mesh/dm/replicate-envelope", "accepted", None), ("/api/mesh/dm/ack", "applied", None)}, self.items
        )
        self.assert_unharmed()

    def test_peer_routes_unsigned(self) -> None:
        """Fuzzed peer requests without valid auth (fuzzed X-Peer-* headers) are all 403 forbidden (or 413)."""
        self.fuzz(PEER_OPS, signed=False)
        self.assertIn(403, {status for _, status, _ in self.seen})
        self.assertLessEqual({status for _, status, _ in self.seen}, {403, 413})
        self.assert_unharmed()

    def test_raw_http(self) -> None:
        """Raw HTTP below the API (methods, paths, headers, framing, bodies): always a 4xx/2xx in the error shape."""
        answered: set[int] = set()

        @given(request=raw_requests())
        def run(request: tuple[str, bytes]) -> None:
            method, data = request
            status, body = self.raw_exchange(data)
            answered.add(status)
            where = f"request {data[:300]!r}\nanswer {status} {body[:300]!r}"
            self.assertLess(status, 500, where)
            if method != "HEAD" and status >= 400:
                try:
                    answer = json.loads(body)
                except ValueError:
                    self.fail(f"not JSON\n{where}")
                self.assertEqual(error_shape_problems(status, answer), [], where)

        fuzz_settings(run, examples=5 * EXAMPLES)()  # cheap: one small request each
        if EXAMPLES >= DEFAULT_EXAMPLES:
            self.assertIn(400, answered)
        self.assert_unharmed()

    def raw_exchange(self, data: bytes) -> tuple[int, bytes]:
        """Send ``data`` on a fresh connection; the first final answer's status and (de-chunked) body."""
        with socket.create_connection(("127.0.0.1", self.node.port), timeout=GUARD) as conn:
            conn.sendall(data)
            raw = b""
            while chunk := conn.recv(65536):
                raw += chunk
        while raw[:13] in (b"HTTP/1.1 100 ", b"HTTP/1.0 100 "):
            raw = raw.split(b"\r\n\r\n", 1)[1]
        head, _, payload = raw.partition(b"\r\n\r\n")
        self.assertIn(head[:9], (b"HTTP/1.1 ", b"HTTP/1.0 "), f"no HTTP answer to {data[:300]!r}: {raw[:300]!r}")
        status = int(head.split(b" ", 2)[1])
        headers = head.lower()
        if b"\r\ntransfer-encoding: chunked" in headers:
            body = b""
            while payload:
                size_line, _, payload = payload.partition(b"\r\n")
                size = int(size_line, 16)
                if size == 0:
                    break
                body, payload = body + payload[:size], payload[size + 2 :]
            return status, body
        return status, payload


RAW_PATHS = [
    "/api/mesh/dm/send",
    "/api/mesh/dm/poll",
    "/api/mesh/dm/count",
    "/api/mesh/health",
    "/api/mesh/dm/replicate-envelope",
    "/api/mesh/dm/ack",
    "/api/mesh/dm/changes?since=0&limit=5",
    "/api/mesh/dm/changes?since=%ff",
    "/api/mesh/dm/send/",
    "//api/mesh/dm/send",
    "/api/mesh/dm/%73end",
    "/",
    "*",
    "http://127.0.0.1/api/mesh/health",
]
RAW_CTYPES = [
    "application/json",
    "application/json; charset=utf-8",
    "APPLICATION/JSON",
    "text/plain",
    "application/jsonx",
]


@st.composite
def raw_requests(draw: Any) -> tuple[str, bytes]:
    """A request as bytes: method, target, headers, framing and body from lists of the awkward."""
    method = draw(st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "FOO", "get"]))
    target = draw(st.sampled_from(RAW_PATHS) | st.from_regex(r"/[!-~]{0,40}", fullmatch=True))
    body = draw(
        st.sampled_from([b"", b"{}", b"[]", b"null", b'{"envelope": {}}', b'{"acks": []}', b"\xff\xfe", b"[" * 3000])
        | st.binary(max_size=200)
    )
    headers = ["Host: 127.0.0.1", "Connection: close"]
    ctype = draw(st.none() | st.sampled_from(RAW_CTYPES))
    if ctype is not None:
        headers.append(f"Content-Type: {ctype}")
    extra = st.sampled_from(
        [
            "Expect: 100-continue",
            "X-Peer-Url: http://peer-b.test",
            "X-Peer-Timestamp: 99999999999999999999",
            "X-Forwarded-For: 10.0.0.1",
            "Content-Type: text/plain",
            "X-Thing: a\x00b",
            "no colon here",
            "X-Latin: \xe9t\xe9",
        ]
    )
    headers += draw(st.lists(extra, max_size=2))
    framing = draw(st.sampled_from(["length", "length", "chunked", "none", "short", "both", "twice", "bad chunk"]))
    if framing == "length":
        headers.append(f"Content-Length: {len(body)}")
    elif framing == "short":  # the rest of the body reads as a second, garbled request
        headers.append(f"Content-Length: {len(body) // 2}")
    elif framing == "both":
        headers += [f"Content-Length: {len(body)}", "Transfer-Encoding: chunked"]
    elif framing == "twice":
        headers += [f"Content-Length: {len(body)}", f"Content-Length: {len(body) + 1}"]
    elif framing in ("chunked", "bad chunk"):
        headers.append("Transfer-Encoding: chunked")
        size = b"%x" % len(body) if framing == "chunked" else b"zz"
        body = (size + b"\r\n" + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
    else:
        body = b""
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1x"]))
    head = f"{method} {target} {version}\r\n" + "\r\n".join(headers) + "\r\n\r\n"
    return method, head.encode("latin-1") + body
