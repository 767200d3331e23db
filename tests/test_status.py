"""The /status page: node, peers and their outcomes, storage, rates; escaped and self-refreshing."""

from __future__ import annotations

import re

from twisted.trial.unittest import SynchronousTestCase

from meshrelay.status import RateSampler, fmt_bytes, fmt_duration
from tests.adminhelpers import AdminClient, FakeReplication
from tests.helpers import T0, Identity, MemNode, make_config

PEERS = [
    {
        "url": "http://b.test",
        "last_push_outcome": "ok",
        "last_push_at": T0 - 3,
        "last_sync_outcome": "ok",
        "last_sync_at": T0 - 20,
        "sync_lag_seconds": 20.0,
        "queue_depth": 0,
        "inflight": 1,
        "backoff_seconds": None,
    },
    {
        "url": "http://c.test:8081",
        "last_push_outcome": "error",
        "last_push_at": T0 - 125,
        "last_sync_outcome": "forbidden",
        "last_sync_at": T0 - 30,
        "sync_lag_seconds": 3700.0,
        "queue_depth": 42,
        "inflight": 0,
        "backoff_seconds": 16,
    },
    {
        "url": "http://d.test",
        "last_push_outcome": None,
        "last_push_at": None,
        "last_sync_outcome": None,
        "last_sync_at": None,
        "sync_lag_seconds": None,
        "queue_depth": None,
        "inflight": None,
        "backoff_seconds": None,
    },
]


def rows(page: str) -> list[str]:
    body = page.split("<h2>Peers</h2>", 1)[1].split("</table>", 1)[0]
    return re.findall(r"<tr>(.*?)</tr>", body, re.S)[1:]


