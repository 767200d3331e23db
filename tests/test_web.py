"""Body caps enforced by the Request subclass, fed raw HTTP bytes over a fake transport."""

from __future__ import annotations

import json

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

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
        request = proto._channel.requests[0]  # type: ignore[attr-defined]
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
        request = proto._channel.requests[0]  # type: ignore[attr-defined]
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

    def test_no_access_log_by_default(self) -> None:
        """The site writes no per-request log line unless access_log is on."""
        logged: list[object] = []
        self.site._logFile = type("F", (), {"write": lambda _s, line: logged.append(line)})()  # type: ignore[attr-defined]
        proto, transport = self.connect()
        proto.dataReceived(b"GET /api/mesh/health HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "))
        self.assertEqual(logged, [])
