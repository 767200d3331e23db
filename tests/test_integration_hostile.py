"""Issue 10 against a live node (twistd, writer child): no lock-out, quiet logs, private files, Host and Retry-After."""

from __future__ import annotations

import http.client
import json
import os
import stat
import time
from typing import Any

import pytest
from twisted.trial.unittest import SynchronousTestCase

from meshrelay.peers import H_HMAC
from meshrelay.store.sqlite import DB_NAME
from tests.apispec import peer_headers
from tests.harness import NodeProcess
from tests.helpers import Identity

pytestmark = pytest.mark.integration

PEER = "http://127.0.0.1:9"
SECRET = "a-secret-for-the-unreachable-peer"


def raw_request(port: int, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
    """(status, headers, decoded JSON) of one request to 127.0.0.1:port."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), json.loads(resp.read() or b"null")
    finally:
        conn.close()


class HostileClientsOfALiveNodeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.node = NodeProcess(
            os.path.abspath(self.mktemp()),
            "hostile",
            config={"limits": {"max_nonces": 100, "max_waiting_polls": 0}},
            peers=[{"url": PEER, "secret": SECRET}],
        )
        old = os.umask(0)  # the node inherits it: its files must still be private
        try:
            self.node.start()
        finally:
            os.umask(old)
        self.addCleanup(self.node.stop)

    def test_attacks_of_issue_10(self) -> None:
        """Future-stamped flood, replay, bad-HMAC flood, DNS-rebinding Host, 429 without Retry-After, open files."""
        port = self.node.port
        attacker, victim = Identity(), Identity()
        for _ in range(150):
            status, _, body = raw_request(
                port, "POST", "/api/mesh/dm/count", attacker.signed(ts=int(time.time()) + 300)
            )
            self.assertEqual(status, 200, body)
        poll = victim.signed(ts=int(time.time()))
        status, _, body = raw_request(port, "POST", "/api/mesh/dm/poll", poll)
        self.assertEqual(status, 200, body)
        status, _, body = raw_request(port, "POST", "/api/mesh/dm/poll", poll)
        self.assertEqual((status, body["error"]), (403, "replayed"))

        for _ in range(400):
            hdrs = peer_headers(PEER, SECRET, "GET", "/api/mesh/dm/changes", b"", time.time())
            hdrs[H_HMAC] = "0" * 64
            self.assertEqual(raw_request(port, "GET", "/api/mesh/dm/changes", headers=hdrs)[0], 403)

        status, _, body = raw_request(self.node.admin_port, "GET", "/metrics", headers={"Host": "evil.example:80"})
        self.assertEqual((status, body["error"]), (403, "forbidden"))
        self.assertEqual(self.node.admin("/api/mesh/metrics")[0], 200)

        status, headers, body = raw_request(
            port, "POST", "/api/mesh/dm/poll", {**victim.signed(ts=int(time.time())), "wait": 5}
        )
        self.assertEqual((status, body["error"]), (429, "rate_limited"))
        self.assertEqual(headers.get("Retry-After"), "1")

        data_dir = self.node.data_dir
        self.assertEqual(stat.S_IMODE(os.stat(data_dir).st_mode), 0o700)
        names = os.listdir(data_dir)
        self.assertIn(DB_NAME + "-wal", names)
        for name in names:
            self.assertEqual(stat.S_IMODE(os.stat(os.path.join(data_dir, name)).st_mode), 0o600, name)

        self.node.stop()
        with open(self.node.log_path, encoding="utf-8", errors="replace") as fh:
            refused = [line for line in fh if "peer request refused (bad_hmac)" in line]
        self.assertLessEqual(len(refused), 2, refused[:5])
        self.assertGreaterEqual(len(refused), 1)
