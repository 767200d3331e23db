"""Fair shares (issue 10, item 3): one address cannot take what every other client needs.

Each attack of the issue is a test here, driven through the node's real site
(``buildProtocol`` from a chosen address, a ``StringTransport``) on a ``Clock``:
one address holding every connection slot, every waiting long-poll, or
filling the store with deposits; IPv6 clients with a bucket per ``/128``;
junk ``X-Forwarded-For`` picking fresh buckets; and the listener behind Tor,
where the address means nothing and the limits use the request's keys.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from meshrelay import fairness
from meshrelay.config import ConfigError, build_config
from meshrelay.fairness import AddressPolicy
from meshrelay.store.sqlite import DB_NAME
from meshrelay.tap import Options, makeService
from tests.helpers import Identity, MemNode

HEALTH = b"GET /api/mesh/health HTTP/1.1\r\nHost: a.test\r\n\r\n"


def http_post(path: str, body: Any, headers: dict[str, str] | None = None) -> bytes:
    data = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: a.test\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    for name, value in (headers or {}).items():
        head += f"{name}: {value}\r\n"
    return head.encode() + b"\r\n" + data


def http_get(path: str, headers: dict[str, str] | None = None) -> bytes:
    head = f"GET {path} HTTP/1.1\r\nHost: a.test\r\n"
    for name, value in (headers or {}).items():
        head += f"{name}: {value}\r\n"
    return head.encode() + b"\r\n"


def status_of(raw: bytes) -> int | None:
    """The status code of the first response in ``raw`` (None: nothing answered yet)."""
    if not raw.startswith(b"HTTP/1.1 "):
        return None
    return int(raw[9:12])


def error_of(raw: bytes) -> str:
    """The error code of a JSON error answer (plain or chunked)."""
    found = re.search(rb'"error":"([a-z_]+)"', raw)
    assert found is not None, raw[:300]
    return found.group(1).decode()


class SiteTestCase(SynchronousTestCase):
    """A node in memory and its public site; connections come from chosen addresses."""

    node_cfg: dict[str, Any] = {}
    limits: dict[str, Any] = {}

    def setUp(self) -> None:
        d = self.mktemp()
        limits = {"client_rate": 0, **self.limits}
        cfg = build_config({"node": {"data_dir": d, "public_url": "http://a.test", **self.node_cfg}, "limits": limits})
        self.n = MemNode(d, config=cfg)
        self.addCleanup(self.n.stop)
        self.site = self.n.node.site()
        self.open: list[Any] = []
        self.addCleanup(self.close_all)
        self.port = 40000

    def close_all(self) -> None:
        for proto in self.open:
            proto.connectionLost(Failure(ConnectionDone()))
        self.open = []

    def now(self) -> int:
        return int(self.n.clock.seconds())

    def connect(self, host: str, site: Any = None) -> tuple[Any, StringTransport] | None:
        """A connection from ``host``; None when the site refuses it."""
        self.port += 1
        addr = IPv6Address("TCP", host, self.port) if ":" in host else IPv4Address("TCP", host, self.port)
        proto = (site or self.site).buildProtocol(addr)
        if proto is None:
            return None
        transport = StringTransport(peerAddress=addr)
        proto.makeConnection(transport)
        self.open.append(proto)
        return proto, transport

    def exchange(self, host: str, data: bytes, site: Any = None) -> bytes:
        """Send one request from ``host`` on a new connection; what was answered (b"" if nothing yet)."""
        conn = self.connect(host, site)
        assert conn is not None, f"connection from {host} refused"
        proto, transport = conn
        proto.dataReceived(data)
        return transport.value()

    def refused(self, reason: str) -> float:
        return self.n.metrics.sample("meshrelay_http_refused_total", {"reason": reason}) or 0.0


class IssueConnectionTests(SiteTestCase):
    # The attack as the issue found it, with only keys main had: max_connections = 30.
    limits = {"max_connections": 30}

    def test_thirty_idle_sockets_do_not_lock_out_a_client(self) -> None:
        """30 idle sockets from one address with max_connections = 30: it gets half, another address is served."""
        held = [self.connect("192.0.2.66") for _ in range(30)]
        self.assertEqual(sum(c is not None for c in held), 15)
        self.assertEqual(self.refused("max_connections_per_address"), 15)
        self.assertEqual(status_of(self.exchange("198.51.100.7", HEALTH)), 200)


class ConnectionShareTests(SiteTestCase):
    # Only keys that main already had: on a listener of 200 the default per-address cap (64) holds.
    limits = {"max_connections": 200}

    def test_idle_sockets_from_one_address_do_not_lock_out_another(self) -> None:
        """One address opening more idle connections than its share leaves room for other addresses."""
        held = [self.connect("192.0.2.66") for _ in range(100)]
        accepted = [c for c in held if c is not None]
        self.assertEqual(len(accepted), 64)
        self.assertEqual(self.refused("max_connections_per_address"), 36)
        self.assertEqual(status_of(self.exchange("198.51.100.7", HEALTH)), 200)
        # Closing one of the address's connections gives it a slot back.
        accepted[0][0].connectionLost(Failure(ConnectionDone()))
        self.open.remove(accepted[0][0])
        self.assertIsNotNone(self.connect("192.0.2.66"))
        self.assertIsNone(self.connect("192.0.2.66"))

    def test_one_ipv6_slash64_is_one_address(self) -> None:
        """Connections from many addresses of one IPv6 /64 share one per-address cap."""
        accepted = [self.connect(f"2001:db8:1:2::{i:x}") for i in range(1, 80)]
        self.assertEqual(sum(c is not None for c in accepted), 64)
        self.assertIsNotNone(self.connect("2001:db8:1:3::1"))

    def test_ipv4_mapped_address_counts_as_the_ipv4_address(self) -> None:
        """A dual-stack socket's ::ffff:a.b.c.d and a.b.c.d share one cap."""
        for _ in range(32):
            self.assertIsNotNone(self.connect("192.0.2.5"))
        for _ in range(32):
            self.assertIsNotNone(self.connect("::ffff:192.0.2.5"))
        self.assertIsNone(self.connect("::ffff:192.0.2.5"))
        self.assertIsNone(self.connect("192.0.2.5"))


