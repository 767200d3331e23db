"""fetch_remote bounded (issue 10, item 4): coalesced, spaced out, capped, and on a peer budget of its own.

Each poll with ``fetch_remote`` used to pull the whole mailbox from every peer,
so polling an attacker-filled mailbox amplified into megabytes per poll, slowed
every other client, and spent the peer rate budget replication needs.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from meshrelay.fetchgate import BUSY, JOINED, RECENT, STARTED, RemoteFetchGate
from tests.helpers import Identity
from tests.test_peer_api import CHANGES, REPLICATE, PeerAPITestCase
from tests.test_replication import MeshTestCase, answered


class Fetches:
    """A fake ``fetch(mailbox)``: records each call; the test fires them."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Deferred[None]]] = []

    def __call__(self, mailbox: str) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.calls.append((mailbox, d))
        return d

    def finish(self, i: int = 0) -> None:
        self.calls[i][1].callback(None)


class GateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.fetches = Fetches()
        self.outcomes: list[str] = []
        self.gate = RemoteFetchGate(
            self.clock, self.fetches, max_concurrent=2, min_interval=5, timeout=2, on_outcome=self.outcomes.append
        )

    def test_polls_of_one_mailbox_share_one_fetch(self) -> None:
        """While a mailbox's fetch is in flight, more polls of it wait for that fetch instead of starting one."""
        ds = [self.gate.run("m") for _ in range(5)]
        self.assertEqual(len(self.fetches.calls), 1)
        self.assertFalse(any(d.called for d in ds))
        self.fetches.finish()
        self.assertEqual([self.successResultOf(d) for d in ds], [None] * 5)
        self.assertEqual(self.outcomes, [STARTED] + [JOINED] * 4)

    def test_minimum_interval_per_mailbox(self) -> None:
        """A mailbox fetched less than min_interval ago is not fetched again; after it, it is."""
        self.gate.run("m")
        self.fetches.finish()
        self.clock.advance(4)
        self.assertIsNone(self.successResultOf(self.gate.run("m")))
        self.assertEqual(len(self.fetches.calls), 1)
        self.gate.run("other")
        self.assertEqual(len(self.fetches.calls), 2)
        self.clock.advance(1)
        self.gate.run("m")
        self.assertEqual(len(self.fetches.calls), 3)
        self.assertEqual(self.outcomes, [STARTED, RECENT, STARTED, STARTED])

    def test_concurrency_cap_serves_local_data(self) -> None:
        """Past max_concurrent fetches in flight, a poll of another mailbox goes on at once, unfetched."""
        a, b = self.gate.run("a"), self.gate.run("b")
        c = self.gate.run("c")
        self.assertIsNone(self.successResultOf(c))
        self.assertEqual([m for m, _ in self.fetches.calls], ["a", "b"])
        self.assertEqual(self.outcomes[-1], BUSY)
        self.fetches.finish(0)
        self.successResultOf(a)
        self.gate.run("c")
        self.assertEqual([m for m, _ in self.fetches.calls], ["a", "b", "c"])
        self.assertNoResult(b)

    def test_timeout_cancels_the_shared_fetch(self) -> None:
        """A fetch still running after the timeout is cancelled, and every poll waiting on it goes on."""
        ds = [self.gate.run("m") for _ in range(3)]
        self.clock.advance(2)
        self.assertEqual([self.successResultOf(d) for d in ds], [None] * 3)
        self.assertTrue(self.fetches.calls[0][1].called)
        self.assertEqual(self.gate.inflight, 0)

    def test_a_poll_that_gives_up_leaves_the_fetch_running(self) -> None:
        """Cancelling one waiting poll (its client left) does not cancel the fetch the others share."""
        first, second = self.gate.run("m"), self.gate.run("m")
        first.cancel()
        self.failureResultOf(first, CancelledError)
        self.assertFalse(self.fetches.calls[0][1].called)
        self.fetches.finish()
        self.assertIsNone(self.successResultOf(second))

    def test_never_fails(self) -> None:
        """A fetch that fails, or raises, still lets the poll go on."""
        gate = RemoteFetchGate(self.clock, lambda m: fail(RuntimeError("peer down")), min_interval=0)
        self.assertIsNone(self.successResultOf(gate.run("m")))

        def boom(mailbox: str) -> Deferred[None]:
            raise RuntimeError("bug")

        gate = RemoteFetchGate(self.clock, boom, min_interval=0)
        self.assertIsNone(self.successResultOf(gate.run("m")))
        self.assertEqual(gate.inflight, 0)

    def test_memory_is_bounded(self) -> None:
        """The per-mailbox memory of recent fetches is bounded by max_remembered."""
        gate = RemoteFetchGate(self.clock, lambda m: Deferred(), max_concurrent=10**6, min_interval=60)
        gate.max_remembered = 10
        gate.fetch = lambda m: fail(RuntimeError("done at once"))
        for i in range(100):
            gate.run(f"m{i}")
        self.assertLessEqual(len(gate._done_at), 11)


