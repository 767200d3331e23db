"""HTTP plumbing shared by the client, peer and admin listeners.

- :class:`MeshRequest` enforces the body caps while the request is still
  arriving: from ``Content-Length`` before reading, and by counting chunks
  when there is none.  Over the cap it answers 413 at once, discards a bounded
  excess and closes; nothing over the cap is ever buffered.
- :class:`MeshSite` has no per-request access log unless ``access_log`` is on.
- :func:`install_error_table` is the one place that turns exceptions into
  ``{"ok": false, "error": code, "detail": ...}`` responses.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

from klein import Klein
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IAddress
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource
from werkzeug.exceptions import MethodNotAllowed, NotFound

from meshrelay.errors import MeshError, UnsupportedMediaType
from meshrelay.protocol import ACK_PATH, CHANGES_PATH, PEER_PATHS, REPLICATE_PATH, dumps_json, loads_json
from meshrelay.store.base import StoreError

log = Logger()

__all__ = ["ACK_PATH", "CHANGES_PATH", "PEER_PATHS", "REPLICATE_PATH"]

_REASONS = {
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    413: b"Request Entity Too Large",
    415: b"Unsupported Media Type",
    422: b"Unprocessable Entity",
    429: b"Too Many Requests",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}


def request_path(request: Any) -> bytes:
    """The request target's path, without the query."""
    uri: bytes = request.uri
    return uri.split(b"?", 1)[0]


