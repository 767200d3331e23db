"""The admin listener (PROTOCOL.md section 6): metrics for machines, a status page for people.

Loopback by default (``node.admin_listen``).  ``/metrics`` is Prometheus text
from the node's own registry; ``/api/mesh/metrics`` is the same as JSON;
``/status`` is a self-refreshing HTML page (:mod:`meshrelay.status`).

Gauges that are cheaper to compute on demand (the per-peer sync lag) are
refreshed at scrape time through ``node.replication.update_gauges()`` when
replication is running.
"""

from __future__ import annotations

from typing import Any

from klein import Klein
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.logger import Logger

from meshrelay.metrics import Metrics
from meshrelay.status import RateSampler, render_status
from meshrelay.web import install_error_table, json_response


class AdminAPI:
    app = Klein()
    install_error_table(app)
    log = Logger()

    def __init__(self, metrics: Metrics, node: Any = None, sampler: RateSampler | None = None) -> None:
        self.metrics = metrics
        self.node = node
        if sampler is None and node is not None:
            sampler = RateSampler(metrics, node.clock)
        #: the rate ring for /status; its owner starts it (build_service adds it to the service tree)
        self.sampler = sampler

    def resource(self) -> Any:
        return self.app.resource()

    def _replication(self) -> Any:
        return getattr(self.node, "replication", None) if self.node is not None else None

    def _refresh_gauges(self) -> None:
        repl = self._replication()
        update = getattr(repl, "update_gauges", None)
        if update is None:
            return
        try:
            update()
        except Exception:
            # A scrape must still answer; the stale gauge is the lesser evil.
            self.log.failure("refreshing replication gauges failed")

    @app.route("/metrics", methods=["GET"])
    def prometheus(self, request: Any) -> bytes:
        self._refresh_gauges()
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self.metrics.registry)

    @app.route("/api/mesh/metrics", methods=["GET"])
    def metrics_json(self, request: Any) -> bytes:
        self._refresh_gauges()
        return json_response(request, 200, {"ok": True, "metrics": self.metrics.as_json()})

    @app.route("/status", methods=["GET"])
    def status(self, request: Any) -> bytes:
        if self.node is None:
            return json_response(request, 404, {"ok": False, "error": "not_found", "detail": "no node to show"})
        self._refresh_gauges()
        now = self.node.clock.seconds()
        if self.sampler is not None:
            rates, window = self.sampler.rates()
        else:
            rates, window = {}, 0.0
        repl = self._replication()
        peers = None
        if repl is not None:
            try:
                peers = list(repl.peer_status())
            except Exception:
                self.log.failure("peer_status() failed while rendering /status")
                peers = [{"url": p.url, "last_push_outcome": "status unavailable"} for p in self.node.config.peers]
        page = render_status(self.node, now, rates, window, peers)
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"Content-Security-Policy", b"default-src 'none'; style-src 'unsafe-inline'")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        return page.encode("utf-8")
