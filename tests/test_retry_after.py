"""Every 429 carries Retry-After: client rate limit, caps, waiting long-polls, peer rate limit."""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.apispec import peer_headers
from tests.helpers import Identity, MemNode, stub_answer
from tests.test_peer_api import A_URL, B_URL, CHANGES, SECRET_B, DownClient, node_config

SEND = "/api/mesh/dm/send"
POLL = "/api/mesh/dm/poll"


class RetryAfterTests(SynchronousTestCase):
    def node(self, config: Any = None, **limits: Any) -> MemNode:
        d = self.mktemp()
        n = MemNode(d, config=config(d) if config else None, peer_client_factory=lambda p: DownClient(), **limits)
        self.addCleanup(n.stop)
        return n

    def call(self, n: MemNode, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else b""
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        resp, text = stub_answer(n.http, n.http.request(method, A_URL + path, data=data, headers=hdrs))
        return resp.code, json.loads(text), resp.headers.getRawHeaders(b"retry-after")

    def assert429(self, answer: Any, code: str, seconds: int) -> None:
        status, body, retry_after = answer
        self.assertEqual((status, body["error"]), (429, code))
        self.assertEqual(retry_after, [b"%d" % seconds])

    def test_client_rate_limit_429_has_retry_after(self) -> None:
        """An address over limits.client_rate gets 429 rate_limited with Retry-After: 1."""
        n = self.node(client_rate=1, client_burst=1)
        who = Identity()
        now = int(n.clock.seconds())
        self.assertEqual(self.call(n, "POST", POLL, who.poll_body(ts=now))[0], 200)
        self.assert429(self.call(n, "POST", POLL, who.poll_body(ts=now)), "rate_limited", 1)

    def test_cap_429s_have_retry_after(self) -> None:
        """sender_cap, mailbox_full and storage_full answers carry Retry-After: 60."""
        n = self.node(per_sender_pending=1, per_mailbox_pending=2)
        alice, bob, carol, dave = Identity(), Identity(), Identity(), Identity()
        now = int(n.clock.seconds())
        self.assertEqual(self.call(n, "POST", SEND, alice.envelope(bob, b"1", ts=now))[0], 200)
        self.assert429(self.call(n, "POST", SEND, alice.envelope(bob, b"2", ts=now)), "sender_cap", 60)
        self.assertEqual(self.call(n, "POST", SEND, carol.envelope(bob, b"3", ts=now))[0], 200)
        self.assert429(self.call(n, "POST", SEND, dave.envelope(bob, b"4", ts=now)), "mailbox_full", 60)
        full = self.node(max_stored_bytes=1)
        self.assert429(self.call(full, "POST", SEND, alice.envelope(bob, b"5", ts=now)), "storage_full", 60)

    def test_waiting_poll_refusal_has_retry_after(self) -> None:
        """A long-poll over limits.max_waiting_polls gets 429 rate_limited with Retry-After."""
        n = self.node(max_waiting_polls=0)
        who = Identity()
        answer = self.call(n, "POST", POLL, who.poll_body(ts=int(n.clock.seconds()), wait=30))
        self.assert429(answer, "rate_limited", 1)

    def test_peer_rate_limit_429_has_retry_after(self) -> None:
        """A peer over limits.peer_rate gets 429 rate_limited with Retry-After: 1."""
        n = self.node(config=lambda d: node_config(d, peer_rate=1, peer_burst=1))
        for expected in (200, 429):
            hdrs = peer_headers(B_URL, SECRET_B, "GET", CHANGES, b"", n.clock.seconds())
            answer = self.call(n, "GET", CHANGES, headers=hdrs)
            self.assertEqual(answer[0], expected)
        self.assert429(answer, "rate_limited", 1)
