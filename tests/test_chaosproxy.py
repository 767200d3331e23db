"""The chaos proxy (tests/chaosproxy.py): forwarding, delay, cut, black-hole, heal, and stopping by itself."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from twisted.trial.unittest import SynchronousTestCase

from tests.chaosproxy import ChaosProxy, ProxyError

pytestmark = pytest.mark.integration

#: failure guard for every wait (never a timing assertion)
GUARD = 20.0


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: EchoServer = self.server  # type: ignore[assignment]
        with server.lock:
            server.connections += 1
        while True:
            try:
                data = self.request.recv(65536)
            except OSError:
                return
            if not data:
                return
            with server.lock:
                server.received += len(data)
            self.request.sendall(data)


class EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Echo)
        self.lock = threading.Lock()
        self.connections = 0
        self.received = 0
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.server_address[1])


def wait_for(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + GUARD
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting: {what}")
        time.sleep(0.01)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    sock.settimeout(GUARD)
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the proxy closed or reset ``sock`` (waits at most GUARD seconds for it)."""
    sock.settimeout(GUARD)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


class ChaosProxyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.echo = EchoServer()
        self.addCleanup(self.echo.server_close)
        self.addCleanup(self.echo.shutdown)
        self.proxy = ChaosProxy(max_seconds=300).start()
        self.addCleanup(self.proxy.close)
        self.port = self.proxy.add("x", self.echo.port)

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=GUARD)
        self.addCleanup(sock.close)
        return sock

    def refused_or_closed(self) -> bool:
        """A new connection through the link is reset at once (maybe before connect() even returns)."""
        try:
            sock = self.connect()
        except ConnectionResetError:
            return True
        return closed_by_peer(sock)

    def stat(self, key: str) -> Any:
        return self.proxy.stats("x")["x"][key]

    def test_forwards_both_ways_on_loopback(self) -> None:
        """A healthy link passes bytes both ways, counts them, and listens on 127.0.0.1 only."""
        sock = self.connect()
        sock.sendall(b"ping")
        self.assertEqual(recv_exactly(sock, 4), b"ping")
        self.assertEqual(self.stat("forwarded_bytes"), 8)
        self.assertEqual(self.stat("listen"), f"127.0.0.1:{self.port}")

    def test_delay_holds_data_in_order_until_heal(self) -> None:
        """A delayed link holds what it gets (in order) and passes it all on when healed."""
        sock = self.connect()
        sock.sendall(b"warm")
        self.assertEqual(recv_exactly(sock, 4), b"warm")
        self.proxy.delay("x", 600)
        for part in (b"a", b"bb", b"ccc"):
            sock.sendall(part)
            time.sleep(0.02)  # separate chunks, not a timing assertion
        wait_for(lambda: self.stat("held_bytes") == 6, "the proxy to hold 6 bytes")
        self.assertEqual(self.echo.received, 4)  # nothing held reached the target
        self.proxy.heal("x")
        self.assertEqual(recv_exactly(sock, 6), b"abbccc")
        self.assertEqual(self.stat("held_bytes"), 0)

    def test_short_delay_keeps_order(self) -> None:
        """With a short delay every chunk arrives, in order, without a heal."""
        self.proxy.delay("x", 0.05)
        sock = self.connect()
        parts = [b"%d," % i for i in range(50)]
        for part in parts:
            sock.sendall(part)
        expected = b"".join(parts)
        self.assertEqual(recv_exactly(sock, len(expected)), expected)

    def test_cut_resets_open_and_new_connections_until_heal(self) -> None:
        """A cut aborts open connections and each new one; after heal new connections work."""
        sock = self.connect()
        sock.sendall(b"one")
        self.assertEqual(recv_exactly(sock, 3), b"one")
        self.proxy.cut("x")
        self.assertTrue(closed_by_peer(sock))
        self.assertTrue(self.refused_or_closed())
        self.assertGreaterEqual(self.stat("refused"), 1)
        self.assertEqual(self.echo.connections, 1)
        self.proxy.heal("x")
        again = self.connect()
        again.sendall(b"two")
        self.assertEqual(recv_exactly(again, 3), b"two")

    def test_blackhole_swallows_and_heal_closes_swallowed_streams(self) -> None:
        """A black-holed link accepts and swallows, never answers; heal aborts those streams and forwards again."""
        old = self.connect()
        old.sendall(b"one")
        self.assertEqual(recv_exactly(old, 3), b"one")
        self.proxy.blackhole("x")
        old.sendall(b"lost")
        new = self.connect()
        new.sendall(b"gone")
        wait_for(lambda: self.stat("swallowed_bytes") == 8, "8 swallowed bytes")
        self.assertEqual((self.echo.connections, self.echo.received), (1, 3))
        old.setblocking(False)
        self.assertRaises(BlockingIOError, old.recv, 1)  # still open, nothing answered
        self.proxy.heal("x")
        self.assertTrue(closed_by_peer(old))
        self.assertTrue(closed_by_peer(new))
        again = self.connect()
        again.sendall(b"back")
        self.assertEqual(recv_exactly(again, 4), b"back")

    def test_bad_commands_are_refused(self) -> None:
        """Unknown links, verbs and out-of-range delays answer an error; the proxy keeps running."""
        self.assertRaises(ProxyError, self.proxy.cut, "nope")
        self.assertRaises(ProxyError, self.proxy.delay, "x", -1)
        self.assertRaises(ProxyError, self.proxy.command, "explode x")
        self.assertRaises(ProxyError, self.proxy.add, "x", self.echo.port)
        self.assertTrue(self.proxy.running)
        self.assertEqual(self.stat("mode"), "pass")


class ChaosProxyLifetimeTests(SynchronousTestCase):
    def test_stops_when_its_controller_goes_away(self) -> None:
        """Closing the proxy's stdin (the controller quit or died) stops it."""
        proxy = ChaosProxy(max_seconds=300).start()
        proxy.add("x", 9)
        proc = proxy.proc
        assert proc is not None and proc.stdin is not None
        proc.stdin.close()
        self.assertEqual(proc.wait(GUARD), 0)
        proxy.proc = None

    def test_stops_by_itself_after_max_seconds(self) -> None:
        """Left alone, the proxy exits after --max-seconds."""
        proxy = ChaosProxy(max_seconds=0.5).start()
        self.addCleanup(proxy.close)
        proc = proxy.proc
        assert proc is not None
        self.assertEqual(proc.wait(GUARD), 0)
