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
from dataclasses import dataclass
from typing import Any

from klein import Klein
from twisted.internet.defer import CancelledError, maybeDeferred
from twisted.internet.interfaces import IAddress
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from werkzeug.exceptions import MethodNotAllowed, NotFound

from meshrelay.errors import DEFAULT_RETRY_AFTER, RETRY_AFTER_BY_CODE, MeshError, UnsupportedMediaType
from meshrelay.fairness import AddressPolicy, request_key
from meshrelay.protocol import ACK_PATH, CHANGES_PATH, PEER_PATHS, REPLICATE_PATH, dumps_json, loads_json
from meshrelay.store.base import StoreError
from meshrelay.synblock import SynBlock, listening_sockets

log = Logger()

__all__ = ["ACK_PATH", "CHANGES_PATH", "PEER_PATHS", "REPLICATE_PATH"]

_REASONS = {
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    409: b"Conflict",
    413: b"Request Entity Too Large",
    415: b"Unsupported Media Type",
    422: b"Unprocessable Entity",
    429: b"Too Many Requests",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}


#: refusals logged where they are decided, with more detail: the relay's "cap hit" lines and
#: the peer gate's "peer request refused (reason)" lines
_LOGGED_BY_RELAY = frozenset(("sender_cap", "mailbox_full", "storage_full", "forbidden"))


def note_refusal(agg: Any, key: str, fmt: str, level: LogLevel = LogLevel.info, **fields: Any) -> None:
    """Log a refused or failed request through the node's :class:`~meshrelay.logs.Aggregator`.

    One line per ``key`` per interval, with counts; a plain line when there is
    no aggregator (a bare resource in a test).
    """
    if agg is not None:
        agg.emit(log, key, fmt, level, **fields)
    else:
        log.emit(level, fmt, **fields)


def _site_agg(channel: Any) -> Any:
    return getattr(getattr(channel, "site", None), "log_agg", None)


def _shown_path(request: IRequest) -> str:
    return repr(request_path(request)[:100].decode("latin-1"))


def request_path(request: IRequest) -> bytes:
    """The request target's path, without the query."""
    uri: bytes = request.uri
    return uri.split(b"?", 1)[0]


# ---------------------------------------------------------------------- Twisted's private API
#
# Every use of a private name of twisted.web is in this block (MeshRequest and MeshChannel
# inherit the two classes below): Twisted has no public hook for these.  Each names the
# test that fails without it, so a Twisted release that renames one fails that test.


def _channel_path(channel: Any) -> bytes:
    """The path of the request the channel is reading (``HTTPChannel._path``), without the query.

    The body cap is chosen in ``gotLength``, before ``Request.uri`` is set.  Tests:
    tests/test_web.py BodyCapTests.test_peer_paths_get_the_replicate_cap,
    tests/test_cors.py CorsTests.test_oversize_body_answer_carries_it.
    """
    path: bytes = getattr(channel, "_path", b"")
    return path.split(b"?", 1)[0]


class _PrivateRequest(server.Request):
    def _handleStar(self) -> None:
        """``Request._handleStar``: Twisted answers the target "*" itself, 200 for OPTIONS, else a bare 405.

        Give the 405 the protocol's error shape.  Test: tests/test_hostile_http.py
        MalformedHTTPTests.test_star_target_answers_in_the_error_shape.
        """
        if self.method == b"OPTIONS":
            super()._handleStar()
            return
        self.setHeader(b"Allow", b"OPTIONS")
        body = json_response(self, 405, error_body("method_not_allowed", "only OPTIONS applies to *"))
        self.setHeader(b"Content-Length", b"%d" % len(body))
        self.write(body)
        self.finish()


class _PrivateChannel(http.HTTPChannel):
    def _between_requests(self) -> bool:
        """No request is being handled (``HTTPChannel._handlingRequest``): bytes arriving now start one.

        Test: tests/test_web.py ConnectionLimitTests.test_a_request_pipelined_behind_a_long_poll_is_not_timed_out.
        """
        return not self._handlingRequest

    def _respondToBadRequestAndDisconnect(self) -> None:
        """``HTTPChannel._respondToBadRequestAndDisconnect``: Twisted's answer to a request it cannot parse.

        That (request line, headers, framing) is a bare 400 with no body; give it the protocol's
        error shape, then close as Twisted does.  Test: tests/test_hostile_http.py
        MalformedHTTPTests.test_malformed_requests_answer_bad_request_in_the_error_shape.
        """
        note_refusal(_site_agg(self), "bad_http", "refused 400 bad_request: malformed HTTP")
        body = dumps_json(error_body("bad_request", "malformed HTTP request"))
        if self.transport is not None:
            self.transport.write(
                b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
            )
        self.loseConnection()


