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
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource
from werkzeug.exceptions import MethodNotAllowed, NotFound

from meshrelay.envelope import dumps_json, loads_json
from meshrelay.errors import MeshError, UnsupportedMediaType
from meshrelay.store.base import StoreError

log = Logger()

#: request paths served by the peer API (HMAC-gated, ``max_replicate_body_bytes``)
PEER_PATHS = frozenset((b"/api/mesh/dm/replicate-envelope", b"/api/mesh/dm/ack", b"/api/mesh/dm/changes"))

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
        if self._discarded > max(self.body_cap, 65536) and self.channel is not None:
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

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            # Already answered 413; the whole (oversize) body has now been read.
            if self.channel is not None:
                self.channel.loseConnection()
            return
        super().requestReceived(command, path, version)


class MeshSite(server.Site):
    """A ``Site`` with per-path body caps and an opt-in access log."""

    requestFactory = MeshRequest
    displayTracebacks = False

    def __init__(
        self,
        resource: Resource,
        body_caps: Callable[[bytes], int],
        access_log: bool = False,
        metrics: Any = None,
        timeout: float = 60.0,
    ) -> None:
        super().__init__(resource, timeout=timeout)
        self.body_caps = body_caps
        self.access_log = access_log
        self.metrics = metrics

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
    """The public listener's root: peer paths to the peer API, the rest to the client API."""

    isLeaf = True

    def __init__(self, client: Resource, peer: Resource | None = None) -> None:
        super().__init__()
        self.client = client
        self.peer = peer

    def render(self, request: Any) -> Any:
        if self.peer is not None and request_path(request) in PEER_PATHS:
            return self.peer.render(request)
        return self.client.render(request)
