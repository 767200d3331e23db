"""The admin listener (PROTOCOL.md section 6): metrics for machines.

Loopback by default (``node.admin_listen``).  ``/metrics`` is Prometheus text
from the node's own registry; ``/api/mesh/metrics`` is the same as JSON.
"""

from __future__ import annotations

from typing import Any

from klein import Klein
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from meshrelay.metrics import Metrics
from meshrelay.web import install_error_table, json_response


class AdminAPI:
    app = Klein()
    install_error_table(app)

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def resource(self) -> Any:
        return self.app.resource()

    @app.route("/metrics", methods=["GET"])
    def prometheus(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self.metrics.registry)

    @app.route("/api/mesh/metrics", methods=["GET"])
    def metrics_json(self, request: Any) -> bytes:
        return json_response(request, 200, {"ok": True, "metrics": self.metrics.as_json()})
