"""Mesh replication in one process: nodes on a shared Clock wired by StubTreq (push, sync, fetch_remote)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import treq
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import ResponseNeverReceived
from twisted.web.resource import Resource

from meshrelay import envelope as E
from meshrelay.config import PeerConfig, build_config
from meshrelay.peers import H_HMAC, H_NONCE, H_TS, H_URL, compute_mac, derive_key
from meshrelay.protocol import Features
from meshrelay.relay import NoReplication
from meshrelay.replication import APPLY_DEPTH, MAX_FETCH_PAGES, PeerEndpoints, PeerError, PooledHTTPClients, parse_page
from meshrelay.status import PEER_KEYS
from tests.helpers import Identity, MemNode, Mesh, dump_live, make_config, tkeys

REPLICATE = "/api/mesh/dm/replicate-envelope"
ACK = "/api/mesh/dm/ack"
CHANGES = "/api/mesh/dm/changes"
FEATURES = "/api/mesh/dm/features"
POLICIES = "/api/mesh/dm/policies"
BODIES = "/api/mesh/dm/bodies"


def answered(d: Deferred[Any]) -> bool:
    """Whether a StubTreq response Deferred has its result (passing the result on)."""
    box: list[Any] = []

    def seen(result: Any) -> Any:
        box.append(result)
        return result

    d.addBoth(seen)
    return bool(box)


class MeshTestCase(SynchronousTestCase):
    names: tuple[str, ...] = ("a", "b", "c")
    links: Any = "full"
    sync: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    v1_only: tuple[str, ...] = ()

    def setUp(self) -> None:
        self.mesh = Mesh(
            self.mktemp(),
            names=self.names,
            links=self.links,
            sync=dict(self.sync),
            limits=dict(self.limits),
            overrides=self.overrides,
            v1_only=self.v1_only,
        )
        self.addCleanup(self.mesh.stop)
        self.mesh.settle()  # the start-up sync of every node
        self.bob = Identity()
        self.alice = Identity()

    def now(self) -> int:
        return int(self.mesh.clock.seconds())

    def send(
        self, name: str, text: bytes = b"hi", sender: Identity | None = None, mailbox: Identity | None = None
    ) -> dict[str, Any]:
        env = (sender or self.alice).envelope(mailbox or self.bob, text, ts=self.now())
        status, body = self.mesh[name].send(env)
        self.assertEqual(status, 200, body)
        return env

    def live(self, name: str) -> list[str]:
        return dump_live(self.mesh[name].store, self.now())["envelopes"]  # type: ignore[no-any-return]

    def tombstones(self, name: str) -> list[bytes]:
        return dump_live(self.mesh[name].store, self.now())["tombstones"]  # type: ignore[no-any-return]

    def call(self, name: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """A client request to node ``name`` that may need the mesh to move before it answers."""
        node = self.mesh[name]
        d = node.start_request(method, path, body)
        self.mesh.settle()
        return node.result(d)

    def poll(self, name: str, who: Identity | None = None, **kw: Any) -> tuple[int, Any]:
        who = who or self.bob
        ack = kw.pop("ack", ())
        return self.call(name, "POST", "/api/mesh/dm/poll", who.poll_body(ts=self.now(), ack=ack, **kw))

    def metric(self, name: str, metric: str, **labels: str) -> float:
        return self.mesh[name].metrics.value(metric, **labels)

    def push_count(self, src: str, dst: str, outcome: str) -> float:
        return self.metric(src, "meshrelay_dm_replication_push_total", peer=Mesh.url(dst), outcome=outcome)

    def replication(self, name: str) -> Any:
        rep = self.mesh[name].node.replication
        assert rep is not None
        return rep

    def peer_client(self, src: str, dst: str) -> Any:
        return next(p for p in self.replication(src).peers if p.url == Mesh.url(dst))


class PushTests(MeshTestCase):
    sync = {"interval": 600}

    def test_push_delivers_to_every_peer(self) -> None:
        """A deposit at A reaches B and C by push, without waiting for sync."""
        env = self.send("a")
        self.mesh.settle()
        self.assertEqual(self.live("b"), [env["msg_id"]])
        self.assertEqual(self.live("c"), [env["msg_id"]])
        self.assertEqual(self.push_count("a", "b", "ok"), 1)
        self.assertEqual(self.push_count("a", "c", "ok"), 1)
        self.assertEqual(self.metric("b", "meshrelay_sync_items_total", peer=Mesh.url("a"), kind="envelope"), 0)
        _, polled = self.poll("c")
        self.assertEqual(polled["messages"], [env])

    def test_replicas_are_not_pushed_on(self) -> None:
        """One hop: B and C do not push what they received from A."""
        self.send("a")
        self.mesh.settle()
        for src in ("b", "c"):
            for dst in self.mesh.names:
                if dst != src:
                    self.assertEqual(self.push_count(src, dst, "ok"), 0)
        self.assertEqual([r for r in self.mesh.link("b", "c").requests if r[0] == "POST"], [])

    def test_deposits_in_one_turn_are_coalesced_into_one_batch(self) -> None:
        """Twenty deposits queued together go to a peer in one request."""
        envs = [self.send("a", b"m%d" % i, sender=Identity()) for i in range(20)]
        self.mesh.settle()
        pushes = [r for r in self.mesh.link("a", "b").requests if REPLICATE in r[1]]
        self.assertEqual(len(pushes), 1)
        self.assertEqual(self.push_count("a", "b", "ok"), 20)
        self.assertEqual(sorted(self.live("b")), sorted(e["msg_id"] for e in envs))

    def test_batches_are_split_under_the_peer_body_cap(self) -> None:
        """A queue bigger than max_replicate_body_bytes goes out in several bodies, each under the cap."""
        rep = self.peer_client("a", "b")
        rep.push.max_body = 2048
        envs = [self.send("a", b"x" * 300, sender=Identity()) for i in range(12)]
        self.mesh.settle()
        sizes = [n for m, url, n in self.mesh.link("a", "b").sizes if REPLICATE in url]
        self.assertGreater(len(sizes), 2)
        self.assertTrue(all(n <= 2048 for n in sizes), sizes)
        self.assertEqual(sorted(self.live("b")), sorted(e["msg_id"] for e in envs))

    def test_queue_depth_gauge_counts_what_a_due_pump_left_queued(self) -> None:
        """Items queued while a pump is due skip the gauge; the pump sets it to what stays queued."""
        client = self.peer_client("a", "b")
        client.push.max_body = 2048  # about two envelopes per batch: the pump cannot take them all
        self.mesh.set_mode("a", "b", "hold")
        envs = [self.send("a", b"x" * 300 + b"%d" % i, sender=Identity()) for i in range(12)]
        self.mesh.settle()
        depth = client.push.depth
        # push_inflight_max (4) batches went; the rest waits, and the gauge says how many.
        self.assertEqual(client.push.inflight, 4)
        self.assertGreater(depth, 0)
        self.assertEqual(self.metric("a", "meshrelay_dm_replication_queue_depth", peer=Mesh.url("b")), depth)
        # Queued with no pump due (every lane busy): counted at once.
        self.send("a", b"late", sender=Identity())
        self.assertEqual(self.metric("a", "meshrelay_dm_replication_queue_depth", peer=Mesh.url("b")), depth + 1)
        self.mesh.set_mode("a", "b", "up")
        self.mesh.link("a", "b").release()
        self.mesh.settle()
        self.mesh.advance(1.0, step=0.05)
        self.assertEqual(self.metric("a", "meshrelay_dm_replication_queue_depth", peer=Mesh.url("b")), 0)
        self.assertEqual(len(self.live("b")), len(envs) + 1)

    def test_client_answer_does_not_wait_for_push(self) -> None:
        """A deposit answers 200 while every peer hangs; nothing is pending on the client side."""
        self.mesh.set_mode("a", "b", "hang")
        self.mesh.set_mode("a", "c", "hang")
        env = self.send("a")
        self.mesh.settle()
        self.assertEqual(self.peer_client("a", "b").push.inflight, 1)
        self.assertEqual(self.live("a"), [env["msg_id"]])

    def test_push_outcomes_ok_rejected_error(self) -> None:
        """Accepted/duplicate/applied count ok, a per-envelope rejection counts rejected, a failure error."""
        b = self.mesh["b"]
        b.store.caps = dataclasses.replace(b.store.caps, per_sender_pending=1)
        sender = Identity()
        e1 = self.send("a", b"one", sender=sender)
        e2 = self.send("a", b"two", sender=sender)
        self.mesh.settle()
        self.assertEqual(self.push_count("a", "b", "ok"), 1)
        self.assertEqual(self.push_count("a", "b", "rejected"), 1)
        self.assertEqual(self.push_count("a", "c", "ok"), 2)
        self.assertEqual(self.peer_client("a", "b").push.last_push_outcome, "rejected")
        self.mesh.set_mode("a", "b", "down")
        self.send("a", b"three", sender=Identity())
        self.mesh.settle()
        self.assertEqual(self.push_count("a", "b", "error"), 1)
        self.mesh.set_mode("a", "b", "500")
        self.send("a", b"four", sender=Identity())
        self.mesh.settle()
        self.assertEqual(self.push_count("a", "b", "error"), 2)
        self.mesh.set_mode("a", "b", "up")
        # An ack pushed and applied counts ok; a re-sent duplicate counts ok too.
        self.poll("a", ack=[e1["msg_id"], e2["msg_id"]])
        self.assertEqual(self.push_count("a", "b", "ok"), 2)
        self.assertEqual(self.push_count("a", "b", "rejected"), 1)
        self.assertEqual(self.peer_client("a", "b").push.last_push_outcome, "ok")

    def test_push_outcome_of_a_hanging_peer_is_a_timeout_error(self) -> None:
        """A peer that never answers costs a timeout on the injected clock, counted as error."""
        self.mesh.set_mode("a", "b", "hang")
        self.send("a")
        self.mesh.settle()
        self.assertEqual(self.push_count("a", "b", "error"), 0)
        self.mesh.advance(10)
        self.assertEqual(self.push_count("a", "b", "error"), 1)
        self.assertEqual(self.peer_client("a", "b").push.inflight, 0)
        self.assertEqual(self.peer_client("a", "b").transport.reachable, False)

    def test_small_items_wait_for_the_request_in_flight_and_coalesce(self) -> None:
        """While one push is in flight, small items queue up and go together in the next batch."""
        self.mesh.set_mode("a", "b", "hold")
        client = self.peer_client("a", "b")
        self.send("a", b"first")
        self.mesh.settle()
        for i in range(5):
            self.send("a", b"m%d" % i, sender=Identity())
            self.mesh.settle()
        self.assertEqual((client.push.inflight, client.push.depth), (1, 5))
        self.mesh.set_mode("a", "b", "up")
        self.mesh.link("a", "b").release()
        self.mesh.settle()
        pushes = [r for r in self.mesh.link("a", "b").requests if REPLICATE in r[1]]
        self.assertEqual(len(pushes), 2)
        self.assertEqual(len(self.live("b")), 6)

    def test_a_deposit_does_not_wait_for_acks_in_flight(self) -> None:
        """Envelopes and acks are lanes of their own: a deposit goes while a batch of acks is in flight.

        Issue 10's junk acks (500 ids, 34 KB each) are pushed like any ack; a peer takes
        milliseconds to apply one, and honest deposits used to wait behind them.
        """
        env = self.send("a")
        self.mesh.settle()
        self.mesh.set_mode("a", "b", "hold")
        link = self.mesh.link("a", "b")

        def held() -> list[str]:
            return [url.rsplit("/", 1)[-1].split("?")[0] for _, url, _, _ in link.held]

        self.assertEqual(self.poll("a", ack=[env["msg_id"]])[0], 200)
        self.assertEqual(held(), ["ack"])
        later = self.send("a", b"later", sender=Identity())
        self.mesh.settle()
        self.assertEqual(held(), ["ack", "replicate-envelope"])
        # a second small batch of a kind still waits for the one of its kind in flight
        self.send("a", b"third", sender=Identity())
        self.mesh.settle()
        client = self.peer_client("a", "b")
        self.assertEqual((len(link.held), client.push.depth), (2, 1))
        self.mesh.set_mode("a", "b", "up")
        link.release()
        self.mesh.settle()
        self.assertEqual((client.push.inflight, client.push.depth), (0, 0))
        self.assertEqual(len(self.live("b")), 2)
        self.assertIn(later["msg_id"], self.live("b"))

    def test_inflight_is_bounded(self) -> None:
        """A backlog of full batches gets at most push_inflight_max requests at once; the rest waits."""
        self.mesh.set_mode("a", "b", "hold")
        client = self.peer_client("a", "b")
        client.push.max_body = 2048  # about two envelopes per batch
        envs = []
        for i in range(20):
            envs.append(self.send("a", b"x" * 300 + b"%d" % i, sender=Identity()))
            self.mesh.settle()
        self.assertEqual(client.push.inflight, 4)
        self.assertEqual(len(self.mesh.link("a", "b").held), 4)
        self.assertGreater(client.push.depth, 0)
        self.mesh.set_mode("a", "b", "up")
        self.mesh.link("a", "b").release()
        self.mesh.settle()
        self.assertEqual(sorted(self.live("b")), sorted(e["msg_id"] for e in envs))
        self.assertEqual((client.push.inflight, client.push.depth), (0, 0))
        self.assertEqual(self.push_count("a", "b", "ok"), 20)

    def test_rate_limited_push_is_retried_not_lost(self) -> None:
        """A 429 answer puts the batch back and pauses pushing; nothing is counted as error or dropped."""
        self.mesh.set_mode("a", "b", "429")
        client = self.peer_client("a", "b")
        env = self.send("a")
        self.mesh.settle()
        self.assertEqual((client.push.depth, client.push.last_push_outcome), (1, "throttled"))
        self.assertEqual(self.push_count("a", "b", "error"), 0)
        self.mesh.advance(0.2, step=0.1)  # still limited: retried once more, requeued again
        self.assertEqual(client.push.depth, 1)
        self.mesh.set_mode("a", "b", "up")
        self.mesh.advance(0.2, step=0.1)
        self.assertEqual(self.live("b"), [env["msg_id"]])
        self.assertEqual((self.push_count("a", "b", "ok"), self.push_count("a", "b", "error")), (1, 0))
        self.assertEqual(self.metric("a", "meshrelay_dm_replication_dropped_total", peer=Mesh.url("b")), 0)

    def test_push_never_raises_a_replication_error_into_the_deposit(self) -> None:
        """A deposit answers 200 and stays stored when replication raises while taking it; the failure is logged."""

        class Exploding(NoReplication):
            def envelope_committed(self, env: E.Envelope) -> None:
                raise RuntimeError("replication exploded")

        self.mesh["a"].node.relay.attach_replication(Exploding())
        env = self.send("a")
        self.mesh.settle()
        self.assertEqual(self.live("a"), [env["msg_id"]])
        self.assertEqual(self.live("b"), [])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_deposits_answer_while_replication_is_stopped(self) -> None:
        """Deposits answer 200 even when a peer client has been stopped (sync brings them later)."""
        self.replication("a").stop()
        self.send("a")
        self.mesh.settle()
        self.assertEqual(self.live("b"), [])


class PushLingerTests(MeshTestCase):
    sync = {"interval": 600, "push_linger_ms": 50}

    def pushes(self, dst: str = "b") -> list[Any]:
        return [r for r in self.mesh.link("a", dst).requests if REPLICATE in r[1]]

    def test_idle_peer_gets_a_deposit_at_once(self) -> None:
        """With nothing pushed lately, a deposit is pushed without waiting for the linger."""
        env = self.send("a")
        self.mesh.settle()
        self.assertEqual(self.live("b"), [env["msg_id"]])
        self.assertEqual(len(self.pushes()), 1)

    def test_deposits_within_the_linger_coalesce_into_one_request(self) -> None:
        """Deposits committed within push_linger_ms of the last push wait for it and go out together."""
        first = self.send("a")
        self.mesh.settle()
        later = []
        for i in range(3):
            later.append(self.send("a", b"m%d" % i, sender=Identity()))
            self.mesh.settle()
        self.assertEqual(len(self.pushes()), 1)
        self.assertEqual(self.live("b"), [first["msg_id"]])
        self.mesh.advance(0.05, step=0.05)
        self.assertEqual(len(self.pushes()), 2)
        self.assertEqual(sorted(self.live("b")), sorted(e["msg_id"] for e in [first, *later]))

    def test_full_batch_does_not_linger(self) -> None:
        """A full batch (here: the body cap) is pushed at once even within the linger."""
        client = self.peer_client("a", "b")
        client.push.max_body = 2048  # about two envelopes per batch
        self.send("a")
        self.mesh.settle()
        envs = [self.send("a", b"x" * 300 + b"%d" % i, sender=Identity()) for i in range(4)]
        self.mesh.settle()
        # The first full batch went at once; the rest, not a full batch, lingers.
        self.assertEqual(len(self.pushes()), 2)
        self.assertTrue({e["msg_id"] for e in envs[:2]} <= set(self.live("b")))
        self.assertLess(len(self.live("b")), 5)
        self.mesh.advance(0.05, step=0.05)
        self.assertEqual(len(self.live("b")), 5)


class QueueFullTests(MeshTestCase):
    names = ("a", "b")
    sync = {"interval": 60, "push_queue_max": 3, "push_inflight_max": 1, "push_timeout": 120}

    def test_full_queue_is_dropped_counted_and_repaired_by_sync(self) -> None:
        """Past push_queue_max the queue is dropped and counted; the next sync brings everything."""
        self.mesh.set_mode("a", "b", "hold")
        envs = [self.send("a", b"first")]
        self.mesh.settle()
        self.assertEqual(self.peer_client("a", "b").push.inflight, 1)
        for i in range(4):
            envs.append(self.send("a", b"m%d" % i, sender=Identity()))
        self.mesh.settle()
        self.assertEqual(self.metric("a", "meshrelay_dm_replication_dropped_total", peer=Mesh.url("b")), 4)
        self.assertEqual(self.peer_client("a", "b").push.depth, 0)
        self.mesh.set_mode("a", "b", "up")
        self.mesh.link("a", "b").release()
        self.mesh.settle()
        self.assertEqual(self.live("b"), [envs[0]["msg_id"]])
        self.mesh.advance(60, step=10)
        self.assertEqual(sorted(self.live("b")), sorted(e["msg_id"] for e in envs))


class RepairBySyncTests(MeshTestCase):
    names = ("a", "b")
    sync = {"interval": 30, "push_timeout": 5}

    def test_peer_answering_500_is_repaired_by_sync(self) -> None:
        """When B answers A's push with 500, B's next pull from A brings the envelope."""
        self.mesh.set_mode("a", "b", "500")
        env = self.send("a")
        self.mesh.settle()
        self.assertEqual(self.live("b"), [])
        self.assertEqual(self.push_count("a", "b", "error"), 1)
        self.mesh.advance(30, step=5)
        self.assertEqual(self.live("b"), [env["msg_id"]])
        self.assertEqual(self.metric("b", "meshrelay_sync_items_total", peer=Mesh.url("a"), kind="envelope"), 1)

    def test_hanging_peer_is_repaired_by_sync(self) -> None:
        """A push to a peer that hangs times out; the peer's next pull brings the envelope."""
        self.mesh.set_mode("a", "b", "hang")
        env = self.send("a")
        self.mesh.advance(5)
        self.assertEqual(self.push_count("a", "b", "error"), 1)
        self.assertEqual(self.live("b"), [])
        self.mesh.advance(30, step=5)
        self.assertEqual(self.live("b"), [env["msg_id"]])

    def test_every_failed_sync_run_is_counted(self) -> None:
        """Each sync run against an unreachable peer counts an error, also the runs that fail asking ``features``."""
        self.mesh.set_mode("a", "b", "down", both=True)
        self.mesh.advance(35, step=5)
        first = self.metric("b", "meshrelay_sync_pull_total", peer=Mesh.url("a"), outcome="error")
        self.assertGreater(first, 0)
        # After a failure the puller forgets the peer's features and asks again on the next run.
        self.mesh.advance(120, step=5)
        self.assertGreaterEqual(
            self.metric("b", "meshrelay_sync_pull_total", peer=Mesh.url("a"), outcome="error"), first + 3
        )

    def test_node_that_was_down_catches_up_on_its_own_pull(self) -> None:
        """A node whose links were both down catches up once its pulls succeed again."""
        self.mesh.set_mode("a", "b", "down", both=True)
        envs = [self.send("a", b"m%d" % i, sender=Identity()) for i in range(5)]
        self.mesh.advance(30, step=5)
        self.assertEqual(self.live("b"), [])
        self.assertGreater(self.metric("b", "meshrelay_sync_pull_total", peer=Mesh.url("a"), outcome="error"), 0)
        self.mesh.set_mode("a", "b", "up", both=True)
        self.mesh.advance(30, step=5)
        self.assertEqual(sorted(self.live("b")), sorted(e["msg_id"] for e in envs))

    def test_sync_backs_off_after_failures_and_recovers(self) -> None:
        """Failed pulls retry after 1, 2, 4... seconds, capped at the interval; success resets it."""
        client = self.peer_client("b", "a")
        self.mesh.set_mode("b", "a", "down")
        client.sync_now()
        self.mesh.settle()
        backoffs = [client.puller.backoff]
        for _ in range(6):
            self.mesh.clock.advance(client.puller.backoff)
            self.mesh.settle()
            backoffs.append(client.puller.backoff)
        self.assertEqual(backoffs, [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0])
        self.assertEqual(client.puller.last_sync_outcome, "error")
        self.mesh.set_mode("b", "a", "up")
        self.mesh.clock.advance(client.puller.backoff)
        self.mesh.settle()
        self.assertEqual((client.puller.backoff, client.puller.last_sync_outcome), (0.0, "ok"))

    def test_cursor_is_durable_and_pulls_resume_from_it(self) -> None:
        """The cursor is stored per peer; the next pull asks only for what is new."""
        self.mesh.set_mode("a", "b", "down")
        self.send("a", b"one")
        self.mesh.advance(30, step=5)
        cursor = self.mesh["b"].store.get_cursor(Mesh.url("a"))
        got: list[Any] = []
        cursor.addCallback(got.append)
        self.assertEqual((got[0].feed_id, got[0].since), (self.mesh["a"].store.feed_id, 1))
        self.send("a", b"two", sender=Identity())
        self.mesh.link("b", "a").requests.clear()
        self.mesh.advance(30, step=5)
        pulls = [
            url for m, url in self.mesh.link("b", "a").requests if m == "GET" and CHANGES in url
        ]  # not the v3 policy feed
        self.assertEqual(len(pulls), 1)
        self.assertIn("since=1&", pulls[0])

    def test_lag_gauge_and_status(self) -> None:
        """peer_sync_lag_seconds counts from the last complete pull; peer_status reports it."""
        self.assertEqual(self.metric("b", "meshrelay_peer_sync_lag_seconds", peer=Mesh.url("a")), 0.0)
        self.mesh.set_mode("b", "a", "down")
        self.mesh.advance(12, step=4)
        self.assertEqual(self.metric("b", "meshrelay_peer_sync_lag_seconds", peer=Mesh.url("a")), 12.0)
        (status,) = self.replication("b").peer_status()
        # Exactly the keys the /status page reads.
        self.assertEqual(set(status), set(PEER_KEYS))
        self.assertEqual(status["url"], Mesh.url("a"))
        self.assertEqual(status["sync_lag_seconds"], 12.0)
        self.assertEqual(status["last_push_outcome"], None)
        self.mesh.set_mode("b", "a", "up")
        self.replication("b").sync_now()
        self.mesh.settle()
        self.assertEqual(self.metric("b", "meshrelay_peer_sync_lag_seconds", peer=Mesh.url("a")), 0.0)

    def test_refused_lease_skips_the_run(self) -> None:
        """When another process holds the sync lease, this one does not pull."""
        store = self.mesh["b"].store
        store.acquire_lease = lambda name, holder, ttl: succeed(False)  # type: ignore[method-assign]
        self.mesh.link("b", "a").requests.clear()
        self.replication("b").sync_now()
        self.mesh.settle()
        self.assertEqual(self.mesh.link("b", "a").requests, [])
        self.assertEqual(self.metric("b", "meshrelay_sync_pull_total", peer=Mesh.url("a"), outcome="skipped"), 1)
        self.assertEqual(self.peer_client("b", "a").puller.last_sync_outcome, "skipped")

    def test_sync_pages_until_more_is_false(self) -> None:
        """A backlog bigger than a page is pulled page after page in one run."""
        self.mesh.set_mode("a", "b", "down", both=True)
        self.peer_client("b", "a").puller.ids_limit = 3
        envs = [self.send("a", b"m%d" % i, sender=Identity()) for i in range(10)]
        self.mesh.set_mode("a", "b", "up", both=True)
        self.mesh.link("b", "a").requests.clear()
        self.replication("b").sync_now()
        self.mesh.settle()
        self.assertEqual(sorted(self.live("b")), sorted(e["msg_id"] for e in envs))
        pages = [url for m, url in self.mesh.link("b", "a").requests if CHANGES in url]
        self.assertEqual(len(pages), 4)
        self.assertTrue(all("ids=1" in url for url in pages), pages)


