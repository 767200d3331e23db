"""Every metric docs/protocol.md section 11 names appears in /metrics after the matching event."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from meshrelay.metrics import Metrics
from tests.adminhelpers import AdminClient, FakeReplication
from tests.helpers import T0, Identity, MemNode, make_config

PEER_B = "http://b.test"
PEER_C = "http://c.test"


def key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return (name, frozenset(labels.items()))


class ProtocolMetricsTests(SynchronousTestCase):
    def setUp(self) -> None:
        tmp = self.mktemp()
        cfg = make_config(
            tmp,
            peers=[{"url": PEER_B, "secret": "b" * 20}, {"url": PEER_C, "secret": "c" * 20}],
            per_sender_pending=1,
            per_mailbox_pending=2,
            max_message_bytes=256,
        )
        self.mem = MemNode(tmp, config=cfg)
        self.admin = AdminClient(self.mem)
        self.addCleanup(self.mem.stop)

    def test_deposit_outcomes(self) -> None:
        """meshrelay_dm_deposit_total counts accepted, duplicate, sender_cap, mailbox_full and oversize."""
        alice, bob, carol, dave = Identity(), Identity(), Identity(), Identity()
        env = alice.envelope(bob)
        self.assertEqual(self.mem.send(env)[0], 200)
        self.assertEqual(self.mem.send(env)[0], 200)
        self.assertEqual(self.mem.send(alice.envelope(bob, b"second"))[1]["error"], "sender_cap")
        self.assertEqual(self.mem.send(carol.envelope(bob))[0], 200)
        self.assertEqual(self.mem.send(dave.envelope(bob))[1]["error"], "mailbox_full")
        self.assertEqual(self.mem.send(dave.envelope(carol, b"x" * 300))[1]["error"], "too_large")
        m = self.admin.metrics()
        for outcome, n in (("accepted", 2), ("duplicate", 1), ("sender_cap", 1), ("mailbox_full", 1), ("oversize", 1)):
            self.assertEqual(m[key("meshrelay_dm_deposit_total", outcome=outcome)], n, outcome)
        self.assertEqual(m[key("meshrelay_stored_envelopes")], 2)
        self.assertGreater(m[key("meshrelay_stored_bytes")], 0)
        self.assertEqual(m[key("meshrelay_dm_deposit_latency_seconds_count")], 3)
        self.assertGreaterEqual(m[key("meshrelay_store_commit_batch_size_count")], 3)

    def test_acks_total(self) -> None:
        """meshrelay_dm_acks_total counts envelopes deleted by an ack."""
        alice, bob = Identity(), Identity()
        env = alice.envelope(bob)
        self.mem.send(env)
        status, _ = self.mem.poll(bob, ack=[env["msg_id"]])
        self.assertEqual(status, 200)
        m = self.admin.metrics()
        self.assertEqual(m[key("meshrelay_dm_acks_total")], 1)
        self.assertEqual(m[key("meshrelay_stored_envelopes")], 0)
        # what is left: the tombstone and the signed ack, which are storage too
        self.assertEqual(m[key("meshrelay_stored_bytes")], self.mem.node.store.stats().bytes)
        self.assertGreater(m[key("meshrelay_stored_bytes")], 0)

    def test_replica_outcomes(self) -> None:
        """meshrelay_dm_replica_total counts accepted, duplicate, drop_per_sender_cap and drop_full."""
        alice, bob, carol, dave, erin = Identity(), Identity(), Identity(), Identity(), Identity()
        first = alice.envelope(bob, ts=T0 - 10)
        results = self.successResultOf(
            self.mem.relay.accept_replicas(
                [
                    first,
                    first,
                    alice.envelope(bob, b"again", ts=T0 - 10),
                    carol.envelope(erin, ts=T0 - 10),
                    dave.envelope(erin, ts=T0 - 10),
                    bob.envelope(erin, ts=T0 - 10),
                ]
            )
        )
        self.assertEqual(
            [r["status"] for r in results], ["accepted", "duplicate", "rejected", "accepted", "accepted", "rejected"]
        )
        m = self.admin.metrics()
        for outcome, n in (("accepted", 3), ("duplicate", 1), ("drop_per_sender_cap", 1), ("drop_full", 1)):
            self.assertEqual(m[key("meshrelay_dm_replica_total", outcome=outcome)], n, outcome)
        self.assertEqual(m[key("meshrelay_dm_replication_lag_seconds_count")], 3)

    def test_peer_series_exist_from_start(self) -> None:
        """Push and sync counters exist at zero for every configured peer before any event."""
        m = self.admin.metrics()
        for peer in (PEER_B, PEER_C):
            for outcome in ("ok", "rejected", "error"):
                self.assertEqual(m[key("meshrelay_dm_replication_push_total", peer=peer, outcome=outcome)], 0)
            for outcome in ("ok", "error"):
                self.assertEqual(m[key("meshrelay_sync_pull_total", peer=peer, outcome=outcome)], 0)
            self.assertEqual(m[key("meshrelay_dm_replication_queue_depth", peer=peer)], 0)

    def test_push_and_sync_counts_are_exported(self) -> None:
        """Values on the push and sync counters reach /metrics under the protocol's names.

        (The export path only; that real pushes and pulls count is tested in test_replication.)
        """
        self.mem.metrics.push_total.labels(PEER_B, "ok").inc(3)
        self.mem.metrics.push_total.labels(PEER_B, "rejected").inc()
        self.mem.metrics.sync_pull_total.labels(PEER_C, "ok").inc(2)
        m = self.admin.metrics()
        self.assertEqual(m[key("meshrelay_dm_replication_push_total", peer=PEER_B, outcome="ok")], 3)
        self.assertEqual(m[key("meshrelay_dm_replication_push_total", peer=PEER_B, outcome="rejected")], 1)
        self.assertEqual(m[key("meshrelay_sync_pull_total", peer=PEER_C, outcome="ok")], 2)

    def test_sync_lag_refreshed_at_scrape(self) -> None:
        """meshrelay_peer_sync_lag_seconds is current at every scrape, and replication is asked to refresh first."""
        # No pull has completed (the peers are unreachable here): the lag runs from start-up.
        self.mem.clock.advance(12)
        m = self.admin.metrics()
        self.assertEqual(m[key("meshrelay_peer_sync_lag_seconds", peer=PEER_B)], 12.0)
        self.mem.clock.advance(28)
        code, _, body = self.admin.get("/api/mesh/metrics")
        self.assertEqual(code, 200)
        self.assertIn('{"labels":{"peer":"http://b.test"},"value":40.0}', body)
        fake = FakeReplication(self.mem, [])
        self.mem.node.replication = fake  # type: ignore[attr-defined]
        self.admin.metrics()
        self.assertEqual(fake.updates, 1)

    def test_failing_update_gauges_still_answers(self) -> None:
        """A replication whose update_gauges raises does not break the scrape."""

        class Broken(FakeReplication):
            def update_gauges(self) -> None:
                raise RuntimeError("boom")

        self.mem.node.replication = Broken(self.mem, [])  # type: ignore[attr-defined]
        code, _, text = self.admin.get("/metrics")
        self.assertEqual(code, 200)
        self.assertIn("meshrelay_stored_envelopes", text)
        self.flushLoggedErrors(RuntimeError)


class MetricValueTests(SynchronousTestCase):
    def test_unknown_name_fails_known_unset_series_is_zero(self) -> None:
        """Metrics.value raises for a misspelled name and reads 0 for a known series not yet created."""
        m = Metrics()
        self.assertEqual(m.value("meshrelay_dm_deposit_total", outcome="accepted"), 0.0)
        m.deposit_total.labels("accepted").inc()
        self.assertEqual(m.value("meshrelay_dm_deposit_total", outcome="accepted"), 1.0)
        self.assertEqual(m.value("meshrelay_stored_envelopes"), 0.0)
        with self.assertRaises(KeyError):
            m.value("meshrelay_dm_deposits_total")
