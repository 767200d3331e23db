"""One node: store, relay core, APIs and the expiry sweeper, as a Service.

:class:`Node` is what ``makeService`` runs and what the in-memory tests build
(with a ``Clock``, an inline store from their ``store_factory`` and an inline
``Verifier``): the same object either way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.resource import Resource

from meshrelay import __version__
from meshrelay.api import ClientAPI
from meshrelay.config import Config, PeerConfig
from meshrelay.cors import CorsPolicy, CorsResource
from meshrelay.executor import ThreadExecutor
from meshrelay.fairness import AddressPolicy
from meshrelay.inbox import InboxResource
from meshrelay.logs import AggregatingLogger
from meshrelay.metrics import Metrics
from meshrelay.peer_api import PeerAPI
from meshrelay.peers import PeerAuthenticator
from meshrelay.ratelimit import RateLimiter
from meshrelay.relay import Relay
from meshrelay.replication import HTTPClient, PooledHTTPClients, Replication
from meshrelay.store import open_store
from meshrelay.store.base import Store
from meshrelay.store.migrations import LATEST_VERSION
from meshrelay.verifier import Verifier
from meshrelay.web import MeshSite, NodeRoot, body_caps_for


class Node(Service):
    """A meshrelay node: opens its store on construction, runs while started."""

    log = Logger()
    name = "meshrelay-node"

    def __init__(
        self,
        config: Config,
        reactor: Any,
        *,
        metrics: Metrics | None = None,
        store_factory: Callable[[Config, Any, Metrics], Store] = open_store,
        verifier: Verifier | None = None,
        peer_client_factory: Callable[[PeerConfig], HTTPClient] | None = None,
    ) -> None:
        self.config = config
        self.clock: Any = reactor
        self.metrics = metrics if metrics is not None else Metrics()
        for peer in config.peers:
            self.metrics.init_peer(peer.url)
        self.started_at = reactor.seconds()
        self.store = store_factory(config, reactor, self.metrics)
        threads = config.node.verify_threads
        if verifier is None:
            verifier = (
                Verifier(ThreadExecutor(reactor, threads, "meshrelay-verify"), max_inflight=threads)
                if threads
                else Verifier()
            )
        self.verifier = verifier
        self.relay = Relay(self.store, config, reactor, self.metrics, self.verifier)
        # The store logs per operation (a failing disk fails every write): aggregate it too.
        self.store.log = AggregatingLogger(self.store.log, self.relay.log_agg, "store:")
        # Read at every scrape: acks and tombstones change the stored total too, also
        # when an ack deletes nothing here.
        store = self.store
        self.metrics.stored_bytes.set_function(lambda: store.stats().bytes)
        # Deposits committed by other processes sharing the store wake our long-polls too.
        self.store.set_wake_callback(self.relay.wake, self.relay.waiting_mailboxes)
        lim = config.limits
        self.client_limiter = RateLimiter(lim.client_rate, lim.client_burst, reactor)
        #: deposit bytes per address (or, where the address means nothing, per sender and mailbox)
        self.deposit_limiter = RateLimiter(lim.deposit_bytes_rate, lim.deposit_bytes_burst, reactor)
        #: who a client is, for the per-address limits (meshrelay.fairness)
        self.address_policy = AddressPolicy(
            lim.trusted_proxies, lim.ipv4_prefix, lim.ipv6_prefix, config.node.listen_address_means_nothing
        )
        self.client_api = ClientAPI(
            self.relay,
            peer_count=lambda: len(config.peers),
            client_limiter=self.client_limiter,
            deposit_limiter=self.deposit_limiter,
        )
        self.peer_limiter = RateLimiter(lim.peer_rate, lim.peer_burst, reactor)
        #: mailbox-filtered changes (a peer's fetch_remote) draw from this budget, not peer_limiter
        self.peer_fetch_limiter = RateLimiter(lim.peer_fetch_rate, lim.peer_fetch_burst, reactor)
        self.peer_auth = PeerAuthenticator(config, self.store, self.metrics, reactor, self.relay.log_agg)
        self.peer_api = PeerAPI(
            self.relay, self.peer_auth, limiter=self.peer_limiter, fetch_limiter=self.peer_fetch_limiter
        )
        self.peer_resource: Resource | None = self.peer_api.resource()
        #: push and sync with the peers; None when there are none
        self.replication: Replication | None = None
        self._http_pool: PooledHTTPClients | None = None
        if config.peers:
            if peer_client_factory is None:
                self._http_pool = PooledHTTPClients(reactor, config)
                peer_client_factory = self._http_pool
            self.replication = Replication(config, self.relay, self.store, self.metrics, reactor, peer_client_factory)
        self.sweeper = LoopingCall(self.relay.sweep)
        self.sweeper.clock = reactor

    def resource(self, address_means_nothing: bool | None = None) -> Resource:
        """The public listener's resource: client API plus the peer API when present.

        ``address_means_nothing`` overrides ``node.listen_address_means_nothing`` (for another listener).
        """
        policy = self.address_policy
        if address_means_nothing is not None:
            policy = policy.with_address_meaning_nothing(address_means_nothing)
        client: Resource = self.client_api.resource()
        if self.config.web.inbox_dir:
            client = InboxResource(self.config.web.inbox_dir, client)
        root = NodeRoot(
            client,
            self.peer_resource,
            self.client_limiter,
            policy,
            self.deposit_limiter,
            metrics=self.metrics,
            log_agg=self.relay.log_agg,
        )
        # CORS wraps the whole root so that the per-address 429s carry it too (client routes only).
        return CorsResource(root, CorsPolicy(self.config.web.cors_origins))

    def site(self, address_means_nothing: bool | None = None, max_connections: int | None = None) -> MeshSite:
        """A public listener's site; by default the one of ``node.listen``."""
        lim = self.config.limits
        policy = self.address_policy
        if address_means_nothing is not None:
            policy = policy.with_address_meaning_nothing(address_means_nothing)
        return MeshSite(
            self.resource(policy.address_means_nothing),
            body_caps_for(lim.max_body_bytes, lim.max_replicate_body_bytes),
            access_log=self.config.node.access_log,
            metrics=self.metrics,
            reactor=self.clock,
            timeout=lim.idle_timeout,
            read_timeout=lim.read_timeout,
            max_connections=lim.max_connections if max_connections is None else max_connections,
            max_connections_per_address=lim.max_connections_per_address,
            policy=policy,
            log_agg=self.relay.log_agg,
        )

    def startService(self) -> None:
        super().startService()
        self.store.start()
        self.verifier.start()
        #: fires once the sweeper has stopped and its last sweep (if one was running) has ended
        self._swept = self.sweeper.start(self.config.node.sweep_interval, now=True)
        if self.replication is not None:
            self.replication.start()
        stats = self.store.stats()
        self.log.info(
            "meshrelay {version} node {url} started: {envelopes} envelopes ({bytes} bytes) stored, "
            "{peers} peers, durability={durability}",
            version=__version__,
            url=self.config.node.public_url,
            envelopes=stats.envelopes,
            bytes=stats.bytes,
            peers=len(self.config.peers),
            durability=self.config.node.durability,
        )
        migrated_from = self.store.migrated_from
        if migrated_from < LATEST_VERSION:
            self.log.info(
                "store schema migrated from version {old} to {new}"
                if migrated_from
                else "new store created (schema version {new})",
                old=migrated_from,
                new=LATEST_VERSION,
            )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self.replication is not None:
            self.replication.stop()
        swept: Deferred[Any] = succeed(None)
        if self.sweeper.running:
            swept = self._swept
            self.sweeper.stop()
        self.verifier.stop()
        self.relay.log_agg.stop()
        # A sweep in flight (several write transactions) ends before the store closes.
        d = swept.addBoth(lambda _: self.store.close() if self.store is not None else None)
        if self._http_pool is not None:
            pool = self._http_pool
            # Close the peer connections whatever the store did, and keep its outcome.
            d.addBoth(lambda result: pool.close().addCallback(lambda _: result))
        return d.addCallback(lambda _: self.log.info("meshrelay node stopped"))