class PartialMeshTests(MeshTestCase):
    links = [("a", "b"), ("b", "c")]
    sync = {"interval": 30}

    def test_message_sent_at_a_is_polled_at_c(self) -> None:
        """A-B, B-C: C gets A's envelope from B's feed, then the recipient polls it at C."""
        env = self.send("a")
        self.mesh.settle()
        self.assertEqual(self.live("b"), [env["msg_id"]])
        self.assertEqual(self.live("c"), [])
        self.mesh.advance(30, step=5)
        _, polled = self.poll("c")
        self.assertEqual(polled["messages"], [env])

    def test_ack_at_c_reaches_a_through_b(self) -> None:
        """An ack at C reaches B by push and A by B's feed; every copy is gone."""
        env = self.send("a")
        self.mesh.advance(30, step=5)
        self.assertEqual(self.live("c"), [env["msg_id"]])
        self.poll("c", ack=[env["msg_id"]])
        self.assertEqual(self.live("c"), [])
        self.assertEqual(self.live("b"), [])
        self.assertEqual(self.live("a"), [env["msg_id"]])
        self.mesh.advance(30, step=5)
        self.assertEqual(self.live("a"), [])
        self.assertEqual(self.tombstones("a"), tkeys((self.bob.pub, env["msg_id"])))
        # And it never comes back, however often the nodes sync.
        self.mesh.advance(90, step=10)
        for n in "abc":
            self.assertEqual(self.live(n), [])
            _, polled = self.poll(n)
            self.assertEqual(polled["messages"], [])