# ---------------------------------------------------------------------- the node's HTTP classes


class MeshRequest(_PrivateRequest):
    """A ``Request`` that refuses oversize bodies before buffering them."""

    _refused = False
    _closing = False
    _discarded = 0
    body_cap = 65536

    def _cap(self) -> int:
        site = getattr(self.channel, "site", None)
        caps: Callable[[bytes], int] | None = getattr(site, "body_caps", None)
        if caps is None:
            return self.body_cap
        return caps(_channel_path(self.channel))

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
        note_refusal(
            _site_agg(self.channel), "too_large", "refused 413 too_large: a body over {cap} bytes", cap=self.body_cap
        )
        if metrics is not None:
            metrics.refused_total.labels("too_large").inc()
            if _channel_path(self.channel) == b"/api/mesh/dm/send":
                # An oversize deposit is a deposit outcome too (docs/protocol.md section 11).
                metrics.deposit_total.labels("oversize").inc()
        body = dumps_json({"ok": False, "error": "too_large", "detail": f"request body over {self.body_cap} bytes"})
        from meshrelay.cors import raw_headers

        path = _channel_path(self.channel)
        head = (
            b"HTTP/1.1 413 Request Entity Too Large\r\n"
            b"Content-Type: application/json\r\n%s"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n"
            % (raw_headers(site, path, self.getHeader(b"origin")), len(body))
        )
        if self.channel is not None and self.channel.transport is not None:
            self.channel.transport.write(head + body)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            # Already answered 413; the whole (oversize) body has now been read.
            self._close()
            return
        super().requestReceived(command, path, version)


