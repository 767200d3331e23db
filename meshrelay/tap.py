"""``twistd meshrelay``: command-line options and the service tree.

::

    MultiService("meshrelay")
    +-- Node                         store, relay core, sweeper (replication when peered)
    +-- StreamServerEndpointService  public listener: client + peer API
    +-- StreamServerEndpointService  admin listener (loopback by default)

A bad config or a store that cannot be opened ends the process with one line
on stderr naming the key or the path, before anything listens.
"""

from __future__ import annotations

import gc
import sys
from typing import Any, cast

from OpenSSL.crypto import Error as CryptoError
from OpenSSL.SSL import Error as SSLError
from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import ILogObserver, Logger
from twisted.python import usage
from twisted.web.server import Site

from meshrelay import logs
from meshrelay.admin import AdminAPI
from meshrelay.config import CLI_OVERRIDES, Config, ConfigError, effective_values, is_onion_endpoint, load_config
from meshrelay.node import Node
from meshrelay.store.base import StoreError


class Options(usage.Options):
    synopsis = "[--config FILE] [--listen ENDPOINT] [--admin-listen ENDPOINT] [--data-dir DIR] [--public-url URL]"
    longdesc = "Run a meshrelay node. Command-line options override the config file."
    optParameters = [
        ["config", "c", None, "TOML config file (default: the embedded defaults)"],
        ["listen", None, None, "public listener endpoint, e.g. tcp:8080:interface=127.0.0.1"],
        ["admin-listen", None, None, "admin listener endpoint, e.g. tcp:9090:interface=127.0.0.1"],
        ["data-dir", None, None, "directory of the node's store"],
        ["public-url", None, None, "the URL peers know this node by"],
    ]

    def load(self) -> Config:
        """The effective config: the file (if any) with the command-line overrides."""
        return load_config(self["config"], {opt: self[opt] for opt in CLI_OVERRIDES})


log = Logger(namespace="meshrelay.tap")


class MeshrelayService(MultiService):
    """The top of the service tree; installs the configured log observer on the twistd application.

    It stops in order: first the listeners (no new requests; in-flight ones
    are answered or cut), then the node, which lets queued writes commit
    before it closes the store.
    """

    #: set by makeService for ``log_format = "json"``; None keeps twistd's own observer
    log_observer: Any = None

    def setServiceParent(self, parent: Any) -> None:
        observer = self.log_observer
        if observer is not None and hasattr(parent, "setComponent"):
            # twistd's AppLogger uses an ILogObserver component of the application
            # unless --logger was given.
            if parent.getComponent(ILogObserver, None) is None:
                parent.setComponent(ILogObserver, observer)
        super().setServiceParent(parent)

    def startService(self) -> None:
        super().startService()
        freeze_startup_objects()

    def stopService(self) -> Deferred[Any]:
        node = self.namedServices.get(Node.name)
        others = [s for s in reversed(list(self)) if s is not node]
        Service.stopService(self)
        first = DeferredList([maybeDeferred(s.stopService) for s in others])
        if node is None:
            return first
        return first.addCallback(lambda _: node.stopService())


def freeze_startup_objects() -> None:
    """Keep what the process built at start-up (modules, config, node, sites) out of the cyclic GC's passes.

    Those objects live as long as the process, yet every full collection walked all of them
    (about 65,000 in a node): under issue 10's attack soak a node ran one every ten seconds or
    so, each stopping its reactor for about 40 ms on the test machine, and the requests that
    arrived meanwhile waited.  ``gc.freeze`` moves them to the permanent generation (they are
    still freed by reference counting); a collection first drops start-up garbage.
    """
    gc.collect()
    gc.freeze()