class AckTests(MeshTestCase):
    sync = {"interval": 600}

    def test_ack_at_c_deletes_the_copies_at_a_and_b(self) -> None:
        """A full mesh: the signed ack is pushed to every peer and deletes every copy."""
        env = self.send("a")
        self.mesh.settle()
        self.assertEqual([self.live(n) for n in "abc"], [[env["msg_id"]]] * 3)
        status, _ = self.poll("c", ack=[env["msg_id"]])
        self.assertEqual(status, 200)
        self.assertEqual([self.live(n) for n in "abc"], [[], [], []])
        for n in "ab":
            self.assertEqual(self.tombstones(n), tkeys((self.bob.pub, env["msg_id"])))
            self.assertEqual(self.metric(n, "meshrelay_dm_ack_intake_total", outcome="applied"), 1)
        self.assertEqual(self.push_count("c", "a", "ok"), 1)

    def test_repeated_ack_is_not_pushed_again(self) -> None:
        """The same signed ack applied twice is pushed once."""
        env = self.send("a")
        self.mesh.settle()
        body = self.bob.poll_body(ts=self.now(), ack=[env["msg_id"]])
        self.call("c", "POST", "/api/mesh/dm/poll", body)
        before = self.push_count("c", "a", "ok")
        body2 = self.bob.poll_body(ts=self.now(), ack=[env["msg_id"]])
        self.call("c", "POST", "/api/mesh/dm/poll", body2)
        # A new signed ack (new nonce) is new, so it is pushed; a replayed one is refused by the poll nonce.
        self.assertEqual(self.push_count("c", "a", "ok"), before + 1)
        status, _ = self.call("c", "POST", "/api/mesh/dm/poll", body2)
        self.assertEqual(status, 403)
        self.assertEqual(self.push_count("c", "a", "ok"), before + 1)


