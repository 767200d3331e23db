"""Addresses at their connection cap: the kernel drops their new connections (meshrelay/synblock.py)."""

from __future__ import annotations

import ipaddress
import os
import select
import socket
import sys
from typing import Any

import pytest
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from meshrelay.config import build_config
from meshrelay.metrics import Metrics
from meshrelay.synblock import MAX_BLOCKED, SynBlock, attach, detach, filter_program, parse_key
from tests.harness import NodeProcess
from tests.test_fair_shares import SiteTestCase


def listener(family: int = socket.AF_INET, host: str = "127.0.0.1") -> socket.socket:
    try:
        s = socket.socket(family, socket.SOCK_STREAM)
        if family == socket.AF_INET6 and host == "::":
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind((host, 0))
    except OSError as e:
        raise SkipTest(f"no {host} here: {e}") from None
    s.listen(16)
    return s


def connects(source: str, port: int, host: str = "127.0.0.1", wait: float = 0.5) -> bool:
    """Whether a connection from ``source`` to ``host:port`` completes within ``wait`` seconds."""
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    c = socket.socket(family, socket.SOCK_STREAM)
    try:
        c.setblocking(False)
        c.bind((source, 0))
        c.connect_ex((host, port))
        _, writable, _ = select.select([], [c], [], wait)
        return bool(writable) and c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    finally:
        c.close()


def filtered(s: socket.socket, keys: list[str]) -> None:
    try:
        attach(s, filter_program([ipaddress.ip_network(k) for k in keys]))
    except OSError as e:
        s.close()
        raise SkipTest(f"socket filters are not available here: {e}") from None