class MeshChannel(_PrivateChannel):
    """An ``HTTPChannel`` with a deadline for reading each request (slowloris guard).

    The idle timeout (``timeOut``) is reset by every byte received, so a client
    dripping one byte at a time would hold a connection for ever.  A request
    must arrive whole, headers and body, within ``read_timeout`` seconds of
    its first byte; otherwise the node answers 408 and closes.
    """

    read_timeout = 20.0
    _read_deadline: Any = None
    site: Any = None
    #: the per-address connection share this connection counts against (None: none)
    share_key: str | None = None

    def dataReceived(self, data: bytes) -> None:
        if self._read_deadline is None and self._between_requests():
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
        note_refusal(
            _site_agg(self), "read_timeout", "refused 408: a request not read whole within {t:g}s", t=self.read_timeout
        )
        metrics = getattr(self.site, "metrics", None)
        if metrics is not None:
            metrics.refused_total.labels("read_timeout").inc()
        if self.transport is not None:
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        self.loseConnection()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._cancel_read_deadline()
        if self.site is not None:
            self.site.connection_closed(self)
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
        max_connections_per_address: int = 0,
        policy: AddressPolicy | None = None,
        log_agg: Any = None,
        drop_at_cap: bool = False,
    ) -> None:
        # No API takes HTML form posts: no parsing of POST bodies as forms (it builds an
        # email.message each time: tens of microseconds; and the API answers a form 415).
        # Test: tests/test_web.py BodyCapTests.test_a_form_post_is_not_parsed_as_a_form.
        super().__init__(resource, timeout=timeout, reactor=reactor, parsePOSTFormSubmission=False)
        #: the node's log aggregator for refusals (meshrelay.logs.Aggregator), or None
        self.log_agg = log_agg
        self.body_caps = body_caps
        self.access_log = access_log
        self.metrics = metrics
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        self.open_connections = 0
        #: 0 = no per-address cap; else open connections one address (share key) may hold: at most
        #: half the listener's, so that one address can never hold every slot
        if max_connections_per_address:
            max_connections_per_address = min(max_connections_per_address, max(1, max_connections // 2))
        self.max_connections_per_address = max_connections_per_address
        self.policy = policy if policy is not None else AddressPolicy()
        #: share key -> open connections (only keys with at least one)
        self.connections_by_address: dict[str, int] = {}
        #: keys refused at their cap whose new connections the kernel drops (meshrelay.synblock)
        self.synblock = SynBlock(
            lambda: listening_sockets(self.reactor, self),
            getattr(metrics, "blocked_networks", None),
            self._synblock_failed,
            enabled=drop_at_cap,
        )

    def _refuse(self, reason: str) -> None:
        note_refusal(self.log_agg, reason, "refused a connection ({reason})", reason=reason)
        if self.metrics is not None:
            self.metrics.refused_total.labels(reason).inc()

    def buildProtocol(self, addr: IAddress | None) -> Any:
        if self.open_connections >= self.max_connections:
            self._refuse("max_connections")
            return None
        key = self.policy.connection_key(addr) if self.max_connections_per_address else None
        if key is not None and self.connections_by_address.get(key, 0) >= self.max_connections_per_address:
            self._refuse("max_connections_per_address")
            # Its next connections cost nothing: the kernel drops them until it holds half its cap.
            self.synblock.block(key)
            return None
        channel = super().buildProtocol(addr)
        if channel is not None:
            channel.read_timeout = self.read_timeout
            self.open_connections += 1
            if key is not None:
                channel.share_key = key
                self.connections_by_address[key] = self.connections_by_address.get(key, 0) + 1
        return channel

    def connection_closed(self, channel: MeshChannel) -> None:
        """A connection this site built has gone: free its slot and its address's."""
        self.open_connections -= 1
        key = channel.share_key
        if key is not None:
            channel.share_key = None
            left = self.connections_by_address.get(key, 0) - 1
            if left > 0:
                self.connections_by_address[key] = left
            else:
                self.connections_by_address.pop(key, None)
            # Hysteresis: unblocked only once it holds half its cap or less.  Unblocking at the
            # first close let the SYNs its client had queued complete at once: a burst of
            # refusals each time one of its connections ended, every few seconds for a client
            # that keeps its connections busy (long-polls), and the reactor stood still meanwhile.
            if key in self.synblock and left <= self.max_connections_per_address // 2:
                self.synblock.unblock(key)

    def _synblock_failed(self, why: str) -> None:
        log.warn(
            "cannot drop the connections of addresses at their cap in the kernel ({why}): refusing them instead",
            why=why,
        )

    def log(self, request: http.Request) -> None:
        if self.access_log:
            super().log(request)


def body_caps_for(max_body_bytes: int, max_replicate_body_bytes: int) -> Callable[[bytes], int]:
    """The body cap for a request path: the peer cap on peer routes, else the client cap."""

    def cap(path: bytes) -> int:
        return max_replicate_body_bytes if path in PEER_PATHS else max_body_bytes

    return cap


# ---------------------------------------------------------------------- JSON in and out


def json_response(request: IRequest, status: int, value: Any, retry_after: int | None = None) -> bytes:
    """Set status and content type; return the JSON body bytes.

    Every 429 carries ``Retry-After`` (``retry_after`` seconds, else the code's
    default from :data:`meshrelay.errors.RETRY_AFTER_BY_CODE`).
    """
    request.setResponseCode(status)
    if status == 429:
        if retry_after is None:
            code = value.get("error") if isinstance(value, dict) else None
            retry_after = RETRY_AFTER_BY_CODE.get(str(code), DEFAULT_RETRY_AFTER)
        request.setHeader(b"Retry-After", b"%d" % max(1, retry_after))
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    body = dumps_json(value)
    # Answers of async routes are written after render returns: without a length
    # twisted.web would send them chunked, which costs framing here and a chunk
    # decoder in every client (peers pushing and pulling included).
    request.setHeader(b"Content-Length", b"%d" % len(body))
    return body


def read_json(request: IRequest) -> Any:
    """The request body as JSON; 415 unless the content type is JSON, 400 ``bad_json``."""
    ctype = request.getHeader(b"content-type")
    if ctype is None or ctype.split(b";", 1)[0].strip().lower() != b"application/json":
        raise UnsupportedMediaType("Content-Type must be application/json")
    content = request.content
    content.seek(0)
    return loads_json(content.read())


def error_body(code: str, detail: str) -> dict[str, Any]:
    return {"ok": False, "error": code, "detail": detail}


def _request_failure(args: tuple[Any, ...]) -> tuple[Any, Failure]:
    # Klein passes (instance, request, failure) to handlers of a bound app
    # and (request, failure) otherwise.
    return args[-2], args[-1]


def _owner_agg(args: tuple[Any, ...]) -> Any:
    """The log aggregator of the API instance that served the request (its own, its relay's, its node's)."""
    if len(args) < 3:
        return None
    owner = args[0]
    for holder in (owner, getattr(owner, "relay", None), getattr(getattr(owner, "node", None), "relay", None)):
        agg = getattr(holder, "log_agg", None)
        if agg is not None:
            return agg
    return None


@dataclass(frozen=True)
class _ErrorRow:
    """One row of the error table: the answer to an exception, and the (aggregated) line it logs."""

    kind: type[BaseException]
    status: int
    code: str
    detail: str
    #: aggregation key and format of the log line ("" = no line); the format sees path, status, code, detail, err
    log_key: str = ""
    log_fmt: str = ""
    level: LogLevel = LogLevel.info


#: exception -> answer, first match wins.  A :class:`MeshError` answers its own status, code,
#: detail and Retry-After; a cancelled request (the client went away) gets no answer at all.
ERROR_TABLE: tuple[_ErrorRow, ...] = (
    _ErrorRow(MeshError, 0, "", "", "refused:{code}", "refused {status} {code} on {path}: {detail}"),
    _ErrorRow(
        StoreError,
        503,
        "unavailable",
        "the store is unavailable; retry later",
        "store_error",
        "store error while serving {path}: {err}",
        LogLevel.error,
    ),
    _ErrorRow(NotFound, 404, "not_found", "no such endpoint", "refused:not_found", "refused 404 not_found: {path}"),
    _ErrorRow(
        MethodNotAllowed,
        405,
        "method_not_allowed",
        "method not allowed here",
        "refused:method_not_allowed",
        "refused 405 method_not_allowed: {path}",
    ),
    _ErrorRow(CancelledError, 0, "", ""),
    _ErrorRow(
        Exception, 500, "internal", "internal error", "internal", "unexpected error serving {path}", LogLevel.critical
    ),
)


def log_refusal(request: IRequest, e: MeshError, agg: Any) -> None:
    """Log (aggregated) a refusal as the error table logs it."""
    row = ERROR_TABLE[0]
    if e.code not in _LOGGED_BY_RELAY:
        detail = " ".join(e.detail.split())[:200]
        fields = {"path": _shown_path(request), "status": e.status, "code": e.code, "detail": detail}
        note_refusal(agg, row.log_key.format(code=e.code), row.log_fmt, row.level, **fields)


def refusal_response(request: IRequest, e: MeshError) -> bytes:
    """The protocol's answer to a refusal: status, error body and (a 429) ``Retry-After``."""
    return json_response(request, e.status, e.body(), e.retry_after)


def answer_refusal(request: IRequest, e: MeshError, agg: Any) -> bytes:
    """The answer to a refusal, logged (aggregated) as the error table logs it; for a route that refuses without raising."""
    log_refusal(request, e, agg)
    return refusal_response(request, e)


class HeldAnswers:
    """Answers held back a while before they are sent: a tarpit for refusals a client re-sends at once.

    :meth:`answer` holds a request's answer ``seconds`` on the clock (one timer), then writes
    it; the request keeps its connection meanwhile, so the per-address connection cap bounds
    what one address holds.  At most ``max_held`` are held at a time (past that, answered at
    once).  A client that goes away ends its hold (no answer, no timer left);
    :meth:`release_all` answers every held request now (the node stopping).
    """

    def __init__(self, clock: Any, max_held: int, gauge: Any = None) -> None:
        self.clock = clock
        self.max_held = max_held
        #: a prometheus Gauge of the answers held now, or None
        self.gauge = gauge
        self._held: dict[IRequest, tuple[Any, Callable[[], bytes]]] = {}

    def answer(self, request: IRequest, seconds: float, body: Callable[[], bytes]) -> bytes | int:
        """``body()`` now, or after ``seconds`` (then ``NOT_DONE_YET`` now): what ``render`` returns."""
        if seconds <= 0 or len(self._held) >= self.max_held:
            return body()
        call = self.clock.callLater(seconds, self._send, request)
        self._held[request] = (call, body)
        self._changed()
        request.notifyFinish().addErrback(lambda _: self._drop(request))  # type: ignore[attr-defined]
        return server.NOT_DONE_YET

    def _send(self, request: IRequest) -> None:
        entry = self._held.pop(request, None)
        if entry is None:
            return
        self._changed()
        request.write(entry[1]())
        request.finish()

    def _drop(self, request: IRequest) -> None:
        entry = self._held.pop(request, None)
        if entry is not None:
            if entry[0].active():
                entry[0].cancel()
            self._changed()

    def release_all(self) -> None:
        """Answer every held request now."""
        for request in list(self._held):
            call = self._held[request][0]
            if call.active():
                call.cancel()
            self._send(request)

    def _changed(self) -> None:
        if self.gauge is not None:
            self.gauge.set(len(self._held))


def _answer_error(*args: Any) -> bytes:
    request, failure = _request_failure(args)
    row = next(r for r in ERROR_TABLE if isinstance(failure.value, r.kind))
    if row.kind is CancelledError:
        return b""
    e = failure.value
    if isinstance(e, MeshError):
        return answer_refusal(request, e, _owner_agg(args))
    status, body = row.status, error_body(row.code, row.detail)
    code = body["error"]
    if row.log_key:
        fields = {"path": _shown_path(request), "status": status, "code": code}
        if row.status == 503:
            fields["err"] = e
        agg = _owner_agg(args)
        key = row.log_key.format(code=code)
        if row.status != 500:
            note_refusal(agg, key, row.log_fmt, row.level, **fields)
        elif agg is not None:
            agg.emit(log, key, row.log_fmt, row.level, failure, **fields)
        else:
            log.failure(row.log_fmt, failure, row.level, **fields)
    return json_response(request, status, body)


def install_error_table(app: Klein) -> None:
    """Register :data:`ERROR_TABLE` on a Klein app: one handler answers every exception."""
    app.handle_errors(Exception)(_answer_error)  # type: ignore[arg-type]


class Routes(Resource):
    """A Klein app's routes, bound to ``instance``: static paths dispatched directly, the rest by Klein.

    The routes are declared with Klein and Klein stays the router of record:
    anything this table does not hold exactly (a path with a converter, a
    percent-encoded or trailing-slash spelling, HEAD, a wrong method, an
    unknown path) goes to Klein's own resource, which matches, redirects and
    answers 404 and 405 as before.  For an exact ``(method, path)`` of a static
    route, Klein's resource spent 40-55 us per request on work these routes
    never use (URL parts and a werkzeug adapter per request, an ``IKleinRequest``
    component, the renderable checks): about 30 % of a refused request's cost
    (``bench/op_costs.py requests``), and the node's request rate under issue
    10's attacks is mostly such requests.
    Here the same endpoint runs as Klein runs it (``execute_endpoint``), with
    Klein's contract kept: the handler's Deferred is cancelled when the client
    goes away, exceptions are answered by :data:`ERROR_TABLE` (the handler every
    app of this node installs), and nothing is written once the request is
    finished.  Handlers answer bytes (``json_response``) or a Deferred of them.
    """

    isLeaf = True

    def __init__(self, app: Klein, instance: Any) -> None:
        super().__init__()
        self.app = app
        self.instance = instance
        self.klein = app.resource()
        self.table: dict[tuple[bytes, bytes], str] = {}
        for rule in app.url_map.iter_rules():
            if rule.arguments:
                continue
            for method in rule.methods or ():
                if method not in ("HEAD", "OPTIONS"):
                    self.table[(method.encode("ascii"), rule.rule.encode("utf-8"))] = str(rule.endpoint)

    def render(self, request: IRequest) -> Any:
        endpoint = self.table.get((request.method, request.path))
        if endpoint is None:
            return self.klein.render(request)
        finished = [False]

        def done(_: object) -> None:
            finished[0] = True

        request.notifyFinish().addBoth(done)  # type: ignore[attr-defined]
        d = maybeDeferred(self.app.execute_endpoint, endpoint, request)
        request.notifyFinish().addErrback(lambda _: d.cancel())  # type: ignore[attr-defined]

        def failed(failure: Failure) -> Any:
            if finished[0]:
                if not failure.check(CancelledError):
                    log.failure("unhandled error after the request ended", failure)
                return None
            return _answer_error(self.instance, request, failure)

        def write(body: object) -> None:
            if isinstance(body, str):
                body = body.encode("utf-8")
            if isinstance(body, bytes) and not finished[0]:
                request.write(body)
            if not finished[0]:
                request.finish()

        def broken(failure: Failure) -> None:
            log.failure("unhandled error answering a request", failure)
            if not finished[0]:
                request.processingFailed(failure)  # type: ignore[attr-defined]

        d.addErrback(failed).addCallback(write).addErrback(broken)
        return server.NOT_DONE_YET


#: request attributes NodeRoot sets for the client API (see :mod:`meshrelay.fairness`)
SHARE_KEY_ATTR = "meshrelay_share_key"
FALLBACK_ATTR = "meshrelay_address_means_nothing"

SEND_PATH = b"/api/mesh/dm/send"
POLL_PATH = b"/api/mesh/dm/poll"
#: client requests whose bodies are writes, charged to the address's byte budget
#: (limits.deposit_bytes_*), and the refusal reason of each: a deposit stores its body, and a
#: poll's acks cost a delete and a tombstone per id (a 500-id ack is a 34 KB body)
WRITE_PATHS = {SEND_PATH: "deposit_bytes", POLL_PATH: "ack_bytes"}


def body_length(request: IRequest) -> int:
    """The length of the (already read, capped) request body."""
    content = getattr(request, "content", None)
    if content is None:
        return 0
    content.seek(0, io.SEEK_END)
    n: int = content.tell()
    content.seek(0)
    return n


class NodeRoot(Resource):
    """The public listener's root: peer paths to the peer API, the rest to the client API.

    Client requests pass the per-address limits first (``429 rate_limited``):
    the request rate, and for a deposit its bytes; both keyed by the
    address's share key (:mod:`meshrelay.fairness`).  On a listener whose
    address means nothing there is no such key: the request is marked, and
    the client API charges keys from the body instead.  Peer requests are
    limited per authenticated peer by the peer API.

    ``early(request, share_key)`` may answer a client poll that passed those
    limits before it reaches the routes (an answer, or None to route it): the
    client API refuses there a long-poll over its address's share of waiting
    polls (:meth:`meshrelay.api.ClientAPI.refuse_early`).
    """

    isLeaf = True

    def __init__(
        self,
        client: Resource,
        peer: Resource | None = None,
        client_limiter: Any = None,
        policy: AddressPolicy | None = None,
        deposit_limiter: Any = None,
        metrics: Any = None,
        log_agg: Any = None,
        early: Callable[[IRequest, str], bytes | int | None] | None = None,
    ) -> None:
        super().__init__()
        self.metrics = metrics
        self.log_agg = log_agg
        self.early = early
        self.client = client
        self.peer = peer
        self.client_limiter = client_limiter
        self.deposit_limiter = deposit_limiter
        self.policy = policy if policy is not None else AddressPolicy()

    def render(self, request: IRequest) -> Any:
        if self.peer is not None and request_path(request) in PEER_PATHS:
            return self.peer.render(request)
        key = request_key(request, self.policy)
        setattr(request, SHARE_KEY_ATTR, key)
        if key is None:
            setattr(request, FALLBACK_ATTR, True)
            return self.client.render(request)
        limiter = self.client_limiter
        if limiter is not None and limiter.enabled and not limiter.allow(key):
            return self._limited(request, "client_rate", "too many requests from this address", limiter.retry_after())
        deposits = self.deposit_limiter
        path = request_path(request)
        if (
            deposits is not None
            and deposits.enabled
            and path in WRITE_PATHS
            and not deposits.allow(key, body_length(request))
        ):
            return self._limited(
                request,
                WRITE_PATHS[path],
                "too many bytes written from this address; slow down",
                deposits.retry_after(body_length(request)),
            )
        if self.early is not None and path == POLL_PATH and request.method == b"POST":
            answer = self.early(request, key)
            if answer is not None:
                return answer
        return self.client.render(request)

    def _limited(self, request: IRequest, reason: str, detail: str, retry_after: int | None = None) -> bytes:
        note_refusal(
            self.log_agg,
            "refused:" + reason,
            "refused 429 rate_limited ({reason}): {detail}",
            reason=reason,
            detail=detail,
        )
        if self.metrics is not None:
            self.metrics.refused_total.labels(reason).inc()
        return json_response(request, 429, error_body("rate_limited", detail), retry_after)


def client_ip(request: IRequest, trusted_proxies: frozenset[str] = frozenset()) -> str:
    """The client's address: the connecting host, or, behind a trusted proxy, X-Forwarded-For.

    X-Forwarded-For is read right to left, skipping trusted proxies; the first
    address that is not one of them is the client, if it parses as an address
    (see :meth:`meshrelay.fairness.AddressPolicy.client`).  Without trusted
    proxies the header is ignored (anyone can write it).
    """
    addr = request.getClientAddress()
    host = str(getattr(addr, "host", addr))
    policy = AddressPolicy(",".join(sorted(trusted_proxies)))
    return str(policy.client(host, request.getHeader(b"x-forwarded-for")))