class MeshRequest(server.Request):
    """A ``Request`` that refuses oversize bodies before buffering them."""

    _refused = False
    _closing = False
    _discarded = 0
    body_cap = 65536

    def _cap(self) -> int:
        site = getattr(self.channel, "site", None)
        caps = getattr(site, "body_caps", None)
        if caps is None:
            return self.body_cap
        path = getattr(self.channel, "_path", b"").split(b"?", 1)[0]
        return caps(path)

    def gotLength(self, length: int | None) -> None:
        self.body_cap = self._cap()
        if length is not None and length > self.body_cap:
            # No 100-continue for a body we will not take.
            self.requestHeaders.removeHeader(b"expect")
            self.content = io.BytesIO()
            self._refuse_too_large()
            return
        self.content = io.BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            self._discard(len(data))
            return
        assert self.content is not None
        if self.content.tell() + len(data) > self.body_cap:
            self.content = io.BytesIO()
            self._refuse_too_large()
            self._discard(len(data))
            return
        self.content.write(data)

    def _discard(self, n: int) -> None:
        # Read and drop a bounded excess so the client sees the 413 rather
        # than a reset; past that, close.
        self._discarded += n
        if self._discarded > max(self.body_cap, 65536):
            self._close()

    def _close(self) -> None:
        if not self._closing and self.channel is not None:
            self._closing = True
            self.channel.loseConnection()

    def _refuse_too_large(self) -> None:
        self._refused = True
        site = getattr(self.channel, "site", None)
        metrics = getattr(site, "metrics", None)
        if metrics is not None:
            metrics.refused_total.labels("too_large").inc()
            if getattr(self.channel, "_path", b"").split(b"?", 1)[0] == b"/api/mesh/dm/send":
                # An oversize deposit is a deposit outcome too (PROTOCOL.md section 6).
                metrics.deposit_total.labels("oversize").inc()
        body = dumps_json({"ok": False, "error": "too_large", "detail": f"request body over {self.body_cap} bytes"})
        head = (
            b"HTTP/1.1 413 Request Entity Too Large\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        )
        if self.channel is not None and self.channel.transport is not None:
            self.channel.transport.write(head + body)  # type: ignore[call-arg, misc]

    def _handleStar(self) -> None:
        # Twisted answers the target "*" itself: 200 for OPTIONS, else a bare 405. Give the 405
        # the protocol's error shape.
        if self.method == b"OPTIONS":
            super()._handleStar()  # type: ignore[misc]
            return
        self.setHeader(b"Allow", b"OPTIONS")
        body = json_response(self, 405, error_body("method_not_allowed", "only OPTIONS applies to *"))
        self.setHeader(b"Content-Length", b"%d" % len(body))
        self.write(body)
        self.finish()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            # Already answered 413; the whole (oversize) body has now been read.
            self._close()
            return
        super().requestReceived(command, path, version)


class MeshChannel(http.HTTPChannel):
    """An ``HTTPChannel`` with a deadline for reading each request (slowloris guard).

    The idle timeout (``timeOut``) is reset by every byte received, so a client
    dripping one byte at a time would hold a connection for ever.  A request
    must arrive whole, headers and body, within ``read_timeout`` seconds of
    its first byte; otherwise the node answers 408 and closes.
    """

    read_timeout = 20.0
    _read_deadline: Any = None
    site: Any = None

    def dataReceived(self, data: bytes) -> None:
        if self._read_deadline is None and not self._handlingRequest:
            self._read_deadline = self.callLater(self.read_timeout, self._read_timed_out)
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        self._cancel_read_deadline()
        super().allContentReceived()

    def _cancel_read_deadline(self) -> None:
        if self._read_deadline is not None:
            if self._read_deadline.active():
                self._read_deadline.cancel()
            self._read_deadline = None

    def _read_timed_out(self) -> None:
        self._read_deadline = None
        metrics = getattr(self.site, "metrics", None)
        if metrics is not None:
            metrics.refused_total.labels("read_timeout").inc()
        if self.transport is not None:
            self.transport.write(  # type: ignore[call-arg, misc]
                b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
        self.loseConnection()

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Twisted's answer to a request it cannot parse (request line, headers, framing) is a
        # bare 400 with no body; give it the protocol's error shape, then close as Twisted does.
        body = dumps_json(error_body("bad_request", "malformed HTTP request"))
        if self.transport is not None:
            self.transport.write(  # type: ignore[call-arg, misc]
                b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
            )
        self.loseConnection()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._cancel_read_deadline()
        if self.site is not None:
            self.site.open_connections -= 1
        super().connectionLost(reason)


class MeshSite(server.Site):
    """A ``Site`` with per-path body caps, connection and read limits, and an opt-in access log."""

    requestFactory = MeshRequest
    protocol = MeshChannel  # type: ignore[assignment]
    displayTracebacks = False

    def __init__(
        self,
        resource: Resource,
        body_caps: Callable[[bytes], int],
        access_log: bool = False,
        metrics: Any = None,
        timeout: float = 60.0,
        reactor: Any = None,
        read_timeout: float = 20.0,
        max_connections: int = 10240,
    ) -> None:
        super().__init__(resource, timeout=timeout, reactor=reactor)
        # No API takes HTML form posts: skip Twisted's Content-Type parsing of
        # every POST (it builds an email.message each time: tens of microseconds).
        self._parsePOSTFormSubmission = False
        self.body_caps = body_caps
        self.access_log = access_log
        self.metrics = metrics
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        self.open_connections = 0

    def buildProtocol(self, addr: IAddress | None) -> Any:
        if self.open_connections >= self.max_connections:
            if self.metrics is not None:
                self.metrics.refused_total.labels("max_connections").inc()
            return None
        channel = super().buildProtocol(addr)
        if channel is not None:
            channel.read_timeout = self.read_timeout
            self.open_connections += 1
        return channel

    def log(self, request: Any) -> None:
        if self.access_log:
            super().log(request)


def body_caps_for(max_body_bytes: int, max_replicate_body_bytes: int) -> Callable[[bytes], int]:
    """The body cap for a request path: the peer cap on peer routes, else the client cap."""

    def cap(path: bytes) -> int:
        return max_replicate_body_bytes if path in PEER_PATHS else max_body_bytes

    return cap


# ---------------------------------------------------------------------- JSON in and out


def json_response(request: Any, status: int, value: Any) -> bytes:
    """Set status and content type; return the JSON body bytes."""
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return dumps_json(value)


def read_json(request: Any) -> Any:
    """The request body as JSON; 415 unless the content type is JSON, 400 ``bad_json``."""
    ctype = request.getHeader(b"content-type")
    if ctype is None or ctype.split(b";", 1)[0].strip().lower() != b"application/json":
        raise UnsupportedMediaType("Content-Type must be application/json")
    content = request.content  # type: ignore[attr-defined]
    content.seek(0)
    return loads_json(content.read())


def error_body(code: str, detail: str) -> dict[str, Any]:
    return {"ok": False, "error": code, "detail": detail}


def _request_failure(args: tuple[Any, ...]) -> tuple[Any, Failure]:
    # Klein passes (instance, request, failure) to handlers of a bound app
    # and (request, failure) otherwise.
    return args[-2], args[-1]


def install_error_table(app: Klein) -> None:
    """Register the one exception -> response table on a Klein app."""

    @app.handle_errors(  # type: ignore[arg-type]
        MeshError
    )
    def mesh_error(*args: Any) -> bytes:
        request, failure = _request_failure(args)
        e = failure.value
        assert isinstance(e, MeshError)
        return json_response(request, e.status, e.body())

    @app.handle_errors(  # type: ignore[arg-type]
        StoreError
    )
    def store_error(*args: Any) -> bytes:
        request, failure = _request_failure(args)
        log.error("store error while serving {path}: {err}", path=request.path, err=failure.value)
        return json_response(request, 503, error_body("unavailable", "the store is unavailable; retry later"))

    @app.handle_errors(  # type: ignore[arg-type]
        NotFound
    )
    def not_found(*args: Any) -> bytes:
        request, failure = _request_failure(args)
        return json_response(request, 404, error_body("not_found", "no such endpoint"))

    @app.handle_errors(  # type: ignore[arg-type]
        MethodNotAllowed
    )
    def not_allowed(*args: Any) -> bytes:
        request, failure = _request_failure(args)
        return json_response(request, 405, error_body("method_not_allowed", "method not allowed here"))

    @app.handle_errors(  # type: ignore[arg-type]
        CancelledError
    )
    def cancelled(*args: Any) -> bytes:
        request, failure = _request_failure(args)
        # The client went away; nothing will be written.
        return b""

    @app.handle_errors(  # type: ignore[arg-type]
        Exception
    )
    def internal(*args: Any) -> bytes:
        request, failure = _request_failure(args)
        log.failure("unexpected error serving {path}", failure, path=request.path)
        return json_response(request, 500, error_body("internal", "internal error"))


class NodeRoot(Resource):
    """The public listener's root: peer paths to the peer API, the rest to the client API.

    Client requests pass the per-IP rate limit first (``429 rate_limited``);
    peer requests are limited per authenticated peer by the peer API.
    """

    isLeaf = True

    def __init__(
        self,
        client: Resource,
        peer: Resource | None = None,
        client_limiter: Any = None,
        trusted_proxies: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__()
        self.client = client
        self.peer = peer
        self.client_limiter = client_limiter
        self.trusted_proxies = trusted_proxies

    def render(self, request: Any) -> Any:
        if self.peer is not None and request_path(request) in PEER_PATHS:
            return self.peer.render(request)
        limiter = self.client_limiter
        if limiter is not None and limiter.enabled and not limiter.allow(client_ip(request, self.trusted_proxies)):
            return json_response(request, 429, error_body("rate_limited", "too many requests from this address"))
        return self.client.render(request)


def client_ip(request: Any, trusted_proxies: frozenset[str] = frozenset()) -> str:
    """The client's address: the connecting host, or, behind a trusted proxy, X-Forwarded-For.

    X-Forwarded-For is read right to left, skipping trusted proxies; the first
    address that is not one of them is the client.  Without trusted proxies
    the header is ignored (anyone can write it).
    """
    addr = request.getClientAddress()
    host = str(getattr(addr, "host", addr))
    if host not in trusted_proxies:
        return host
    header = request.getHeader(b"x-forwarded-for")
    if not header:
        return host
    for hop in reversed(header.decode("latin-1").split(",")):
        hop = hop.strip()
        if hop and hop not in trusted_proxies:
            return hop
    return host