class TrustedProxyConnectionTests(SiteTestCase):
    limits = {"max_connections": 100, "max_connections_per_address": 2, "trusted_proxies": "10.0.0.0/8"}

    def test_a_trusted_proxy_is_not_held_to_the_per_address_cap(self) -> None:
        """A trusted proxy carries many clients: only the global cap applies to its connections."""
        self.assertTrue(all(self.connect("10.1.2.3") is not None for _ in range(10)))
        self.assertIsNotNone(self.connect("192.0.2.1"))
        self.assertIsNotNone(self.connect("192.0.2.1"))
        self.assertIsNone(self.connect("192.0.2.1"))


class AddressKeyTests(SiteTestCase):
    limits = {"client_rate": 1, "client_burst": 2, "trusted_proxies": "127.0.0.1, 10.0.0.0/8"}

    def codes(self, host: str, n: int, xff: str | None = None) -> list[int | None]:
        headers = {"X-Forwarded-For": xff} if xff is not None else {}
        return [status_of(self.exchange(host, http_get("/api/mesh/health", headers))) for _ in range(n)]

    def test_ipv6_clients_share_a_bucket_per_slash64(self) -> None:
        """Requests from different addresses of one IPv6 /64 draw from one rate bucket."""
        hosts = ["2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:ffff::3"]
        self.assertEqual([self.codes(h, 1)[0] for h in hosts], [200, 200, 429])
        self.assertEqual(self.refused("client_rate"), 1)
        self.assertEqual(self.codes("2001:db8:1:3::1", 1), [200])

    def test_junk_forwarded_for_does_not_pick_a_fresh_bucket(self) -> None:
        """X-Forwarded-For hops that are not addresses count as the proxy that sent them, one shared bucket."""
        junk = ["junk-1", "unknown", "1.2.3.4:5678", "", "1.2.3.4, evil"]
        codes = [self.codes("127.0.0.1", 1, xff)[0] for xff in junk]
        self.assertEqual(codes, [200, 200, 429, 429, 429])

    def test_forwarded_for_names_the_right_most_untrusted_address(self) -> None:
        """Behind a trusted proxy (or network of them) the right-most untrusted hop is the client."""
        self.assertEqual(self.codes("10.9.8.7", 2, "203.0.113.9, 198.51.100.1"), [200, 200])
        # Anything the client wrote to the left of its own address does not pick a new bucket.
        self.assertEqual(self.codes("10.9.8.7", 1, "6.6.6.6, 198.51.100.1"), [429])
        self.assertEqual(self.codes("10.9.8.7", 1, "198.51.100.1, 10.0.0.5"), [429])
        self.assertEqual(self.codes("10.9.8.7", 2, "198.51.100.2"), [200, 200])

    def test_forwarded_for_from_an_untrusted_address_is_ignored(self) -> None:
        """A client that is not a trusted proxy cannot name itself a fresh address."""
        codes = [self.codes("192.0.2.9", 1, f"198.51.100.{i}")[0] for i in range(3)]
        self.assertEqual(codes, [200, 200, 429])