class TombstoneTests(MeshTestCase):
    names = ("a", "b")
    sync = {"interval": 30, "push_timeout": 120}

    def test_tombstone_beats_a_late_push(self) -> None:
        """An ack at B before A's push arrives: the late replica is a duplicate and stays deleted."""
        self.mesh.set_mode("a", "b", "hold")
        env = self.send("a")
        self.mesh.settle()
        self.assertEqual(len(self.mesh.link("a", "b").held), 1)
        self.poll("b", ack=[env["msg_id"]])  # the recipient acks (it saw the message elsewhere)
        self.assertEqual(self.live("a"), [])  # B pushed the ack to A
        self.mesh.set_mode("a", "b", "up")
        self.mesh.link("a", "b").release()
        self.mesh.settle()
        self.assertEqual(self.live("b"), [])
        self.assertEqual(self.metric("b", "meshrelay_dm_replica_total", outcome="duplicate"), 1)
        self.assertEqual(self.push_count("a", "b", "ok"), 1)
        _, polled = self.poll("b")
        self.assertEqual(polled["messages"], [])

    def test_tombstone_beats_a_late_sync(self) -> None:
        """A and B partitioned: B's pull of A's envelope meets B's tombstone; A learns the ack by sync."""
        self.mesh.set_mode("a", "b", "down", both=True)
        env = self.send("a")
        self.poll("b", ack=[env["msg_id"]])
        self.mesh.settle()
        self.assertEqual((self.live("a"), self.live("b")), ([env["msg_id"]], []))
        self.mesh.set_mode("b", "a", "up")  # B can pull from A first; A still cannot reach B
        self.mesh.advance(30, step=5)
        # B learns the envelope's id from A's feed and, holding its tombstone, does not even fetch it.
        self.assertGreater(self.metric("b", "meshrelay_sync_pull_total", peer=Mesh.url("a"), outcome="ok"), 0)
        self.assertEqual(self.metric("b", "meshrelay_sync_items_total", peer=Mesh.url("a"), kind="envelope"), 0)
        self.assertEqual((self.live("a"), self.live("b")), ([env["msg_id"]], []))
        self.mesh.set_mode("a", "b", "up")
        self.mesh.advance(30, step=5)
        self.assertEqual((self.live("a"), self.live("b")), ([], []))
        for n in "ab":
            _, polled = self.poll(n)
            self.assertEqual(polled["messages"], [])


class CapTests(MeshTestCase):
    names = ("a", "b")
    sync = {"interval": 30}
    overrides = {"b": {"limits": {"per_sender_pending": 2}}}

    def test_per_sender_cap_holds_on_the_replica_path(self) -> None:
        """B's per-sender cap refuses the third replica from one sender, by push and by sync."""
        sender = Identity()
        envs = [self.send("a", b"m%d" % i, sender=sender) for i in range(3)]
        self.mesh.settle()
        self.assertEqual(len(self.live("a")), 3)
        self.assertEqual(sorted(self.live("b")), sorted(e["msg_id"] for e in envs[:2]))
        self.assertEqual(self.push_count("a", "b", "rejected"), 1)
        self.assertEqual(self.metric("b", "meshrelay_dm_replica_total", outcome="drop_per_sender_cap"), 1)
        self.mesh.advance(60, step=10)
        self.assertEqual(len(self.live("b")), 2)
        self.assertGreaterEqual(self.metric("b", "meshrelay_dm_replica_total", outcome="drop_per_sender_cap"), 2)


class LongPollTests(MeshTestCase):
    names = ("a", "b")
    sync = {"interval": 10}

    def start_long_poll(self, name: str) -> Deferred[Any]:
        node = self.mesh[name]
        d = node.start_request("POST", "/api/mesh/dm/poll", self.bob.poll_body(ts=self.now(), wait=30))
        self.mesh.settle()
        self.assertEqual(node.relay.waiting, 1)
        return d

    def test_long_poll_wakes_on_push(self) -> None:
        """A long-poll at B is answered as soon as A's push arrives."""
        d = self.start_long_poll("b")
        env = self.send("a")
        self.mesh.settle()
        status, body = self.mesh["b"].result(d)
        self.assertEqual((status, body["messages"]), (200, [env]))

    def test_long_poll_wakes_on_sync(self) -> None:
        """A long-poll at B is answered when B's pull brings the envelope (push is down)."""
        self.mesh.set_mode("a", "b", "down")
        d = self.start_long_poll("b")
        env = self.send("a")
        self.mesh.settle()
        self.assertFalse(answered(d))
        self.assertEqual(self.mesh["b"].relay.waiting, 1)
        self.mesh.advance(10, step=2)
        status, body = self.mesh["b"].result(d)
        self.assertEqual((status, body["messages"]), (200, [env]))


class FetchRemoteTests(MeshTestCase):
    names = ("a", "b", "c")
    sync = {"interval": 3600}

    def test_fetch_remote_pulls_the_mailbox_from_peers(self) -> None:
        """With push down, poll(fetch_remote) at B pulls the recipient's mail from A before answering."""
        self.mesh.set_mode("a", "b", "down")
        env = self.send("a")
        other = self.send("a", mailbox=Identity(), sender=Identity())
        self.mesh.settle()
        self.assertEqual(self.live("b"), [])
        _, polled = self.poll("b")
        self.assertEqual(polled["messages"], [])
        _, polled = self.poll("b", fetch_remote=True)
        self.assertEqual(polled["messages"], [env])
        self.assertNotIn(other["msg_id"], self.live("b"))

    def test_fetch_remote_with_a_hanging_peer_answers_what_arrived(self) -> None:
        """One peer hanging: the poll answers after fetch_remote_timeout with what the others gave."""
        self.mesh.set_mode("a", "b", "down")
        self.mesh.set_mode("b", "c", "hang")
        env = self.send("a")
        node = self.mesh["b"]
        d = node.start_request("POST", "/api/mesh/dm/poll", self.bob.poll_body(ts=self.now(), fetch_remote=True))
        self.mesh.settle()
        self.assertFalse(answered(d))
        self.mesh.advance(2)
        status, body = node.result(d)
        self.assertEqual((status, body["messages"]), (200, [env]))

    def test_fetch_remote_pages_are_bounded(self) -> None:
        """fetch_remote pulls at most MAX_FETCH_PAGES pages from a peer."""
        self.mesh.set_mode("a", "b", "down")
        self.peer_client("b", "a").puller.page_limit = 1
        for i in range(MAX_FETCH_PAGES + 2):
            self.send("a", b"m%d" % i, sender=Identity())
        self.mesh.link("b", "a").requests.clear()
        self.poll("b", fetch_remote=True)
        self.assertEqual(len(self.mesh.link("b", "a").requests), MAX_FETCH_PAGES)
        self.assertEqual(len(self.live("b")), MAX_FETCH_PAGES)


