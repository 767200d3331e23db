"""Helpers for admin-listener tests: an in-memory admin client and a fake replication."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq

from meshrelay.admin import AdminAPI
from meshrelay.status import RateSampler
from tests.helpers import MemNode, stub_answer


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus text -> {(sample name, labels): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


class FakeReplication:
    """Implements the replication contract the admin listener relies on."""

    def __init__(self, node: MemNode, peers: list[dict[str, Any]]) -> None:
        self.metrics = node.metrics
        self.peers = peers
        self.updates = 0

    def peer_status(self) -> list[dict[str, Any]]:
        return [dict(p) for p in self.peers]

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def update_gauges(self) -> None:
        self.updates += 1
        for p in self.peers:
            if p.get("sync_lag_seconds") is not None:
                self.metrics.peer_sync_lag.labels(p["url"]).set(p["sync_lag_seconds"])


class AdminClient:
    """The admin resource of a MemNode, through StubTreq."""

    def __init__(self, mem: MemNode) -> None:
        self.mem = mem
        self.sampler = RateSampler(mem.metrics, mem.clock, interval=5.0, window=60.0)
        self.api = AdminAPI(mem.metrics, node=mem.node, sampler=self.sampler)
        self.http = StubTreq(self.api.resource())

    def get(self, path: str) -> tuple[int, dict[bytes, list[bytes]], str]:
        resp, body = stub_answer(self.http, self.http.get("http://127.0.0.1:9090" + path))
        headers = dict(resp.headers.getAllRawHeaders())
        return resp.code, headers, body.decode("utf-8")

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        code, _, text = self.get("/metrics")
        assert code == 200
        return parse_metrics(text)
