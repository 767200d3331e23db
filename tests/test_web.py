"""Body caps enforced by the Request subclass, fed raw HTTP bytes over a fake transport."""

from __future__ import annotations

import json
from typing import Any

from klein import Klein
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IRequest
from twisted.web.server import Site

from meshrelay.errors import BadRequest
from meshrelay.web import Routes, install_error_table, json_response
from tests.helpers import Identity, MemNode


class BodyCapTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.n = MemNode(self.mktemp(), max_body_bytes=1000, max_replicate_body_bytes=2000)
        self.addCleanup(self.n.stop)
        self.site = self.n.node.site()

    def connect(self) -> tuple[object, StringTransport]:
        proto = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def head(self, path: str, extra: str) -> bytes:
        return f"POST {path} HTTP/1.1\r\nHost: a.test\r\nContent-Type: application/json\r\n{extra}\r\n".encode()

    def assert413(self, transport: StringTransport) -> None:
        raw = transport.value()
        self.assertTrue(raw.startswith(b"HTTP/1.1 413 "), raw[:80])
        body = json.loads(raw.split(b"\r\n\r\n", 1)[1])
        self.assertEqual(body["error"], "too_large")
        self.assertEqual(body["ok"], False)

    def test_content_length_over_cap_is_refused_before_reading(self) -> None:
        """A Content-Length over the cap answers 413 before any body byte is read."""
        proto, transport = self.connect()
        proto.dataReceived(self.head("/api/mesh/dm/send", "Content-Length: 1000000000\r\n"))
        self.assert413(transport)
        self.assertEqual(self.n.metrics.sample("meshrelay_http_refused_total", {"reason": "too_large"}), 1)
        # Body bytes that follow are discarded, not buffered; past a bounded excess the connection closes.
        request = proto.requests[0]  # type: ignore[attr-defined]
        for _ in range(100):
            proto.dataReceived(b"x" * 1000)
        self.assertEqual(request.content.tell(), 0)
        self.assertTrue(transport.disconnecting)

    def test_expect_continue_is_not_granted_for_oversize(self) -> None:
        """An oversize request with Expect: 100-continue gets the 413, not a 100 Continue."""
        proto, transport = self.connect()
        proto.dataReceived(self.head("/api/mesh/dm/send", "Content-Length: 5000\r\nExpect: 100-continue\r\n"))
        self.assertNotIn(b"100 Continue", transport.value())
        self.assert413(transport)

    def test_chunked_body_is_cut_off_at_the_cap(self) -> None:
        """Without Content-Length, the body is counted while read and refused once over the cap."""
        proto, transport = self.connect()
        proto.dataReceived(self.head("/api/mesh/dm/send", "Transfer-Encoding: chunked\r\n"))
        for _ in range(3):
            proto.dataReceived(b"190\r\n" + b"x" * 400 + b"\r\n")
        self.assert413(transport)
        request = proto.requests[0]  # type: ignore[attr-defined]
        self.assertLessEqual(request.content.tell(), 1000)
        proto.dataReceived(b"0\r\n\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.n.store.stats().envelopes, 0)

    def test_at_the_cap_is_read(self) -> None:
        """A body of exactly the cap is read and handled (here: not JSON -> 400)."""
        proto, transport = self.connect()
        proto.dataReceived(self.head("/api/mesh/dm/send", "Content-Length: 1000\r\n") + b"x" * 1000)
        self.n.http.flush()
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 "), transport.value()[:80])

    def test_peer_paths_get_the_replicate_cap(self) -> None:
        """Peer routes are capped by max_replicate_body_bytes, client routes by max_body_bytes."""
        proto, transport = self.connect()
        proto.dataReceived(self.head("/api/mesh/dm/replicate-envelope", "Content-Length: 1500\r\n"))
        self.assertNotIn(b"413", transport.value())
        proto, transport = self.connect()
        proto.dataReceived(self.head("/api/mesh/dm/replicate-envelope", "Content-Length: 2001\r\n"))
        self.assert413(transport)

    def test_normal_deposit_over_a_socket_like_transport(self) -> None:
        """A well-formed deposit through the real channel and Request subclass answers 200."""
        alice, bob = Identity(), Identity()
        body = json.dumps(alice.envelope(bob, ts=int(self.n.clock.seconds()))).encode()
        proto, transport = self.connect()
        proto.dataReceived(self.head("/api/mesh/dm/send", f"Content-Length: {len(body)}\r\n") + body)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "), transport.value()[:200])
        self.assertEqual(self.n.store.stats().envelopes, 1)

    def test_a_form_post_is_not_parsed_as_a_form(self) -> None:
        """A multipart/form-data POST reaches the API, which answers 415 in the error shape.

        Twisted would parse it as a form first (here: no boundary, so its bad-request path: 400).
        """
        proto, transport = self.connect()
        body = b"--x\r\nnot a part"
        proto.dataReceived(
            b"POST /api/mesh/dm/send HTTP/1.1\r\nHost: a.test\r\nContent-Type: multipart/form-data\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        raw = transport.value()
        self.assertTrue(raw.startswith(b"HTTP/1.1 415 "), raw[:80])
        self.assertIn(b'"error":"unsupported_media_type"', raw.replace(b" ", b""))

    def test_no_access_log_by_default(self) -> None:
        """The site writes no per-request log line unless access_log is on."""
        logged: list[object] = []
        self.site._logFile = type("F", (), {"write": lambda _s, line: logged.append(line)})()  # type: ignore[attr-defined]
        proto, transport = self.connect()
        proto.dataReceived(b"GET /api/mesh/health HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "))
        self.assertEqual(logged, [])


class ConnectionLimitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.n = MemNode(
            self.mktemp(),
            read_timeout=10,
            idle_timeout=30,
            max_connections=2,
            client_rate=2,
            client_burst=3,
            # every connection here comes from one address: the global cap is what is tested
            max_connections_per_address=0,
        )
        self.addCleanup(self.n.stop)
        self.site = self.n.node.site()

    def connect(self, port: int = 40000) -> tuple[object, StringTransport]:
        proto = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", port))
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def test_slow_headers_time_out(self) -> None:
        """A request whose headers drip in slower than read_timeout gets 408 and is closed."""
        proto, transport = self.connect()
        for _ in range(9):
            proto.dataReceived(b"X")
            self.n.clock.advance(1)
        self.assertFalse(transport.disconnecting)
        self.n.clock.advance(1.5)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 "))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.n.metrics.sample("meshrelay_http_refused_total", {"reason": "read_timeout"}), 1)

    def test_slow_body_times_out(self) -> None:
        """A body dripping in slower than read_timeout is cut off too."""
        proto, transport = self.connect()
        proto.dataReceived(
            b"POST /api/mesh/dm/send HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        )
        for _ in range(11):
            proto.dataReceived(b"x")
            self.n.clock.advance(1)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 "))

    def test_idle_connection_times_out(self) -> None:
        """A connection that sends nothing is closed after idle_timeout."""
        proto, transport = self.connect()
        self.n.clock.advance(29)
        self.assertFalse(transport.disconnecting)
        self.n.clock.advance(2)
        self.assertTrue(transport.disconnecting)

    def test_completed_request_clears_the_deadline(self) -> None:
        """A whole request read in time is served and its read deadline does not fire later."""
        proto, transport = self.connect()
        proto.dataReceived(b"GET /api/mesh/health HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "))
        self.n.clock.advance(15)
        self.assertNotIn(b"408", transport.value())

    def test_a_request_pipelined_behind_a_long_poll_is_not_timed_out(self) -> None:
        """Bytes that arrive while a long-poll is answered start no read deadline: the poll ends with its 200."""
        bob = Identity()
        body = json.dumps(bob.poll_body(ts=int(self.n.clock.seconds()), wait=25)).encode()
        proto, transport = self.connect()
        proto.dataReceived(
            b"POST /api/mesh/dm/poll HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        self.assertEqual(transport.value(), b"")
        # The next request starts while the poll waits (held by the channel until the poll is answered).
        proto.dataReceived(b"GET /api/mesh/health HTTP/1.1\r\n")
        for _ in range(24):
            self.n.clock.advance(1)
        self.assertEqual(transport.value(), b"")
        self.n.clock.advance(2)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "), transport.value()[:80])
        self.assertNotIn(b"408", transport.value())
        self.assertFalse(transport.disconnecting)

    def test_connection_cap(self) -> None:
        """Past max_connections new connections are refused; closing one frees a slot."""
        first, t1 = self.connect()
        self.connect()
        self.assertIsNone(self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40002)))
        self.assertEqual(self.n.metrics.sample("meshrelay_http_refused_total", {"reason": "max_connections"}), 1)
        first.connectionLost(ConnectionDone())  # type: ignore[attr-defined]
        self.assertIsNotNone(self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40003)))

    def test_client_rate_limit(self) -> None:
        """Over the per-IP rate the client API answers 429 rate_limited; tokens refill over time."""
        codes = [self.n.request("GET", "/api/mesh/health")[0] for _ in range(5)]
        self.assertEqual(codes, [200, 200, 200, 429, 429])
        status, body = self.n.request("GET", "/api/mesh/health")
        self.assertEqual(body["error"], "rate_limited")
        self.n.clock.advance(1)
        self.assertEqual(self.n.request("GET", "/api/mesh/health")[0], 200)


