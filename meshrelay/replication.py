"""Mesh replication: batched push to every peer, anti-entropy sync from every peer.

Each configured peer gets a :class:`PeerClient` made of three parts:

- :class:`Transport`: signed requests (HMAC, section 4) through an injected
  treq-style HTTP client (``treq.HTTPClient`` in production,
  ``treq.testing.StubTreq`` in tests), each with a timeout on the injected
  clock and a cap on the answer's size.
- :class:`PushQueue` (the fast path): client deposits and acks, after they
  commit, are queued per peer and coalesced into batched requests split by
  bytes under ``limits.max_replicate_body_bytes`` and by count under
  :data:`~meshrelay.protocol.MAX_BATCH`, with at most
  ``sync.push_inflight_max`` requests in flight.  The queue is bounded in
  items (``sync.push_queue_max``) and in bytes (``sync.push_queue_bytes``);
  past either it is dropped whole (``push_dropped_total``): sync repairs it.
  Nothing a peer does can delay or fail a client's answer.
- :class:`SyncPuller` (the sure path): the peer's ``changes`` feed is pulled
  at start-up and every ``sync.interval`` seconds from a durable cursor.  With
  a wire-v2 peer (negotiated through ``features``) it pulls ids-only pages,
  asks its own store which items it lacks and fetches only those through
  ``bodies`` (several requests in flight); with a v1-only peer it pulls v1
  pages, halving ``limit`` for the rest of the run when a page is too large.
  Every item is treated like a replica, so a partial mesh converges.

:class:`Replication` is the relay's one replication collaborator
(:class:`~meshrelay.relay.ReplicationHooks`): it fans pushes out to the
peers, answers ``fetch_remote``, and when space frees (``space_freed``) it
obtains again, after a short debounce, the replicas this node refused at a
cap from the peers that offered them (wire-v2.md "Capped replicas converge").
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import socket
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

import treq
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    FirstError,
    gatherResults,
    succeed,
)
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from meshrelay.config import Config, PeerConfig
from meshrelay.deferutil import shield
from meshrelay.echo import PeerHoldings, is_token
from meshrelay.envelope import Envelope, SignedAck
from meshrelay.logs import Aggregator
from meshrelay.metrics import Metrics
from meshrelay.peernet import PeerEndpointFactory, Route, peer_route
from meshrelay.peernet import describe_failure as _describe
from meshrelay.peers import PeerSigner, url_path
from meshrelay.policy_sync import PolicyPeer
from meshrelay.protocol import (
    ACK_PATH,
    BODIES_PATH,
    CHANGES_PATH,
    DEFAULT_IDS_LIMIT,
    ECHO_VERSION,
    FEATURES_PATH,
    HELD_VERSION,
    MAX_BATCH,
    MAX_BODIES,
    MAX_CHANGES_LIMIT,
    MAX_IDS_LIMIT,
    PAGE_OVERHEAD,
    PROTOCOL_VERSIONS,
    PUSHED_OK,
    REPLICATE_PATH,
    V1_ONLY,
    Features,
    IdsPage,
    Page,
    PeerError,
    bodies_request,
    bounded_response_cap,
    held_response_cap,
    is_msg_id,
    loads_json,
    parse_bodies,
    parse_features,
    parse_ids_page,
    parse_page,
    v1_response_cap,
    with_held,
)
from meshrelay.relay import Relay
from meshrelay.store.base import DUPLICATE, STORAGE_FULL, Cursor, Refused, Store, StoreError

__all__ = [
    "PeerError",
    "Page",
    "parse_page",
    "Replication",
    "PeerClient",
    "PooledHTTPClients",
    "LeanHTTPClient",
    "MAX_FETCH_PAGES",
]

ENVELOPE = "envelope"
ACK = "ack"

#: pages one sync run pulls before it yields (the next run starts at once)
MAX_PAGES_PER_RUN = 1000
#: pages of one sync run being applied (verified and stored) at once, while the next is fetched
APPLY_DEPTH = 3
#: pages a fetch_remote (or a refetch from a v1-only peer) pulls from a peer for one mailbox
MAX_FETCH_PAGES = 4
#: cap on a push answer's body (results are ~100 bytes per item)
MAX_PUSH_RESPONSE = 1 << 20
#: cap on an ids page's answer (an id item is ~170 bytes)
IDS_ITEM_BYTES = 400
#: first back-off step after a failed sync run (doubles up to sync.interval)
MIN_BACKOFF = 1.0
#: pause after a peer answers a push with 429 (rate limited) before pushing again
THROTTLE_PAUSE = 0.2
#: bodies requests in flight per peer while pulling a page
BODIES_INFLIGHT = 4
#: an ids page of at least this many items, of which the puller lacked at least
#: FULL_PAGES_LACKING of them, switches it to full-body pages (a catch-up: the
#: ids and bodies round trips only add work when nearly everything is lacking)
FULL_PAGES_MIN_ITEMS = 100
FULL_PAGES_LACKING = 0.9
#: debounce between space freeing and the refetch of refused replicas
REFETCH_DELAY = 1.0
#: remembered refusals read per refetch round
REFETCH_ROUND = 500

_BATCH_OPEN = {ENVELOPE: '{"envelopes":[', ACK: '{"acks":['}
_BATCH_CLOSE = "]}"
_OK_RESULTS = {ENVELOPE: PUSHED_OK, ACK: frozenset(("applied",))}


class HTTPClient(Protocol):
    """What replication needs from an HTTP client (``treq.HTTPClient``, ``StubTreq``)."""

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]: ...


ClientFactory = Callable[[PeerConfig], HTTPClient]


class ResponseTooLarge(PeerError):
    pass


class Throttled(PeerError):
    """The peer answered 429: slow down and send the same items again."""


class Downgrade(PeerError):
    """A v2 request was answered 400/404: the peer speaks v1 only (now)."""


# ---------------------------------------------------------------------- transport


class Transport:
    """Signed requests to one peer: HMAC headers, a timeout on the injected clock, a size cap."""

    log = Logger()

    def __init__(self, peer: PeerConfig, config: Config, http: HTTPClient, clock: IReactorTime) -> None:
        self.url = peer.url
        self.http = http
        self.clock = clock
        self.reachable: bool | None = None
        #: everything in flight for this peer (pushes, pulls, runs): cancelled on stop
        self.outstanding: set[Deferred[Any]] = set()
        self.reconfigure(peer, config)

    def reconfigure(self, peer: PeerConfig, config: Config) -> None:
        """Take a reloaded config: the signing secret, ``connect``, the timeout (the URL stays)."""
        send_key_id = getattr(getattr(self, "signer", None), "send_key_id", False)
        self.signer = PeerSigner(config.node.public_url, peer.secret, peer.key_id)
        # What negotiation learned about the peer still holds.
        self.signer.send_key_id = send_key_id
        self.timeout = config.sync.push_timeout
        # Where to dial: ``connect`` (scheme://host:port) when given, else the
        # URL itself; the path prefix, identity and keys always come from url.
        target = urlsplit(peer.url)
        self.prefix = url_path(peer.url)
        dial = urlsplit(peer.connect) if peer.connect else target
        self.origin = f"{dial.scheme}://{dial.netloc}"
        self.host_header = target.netloc if peer.connect else None

    def track(self, d: Deferred[Any]) -> Deferred[Any]:
        self.outstanding.add(d)

        def forget(result: Any) -> Any:
            self.outstanding.discard(d)
            return result

        return d.addBoth(forget)

    def cancel_all(self) -> None:
        for d in list(self.outstanding):
            d.cancel()

    def request(
        self, method: str, path: str, query: str = "", body: bytes = b"", cap: int = MAX_PUSH_RESPONSE
    ) -> Deferred[tuple[int, bytes]]:
        """A signed request with a timeout on the injected clock: fires with (status, body)."""
        target = self.prefix + path + ("?" + query if query else "")
        headers = self.signer.headers(method, target, body, self.clock.seconds())
        if body:
            headers["Content-Type"] = "application/json"
        if self.host_header is not None:
            headers["Host"] = self.host_header
        d = Deferred.fromCoroutine(self._exchange(method, self.origin + target, body, headers, cap))
        d.addTimeout(self.timeout, self.clock)
        return d

    async def _exchange(
        self, method: str, url: str, body: bytes, headers: dict[str, str], cap: int
    ) -> tuple[int, bytes]:
        try:
            response = await self.http.request(method, url, data=body if body else None, headers=headers)
        except (ResponseNeverReceived, ResponseFailed, RequestTransmissionFailed) as e:
            # A real Agent reports a cancelled request (our timeout, or a
            # shutdown) wrapped in one of these: unwrap it, so the timeout is
            # a TimeoutError and a shutdown's cancel a CancelledError.
            if e.reasons and all(r.check(CancelledError) for r in e.reasons):
                raise CancelledError() from e
            raise
        chunks: list[bytes] = []
        size = 0

        def collect(data: bytes) -> None:
            nonlocal size
            size += len(data)
            if size > cap:
                raise ResponseTooLarge(f"answer over {cap} bytes")
            chunks.append(data)

        await treq.collect(response, collect)
        return int(response.code), b"".join(chunks)

    def mark(self, reachable: bool, why: str = "") -> None:
        """Record the peer's state; log once per change."""
        if reachable and self.reachable is False:
            self.log.info("peer {peer} up", peer=self.url)
        elif not reachable and self.reachable is not False:
            self.log.warn("peer {peer} down: {why}", peer=self.url, why=why)
        self.reachable = reachable