class FeedChangeTests(MeshTestCase):
    names = ("a", "b")
    sync = {"interval": 30}

    def test_new_feed_id_restarts_from_zero(self) -> None:
        """When B's store is replaced (new feed id), A pulls it again from since=0."""
        for i in range(3):
            self.send("b", b"old%d" % i, sender=Identity())
        self.mesh.advance(30, step=5)
        self.assertEqual(len(self.live("a")), 3)
        self.mesh.set_mode("a", "b", "down", both=True)
        fresh = self.mesh.replace("b")
        self.mesh.settle()
        new = [self.send("b", b"new%d" % i, sender=Identity()) for i in range(2)]
        self.mesh.set_mode("a", "b", "up")  # A can pull from B; B still cannot reach A
        self.mesh.advance(30, step=5)
        for env in new:
            self.assertIn(env["msg_id"], self.live("a"))
        got: list[Any] = []
        self.mesh["a"].store.get_cursor(Mesh.url("b")).addCallback(got.append)
        self.assertEqual((got[0].feed_id, got[0].since), (fresh.store.feed_id, 2))


#: what a stand-in wire-v2 peer answers to ``features``
V2_FEATURES = {"ok": True, "versions": [1, 2], "page_bytes": 65536, "max_ids": 5000, "max_bodies": 500}


class HostileFeedTests(MeshTestCase):
    """A peer whose changes feed is malformed or forged cannot crash the puller or plant data."""

    names = ("a", "b")
    sync = {"interval": 30}

    def serve_feed(self, answer: bytes) -> None:
        """Stand in for a v1 peer (``features`` is 404, so sync pulls v1 pages) answering ``answer``."""
        self.stand_in(None, lambda request: answer)

    def serve_v2(self, answer: Any) -> None:
        """Stand in for a wire-v2 peer: ``features`` says v2, any other request gets ``answer(request)``."""
        self.stand_in(V2_FEATURES, lambda request: json.dumps(answer(request)).encode())

    def stand_in(self, features: dict[str, Any] | None, body: Any) -> None:
        """B's peer A replaced by a resource: ``features`` (None: 404), then ``body(request)`` bytes."""

        class Peer(Resource):
            isLeaf = True

            def render(self, request: Any) -> bytes:
                request.setHeader(b"Content-Type", b"application/json")
                if request.path.endswith(b"/features"):
                    if features is None:
                        request.setResponseCode(404)
                        return b'{"ok": false, "error": "not_found"}'
                    return json.dumps(features).encode()
                return body(request)  # type: ignore[no-any-return]

        self.install(StubTreq(Peer()))

    def install(self, stub: StubTreq) -> None:
        client = self.peer_client("b", "a")
        client.transport.http = stub
        client.puller.features = None  # a new peer behind the same URL: negotiated again
        self.mesh.links[("b", "a")]._broken = stub  # flushed by settle()

    def run_sync(self) -> Any:
        client = self.peer_client("b", "a")
        client.sync_now()
        self.mesh.settle()
        return client

    def test_malformed_pages_are_errors(self) -> None:
        """Garbage, wrong types, no progress with more: true: each is a counted error, nothing stored."""
        feed = self.mesh["a"].store.feed_id
        for answer in (
            b"not json",
            b"[]",
            json.dumps({"ok": True, "feed": feed, "items": {}, "next": 0, "more": False}).encode(),
            json.dumps({"ok": True, "feed": feed, "items": [], "next": 0, "more": True}).encode(),
            json.dumps({"ok": True, "feed": feed, "items": [{"seq": 1}], "next": 1, "more": False}).encode(),
            json.dumps({"ok": True, "feed": "", "items": [], "next": 0, "more": False}).encode(),
            json.dumps({"ok": True, "feed": feed, "items": [], "next": -1, "more": False}).encode(),
        ):
            self.serve_feed(answer)
            client = self.run_sync()
            self.assertEqual(client.puller.last_sync_outcome, "error", answer)
        self.assertEqual(self.live("b"), [])

    def test_forged_items_in_a_feed_are_rejected(self) -> None:
        """Forged envelopes and acks in a peer's feed are verified like any replica and refused."""
        env = self.send("b", b"mine")
        forged_env = dict(self.alice.envelope(self.bob, b"forged", ts=self.now()), sig=env["sig"])
        forged_ack = dict(Identity().signed(ts=self.now(), ack=[env["msg_id"]]), mailbox=self.bob.pub)
        self.serve_feed(
            json.dumps(
                {
                    "ok": True,
                    "feed": "hostile",
                    "items": [{"seq": 1, "envelope": forged_env}, {"seq": 2, "ack": forged_ack}],
                    "next": 2,
                    "more": False,
                }
            ).encode()
        )
        client = self.run_sync()
        self.assertEqual(client.puller.last_sync_outcome, "ok")
        self.assertEqual(self.live("b"), [env["msg_id"]])
        self.assertEqual(self.metric("b", "meshrelay_dm_replica_total", outcome="bad_signature"), 1)
        self.assertEqual(self.metric("b", "meshrelay_dm_ack_intake_total", outcome="bad_signature"), 1)

    def test_forged_bodies_from_a_v2_peer_are_rejected(self) -> None:
        """A forged envelope a v2 peer lists by id and serves through bodies is verified here and refused."""
        forged = dict(self.alice.envelope(self.bob, b"forged", ts=self.now()), sig=E.b64u_encode(b"\0" * 64))
        forged_ack = dict(Identity().signed(ts=self.now(), ack=[forged["msg_id"]]), mailbox=self.bob.pub)
        size = len(json.dumps(forged).encode())
        answers = {
            b"/api/mesh/dm/changes": {
                "ok": True,
                "feed": "hostile",
                "items": [
                    {"seq": 1, "kind": "envelope", "mailbox": self.bob.pub, "msg_id": forged["msg_id"], "size": size},
                    {"seq": 2, "kind": "ack", "mailbox": self.bob.pub, "nonce": forged_ack["nonce"], "size": 300},
                ],
                "next": 2,
                "more": False,
            },
            b"/api/mesh/dm/bodies": {
                "ok": True,
                "envelopes": [forged],
                "acks": [forged_ack],
                "gone": {"envelopes": [], "acks": []},
            },
        }

        self.serve_v2(lambda request: answers[request.path])
        client = self.run_sync()
        self.assertEqual(client.puller.last_sync_outcome, "ok")
        self.assertEqual(client.puller.features.versions, (1, 2))
        self.assertEqual(self.live("b"), [])
        self.assertEqual(self.metric("b", "meshrelay_dm_replica_total", outcome="bad_signature"), 1)
        self.assertEqual(self.metric("b", "meshrelay_dm_ack_intake_total", outcome="bad_signature"), 1)

    def test_forged_envelopes_in_a_full_page_are_rejected(self) -> None:
        """A v2 peer that makes the puller switch to full pages cannot plant a forgery through them."""
        genuine = [Identity().envelope(self.bob, b"g%d" % i, ts=self.now()) for i in range(101)]
        forged = dict(Identity().envelope(self.bob, b"forged", ts=self.now()), sig=E.b64u_encode(b"\0" * 64))
        by_id = {e["msg_id"]: e for e in genuine}
        ids_page = {
            "ok": True,
            "feed": "hostile",
            "items": [
                {"seq": i + 1, "kind": "envelope", "mailbox": self.bob.pub, "msg_id": e["msg_id"], "size": 400}
                for i, e in enumerate(genuine[:100])
            ],
            "next": 100,
            "more": True,
        }
        full_page = {
            "ok": True,
            "feed": "hostile",
            "items": [{"seq": 101, "envelope": forged}, {"seq": 102, "envelope": genuine[100]}],
            "next": 102,
            "more": False,
        }

        def answer(request: Any) -> Any:
            if request.path.endswith(b"/bodies"):
                asked = json.loads(request.content.read())["envelopes"]
                envelopes = [by_id[m] for m in asked]
                return {"ok": True, "envelopes": envelopes, "acks": [], "gone": {"envelopes": [], "acks": []}}
            return ids_page if b"ids=1" in request.uri else full_page

        self.serve_v2(answer)
        client = self.peer_client("b", "a")
        client.puller.ids_limit = 100
        client = self.run_sync()
        self.assertEqual(client.puller.last_sync_outcome, "ok")
        self.assertEqual(self.metric("b", "meshrelay_sync_full_pages_total", peer=Mesh.url("a")), 1)
        self.assertEqual(sorted(self.live("b")), sorted(by_id))
        self.assertEqual(self.metric("b", "meshrelay_dm_replica_total", outcome="bad_signature"), 1)

    def test_unhashable_keys_in_a_bodies_answer_fail_the_run_quietly(self) -> None:
        """A bodies answer whose msg_id or mailbox is a list is a counted sync error, not a traceback."""
        env = self.alice.envelope(self.bob, b"listed", ts=self.now())
        ack = dict(Identity().signed(ts=self.now(), ack=[env["msg_id"]]), mailbox=self.bob.pub)
        answers = {
            b"/api/mesh/dm/changes": {
                "ok": True,
                "feed": "hostile",
                "items": [
                    {"seq": 1, "kind": "envelope", "mailbox": self.bob.pub, "msg_id": env["msg_id"], "size": 400},
                    {"seq": 2, "kind": "ack", "mailbox": self.bob.pub, "nonce": ack["nonce"], "size": 300},
                ],
                "next": 2,
                "more": False,
            },
            b"/api/mesh/dm/bodies": {
                "ok": True,
                "envelopes": [dict(env, msg_id=[env["msg_id"]])],
                "acks": [dict(ack, mailbox={"m": 1})],
                "gone": {"envelopes": [], "acks": []},
            },
        }

        self.serve_v2(lambda request: answers[request.path])
        errors = self.metric("b", "meshrelay_sync_pull_total", peer=Mesh.url("a"), outcome="error")
        client = self.run_sync()
        self.assertEqual(client.puller.last_sync_outcome, "error")
        self.assertEqual(self.metric("b", "meshrelay_sync_pull_total", peer=Mesh.url("a"), outcome="error"), errors + 1)
        self.assertEqual(self.live("b"), [])

    def test_page_parser(self) -> None:
        """parse_page accepts a well-formed page and refuses more items than asked for."""
        page = parse_page({"ok": True, "feed": "f", "items": [{"seq": 3, "ack": {}}], "next": 3, "more": True}, 0, 1)
        self.assertEqual((page.acks, page.next, page.more), ([{}], 3, True))
        with self.assertRaises(PeerError):
            parse_page({"ok": True, "feed": "f", "items": [{"seq": 3, "ack": {}}] * 2, "next": 3, "more": False}, 0, 1)
        with self.assertRaises(PeerError):
            parse_page({"ok": True, "feed": "f", "items": [], "next": True, "more": False}, 0, 1)


