"""The admin listener (docs/protocol.md section 11): metrics for machines, a status page for people.

Loopback by default (``node.admin_listen``).  ``/metrics`` is Prometheus text
from the node's own registry; ``/api/mesh/metrics`` is the same as JSON;
``/status`` is a self-refreshing HTML page (:mod:`meshrelay.status`).

Every request's ``Host`` must name the admin listener (:func:`host_allowed`):
a loopback name or address, the listener's configured interface, the
address the connection arrived on, or a name in ``node.admin_hosts``.
Anything else answers ``403 forbidden``: a web page whose DNS name was
re-pointed at 127.0.0.1 (DNS rebinding) sends its own name as ``Host`` and
cannot read ``/metrics`` or ``/status`` through a browser on this machine.

Gauges that are cheaper to compute on demand (the per-peer sync lag) are
refreshed at scrape time through ``node.replication.update_gauges()`` when
replication is running.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from klein import Klein
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from meshrelay.config import flat_values
from meshrelay.metrics import Metrics
from meshrelay.status import NodeView, RateSampler, ReplicationView, render_status
from meshrelay.web import error_body, install_error_table, json_response, note_refusal

_SALT_RE = re.compile(r"(?:[0-9a-fA-F]{2}){0,32}")

#: names that always mean this machine
LOOPBACK_NAMES = frozenset(("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"))


def _bare_host(host: str) -> str:
    """A host name or address without port, brackets or trailing dot, lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def endpoint_interface(endpoint: str) -> str:
    """The ``interface=`` of a Twisted server endpoint string ("" when there is none or it is a wildcard)."""
    parts: list[str] = []
    current = ""
    escaped = False
    for ch in endpoint:
        if escaped:
            current += ch
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if sep and key.strip() == "interface":
            iface = _bare_host(value)
            return "" if iface in ("0.0.0.0", "::", "") else iface
    return ""


def allowed_hosts(admin_listen: str, admin_hosts: str = "") -> frozenset[str]:
    """The Host names the admin listener answers to, besides loopback addresses and its own address."""
    names = set(LOOPBACK_NAMES)
    iface = endpoint_interface(admin_listen)
    if iface:
        names.add(iface)
    names.update(_bare_host(h) for h in admin_hosts.split(",") if h.strip())
    return frozenset(names)


def host_allowed(host_header: bytes | None, allowed: frozenset[str], local_address: str = "") -> bool:
    """True when ``Host`` names this listener: an allowed name, a loopback address, or ``local_address``."""
    if not host_header:
        return False
    host = _bare_host(host_header.decode("latin-1"))
    if host in allowed:
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    if addr.is_loopback:
        return True
    try:
        return bool(local_address) and addr == ipaddress.ip_address(_bare_host(local_address))
    except ValueError:
        return False


class _HostGate(Resource):
    """Answers 403 to a request whose Host does not name the admin listener; passes the rest on."""

    isLeaf = True

    def __init__(self, inner: Any, allowed: frozenset[str], refused: Any = None) -> None:
        super().__init__()
        self.inner = inner
        self.allowed = allowed
        self.refused = refused

    def render(self, request: IRequest) -> Any:
        local = getattr(request.getHost(), "host", "")
        if host_allowed(request.getHeader(b"host"), self.allowed, str(local)):
            return self.inner.render(request)
        if self.refused is not None:
            self.refused(request)
        return json_response(
            request,
            403,
            error_body("forbidden", "the Host header does not name this admin listener (see node.admin_hosts)"),
        )


class AdminAPI:
    app = Klein()
    install_error_table(app)
    log = Logger()

    def __init__(
        self,
        metrics: Metrics,
        node: NodeView | None = None,
        sampler: RateSampler | None = None,
        hosts: frozenset[str] | None = None,
    ) -> None:
        self.metrics = metrics
        self.node = node
        if hosts is None:
            hosts = (
                allowed_hosts(node.config.node.admin_listen, node.config.node.admin_hosts)
                if node is not None
                else LOOPBACK_NAMES
            )
        #: Host names accepted besides loopback addresses and the listener's own address
        self.hosts = hosts
        if sampler is None and node is not None:
            sampler = RateSampler(metrics, node.clock)
        #: the rate ring for /status; its owner starts it (build_service adds it to the service tree)
        self.sampler = sampler

    def resource(self) -> Any:
        """The admin listener's root: the Host check, then the routes."""
        return _HostGate(self.app.resource(), self.hosts, self._host_refused)

    def _host_refused(self, request: IRequest) -> None:
        self.metrics.refused_total.labels("admin_host").inc()
        note_refusal(
            self.node.relay.log_agg if self.node is not None else None,
            "admin_host",
            "admin listener refused 403: Host {host} does not name it (node.admin_hosts)",
            LogLevel.warn,
            host=repr((request.getHeader(b"host") or b"")[:100].decode("latin-1")),
        )

    def _replication(self) -> ReplicationView | None:
        return self.node.replication if self.node is not None else None

    def _failure(self, key: str, fmt: str) -> None:
        """Log the current exception: through the node's aggregator (one line per minute) when there is one."""
        if self.node is not None:
            self.node.relay.log_agg.emit(self.log, "admin:" + key, fmt, LogLevel.critical, Failure())
        else:
            self.log.failure(fmt)

    def _refresh_gauges(self) -> None:
        repl = self._replication()
        if repl is None:
            return
        try:
            repl.update_gauges()
        except Exception:
            # A scrape must still answer; the stale gauge is the lesser evil.
            self._failure("gauges", "refreshing replication gauges failed")

    @app.route("/metrics", methods=["GET"])
    def prometheus(self, request: IRequest) -> bytes:
        self._refresh_gauges()
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self.metrics.registry)

    @app.route("/api/mesh/metrics", methods=["GET"])
    def metrics_json(self, request: IRequest) -> bytes:
        self._refresh_gauges()
        return json_response(request, 200, {"ok": True, "metrics": self.metrics.as_json()})

    @app.route("/api/mesh/config", methods=["GET"])
    def running_config(self, request: Any) -> bytes:
        """The running config, key by key, secrets masked (``meshrelay check-config --diff-running``).

        ``?salt=HEX`` (up to 64 hex digits): secrets are given as HMACs under that salt, so that the
        caller can tell whether its file's secrets differ without any secret leaving the node.
        """
        node = self.node
        if node is None:
            return json_response(request, 404, error_body("not_found", "no node to show"))
        salts = request.args.get(b"salt", [b""])
        salt_text = salts[0].decode("latin-1") if len(salts) == 1 else "?"
        if set(request.args) - {b"salt"} or not _SALT_RE.fullmatch(salt_text):
            return json_response(
                request, 400, error_body("bad_request", "the only query is salt=HEX (0-64 hex digits)")
            )
        values = flat_values(node.config, bytes.fromhex(salt_text))
        return json_response(
            request,
            200,
            {
                "ok": True,
                "source": node.config.source,
                "generation": getattr(node, "config_generation", 1),
                "values": {k: list(v) for k, v in values.items()},
            },
        )

    @app.route("/status", methods=["GET"])
    def status(self, request: IRequest) -> bytes:
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
                self._failure("peer_status", "peer_status() failed while rendering /status")
                peers = [{"url": p.url, "last_push_outcome": "status unavailable"} for p in self.node.config.peers]
        page = render_status(self.node, now, rates, window, peers)
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"Content-Security-Policy", b"default-src 'none'; style-src 'unsafe-inline'")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        return page.encode("utf-8")
