"""A loopback TCP proxy that can delay, cut and black-hole a link, for chaos tests and benchmarks.

One :class:`Link` forwards one directed peer link: node A's config says
``[[peers]] url = B, connect = "http://127.0.0.1:<link port>"``, so A's pushes,
sync pulls and remote fetches to B go through the link while B's identity and
path stay B's.  On command a link can:

- ``delay S``: hold every chunk, both ways, ``S`` seconds before passing it on
  (order is kept; lowering the delay never reorders what is already held);
- ``cut``: abort every open connection and abort each new one as soon as it is
  accepted (the dialer sees a reset at once);
- ``blackhole``: accept connections and swallow whatever arrives, both ways,
  never answering and never closing (only the dialer's timeouts end them);
  connections already open are swallowed from then on too;
- ``heal``: back to plain forwarding with no delay; held data is passed on at
  once, and connections that were black-holed are aborted (bytes were lost,
  so their streams cannot go on).

Run it in a reactor of your own (``Link(reactor, name, port)``), or as a child
process driven by :class:`ChaosProxy` over its stdin/stdout, one command per
line (``add NAME [PORT]``, ``target NAME PORT``, ``delay NAME S``, ``cut NAME``, ``blackhole NAME``,
``heal NAME``, ``stats [NAME]``, ``quit``; ``NAME`` may be ``*`` for every
link).  It listens on 127.0.0.1 only, forwards to 127.0.0.1 only, and stops by
itself when its stdin closes (the controller went away) or after
``--max-seconds``.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import time
from collections import deque
from typing import Any

from twisted.internet import protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.python.failure import Failure

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PASS = "pass"
CUT = "cut"
BLACKHOLE = "blackhole"
LOOPBACK = "127.0.0.1"
#: seconds the proxy waits for the target to accept a connection
CONNECT_TIMEOUT = 5


class _Side(protocol.Protocol):
    """One of a pipe's two TCP connections: ``"client"`` (the dialer) or ``"server"`` (the target)."""

    transport: Any

    def __init__(self, pipe: _Pipe, role: str) -> None:
        self.pipe = pipe
        self.role = role

    def connectionMade(self) -> None:
        self.pipe.side_made(self)

    def dataReceived(self, data: bytes) -> None:
        self.pipe.side_data(self, data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.pipe.side_lost(self)


class _Pipe:
    """One proxied connection: the dialer's side, the target's side and the data held between them."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.client: _Side | None = None
        self.server: _Side | None = None
        self.blackholed = False
        self.aborted = False
        self.server_up = False
        self.early: list[bytes] = []  # from the client before the target accepted
        #: per source role: (due time, bytes) waiting for the delay to pass
        self.held: dict[str, deque[tuple[float, bytes]]] = {"client": deque(), "server": deque()}
        self.timers: dict[str, Any] = {"client": None, "server": None}
        self.lost: set[str] = set()

    # -- events from the two sides

    def side_made(self, side: _Side) -> None:
        if side.role == "client":
            self.client = side
            link = self.link
            link.accepted += 1
            if link.mode == CUT:
                link.refused += 1
                self.abort()
                return
            if link.target_port == 0:
                link.connect_failures += 1
                self.abort()
                return
            link.pipes.add(self)
            if link.mode == BLACKHOLE:
                self.blackholed = True
                link.blackholed_connections += 1
                return
            self._dial()
        else:
            self.server = side
            self.server_up = True
            if self.aborted or "client" in self.lost:
                self.abort()
                return
            early, self.early = self.early, []
            for chunk in early:
                self._forward("client", chunk)
            assert self.client is not None and self.client.transport is not None
            self.client.transport.resumeProducing()

    def side_data(self, side: _Side, data: bytes) -> None:
        link = self.link
        if self.blackholed or self.aborted:
            link.swallowed_bytes += len(data)
            return
        if side.role == "client" and not self.server_up:
            self.early.append(data)
            return
        self._forward(side.role, data)

    def side_lost(self, side: _Side) -> None:
        self.lost.add(side.role)
        other = self._other(side.role)
        if other is not None and other.transport is not None and not self.held[side.role]:
            # Close the other side once what this side sent has been passed on.
            other.transport.loseConnection()
        if (side.role == "client" and self.server is None) or {"client", "server"} <= self.lost:
            self._forget()

    # -- plumbing

    def _other(self, role: str) -> _Side | None:
        return self.server if role == "client" else self.client

    def _dial(self) -> None:
        assert self.client is not None and self.client.transport is not None
        self.client.transport.pauseProducing()
        link = self.link
        endpoint = TCP4ClientEndpoint(link.reactor, LOOPBACK, link.target_port, timeout=CONNECT_TIMEOUT)
        d = connectProtocol(endpoint, _Side(self, "server"))

        def failed(f: Failure) -> None:
            link.connect_failures += 1
            self.abort()

        d.addErrback(failed)

    def _forward(self, source: str, data: bytes) -> None:
        link = self.link
        queue = self.held[source]
        if link.delay <= 0 and not queue:
            self._deliver(source, data)
            return
        now = link.reactor.seconds()
        due = now + max(0.0, link.delay)
        if queue and queue[-1][0] > due:
            due = queue[-1][0]
        queue.append((due, data))
        link.held_bytes += len(data)
        self._arm(source)

    def _arm(self, source: str) -> None:
        queue = self.held[source]
        timer = self.timers[source]
        if timer is not None and timer.active():
            return
        if not queue:
            return
        wait = max(0.0, queue[0][0] - self.link.reactor.seconds())
        self.timers[source] = self.link.reactor.callLater(wait, self._release, source, False)

    def _release(self, source: str, everything: bool) -> None:
        self.timers[source] = None
        queue = self.held[source]
        now = self.link.reactor.seconds()
        while queue and (everything or queue[0][0] <= now):
            _, data = queue.popleft()
            self.link.held_bytes -= len(data)
            self._deliver(source, data)
        if queue:
            self._arm(source)
        elif source in self.lost:
            other = self._other(source)
            if other is not None and other.transport is not None:
                other.transport.loseConnection()

    def _deliver(self, source: str, data: bytes) -> None:
        other = self._other(source)
        if other is None or other.transport is None or self.aborted:
            return
        other.transport.write(data)
        self.link.forwarded_bytes += len(data)

    def flush(self) -> None:
        """Pass on everything held now (after a heal or a lower delay)."""
        for source in ("client", "server"):
            timer = self.timers[source]
            if timer is not None and timer.active():
                timer.cancel()
            self._release(source, True)

    def drop_held(self) -> None:
        for source in ("client", "server"):
            timer = self.timers[source]
            if timer is not None and timer.active():
                timer.cancel()
            self.timers[source] = None
            for _, data in self.held[source]:
                self.link.held_bytes -= len(data)
                self.link.swallowed_bytes += len(data)
            self.held[source].clear()

    def abort(self) -> None:
        """Reset both connections (nothing more is passed on)."""
        self.aborted = True
        self.drop_held()
        for side in (self.client, self.server):
            if side is not None and side.transport is not None:
                side.transport.abortConnection()
        self._forget()

    def _forget(self) -> None:
        self.drop_held()
        self.link.pipes.discard(self)


class _LinkFactory(protocol.Factory):
    noisy = False

    def __init__(self, link: Link) -> None:
        self.link = link

    def buildProtocol(self, addr: Any) -> _Side:
        return _Side(_Pipe(self.link), "client")


class Link:
    """One directed link: listens on 127.0.0.1 and forwards to ``127.0.0.1:target_port``."""

    def __init__(self, reactor: Any, name: str, target_port: int) -> None:
        self.reactor = reactor
        self.name = name
        self.target_port = target_port
        self.mode = PASS
        self.delay = 0.0
        self.pipes: set[_Pipe] = set()
        self.port: Any = None
        # counters (stats)
        self.accepted = 0
        self.refused = 0
        self.blackholed_connections = 0
        self.connect_failures = 0
        self.forwarded_bytes = 0
        self.swallowed_bytes = 0
        self.held_bytes = 0

    def listen(self, port: int = 0) -> int:
        self.port = self.reactor.listenTCP(port, _LinkFactory(self), interface=LOOPBACK)
        return int(self.port.getHost().port)

    def set_delay(self, seconds: float) -> None:
        if not 0 <= seconds <= 3600:
            raise ValueError("delay must be within 0..3600 seconds")
        self.delay = float(seconds)
        if seconds == 0:
            for pipe in list(self.pipes):
                pipe.flush()

    def cut(self) -> None:
        self.mode = CUT
        for pipe in list(self.pipes):
            pipe.abort()

    def blackhole(self) -> None:
        self.mode = BLACKHOLE
        for pipe in list(self.pipes):
            if not pipe.blackholed:
                pipe.blackholed = True
                self.blackholed_connections += 1
                pipe.drop_held()

    def heal(self) -> None:
        self.mode = PASS
        self.delay = 0.0
        for pipe in list(self.pipes):
            if pipe.blackholed:
                pipe.abort()
            else:
                pipe.flush()

    def stop(self) -> Any:
        for pipe in list(self.pipes):
            pipe.abort()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None

    def stats(self) -> dict[str, Any]:
        host = self.port.getHost() if self.port is not None else None
        return {
            "name": self.name,
            "listen": f"{host.host}:{host.port}" if host is not None else None,
            "target": f"{LOOPBACK}:{self.target_port}",
            "mode": self.mode,
            "delay": self.delay,
            "open": len(self.pipes),
            "accepted": self.accepted,
            "refused": self.refused,
            "blackholed_connections": self.blackholed_connections,
            "connect_failures": self.connect_failures,
            "forwarded_bytes": self.forwarded_bytes,
            "swallowed_bytes": self.swallowed_bytes,
            "held_bytes": self.held_bytes,
        }


class Proxy:
    """The links of one proxy process, and the command interpreter."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.links: dict[str, Link] = {}

    def _select(self, name: str) -> list[Link]:
        if name == "*":
            return list(self.links.values())
        if name not in self.links:
            raise ValueError(f"no link named {name!r}")
        return [self.links[name]]

    def command(self, line: str) -> str:
        """Run one command line; returns the reply line (``ok ...`` or ``error ...``)."""
        words = line.split()
        if not words:
            return "error empty command"
        verb, args = words[0], words[1:]
        try:
            if verb == "add" and len(args) in (1, 2):
                name, target = args[0], int(args[1]) if len(args) == 2 else 0
                if name == "*" or name in self.links:
                    raise ValueError(f"bad or duplicate link name {name!r}")
                if not 0 <= target < 65536:
                    raise ValueError("bad target port")
                link = Link(self.reactor, name, target)
                port = link.listen()
                self.links[name] = link
                return f"ok {port}"
            if verb == "target" and len(args) == 2:
                (link,) = self._select(args[0])
                target = int(args[1])
                if not 0 < target < 65536:
                    raise ValueError("bad target port")
                link.target_port = target
                return "ok"
            if verb == "delay" and len(args) == 2:
                seconds = float(args[1])
                for link in self._select(args[0]):
                    link.set_delay(seconds)
                return "ok"
            if verb in ("cut", "blackhole", "heal") and len(args) == 1:
                for link in self._select(args[0]):
                    getattr(link, verb)()
                return "ok"
            if verb == "stats" and len(args) <= 1:
                links = self._select(args[0] if args else "*")
                return "ok " + json.dumps({link.name: link.stats() for link in links}, sort_keys=True)
            if verb == "quit" and not args:
                self.reactor.callLater(0, self.stop)
                return "ok"
        except ValueError as e:
            return f"error {e}"
        return f"error unknown command {line.strip()!r}"

    def stop(self) -> None:
        for link in self.links.values():
            link.stop()
        if self.reactor.running:
            self.reactor.stop()


def main(argv: list[str] | None = None) -> int:
    """The child process: links driven by commands on stdin, replies on stdout."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--max-seconds", type=float, default=3600.0, help="stop after this long whatever happens")
    args = parser.parse_args(argv)

    from twisted.internet import reactor as global_reactor
    from twisted.internet import stdio
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )
    from twisted.protocols.basic import LineReceiver

    # stdout carries the replies; warnings and errors (an unhandled error) go to stderr.
    # (Info is one "Starting factory" line per proxied connection.)
    only_warnings = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    observer = FilteringLogObserver(textFileLogObserver(sys.stderr), [only_warnings])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)

    reactor: Any = global_reactor

    proxy = Proxy(reactor)

    class Control(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line: bytes) -> None:
            reply = proxy.command(line.decode("utf-8", "replace"))
            self.sendLine(reply.encode())

        def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
            # The controller closed our stdin (or died): stop.
            if reactor.running:
                reactor.callLater(0, proxy.stop)

    stdio.StandardIO(Control())
    reactor.callLater(args.max_seconds, proxy.stop)
    reactor.run()
    return 0


class ProxyError(Exception):
    """The proxy answered ``error ...`` or did not answer."""


class ChaosProxy:
    """Controller for a proxy child process (blocking; one thread at a time)."""

    def __init__(self, log_path: str | None = None, max_seconds: float = 3600.0) -> None:
        self.log_path = log_path
        self.max_seconds = max_seconds
        self.proc: subprocess.Popen[bytes] | None = None
        self._buffer = b""
        self.ports: dict[str, int] = {}

    def start(self) -> ChaosProxy:
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.chaosproxy", "--max-seconds", str(self.max_seconds)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                cwd=REPO,
            )
        finally:
            if log is not subprocess.DEVNULL:
                log.close()  # type: ignore[union-attr]
        return self

    def command(self, line: str, timeout: float = 20.0) -> str:
        """Send one command and return what follows ``ok`` in the reply."""
        proc = self.proc
        if proc is None or proc.stdin is None or proc.stdout is None:
            raise ProxyError("the proxy is not running")
        proc.stdin.write(line.encode() + b"\n")
        proc.stdin.flush()
        deadline = time.monotonic() + timeout
        fd = proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProxyError(f"no answer to {line!r} within {timeout}s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise ProxyError(f"the proxy exited (code {proc.poll()}) while answering {line!r}")
                self._buffer += chunk
        reply, self._buffer = self._buffer.split(b"\n", 1)
        text = reply.decode()
        if text == "ok":
            return ""
        if text.startswith("ok "):
            return text[3:]
        raise ProxyError(f"{line!r}: {text}")

    def add(self, name: str, target_port: int = 0) -> int:
        """A new link to ``127.0.0.1:target_port`` (0: set later by :meth:`target`); returns its port."""
        port = int(self.command(f"add {name} {target_port}"))
        self.ports[name] = port
        return port

    def target(self, name: str, target_port: int) -> None:
        """Point a link at another port (new connections go there)."""
        self.command(f"target {name} {target_port}")

    def delay(self, name: str, seconds: float) -> None:
        self.command(f"delay {name} {seconds}")

    def cut(self, name: str) -> None:
        self.command(f"cut {name}")

    def blackhole(self, name: str) -> None:
        self.command(f"blackhole {name}")

    def heal(self, name: str = "*") -> None:
        self.command(f"heal {name}")

    def stats(self, name: str = "*") -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.command(f"stats {name}"))
        return result

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close(self, timeout: float = 10.0) -> int | None:
        """Ask the proxy to quit (closing its stdin does too); kill it if it does not."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        try:
            if proc.stdin is not None:
                proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
        return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