# ---------------------------------------------------------------------- push


class PushQueue:
    """One peer's push queues (envelopes, acks): batching, in-flight bound, requeue on 429."""

    log = Logger()

    def __init__(
        self,
        transport: Transport,
        config: Config,
        metrics: Metrics,
        clock: IReactorTime,
        log_agg: Aggregator,
        holdings: PeerHoldings | None = None,
    ) -> None:
        self.transport = transport
        self.url = transport.url
        self.clock = clock
        self.log_agg = log_agg
        #: v5 (docs/protocol.md 14): this process's incarnation, and what the peer is known to hold
        self.holdings = holdings
        #: whether the peer speaks v5 (set by PeerClient from what its puller negotiated)
        self.speaks_echo: Callable[[], bool] = lambda: False
        self.reconfigure(config)
        #: when the last request of each kind started (on the injected clock)
        self.last_sent_kind = {ENVELOPE: float("-inf"), ACK: float("-inf")}
        self.queues: dict[str, deque[str]] = {ENVELOPE: deque(), ACK: deque()}
        self.queued_bytes = {ENVELOPE: 0, ACK: 0}
        self.inflight = 0
        #: requests in flight of each kind: each kind is a lane of its own (see ``_ready``)
        self.inflight_kind = {ENVELOPE: 0, ACK: 0}
        self.paused_until = 0.0
        self._turn = ACK
        self._pump_call: Any = None
        self._stopped = True
        self.last_push_outcome: str | None = None
        self.last_push_at: float | None = None
        # This peer's metric children, looked up once (enqueue runs per item).
        self._depth = metrics.push_queue_depth.labels(self.url)
        self._pushed = {o: metrics.push_total.labels(self.url, o) for o in ("ok", "rejected", "error")}
        self._dropped = metrics.push_dropped_total.labels(self.url)
        self._batch_size = metrics.push_batch_size.labels(self.url)
        self._depth.set(0)

    def reconfigure(self, config: Config) -> None:
        """Take a reloaded config's push bounds (what is queued stays queued)."""
        sync = config.sync
        self.queue_max = sync.push_queue_max
        self.queue_bytes_max = sync.push_queue_bytes
        self.inflight_max = sync.push_inflight_max
        self.linger = sync.push_linger_ms / 1000.0
        self.max_body = config.limits.max_replicate_body_bytes

    def start(self) -> None:
        self._stopped = False

    def stop(self) -> None:
        """Cancel the pump; queued items are left to sync (requests are cancelled by the transport)."""
        self._stopped = True
        if self._pump_call is not None and self._pump_call.active():
            self._pump_call.cancel()
        self._pump_call = None
        self._clear()
        self._depth.set(0)

    @property
    def depth(self) -> int:
        return len(self.queues[ENVELOPE]) + len(self.queues[ACK])

    @property
    def byte_size(self) -> int:
        return self.queued_bytes[ENVELOPE] + self.queued_bytes[ACK]

    def update_gauge(self) -> None:
        self._depth.set(self.depth)

    def enqueue(self, kind: str, text: str) -> None:
        """Queue one envelope or signed ack (canonical JSON text) for this peer."""
        if self._stopped:
            return
        depth = self.depth
        if depth >= self.queue_max or self.byte_size + len(text) > self.queue_bytes_max:
            self._drop_all(depth + 1)
            return
        self.queues[kind].append(text)
        self.queued_bytes[kind] += len(text)
        call = self._pump_call
        if call is not None and call.getTime() <= self.clock.seconds():
            # A pump is due this turn: it takes this item and sets the depth gauge (under load,
            # most items of a group commit arrive like this; enqueue runs once per item and peer).
            return
        self._depth.set(depth + 1)
        self._schedule_pump()

    def _drop_all(self, dropped: int) -> None:
        self._clear()
        self._dropped.inc(dropped)
        self._depth.set(0)
        self.last_push_outcome = "dropped"
        self.last_push_at = self.clock.seconds()
        self.log.warn("push queue for peer {peer} full: dropped {n} items; sync will repair", peer=self.url, n=dropped)

    def _clear(self) -> None:
        for kind, q in self.queues.items():
            q.clear()
            self.queued_bytes[kind] = 0

    def _schedule_pump(self) -> None:
        if self._stopped or not self.depth:
            return
        now = self.clock.seconds()
        if self._pump_call is not None:
            # A lingering pump goes at once when a full batch is ready.
            if self._pump_call.getTime() > now and self._may_send():
                self._pump_call.reset(0)
            return
        pause = self.paused_until - now
        if pause > 0:
            self._pump_call = self.clock.callLater(pause, self._pump)
        elif self._may_send():
            self._pump_call = self.clock.callLater(0, self._pump)
        elif self.inflight < self.inflight_max:
            # Lingering: a lane whose last request started less than push_linger ago.
            waits = [
                self.last_sent_kind[kind] + self.linger - now
                for kind, q in self.queues.items()
                if q and not self.inflight_kind[kind]
            ]
            if waits:
                self._pump_call = self.clock.callLater(max(0.0, min(waits)), self._pump)

    def _full(self, kind: str) -> bool:
        q = self.queues[kind]
        return len(q) >= MAX_BATCH or self.queued_bytes[kind] + len(q) + 16 >= self.max_body

    def _ready(self, kind: str, now: float) -> bool:
        """Whether a batch of ``kind`` may start now (the in-flight bound and a 429 pause aside).

        A full batch goes at once (up to ``push_inflight_max`` requests in
        flight, so a backlog drains in parallel).  A smaller one goes only when
        no request of its kind is in flight and the last one started at least
        ``push_linger_ms`` ago: an idle peer gets a deposit at once, while under
        load the items of several commits coalesce into one request (fewer,
        bigger requests: the per-request cost of HTTP and HMAC dominated
        pushing when every group commit became its own request).  Envelopes
        and acks are lanes of their own: a deposit never waits for a batch of
        acks in flight, nor an ack for envelopes (issue 10's junk acks are
        34 KB each, and a peer applies one in milliseconds: deposits waited
        behind them).
        """
        if not self.queues[kind]:
            return False
        if self._full(kind):
            return True
        return not self.inflight_kind[kind] and now >= self.last_sent_kind[kind] + self.linger

    def _may_send(self) -> bool:
        """Whether to start a request now: a kind is ``_ready``, within the in-flight bound, not paused."""
        if self._stopped or not self.depth or self.inflight >= self.inflight_max:
            return False
        now = self.clock.seconds()
        if now < self.paused_until:
            return False
        return any(self._ready(kind, now) for kind in self.queues)

    def _pump(self) -> None:
        self._pump_call = None
        while self._may_send():
            kind = self._next_kind()
            items, body = self._take_batch(kind)
            self._send(kind, items, body)
        self._depth.set(self.depth)
        self._schedule_pump()

    def _next_kind(self) -> str:
        # Alternate between acks and envelopes when both are ready.
        now = self.clock.seconds()
        other = ENVELOPE if self._turn == ACK else ACK
        if self._ready(other, now):
            self._turn = other
        return self._turn if self._ready(self._turn, now) else other

    def _take_batch(self, kind: str) -> tuple[list[str], bytes]:
        """Pop as many items as fit in one request body; at least one."""
        q = self.queues[kind]
        opening, closing = _BATCH_OPEN[kind], _BATCH_CLOSE
        parts = [q.popleft()]
        size = len(opening) + len(parts[0]) + len(closing)
        while q and len(parts) < MAX_BATCH and size + 1 + len(q[0]) <= self.max_body:
            item = q.popleft()
            size += 1 + len(item)
            parts.append(item)
        self.queued_bytes[kind] -= size - len(opening) - len(closing) - (len(parts) - 1)
        return parts, (opening + ",".join(parts) + closing).encode("utf-8")

    def _send(self, kind: str, items: list[str], body: bytes) -> None:
        self._batch_size.observe(len(items))
        self.inflight += 1
        self.inflight_kind[kind] += 1
        self.last_sent_kind[kind] = self.clock.seconds()
        path, query = ACK_PATH, ""
        if kind == ENVELOPE:
            path = REPLICATE_PATH
            if self.holdings is not None and self.speaks_echo():
                query = "inc=" + self.holdings.token
        d = self.transport.request("POST", path, query, body)
        d.addCallback(self._answered, kind, len(items))
        d.addErrback(self._failed, kind, items)
        d.addBoth(self._done, kind)
        self.transport.track(d)

    def _answered(self, answer: tuple[int, bytes], kind: str, n: int) -> None:
        status, body = answer
        if status == 429:
            raise Throttled("HTTP 429")
        if status != 200:
            raise PeerError(f"HTTP {status}")
        obj = loads_json(body)
        results = obj.get("results") if isinstance(obj, dict) else None
        if not isinstance(results, list) or len(results) != n:
            raise PeerError("push answer does not have one result per item")
        ok_statuses = _OK_RESULTS[kind]
        ok = rejected = errors = 0
        # v5: the answering process's incarnation, when it gave one (docs/protocol.md 14).
        token = obj.get("inc") if kind == ENVELOPE and self.holdings is not None else None
        held: list[str] | None = [] if is_token(token) else None
        for r in results:
            status_text = r.get("status") if isinstance(r, dict) else None
            if status_text in ok_statuses:
                ok += 1
                if held is not None and is_msg_id(r.get("msg_id")):
                    held.append(r["msg_id"])
            elif status_text == "rejected":
                rejected += 1
            else:
                errors += 1
        for outcome, count in (("ok", ok), ("rejected", rejected), ("error", errors)):
            if count:
                self._pushed[outcome].inc(count)
        if held and self.holdings is not None:
            self.holdings.learn(self.url, cast(str, token), held)
        if rejected:
            self.log_agg.emit(
                self.log,
                "push_rejected:" + self.url,
                "peer {peer} rejected {n} pushed items",
                LogLevel.debug,
                peer=self.url,
                n=rejected,
            )
        self.last_push_outcome = "error" if errors else "rejected" if rejected else "ok"
        self.last_push_at = self.clock.seconds()
        self.transport.mark(True)

    def _failed(self, f: Failure, kind: str, items: list[str]) -> None:
        if self._stopped and f.check(CancelledError):
            return
        if f.check(Throttled):
            self._requeue(kind, items)
            return
        self._pushed["error"].inc(len(items))
        self.last_push_outcome = "error"
        self.last_push_at = self.clock.seconds()
        self.transport.mark(False, f"push failed: {_describe(f)}")

    def _requeue(self, kind: str, items: list[str]) -> None:
        """A rate-limited batch goes back to the head of its queue; pushing pauses briefly."""
        self.paused_until = self.clock.seconds() + THROTTLE_PAUSE
        self.last_push_outcome = "throttled"
        self.last_push_at = self.clock.seconds()
        size = sum(len(i) for i in items)
        if self.depth + len(items) > self.queue_max or self.byte_size + size > self.queue_bytes_max:
            self._dropped.inc(len(items))
            self.log.warn(
                "push queue for peer {peer} full: dropped {n} items; sync will repair", peer=self.url, n=len(items)
            )
            return
        self.queues[kind].extendleft(reversed(items))
        self.queued_bytes[kind] += size
        self._depth.set(self.depth)

    def _done(self, _: Any, kind: str) -> None:
        self.inflight -= 1
        self.inflight_kind[kind] -= 1
        self._schedule_pump()


