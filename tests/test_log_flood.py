"""Per-request log lines are aggregated: one line per reason per interval, with counts (issue 10 item 5)."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from meshrelay.logs import Aggregator
from meshrelay.peers import H_HMAC
from tests.helpers import Identity, MemNode
from tests.test_peer_api import CHANGES, PeerAPITestCase

POLL = "/api/mesh/dm/poll"


def capture(test: SynchronousTestCase) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    test.addCleanup(globalLogPublisher.removeObserver, events.append)
    return events


def lines(events: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    return [e for e in events if str(e.get("log_format", "")).startswith(prefix)]


class AggregatorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.events: list[dict[str, Any]] = []
        self.log = Logger(namespace="t", observer=self.events.append)
        self.agg = Aggregator(self.clock, 60, max_keys=2)

    def test_first_at_once_then_one_line_with_the_count(self) -> None:
        """The first event is logged at once; the rest of the interval is one line with their count."""
        for i in range(100):
            self.agg.emit(self.log, "a", "bad thing {i}", LogLevel.warn, i=i)
        self.assertEqual([(e["folded"], e["i"]) for e in self.events], [(0, 0)])
        self.clock.advance(60)
        self.assertEqual([(e["folded"], e["i"]) for e in self.events], [(0, 0), (99, 99)])
        self.assertIn("99 more like this in the last 60s", self.events[1]["log_format"].format(**self.events[1]))
        self.clock.advance(60)  # a quiet interval: no line, and the reason closes
        self.assertEqual(len(self.events), 2)
        self.agg.emit(self.log, "a", "bad thing {i}", i=7)
        self.assertEqual(len(self.events), 3)
        self.assertEqual(self.clock.getDelayedCalls()[0].getTime(), 180)

    def test_sustained_flood_is_one_line_per_interval(self) -> None:
        """A flood lasting ten intervals writes eleven lines, the counts adding up to every event."""
        for _ in range(600):
            self.agg.emit(self.log, "a", "x")
            self.clock.advance(1)
        self.clock.advance(60)
        self.assertEqual(len(self.events), 11)
        self.assertEqual(sum(e["folded"] for e in self.events) + 1, 600)

    def test_reasons_are_separate_and_bounded(self) -> None:
        """Each reason has its own line; past max_keys new reasons are only counted; stop reports and cancels."""
        self.agg.emit(self.log, "a", "a")
        self.agg.emit(self.log, "b", "b")
        self.agg.emit(self.log, "c", "c")
        self.agg.emit(self.log, "b", "b")
        self.assertEqual([e["log_format"] for e in self.events], ["a", "b"])
        self.assertEqual(self.agg.other, 1)
        self.agg.stop()
        self.assertEqual(self.events[-1]["folded"], 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class PeerAuthFloodTests(PeerAPITestCase):
    def test_bad_hmac_flood_is_two_lines(self) -> None:
        """400 bad-HMAC peer requests log one line at once and one with the count (399) a minute later."""
        events = capture(self)
        for _ in range(400):
            hdrs = self.signed_headers("GET", CHANGES, b"")
            hdrs[H_HMAC] = "0" * 64
            self.assertEqual(self.node.request("GET", CHANGES, raw=b"", headers=hdrs)[0], 403)
        refused = lines(events, "peer request refused")
        self.assertEqual(len(refused), 1)
        self.assertEqual(refused[0]["reason"], "bad_hmac")
        self.node.clock.advance(60)
        refused = lines(events, "peer request refused")
        self.assertEqual([e["folded"] for e in refused], [0, 399])
        self.assertEqual(self.failures("bad_hmac"), 400)


class ClientRefusalFloodTests(SynchronousTestCase):
    def test_refusals_are_aggregated_per_code(self) -> None:
        """Floods of bad JSON, bad signatures and unknown paths give one line per code now and one count later."""
        mem = MemNode(self.mktemp())
        self.addCleanup(mem.stop)
        events = capture(self)
        who = Identity()
        for _ in range(200):
            self.assertEqual(mem.request("POST", POLL, raw=b"{not json")[0], 400)
            body = who.poll_body(ts=int(mem.clock.seconds()))
            body["sig"] = Identity().poll_body()["sig"]
            self.assertEqual(mem.request("POST", POLL, raw=json.dumps(body).encode())[0], 400)
            self.assertEqual(mem.request("GET", "/no/such/path")[0], 404)
        refused = lines(events, "refused ")
        self.assertEqual(
            sorted(e["aggregated"] for e in refused), ["refused:bad_json", "refused:bad_signature", "refused:not_found"]
        )
        mem.clock.advance(60)
        refused = lines(events, "refused ")
        self.assertEqual(len(refused), 6)
        self.assertEqual(sorted(e["folded"] for e in refused), [0, 0, 0, 199, 199, 199])


class StoreErrorFloodTests(SynchronousTestCase):
    def test_failing_store_is_one_line_per_reason(self) -> None:
        """100 deposits against a read-only store: the store's and the web layer's error lines are aggregated."""
        mem = MemNode(self.mktemp())
        self.addCleanup(mem.stop)
        store: Any = mem.store
        writable = store._wconn
        ro = sqlite3.connect(f"file:{store.path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
        store._wconn = store._core.conn = ro

        def restore() -> None:
            if store._wconn is ro:
                store._wconn = store._core.conn = writable
                ro.close()

        self.addCleanup(restore)
        events = capture(self)
        alice, bob = Identity(), Identity()
        for i in range(100):
            env = alice.envelope(bob, b"%d" % i, ts=int(mem.clock.seconds()))
            self.assertEqual(mem.send(env)[0], 503)
        errors = [e for e in events if e.get("log_level") in (LogLevel.error, LogLevel.critical)]
        self.assertGreater(len(errors), 0)
        self.assertLessEqual(len(errors), 3, [e["log_format"] for e in errors])
        restore()
        mem.clock.advance(60)
        counted = [e for e in events if e.get("log_level") == LogLevel.error and e.get("folded")]
        self.assertEqual({e["folded"] for e in counted}, {99})
