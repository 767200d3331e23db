"""HTTP below the API (request line, headers, framing, the ``*`` target) gets the protocol's error shape too.

Found by fuzzing raw HTTP at a live node (tests/test_fuzz_api.py ``test_raw_http``): Twisted
answers a request it cannot parse with a bare ``400 Bad Request``, and any method but OPTIONS on
the target ``*`` with a bare ``405``, so a client got no error code. The node now answers
``400 bad_request`` (and closes, as before) and ``405 method_not_allowed`` in the error shape.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.apispec import error_shape_problems
from tests.helpers import MemNode

OK_HEAD = b"POST /api/mesh/dm/send HTTP/1.1\r\nHost: a.test\r\nContent-Type: application/json\r\n"

MALFORMED = {
    "conflicting Content-Length": OK_HEAD + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    "Content-Length and chunked": OK_HEAD + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n{}",
    "Content-Length not a number": OK_HEAD + b"Content-Length: two\r\n\r\n{}",
    "bad request line": b"POST  /api/mesh/dm/send HTTP/1.1 extra\r\nHost: a.test\r\n\r\n",
    "header without a colon": OK_HEAD + b"this is not a header\r\nContent-Length: 2\r\n\r\n{}",
    "NUL in a header value": OK_HEAD + b"X-Thing: a\x00b\r\nContent-Length: 2\r\n\r\n{}",
    "malformed chunk": OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    "too many headers": OK_HEAD + b"".join(b"X-H%d: v\r\n" % i for i in range(600)) + b"\r\n",
}


class MalformedHTTPTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.n = MemNode(self.mktemp())
        self.addCleanup(self.n.stop)
        self.site = self.n.node.site()

    def send_raw(self, data: bytes) -> tuple[bytes, StringTransport]:
        proto: Any = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(data)
        raw = transport.value()
        proto.connectionLost(Failure(ConnectionDone()))
        return raw, transport

    def test_malformed_requests_answer_bad_request_in_the_error_shape(self) -> None:
        """Every kind of unparseable request answers 400 bad_request as JSON, then the connection closes."""
        for what, data in MALFORMED.items():
            raw, transport = self.send_raw(data)
            head, _, body = raw.partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.1 400 "), (what, raw[:200]))
            self.assertIn(b"\r\ncontent-type: application/json", head.lower(), what)
            answer = json.loads(body)
            self.assertEqual(answer["error"], "bad_request", what)
            self.assertEqual(error_shape_problems(400, answer), [], what)
            self.assertTrue(transport.disconnecting, what)
        self.assertEqual(self.n.store.stats().envelopes, 0)

    def test_a_good_request_on_the_same_site_still_works(self) -> None:
        """A well-formed request is unaffected (here: an empty JSON object is a bad envelope, not bad HTTP)."""
        raw, _ = self.send_raw(OK_HEAD + b"Content-Length: 2\r\n\r\n{}")
        self.n.http.flush()
        self.assertTrue(raw.startswith(b"HTTP/1.1 400 "), raw[:100])
        self.assertIn(b'"bad_envelope"', raw)

    def test_star_target_answers_in_the_error_shape(self) -> None:
        """GET * (any method but OPTIONS) answers 405 method_not_allowed as JSON; OPTIONS * stays 200."""
        for method in (b"GET", b"POST", b"DELETE"):
            raw, _ = self.send_raw(method + b" * HTTP/1.1\r\nHost: a.test\r\nContent-Length: 0\r\n\r\n")
            head, _, body = raw.partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.1 405 "), raw[:200])
            self.assertIn(b"\r\nallow: options", head.lower())
            answer = json.loads(body)
            self.assertEqual(answer["error"], "method_not_allowed")
            self.assertEqual(error_shape_problems(405, answer), [])
        raw, _ = self.send_raw(b"OPTIONS * HTTP/1.1\r\nHost: a.test\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(raw.startswith(b"HTTP/1.1 200 "), raw[:200])