# ---------------------------------------------------------------------- sync


class SyncPuller:
    """One peer's anti-entropy: negotiation, cursor, pages, bodies, and refetch of refused replicas."""

    log = Logger()

    def __init__(
        self,
        transport: Transport,
        config: Config,
        relay: Relay,
        store: Store,
        metrics: Metrics,
        clock: IReactorTime,
        holder: str,
    ) -> None:
        self.transport = transport
        self.url = transport.url
        self.relay = relay
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.holder = holder
        self.ids_limit = DEFAULT_IDS_LIMIT
        self.reconfigure(config)
        #: the protocol versions this side speaks (a test double may narrow it to (1,))
        self.versions: tuple[int, ...] = PROTOCOL_VERSIONS
        #: what the peer speaks: None until negotiated (again after a failed run)
        self.features: Features | None = None
        #: v3: the peer's policy push and pull; when it speaks v3, envelopes are asked with permit and stamp
        self.policy_peer: PolicyPeer | None = None
        #: the v1 page limit of the current run (halved when a v1 page is too large)
        self.run_limit = self.page_limit
        #: pulling full-body pages from a v2 peer while this node lacks nearly all (a catch-up)
        self.full_pages = False
        #: an ids page must list at least this many items to switch to full pages (tests lower it)
        self.full_pages_min_items = FULL_PAGES_MIN_ITEMS
        self._sync_call: Any = None
        self._syncing = False
        self._stopped = True
        self.backoff = 0.0
        self.synced_at: float | None = None
        self.started_at = clock.seconds()
        self.last_sync_outcome: str | None = None
        self.last_sync_at: float | None = None
        metrics.peer_sync_lag.labels(self.url).set_function(self.lag_gauge_value)

    # ------------------------------------------------------------------ lifecycle

    def reconfigure(self, config: Config) -> None:
        """Take a reloaded config's sync settings (from the next run on; the cursor stays)."""
        sync = config.sync
        self.interval = sync.interval
        self.page_limit = min(sync.page_limit, MAX_CHANGES_LIMIT)
        self.lease_ttl = max(60, 3 * sync.push_timeout)
        self.max_message_bytes = config.limits.max_message_bytes

    def start(self) -> None:
        self._stopped = False
        self._sync_call = self.clock.callLater(0, self._tick)

    def stop(self) -> None:
        self._stopped = True
        if self._sync_call is not None and self._sync_call.active():
            self._sync_call.cancel()
        self._sync_call = None

    def lag_gauge_value(self) -> float:
        """``peer_sync_lag_seconds``: since the last complete pull (or since start-up if none yet)."""
        since = self.synced_at if self.synced_at is not None else self.started_at
        return max(0.0, self.clock.seconds() - since)

    def sync_lag(self) -> float | None:
        if self.synced_at is None:
            return None
        return max(0.0, self.clock.seconds() - self.synced_at)

    def sync_now(self) -> None:
        """Start a sync run now unless one is running (tests, admin)."""
        if self._stopped or self._syncing:
            return
        if self._sync_call is not None and self._sync_call.active():
            self._sync_call.cancel()
        self._tick()

    def _tick(self) -> None:
        self._sync_call = None
        if self._stopped or self._syncing:
            return
        self._syncing = True
        d = Deferred.fromCoroutine(self._run())
        d.addCallbacks(self._ended, self._failed)
        self.transport.track(d)

    def _schedule(self, delay: float) -> None:
        self._syncing = False
        if not self._stopped:
            self._sync_call = self.clock.callLater(delay, self._tick)

    def _ended(self, outcome: str) -> None:
        self.last_sync_outcome = outcome
        self.last_sync_at = self.clock.seconds()
        self.backoff = 0.0
        if outcome != "partial":
            self.full_pages = False
        self._schedule(0 if outcome == "partial" else self.interval)

    def _failed(self, f: Failure) -> None:
        if self._stopped and f.check(CancelledError):
            self._syncing = False
            return
        self.last_sync_outcome = "error"
        self.last_sync_at = self.clock.seconds()
        self.full_pages = False
        self.backoff = min(float(self.interval), max(MIN_BACKOFF, self.backoff * 2))
        # The peer may come back with another version: ask again next run.
        self.features = None
        if f.check(PeerError):
            self.transport.mark(False, f"sync failed: {_describe(f)}")
        elif f.check(StoreError):
            self.log.error("sync from peer {peer} stopped: {err}", peer=self.url, err=f.value)
        else:
            self.log.failure("sync from peer {peer} failed", f, peer=self.url)
        self._schedule(self.backoff)

    # ------------------------------------------------------------------ negotiation

    async def negotiate(self) -> Features:
        """Ask the peer's ``features`` (404/405: v1 only; anything else unexpected is an error)."""
        if 2 not in self.versions:
            self.features = V1_ONLY
            return V1_ONLY
        try:
            status, body = await self.transport.request("GET", FEATURES_PATH)
            if status in (404, 405):
                features = V1_ONLY
            elif status != 200:
                raise PeerError(f"features: HTTP {status}")
            else:
                features = parse_features(loads_json(body))
                if not features.v2:
                    features = V1_ONLY
        except CancelledError:
            raise
        except PeerError:
            # A run that cannot even ask the features of an unreachable peer is a failed pull:
            # counted, or a peer that is down (a proxy gone, a TLS refusal) would show no errors.
            self.metrics.sync_pull_total.labels(self.url, "error").inc()
            raise
        except Exception as e:
            self.metrics.sync_pull_total.labels(self.url, "error").inc()
            raise PeerError(_describe(Failure(e))) from e
        self.features = features
        # Name our signing secret in X-Peer-Key-Id only to a peer that reads it (5.6).
        self.transport.signer.send_key_id = features.key_ids
        return features

    @property
    def speaks_v3(self) -> bool:
        """The peer serves the v3 policy feed: ask for envelopes with their permit and stamp."""
        return self.policy_peer is not None and bool(self.policy_peer.speaks_v3)

    @property
    def speaks_held(self) -> bool:
        """The peer said it speaks v4: it takes and serves signed acks with their ``held`` list (13)."""
        return HELD_VERSION in self.versions and self.features is not None and self.features.held

    @property
    def speaks_echo(self) -> bool:
        """The peer said it speaks v5: it takes incarnation tokens and leaves echoes out (14)."""
        return ECHO_VERSION in self.versions and self.features is not None and self.features.echo

    def _echo_query(self) -> str:
        """``&inc=<this process's incarnation>`` for a feed page from a v5 peer (14), else nothing."""
        return "&inc=" + self.relay.holdings.token if self.speaks_echo else ""

    def _downgrade(self) -> None:
        self.log.info("peer {peer} refused a wire v2 request: using v1 with it", peer=self.url)
        self.features = V1_ONLY

    def _page_cap(self) -> int:
        """The answer cap for a v1 changes page from this peer."""
        f = self.features
        if f is not None and f.v2:
            return bounded_response_cap(f.page_bytes, self.max_message_bytes)
        return v1_response_cap(self.max_message_bytes)

    # ------------------------------------------------------------------ runs

    async def _lease(self) -> bool:
        return await shield(self.store.acquire_lease("sync:" + self.url, self.holder, self.lease_ttl))

    async def _run(self) -> str:
        if not await self._lease():
            self.metrics.sync_pull_total.labels(self.url, "skipped").inc()
            return "skipped"
        if self.features is None:
            await self.negotiate()
        self.run_limit = self.page_limit
        while True:
            try:
                return await self._run_pages()
            except Downgrade:
                self._downgrade()

    async def _run_pages(self) -> str:
        cursor = await shield(self.store.get_cursor(self.url))
        feed = cursor.feed_id if cursor is not None else ""
        since = cursor.since if cursor is not None else 0
        synced_at = cursor.synced_at if cursor is not None else 0.0
        if synced_at and (self.synced_at is None or synced_at > self.synced_at):
            self.synced_at = synced_at
        # A pipeline: while up to APPLY_DEPTH pages are verified and stored,
        # the next page (with its bodies, for a v2 peer) is already being
        # fetched.  The durable cursor only ever moves past a page whose items
        # are all applied, in order.
        prefetch: Deferred[Page] | None = None
        applying: deque[tuple[Deferred[None], Page]] = deque()
        pages = 0

        async def finish_all(synced_at: float) -> float:
            while applying:
                synced_at = await self._finish(applying[0], synced_at)
                applying.popleft()
            return synced_at

        try:
            while True:
                if pages and not await self._lease():
                    await finish_all(synced_at)
                    return "skipped"
                if prefetch is None:
                    prefetch = self._load_page(since)
                page = await prefetch
                prefetch = None
                if feed and page.feed != feed and since:
                    self.log.info(
                        "peer {peer} has a new feed id ({old} -> {new}): syncing again from 0",
                        peer=self.url,
                        old=feed,
                        new=page.feed,
                    )
                    feed, since = page.feed, 0
                    continue
                feed, since = page.feed, page.next
                pages += 1
                last = not page.more or pages >= MAX_PAGES_PER_RUN
                if not last:
                    prefetch = self._load_page(since)
                if any(earlier.acks for _, earlier in applying):
                    # This page's envelopes must not overtake an earlier
                    # page's acks (see _apply): let those finish first.
                    synced_at = await finish_all(synced_at)
                # The new page's apply is in ``applying`` before anything is
                # awaited, so the cleanup below cancels it if that fails.
                applying.append((Deferred.fromCoroutine(self._apply(page)), page))
                while len(applying) >= APPLY_DEPTH:
                    synced_at = await self._finish(applying[0], synced_at)
                    applying.popleft()
                if last:
                    await finish_all(synced_at)
                    return "ok" if not page.more else "partial"
        finally:
            pending: list[Deferred[Any]] = [done for done, _ in applying]
            if prefetch is not None:
                pending.append(prefetch)
            for d in pending:
                d.addErrback(lambda _: None)
                d.cancel()

    async def _finish(self, applying: tuple[Deferred[None], Page], synced_at: float) -> float:
        """Wait for a page's items to be applied, then move the durable cursor past it."""
        done, page = applying
        await done
        if not page.more:
            synced_at = self.clock.seconds()
            self.synced_at = synced_at
        await shield(self.store.set_cursor(Cursor(self.url, page.feed, page.next, synced_at)))
        return synced_at

    def _load_page(self, since: int) -> Deferred[Page]:
        f = self.features
        if f is not None and f.v2:
            if self.full_pages:
                return Deferred.fromCoroutine(self._load_full_page(since))
            return Deferred.fromCoroutine(self._load_ids_page(since))
        return Deferred.fromCoroutine(self._load_v1_page(since))

    async def _load_full_page(self, since: int) -> Page:
        """A full-body page from a v2 peer (7.3: a catch-up), its envelopes taken as lacking.

        The page is byte-bounded by the peer.  The puller goes back to ids
        pages once a full page brings mostly envelopes it holds (see
        :meth:`_apply`) or the feed's end.
        """
        page = await self._pull(since, self.page_limit)
        self.metrics.sync_full_pages_total.labels(self.url).inc()
        if not page.more:
            self.full_pages = False
        return dataclasses.replace(page, lacking=True, full=True)

    async def _load_v1_page(self, since: int) -> Page:
        """A v1 page; from a v1-only peer, halve the run's limit while the answer is too large."""
        while True:
            try:
                return await self._pull(since, self.run_limit)
            except ResponseTooLarge:
                if self.run_limit == 1 or (self.features is not None and self.features.v2):
                    raise
                self.run_limit = max(1, self.run_limit // 2)
                self.log.info(
                    "a changes page from peer {peer} was too large: limit {limit} for the rest of this run",
                    peer=self.url,
                    limit=self.run_limit,
                )

    async def _checked(
        self, method: str, path: str, query: str = "", body: bytes = b"", cap: int = 0, v2: bool = False
    ) -> Any:
        """One pull-side request: the decoded JSON of a 200; counts ``sync_pull_total`` errors.

        A v2 request answered 400 or 404 raises :class:`Downgrade`.
        """
        try:
            status, answer = await self.transport.request(method, path, query, body, cap=cap)
            if v2 and status in (400, 404):
                raise Downgrade(f"HTTP {status} to {path}")
            if status != 200:
                raise PeerError(f"HTTP {status}")
            return loads_json(answer)
        except CancelledError:
            raise
        except Exception as e:
            self.metrics.sync_pull_total.labels(self.url, "error").inc()
            if isinstance(e, PeerError):
                raise
            raise PeerError(_describe(Failure(e))) from e

    async def _pull(self, since: int, limit: int, mailbox: str | None = None) -> Page:
        """GET one v1 changes page; counts ``sync_pull_total`` (ok/error)."""
        query = f"since={since}&limit={limit}" + (f"&mailbox={mailbox}" if mailbox else self._echo_query())
        if self.speaks_v3:
            query += "&ext=1"  # v3: envelopes with their permit and stamp (12.5)
        cap = self._page_cap()
        if self.speaks_held:
            query += "&held=1"  # v4: signed acks with the ids the peer held (13)
            cap = held_response_cap(cap)
        obj = await self._checked("GET", CHANGES_PATH, query, cap=cap)
        try:
            page = parse_page(obj, since, limit)
        except PeerError:
            self.metrics.sync_pull_total.labels(self.url, "error").inc()
            raise
        self.metrics.sync_pull_total.labels(self.url, "ok").inc()
        self.transport.mark(True)
        return page

    async def _pull_ids(self, since: int, limit: int) -> IdsPage:
        query = f"since={since}&limit={limit}&ids=1" + self._echo_query()
        obj = await self._checked("GET", CHANGES_PATH, query, cap=limit * IDS_ITEM_BYTES + PAGE_OVERHEAD, v2=True)
        try:
            page = parse_ids_page(obj, since, limit)
        except PeerError:
            self.metrics.sync_pull_total.labels(self.url, "error").inc()
            raise
        self.metrics.sync_pull_total.labels(self.url, "ok").inc()
        self.transport.mark(True)
        return page

    async def _load_ids_page(self, since: int) -> Page:
        """An ids page, then the bodies of the items this node lacks (several requests in flight)."""
        ids = await self._pull_ids(since, min(self.ids_limit, MAX_IDS_LIMIT))
        envs: list[Any] = []
        acks: list[Any] = []
        if ids.envelopes or ids.acks:
            lacking_envs, lacking_acks = await shield(
                self.store.missing(
                    [(m, k) for m, k, _ in ids.envelopes], [(m, k) for m, k, _ in ids.acks], self.relay.now()
                )
            )
            if lacking_envs or lacking_acks:
                sizes = {(m, k): s for m, k, s in ids.envelopes}
                sizes.update({(m, k): s for m, k, s in ids.acks})
                envs, acks = await self.fetch_bodies(
                    [(m, k, sizes.get((m, k), 0)) for m, k in lacking_envs],
                    [(m, k, sizes.get((m, k), 0)) for m, k in lacking_acks],
                )
            listed = len(ids.envelopes) + len(ids.acks)
            if (
                ids.more
                and listed >= self.full_pages_min_items
                and len(lacking_envs) + len(lacking_acks) >= FULL_PAGES_LACKING * listed
            ):
                self.full_pages = True
        return Page(ids.feed, envs, acks, ids.next, ids.more, lacking=True)

    async def fetch_bodies(
        self, envelopes: Sequence[tuple[str, str, int]], acks: Sequence[tuple[str, str, int]]
    ) -> tuple[list[Any], list[Any]]:
        """Fetch bodies in chunks (by count and bytes), up to BODIES_INFLIGHT requests at once.

        Fires with (envelopes, acks) as returned; what the peer says is gone is left out.
        """
        f = self.features
        budget = f.page_bytes if f is not None and f.page_bytes else 1 << 20
        chunks: list[tuple[list[str], list[tuple[str, str]]]] = []
        cur_e: list[str] = []
        cur_a: list[tuple[str, str]] = []
        used = 0
        for kind, items in ((ACK, acks), (ENVELOPE, envelopes)):
            for mailbox, key, size in items:
                if (cur_e or cur_a) and (len(cur_e) + len(cur_a) >= MAX_BODIES or used + size > budget):
                    chunks.append((cur_e, cur_a))
                    cur_e, cur_a, used = [], [], 0
                if kind == ACK:
                    cur_a.append((mailbox, key))
                else:
                    cur_e.append(key)
                used += size
        if cur_e or cur_a:
            chunks.append((cur_e, cur_a))
        # Up to BODIES_INFLIGHT workers take the chunks in turn; results keep the chunks' order.
        results: list[tuple[list[Any], list[Any], list[str]]] = [([], [], [])] * len(chunks)
        todo = iter(enumerate(chunks))

        async def worker() -> None:
            for i, (msg_ids, ack_keys) in todo:
                results[i] = await self._bodies(msg_ids, ack_keys)

        workers = [Deferred.fromCoroutine(worker()) for _ in range(min(BODIES_INFLIGHT, len(chunks)))]
        try:
            await gatherResults(workers, consumeErrors=True)
        except FirstError as err:
            for w in workers:
                w.cancel()
            err.subFailure.raiseException()
        out_e: list[Any] = []
        out_a: list[Any] = []
        for e, a, _ in results:
            out_e.extend(e)
            out_a.extend(a)
        return out_e, out_a

    async def _bodies(self, msg_ids: list[str], acks: list[tuple[str, str]]) -> tuple[list[Any], list[Any], list[str]]:
        """Ask for these bodies until each is returned or gone; (envelopes, acks, gone msg_ids)."""
        f = self.features
        cap = bounded_response_cap(f.page_bytes if f is not None else 1 << 20, self.max_message_bytes)
        held = self.speaks_held
        if held:
            cap = held_response_cap(cap)
        envs: list[Any] = []
        got_acks: list[Any] = []
        gone: list[str] = []
        while msg_ids or acks:
            obj = await self._checked(
                "POST", BODIES_PATH, body=bodies_request(msg_ids, acks, ext=self.speaks_v3, held=held), cap=cap, v2=True
            )
            try:
                answer = parse_bodies(obj, len(msg_ids), len(acks))
            except PeerError:
                self.metrics.sync_pull_total.labels(self.url, "error").inc()
                raise
            envs.extend(answer.envelopes)
            got_acks.extend(answer.acks)
            gone.extend(answer.gone_envelopes)
            # Only string keys count (a hostile peer's list or dict in their place is unhashable;
            # the items themselves are verified when applied).
            done_e = {_str_key(e, "msg_id") for e in answer.envelopes} | set(answer.gone_envelopes)
            done_a = {(_str_key(a, "mailbox"), _str_key(a, "nonce")) for a in answer.acks}
            done_a |= set(answer.gone_acks)
            rest_e = [m for m in msg_ids if m not in done_e]
            rest_a = [k for k in acks if k not in done_a]
            if len(rest_e) + len(rest_a) == len(msg_ids) + len(acks):
                self.metrics.sync_pull_total.labels(self.url, "error").inc()
                raise PeerError("bodies answer made no progress")
            msg_ids, acks = rest_e, rest_a
        self.transport.mark(True)
        return envs, got_acks, gone

    async def _apply(self, page: Page) -> None:
        """Treat every item like a replica (idempotent); the acks first.

        An ack only deletes and tombstones, so applying it early never changes
        the outcome, while an envelope applied before an ack that comes before
        it in the feed could meet a cap the ack frees at the peer.
        """
        if page.acks:
            self.metrics.sync_items_total.labels(self.url, ACK).inc(len(page.acks))
            await self.relay.accept_acks(page.acks)
        if page.envelopes:
            self.metrics.sync_items_total.labels(self.url, ENVELOPE).inc(len(page.envelopes))
            results = await self.relay.accept_replicas(page.envelopes, peer=self.url, new=page.lacking)
            if page.full and sum(r.get("status") == DUPLICATE for r in results) * 2 > len(results):
                # Mostly held already (a push caught up, or another puller did): ids pages again.
                self.full_pages = False

    # ------------------------------------------------------------------ fetch_remote and refetch

    def fetch_mailbox(self, mailbox: str) -> Deferred[None]:
        """Pull one mailbox's items from this peer (bounded pages); never fails."""
        d = Deferred.fromCoroutine(self._fetch_mailbox(mailbox))

        def failed(f: Failure) -> None:
            if not f.check(CancelledError):
                self.relay.log_agg.emit(
                    self.log,
                    "fetch_remote:" + self.url,
                    "fetch_remote from {peer} failed: {why}",
                    LogLevel.debug,
                    peer=self.url,
                    why=_describe(f),
                )
            return None

        d.addErrback(failed)
        return self.transport.track(d)

    async def _fetch_mailbox(self, mailbox: str) -> None:
        since = 0
        for _ in range(MAX_FETCH_PAGES):
            page = await self._pull(since, self.page_limit, mailbox)
            await self._apply(page)
            if not page.more:
                return
            since = page.next

    def refetch(self, rows: Sequence[Refused]) -> Deferred[None]:
        """Obtain again the replicas this node refused from this peer; never fails."""
        d = Deferred.fromCoroutine(self._refetch(rows))

        def failed(f: Failure) -> None:
            if not f.check(CancelledError):
                self.log.info("refetch of refused replicas from {peer} failed: {why}", peer=self.url, why=_describe(f))
            return None

        d.addErrback(failed)
        return self.transport.track(d)

    async def _refetch(self, rows: Sequence[Refused]) -> None:
        if self.features is None:
            await self.negotiate()
        f = self.features
        if f is not None and f.v2:
            try:
                for i in range(0, len(rows), MAX_BODIES):
                    chunk = [r.msg_id for r in rows[i : i + MAX_BODIES]]
                    envs, _, gone = await self._bodies(chunk, [])
                    if envs:
                        await self.relay.accept_replicas(envs, peer=self.url)
                    if gone:
                        await shield(self.store.forget_refused([(m, self.url) for m in gone]))
                return
            except Downgrade:
                self._downgrade()
        # A v1-only peer: read the mailboxes' items again (bounded pages).
        for mailbox in dict.fromkeys(r.mailbox for r in rows):
            await self._fetch_mailbox(mailbox)


def _str_key(obj: Any, key: str) -> str | None:
    """``obj[key]`` when ``obj`` is a dict and that is a string, else None."""
    value = obj.get(key) if isinstance(obj, dict) else None
    return value if isinstance(value, str) else None


class PeerClient:
    """One peer: its transport, push queue and sync puller."""

    def __init__(
        self,
        peer: PeerConfig,
        config: Config,
        relay: Relay,
        store: Store,
        metrics: Metrics,
        http: HTTPClient,
        clock: IReactorTime,
        holder: str,
    ) -> None:
        self.url = peer.url
        #: this peer's entry of the running config
        self.peer = peer
        self.transport = Transport(peer, config, http, clock)
        self.push = PushQueue(self.transport, config, metrics, clock, relay.log_agg, relay.holdings)
        self.puller = SyncPuller(self.transport, config, relay, store, metrics, clock, holder)
        self.push.speaks_echo = lambda: self.puller.speaks_echo
        #: v3: this peer's policy push and pull (set by Replication)
        self.policy_peer: PolicyPeer | None = None

    def reconfigure(self, peer: PeerConfig, config: Config, http: HTTPClient | None = None) -> None:
        """Take a reloaded config (same URL): secrets, connect, bounds; the push queue and cursor stay."""
        self.peer = peer
        self.transport.reconfigure(peer, config)
        if http is not None:
            self.transport.http = http
        self.push.reconfigure(config)
        self.puller.reconfigure(config)
        if self.policy_peer is not None:
            self.policy_peer.set_interval(config.sync.interval)

    def start(self) -> None:
        self.push.start()
        self.puller.start()

    def stop(self) -> None:
        """Cancel timers and everything in flight; queued pushes are left to sync."""
        self.push.stop()
        self.puller.stop()
        self.transport.cancel_all()

    def sync_now(self) -> None:
        self.puller.sync_now()

    def status(self) -> dict[str, Any]:
        """This peer's entry of ``peer_status()``."""
        return {
            "url": self.url,
            "last_push_outcome": self.push.last_push_outcome,
            "last_push_at": self.push.last_push_at,
            "last_sync_outcome": self.puller.last_sync_outcome,
            "last_sync_at": self.puller.last_sync_at,
            "sync_lag_seconds": self.puller.sync_lag(),
            "queue_depth": self.push.depth,
            "inflight": self.push.inflight,
            "backoff_seconds": self.puller.backoff,
        }


class Replication:
    """Every peer's :class:`PeerClient`; the relay's :class:`~meshrelay.relay.ReplicationHooks`."""

    log = Logger()

    def __init__(
        self,
        config: Config,
        relay: Relay,
        store: Store,
        metrics: Metrics,
        clock: IReactorTime,
        client_factory: ClientFactory,
    ) -> None:
        self.relay = relay
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.client_factory = client_factory
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.peers = [self._make_peer(p, config) for p in config.peers]
        self._by_url = {p.url: p for p in self.peers}
        self.running = False
        #: mailboxes whose space freed since the last refetch round (None: any mailbox)
        self._freed: set[str | None] = set()
        self._refetch_call: Any = None
        self._refetching: Deferred[None] | None = None

    def _make_peer(self, peer: PeerConfig, config: Config) -> PeerClient:
        client = PeerClient(
            peer, config, self.relay, self.store, self.metrics, self.client_factory(peer), self.clock, self.holder
        )
        # v3: the peer's policy push and pull, over its signed transport.
        client.policy_peer = client.puller.policy_peer = PolicyPeer(
            client.url, client.transport.request, self.relay, self.clock, config.sync.interval
        )
        return client

    def reconfigure(self, config: Config) -> tuple[list[str], list[str], list[str]]:
        """Take a reloaded config's peers: (added, removed, changed) URLs.

        A removed peer stops (its requests are cancelled, its queue dropped:
        sync repairs); an added one starts pushing and syncing from its durable
        cursor; a peer whose entry changed keeps its push queue, cursor and
        connections, and signs with its new secret from the next request on.
        Every peer takes the new push and sync bounds.
        """
        wanted = {p.url: p for p in config.peers}
        removed = [url for url in self._by_url if url not in wanted]
        added: list[str] = []
        changed: list[str] = []
        for url in removed:
            client = self._by_url.pop(url)
            client.stop()
            self.relay.holdings.forget(url)
            if client.policy_peer is not None:
                client.policy_peer.stop()
            # Its lag gauge reads the stopped puller: gone with the peer (re-made if it comes back).
            try:
                self.metrics.peer_sync_lag.remove(url)
            except KeyError:
                pass
        peers: list[PeerClient] = []
        for url, entry in wanted.items():
            client_or_none = self._by_url.get(url)
            if client_or_none is None:
                self.metrics.init_peer(url)
                client = self._make_peer(entry, config)
                self._by_url[url] = client
                added.append(url)
                if self.running:
                    client.start()
                    if client.policy_peer is not None:
                        client.policy_peer.start()
            else:
                client = client_or_none
                if client.peer != entry:
                    changed.append(url)
                    # The HTTP client may depend on the entry (where to dial, how).
                    client.reconfigure(entry, config, self.client_factory(entry))
                else:
                    client.reconfigure(entry, config)
            peers.append(client)
        self.peers = peers
        return added, removed, changed

    def start(self) -> None:
        if self.running:
            return
        self.running = True
        self.relay.attach_replication(self)
        self.relay.policy_listeners.append(self._on_policy)
        for peer in self.peers:
            peer.start()
            if peer.policy_peer is not None:
                peer.policy_peer.start()

    def stop(self) -> None:
        if not self.running:
            return
        self.running = False
        if self.relay.replication is self:
            self.relay.attach_replication(None)
        if self._refetch_call is not None and self._refetch_call.active():
            self._refetch_call.cancel()
        self._refetch_call = None
        if self._refetching is not None:
            self._refetching.cancel()
        if self._on_policy in self.relay.policy_listeners:
            self.relay.policy_listeners.remove(self._on_policy)
        for peer in self.peers:
            peer.stop()
            if peer.policy_peer is not None:
                peer.policy_peer.stop()

    # ------------------------------------------------------------------ ReplicationHooks

    def envelope_committed(self, env: Envelope) -> None:
        text = env.raw
        # v3 (12.5): permit and stamp go only to peers that speak v3; the others get the v1 text.
        v1_text = env.raw_v1
        for peer in self.peers:
            v3 = peer.policy_peer is not None and peer.policy_peer.speaks_v3
            peer.push.enqueue(ENVELOPE, text if v3 else v1_text)

    def _on_policy(self, policy: Any) -> None:
        for peer in self.peers:
            if peer.policy_peer is not None:
                peer.policy_peer.push(policy)

    def ack_committed(self, ack: SignedAck, held: Sequence[str]) -> None:
        text = ack.json_text()
        # v4 (13): the ids this node held go along, to peers known to take them.
        held_text = with_held(text, held)
        for peer in self.peers:
            peer.push.enqueue(ACK, held_text if peer.puller.speaks_held else text)

    def fetch_remote(self, mailbox: str) -> Deferred[None] | None:
        """Pull ``mailbox`` from every peer; fires when all have answered or failed."""
        ds = [peer.puller.fetch_mailbox(mailbox) for peer in self.peers]
        return DeferredList(ds, consumeErrors=True).addCallback(lambda _: None)

    def space_freed(self, mailbox: str | None) -> None:
        """Debounce, then obtain again the replicas refused at a cap that may fit now."""
        if not self.running:
            return
        self._freed.add(mailbox)
        if self._refetch_call is None:
            self._refetch_call = self.clock.callLater(REFETCH_DELAY, self._refetch_tick)

    def _refetch_tick(self) -> None:
        self._refetch_call = None
        if not self.running:
            return
        if self._refetching is not None:
            # One round at a time; this one runs when the current one ends.
            self._refetch_call = self.clock.callLater(REFETCH_DELAY, self._refetch_tick)
            return
        freed, self._freed = self._freed, set()
        d = Deferred.fromCoroutine(self._refetch_round(freed))

        def ended(result: Any) -> None:
            self._refetching = None
            if isinstance(result, Failure) and not result.check(CancelledError):
                self.log.failure("refetch of refused replicas failed", result)

        d.addBoth(ended)
        self._refetching = d if self._refetching is None and not d.called else None

    async def _refetch_round(self, freed: set[str | None]) -> None:
        now = self.relay.now()
        rows: dict[tuple[str, str], Refused] = {}

        def keep(found: list[Refused]) -> None:
            for r in found:
                rows.setdefault((r.msg_id, r.peer), r)

        if None in freed:
            keep(await shield(self.store.refused(now, REFETCH_ROUND)))
        else:
            for mailbox in sorted(m for m in freed if m is not None):
                keep(await shield(self.store.refused(now, REFETCH_ROUND, mailbox)))
            # Storage freed anywhere may let in a replica refused for storage_full.
            keep([r for r in await shield(self.store.refused(now, REFETCH_ROUND)) if r.reason == STORAGE_FULL])
        by_peer: dict[str, list[Refused]] = {}
        for r in rows.values():
            by_peer.setdefault(r.peer, []).append(r)
        ds = [self._by_url[url].puller.refetch(found) for url, found in by_peer.items() if url in self._by_url]
        if ds:
            await DeferredList(ds, consumeErrors=True)

    # ------------------------------------------------------------------ admin and status

    def sync_now(self) -> None:
        for peer in self.peers:
            peer.sync_now()

    def update_gauges(self) -> None:
        """Refresh the per-peer gauges (the lag gauge is also computed at scrape time)."""
        for peer in self.peers:
            peer.push.update_gauge()

    def peer_status(self) -> list[dict[str, Any]]:
        """One dict per peer for the status page (None where unknown)."""
        return [p.status() for p in self.peers]


@implementer(IBodyProducer)
class _BytesBody:
    """A request body already in memory, written in one go (no cooperator turn)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self.data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class LeanHTTPClient:
    """The ``request(method, url, data=, headers=)`` that :class:`Transport` uses, straight on an Agent.

    ``treq.HTTPClient`` puts a cookie, redirect and content-decoding agent and a
    response buffer in front of every request; peers need none of them (the
    transport reads the body itself with ``treq.collect``), and a push is one
    request per batch per peer, so that work showed in the origin's profile.
    """

    def __init__(self, agent: Any) -> None:
        self.agent = agent

    def request(
        self, method: str, url: str, data: bytes | None = None, headers: dict[str, str] | None = None
    ) -> Deferred[Any]:
        raw = Headers({k.encode("latin-1"): [v.encode("latin-1")] for k, v in (headers or {}).items()})
        body = _BytesBody(data) if data else None
        return cast(Deferred[Any], self.agent.request(method.encode("ascii"), url.encode("ascii"), raw, body))


class PeerEndpoints(PeerEndpointFactory):
    """Direct peer endpoints, as Twisted's ``Agent`` connects by default, with quiet factories.

    ``http``: TCP to the host name (every address it resolves to, the first that answers);
    ``https``: TLS over that, the certificate checked against the system roots like a browser
    does. (The bench clients use it; the node builds a :class:`PeerEndpointFactory` per route.)
    """

    def __init__(self, reactor: Any, connect_timeout: float) -> None:
        super().__init__(reactor, Route(), connect_timeout)


class PooledHTTPClients:
    """The production client factory: a :class:`LeanHTTPClient` per :class:`~meshrelay.peernet.Route`.

    Peers dialled the same way (the same proxy, CA file and TLS name) share one Agent on one
    persistent pool; a peer with its own proxy or CA gets its own, so a connection made through
    one route is never reused for a peer that asked for another.
    """

    def __init__(self, reactor: Any, config: Config) -> None:
        self.reactor = reactor
        self.config = config
        self.pools: list[HTTPConnectionPool] = []
        self.clients: dict[Route, LeanHTTPClient] = {}

    def _new_client(self, route: Route) -> LeanHTTPClient:
        pool = HTTPConnectionPool(self.reactor, persistent=True)
        # Pushes in flight, the sync puller with its prefetch and bodies
        # requests, and a fetch_remote or refetch, per peer.
        pool.maxPersistentPerHost = self.config.sync.push_inflight_max + BODIES_INFLIGHT + 4
        pool.cachedConnectionTimeout = 120
        self.pools.append(pool)
        endpoints = PeerEndpointFactory(self.reactor, route, connect_timeout=self.config.sync.push_timeout)
        return LeanHTTPClient(Agent.usingEndpointFactory(self.reactor, endpoints, pool=pool))

    def __call__(self, peer: PeerConfig) -> HTTPClient:
        route = peer_route(peer.url, peer.connect, peer.proxy, self.config.node.peer_proxy, peer.ca_file)
        if route not in self.clients:
            self.clients[route] = self._new_client(route)
        return cast(HTTPClient, self.clients[route])

    def close(self) -> Deferred[None]:
        closing = [pool.closeCachedConnections() for pool in self.pools]
        return gatherResults(closing).addCallback(lambda _: None)