class AddressPolicyTests(SynchronousTestCase):
    def test_keys(self) -> None:
        """Share keys: IPv4 /32, IPv6 /64, prefixes configurable, zone ids dropped, non-IP hosts kept."""
        p = AddressPolicy()
        self.assertEqual(p.key("192.0.2.1"), "192.0.2.1/32")
        self.assertEqual(p.key("2001:db8:1:2:3:4:5:6"), "2001:db8:1:2::/64")
        self.assertEqual(p.key("fe80::1%eth0"), "fe80::/64")
        self.assertEqual(p.key("::ffff:192.0.2.1"), "192.0.2.1/32")
        self.assertEqual(p.key("/run/meshrelay.sock"), "/run/meshrelay.sock")
        wide = AddressPolicy(ipv4_prefix=24, ipv6_prefix=48)
        self.assertEqual(wide.key("192.0.2.77"), "192.0.2.0/24")
        self.assertEqual(wide.key("2001:db8:1:2::1"), "2001:db8:1::/48")
        self.assertIsNone(AddressPolicy(address_means_nothing=True).key("192.0.2.1"))

    def test_connection_keys(self) -> None:
        """The connection cap applies to IP clients only: not to trusted proxies, UNIX sockets or meaningless addresses."""
        p = AddressPolicy("10.0.0.0/8")
        self.assertEqual(p.connection_key(IPv6Address("TCP", "2001:db8::7", 1)), "2001:db8::/64")
        self.assertIsNone(p.connection_key(IPv4Address("TCP", "10.1.1.1", 1)))
        self.assertIsNone(p.connection_key(UNIXAddress(None)))
        self.assertIsNone(p.connection_key(UNIXAddress(b"/run/meshrelay.sock")))
        self.assertIsNone(p.with_address_meaning_nothing(True).connection_key(IPv4Address("TCP", "192.0.2.1", 1)))

    def test_a_hosts_key_is_parsed_once(self) -> None:
        """A connecting host's key is remembered (no address parse per request), until a reload or HOST_KEYS hosts."""
        p = AddressPolicy()
        parsed: list[str] = []
        real = fairness.parse_ip
        self.patch(fairness, "parse_ip", lambda text: parsed.append(text) or real(text))
        self.assertEqual([p.key("192.0.2.1") for _ in range(3)], ["192.0.2.1/32"] * 3)
        self.assertEqual(parsed, ["192.0.2.1"])
        # X-Forwarded-For is read each time (it differs per request)
        self.assertEqual(p.key("192.0.2.1", b"203.0.113.5"), "192.0.2.1/32")
        self.assertEqual(len(parsed), 2)
        # so is a connection's, for the connection cap
        addr = IPv4Address("TCP", "192.0.2.2", 1)
        self.assertEqual([p.connection_key(addr) for _ in range(3)], ["192.0.2.2/32"] * 3)
        self.assertEqual(parsed[2:], ["192.0.2.2"])
        # a reload's new prefix and proxies are used at once
        p.reconfigure("192.0.2.2", 24, 64)
        self.assertEqual(p.key("192.0.2.1"), "192.0.2.0/24")
        self.assertIsNone(p.connection_key(addr))
        # bounded: past HOST_KEYS hosts it starts again
        for i in range(fairness.HOST_KEYS + 10):
            host = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
            p.key(host)
            p.connection_key(IPv4Address("TCP", host, 1))
        self.assertLessEqual(len(p._host_keys), fairness.HOST_KEYS)
        self.assertLessEqual(len(p._connection_keys), fairness.HOST_KEYS)

    def test_forwarded_for_chain(self) -> None:
        """Right to left past trusted proxies; the first untrusted hop if it parses, else the proxy."""
        p = AddressPolicy("10.0.0.1, 10.0.1.0/24")
        self.assertEqual(p.key("10.0.0.1", b"203.0.113.5"), "203.0.113.5/32")
        self.assertEqual(p.key("10.0.0.1", b"203.0.113.5, 10.0.1.9"), "203.0.113.5/32")
        self.assertEqual(p.key("10.0.0.1", b"203.0.113.5, junk, 10.0.1.9"), "10.0.1.9/32")
        self.assertEqual(p.key("10.0.0.1", b"junk"), "10.0.0.1/32")
        self.assertEqual(p.key("10.0.0.1", b"10.0.1.9"), "10.0.1.9/32")
        self.assertEqual(p.key("10.0.0.1", b"\xff\xfe"), "10.0.0.1/32")
        self.assertEqual(p.key("192.0.2.1", b"203.0.113.5"), "192.0.2.1/32")
        self.assertEqual(p.key("10.0.0.1", b"2001:db8::1"), "2001:db8::/64")