class ForwardedForTests(SynchronousTestCase):
    def test_header_ignored_unless_from_a_trusted_proxy(self) -> None:
        """X-Forwarded-For names the client only when the connection comes from a trusted proxy."""
        from meshrelay.web import client_ip

        class Req:
            def __init__(self, host: str, xff: bytes | None) -> None:
                self.host, self.xff = host, xff

            def getClientAddress(self) -> IPv4Address:
                return IPv4Address("TCP", self.host, 1)

            def getHeader(self, name: bytes) -> bytes | None:
                return self.xff

        proxies = frozenset({"10.0.0.1", "10.0.0.2"})
        self.assertEqual(client_ip(Req("192.0.2.7", b"1.2.3.4"), proxies), "192.0.2.7")
        self.assertEqual(client_ip(Req("10.0.0.1", b"1.2.3.4, 10.0.0.2"), proxies), "1.2.3.4")
        self.assertEqual(client_ip(Req("10.0.0.1", b"6.6.6.6, 1.2.3.4"), proxies), "1.2.3.4")
        self.assertEqual(client_ip(Req("10.0.0.1", None), proxies), "10.0.0.1")


class _RoutesApi:
    """A small Klein app for RoutesTests: static routes, a converter route, a late answer, a refusal."""

    app = Klein()
    install_error_table(app)

    def __init__(self) -> None:
        self.cancelled = 0
        self.pending: Deferred[None] = Deferred(self.cancel)

    def cancel(self, d: Deferred[None]) -> None:
        self.cancelled += 1

    @app.route("/static", methods=["POST"])
    def static(self, request: IRequest) -> bytes:
        return json_response(request, 200, {"ok": True, "route": "static"})

    @app.route("/later", methods=["GET"])
    def later(self, request: IRequest) -> Deferred[bytes]:
        return self.pending.addCallback(lambda _: json_response(request, 200, {"ok": True, "route": "later"}))

    @app.route("/refused", methods=["GET"])
    def refused(self, request: IRequest) -> bytes:
        raise BadRequest("not like this")

    @app.route("/item/<name>", methods=["GET"])
    def item(self, request: IRequest, name: str) -> bytes:
        return json_response(request, 200, {"ok": True, "route": "item", "name": name})