class FetchRemoteAmplificationTests(MeshTestCase):
    names = ("a", "b")
    sync = {"interval": 3600}

    def fetch_requests(self) -> list[str]:
        return [url for _, url in self.mesh.link("b", "a").requests if "mailbox=" in url]

    def test_repeated_fetch_remote_polls_fetch_once(self) -> None:
        """Ten fetch_remote polls of one (filled) mailbox in a row make one fetch from the peer, not ten."""
        self.mesh.set_mode("a", "b", "down")
        for i in range(5):
            self.send("a", b"m%d" % i, sender=Identity())
        self.mesh.link("b", "a").requests.clear()
        for _ in range(10):
            status, body = self.poll("b", fetch_remote=True)
            self.assertEqual((status, len(body["messages"])), (200, 5))
        self.assertEqual(len(self.fetch_requests()), 1)
        # After fetch_remote_min_interval the mailbox is fetched again.
        self.mesh.advance(5)
        self.poll("b", fetch_remote=True)
        self.assertEqual(len(self.fetch_requests()), 2)

    def test_concurrent_fetches_are_capped(self) -> None:
        """With fetch_remote_max_concurrent fetches in flight, polls of other mailboxes answer at once."""
        self.mesh.set_mode("b", "a", "hold")
        node = self.mesh["b"]
        boxes = [Identity() for _ in range(20)]
        ds = [
            node.start_request("POST", "/api/mesh/dm/poll", who.poll_body(ts=self.now(), fetch_remote=True))
            for who in boxes
        ]
        self.mesh.settle()
        self.assertEqual(len(self.mesh.link("b", "a").held), 8)
        self.assertEqual([answered(d) for d in ds], [False] * 8 + [True] * 12)
        self.assertEqual(self.metric("b", "meshrelay_dm_fetch_remote_total", outcome="skipped_busy"), 12)
        self.mesh.link("b", "a").release()
        self.mesh.settle()
        self.assertTrue(all(answered(d) for d in ds))


class PeerFetchBudgetTests(PeerAPITestCase):
    """Mailbox-filtered changes (what fetch_remote sends) draw from a budget of their own."""

    limits = {"peer_rate": 5, "peer_burst": 5, "peer_fetch_rate": 1, "peer_fetch_burst": 3}

    def test_fetches_cannot_use_up_the_replication_budget(self) -> None:
        """A flood of mailbox-filtered changes is refused at its own budget; push and sync still pass."""
        box = Identity().pub
        codes = [self.peer("GET", f"{CHANGES}?mailbox={box}")[0] for _ in range(10)]
        self.assertEqual(codes, [200] * 3 + [429] * 7)
        self.assertEqual(self.peer("POST", REPLICATE, {"envelopes": []})[0], 200)
        self.assertEqual(self.peer("GET", CHANGES)[0], 200)
        self.assertEqual(self.peer("GET", f"{CHANGES}?since=0")[0], 200)

    def test_main_budget_is_unchanged_for_replication(self) -> None:
        """push and sync still share peer_rate/peer_burst as before."""
        codes = [self.peer("POST", REPLICATE, {"envelopes": []})[0] for _ in range(6)]
        self.assertEqual(codes, [200] * 5 + [429])


class PeerFetchDefaultBudgetTests(PeerAPITestCase):
    """With only main's keys: a flood of fetches cannot use up a small replication budget."""

    limits: dict[str, Any] = {"peer_rate": 5, "peer_burst": 5}

    def test_fetch_flood_leaves_replication_its_budget(self) -> None:
        """Twenty mailbox-filtered changes do not use up a peer budget of five; a push then still passes."""
        box = Identity().pub
        for _ in range(20):
            self.peer("GET", f"{CHANGES}?mailbox={box}")
        self.assertEqual(self.peer("POST", REPLICATE, {"envelopes": []})[0], 200)
