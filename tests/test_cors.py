"""CORS on the client API (and only there), and the browser inbox the node can serve."""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from meshrelay.config import ConfigError, build_config, load_config
from meshrelay.cors import CorsPolicy, normalize_origin
from tests.harness import NodeProcess
from tests.helpers import Identity, MemNode, make_config, stub_answer

PAGE = "https://inbox.example"
CLIENT_ROUTES = [
    ("POST", "/api/mesh/dm/send"),
    ("POST", "/api/mesh/dm/poll"),
    ("POST", "/api/mesh/dm/count"),
    ("GET", "/api/mesh/health"),
]
PEER_ROUTES = [
    ("POST", "/api/mesh/dm/replicate-envelope"),
    ("POST", "/api/mesh/dm/ack"),
    ("GET", "/api/mesh/dm/changes?since=0"),
]


def node_with(tmp: str, web: dict[str, Any] | None = None, **limits: Any) -> MemNode:
    limits.setdefault("client_rate", 0)
    raw: dict[str, Any] = {"node": {"data_dir": tmp, "public_url": "http://a.test"}, "limits": limits}
    if web is not None:
        raw["web"] = web
    return MemNode(tmp, config=build_config(raw))


def answer(n: MemNode, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
    """(status, headers, decoded body or None) of one request through the node's real resource."""
    d = n.start_request(method, path, body, headers=headers)
    resp, text = stub_answer(n.http, d)
    return resp.code, resp.headers, (json.loads(text) if text else None)


def header(headers: Any, name: str) -> str | None:
    values = headers.getRawHeaders(name)
    return None if not values else values[0]


class CorsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.n = MemNode(self.mktemp())
        self.addCleanup(self.n.stop)
        self.alice, self.bob = Identity(), Identity()

    def test_preflight_of_every_client_route(self) -> None:
        """OPTIONS on a client route answers 204 with the preflight headers (it answered 405 before)."""
        for method, path in CLIENT_ROUTES:
            status, headers, _ = answer(
                self.n,
                "OPTIONS",
                path,
                headers={
                    "Origin": PAGE,
                    "Access-Control-Request-Method": method,
                    "Access-Control-Request-Headers": "content-type",
                },
            )
            self.assertEqual(status, 204, path)
            self.assertEqual(header(headers, "Access-Control-Allow-Origin"), "*")
            self.assertIn(method, header(headers, "Access-Control-Allow-Methods") or "")
            self.assertEqual((header(headers, "Access-Control-Allow-Headers") or "").lower(), "content-type")
            self.assertIsNotNone(header(headers, "Access-Control-Max-Age"))
            self.assertIsNone(header(headers, "Access-Control-Allow-Credentials"))
            self.assertEqual(header(headers, "Allow"), f"{method}, OPTIONS")

    def test_policy_route_answers_cors_for_get_and_post(self) -> None:
        """The v3 policy route answers a preflight for GET and POST, and its answers carry the origin."""
        for method in ("GET", "POST"):
            status, headers, _ = answer(
                self.n,
                "OPTIONS",
                "/api/mesh/dm/policy",
                headers={"Origin": PAGE, "Access-Control-Request-Method": method},
            )
            self.assertEqual(status, 204)
            self.assertIn(method, header(headers, "Access-Control-Allow-Methods") or "")
            self.assertEqual(header(headers, "Allow"), "GET, POST, OPTIONS")
        status, headers, doc = answer(
            self.n, "GET", f"/api/mesh/dm/policy?mailbox={self.bob.pub}", headers={"Origin": PAGE}
        )
        self.assertEqual((status, doc), (200, {"ok": True, "policy": None}))
        self.assertEqual(header(headers, "Access-Control-Allow-Origin"), "*")
        status, headers, doc = answer(self.n, "POST", "/api/mesh/dm/policy", {}, headers={"Origin": PAGE})
        self.assertEqual((status, doc["error"]), (400, "bad_policy"))
        self.assertEqual(header(headers, "Access-Control-Allow-Origin"), "*")

    def test_real_answers_carry_the_origin_and_expose_retry_after(self) -> None:
        """send, poll, count and health answers carry Access-Control-Allow-Origin and expose Retry-After."""
        env = self.alice.envelope(self.bob, ts=int(self.n.clock.seconds()))
        bodies = {"send": env, "poll": self.bob.poll_body(ts=int(self.n.clock.seconds())), "count": None}
        bodies["count"] = self.bob.signed(ts=int(self.n.clock.seconds()))
        for method, path in CLIENT_ROUTES:
            body = bodies.get(path.rsplit("/", 1)[1])
            status, headers, doc = answer(self.n, method, path, body, headers={"Origin": PAGE})
            self.assertEqual(status, 200, (path, doc))
            self.assertEqual(header(headers, "Access-Control-Allow-Origin"), "*", path)
            self.assertEqual(header(headers, "Access-Control-Expose-Headers"), "Retry-After", path)

    def test_error_answers_carry_it_too(self) -> None:
        """Refusals of client routes (400, 415, 405, 422, 429 sender_cap) carry it, so a page can read the code."""
        now = int(self.n.clock.seconds())
        cases: list[tuple[str, str, Any, dict[str, str], int, str]] = [
            ("POST", "/api/mesh/dm/send", {"v": 1}, {}, 400, "bad_envelope"),
            ("POST", "/api/mesh/dm/poll", {"mailbox": "x"}, {}, 400, "bad_request"),
            ("POST", "/api/mesh/dm/count", {}, {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
            ("GET", "/api/mesh/dm/send", None, {}, 405, "method_not_allowed"),
            ("POST", "/api/mesh/dm/send", self.alice.envelope(self.bob, ts=now - 10000), {}, 422, "bad_timestamp"),
        ]
        for method, path, body, extra, want_status, code in cases:
            status, headers, doc = answer(self.n, method, path, body, headers={"Origin": PAGE, **extra})
            self.assertEqual((status, doc["error"]), (want_status, code))
            self.assertEqual(header(headers, "Access-Control-Allow-Origin"), "*", code)
        for i in range(9):
            status, headers, doc = answer(
                self.n,
                "POST",
                "/api/mesh/dm/send",
                self.alice.envelope(self.bob, text=b"%d" % i, ts=now),
                {"Origin": PAGE},
            )
        self.assertEqual((status, doc["error"]), (429, "sender_cap"))
        self.assertEqual(header(headers, "Access-Control-Allow-Origin"), "*")
        self.assertEqual(header(headers, "Access-Control-Expose-Headers"), "Retry-After")

    def test_rate_limited_answer_carries_it(self) -> None:
        """The per-address 429 answered before the client API runs carries the CORS headers."""
        n = node_with(self.mktemp(), client_rate=1, client_burst=1)
        self.addCleanup(n.stop)
        answer(n, "GET", "/api/mesh/health", headers={"Origin": PAGE})
        status, headers, doc = answer(n, "GET", "/api/mesh/health", headers={"Origin": PAGE})
        self.assertEqual((status, doc["error"]), (429, "rate_limited"))
        self.assertEqual(header(headers, "Access-Control-Allow-Origin"), "*")

    def test_never_on_peer_routes_or_unknown_paths(self) -> None:
        """Peer routes and unknown paths carry no CORS header, and OPTIONS there is not a preflight."""
        for method, path in [*PEER_ROUTES, ("GET", "/nope")]:
            for verb in (method, "OPTIONS"):
                status, headers, _ = answer(self.n, verb, path, {}, headers={"Origin": PAGE})
                self.assertNotEqual(status, 204, (verb, path))
                for name in (
                    "Access-Control-Allow-Origin",
                    "Access-Control-Allow-Methods",
                    "Access-Control-Expose-Headers",
                ):
                    self.assertIsNone(header(headers, name), (verb, path))

    def test_long_poll_keeps_working(self) -> None:
        """A cross-origin long-poll waits, is woken by a deposit, and its answer carries the headers."""
        now = int(self.n.clock.seconds())
        d = self.n.start_request(
            "POST", "/api/mesh/dm/poll", self.bob.poll_body(ts=now, wait=20), headers={"Origin": PAGE}
        )
        self.n.http.flush()
        self.assertEqual(self.n.relay.waiting, 1)
        self.assertNoResult(d)
        self.assertEqual(self.n.send(self.alice.envelope(self.bob, ts=now))[0], 200)
        resp, text = stub_answer(self.n.http, d)
        self.assertEqual(resp.code, 200)
        self.assertEqual(len(json.loads(text)["messages"]), 1)
        self.assertEqual(header(resp.headers, "Access-Control-Allow-Origin"), "*")

    def test_oversize_body_answer_carries_it(self) -> None:
        """The 413 written before any resource runs carries the CORS headers on a client route, not on a peer route."""
        site = self.n.node.site()
        for path, want in (("/api/mesh/dm/send", True), ("/api/mesh/dm/replicate-envelope", False)):
            proto = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
            transport = StringTransport()
            proto.makeConnection(transport)
            proto.dataReceived(
                f"POST {path} HTTP/1.1\r\nHost: a.test\r\nOrigin: {PAGE}\r\nContent-Type: application/json\r\n"
                "Content-Length: 100000000\r\n\r\n".encode()
            )
            head = transport.value().split(b"\r\n\r\n", 1)[0]
            self.assertTrue(head.startswith(b"HTTP/1.1 413 "), head)
            self.assertEqual(b"\r\nAccess-Control-Allow-Origin: *" in head, want, head)


class CorsOriginListTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.n = node_with(self.mktemp(), web={"cors_origins": "https://Inbox.example:443, http://localhost:3000"})
        self.addCleanup(self.n.stop)

    def test_listed_origin_is_echoed(self) -> None:
        """With a list, a listed origin is echoed back (normalised), with Vary: Origin."""
        for origin in (PAGE, "http://localhost:3000"):
            status, headers, _ = answer(self.n, "GET", "/api/mesh/health", headers={"Origin": origin})
            self.assertEqual(status, 200)
            self.assertEqual(header(headers, "Access-Control-Allow-Origin"), origin)
            self.assertEqual(header(headers, "Vary"), "Origin")

    def test_other_origins_get_no_allow_origin(self) -> None:
        """An unlisted origin (or none) gets no Access-Control-Allow-Origin: the browser refuses, the node serves."""
        for hdrs in ({"Origin": "https://evil.example"}, {"Origin": "null"}, {}):
            status, headers, _ = answer(self.n, "GET", "/api/mesh/health", headers=hdrs)
            self.assertEqual(status, 200)
            self.assertIsNone(header(headers, "Access-Control-Allow-Origin"))
            status, headers, _ = answer(
                self.n, "OPTIONS", "/api/mesh/dm/send", headers={**hdrs, "Access-Control-Request-Method": "POST"}
            )
            self.assertEqual(status, 204)
            self.assertIsNone(header(headers, "Access-Control-Allow-Origin"))
            self.assertIsNone(header(headers, "Access-Control-Allow-Methods"))

    def test_empty_turns_cors_off(self) -> None:
        """cors_origins = "" sends no CORS header at all."""
        n = node_with(self.mktemp(), web={"cors_origins": ""})
        self.addCleanup(n.stop)
        status, headers, _ = answer(n, "GET", "/api/mesh/health", headers={"Origin": PAGE})
        self.assertEqual(status, 200)
        self.assertIsNone(header(headers, "Access-Control-Allow-Origin"))


class CorsConfigTests(SynchronousTestCase):
    def test_origins_are_validated(self) -> None:
        """web.cors_origins refuses paths, other schemes and "*" in a list, naming the key."""
        for bad in ("https://a.example/path", "ftp://a.example", "*, https://a.example", "a.example", 5):
            with self.assertRaises(ConfigError) as cm:
                build_config({"web": {"cors_origins": bad}})
            self.assertIn("web.cors_origins", str(cm.exception))

    def test_normalize_origin(self) -> None:
        """Origins compare as browsers send them: lower-case, no default port."""
        self.assertEqual(normalize_origin("HTTPS://A.Example:443/"), "https://a.example")
        self.assertEqual(normalize_origin("http://[::1]:8080"), "http://[::1]:8080")
        self.assertEqual(CorsPolicy("").enabled, False)
        self.assertEqual(CorsPolicy("*").allow_origin(None), b"*")

    def test_inbox_dir_must_hold_index_html(self) -> None:
        """web.inbox_dir is resolved against the config file and must contain index.html."""
        d = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(d, "inbox"))
        path = os.path.join(d, "n.toml")
        with open(path, "w") as fh:
            fh.write('[web]\ninbox_dir = "inbox"\n')
        with self.assertRaises(ConfigError) as cm:
            load_config(path)
        self.assertIn("web.inbox_dir: no index.html", str(cm.exception))
        with open(os.path.join(d, "inbox", "index.html"), "w") as fh:
            fh.write("<!doctype html>")
        self.assertEqual(load_config(path).web.inbox_dir, os.path.join(d, "inbox"))


class InboxTests(SynchronousTestCase):
    def setUp(self) -> None:
        tmp = os.path.abspath(self.mktemp())
        self.dir = os.path.join(tmp, "inbox")
        os.makedirs(os.path.join(self.dir, "sub"))
        for name, data in (("index.html", b"<!doctype html>hi"), ("app.js", b"1;"), ("sub/x.js", b"2;")):
            with open(os.path.join(self.dir, name), "wb") as fh:
                fh.write(data)
        with open(os.path.join(tmp, "secret.txt"), "wb") as fh:
            fh.write(b"secret")
        self.n = node_with(os.path.join(tmp, "data"), web={"inbox_dir": self.dir})
        self.addCleanup(self.n.stop)

    def test_serves_the_page_and_its_files(self) -> None:
        """/inbox/ is index.html and /inbox/app.js the script, with types and a content security policy."""
        d = self.n.start_request("GET", "/inbox/", headers={})
        resp, text = stub_answer(self.n.http, d)
        self.assertEqual((resp.code, text), (200, b"<!doctype html>hi"))
        self.assertEqual(header(resp.headers, "Content-Type"), "text/html; charset=utf-8")
        self.assertIn("frame-ancestors 'none'", header(resp.headers, "Content-Security-Policy") or "")
        resp, text = stub_answer(self.n.http, self.n.start_request("GET", "/inbox/app.js"))
        self.assertEqual((resp.code, text), (200, b"1;"))
        self.assertEqual(header(resp.headers, "Content-Type"), "text/javascript; charset=utf-8")
        resp, _ = stub_answer(self.n.http, self.n.http.get("http://a.test/inbox", allow_redirects=False))
        self.assertEqual((resp.code, header(resp.headers, "Location")), (308, "/inbox/"))

    def test_nothing_outside_the_directory(self) -> None:
        """Traversal, sub-directories, dot files and unknown types are 404; other methods 405."""
        for path in (
            "/inbox/../secret.txt",
            "/inbox/%2e%2e/secret.txt",
            "/inbox/sub/x.js",
            "/inbox/sub",
            "/inbox/.x",
            "/inbox/missing.js",
            "/inbox/index.exe",
        ):
            status, _, doc = answer(self.n, "GET", path)
            self.assertEqual((status, doc["error"]), (404, "not_found"), path)
        status, _, doc = answer(self.n, "POST", "/inbox/", {})
        self.assertEqual((status, doc["error"]), (405, "method_not_allowed"))

    def test_off_by_default(self) -> None:
        """Without web.inbox_dir, /inbox/ is an unknown path."""
        n = MemNode(self.mktemp())
        self.addCleanup(n.stop)
        self.assertEqual(answer(n, "GET", "/inbox/")[0], 404)
        self.assertEqual(make_config(self.mktemp()).web.inbox_dir, "")


@pytest.mark.integration
class RealNodeCorsTests(SynchronousTestCase):
    def setUp(self) -> None:
        base = os.path.abspath(self.mktemp())
        inbox = os.path.join(base, "inbox")
        os.makedirs(inbox)
        with open(os.path.join(inbox, "index.html"), "w") as fh:
            fh.write("<!doctype html><title>inbox</title>")
        self.node = NodeProcess(base, "n", config={"web": {"inbox_dir": inbox}}).start()
        self.addCleanup(self.node.stop)

    def test_preflight_long_poll_and_inbox_over_real_sockets(self) -> None:
        """On a real twistd node: a preflight, a cross-origin long-poll woken by a deposit, and /inbox/."""
        status, body = self.node.request(
            "OPTIONS", "/api/mesh/dm/poll", headers={"Origin": PAGE, "Access-Control-Request-Method": "POST"}
        )
        self.assertEqual((status, body), (204, b""))
        alice, bob = Identity(), Identity()
        result: list[Any] = []
        conn = http.client.HTTPConnection("127.0.0.1", self.node.port, timeout=60)
        self.addCleanup(conn.close)
        conn.request(
            "POST",
            "/api/mesh/dm/poll",
            body=json.dumps(bob.poll_body(ts=int(time.time()), wait=30)),
            headers={"Content-Type": "application/json", "Origin": PAGE},
        )
        waiter = threading.Thread(target=lambda: result.append(conn.getresponse()))
        waiter.start()
        # The poll waits (the node's gauge says so) until the deposit wakes it.
        for _ in range(3000):
            if self.node.metric("meshrelay_waiting_polls") >= 1:
                break
            time.sleep(0.02)
        self.assertEqual(self.node.metric("meshrelay_waiting_polls"), 1)
        self.assertEqual(self.node.send(alice.envelope(bob, ts=int(time.time())))[0], 200)
        waiter.join(60)
        resp = result[0]
        self.assertEqual(resp.status, 200)
        self.assertEqual(resp.getheader("Access-Control-Allow-Origin"), "*")
        self.assertEqual(len(json.loads(resp.read())["messages"]), 1)
        status, page = self.node.request("GET", "/inbox/")
        self.assertEqual((status, page), (200, b"<!doctype html><title>inbox</title>"))
