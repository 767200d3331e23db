"""The client API (PROTOCOL.md section 3): thin Klein routes over the relay core.

Each route decodes the body, calls one :class:`~meshrelay.relay.Relay`
method and encodes its result; refusals are exceptions that the error table
in :mod:`meshrelay.web` turns into the protocol's error bodies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from klein import Klein
from twisted.internet.defer import Deferred

from meshrelay import __version__
from meshrelay.relay import Relay
from meshrelay.web import install_error_table, json_response, read_json


class ClientAPI:
    """Routes of the public listener that clients call."""

    app = Klein()
    install_error_table(app)

    def __init__(self, relay: Relay, peer_count: Callable[[], int] = lambda: 0) -> None:
        self.relay = relay
        self.peer_count = peer_count

    def resource(self) -> Any:
        return self.app.resource()

    def _answer(self, request: Any, d: Deferred[dict[str, Any]]) -> Deferred[bytes]:
        return d.addCallback(lambda result: json_response(request, 200, result))

    @app.route("/api/mesh/dm/send", methods=["POST"])
    def send(self, request: Any) -> Deferred[bytes]:
        return self._answer(request, self.relay.deposit(read_json(request)))

    @app.route("/api/mesh/dm/poll", methods=["POST"])
    def poll(self, request: Any) -> Deferred[bytes]:
        return self._answer(request, self.relay.poll(read_json(request)))

    @app.route("/api/mesh/dm/count", methods=["POST"])
    def count(self, request: Any) -> Deferred[bytes]:
        return self._answer(request, self.relay.count(read_json(request)))

    @app.route("/api/mesh/health", methods=["GET"])
    def health(self, request: Any) -> bytes:
        return json_response(request, 200, {"ok": True, "version": __version__, "peers": self.peer_count()})