class ConnectOptionTests(SynchronousTestCase):
    """``connect`` dials another host:port; the path prefix, identity and keys come from ``url``."""

    def test_connect_and_path_prefix(self) -> None:
        """A push to a peer behind a prefix-stripping proxy, dialled through connect, is accepted."""
        secret = "secret-of-the-a-b-link-0123"
        base = self.mktemp()
        b = MemNode(
            base + "/b",
            config=build_config(
                {
                    "node": {"data_dir": base + "/b", "public_url": "http://b.test/mesh"},
                    "sync": {"interval": 3600},
                    "peers": [{"url": "http://a.test", "secret": secret}],
                }
            ),
            peer_client_factory=lambda peer: _Recorder(None),
        )
        self.addCleanup(b.stop)

        class StripPrefix(Resource):
            isLeaf = True

            def render(self, request: Any) -> Any:
                assert request.uri.startswith(b"/mesh/")
                request.uri = request.uri[len(b"/mesh") :]
                request.path = request.path[len(b"/mesh") :]
                request.postpath = request.postpath[1:]
                return b.node.resource().render(request)

        recorder = _Recorder(StubTreq(StripPrefix()))
        a = MemNode(
            base + "/a",
            clock=b.clock,
            config=build_config(
                {
                    "node": {"data_dir": base + "/a", "public_url": "http://a.test"},
                    "sync": {"interval": 3600},
                    "peers": [{"url": "http://b.test/mesh", "secret": secret, "connect": "http://127.0.0.1:18081"}],
                }
            ),
            peer_client_factory=lambda peer: recorder,
        )
        self.addCleanup(a.stop)
        env = Identity().envelope(Identity(), ts=int(a.clock.seconds()))
        self.assertEqual(a.send(env)[0], 200)
        for _ in range(5):
            a.clock.advance(0)
            recorder.stub.flush()  # type: ignore[union-attr]
        method, url, headers = recorder.calls[-1]
        # b speaks v5: the push names a's incarnation (docs/protocol.md 14)
        target = "/mesh" + REPLICATE + "?inc=" + a.node.relay.holdings.token
        self.assertEqual(url, "http://127.0.0.1:18081" + target)
        self.assertEqual(headers["Host"], "b.test")
        self.assertEqual(headers[H_URL], "http://a.test")
        key = derive_key(secret, "http://a.test")
        body = recorder.bodies[-1]
        self.assertEqual(
            headers[H_HMAC],
            compute_mac(key, "POST", target, int(headers[H_TS]), headers[H_NONCE], body),
        )
        self.assertEqual(dump_live(b.store, int(b.clock.seconds()))["envelopes"], [env["msg_id"]])
        self.assertEqual(
            a.metrics.sample("meshrelay_dm_replication_push_total", {"peer": "http://b.test/mesh", "outcome": "ok"}), 1
        )
        # The initial pull also went through connect with the prefix and the query in the MAC.
        gets = [c for c in recorder.calls if c[0] == "GET" and POLICIES not in c[1]]
        self.assertTrue(gets and gets[0][1] == "http://127.0.0.1:18081/mesh" + FEATURES)
        self.assertTrue(gets[1][1].startswith("http://127.0.0.1:18081/mesh" + CHANGES + "?since=0&limit="))


class _Recorder:
    """An HTTP client that records each call and forwards it (or refuses it when there is no stub)."""

    def __init__(self, stub: StubTreq | None) -> None:
        self.stub = stub
        self.calls: list[tuple[str, str, dict[str, str]]] = []
        self.bodies: list[bytes] = []

    def request(self, method: str, url: str, **kw: Any) -> Deferred[Any]:
        self.calls.append((method, url, dict(kw.get("headers") or {})))
        self.bodies.append(kw.get("data") or b"")
        if self.stub is None:
            from twisted.internet.defer import fail
            from twisted.internet.error import ConnectionRefusedError

            return fail(ConnectionRefusedError())
        return self.stub.request(method, url, **kw)  # type: ignore[no-any-return]


class StopTests(MeshTestCase):
    names = ("a", "b")

    def test_stopping_a_node_cancels_pushes_and_pulls_quietly(self) -> None:
        """stopService with a hanging push and pull in flight leaves no unhandled error and counts nothing."""
        self.mesh.set_mode("a", "b", "hang")
        self.send("a")
        self.mesh.settle()
        self.peer_client("a", "b").sync_now()
        self.mesh.settle()
        self.assertEqual(len(self.peer_client("a", "b").transport.outstanding), 2)
        self.mesh["a"].stop()
        self.mesh.settle()
        self.assertEqual(self.push_count("a", "b", "error"), 0)
        self.assertEqual(self.peer_client("a", "b").transport.outstanding, set())


def random_ids(n: int) -> list[str]:
    return [os.urandom(32).hex() for _ in range(n)]


class IdsFirstTests(MeshTestCase):
    names = ("a", "b")
    sync = {"interval": 600}

    def test_a_pushed_envelope_is_not_transferred_again_by_sync(self) -> None:
        """After a push, the peer's pull of the feed reads ids only and fetches no body."""
        env = self.send("a")
        self.mesh.settle()
        self.assertEqual(self.live("b"), [env["msg_id"]])
        link = self.mesh.link("b", "a")
        link.requests.clear()
        self.replication("b").sync_now()
        self.mesh.settle()
        self.assertEqual([m for m, url in link.requests], ["GET"])
        self.assertIn("ids=1", link.requests[0][1])
        self.assertEqual(self.metric("b", "meshrelay_sync_items_total", peer=Mesh.url("a"), kind="envelope"), 0)

    def test_lacking_items_are_fetched_through_bodies(self) -> None:
        """Items missed by push are fetched with bodies requests, acks before envelopes, and all arrive."""
        self.mesh.set_mode("a", "b", "down")
        envs = [self.send("a", b"m%d" % i, sender=Identity()) for i in range(6)]
        self.poll("a", ack=[envs[0]["msg_id"]])
        client = self.peer_client("b", "a")
        client.puller.features = dataclasses.replace(client.puller.features, page_bytes=1)  # one body per request
        self.replication("b").sync_now()
        self.mesh.settle()
        self.assertEqual(sorted(self.live("b")), sorted(e["msg_id"] for e in envs[1:]))
        self.assertEqual(self.tombstones("b"), tkeys((self.bob.pub, envs[0]["msg_id"])))
        bodies = [url for m, url in self.mesh.link("b", "a").requests if url.endswith(BODIES)]
        self.assertEqual(len(bodies), 6)  # 5 envelopes and 1 ack, one per request (page_bytes)