class RoutesTests(SynchronousTestCase):
    """``Routes``: static routes answered directly, everything else by Klein, with Klein's contract kept."""

    def setUp(self) -> None:
        self.api = _RoutesApi()
        self.routes = Routes(self.api.app, self.api)
        # a fake clock: the channels' idle timeouts must not stay behind on the global reactor
        self.site = Site(self.routes, reactor=Clock())
        self.klein_calls = 0
        klein_render = self.routes.klein.render

        def counted(request: IRequest) -> object:
            self.klein_calls += 1
            return klein_render(request)

        self.routes.klein.render = counted  # type: ignore[method-assign]

    def request(self, method: str, path: str) -> tuple[Any, StringTransport]:
        proto = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(f"{method} {path} HTTP/1.1\r\nHost: a.test\r\nContent-Length: 0\r\n\r\n".encode())
        return proto, transport

    def answer(self, transport: StringTransport) -> tuple[int, Any]:
        raw = transport.value()
        head, _, body = raw.partition(b"\r\n\r\n")
        return int(head.split(b" ")[1]), json.loads(body) if body else None

    def test_static_routes_are_answered_without_klein(self) -> None:
        self.assertEqual(self.answer(self.request("POST", "/static")[1]), (200, {"ok": True, "route": "static"}))
        self.assertEqual(self.klein_calls, 0)

    def test_everything_else_goes_to_klein(self) -> None:
        cases = [
            ("GET", "/item/x", 200, "item"),
            ("POST", "/st%61tic", 200, "static"),  # an encoded spelling of a static path
            ("GET", "/static", 405, "method_not_allowed"),
            ("GET", "/nope", 404, "not_found"),
        ]
        for n, (method, path, status, what) in enumerate(cases, 1):
            code, body = self.answer(self.request(method, path)[1])
            self.assertEqual(code, status, path)
            self.assertEqual(body.get("route", body.get("error")), what, path)
            self.assertEqual(self.klein_calls, n)

    def test_a_refusal_is_answered_by_the_error_table(self) -> None:
        code, body = self.answer(self.request("GET", "/refused")[1])
        self.assertEqual((code, body["ok"], body["error"]), (400, False, "bad_request"))
        self.assertEqual(self.klein_calls, 0)

    def test_a_late_answer_is_written_when_it_comes(self) -> None:
        _, transport = self.request("GET", "/later")
        self.assertEqual(transport.value(), b"")
        self.api.pending.callback(None)
        self.assertEqual(self.answer(transport), (200, {"ok": True, "route": "later"}))

    def test_a_client_that_goes_away_cancels_the_handler(self) -> None:
        proto, transport = self.request("GET", "/later")
        proto.connectionLost(Failure(ConnectionDone()))  # type: ignore[attr-defined]
        self.assertEqual(self.api.cancelled, 1)
        self.assertEqual(transport.value(), b"")
        # The handler's CancelledError ends there: nothing is written or logged.
        self.assertIsNone(self.successResultOf(self.api.pending))
        self.assertEqual(self.flushLoggedErrors(), [])