class WaitingShareTests(SiteTestCase):
    # over-share refusals answered at once here; their hold is HeldRefusalTests'
    limits = {"max_waiting_polls": 100, "over_share_hold": 0}
    #: one address's share of waiting polls
    share = 32

    def long_poll(self, host: str, who: Identity | None = None) -> bytes:
        who = who or Identity()
        return self.exchange(host, http_post("/api/mesh/dm/poll", who.poll_body(ts=self.now(), wait=30)))

    def test_one_address_cannot_hold_every_waiting_poll(self) -> None:
        """Past its share (32 by default) an address's long-polls answer 429; another address still waits."""
        answers = [self.long_poll("192.0.2.66") for _ in range(32)]
        self.assertEqual(answers, [b""] * 32)
        self.assertEqual(self.n.relay.waiting, 32)
        over = self.long_poll("192.0.2.66")
        self.assertEqual((status_of(over), error_of(over)), (429, "rate_limited"))
        self.assertEqual(self.long_poll("198.51.100.7"), b"")
        self.assertEqual(self.n.relay.waiting, 33)
        # A poll without wait from the busy address is still served.
        who = Identity()
        answer = self.exchange("192.0.2.66", http_post("/api/mesh/dm/poll", who.poll_body(ts=self.now())))
        self.assertEqual(status_of(answer), 200)
        self.n.clock.advance(30)
        self.assertEqual(self.n.relay.waiting, 0)
        self.assertEqual(self.n.relay._waiting_by_share, {})
        # Its share is free again.
        self.assertEqual(self.long_poll("192.0.2.66"), b"")

    def nonce_rows(self) -> int:
        conn = sqlite3.connect(os.path.join(self.n.config.node.data_dir, DB_NAME))
        try:
            return int(conn.execute("SELECT count(*) FROM nonces").fetchone()[0])
        finally:
            conn.close()

    def test_a_long_poll_over_the_share_is_refused_before_its_checks(self) -> None:
        """Past its share an address's long-polls are refused before the signature check and the nonce claim.

        A flood of them (issue 10's long-poll attacker sent about 1,000 a second) then costs the
        node a parse each, not a signature check, a durable nonce write and two reads.
        """
        self.assertEqual([self.long_poll("192.0.2.66") for _ in range(self.share)], [b""] * self.share)
        claimed = self.nonce_rows()
        who = Identity()
        forged = who.poll_body(ts=self.now(), wait=30)
        forged["sig"] = Identity().poll_body(ts=self.now())["sig"]
        over = self.exchange("192.0.2.66", http_post("/api/mesh/dm/poll", forged))
        self.assertEqual((status_of(over), error_of(over)), (429, "rate_limited"))
        valid = who.poll_body(ts=self.now(), wait=30)
        over = self.exchange("192.0.2.66", http_post("/api/mesh/dm/poll", valid))
        self.assertEqual((status_of(over), error_of(over)), (429, "rate_limited"))
        self.assertEqual(self.nonce_rows(), claimed)
        # a long-poll that acks is still checked and its acks applied (acks free space) before it is refused
        bob = Identity()
        env = Identity().envelope(bob, b"to ack", ts=self.now())
        self.assertEqual(status_of(self.exchange("198.51.100.7", http_post("/api/mesh/dm/send", env))), 200)
        acking = bob.poll_body(ts=self.now(), ack=[env["msg_id"]], wait=30)
        over = self.exchange("192.0.2.66", http_post("/api/mesh/dm/poll", acking))
        self.assertEqual((status_of(over), error_of(over)), (429, "rate_limited"))
        self.assertEqual(self.n.store.stats().envelopes, 0)
        self.n.clock.advance(30)
        # the refused request's nonce was never used up: sent again once the share is free, it waits
        self.assertEqual(self.exchange("192.0.2.66", http_post("/api/mesh/dm/poll", valid)), b"")
        self.n.clock.advance(30)

    def fill_share(self, host: str = "192.0.2.66") -> None:
        self.assertEqual([self.long_poll(host) for _ in range(self.share)], [b""] * self.share)

    def test_a_long_poll_over_the_share_is_refused_before_the_routes(self) -> None:
        """Past its share, a long-poll is answered 429 without entering the poll route (no Deferred, no coroutine).

        Issue 10's long-poll attacker makes each node refuse about 200 of these a second, in
        bursts; each one's reactor time is what the next honest request waits for.  The answer
        is the route's: same status, body, Retry-After, CORS headers, metric and log line.
        """
        self.fill_share()
        routed: list[Any] = []
        real_poll = self.n.relay.poll
        self.patch(self.n.relay, "poll", lambda *a, **kw: routed.append(a) or real_poll(*a, **kw))
        before = self.n.metrics.sample("meshrelay_dm_poll_total", {"outcome": "rate_limited"}) or 0.0
        agg = self.n.relay.log_agg
        self.assertEqual(agg.pending("refused:rate_limited"), 0)
        answers = [
            self.exchange("192.0.2.66", http_post("/api/mesh/dm/poll", Identity().poll_body(ts=self.now(), wait=30)))
            for _ in range(2)
        ]
        early = answers[0]
        self.assertEqual([(status_of(a), error_of(a)) for a in answers], [(429, "rate_limited")] * 2)
        self.assertEqual(routed, [])
        self.assertEqual(self.n.metrics.sample("meshrelay_dm_poll_total", {"outcome": "rate_limited"}), before + 2)
        # logged as the error table logs a refusal: the first line at once, the second counted
        self.assertEqual(agg.pending("refused:rate_limited"), 1)
        self.assertEqual(agg.pending("cap:max_waiting_polls_per_address"), 1)
        # the same poll through the route (the early answer turned off) is answered the same way
        self.patch(self.site.resource.inner, "early", None)
        routed_answer = self.exchange(
            "192.0.2.66", http_post("/api/mesh/dm/poll", Identity().poll_body(ts=self.now(), wait=30))
        )
        self.assertEqual(len(routed), 1)

        def without_date(raw: bytes) -> bytes:
            return re.sub(rb"Date: [^\r]*\r\n", b"", raw)

        self.assertEqual(without_date(early), without_date(routed_answer))
        self.assertIn(b"Retry-After: 1\r\n", early)
        self.assertIn(b"Access-Control-Allow-Origin: *\r\n", early)
        self.n.clock.advance(30)

    def test_over_the_share_a_bad_request_still_gets_its_own_code(self) -> None:
        """The early refusal comes after step 1 (docs/protocol.md 4.4): content type, JSON and shape are answered first."""
        self.fill_share()
        who = Identity()
        bad_shape = {**who.poll_body(ts=self.now(), wait=30), "extra": 1}
        answer = self.exchange("192.0.2.66", http_post("/api/mesh/dm/poll", bad_shape))
        self.assertEqual((status_of(answer), error_of(answer)), (400, "bad_request"))
        raw = b'{"mailbox": 1,'
        head = b"POST /api/mesh/dm/poll HTTP/1.1\r\nHost: a.test\r\nContent-Type: application/json\r\n"
        answer = self.exchange("192.0.2.66", head + b"Content-Length: %d\r\n\r\n%s" % (len(raw), raw))
        self.assertEqual((status_of(answer), error_of(answer)), (400, "bad_json"))
        body = json.dumps(who.poll_body(ts=self.now(), wait=30)).encode()
        plain = b"POST /api/mesh/dm/poll HTTP/1.1\r\nHost: a.test\r\nContent-Type: text/plain\r\n"
        answer = self.exchange("192.0.2.66", plain + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        self.assertEqual((status_of(answer), error_of(answer)), (415, "unsupported_media_type"))
        self.n.clock.advance(30)


class SmallWaitingPoolTests(WaitingShareTests):
    limits = {"max_waiting_polls": 10, "over_share_hold": 0}
    share = 5

    def test_one_address_cannot_hold_every_waiting_poll(self) -> None:
        """With a small max_waiting_polls an address gets at most half of it; another address still waits."""
        self.assertEqual([self.long_poll("192.0.2.66") for _ in range(5)], [b""] * 5)
        self.assertEqual(status_of(self.long_poll("192.0.2.66")), 429)
        self.assertEqual(self.long_poll("198.51.100.7"), b"")
        self.n.clock.advance(30)


class HeldRefusalTests(SiteTestCase):
    """limits.over_share_hold: an early over-share refusal is answered only after its hold (a tarpit).

    Issue 10's long-poll attacker re-sends each refused long-poll a second later: three
    addresses made each node refuse about 200 a second, in bursts that honest requests queued
    behind.  Held for ``min(wait, over_share_hold)`` seconds, each of its connections gets a
    few answers a minute.
    """

    limits = {"max_waiting_polls": 10}
    share = 5

    def setUp(self) -> None:
        super().setUp()
        self.assertEqual(
            [self.exchange("192.0.2.66", self.long_poll_request(30)) for _ in range(self.share)], [b""] * self.share
        )

    def long_poll_request(self, wait: int) -> bytes:
        return http_post("/api/mesh/dm/poll", Identity().poll_body(ts=self.now(), wait=wait))

    def held(self) -> float:
        return self.n.metrics.sample("meshrelay_held_refusals") or 0.0

    def send(self, wait: int = 30, host: str = "192.0.2.66") -> tuple[Any, StringTransport]:
        conn = self.connect(host)
        assert conn is not None
        conn[0].dataReceived(self.long_poll_request(wait))
        return conn

    def test_an_over_share_long_poll_is_answered_after_the_hold(self) -> None:
        """Counted and logged at once, answered 429 (with Retry-After) after over_share_hold (10 s)."""
        rate_limited = {"outcome": "rate_limited"}
        before = self.n.metrics.sample("meshrelay_dm_poll_total", rate_limited) or 0.0
        _, transport = self.send(wait=30)
        _, second = self.send(wait=30)
        self.assertEqual((transport.value(), second.value()), (b"", b""))
        self.assertEqual(self.held(), 2)
        self.assertEqual(self.n.metrics.sample("meshrelay_dm_poll_total", rate_limited), before + 2)
        # logged as any refusal, when it is decided: the first line at once, the second counted
        self.assertEqual(self.n.relay.log_agg.pending("refused:rate_limited"), 1)
        self.n.clock.advance(9.9)
        self.assertEqual(transport.value(), b"")
        self.n.clock.advance(0.1)
        answer = transport.value()
        self.assertEqual((status_of(answer), error_of(answer)), (429, "rate_limited"))
        self.assertIn(b"Retry-After: 1\r\n", answer)
        self.assertIn(b"Access-Control-Allow-Origin: *\r\n", answer)
        self.assertEqual(status_of(second.value()), 429)
        self.assertEqual(self.held(), 0)
        # the address's waiting polls were not touched; another address still waits
        self.assertEqual(self.n.relay.waiting, self.share)
        self.assertEqual(self.exchange("198.51.100.7", self.long_poll_request(30)), b"")
        self.n.clock.advance(30)

    def test_the_hold_is_at_most_the_polls_wait(self) -> None:
        """A poll that asked to wait 3 s is answered after 3 s, not 10."""
        _, transport = self.send(wait=3)
        self.n.clock.advance(2.9)
        self.assertEqual(transport.value(), b"")
        self.n.clock.advance(0.1)
        self.assertEqual(status_of(transport.value()), 429)
        self.n.clock.advance(30)

    def test_a_client_that_goes_away_ends_its_hold(self) -> None:
        """The connection closed while held: no answer, no timer left, the gauge back to 0."""
        proto, transport = self.send()
        timers = len(self.n.clock.getDelayedCalls())
        self.assertEqual(self.held(), 1)
        proto.connectionLost(Failure(ConnectionDone()))
        self.open.remove(proto)
        self.assertEqual(self.held(), 0)
        self.assertEqual(len(self.n.clock.getDelayedCalls()), timers - 1)
        self.n.clock.advance(10)
        self.assertEqual(transport.value(), b"")
        self.n.clock.advance(30)

    def test_at_most_max_waiting_polls_are_held(self) -> None:
        """Node-wide at most max_waiting_polls (10) refusals are held; past that they are answered at once."""
        held = [self.send() for _ in range(10)]
        self.assertEqual(self.held(), 10)
        self.assertEqual([t.value() for _, t in held], [b""] * 10)
        _, transport = self.send()
        self.assertEqual(status_of(transport.value()), 429)
        self.n.clock.advance(10)
        self.assertEqual([status_of(t.value()) for _, t in held], [429] * 10)
        self.assertEqual(self.held(), 0)
        self.n.clock.advance(30)

    def test_stopping_the_node_answers_the_held_refusals(self) -> None:
        """A node that stops answers what it holds at once (no timer left behind)."""
        _, transport = self.send()
        self.n.stop()
        self.addCleanup(setattr, self.n, "stop", lambda: None)  # stopped once
        self.assertEqual(status_of(transport.value()), 429)
        self.assertEqual(self.held(), 0)

    def test_the_hold_follows_a_reload(self) -> None:
        """over_share_hold is read live: after a reload to 0 an over-share long-poll is answered at once."""
        cfg = build_config(
            {
                "node": {"data_dir": self.n.config.node.data_dir, "public_url": "http://a.test"},
                "limits": {"client_rate": 0, **self.limits, "over_share_hold": 0},
            }
        )
        self.n.node.reconfigure(cfg)
        _, transport = self.send()
        self.assertEqual(status_of(transport.value()), 429)
        self.assertEqual(self.held(), 0)
        self.n.clock.advance(30)


class DepositBytesTests(SiteTestCase):
    def envelope(self, sender: Identity | None = None, mailbox: Identity | None = None) -> dict[str, Any]:
        return (sender or Identity()).envelope(mailbox or Identity(), os.urandom(8192), ts=self.now())

    def deposit(self, host: str, sender: Identity | None = None, mailbox: Identity | None = None) -> bytes:
        return self.exchange(host, http_post("/api/mesh/dm/send", self.envelope(sender, mailbox)))

    def test_one_address_cannot_fill_the_store(self) -> None:
        """One address gets deposit_bytes_burst bytes at once, then deposit_bytes_rate a second; others are served."""
        size = len(json.dumps(self.envelope()))  # every such body has this length
        fits = 262144 // size
        answers = [self.deposit("192.0.2.66") for _ in range(40)]
        codes = [status_of(a) for a in answers]
        self.assertEqual(codes, [200] * fits + [429] * (40 - fits))
        self.assertEqual(error_of(answers[-1]), "rate_limited")
        self.assertEqual(self.refused("deposit_bytes"), 40 - fits)
        self.assertEqual(self.n.store.stats().envelopes, fits)
        self.assertEqual(status_of(self.deposit("198.51.100.7")), 200)
        # deposit_bytes_rate (32768 bytes a second) refills the bucket.
        self.n.clock.advance(1)
        more = (262144 - fits * size + 32768) // size
        codes = [status_of(self.deposit("192.0.2.66")) for _ in range(more + 1)]
        self.assertEqual(codes, [200] * more + [429])


class AckBytesTests(SiteTestCase):
    def junk_ack_poll(self, host: str) -> bytes:
        """A signed poll from a throwaway mailbox acking 500 made-up ids (a 34 KB body)."""
        ids = [os.urandom(32).hex() for _ in range(500)]
        return self.exchange(host, http_post("/api/mesh/dm/poll", Identity().poll_body(ts=self.now(), ack=ids)))

    def test_one_address_cannot_flood_acks(self) -> None:
        """Polls' bodies draw from the address's write budget: a junk-ack flood is refused, another address is served."""
        answers = [self.junk_ack_poll("192.0.2.66") for _ in range(12)]
        codes = [status_of(a) for a in answers]
        self.assertIn(429, codes)
        self.assertEqual(codes[: codes.index(429)], [200] * codes.index(429))
        self.assertLessEqual(codes.index(429), 262144 // 34000 + 1)
        self.assertEqual(error_of(answers[-1]), "rate_limited")
        self.assertGreater(self.refused("ack_bytes"), 0)
        self.assertEqual(status_of(self.junk_ack_poll("198.51.100.7")), 200)


class AddressMeansNothingTests(SiteTestCase):
    """node.listen_address_means_nothing: every client arrives as 127.0.0.1 (a Tor onion service)."""

    node_cfg = {"listen_address_means_nothing": True}
    limits = {
        "max_connections": 100,
        "max_connections_per_address": 4,
        "max_waiting_polls_per_address": 2,
        "client_rate": 1,
        "client_burst": 3,
        "deposit_bytes_rate": 1,
        "deposit_bytes_burst": 32768,
        "max_body_bytes": 32768,
    }

    def envelope(self, sender: Identity, mailbox: Identity) -> dict[str, Any]:
        return sender.envelope(mailbox, os.urandom(8192), ts=self.now())

    def send(self, sender: Identity, mailbox: Identity) -> bytes:
        return self.exchange("127.0.0.1", http_post("/api/mesh/dm/send", self.envelope(sender, mailbox)))

    def test_connections_only_meet_the_listener_cap(self) -> None:
        """With no meaningful address there is no per-address connection cap: the listener's cap holds."""
        held = [self.connect("127.0.0.1") for _ in range(101)]
        self.assertEqual(sum(c is not None for c in held), 100)
        self.assertEqual(self.refused("max_connections"), 1)
        self.assertEqual(self.refused("max_connections_per_address"), 0)

    def test_polls_are_limited_per_mailbox(self) -> None:
        """Polls and counts draw from their mailbox's bucket: one mailbox's flood leaves others served."""
        bob, carol = Identity(), Identity()
        codes = [
            status_of(self.exchange("127.0.0.1", http_post("/api/mesh/dm/count", bob.poll_body(ts=self.now()))))
            for _ in range(4)
        ]
        self.assertEqual(codes, [200, 200, 200, 429])
        answer = self.exchange("127.0.0.1", http_post("/api/mesh/dm/poll", bob.poll_body(ts=self.now())))
        self.assertEqual((status_of(answer), error_of(answer)), (429, "rate_limited"))
        answer = self.exchange("127.0.0.1", http_post("/api/mesh/dm/poll", carol.poll_body(ts=self.now())))
        self.assertEqual(status_of(answer), 200)
        self.assertEqual(self.refused("client_rate"), 2)

    def test_waiting_share_is_the_mailboxs(self) -> None:
        """Long-polls count against their mailbox's share of waiting polls."""
        bob, carol = Identity(), Identity()

        def long_poll(who: Identity) -> bytes:
            return self.exchange("127.0.0.1", http_post("/api/mesh/dm/poll", who.poll_body(ts=self.now(), wait=30)))

        self.assertEqual([long_poll(bob), long_poll(bob)], [b"", b""])
        self.assertEqual(status_of(long_poll(bob)), 429)
        self.assertEqual(long_poll(carol), b"")
        self.n.clock.advance(30)

    def test_deposit_bytes_are_charged_to_sender_and_mailbox(self) -> None:
        """Deposit bytes are charged to sender and mailbox: a flooding sender or flooded mailbox is refused, others not."""
        size = len(json.dumps(self.envelope(Identity(), Identity())))
        fits = 32768 // size
        self.assertEqual(fits, 2)  # within the request burst (3) too
        flooder = Identity()
        codes = [status_of(self.send(flooder, Identity())) for _ in range(fits + 1)]
        self.assertEqual(codes, [200] * fits + [429])
        victim = Identity()
        codes = [status_of(self.send(Identity(), victim)) for _ in range(fits + 1)]
        self.assertEqual(codes, [200] * fits + [429])
        self.assertEqual(self.refused("deposit_bytes"), 2)
        self.assertEqual(status_of(self.send(Identity(), Identity())), 200)

    def test_health_is_not_limited(self) -> None:
        """health has no key that means anything here, so it is not limited."""
        self.assertEqual([status_of(self.exchange("127.0.0.1", HEALTH)) for _ in range(6)], [200] * 6)


class ExtraListenerTests(SiteTestCase):
    limits = {"max_connections": 100, "max_connections_per_address": 2}

    def test_a_listener_whose_address_means_nothing_has_its_own_cap(self) -> None:
        """Node.site(address_means_nothing, max_connections): no per-address cap, its own global cap."""
        onion = self.n.node.site(address_means_nothing=True, max_connections=5)
        self.assertEqual(sum(self.connect("127.0.0.1", onion) is not None for _ in range(6)), 5)
        # The default listener still holds each address to its share.
        self.assertEqual(sum(self.connect("127.0.0.1") is not None for _ in range(3)), 2)

    def test_listeners_tables_start_listeners(self) -> None:
        """Each [[listeners]] table is one more public listener, with its own settings."""
        data = os.path.abspath(self.mktemp())
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as fh:
            fh.write(
                f'[node]\ndata_dir = "{data}"\nlisten = "tcp:7001:interface=127.0.0.1"\n'
                '[[listeners]]\nendpoint = "tcp:7003:interface=127.0.0.1"\naddress_means_nothing = true\n'
                "max_connections = 7\n"
            )
        opts = Options()
        opts.parseOptions(["--config", path])
        reactor = MemoryReactorClock()
        svc: Any = makeService(opts, reactor)
        node = svc.getServiceNamed("meshrelay-node")
        self.addCleanup(node.store._wconn.close)
        for name in ("public", "public-1"):
            svc.getServiceNamed(name).startService()
            self.addCleanup(svc.getServiceNamed(name).stopService)
        sites = {port: factory for port, factory, _backlog, _iface in reactor.tcpServers}
        self.assertEqual(sorted(sites), [7001, 7003])
        self.assertEqual((sites[7003].max_connections, sites[7003].policy.address_means_nothing), (7, True))
        self.assertEqual((sites[7001].max_connections, sites[7001].policy.address_means_nothing), (10240, False))


class FairConfigTests(SynchronousTestCase):
    def bad(self, raw: dict[str, Any]) -> str:
        with self.assertRaises(ConfigError) as cm:
            build_config(raw)
        text = str(cm.exception)
        self.assertNotIn("\n", text)
        return text

    def test_bad_keys_give_one_line_each(self) -> None:
        """Each bad fair-share key is refused with one line naming it."""
        self.assertEqual(
            self.bad({"limits": {"trusted_proxies": "10.0.0.1, proxy.example"}}),
            "limits.trusted_proxies: 'proxy.example' is not an IP address or network",
        )
        self.assertIn(
            "limits.deposit_bytes_burst: must be at least limits.max_body_bytes (65536)",
            self.bad({"limits": {"deposit_bytes_burst": 1000}}),
        )
        self.assertEqual(self.bad({"limits": {"ipv6_prefix": 8}}), "limits.ipv6_prefix: must be at least 16, got 8")
        self.assertEqual(self.bad({"limits": {"ipv4_prefix": 33}}), "limits.ipv4_prefix: must be at most 32, got 33")
        self.assertEqual(
            self.bad({"node": {"listen_address_means_nothing": "yes"}}),
            "node.listen_address_means_nothing: expected true or false, got 'yes'",
        )
        self.assertEqual(
            self.bad({"listeners": {"endpoint": "tcp:1"}}), "listeners: expected an array of tables ([[listeners]])"
        )
        self.assertEqual(self.bad({"listeners": [{}]}), "listeners[0].endpoint: missing")
        self.assertEqual(self.bad({"listeners": [{"endpoint": "tcp:1", "port": 2}]}), "listeners[0].port: unknown key")
        self.assertEqual(
            self.bad({"listeners": [{"endpoint": "tcp:1", "max_connections": -1}]}),
            "listeners[0].max_connections: must be at least 0, got -1",
        )
        self.assertEqual(
            self.bad({"sync": {"fetch_remote_max_concurrent": 0}}),
            "sync.fetch_remote_max_concurrent: must be at least 1, got 0",
        )
        # A byte budget that is off needs no burst check.
        build_config({"limits": {"deposit_bytes_rate": 0, "deposit_bytes_burst": 1000}})