class FullPagesTests(MeshTestCase):
    """A catch-up from a v2 peer switches to full-body pages, and back to ids pages (7.3)."""

    names = ("a", "b")
    sync = {"interval": 600, "page_limit": 40}
    limits = {"per_mailbox_pending": 1000, "client_rate": 10000, "client_burst": 10000}

    def changes(self) -> list[str]:
        return [url for m, url in self.mesh.link("b", "a").requests if CHANGES in url]

    def full_pages(self) -> float:
        return self.metric("b", "meshrelay_sync_full_pages_total", peer=Mesh.url("a"))

    def test_a_backlog_is_pulled_in_full_pages(self) -> None:
        """After an ids page of which B lacked nearly all, B reads full pages: no ids or bodies round trips."""
        self.mesh.set_mode("a", "b", "down")
        envs = [self.send("a", b"m%d" % i, sender=Identity()) for i in range(300)]
        puller = self.peer_client("b", "a").puller
        puller.ids_limit = 100
        self.mesh.link("b", "a").requests.clear()
        self.replication("b").sync_now()
        self.mesh.settle()
        self.assertEqual(sorted(self.live("b")), sorted(e["msg_id"] for e in envs))
        pages = self.changes()
        self.assertIn("ids=1", pages[0])
        # 100 listed by id, then 200 in full pages of 40: five requests without ids=1.
        self.assertEqual(["ids=1" in url for url in pages[1:]], [False] * 5, pages)
        self.assertEqual(self.full_pages(), 5)
        bodies = [url for m, url in self.mesh.link("b", "a").requests if url.endswith(BODIES)]
        self.assertEqual(len(bodies), 1)  # the 100 of the first (ids) page only
        self.assertFalse(puller.full_pages)  # the feed's end: ids pages from the next run on
        self.mesh.link("b", "a").requests.clear()
        self.replication("b").sync_now()
        self.mesh.settle()
        self.assertTrue(all("ids=1" in url for url in self.changes()), self.changes())

    def test_a_mostly_held_full_page_switches_back_to_ids(self) -> None:
        """Once a full page brings envelopes B already holds (pushed), B goes back to ids pages.

        B pulls as a v4 node: a v5 pull would have A leave the pushed ones out (section 14).
        """
        puller = self.peer_client("b", "a").puller
        puller.versions = (1, 2, 3, 4)
        puller.stop()  # B pulls only when told below
        self.mesh.set_mode("a", "b", "down")
        missed = [self.send("a", b"m%d" % i, sender=Identity()) for i in range(100)]
        self.mesh.settle()
        self.mesh.set_mode("a", "b", "up")
        pushed = [self.send("a", b"p%d" % i, sender=Identity()) for i in range(300)]
        self.mesh.settle()
        self.assertEqual(len(self.live("b")), 300)
        puller.ids_limit = 100
        self.mesh.link("b", "a").requests.clear()
        puller.start()
        self.mesh.settle()
        self.assertEqual(sorted(self.live("b")), sorted(e["msg_id"] for e in missed + pushed))
        form = ["ids=1" in url for url in self.changes()]
        self.assertEqual(form[0], True)
        self.assertIn(False, form)
        # At most the pages already asked for (one prefetch, APPLY_DEPTH applying) come in full.
        self.assertLessEqual(form.count(False), 1 + APPLY_DEPTH, form)
        self.assertEqual(form[-1], True, form)

    def test_a_small_or_half_held_ids_page_stays_in_ids_mode(self) -> None:
        """Pages under FULL_PAGES_MIN_ITEMS, or with under 90 % lacking, never switch to full pages."""
        puller = self.peer_client("b", "a").puller
        puller.stop()  # B pulls only when told below
        self.mesh.set_mode("a", "b", "down")
        for i in range(150):
            self.send("a", b"m%d" % i, sender=Identity())
        self.mesh.settle()
        self.mesh.set_mode("a", "b", "up")
        puller.ids_limit = 99  # every page all lacking, but one item short
        puller.start()
        self.mesh.settle()
        self.assertEqual(len(self.live("b")), 150)
        puller.stop()
        self.mesh.set_mode("a", "b", "down")
        for i in range(50):
            self.send("a", b"n%d" % i, sender=Identity())
        self.mesh.settle()
        self.mesh.set_mode("a", "b", "up")
        for i in range(150):
            self.send("a", b"p%d" % i, sender=Identity())
        self.mesh.settle()
        self.assertEqual(len(self.live("b")), 300)
        puller.ids_limit = 100  # the first page: 50 lacking of 100
        puller.start()
        self.mesh.settle()
        self.assertEqual(len(self.live("b")), 350)
        self.assertTrue(all("ids=1" in url for url in self.changes()), self.changes())
        self.assertEqual(self.full_pages(), 0)


class PushQueueBytesTests(MeshTestCase):
    names = ("a", "b")
    sync = {"interval": 60, "push_inflight_max": 1, "push_timeout": 120, "push_queue_bytes": 65536}

    def test_queue_is_bounded_in_bytes(self) -> None:
        """Queued pushes over sync.push_queue_bytes drop the queue (counted); sync brings everything."""
        self.mesh.set_mode("a", "b", "hold")
        client = self.peer_client("a", "b")
        envs = [self.send("a", b"first")]
        self.mesh.settle()
        for _ in range(7):  # about 9.6 KB each: the seventh goes over 64 KiB
            envs.append(self.send("a", os.urandom(7000), sender=Identity()))
            self.assertLessEqual(client.push.byte_size, 65536)
        self.mesh.settle()
        self.assertEqual(self.metric("a", "meshrelay_dm_replication_dropped_total", peer=Mesh.url("b")), 7)
        self.assertEqual((client.push.depth, client.push.byte_size), (0, 0))
        self.mesh.set_mode("a", "b", "up")
        self.mesh.link("a", "b").release()
        self.mesh.advance(60, step=10)
        self.assertEqual(sorted(self.live("b")), sorted(e["msg_id"] for e in envs))


class V1PeerTests(MeshTestCase):
    """B speaks wire v1 only (no features, bodies or ids; unbounded pages): both directions still work."""

    names = ("a", "b")
    sync = {"interval": 30}
    v1_only = ("b",)

    def test_push_and_sync_both_ways(self) -> None:
        """Pushes and pulls between a v2 node and a v1-only node deliver everything, with v1 requests only."""
        e1, e2 = self.send("a", b"from a"), self.send("b", b"from b", sender=Identity())
        self.mesh.settle()
        self.assertEqual(sorted(self.live("a")), sorted(self.live("b")))
        self.mesh.set_mode("a", "b", "down", both=True)
        e3, e4 = self.send("a", b"a again", sender=Identity()), self.send("b", b"b again", sender=Identity())
        self.mesh.set_mode("a", "b", "up", both=True)
        self.mesh.advance(30, step=5)
        want = sorted(e["msg_id"] for e in (e1, e2, e3, e4))
        self.assertEqual((sorted(self.live("a")), sorted(self.live("b"))), (want, want))
        # B (v1) never asked for anything v2; A found B is v1 and pulled v1 pages.
        from_b = [url for m, url in self.mesh.link("b", "a").requests]
        self.assertFalse([u for u in from_b if FEATURES in u or BODIES in u or "ids=" in u], from_b)
        from_a = [url for m, url in self.mesh.link("a", "b").requests if m == "GET"]
        self.assertTrue(any(u.endswith(FEATURES) for u in from_a))
        self.assertFalse([u for u in from_a if "ids=" in u or BODIES in u], from_a)
        self.assertEqual(self.peer_client("a", "b").puller.features.versions, (1,))

    def test_v2_request_refused_downgrades(self) -> None:
        """A peer that answered features with v2 but then refuses ids=1 with 400 is pulled with v1 pages."""
        client = self.peer_client("a", "b")
        client.puller.features = Features((1, 2), 1 << 20, 5000, 500)
        self.mesh.set_mode("a", "b", "down", both=True)
        env = self.send("b", b"late", sender=Identity())
        self.mesh.set_mode("a", "b", "up", both=True)
        client.sync_now()
        self.mesh.settle()
        self.assertIn(env["msg_id"], self.live("a"))
        self.assertEqual((client.puller.features.versions, client.puller.last_sync_outcome), ((1,), "ok"))


