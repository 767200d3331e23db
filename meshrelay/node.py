"""One node: store, relay core, APIs and the expiry sweeper, as a Service.

:class:`Node` is what ``makeService`` runs and what the in-memory tests build
(with a ``Clock``, an inline store from their ``store_factory`` and an inline
``Verifier``): the same object either way.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.resource import Resource

from meshrelay import __version__
from meshrelay.api import ClientAPI
from meshrelay.child import ProcessExecutor
from meshrelay.config import Config, ConfigChange, ConfigError, PeerConfig, diff_configs, keep_restart_values
from meshrelay.cors import CorsPolicy, CorsResource
from meshrelay.errors import Unavailable
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
from meshrelay.store import caps_from, open_store
from meshrelay.store.base import Store
from meshrelay.store.migrations import LATEST_VERSION
from meshrelay.verifier import Verifier
from meshrelay.web import HeldAnswers, MeshSite, NodeRoot, body_caps_for


@dataclass
class ReloadReport:
    """What one reload did."""

    #: every key that differs from the running config (secrets masked)
    changes: list[ConfigChange] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    @property
    def needs_restart(self) -> list[ConfigChange]:
        return [c for c in self.changes if not c.live]

    @property
    def applied(self) -> list[ConfigChange]:
        return [c for c in self.changes if c.live]


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
        #: configs applied since start-up (1: the start-up one); a reload adds one
        self.config_generation = 1
        self.metrics.config_generation.set(1)
        self.metrics.config_loaded_at.set(reactor.seconds())
        #: reads the config file again (with the command-line overrides) for a SIGHUP reload; None: no reload
        self.config_loader: Callable[[], Config] | None = None
        #: the SIGHUP handler before ours (restored on stop); None while ours is not installed
        self._previous_sighup: Any = None
        #: every public site and address policy made, to take a reloaded config's limits
        self._sites: list[tuple[MeshSite, int | None]] = []
        self._policies: list[AddressPolicy] = []
        self._cors: list[CorsResource] = []
        self._peer_client_factory = peer_client_factory
        for peer in config.peers:
            self.metrics.init_peer(peer.url)
        self.started_at = reactor.seconds()
        self.store = store_factory(config, reactor, self.metrics)
        threads = config.node.verify_threads
        if verifier is None:
            # an idle verifier checks a small signature on the reactor (meshrelay.verifier)
            inline = {"clock": reactor, "inline_counter": self.metrics.signature_checks_inline_total}
            if config.node.verifier == "process":
                verifier = Verifier(ProcessExecutor(reactor, "signature verifier", Unavailable), 2, **inline)
            elif threads:
                verifier = Verifier(ThreadExecutor(reactor, threads, "meshrelay-verify"), threads, **inline)
            else:
                verifier = Verifier()
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
        self._policies.append(self.address_policy)
        #: early over-share refusals waiting out limits.over_share_hold (released at stop)
        self.held = HeldAnswers(reactor, lim.max_waiting_polls, self.metrics.held_refusals)
        self.client_api = ClientAPI(
            self.relay,
            peer_count=lambda: len(self.config.peers),
            client_limiter=self.client_limiter,
            deposit_limiter=self.deposit_limiter,
            held=self.held,
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
            self.replication = self._make_replication(config)
        self.sweeper = LoopingCall(self.relay.sweep)
        self.sweeper.clock = reactor

    def _make_replication(self, config: Config) -> Replication:
        factory = self._peer_client_factory
        if factory is None:
            self._http_pool = PooledHTTPClients(self.clock, config)
            factory = self._http_pool
        return Replication(config, self.relay, self.store, self.metrics, self.clock, factory)

    def _policy_for(self, address_means_nothing: bool | None) -> AddressPolicy:
        if address_means_nothing is None:
            return self.address_policy
        policy = self.address_policy.with_address_meaning_nothing(address_means_nothing)
        self._policies.append(policy)
        return policy

    def resource(self, address_means_nothing: bool | None = None) -> Resource:
        """The public listener's resource: client API plus the peer API when present.

        ``address_means_nothing`` overrides ``node.listen_address_means_nothing`` (for another listener).
        """
        policy = self._policy_for(address_means_nothing)
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
            early=self.client_api.refuse_early,
        )
        # CORS wraps the whole root so that the per-address 429s carry it too (client routes only).
        cors = CorsResource(root, CorsPolicy(self.config.web.cors_origins))
        self._cors.append(cors)
        return cors

    def site(self, address_means_nothing: bool | None = None, max_connections: int | None = None) -> MeshSite:
        """A public listener's site; by default the one of ``node.listen``."""
        lim = self.config.limits
        policy = self._policy_for(address_means_nothing)
        site = MeshSite(
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
            drop_at_cap=lim.drop_at_connection_cap,
        )
        self._sites.append((site, max_connections))
        return site

    # ------------------------------------------------------------------ live reload

    def reconfigure(self, new: Config) -> ReloadReport:
        """Apply a new (validated) config to the running node; what cannot change live is reported.

        Connections, long-polls, push queues (of the peers that stay) and
        cursors are kept.  The keys of :data:`~meshrelay.config.RESTART_KEYS`
        keep their running values until a restart.
        """
        report = ReloadReport(changes=diff_configs(self.config, new))
        config = keep_restart_values(self.config, new)
        for peer in config.peers:
            if peer.url == config.node.public_url:
                raise ConfigError(f"peers: {peer.url} is this node's own node.public_url")
        lim = config.limits
        self.relay.reconfigure(config)
        self.store.caps = caps_from(config)
        self.client_limiter.reconfigure(lim.client_rate, lim.client_burst)
        self.deposit_limiter.reconfigure(lim.deposit_bytes_rate, lim.deposit_bytes_burst)
        self.peer_limiter.reconfigure(lim.peer_rate, lim.peer_burst)
        self.peer_fetch_limiter.reconfigure(lim.peer_fetch_rate, lim.peer_fetch_burst)
        for policy in self._policies:
            policy.reconfigure(lim.trusted_proxies, lim.ipv4_prefix, lim.ipv6_prefix)
        caps = body_caps_for(lim.max_body_bytes, lim.max_replicate_body_bytes)
        for site, own_max in self._sites:
            site.body_caps = caps
            site.access_log = config.node.access_log
            site.timeOut = lim.idle_timeout
            site.read_timeout = lim.read_timeout
            site.max_connections = lim.max_connections if own_max is None else own_max
            per_address = lim.max_connections_per_address
            if per_address:
                per_address = min(per_address, max(1, site.max_connections // 2))
            site.max_connections_per_address = per_address
            # keys may have changed (prefixes, trusted proxies) and caps too: block again from scratch
            site.synblock.enabled = lim.drop_at_connection_cap
            site.synblock.clear()
        cors = CorsPolicy(config.web.cors_origins)
        for resource in self._cors:
            resource.cors = cors
        self.held.max_held = lim.max_waiting_polls
        self.sweeper.interval = config.node.sweep_interval
        self.peer_auth.reconfigure(config)
        for peer in config.peers:
            self.metrics.init_peer(peer.url)
        if self.replication is None and config.peers:
            self.replication = self._make_replication(config)
            report.added = [p.url for p in config.peers]
            if self.running:
                self.replication.start()
        elif self.replication is not None:
            report.added, report.removed, report.changed = self.replication.reconfigure(config)
        self.config = config
        self.config_generation += 1
        self.metrics.config_generation.set(self.config_generation)
        self.metrics.config_loaded_at.set(self.clock.seconds())
        return report

    def reload(self) -> ReloadReport | None:
        """Read the config file again and apply it (SIGHUP); a config that fails leaves the running one.

        Logs one line either way; None when the new config was refused.
        """
        if self.config_loader is None:
            return None
        try:
            new = self.config_loader()
            report = self.reconfigure(new)
        except ConfigError as e:
            self.metrics.config_reloads.labels("failed").inc()
            self.log.error(
                "config reload failed, still running generation {generation}: {error}",
                generation=self.config_generation,
                error=str(e),
            )
            return None
        except Exception:
            # A bug, not a bad file: the new config may be partly applied; say so once, keep serving.
            self.metrics.config_reloads.labels("failed").inc()
            self.log.failure(
                "config reload failed part way (generation {generation})", generation=self.config_generation
            )
            return None
        self.metrics.config_reloads.labels("ok").inc()
        applied = ", ".join(c.key for c in report.applied) or "nothing"
        restart = ", ".join(c.key for c in report.needs_restart)
        self.log.info(
            "config reloaded (generation {generation}): applied {applied}"
            + ("; needs a restart, still the running value: {restart}" if restart else ""),
            generation=self.config_generation,
            applied=applied,
            restart=restart,
            changes=[c.__dict__ for c in report.changes],
        )
        return report

    def _on_sighup(self, signum: int, frame: Any) -> None:
        # A signal handler runs between two bytecodes of whatever the reactor thread was
        # doing: the reload itself runs as a reactor call.
        self.clock.callFromThread(self.reload)

    def startService(self) -> None:
        super().startService()
        if self.config_loader is not None and hasattr(signal, "SIGHUP"):
            previous = signal.signal(signal.SIGHUP, self._on_sighup)
            self._previous_sighup = previous if previous is not None else signal.SIG_DFL
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
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None
        if self.replication is not None:
            self.replication.stop()
        swept: Deferred[Any] = succeed(None)
        if self.sweeper.running:
            swept = self._swept
            self.sweeper.stop()
        self.verifier.stop()
        self.held.release_all()
        self.relay.log_agg.stop()
        # A sweep in flight (several write transactions) ends before the store closes.
        d = swept.addBoth(lambda _: self.store.close() if self.store is not None else None)
        if self._http_pool is not None:
            pool = self._http_pool
            # Close the peer connections whatever the store did, and keep its outcome.
            d.addBoth(lambda result: pool.close().addCallback(lambda _: result))
        return d.addCallback(lambda _: self.log.info("meshrelay node stopped"))
