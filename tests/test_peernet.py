"""How a node dials a peer (meshrelay.peernet): direct, SOCKS5 through txtorcon, TLS; the config that chooses it.

In memory: the endpoints connect on a MemoryReactor and the bytes they write are read back, so
the tests see the SOCKS5 request (with the host *name*, never resolved here) and the TLS
ClientHello (with the name the certificate must carry).
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import tomllib

from twisted.internet.defer import TimeoutError
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import RequestGenerationFailed
from twisted.web.client import URI, RequestTransmissionFailed, ResponseFailed, ResponseNeverReceived
from txtorcon.socks import SocksError

from meshrelay import cli
from meshrelay.config import ConfigError, PeerConfig, build_config, diff_configs
from meshrelay.peernet import (
    MAX_ENDPOINTS,
    PeerEndpointFactory,
    Proxy,
    Route,
    describe_failure,
    parse_proxy,
    peer_route,
    read_ca_file,
)
from meshrelay.replication import PooledHTTPClients
from meshrelay.tap import check_endpoints
from tests.tlsca import TestCA

SECRET = "0123456789abcdef0123"


def dial(route: Route, url: bytes) -> tuple[MemoryReactorClock, Protocol, StringTransport]:
    """Connect ``url``'s endpoint for ``route``: the reactor, the connection's protocol and its transport."""
    reactor = MemoryReactorClock()
    endpoint = PeerEndpointFactory(reactor, route, connect_timeout=7).endpointForURI(URI.fromBytes(url))
    endpoint.connect(Factory.forProtocol(Protocol))
    reactor.advance(0)
    _host, _port, factory, timeout, _bind = reactor.tcpClients[0]
    assert timeout == 7
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return reactor, protocol, transport


def socks_reply_ok(protocol: Protocol, transport: StringTransport) -> bytes:
    """Answer the SOCKS5 greeting and CONNECT with success; return what the client sent."""
    greeting = transport.value()
    transport.clear()
    protocol.dataReceived(b"\x05\x00")  # no authentication
    request = transport.value()
    transport.clear()
    protocol.dataReceived(b"\x05\x00\x00\x01\x7f\x00\x00\x01\x1f\x90")  # succeeded, bound 127.0.0.1:8080
    return greeting + b"|" + request + b"|" + transport.value()


class ParseProxyTests(SynchronousTestCase):
    def test_socks5h(self) -> None:
        self.assertEqual(parse_proxy("socks5h://127.0.0.1:9050"), Proxy("127.0.0.1", 9050))
        self.assertEqual(parse_proxy(" SOCKS5H://Tor.Local:9150/ "), Proxy("tor.local", 9150))
        self.assertEqual(str(parse_proxy("socks5h://[::1]:1080")), "socks5h://[::1]:1080")

    def test_none_means_direct(self) -> None:
        self.assertIsNone(parse_proxy(""))
        self.assertIsNone(parse_proxy("none"))

    def test_refused(self) -> None:
        for text, needle in [
            ("socks5://127.0.0.1:9050", "use socks5h://"),
            ("socks4a://127.0.0.1:9050", "expected socks5h://host:port"),
            ("127.0.0.1:9050", "expected socks5h://host:port"),
            ("socks5h://127.0.0.1", "give the proxy's host and port"),
            ("socks5h://127.0.0.1:0", "give the proxy's host and port"),
            ("socks5h://127.0.0.1:99999", "bad port"),
            ("socks5h://user:pw@127.0.0.1:9050", "user names and passwords"),
            ("socks5h://127.0.0.1:9050/path", "nothing after the port"),
        ]:
            with self.assertRaises(ValueError) as e:
                parse_proxy(text)
            self.assertIn(needle, str(e.exception), text)


class DescribeFailureTests(SynchronousTestCase):
    def test_wrapped_reasons_are_named_not_dumped(self) -> None:
        """Every wrapper of the HTTP client (not only three of them) is unwrapped into one readable line."""
        lost = Failure(ConnectionLost())
        refused = Failure(ConnectionRefusedError("111: Connection refused."))
        for wrapper in (ResponseNeverReceived, ResponseFailed, RequestTransmissionFailed, RequestGenerationFailed):
            text = describe_failure(Failure(wrapper([lost, refused])))
            self.assertNotIn("Traceback", text, wrapper)
            self.assertIn("lost in a non-clean fashion", text)
            self.assertIn("Connection refused", text)
        self.assertEqual(
            describe_failure(Failure(ResponseNeverReceived([Failure(SocksError(lost))]))),
            "SocksError: Connection to the other side was lost in a non-clean fashion.",
        )
        self.assertEqual(describe_failure(Failure(TimeoutError())), "timed out")


class RouteTests(SynchronousTestCase):
    def test_peer_proxy_wins_and_none_overrides_the_default(self) -> None:
        url = "https://b.example"
        self.assertEqual(peer_route(url, default_proxy="socks5h://127.0.0.1:9050").proxy, Proxy("127.0.0.1", 9050))
        self.assertEqual(
            peer_route(url, proxy="socks5h://10.0.0.1:1080", default_proxy="socks5h://127.0.0.1:9050").proxy,
            Proxy("10.0.0.1", 1080),
        )
        self.assertIsNone(peer_route(url, proxy="none", default_proxy="socks5h://127.0.0.1:9050").proxy)
        self.assertIsNone(peer_route(url).proxy)

    def test_connect_keeps_the_urls_name_for_tls(self) -> None:
        self.assertEqual(peer_route("https://b.example:8443", connect="https://127.0.0.1:9443").tls_name, "b.example")
        self.assertEqual(peer_route("https://b.example:8443").tls_name, "")


class EndpointChoiceTests(SynchronousTestCase):
    def test_direct_http_dials_the_host(self) -> None:
        reactor, _, transport = dial(Route(), b"http://127.0.0.1:8081/mesh")
        self.assertEqual(reactor.tcpClients[0][:2], ("127.0.0.1", 8081))
        self.assertEqual(transport.value(), b"")  # plain TCP: nothing written before the request

    def test_direct_https_starts_tls_for_the_host(self) -> None:
        reactor, _, transport = dial(Route(), b"https://127.0.0.1:8443/")
        self.assertEqual(reactor.tcpClients[0][:2], ("127.0.0.1", 8443))
        hello = transport.value()
        self.assertEqual(hello[:1], b"\x16")  # a TLS handshake record: the ClientHello

    def test_https_sends_the_tls_name_of_the_route(self) -> None:
        _, _, transport = dial(Route(tls_name="b.example"), b"https://localhost:8443/")
        hello = transport.value()
        self.assertIn(b"b.example", hello)  # SNI names the peer of ``url``, not the dialled host
        self.assertNotIn(b"localhost", hello)

    def test_proxy_gets_the_name_unresolved(self) -> None:
        reactor, protocol, transport = dial(Route(proxy=Proxy("127.0.0.1", 9050)), b"http://abcdefgh.onion:8080/")
        self.assertEqual(reactor.tcpClients[0][:2], ("127.0.0.1", 9050))  # the proxy, not the peer
        sent = socks_reply_ok(protocol, transport)
        greeting, request, after = sent.split(b"|", 2)
        self.assertEqual(greeting, b"\x05\x01\x00")
        # CONNECT (1), address type 3 (a domain name), the name itself, port 8080
        self.assertEqual(request, b"\x05\x01\x00\x03" + bytes([len(b"abcdefgh.onion")]) + b"abcdefgh.onion\x1f\x90")
        self.assertEqual(after, b"")  # plain http: the request comes next, from the Agent

    def test_proxy_with_https_runs_tls_over_the_proxied_connection(self) -> None:
        _, protocol, transport = dial(Route(proxy=Proxy("127.0.0.1", 9050)), b"https://b.example:443/")
        _greeting, request, after = socks_reply_ok(protocol, transport).split(b"|", 2)
        self.assertIn(b"\x03\x09b.example\x01\xbb", request)
        self.assertEqual(after[:1], b"\x16")  # once the proxy says "connected", the ClientHello
        self.assertIn(b"b.example", after)

    def test_an_origin_endpoint_is_made_once_and_dials_every_time(self) -> None:
        """Agent asks for an endpoint per request: the factory reuses one per origin, and it dials anew each connect."""
        for route, url, dialled in (
            (Route(), b"http://127.0.0.1:8081/mesh", ("127.0.0.1", 8081)),
            (Route(), b"https://127.0.0.1:8443/", ("127.0.0.1", 8443)),
            (Route(proxy=Proxy("127.0.0.1", 9050)), b"http://abcdefgh.onion:8080/", ("127.0.0.1", 9050)),
        ):
            reactor = MemoryReactorClock()
            factory = PeerEndpointFactory(reactor, route, connect_timeout=7)
            endpoint = factory.endpointForURI(URI.fromBytes(url))
            self.assertIs(factory.endpointForURI(URI.fromBytes(url + b"other/path?q=1")), endpoint)
            other = factory.endpointForURI(
                URI.fromBytes(url.replace(b"127.0.0.1", b"127.0.0.2").replace(b"abcd", b"wxyz"))
            )
            self.assertIsNot(other, endpoint)
            for _ in range(2):
                endpoint.connect(Factory.forProtocol(Protocol))
            reactor.advance(0)
            self.assertEqual([c[:2] for c in reactor.tcpClients], [dialled, dialled])

    def test_the_endpoint_memory_is_bounded(self) -> None:
        factory = PeerEndpointFactory(MemoryReactorClock(), Route(), connect_timeout=7)
        for port in range(1, 2 * MAX_ENDPOINTS):
            factory.endpointForURI(URI.fromBytes(b"http://127.0.0.1:%d/" % port))
        self.assertLessEqual(len(factory._made), MAX_ENDPOINTS)

    def test_ca_file_is_the_trust_root(self) -> None:
        path = TestCA().write_ca(self.mktemp())
        factory = PeerEndpointFactory(MemoryReactorClock(), Route(ca_file=path), connect_timeout=5)
        self.assertIsNotNone(factory.trust_root)
        self.assertIsNone(PeerEndpointFactory(MemoryReactorClock(), Route(), 5).trust_root)  # system roots

    def test_read_ca_file_refuses_a_damaged_certificate(self) -> None:
        path = self.mktemp()
        with open(path, "wb") as fh:
            fh.write(b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n")
        with self.assertRaises(ValueError) as e:
            read_ca_file(path)
        self.assertIn("not a valid PEM certificate", str(e.exception))

    def test_read_ca_file_takes_every_certificate(self) -> None:
        path = self.mktemp()
        with open(path, "wb") as fh:
            for ca in (TestCA("one"), TestCA("two")):
                with open(ca.write_ca(path + ca.cert.subject.rfc4514_string()), "rb") as one:
                    fh.write(b"a comment\n" + one.read())
        self.assertEqual(len(read_ca_file(path)), 2)


class PooledClientsTests(SynchronousTestCase):
    def test_peers_with_the_same_route_share_a_client(self) -> None:
        cfg = build_config({"node": {"peer_proxy": "socks5h://127.0.0.1:9050"}})
        clients = PooledHTTPClients(MemoryReactorClock(), cfg)
        a = clients(PeerConfig(url="http://a.onion", secret=SECRET))
        b = clients(PeerConfig(url="http://b.onion", secret=SECRET))
        direct = clients(PeerConfig(url="http://c.example", secret=SECRET, proxy="none"))
        self.assertIs(a, b)
        self.assertIsNot(a, direct)
        self.assertEqual(len(clients.pools), 2)
        self.successResultOf(clients.close())


class ConfigTests(SynchronousTestCase):
    def peer(self, **extra: str) -> dict[str, object]:
        return {"peers": [{"url": "https://b.example", "secret": SECRET, **extra}]}

    def test_proxy_and_ca_file_keys(self) -> None:
        base = self.mktemp()
        os.makedirs(base)
        TestCA().write_ca(os.path.join(base, "ca.pem"))
        cfg = build_config(
            {**self.peer(proxy="socks5h://127.0.0.1:9050", ca_file="ca.pem"), "node": {"peer_proxy": ""}},
            base_dir=base,
        )
        self.assertEqual(cfg.peers[0].proxy, "socks5h://127.0.0.1:9050")
        self.assertEqual(cfg.peers[0].ca_file, os.path.join(os.path.abspath(base), "ca.pem"))
        self.assertEqual(build_config(self.peer()).peers[0].ca_file, "")

    def test_check_config_prints_proxy_and_ca_file(self) -> None:
        """``check-config`` shows the effective proxy settings (and still masks the secret)."""
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        TestCA().write_ca(os.path.join(base, "ca.pem"))
        path = os.path.join(base, "node.toml")
        with open(path, "w") as fh:
            fh.write(
                '[node]\npeer_proxy = "socks5h://127.0.0.1:9050"\n'
                f'[[peers]]\nurl = "https://b.example"\nsecret = "{SECRET}"\nproxy = "none"\nca_file = "ca.pem"\n'
            )
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            self.assertEqual(cli.main(["check-config", path]), 0)
        doc = tomllib.loads(out.getvalue())
        self.assertEqual(doc["node"]["peer_proxy"], "socks5h://127.0.0.1:9050")
        self.assertEqual(
            doc["peers"],
            [{"url": "https://b.example", "secret": "***", "proxy": "none", "ca_file": os.path.join(base, "ca.pem")}],
        )

    def test_reload_diff_marks_the_node_proxy_restart_only(self) -> None:
        """A reload applies a peer's own proxy and ca_file; node.peer_proxy needs a restart (read once)."""
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        TestCA().write_ca(os.path.join(base, "ca.pem"))
        old = build_config(self.peer(), base_dir=base)
        new = build_config(
            {**self.peer(proxy="socks5h://127.0.0.1:9050", ca_file="ca.pem"), "node": {"peer_proxy": "none"}},
            base_dir=base,
        )
        live = {c.key: c.live for c in diff_configs(old, new)}
        peer = "peers[https://b.example]"
        self.assertEqual(live, {"node.peer_proxy": False, f"{peer}.proxy": True, f"{peer}.ca_file": True})

    def test_bad_proxy_is_one_line(self) -> None:
        with self.assertRaises(ConfigError) as e:
            build_config(self.peer(proxy="socks5://127.0.0.1:9050"))
        self.assertTrue(str(e.exception).startswith("peers[0].proxy: "))

    def test_onion_listener_means_nothing_by_itself(self) -> None:
        cfg = build_config({"listeners": [{"endpoint": "onion:80:controlPort=9051:localPort=8081"}]})
        self.assertTrue(cfg.listeners[0].address_means_nothing)
        cfg = build_config({"node": {"listen": "onion:80:controlPort=9051:localPort=8081"}})
        self.assertTrue(cfg.node.listen_address_means_nothing)

    def test_onion_endpoint_parses_with_txtorcon(self) -> None:
        """check_endpoints accepts an ``onion:`` endpoint: txtorcon's parser is registered; no tor is dialled."""
        cfg = build_config({"listeners": [{"endpoint": "onion:80:controlPort=9051:localPort=8081"}]})
        reactor = MemoryReactorClock()
        check_endpoints(cfg, reactor)
        self.assertEqual(reactor.tcpClients, [])  # parsing alone does not dial tor's control port
        cli.check_endpoints(cfg)
        # docs/operator.md's listener, with a key file (read as the string is parsed)
        key_file = self.mktemp()
        with open(key_file, "w") as fh:
            fh.write("ED25519-V3:" + base64.b64encode(os.urandom(64)).decode() + "\n")
        documented = f"onion:80:controlPort=9051:localPort=8081:privateKeyFile={key_file}"
        check_endpoints(build_config({"listeners": [{"endpoint": documented}]}), reactor)
        missing = build_config({"listeners": [{"endpoint": documented + ".nope"}]})
        with self.assertRaises(ConfigError) as e:
            check_endpoints(missing, reactor)
        self.assertIn("listeners[0].endpoint: not a valid endpoint (cannot read", str(e.exception))
        self.assertEqual(reactor.tcpClients, [])
        # and a misspelt option is the endpoint's error, one line naming the key
        bad = build_config({"listeners": [{"endpoint": "onion:80:controlPort=9051:version=7"}]})
        with self.assertRaises(ConfigError) as e:
            check_endpoints(bad, reactor)
        self.assertIn("listeners[0].endpoint: not a valid endpoint", str(e.exception))

    def test_tls_listener_endpoint(self) -> None:
        """``ssl:`` listener strings with certificate files parse; a missing key file is a config error."""
        directory = self.mktemp()
        os.makedirs(directory)
        ca = TestCA()
        key, cert = ca.issue(directory)
        chain = ca.write_ca(os.path.join(directory, "chain.pem"))
        good = f"ssl:8443:interface=127.0.0.1:privateKey={key}:certKey={cert}"
        check_endpoints(build_config({"node": {"listen": good}}), MemoryReactorClock())
        with_chain = f"{good}:extraCertChain={chain}"  # as docs/operator.md "Serve TLS"
        check_endpoints(build_config({"node": {"listen": with_chain}}), MemoryReactorClock())
        missing = f"ssl:8443:interface=127.0.0.1:privateKey={key}.nope:certKey={cert}"
        with self.assertRaises(ConfigError) as e:
            check_endpoints(build_config({"node": {"listen": missing}}), MemoryReactorClock())
        self.assertIn("node.listen: not a valid endpoint (cannot read", str(e.exception))
        with open(key, "w") as fh:
            fh.write("not a key\n")
        with self.assertRaises(ConfigError) as e:
            check_endpoints(build_config({"node": {"listen": good}}), MemoryReactorClock())
        self.assertIn("node.listen: not a valid endpoint (bad certificate or key", str(e.exception))
