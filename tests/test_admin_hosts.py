"""The admin listener answers only requests whose Host names it (DNS-rebinding guard, issue 10 item 6)."""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase

from meshrelay.admin import AdminAPI
from meshrelay.config import ConfigError, build_config
from tests.helpers import MemNode, make_config, stub_answer


class AdminHostTests(SynchronousTestCase):
    def admin(self, **node: Any) -> StubTreq:
        d = self.mktemp()
        config = build_config({"node": {"data_dir": d, **node}, "limits": {"client_rate": 0}})
        mem = MemNode(d, config=config)
        self.addCleanup(mem.stop)
        self.mem = mem
        return StubTreq(AdminAPI(mem.metrics, node=mem.node).resource())

    def get(self, http: StubTreq, path: str, host: str) -> tuple[int, Any]:
        resp, body = stub_answer(http, http.get("http://127.0.0.1:9090" + path, headers={"Host": host}))
        return resp.code, body

    def test_dns_rebinding_host_is_refused(self) -> None:
        """A browser sent to evil.example (re-pointed at 127.0.0.1) gets 403 JSON, not /metrics or /status."""
        http = self.admin()
        for path in ("/metrics", "/status", "/api/mesh/metrics", "/nope"):
            for host in ("evil.example", "evil.example:9090", "127.0.0.1.evil.example", "localhost.evil.example"):
                code, body = self.get(http, path, host)
                self.assertEqual(code, 403, (path, host))
                answer = json.loads(body)
                self.assertEqual((answer["ok"], answer["error"]), (False, "forbidden"))
                self.assertNotIn(b"meshrelay_", body)
        refused = self.mem.metrics.sample("meshrelay_http_refused_total", {"reason": "admin_host"})
        self.assertEqual(refused, 16)

    def test_loopback_names_and_addresses_are_served(self) -> None:
        """localhost, 127.0.0.1, any 127/8 address and [::1], with or without port, are served."""
        http = self.admin()
        for host in (
            "localhost",
            "LOCALHOST:9090",
            "localhost.",
            "127.0.0.1",
            "127.0.0.1:9090",
            "127.1.2.3",
            "[::1]:9090",
        ):
            self.assertEqual(self.get(http, "/metrics", host)[0], 200, host)

    def test_configured_interface_and_admin_hosts_are_served(self) -> None:
        """admin_listen's interface and the node.admin_hosts names are served; other names are not."""
        http = self.admin(admin_listen="tcp:9090:interface=10.0.0.5", admin_hosts=["metrics.internal", "[fd00::7]"])
        for host in ("10.0.0.5:9090", "metrics.internal", "Metrics.Internal:9090", "[fd00::7]:9090"):
            self.assertEqual(self.get(http, "/metrics", host)[0], 200, host)
        self.assertEqual(self.get(http, "/metrics", "10.0.0.6")[0], 403)
        self.assertEqual(self.get(http, "/metrics", "other.internal")[0], 403)

    def test_helpers(self) -> None:
        """Endpoint interfaces (escaped IPv6, wildcards), the allowed set and a missing Host."""
        from meshrelay.admin import allowed_hosts, endpoint_interface, host_allowed

        self.assertEqual(endpoint_interface("tcp:9090:interface=127.0.0.1"), "127.0.0.1")
        self.assertEqual(endpoint_interface(r"tcp6:9090:interface=\:\:1"), "::1")
        self.assertEqual(endpoint_interface("tcp:9090:interface=0.0.0.0"), "")
        self.assertEqual(endpoint_interface("tcp:9090"), "")
        allowed = allowed_hosts("tcp:9090", "a.example, b.example")
        self.assertTrue({"localhost", "a.example", "b.example"} <= allowed)
        self.assertFalse(host_allowed(None, allowed))
        self.assertTrue(host_allowed(b"192.0.2.9:9090", allowed, "192.0.2.9"))
        self.assertFalse(host_allowed(b"192.0.2.8:9090", allowed, "192.0.2.9"))

    def test_admin_hosts_config(self) -> None:
        """node.admin_hosts takes a list of strings or one comma-separated string; anything else names the key."""
        cfg = build_config({"node": {"admin_hosts": ["a.example", "b.example"]}})
        self.assertEqual(cfg.node.admin_hosts, "a.example,b.example")
        self.assertEqual(build_config({"node": {"admin_hosts": "a.example"}}).node.admin_hosts, "a.example")
        for bad in ([1], ["a,b"], 5):
            with self.assertRaises(ConfigError) as cm:
                build_config({"node": {"admin_hosts": bad}})
            self.assertIn("node.admin_hosts", str(cm.exception))
        self.assertEqual(make_config(self.mktemp()).node.admin_hosts, "")
