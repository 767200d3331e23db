"""The node's metrics: one object with its own ``CollectorRegistry``.

No module globals: every node (and every test) makes its own :class:`Metrics`
and passes it in, so several nodes can live in one process.  Names follow
docs/protocol.md section 11.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class Metrics:
    """Counters, gauges and histograms of one node."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.deposit_total = Counter("meshrelay_dm_deposit", "Client deposits by outcome", ["outcome"], registry=r)
        self.replica_total = Counter(
            "meshrelay_dm_replica", "Replicas received (push or sync) by outcome", ["outcome"], registry=r
        )
        self.acks_total = Counter(
            "meshrelay_dm_acks", "Envelopes acked (deleted and tombstoned) on this node", registry=r
        )
        self.ack_intake_total = Counter(
            "meshrelay_dm_ack_intake", "Signed acks received from peers by outcome", ["outcome"], registry=r
        )
        self.polls_total = Counter("meshrelay_dm_poll", "Polls and counts by outcome", ["outcome"], registry=r)
        self.policy_total = Counter(
            "meshrelay_dm_policy", "Mailbox policies newly stored (protocol v3), by origin", ["origin"], registry=r
        )
        self.push_total = Counter(
            "meshrelay_dm_replication_push",
            "Items pushed to peers by outcome",
            ["peer", "outcome"],
            registry=r,
        )
        self.push_batch_size = Histogram(
            "meshrelay_dm_replication_push_batch_size",
            "Items per push request to a peer (envelopes or acks): count is the requests, sum the items",
            ["peer"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.push_dropped_total = Counter(
            "meshrelay_dm_replication_dropped",
            "Items dropped from a full per-peer push queue (sync repairs them)",
            ["peer"],
            registry=r,
        )
        self.push_queue_depth = Gauge(
            "meshrelay_dm_replication_queue_depth", "Items waiting to be pushed", ["peer"], registry=r
        )
        self.sync_pull_total = Counter(
            "meshrelay_sync_pull", "Changes pages pulled from peers by outcome", ["peer", "outcome"], registry=r
        )
        self.sync_items_total = Counter(
            "meshrelay_sync_items", "Items received through sync", ["peer", "kind"], registry=r
        )
        self.sync_full_pages_total = Counter(
            "meshrelay_sync_full_pages",
            "Changes pages pulled in full-body form from a wire-v2 peer while catching up",
            ["peer"],
            registry=r,
        )
        self.sync_echo_left_out_total = Counter(
            "meshrelay_sync_echo_left_out",
            "Envelopes left out of feed pages served to a peer known to hold them (wire v5)",
            ["peer"],
            registry=r,
        )
        self.peer_sync_lag = Gauge(
            "meshrelay_peer_sync_lag_seconds",
            "Seconds since the last pull from a peer that reached more: false",
            ["peer"],
            registry=r,
        )
        self.peer_auth_failures = Counter(
            "meshrelay_peer_auth_failures", "Peer requests refused by authentication", ["reason"], registry=r
        )
        self.peer_auth_keys = Counter(
            "meshrelay_peer_auth_keys",
            'Peer requests authenticated, by peer and the key id of the secret that matched ("" = no id)',
            ["peer", "key_id"],
            registry=r,
        )
        self.config_reloads = Counter(
            "meshrelay_config_reloads", "Config reloads (SIGHUP) by outcome: ok or failed", ["outcome"], registry=r
        )
        self.config_generation = Gauge(
            "meshrelay_config_generation", "Configs applied since start-up (1 = the start-up config)", registry=r
        )
        self.config_loaded_at = Gauge(
            "meshrelay_config_loaded_timestamp_seconds", "When the running config was applied (Unix time)", registry=r
        )
        self.stored_envelopes = Gauge("meshrelay_stored_envelopes", "Envelopes stored", registry=r)
        self.stored_bytes = Gauge(
            "meshrelay_stored_bytes",
            "Bytes stored, as counted toward max_stored_bytes: envelopes, signed acks and tombstones",
            registry=r,
        )
        self.tombstones = Gauge(
            "meshrelay_stored_tombstones", "Tombstones stored, as of the last expiry sweep", registry=r
        )
        self.waiting_polls = Gauge("meshrelay_waiting_polls", "Long-polls waiting", registry=r)
        self.held_refusals = Gauge(
            "meshrelay_held_refusals",
            "Refusals held back before they are answered (limits.over_share_hold)",
            registry=r,
        )
        self.signature_checks_inline_total = Counter(
            "meshrelay_signature_checks_inline",
            "Signatures checked on the reactor because the verifier was idle (node.verifier)",
            registry=r,
        )
        self.store_reads_skipped_total = Counter(
            "meshrelay_store_reads_skipped",
            "Store reads answered from what the node knows, by reason: empty_mailbox, feed_end (SQLite)",
            ["reason"],
            registry=r,
        )
        self.blocked_networks = Gauge(
            "meshrelay_blocked_networks",
            "Address networks at their connection cap whose new connections the kernel drops "
            "(limits.drop_at_connection_cap)",
            registry=r,
        )
        self.expired_total = Counter("meshrelay_expired", "Rows removed by the expiry sweeper", ["kind"], registry=r)
        self.refused_total = Counter(
            "meshrelay_http_refused", "Requests refused before routing", ["reason"], registry=r
        )
        self.fetch_remote_total = Counter(
            "meshrelay_dm_fetch_remote",
            "Polls with fetch_remote, by what the fetch gate did (started, joined, skipped_recent, skipped_busy)",
            ["outcome"],
            registry=r,
        )
        self.store_errors_total = Counter("meshrelay_store_errors", "Store operations that failed", registry=r)
        self.replica_refusals_forgotten_total = Counter(
            "meshrelay_replica_refusals_forgotten",
            "Replicas refused at a cap that were not remembered (a bound of the refused table was reached)",
            registry=r,
        )
        self.deposit_latency = Histogram(
            "meshrelay_dm_deposit_latency_seconds",
            "Time from a parsed deposit to its committed answer",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.commit_batch_size = Histogram(
            "meshrelay_store_commit_batch_size",
            "Operations per store transaction (group commit)",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.store_seq_lock = Histogram(
            "meshrelay_store_seq_lock_seconds",
            "Seconds a batch held the shared store's sequence lock (PostgreSQL: numbering, inserts, COMMIT); "
            "the sum over all processes, per second of wall time, is how busy that one serial section is",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.replication_lag = Histogram(
            "meshrelay_dm_replication_lag_seconds",
            "Envelope age (now - ts) when a replica is accepted",
            buckets=_LAG_BUCKETS,
            registry=r,
        )

    def init_peer(self, peer: str) -> None:
        """Create a configured peer's push/sync series at zero, so they exist before the first event.

        ``rate()`` and absence alerts need a series to exist; ``peer`` is the
        peer's normalized URL (the value of every ``peer`` label).
        """
        for outcome in ("ok", "rejected", "error"):
            self.push_total.labels(peer, outcome)
        for outcome in ("ok", "error"):
            self.sync_pull_total.labels(peer, outcome)
        self.push_dropped_total.labels(peer)
        self.sync_full_pages_total.labels(peer)
        self.sync_echo_left_out_total.labels(peer)
        self.push_batch_size.labels(peer)
        self.push_queue_depth.labels(peer).set(0)

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """Shortcut for tests: the value of one sample, or None."""
        return self.registry.get_sample_value(name, labels or {})

    def value(self, name: str, **labels: str) -> float:
        """The sum of ``name``'s samples whose labels include ``labels`` (0 when none matches yet).

        Raises ``KeyError`` for a name that no metric of this node exports, so a
        misspelled name fails instead of reading as 0.
        """
        samples = self.as_json()
        if name not in samples:
            raise KeyError(f"no metric exports a sample named {name!r}")
        return float(sum(s["value"] for s in samples[name] if all(s["labels"].get(k) == v for k, v in labels.items())))

    def as_json(self) -> dict[str, Any]:
        """Every sample as ``{"name": [{"labels": {...}, "value": v}, ...]}``.

        A labelled metric with no series yet is listed with no samples, under
        the name its samples will have, so readers can tell it from a typo.
        """
        out: dict[str, Any] = {}
        for family in self.registry.collect():
            if not family.samples:
                out[family.name + ("_total" if family.type == "counter" else "")] = []
            for s in family.samples:
                if s.name.endswith("_created"):
                    continue
                out.setdefault(s.name, []).append({"labels": dict(s.labels), "value": s.value})
        return out
