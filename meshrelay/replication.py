"""Mesh replication: batched push to every peer, anti-entropy sync from every peer.

One :class:`PeerClient` per configured peer holds an injected treq-style HTTP
client (anything with ``request(method, url, data=, headers=)``: a
``treq.HTTPClient`` in production, ``treq.testing.StubTreq`` in tests) and the
injected clock.

**Push** (the fast path).  :class:`Replication` listens to the relay's
``envelope_listeners`` / ``ack_listeners``, which fire only for *client*
deposits and acks after they commit (replicas are never pushed on: one hop).
Each item is queued for every peer; a peer's queue is coalesced into batched
requests (``{"envelopes": [...]}`` / ``{"acks": [...]}``) split by bytes under
``limits.max_replicate_body_bytes`` and by count under
:data:`~meshrelay.peer_api.MAX_BATCH`, with at most ``sync.push_inflight_max``
requests in flight.  A queue that reaches ``sync.push_queue_max`` is dropped
whole (``push_dropped_total``): sync repairs it.  Every request times out on
the injected clock and ends in an errback that only counts
``push_total{outcome="error"}``; nothing a peer does can delay or fail a
client's answer.

**Sync** (the sure path).  Each peer's ``changes`` feed is pulled at start-up
and every ``sync.interval`` seconds, page after page until ``more`` is false,
from a cursor stored durably per peer; every item is treated like a replica,
so what a node learned from others spreads on and a partial mesh converges.
A change of the peer's feed id restarts from ``since=0``.  Failed runs back off
(doubling, up to ``sync.interval``).  A store lease makes sure only one
process sharing a database pulls from a given peer.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

import treq
from treq.client import HTTPClient as TreqHTTPClient
from twisted.internet.defer import CancelledError, Deferred, DeferredList, TimeoutError
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web.client import RequestTransmissionFailed, ResponseFailed, ResponseNeverReceived

from meshrelay.config import Config, PeerConfig
from meshrelay.deferutil import shield
from meshrelay.envelope import MAX_INT, dumps_json, loads_json
from meshrelay.metrics import Metrics
from meshrelay.peer_api import MAX_BATCH, MAX_CHANGES_LIMIT
from meshrelay.peers import PeerSigner, url_path
from meshrelay.policy_sync import PolicyPeer
from meshrelay.relay import Relay
from meshrelay.store.base import Cursor, Store, StoreError
from meshrelay.web import ACK_PATH, CHANGES_PATH, REPLICATE_PATH

ENVELOPE = "envelope"
ACK = "ack"

#: pages one sync run pulls before it yields (the next run starts at once)
MAX_PAGES_PER_RUN = 1000
#: pages a fetch_remote pulls from each peer for one mailbox
MAX_FETCH_PAGES = 4
#: cap on a push answer's body (results are ~100 bytes per item)
MAX_PUSH_RESPONSE = 1 << 20
#: first back-off step after a failed sync run (doubles up to sync.interval)
MIN_BACKOFF = 1.0
#: pause after a peer answers a push with 429 (rate limited) before pushing again
THROTTLE_PAUSE = 0.2

_BATCH_OPEN = {ENVELOPE: '{"envelopes":[', ACK: '{"acks":['}
_BATCH_CLOSE = "]}"
_OK_RESULTS = {ENVELOPE: ("accepted", "duplicate"), ACK: ("applied",)}


class HTTPClient(Protocol):
    """What replication needs from an HTTP client (``treq.HTTPClient``, ``StubTreq``)."""

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]: ...


ClientFactory = Callable[[PeerConfig], HTTPClient]


class PeerError(Exception):
    """A peer answered something other than a well-formed success."""


class ResponseTooLarge(PeerError):
    pass


class Throttled(PeerError):
    """The peer answered 429: slow down and send the same items again."""


@dataclass(frozen=True)
class Page:
    """One validated ``changes`` page from a peer."""

    feed: str
    envelopes: list[Any]
    acks: list[Any]
    next: int
    more: bool


def parse_page(obj: Any, since: int, limit: int) -> Page:
    """Validate a ``changes`` answer; raise :class:`PeerError` for anything malformed."""
    if not isinstance(obj, dict) or obj.get("ok") is not True:
        raise PeerError("changes answer is not {ok: true, ...}")
    feed, items, nxt, more = obj.get("feed"), obj.get("items"), obj.get("next"), obj.get("more")
    if not isinstance(feed, str) or not 0 < len(feed) <= 200:
        raise PeerError("changes answer has no feed id")
    if not isinstance(items, list) or len(items) > limit:
        raise PeerError("changes items must be a list of at most limit items")
    if type(nxt) is not int or not since <= nxt <= MAX_INT:
        raise PeerError("changes next must be an integer >= since")
    if type(more) is not bool:
        raise PeerError("changes more must be a boolean")
    if more and (nxt == since or not items):
        raise PeerError("changes answer says more but made no progress")
    envelopes: list[Any] = []
    acks: list[Any] = []
    for item in items:
        if not isinstance(item, dict) or len(item) != 2 or type(item.get("seq")) is not int:
            raise PeerError("a changes item must be {seq, envelope | ack}")
        if "envelope" in item:
            envelopes.append(item["envelope"])
        elif "ack" in item:
            acks.append(item["ack"])
        else:
            raise PeerError("a changes item must be {seq, envelope | ack}")
    return Page(feed, envelopes, acks, nxt, more)


def _describe(f: Failure) -> str:
    if f.check(TimeoutError):
        return "timed out"
    reasons = getattr(f.value, "reasons", None)
    if f.check(ResponseNeverReceived, ResponseFailed, RequestTransmissionFailed) and reasons:
        # The Agent wraps what went wrong in a list of Failures: say what it was.
        return "; ".join(_describe(r) for r in reasons)
    return f.getErrorMessage() or f.type.__name__  # type: ignore[union-attr]


class PeerClient:
    """Push queue, sync puller and remote fetch for one peer."""

    log = Logger()

    def __init__(
        self,
        peer: PeerConfig,
        config: Config,
        relay: Relay,
        store: Store,
        metrics: Metrics,
        http: HTTPClient,
        clock: Any,
        holder: str,
    ) -> None:
        self.url = peer.url
        self.relay = relay
        self.store = store
        self.metrics = metrics
        self.http = http
        self.clock = clock
        self.holder = holder
        self.signer = PeerSigner(config.node.public_url, peer.secret)
        sync = config.sync
        self.timeout = sync.push_timeout
        self.interval = sync.interval
        self.queue_max = sync.push_queue_max
        self.inflight_max = sync.push_inflight_max
        self.page_limit = min(sync.page_limit, MAX_CHANGES_LIMIT)
        self.max_body = config.limits.max_replicate_body_bytes
        self.lease_ttl = max(60, 3 * sync.push_timeout)
        # Where to dial: ``connect`` (scheme://host:port) when given, else the
        # URL itself; the path prefix, identity and keys always come from url.
        target = urlsplit(peer.url)
        self.prefix = url_path(peer.url)
        dial = urlsplit(peer.connect) if peer.connect else target
        self.origin = f"{dial.scheme}://{dial.netloc}"
        self.host_header = target.netloc if peer.connect else None
        # A changes page holds at most page_limit envelopes of at most
        # max_message_bytes (4/3 for b64u, plus the JSON around them).
        per_item = config.limits.max_message_bytes * 4 // 3 + 1024
        self.max_page_response = MAX_CHANGES_LIMIT * per_item + 4096
        # push state
        self.queues: dict[str, deque[str]] = {ENVELOPE: deque(), ACK: deque()}
        self.queued_bytes = {ENVELOPE: 0, ACK: 0}
        self.inflight = 0
        self.paused_until = 0.0
        self._turn = ACK
        self._pump_call: Any = None
        # sync state
        self._sync_call: Any = None
        self._syncing = False
        self.backoff = 0.0
        self.synced_at: float | None = None
        self.started_at = clock.seconds()
        # status (peer_status)
        self.last_push_outcome: str | None = None
        self.last_push_at: float | None = None
        self.last_sync_outcome: str | None = None
        self.last_sync_at: float | None = None
        #: v3: this peer's policy push and pull (set by Replication)
        self.policy_peer: PolicyPeer | None = None
        self.reachable: bool | None = None
        self._stopped = True
        self._outstanding: set[Deferred[Any]] = set()
        # This peer's metric children, looked up once (enqueue runs per item).
        self._depth = metrics.push_queue_depth.labels(self.url)
        self._pushed = {o: metrics.push_total.labels(self.url, o) for o in ("ok", "rejected", "error")}
        self._dropped = metrics.push_dropped_total.labels(self.url)
        self._depth.set(0)
        metrics.peer_sync_lag.labels(self.url).set_function(self.lag_gauge_value)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._stopped = False
        self._sync_call = self.clock.callLater(0, self._sync_tick)

    def stop(self) -> None:
        """Cancel timers and everything in flight; queued pushes are left to sync."""
        self._stopped = True
        for call in (self._pump_call, self._sync_call):
            if call is not None and call.active():
                call.cancel()
        self._pump_call = self._sync_call = None
        for d in list(self._outstanding):
            d.cancel()
        self._clear_queues()
        self._depth.set(0)

    def _track(self, d: Deferred[Any]) -> Deferred[Any]:
        self._outstanding.add(d)

        def forget(result: Any) -> Any:
            self._outstanding.discard(d)
            return result

        return d.addBoth(forget)

    # ------------------------------------------------------------------ HTTP

    def _request(
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

    def _mark(self, reachable: bool, why: str = "") -> None:
        """Record the peer's state; log once per change."""
        if reachable and self.reachable is False:
            self.log.info("peer {peer} up", peer=self.url)
        elif not reachable and self.reachable is not False:
            self.log.warn("peer {peer} down: {why}", peer=self.url, why=why)
        self.reachable = reachable

    # ------------------------------------------------------------------ push

    @property
    def queue_depth(self) -> int:
        return len(self.queues[ENVELOPE]) + len(self.queues[ACK])

    def enqueue(self, kind: str, text: str) -> None:
        """Queue one envelope or signed ack (canonical JSON text) for this peer."""
        if self._stopped:
            return
        depth = self.queue_depth
        if depth >= self.queue_max:
            dropped = depth + 1
            self._clear_queues()
            self._dropped.inc(dropped)
            self._depth.set(0)
            self.last_push_outcome = "dropped"
            self.last_push_at = self.clock.seconds()
            self.log.warn(
                "push queue for peer {peer} full: dropped {n} items; sync will repair", peer=self.url, n=dropped
            )
            return
        self.queues[kind].append(text)
        self.queued_bytes[kind] += len(text)
        self._depth.set(depth + 1)
        self._schedule_pump()

    def _schedule_pump(self) -> None:
        if self._pump_call is not None or self._stopped or not self.queue_depth:
            return
        pause = self.paused_until - self.clock.seconds()
        if pause > 0:
            self._pump_call = self.clock.callLater(pause, self._pump)
        elif self._may_send():
            self._pump_call = self.clock.callLater(0, self._pump)

    def _clear_queues(self) -> None:
        for kind, q in self.queues.items():
            q.clear()
            self.queued_bytes[kind] = 0

    def _may_send(self) -> bool:
        """Whether to start a request now.

        With nothing in flight, always.  While requests are in flight, a new one
        starts only for a full batch: small items wait for the answer and
        coalesce into the next batch (fewer, bigger requests under load), and
        a backlog still gets up to ``push_inflight_max`` requests at once.
        """
        if self._stopped or not self.queue_depth or self.inflight >= self.inflight_max:
            return False
        if self.clock.seconds() < self.paused_until:
            return False
        if self.inflight == 0:
            return True
        for kind, q in self.queues.items():
            if len(q) >= MAX_BATCH or self.queued_bytes[kind] + len(q) + 16 >= self.max_body:
                return True
        return False

    def _pump(self) -> None:
        self._pump_call = None
        while self._may_send():
            kind = self._next_kind()
            items, body = self._take_batch(kind)
            self._send(kind, items, body)
        self._depth.set(self.queue_depth)
        self._schedule_pump()

    def _next_kind(self) -> str:
        # Alternate between acks and envelopes when both wait.
        other = ENVELOPE if self._turn == ACK else ACK
        if self.queues[other]:
            self._turn = other
        return self._turn if self.queues[self._turn] else other

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
        self.queued_bytes[kind] -= sum(len(p) for p in parts)
        return parts, (opening + ",".join(parts) + closing).encode("utf-8")

    def _send(self, kind: str, items: list[str], body: bytes) -> None:
        self.inflight += 1
        path = REPLICATE_PATH if kind == ENVELOPE else ACK_PATH
        d = self._request("POST", path, body=body)
        d.addCallback(self._push_answered, kind, len(items))
        d.addErrback(self._push_failed, kind, items)
        d.addBoth(self._push_done)
        self._track(d)

    def _push_answered(self, answer: tuple[int, bytes], kind: str, n: int) -> None:
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
        for r in results:
            status_text = r.get("status") if isinstance(r, dict) else None
            if status_text in ok_statuses:
                ok += 1
            elif status_text == "rejected":
                rejected += 1
            else:
                errors += 1
        for outcome, count in (("ok", ok), ("rejected", rejected), ("error", errors)):
            if count:
                self._pushed[outcome].inc(count)
        if rejected:
            self.relay.log_agg.emit(
                self.log,
                "push_rejected:" + self.url,
                "peer {peer} rejected {n} pushed items",
                LogLevel.debug,
                peer=self.url,
                n=rejected,
            )
        self.last_push_outcome = "error" if errors else "rejected" if rejected else "ok"
        self.last_push_at = self.clock.seconds()
        self._mark(True)

    def _push_failed(self, f: Failure, kind: str, items: list[str]) -> None:
        if self._stopped and f.check(CancelledError):
            return
        if f.check(Throttled):
            self._requeue(kind, items)
            return
        n = len(items)
        self._pushed["error"].inc(n)
        self.last_push_outcome = "error"
        self.last_push_at = self.clock.seconds()
        self._mark(False, f"push failed: {_describe(f)}")

    def _requeue(self, kind: str, items: list[str]) -> None:
        """A rate-limited batch goes back to the head of its queue; pushing pauses briefly."""
        self.paused_until = self.clock.seconds() + THROTTLE_PAUSE
        self.last_push_outcome = "throttled"
        self.last_push_at = self.clock.seconds()
        if self.queue_depth + len(items) > self.queue_max:
            self._dropped.inc(len(items))
            self.log.warn(
                "push queue for peer {peer} full: dropped {n} items; sync will repair", peer=self.url, n=len(items)
            )
            return
        self.queues[kind].extendleft(reversed(items))
        self.queued_bytes[kind] += sum(len(i) for i in items)
        self._depth.set(self.queue_depth)

    def _push_done(self, _: Any) -> None:
        self.inflight -= 1
        self._schedule_pump()

    # ------------------------------------------------------------------ sync

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
        self._sync_tick()

    def _sync_tick(self) -> None:
        self._sync_call = None
        if self._stopped or self._syncing:
            return
        self._syncing = True
        d = Deferred.fromCoroutine(self._sync_run())
        d.addCallbacks(self._sync_ended, self._sync_failed)
        self._track(d)

    def _schedule_sync(self, delay: float) -> None:
        self._syncing = False
        if not self._stopped:
            self._sync_call = self.clock.callLater(delay, self._sync_tick)

    def _sync_ended(self, outcome: str) -> None:
        self.last_sync_outcome = outcome
        self.last_sync_at = self.clock.seconds()
        self.backoff = 0.0
        self._schedule_sync(0 if outcome == "partial" else self.interval)

    def _sync_failed(self, f: Failure) -> None:
        if self._stopped and f.check(CancelledError):
            self._syncing = False
            return
        self.last_sync_outcome = "error"
        self.last_sync_at = self.clock.seconds()
        self.backoff = min(float(self.interval), max(MIN_BACKOFF, self.backoff * 2))
        if f.check(PeerError):
            self._mark(False, f"sync failed: {_describe(f)}")
        elif f.check(StoreError):
            self.log.error("sync from peer {peer} stopped: {err}", peer=self.url, err=f.value)
        else:
            self.log.failure("sync from peer {peer} failed", f, peer=self.url)
        self._schedule_sync(self.backoff)

    async def _lease(self) -> bool:
        return await shield(self.store.acquire_lease("sync:" + self.url, self.holder, self.lease_ttl))

    async def _sync_run(self) -> str:
        if not await self._lease():
            self.metrics.sync_pull_total.labels(self.url, "skipped").inc()
            return "skipped"
        cursor = await shield(self.store.get_cursor(self.url))
        feed = cursor.feed_id if cursor is not None else ""
        since = cursor.since if cursor is not None else 0
        synced_at = cursor.synced_at if cursor is not None else 0.0
        if synced_at and (self.synced_at is None or synced_at > self.synced_at):
            self.synced_at = synced_at
        # A pipeline two pages deep: while page N is verified and stored, page
        # N+1 is already being fetched (the peer builds it meanwhile) and then
        # parsed.  The durable cursor only ever moves past a page whose items
        # are all applied, in order.
        prefetch: Deferred[Page] | None = None
        applying: tuple[Deferred[None], Page] | None = None
        pages = 0
        try:
            while True:
                if pages and not await self._lease():
                    if applying is not None:
                        synced_at = await self._finish(applying, synced_at)
                        applying = None
                    return "skipped"
                if prefetch is None:
                    prefetch = self._pull_page(since)
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
                    prefetch = self._pull_page(since)
                if applying is not None and applying[1].acks:
                    # This page's envelopes must not overtake the previous
                    # page's acks (see _apply): let those finish first.
                    synced_at = await self._finish(applying, synced_at)
                    applying = None
                # The new page's apply is held in ``applying`` before anything
                # is awaited, so the cleanup below cancels it if that fails.
                previous, applying = applying, (Deferred.fromCoroutine(self._apply(page)), page)
                if previous is not None:
                    synced_at = await self._finish(previous, synced_at)
                if last:
                    synced_at = await self._finish(applying, synced_at)
                    applying = None
                    return "ok" if not page.more else "partial"
        finally:
            for pending in (prefetch, applying[0] if applying is not None else None):
                if pending is not None:
                    pending.addErrback(lambda _: None)
                    pending.cancel()

    async def _finish(self, applying: tuple[Deferred[None], Page], synced_at: float) -> float:
        """Wait for a page's items to be applied, then move the durable cursor past it."""
        done, page = applying
        await done
        if not page.more:
            synced_at = self.clock.seconds()
            self.synced_at = synced_at
        await shield(self.store.set_cursor(Cursor(self.url, page.feed, page.next, synced_at)))
        return synced_at

    def _pull_page(self, since: int) -> Deferred[Page]:
        return Deferred.fromCoroutine(self._pull(since, self.page_limit))

    async def _pull(self, since: int, limit: int, mailbox: str | None = None) -> Page:
        """GET one changes page; counts ``sync_pull_total`` (ok/error)."""
        query = f"since={since}&limit={limit}" + (f"&mailbox={mailbox}" if mailbox else "")
        if self.policy_peer is not None and self.policy_peer.speaks_v3:
            query += "&ext=1"  # v3: envelopes with their permit and stamp
        try:
            status, body = await self._request("GET", CHANGES_PATH, query, cap=self.max_page_response)
            if status != 200:
                raise PeerError(f"HTTP {status}")
            page = parse_page(loads_json(body), since, limit)
        except CancelledError:
            raise
        except Exception as e:
            self.metrics.sync_pull_total.labels(self.url, "error").inc()
            if isinstance(e, PeerError):
                raise
            raise PeerError(_describe(Failure(e))) from e
        self.metrics.sync_pull_total.labels(self.url, "ok").inc()
        self._mark(True)
        return page

    async def _apply(self, page: Page) -> None:
        """Treat every item like a replica (idempotent); the acks first.

        An ack only deletes and tombstones, so applying it early never changes
        the outcome, while an envelope applied before an ack that comes before
        it in the feed could meet a cap the ack frees at the peer, and a
        replica refused at a cap is never offered again.
        """
        if page.acks:
            self.metrics.sync_items_total.labels(self.url, ACK).inc(len(page.acks))
            await self.relay.accept_acks(page.acks)
        if page.envelopes:
            self.metrics.sync_items_total.labels(self.url, ENVELOPE).inc(len(page.envelopes))
            await self.relay.accept_replicas(page.envelopes)

    # ------------------------------------------------------------------ fetch_remote

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
        return self._track(d)

    async def _fetch_mailbox(self, mailbox: str) -> None:
        since = 0
        for _ in range(MAX_FETCH_PAGES):
            page = await self._pull(since, self.page_limit, mailbox)
            await self._apply(page)
            if not page.more:
                return
            since = page.next