class BigAckTests(MeshTestCase):
    """Acks of 500 ids each make a feed whose v1 pages are larger than a puller accepts (issue 9 finding 3)."""

    names = ("a", "b")
    sync = {"interval": 30}
    # One test client sends all 185 junk-ack polls: no per-address write budget here
    limits = {"deposit_bytes_rate": 0}
    count = 185

    def fill(self) -> None:
        self.mesh.set_mode("a", "b", "down")  # no push: only sync carries the acks to B
        for _ in range(self.count):
            status, _ = self.poll("a", ack=random_ids(500))
            self.assertEqual(status, 200)

    def test_huge_acks_do_not_stop_sync(self) -> None:
        """185 acks of 500 ids at A reach B by sync; B's pulls succeed."""
        self.fill()
        self.mesh.advance(30, step=10)
        self.assertEqual(self.metric("b", "meshrelay_dm_ack_intake_total", outcome="applied"), self.count)
        self.assertEqual(self.peer_client("b", "a").puller.last_sync_outcome, "ok")
        self.assertEqual(len(self.tombstones("b")), self.count * 500)


class BigAckFromV1PeerTests(BigAckTests):
    """The same from a v1-only origin (unbounded pages): the puller halves its limit until pages fit."""

    v1_only = ("a",)

    def test_huge_acks_do_not_stop_sync(self) -> None:
        """185 acks of 500 ids at a v1-only A reach B; B's page limit was halved for the run."""
        super().test_huge_acks_do_not_stop_sync()
        self.assertLess(self.peer_client("b", "a").puller.run_limit, 500)


class CappedConvergenceTestCase(MeshTestCase):
    """Issue 9 finding 2: a mailbox filled on both sides of a partition converges."""

    names = ("a", "b")
    sync = {"interval": 30}
    limits = {"per_mailbox_pending": 5}

    def fill_both_sides(self) -> tuple[list[str], list[str]]:
        for n in self.names:
            for o in self.names:
                if n < o:
                    self.mesh.set_mode(n, o, "down", both=True)
        at_a = sorted(self.send("a", b"a%d" % i, sender=Identity())["msg_id"] for i in range(5))
        at_b = sorted(self.send("b", b"b%d" % i, sender=Identity())["msg_id"] for i in range(5))
        self.mesh.settle()  # the pushes fail while cut off
        for n in self.names:
            for o in self.names:
                if n < o:
                    self.mesh.set_mode(n, o, "up", both=True)
        self.mesh.advance(30, step=5)
        return at_a, at_b

    def drain(self, name: str) -> list[str]:
        """The recipient polls everything at ``name`` and acks it."""
        _, polled = self.poll(name)
        ids = sorted(m["msg_id"] for m in polled["messages"])
        status, _ = self.poll(name, ack=ids)
        self.assertEqual(status, 200)
        return ids

    def assert_capped(self) -> None:
        for n in self.names:
            self.assertLessEqual(len(self.live(n)), 5, n)


class CappedConvergenceTests(CappedConvergenceTestCase):
    def test_two_nodes_converge_after_the_recipient_drains_at_a(self) -> None:
        """5 at A and 5 at B while cut off; the recipient drains at A; A and B end with B's 5, then nothing."""
        at_a, at_b = self.fill_both_sides()
        self.assertEqual((sorted(self.live("a")), sorted(self.live("b"))), (at_a, at_b))
        self.assertEqual(self.drain("a"), at_a)
        self.mesh.advance(5)
        self.assert_capped()
        self.assertEqual((sorted(self.live("a")), sorted(self.live("b"))), (at_b, at_b))
        self.assertEqual(self.drain("a"), at_b)
        self.mesh.advance(60, step=5)
        self.assertEqual((self.live("a"), self.live("b")), ([], []))

    def test_refused_again_is_remembered_again(self) -> None:
        """A refetch that meets the cap again keeps the refusal, and a later drain brings the replicas."""
        at_a, at_b = self.fill_both_sides()
        # Space frees at A, but the recipient's next deposits at A fill it again before the refetch.
        self.drain("a")
        late = sorted(self.send("a", b"late%d" % i, sender=Identity())["msg_id"] for i in range(5))
        self.mesh.advance(5)
        self.assertEqual(sorted(self.live("a")), late)
        self.assertEqual(self.drain("a"), late)
        self.mesh.advance(5)
        self.assertEqual(sorted(self.live("a")), at_b)
        self.assertEqual(sorted(self.live("b")), at_b)


class CappedConvergenceThreeNodeTests(CappedConvergenceTestCase):
    names = ("a", "b", "c")

    def test_three_nodes_converge_after_the_recipient_drains_at_a(self) -> None:
        """Three nodes: 5 at A, 5 at B, all cut off; after the drain at A all three hold B's 5, then nothing."""
        at_a, at_b = self.fill_both_sides()
        self.assertIn(sorted(self.live("c")), (at_a, at_b))
        self.assertEqual(self.drain("a"), at_a)
        self.mesh.advance(5)
        self.assert_capped()
        self.assertEqual([sorted(self.live(n)) for n in self.names], [at_b] * 3)
        self.assertEqual(self.drain("a"), at_b)
        self.mesh.advance(60, step=5)
        self.assertEqual([self.live(n) for n in self.names], [[], [], []])


class ExpiryFreesSpaceTests(CappedConvergenceTestCase):
    names = ("a", "b")

    def test_expired_envelopes_make_room_for_refused_replicas(self) -> None:
        """B's mailbox is full of envelopes that expire; once the sweeper removes them, B obtains A's five."""
        self.mesh.set_mode("a", "b", "down", both=True)
        at_a = sorted(self.send("a", b"a%d" % i, sender=Identity())["msg_id"] for i in range(5))
        for i in range(5):
            env = Identity().envelope(self.bob, b"short%d" % i, ts=self.now(), ttl=60)
            self.assertEqual(self.mesh["b"].send(env)[0], 200)
        self.mesh.settle()  # the pushes fail while cut off
        self.mesh.set_mode("a", "b", "up", both=True)
        self.mesh.advance(30, step=5)
        self.assertEqual(len(self.live("b")), 5)
        self.assertEqual(self.metric("b", "meshrelay_dm_replica_total", outcome="drop_full"), 5)
        self.mesh.advance(100, step=5)  # past the short ttl and a sweep
        self.assertEqual(sorted(self.live("b")), at_a)
        self.assertEqual(sorted(self.live("a")), at_a)


def _self_signed_pem(host: str) -> bytes:
    """A key and a self-signed certificate for ``host`` (with its subjectAltName), PEM."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem_key = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem_key + cert.public_bytes(serialization.Encoding.PEM)


class PeerPoolTests(TestCase):
    """The production peer client (PooledHTTPClients) on the real reactor, against a loopback listener."""

    def test_new_peer_connections_log_no_factory_lines(self) -> Deferred[None]:
        """A request over a new pooled connection answers, and logs no "Starting factory" line."""
        from twisted.internet import reactor
        from twisted.logger import globalLogPublisher
        from twisted.web.server import Site

        class Ok(Resource):
            isLeaf = True

            def render_GET(self, request: Any) -> bytes:
                return b'{"ok": true}'

        site = Site(Ok())
        site.noisy = False
        port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        clients = PooledHTTPClients(reactor, make_config(self.mktemp()))
        self.addCleanup(clients.close)
        lines: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            lines.append(str(event.get("log_format")))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        url = f"http://127.0.0.1:{port.getHost().port}/"

        async def go() -> None:
            response = await clients(PeerConfig(url=url, secret="x" * 32)).request("GET", url)
            self.assertEqual(await treq.content(response), b'{"ok": true}')
            self.assertFalse([line for line in lines if "factory" in line], lines)

        return Deferred.fromCoroutine(go())

    def test_an_https_peer_must_show_a_trusted_certificate(self) -> Deferred[None]:
        """https peers are reached over TLS, checked like a browser: a self-signed certificate is refused."""
        from twisted.internet import reactor, ssl
        from twisted.web.server import Site

        cert = ssl.PrivateCertificate.loadPEM(_self_signed_pem("localhost"))
        port = reactor.listenSSL(0, Site(Resource()), cert.options(), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        clients = PooledHTTPClients(reactor, make_config(self.mktemp()))
        self.addCleanup(clients.close)
        url = f"https://localhost:{port.getHost().port}/"

        async def go() -> None:
            with self.assertRaises(ResponseNeverReceived) as cm:
                await clients(PeerConfig(url=url, secret="x" * 32)).request("GET", url)
            self.assertIn("certificate verify failed", str(cm.exception.reasons[0].value))

        return Deferred.fromCoroutine(go())

    def test_other_schemes_are_not_supported(self) -> None:
        from twisted.internet import reactor
        from twisted.web.client import URI
        from twisted.web.error import SchemeNotSupported

        with self.assertRaises(SchemeNotSupported):
            PeerEndpoints(reactor, 5).endpointForURI(URI.fromBytes(b"ftp://a.test/"))