def check_endpoints(config: Config, reactor: Any) -> None:
    """Raise ConfigError unless node.listen, node.admin_listen and each listeners[].endpoint are endpoint strings."""
    endpoints = [(f"node.{key}", getattr(config.node, key)) for key in ("listen", "admin_listen")]
    endpoints += [(f"listeners[{i}].endpoint", lst.endpoint) for i, lst in enumerate(config.listeners)]
    for where, endpoint in endpoints:
        # txtorcon's onion: parser dials tor's control port as it parses: check it on a
        # reactor that connects nowhere (strports.service parses it again for real).
        # Imported here: twisted.internet.testing brings trial with it, a tenth of the
        # node's import time, and only an onion listener needs it.
        if is_onion_endpoint(endpoint):
            from twisted.internet.testing import MemoryReactor

            probe: Any = MemoryReactor()
        else:
            probe = reactor
        try:
            serverFromString(probe, endpoint)
        except (ValueError, TypeError, KeyError) as e:
            raise ConfigError(f"{where}: not a valid endpoint ({e})") from None
        except OSError as e:  # an ssl: endpoint's certificate or key file
            raise ConfigError(f"{where}: not a valid endpoint (cannot read {e.filename}: {e.strerror})") from None
        except (SSLError, CryptoError) as e:  # ... or one that is not PEM
            raise ConfigError(f"{where}: not a valid endpoint (bad certificate or key: {e})") from None


def log_config_summary(config: Config) -> None:
    """One line naming what this node runs with (secrets masked; the full values as a field)."""
    n = config.node
    log.info(
        "config {source}: public_url={public_url} listen={listen} admin_listen={admin_listen} "
        "data_dir={data_dir} store={backend} durability={durability} log_format={log_format} peers={peers}",
        source=config.source or "(embedded defaults)",
        public_url=n.public_url,
        listen=n.listen,
        admin_listen=n.admin_listen,
        data_dir=n.data_dir,
        backend=config.store.backend,
        durability=n.durability,
        log_format=n.log_format,
        peers=", ".join(p.url for p in config.peers) or "none",
        config=effective_values(config),
    )


def _die(message: str) -> None:
    sys.stderr.write(f"meshrelay: {message}\n")
    sys.stderr.flush()
    raise SystemExit(1)


def _factory(site: Site) -> IProtocolFactory:
    # A Site provides IProtocolFactory (zope.interface), which mypy cannot see.
    return cast(IProtocolFactory, site)


def build_service(config: Config, reactor: Any) -> MultiService:
    """The whole service tree for ``config`` (opens the store)."""
    top = MeshrelayService()
    top.setName("meshrelay")
    try:
        node = Node(config, reactor)
    except StoreError as e:
        _die(str(e))
    node.setServiceParent(top)
    # strports.service: a port that cannot be bound stops twistd, not a half-started node.
    public = strports.service(config.node.listen, _factory(node.site()), reactor=reactor)
    public.setName("public")
    public.setServiceParent(top)
    admin_api = AdminAPI(node.metrics, node=node)
    if admin_api.sampler is not None:
        admin_api.sampler.setServiceParent(top)
    admin_site = Site(admin_api.resource())
    admin_site.log = lambda request: None  # type: ignore[method-assign]
    admin = strports.service(config.node.admin_listen, _factory(admin_site), reactor=reactor)
    admin.setName("admin")
    admin.setServiceParent(top)
    for i, listener in enumerate(config.listeners):
        site = node.site(listener.address_means_nothing, listener.max_connections or None)
        extra = strports.service(listener.endpoint, _factory(site), reactor=reactor)
        extra.setName(f"public-{i + 1}")
        extra.setServiceParent(top)
    return top


def makeService(options: Options, reactor: Any = None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    try:
        config = options.load()
    except ConfigError as e:
        _die(f"config error: {e}")
    try:
        check_endpoints(config, reactor)
    except ConfigError as e:
        _die(f"config error: {e}")
    top = build_service(config, reactor)
    assert isinstance(top, MeshrelayService)
    node = top.getServiceNamed(Node.name)
    assert isinstance(node, Node)
    # SIGHUP reads the file again, with the same command-line overrides (docs/operator.md "Reload the config").
    node.config_loader = options.load
    top.log_observer = logs.observer_for_twistd(config.node.log_format, getattr(options, "parent", None))
    log_config_summary(config)
    return top