class Replication:
    """Every peer's :class:`PeerClient`, wired to the relay's hooks."""

    log = Logger()

    def __init__(
        self,
        config: Config,
        relay: Relay,
        store: Store,
        metrics: Metrics,
        clock: Any,
        client_factory: ClientFactory,
    ) -> None:
        self.relay = relay
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.peers = [
            PeerClient(p, config, relay, store, metrics, client_factory(p), clock, self.holder) for p in config.peers
        ]
        # v3: each peer's policy push and pull, over that peer's signed transport.
        for peer in self.peers:
            peer.policy_peer = PolicyPeer(peer.url, peer._request, relay, clock, config.sync.interval)
        self.running = False

    def start(self) -> None:
        if self.running:
            return
        self.running = True
        self.relay.envelope_listeners.append(self._on_envelope)
        self.relay.ack_listeners.append(self._on_ack)
        self.relay.remote_fetch = self.fetch_remote
        self.relay.policy_listeners.append(self._on_policy)
        for peer in self.peers:
            peer.start()
            if peer.policy_peer is not None:
                peer.policy_peer.start()

    def stop(self) -> None:
        if not self.running:
            return
        self.running = False
        if self._on_envelope in self.relay.envelope_listeners:
            self.relay.envelope_listeners.remove(self._on_envelope)
        if self._on_ack in self.relay.ack_listeners:
            self.relay.ack_listeners.remove(self._on_ack)
        if self.relay.remote_fetch == self.fetch_remote:
            self.relay.remote_fetch = None
        if self._on_policy in self.relay.policy_listeners:
            self.relay.policy_listeners.remove(self._on_policy)
        for peer in self.peers:
            peer.stop()
            if peer.policy_peer is not None:
                peer.policy_peer.stop()

    def _on_envelope(self, env: Any) -> None:
        text = env.raw
        # v3 (12.5): permit and stamp go only to peers that speak v3; the others get the v1 text.
        v1_text = env.raw_v1
        for peer in self.peers:
            v3 = peer.policy_peer is not None and peer.policy_peer.speaks_v3
            peer.enqueue(ENVELOPE, text if v3 else v1_text)

    def _on_policy(self, policy: Any) -> None:
        for peer in self.peers:
            if peer.policy_peer is not None:
                peer.policy_peer.push(policy)

    def _on_ack(self, ack: Any) -> None:
        text = dumps_json(ack.to_json()).decode("utf-8")
        for peer in self.peers:
            peer.enqueue(ACK, text)

    def fetch_remote(self, mailbox: str) -> Deferred[None]:
        """Pull ``mailbox`` from every peer; fires when all have answered or failed."""
        ds = [peer.fetch_mailbox(mailbox) for peer in self.peers]
        return DeferredList(ds, consumeErrors=True).addCallback(lambda _: None)

    def sync_now(self) -> None:
        for peer in self.peers:
            peer.sync_now()

    def update_gauges(self) -> None:
        """Refresh the per-peer gauges (the lag gauge is also computed at scrape time)."""
        for peer in self.peers:
            peer._depth.set(peer.queue_depth)

    def peer_status(self) -> list[dict[str, Any]]:
        """One dict per peer for the status page (None where unknown)."""
        return [
            {
                "url": p.url,
                "last_push_outcome": p.last_push_outcome,
                "last_push_at": p.last_push_at,
                "last_sync_outcome": p.last_sync_outcome,
                "last_sync_at": p.last_sync_at,
                "sync_lag_seconds": p.sync_lag(),
                "queue_depth": p.queue_depth,
                "inflight": p.inflight,
                "backoff_seconds": p.backoff,
            }
            for p in self.peers
        ]


class PooledHTTPClients:
    """The production client factory: one ``treq.HTTPClient`` on a persistent pool."""

    def __init__(self, reactor: Any, config: Config) -> None:
        from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory

        class QuietClientFactory(_HTTP11ClientFactory):
            # No "Starting factory" log line for every new peer connection.
            noisy = False

        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool._factory = QuietClientFactory
        # Pushes in flight plus the sync puller and a fetch_remote, per peer.
        self.pool.maxPersistentPerHost = config.sync.push_inflight_max + 2
        self.pool.cachedConnectionTimeout = 120
        agent = Agent(reactor, connectTimeout=config.sync.push_timeout, pool=self.pool)
        self.client = TreqHTTPClient(agent)  # type: ignore[arg-type]

    def __call__(self, peer: PeerConfig) -> HTTPClient:
        return cast(HTTPClient, self.client)

    def close(self) -> Deferred[None]:
        return self.pool.closeCachedConnections()
