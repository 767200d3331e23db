"""How a node dials its peers: directly or through a SOCKS5 proxy, with TLS for ``https``.

The peer HTTP client (:class:`meshrelay.replication.PooledHTTPClients`) builds one
``twisted.web.client.Agent`` per :class:`Route` with :meth:`Agent.usingEndpointFactory` and a
:class:`PeerEndpointFactory`, which picks the endpoint for each request:

- direct: a ``HostnameEndpoint`` to the URL's host and port;
- through a proxy (``socks5h://host:port``, e.g. Tor's SocksPort): txtorcon's
  ``TorSocksEndpoint`` (its SOCKS5 client; none is written here), which hands the host *name* to
  the proxy -- the node never resolves it, so ``.onion`` names work and no DNS query leaves it;
- for ``https``: the endpoint above wrapped in TLS (``wrapClientTLS``), the certificate verified
  against the system roots or a peer's own CA file (``ca_file``), for the name in the peer's
  ``url`` (also when ``connect`` dials somewhere else: a tunnel, a local proxy).

Only ``socks5h://`` is accepted: a ``socks5://`` proxy URL means "resolve locally" in curl's
convention, which would leak the peer's name to the local resolver and cannot reach ``.onion``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from OpenSSL.crypto import Error as CryptoError
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.ssl import Certificate, optionsForClientTLS, trustRootFromCertificates
from twisted.python.failure import Failure
from twisted.web.client import URI
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

#: endpoints one :class:`PeerEndpointFactory` keeps for reuse (an agent dials only its peers' origins)
MAX_ENDPOINTS = 256
#: ``proxy`` values that mean "dial directly" (a per-peer ``none`` overrides ``node.peer_proxy``)
NO_PROXY = ("", "none")

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def describe_failure(f: Failure) -> str:
    """One line saying why a request to a peer failed (for logs and ``/status``)."""
    if f.check(TimeoutError):
        return "timed out"
    reasons = getattr(f.value, "reasons", None)
    if isinstance(reasons, list) and reasons and all(isinstance(r, Failure) for r in reasons):
        # The Agent wraps what went wrong in a list of Failures (ResponseNeverReceived,
        # RequestGenerationFailed and the other _WrapperExceptions): say what it was.
        return "; ".join(describe_failure(r) for r in reasons)
    args: tuple[Any, ...] = tuple(getattr(f.value, "args", ()))
    if len(args) == 1 and isinstance(args[0], Failure):
        # e.g. txtorcon's SocksError(reason) when the proxy drops the connection
        return f"{type(f.value).__name__}: {describe_failure(args[0])}"
    return f.getErrorMessage() or f.type.__name__  # type: ignore[union-attr]


@dataclass(frozen=True)
class Proxy:
    """A SOCKS5 proxy that resolves host names itself (``socks5h://host:port``)."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"socks5h://{host}:{self.port}"


def parse_proxy(text: str) -> Proxy | None:
    """``socks5h://host:port`` -> :class:`Proxy`; ``""``/``"none"`` -> None; anything else ValueError."""
    text = text.strip()
    if text.lower() in NO_PROXY:
        return None
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme == "socks5":
        raise ValueError(
            f"{text!r}: use socks5h:// (the proxy resolves host names, .onion included; "
            "socks5:// would resolve them here)"
        )
    if scheme != "socks5h":
        raise ValueError(f"expected socks5h://host:port or 'none', got {text!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{text!r}: proxy user names and passwords are not supported")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{text!r}: expected socks5h://host:port with nothing after the port")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{text!r}: bad port") from None
    if not parts.hostname or port is None or port == 0:
        raise ValueError(f"{text!r}: give the proxy's host and port, e.g. socks5h://127.0.0.1:9050")
    return Proxy(parts.hostname, port)


def read_ca_file(path: str) -> list[Certificate]:
    """The PEM certificates in ``path``; OSError if it cannot be read, ValueError if it holds none."""
    with open(path, "rb") as fh:
        data = fh.read()
    blocks = _PEM_CERT.findall(data)
    if not blocks:
        raise ValueError(f"{path} holds no PEM certificate")
    try:
        return [Certificate.loadPEM(block) for block in blocks]
    except CryptoError as e:  # a damaged block
        raise ValueError(f"{path}: not a valid PEM certificate ({e})") from None


@dataclass(frozen=True)
class Route:
    """How one or more peers are dialled; peers with equal routes share an Agent and its pool."""

    #: None: direct
    proxy: Proxy | None = None
    #: PEM file of the CAs a peer's certificate must chain to; "": the system roots
    ca_file: str = ""
    #: the name the peer's certificate must carry; "": the host the request dials
    tls_name: str = ""


@implementer(IStreamClientEndpoint)
class QuietEndpoint:
    """An endpoint that connects its factories quiet: no "Starting factory" line per new peer connection."""

    def __init__(self, inner: IStreamClientEndpoint) -> None:
        self._inner = inner

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        if isinstance(protocolFactory, Factory):
            protocolFactory.noisy = False
        result: Deferred[IProtocol] = self._inner.connect(protocolFactory)
        return result


@implementer(IAgentEndpointFactory)
class PeerEndpointFactory:
    """The endpoint for each peer request of one :class:`Route` (direct or SOCKS5, TLS for https)."""

    def __init__(self, reactor: Any, route: Route, connect_timeout: float) -> None:
        self.reactor = reactor
        self.route = route
        self.connect_timeout = connect_timeout
        self.trust_root: Any = None
        if route.ca_file:
            self.trust_root = trustRootFromCertificates(read_ca_file(route.ca_file))
        #: endpoints made so far, by (scheme, host, port); see :meth:`endpointForURI`
        self._made: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        """The endpoint for ``uri``'s origin, made once and then reused.

        ``Agent`` asks for an endpoint on every request, even when its pool
        then hands it a cached connection; making a ``HostnameEndpoint`` (and
        for ``https`` the TLS options) each time was about a quarter of the
        cost of starting a push.  Endpoints connect any number of times, and
        an agent only ever dials its peers' few origins (bounded anyway).
        """
        key = (uri.scheme, uri.host, int(uri.port))
        endpoint = self._made.get(key)
        if endpoint is None:
            endpoint = self._make(uri)
            if len(self._made) >= MAX_ENDPOINTS:
                self._made.clear()
            self._made[key] = endpoint
        return endpoint

    def _make(self, uri: URI) -> IStreamClientEndpoint:
        if uri.scheme not in (b"http", b"https"):
            raise SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")
        host = uri.host.decode("ascii")
        endpoint = self.tcp_endpoint(host, int(uri.port))
        if uri.scheme == b"https":
            name = self.route.tls_name or host
            # trustRoot None: the platform's roots (optionsForClientTLS's default)
            creator = optionsForClientTLS(name, trustRoot=self.trust_root)
            endpoint = wrapClientTLS(creator, endpoint)
        return QuietEndpoint(endpoint)

    def tcp_endpoint(self, host: str, port: int) -> IStreamClientEndpoint:
        proxy = self.route.proxy
        if proxy is None:
            direct: IStreamClientEndpoint = HostnameEndpoint(self.reactor, host, port, timeout=self.connect_timeout)
            return direct
        from txtorcon.socks import TorSocksEndpoint

        # Quiet: TorSocksEndpoint connects a SOCKS factory of its own to the proxy for each connection.
        to_proxy = QuietEndpoint(HostnameEndpoint(self.reactor, proxy.host, proxy.port, timeout=self.connect_timeout))
        # The host name goes to the proxy as a name (SOCKS5 "domain name"), never resolved here.
        socks: IStreamClientEndpoint = TorSocksEndpoint(to_proxy, host, port)
        return socks


def peer_route(url: str, connect: str = "", proxy: str = "", default_proxy: str = "", ca_file: str = "") -> Route:
    """The :class:`Route` of a ``[[peers]]`` entry: its own ``proxy`` ("none": direct), else the node's default."""
    chosen = parse_proxy(proxy) if proxy.strip() else parse_proxy(default_proxy)
    # With ``connect``, the dialled host is a tunnel or a local proxy: the certificate still
    # has to name the peer of ``url``.
    tls_name = (urlsplit(url).hostname or "") if connect else ""
    return Route(proxy=chosen, ca_file=ca_file, tls_name=tls_name)
