"""One node: store, relay core, APIs and the expiry sweeper, as a Service.

:class:`Node` is what ``makeService`` runs and what the in-memory tests build
(``threaded=False`` with a ``Clock``): the same object either way.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.resource import Resource

from meshrelay import __version__
from meshrelay.api import ClientAPI
from meshrelay.config import Config
from meshrelay.executor import ThreadExecutor
from meshrelay.metrics import Metrics
from meshrelay.relay import Relay
from meshrelay.store import open_store
from meshrelay.store.base import Store
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
        threaded: bool = True,
        metrics: Metrics | None = None,
        store: Store | None = None,
    ) -> None:
        self.config = config
        self.clock: Any = reactor
        self.metrics = metrics if metrics is not None else Metrics()
        self.started_at = reactor.seconds()
        self.store = store if store is not None else open_store(config, reactor, threaded, self.metrics)
        threads = config.node.verify_threads if threaded else 0
        self.verifier = (
            Verifier(ThreadExecutor(reactor, threads, "meshrelay-verify"), max_inflight=threads)
            if threads
            else Verifier()
        )
        self.relay = Relay(self.store, config, reactor, self.metrics, self.verifier)
        # Deposits committed by other processes sharing the store wake our long-polls too.
        self.store.set_wake_callback(self.relay.wake, self.relay.waiting_mailboxes)
        self.client_api = ClientAPI(self.relay, peer_count=lambda: len(config.peers))
        self.peer_resource: Resource | None = None
        self.sweeper = LoopingCall(self.relay.sweep)
        self.sweeper.clock = reactor

    def resource(self) -> Resource:
        """The public listener's resource: client API plus the peer API when present."""
        return NodeRoot(self.client_api.resource(), self.peer_resource)

    def site(self) -> MeshSite:
        lim = self.config.limits
        return MeshSite(
            self.resource(),
            body_caps_for(lim.max_body_bytes, lim.max_replicate_body_bytes),
            access_log=self.config.node.access_log,
            metrics=self.metrics,
        )

    def startService(self) -> None:
        super().startService()
        self.store.start()
        self.verifier.start()
        self.sweeper.start(self.config.node.sweep_interval, now=True)
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

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self.sweeper.running:
            self.sweeper.stop()
        self.verifier.stop()
        d = self.store.close() if self.store is not None else succeed(None)
        return d.addCallback(lambda _: self.log.info("meshrelay node stopped"))