class FilterTests(SynchronousTestCase):
    """The program, attached to a real listening socket: blocked networks do not connect, others do."""

    def test_an_ipv4_address_and_a_network_are_dropped_and_nothing_else(self) -> None:
        s = listener()
        self.addCleanup(s.close)
        port = s.getsockname()[1]
        filtered(s, ["127.0.0.77/32", "127.0.3.0/24"])
        self.assertFalse(connects("127.0.0.77", port))
        self.assertFalse(connects("127.0.3.9", port))
        self.assertTrue(connects("127.0.0.78", port))
        self.assertTrue(connects("127.0.4.9", port))
        detach(s)
        self.assertTrue(connects("127.0.0.77", port))

    def test_ipv6_slash64_and_ipv4_on_a_dual_stack_listener(self) -> None:
        s = listener(socket.AF_INET6, "::")
        self.addCleanup(s.close)
        port = s.getsockname()[1]
        filtered(s, ["2001:db8:1:2::/64", "127.0.0.77/32"])
        # another /64 and other IPv4 addresses pass; the IPv4 one arrives IPv4-mapped and is dropped
        self.assertTrue(connects("::1", port, "::1"))
        self.assertFalse(connects("127.0.0.77", port))
        self.assertTrue(connects("127.0.0.78", port))
        filtered(s, ["::/64"])  # ::1's own /64
        self.assertFalse(connects("::1", port, "::1"))

    def test_a_program_keeps_every_jump_short(self) -> None:
        """MAX_BLOCKED networks of both kinds: every conditional jump fits its 8 bits, and the kernel takes it."""
        nets = [ipaddress.ip_network(f"10.{i // 256}.{i % 256}.0/24") for i in range(MAX_BLOCKED // 2)]
        nets += [ipaddress.ip_network(f"2001:db8:{i:x}::/48") for i in range(MAX_BLOCKED // 2)]
        program = filter_program(nets)
        self.assertLessEqual(len(program), 4096)
        self.assertTrue(all(jt < 256 and jf < 256 for _, jt, jf, _ in program))
        s = listener()
        self.addCleanup(s.close)
        filtered(s, [str(n) for n in nets])
        self.assertTrue(connects("127.0.0.1", s.getsockname()[1]))


class KeyTests(SynchronousTestCase):
    def test_share_keys_parse_and_long_ipv6_prefixes_do_not(self) -> None:
        self.assertEqual(parse_key("192.0.2.7/32"), ipaddress.ip_network("192.0.2.7/32"))
        self.assertEqual(parse_key("2001:db8:1:2::/64"), ipaddress.ip_network("2001:db8:1:2::/64"))
        self.assertIsNone(parse_key("2001:db8::1/128"))  # a filter checks 64 bits of IPv6
        self.assertIsNone(parse_key("mailbox:abc"))
        self.assertIsNone(parse_key(""))


class BookkeepingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.metrics = Metrics()
        self.failures: list[str] = []
        self.socks: list[Any] = []
        self.block = SynBlock(lambda: self.socks, self.metrics.blocked_networks, self.failures.append)

    def gauge(self) -> float:
        return float(self.metrics.sample("meshrelay_blocked_networks") or 0)

    def test_block_unblock_clear_and_the_gauge(self) -> None:
        self.assertTrue(self.block.block("192.0.2.7/32"))
        self.assertFalse(self.block.block("192.0.2.7/32"))  # already
        self.assertTrue(self.block.block("2001:db8::/64"))
        self.assertIn("192.0.2.7/32", self.block)
        self.assertEqual(self.gauge(), 2)
        self.block.unblock("192.0.2.7/32")
        self.assertNotIn("192.0.2.7/32", self.block)
        self.assertEqual(self.gauge(), 1)
        self.block.clear()
        self.assertEqual(self.gauge(), 0)

    def test_bounded_and_off_when_asked(self) -> None:
        for i in range(MAX_BLOCKED):
            self.assertTrue(self.block.block(f"10.0.{i // 256}.{i % 256}/32"))
        self.assertFalse(self.block.block("192.0.2.7/32"))
        self.block.clear()
        self.block.enabled = False
        self.assertFalse(self.block.block("192.0.2.7/32"))
        self.assertEqual(self.gauge(), 0)

    def test_a_kernel_that_refuses_turns_it_off_once_and_says_so(self) -> None:
        """An OSError from the kernel: nothing stays blocked, one report, and nothing is tried again."""

        class Refusing:
            def setsockopt(self, *args: Any) -> None:
                raise OSError(92, "Protocol not available")

        self.socks = [Refusing()]
        self.assertFalse(self.block.block("192.0.2.7/32"))
        self.assertFalse(self.block.block("192.0.2.8/32"))
        self.assertEqual(len(self.failures), 1)
        self.assertEqual(self.gauge(), 0)
        self.assertTrue(self.block.broken)


class SiteTests(SiteTestCase):
    """The site blocks a key refused at its cap and unblocks it when one of its connections closes."""

    limits = {"max_connections": 100, "max_connections_per_address": 4}

    def close(self, conn: Any) -> None:
        conn[0].connectionLost(Failure(ConnectionDone()))
        self.open.remove(conn[0])

    def test_refused_at_the_cap_blocked_until_it_holds_half(self) -> None:
        held = [self.connect("192.0.2.66") for _ in range(4)]
        self.assertNotIn("192.0.2.66/32", self.site.synblock)
        self.assertIsNone(self.connect("192.0.2.66"))
        self.assertIn("192.0.2.66/32", self.site.synblock)
        self.assertEqual(self.n.metrics.sample("meshrelay_blocked_networks"), 1)
        self.assertIsNotNone(self.connect("198.51.100.7"))  # another address is not touched
        self.close(held.pop())  # 3 left: still blocked (no burst at each close)
        self.assertIn("192.0.2.66/32", self.site.synblock)
        self.close(held.pop())  # 2 left, half the cap: accepted again
        self.assertNotIn("192.0.2.66/32", self.site.synblock)
        self.assertEqual(self.n.metrics.sample("meshrelay_blocked_networks"), 0)
        self.assertIsNotNone(self.connect("192.0.2.66"))

    def test_a_reload_unblocks_and_can_turn_it_off(self) -> None:
        for _ in range(5):
            self.connect("192.0.2.66")
        self.assertIn("192.0.2.66/32", self.site.synblock)
        cfg = build_config(
            {
                "node": {"data_dir": self.n.config.node.data_dir, "public_url": "http://a.test"},
                "limits": {"client_rate": 0, **self.limits, "drop_at_connection_cap": False},
            }
        )
        self.n.node.reconfigure(cfg)
        self.assertNotIn("192.0.2.66/32", self.site.synblock)
        self.assertIsNone(self.connect("192.0.2.66"))
        self.assertNotIn("192.0.2.66/32", self.site.synblock)


class OffSiteTests(SiteTestCase):
    limits = {"max_connections": 100, "max_connections_per_address": 2, "drop_at_connection_cap": False}

    def test_off_refuses_as_before(self) -> None:
        for _ in range(3):
            self.connect("192.0.2.66")
        self.assertEqual(self.refused("max_connections_per_address"), 1)
        self.assertNotIn("192.0.2.66/32", self.site.synblock)


class NodeTests(TestCase):
    """A real node: an address at its cap cannot even connect until it holds half its cap again."""

    @pytest.mark.integration
    def test_an_address_at_its_cap_is_dropped_by_the_kernel(self) -> None:
        if not sys.platform.startswith("linux"):
            raise SkipTest("socket filters are a Linux feature")
        base = self.mktemp()
        os.makedirs(base)
        node = NodeProcess(base, "a", config={"limits": {"max_connections_per_address": 3}})
        node.start()
        self.addCleanup(node.stop)
        held = []
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", node.port), source_address=("127.0.0.40", 0))
            held.append(s)
        self.addCleanup(lambda: [s.close() for s in held])
        # The fourth is accepted and closed (the refusal that blocks the address).
        fourth = socket.create_connection(("127.0.0.1", node.port), source_address=("127.0.0.40", 0))
        self.assertEqual(fourth.recv(10), b"")
        fourth.close()
        # From now on its connections do not complete; another address's do.
        self.assertFalse(connects("127.0.0.40", node.port))
        self.assertTrue(connects("127.0.0.41", node.port))
        status, body = node.admin("/api/mesh/metrics")
        self.assertEqual(body["metrics"]["meshrelay_blocked_networks"][0]["value"], 1)
        # It holds half its cap or less again (3 -> 1): it may connect again.
        held.pop().close()
        held.pop().close()
        for _ in range(100):
            status, body = node.admin("/api/mesh/metrics")
            if body["metrics"]["meshrelay_blocked_networks"][0]["value"] == 0:
                break
        self.assertEqual(body["metrics"]["meshrelay_blocked_networks"][0]["value"], 0)
        self.assertTrue(connects("127.0.0.40", node.port))