class StatusPageTests(SynchronousTestCase):
    def make(self, peers: list[dict[str, str]] | None = None) -> tuple[MemNode, AdminClient]:
        tmp = self.mktemp()
        mem = MemNode(tmp, config=make_config(tmp, peers=peers))
        self.addCleanup(mem.stop)
        return mem, AdminClient(mem)

    def test_each_peer_and_its_outcomes(self) -> None:
        """Each peer from peer_status() has a row with its push and sync outcome, age, lag, queue and backoff."""
        mem, admin = self.make([{"url": p["url"], "secret": "s" * 16} for p in PEERS])
        mem.node.replication = FakeReplication(mem, PEERS)  # type: ignore[attr-defined]
        code, headers, page = admin.get("/status")
        self.assertEqual(code, 200)
        self.assertEqual(headers[b"Content-Type"], [b"text/html; charset=utf-8"])
        got = rows(page)
        self.assertEqual(len(got), 3)
        b, c, d = got
        self.assertIn("http://b.test", b)
        self.assertIn('<span class="badge ok">ok</span> <span class="age"', b)
        self.assertIn(">3s ago<", b)
        self.assertIn(">20s<", b)
        self.assertIn("http://c.test:8081", c)
        self.assertIn('<span class="badge bad">error</span>', c)
        self.assertIn(">2m 05s ago<", c)
        self.assertIn('<span class="badge bad">forbidden</span>', c)
        self.assertIn('<td class="num warn">1h 01m</td>', c)
        self.assertIn('<td class="num">20s</td>', b)
        self.assertIn(">42<", c)
        self.assertIn(">16s<", c)
        self.assertIn("http://d.test", d)
        self.assertEqual(d.count('<span class="badge none">never</span>'), 2)

    def test_values_are_escaped(self) -> None:
        """Whatever peer_status() returns is HTML-escaped."""
        mem, admin = self.make([{"url": "http://b.test", "secret": "s" * 16}])
        hostile = dict(PEERS[0], url="http://b.test/<script>x</script>", last_sync_outcome='<img src=x onerror="y">')
        mem.node.replication = FakeReplication(mem, [hostile])  # type: ignore[attr-defined]
        _, headers, page = admin.get("/status")
        self.assertNotIn("<script>", page)
        self.assertNotIn("<img", page)
        self.assertIn("&lt;script&gt;", page)
        self.assertIn("&lt;img src=x onerror=&quot;y&quot;&gt;", page)
        self.assertIn(b"default-src 'none'", headers[b"Content-Security-Policy"][0])

    def test_node_summary_and_refresh(self) -> None:
        """The page names the node, version and uptime, shows stored counts, and refreshes itself."""
        mem, admin = self.make()
        alice, bob = Identity(), Identity()
        mem.clock.advance(3725)
        mem.send(alice.envelope(bob, ts=int(mem.clock.seconds())))
        _, _, page = admin.get("/status")
        self.assertIn('<meta http-equiv="refresh" content="5">', page)
        self.assertIn("http://a.test", page)
        self.assertIn("version 0.1.0", page)
        self.assertIn("up 1h 02m", page)
        self.assertIn('<div class="v">1</div><div class="k">stored envelopes</div>', page)
        self.assertIn("No peers configured", page)
        self.assertNotIn("<script", page)

    def test_configured_peers_without_replication(self) -> None:
        """Configured peers are listed, marked n/a, when replication is not running."""
        mem, admin = self.make([{"url": "http://b.test", "secret": "s" * 16}])
        mem.node.replication = None  # e.g. not started yet
        _, _, page = admin.get("/status")
        self.assertIn("http://b.test", page)
        self.assertIn("Replication is not running", page)
        self.assertEqual(rows(page)[0].count('<span class="badge none">n/a</span>'), 2)

    def test_peer_status_failure_still_renders(self) -> None:
        """A peer_status() that raises leaves a 200 page that says so."""
        mem, admin = self.make([{"url": "http://b.test", "secret": "s" * 16}])

        class Broken(FakeReplication):
            def peer_status(self) -> list[dict[str, object]]:
                raise RuntimeError("boom")

        mem.node.replication = Broken(mem, [])  # type: ignore[attr-defined]
        code, _, page = admin.get("/status")
        self.assertEqual(code, 200)
        self.assertIn("status unavailable", page)
        self.flushLoggedErrors(RuntimeError)

    def test_rates_over_the_last_minute(self) -> None:
        """Rates are counter deltas over the sampled window on the injected clock."""
        mem, admin = self.make()
        sampler = admin.sampler
        sampler.startService()
        self.addCleanup(sampler.stopService)
        rates, window = sampler.rates()
        self.assertIsNone(rates["deposits"])
        bob = Identity()
        for _ in range(12):
            mem.clock.advance(5)
            mem.send(Identity().envelope(bob, ts=int(mem.clock.seconds())))
        rates, window = sampler.rates()
        # 12 samples taken after the first; the window is 60 s.
        self.assertEqual(window, 60.0)
        self.assertAlmostEqual(rates["deposits"], 12 / 60)
        self.assertEqual(rates["store_errors"], 0.0)
        _, _, page = admin.get("/status")
        self.assertIn("Rates over the last 1m 00s", page)
        self.assertIn('<td>deposits accepted</td><td class="num">0.20</td><td class="num">12</td>', page)
        # Old samples fall out of the ring: two quiet minutes later the rate is 0.
        for _ in range(24):
            mem.clock.advance(5)
        rates, window = sampler.rates()
        self.assertEqual(rates["deposits"], 0.0)

    def test_sampler_ring_is_bounded(self) -> None:
        """The sampler keeps only about one window of samples."""
        mem, _ = self.make()
        sampler = RateSampler(mem.metrics, mem.clock, interval=5.0, window=60.0)
        sampler.startService()
        for _ in range(1000):
            mem.clock.advance(5)
        self.assertLessEqual(len(sampler._ring), 14)
        sampler.stopService()
        self.assertFalse(sampler._loop.running)


class FormatTests(SynchronousTestCase):
    def test_durations_and_bytes(self) -> None:
        """Durations and byte counts read naturally."""
        self.assertEqual(
            [fmt_duration(x) for x in (None, 0, 59, 61, 3600, 90061)],
            ["\u2014", "0s", "59s", "1m 01s", "1h 00m", "1d 01h"],
        )
        self.assertEqual([fmt_bytes(x) for x in (0, 1536, 3 << 30)], ["0 B", "1.5 KiB", "3.0 GiB"])
