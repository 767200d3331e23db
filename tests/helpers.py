"""Shared test helpers: keys, signed bodies, and in-memory nodes driven by a Clock.

An in-memory node is the real :class:`~meshrelay.node.Node` with inline
executors (no threads) and a ``Clock``; requests go through ``StubTreq`` to the
node's real resource, so routes, the error table and the core all run, and
every Deferred fires synchronously.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sqlite3
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.web.resource import Resource

from meshrelay import envelope as E
from meshrelay.config import Config, LimitsConfig, NodeConfig, build_config
from meshrelay.node import Node
from meshrelay.store import caps_from
from meshrelay.store.base import Store, tombstone_key
from meshrelay.store.sqlite import SQLiteStore
from meshrelay.verifier import Verifier

#: a fixed "now" for in-memory tests (2026-11-16)
T0 = 1_795_000_000


class Identity:
    """An Ed25519 identity: a mailbox owner or a sender."""

    def __init__(self) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.pub = E.public_key_b64u(self.key)

    def envelope(
        self, mailbox: Identity | str, text: bytes = b"hello", ts: int = T0, ttl: int = 3600
    ) -> dict[str, Any]:
        box = mailbox.pub if isinstance(mailbox, Identity) else mailbox
        return E.make_envelope(self.key, box, text, ts, ttl)

    def signed(self, ts: int = T0, ack: list[str] | tuple[str, ...] = (), nonce: bytes | None = None) -> dict[str, Any]:
        return E.make_signed_request(self.key, ts, nonce if nonce is not None else os.urandom(16), ack)

    def poll_body(self, ts: int = T0, ack: list[str] | tuple[str, ...] = (), **extra: Any) -> dict[str, Any]:
        body = self.signed(ts=ts, ack=ack)
        body.update(extra)
        return body


def make_config(
    tmpdir: str, peers: list[dict[str, Any]] | None = None, public_url: str = "http://a.test", **limits: Any
) -> Config:
    # One test client generates all the load from one address: no per-IP limit
    # unless a test asks for one.
    limits.setdefault("client_rate", 0)
    limits.setdefault("deposit_bytes_rate", 0)
    limits.setdefault("max_waiting_polls_per_address", 0)
    raw: dict[str, Any] = {
        "node": {"data_dir": tmpdir, "public_url": public_url},
        "limits": limits,
    }
    if peers:
        raw["peers"] = peers
    return build_config(raw)


class _Unreachable:
    """An HTTP client for a peer that is not there: every request is refused."""

    def request(self, method: str, url: str, **kw: Any) -> Deferred[Any]:
        return fail(ConnectionRefusedError(string="no such peer in this test"))


def _unreachable(peer: Any) -> _Unreachable:
    return _Unreachable()


def stub_answer(http: Any, d: Any) -> tuple[Any, bytes]:
    """The response to a StubTreq request ``d`` and its whole body, served synchronously."""
    http.flush()
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "request did not complete"
    resp = results[0]
    if hasattr(resp, "raiseException"):
        resp.raiseException()
    content: list[bytes] = []
    http.content(resp).addBoth(content.append)
    http.flush()
    return resp, content[0]


def inline_store(config: Config, reactor: Any, metrics: Any = None) -> Store:
    """A node's ``store_factory`` for the in-memory tests: the configured backend, every read and write inline."""
    if config.store.backend == "postgresql":
        from meshrelay.store.postgres import PostgresStore

        return PostgresStore(config.store.dsn, caps_from(config), reactor=reactor, metrics=metrics)
    return SQLiteStore(config.node.data_dir, caps_from(config), durability=config.node.durability, metrics=metrics)


def tkeys(*pairs: tuple[str, str]) -> list[bytes]:
    """The stored keys of the tombstones of ``(mailbox, msg_id)`` pairs, sorted as :func:`dump_live` lists them."""
    return sorted(tombstone_key(mb, m) for mb, m in pairs)


def dump_live(store: Any, now: int) -> dict[str, Any]:
    """The live envelope ids and tombstone keys of ``store`` (either backend), read on a connection of the test's own.

    A tombstone is stored by its key only (``tombstone_key(mailbox, msg_id)``, schema 6): compare with
    :func:`tkeys`.  On SQLite the keys of the ids a mailbox's oldest live junk ack lists are
    tombstones too (schema 8: a mailbox's first junk ack keeps its ids in its row).
    """
    sqlite = isinstance(store, SQLiteStore)
    if sqlite:
        conn: Any = contextlib.closing(sqlite3.connect(store.path))
        mark = "?"
    else:
        from meshrelay.store.postgres import connect

        conn, mark = connect(store.dsn, "tool"), "%s"
    with conn as c:
        envelopes = c.execute(f"SELECT msg_id FROM envelopes WHERE expires > {mark}", (now,)).fetchall()
        tombstones = {bytes(r[0]) for r in c.execute(f"SELECT digest FROM tombstones WHERE expires > {mark}", (now,))}
        if sqlite:
            oldest = c.execute(
                "SELECT f.mailbox, f.body FROM acks AS f WHERE f.junk = 1 AND f.expires > ? "
                "AND f.seq = (SELECT MIN(seq) FROM acks WHERE mailbox = f.mailbox)",
                (now,),
            ).fetchall()
            for mailbox, body in oldest:
                tombstones.update(tombstone_key(mailbox, m) for m in json.loads(body)["ack"])
    return {"envelopes": sorted(r[0] for r in envelopes), "tombstones": sorted(tombstones)}


class MemNode:
    """A real node, in memory: Clock, inline store, StubTreq client."""

    def __init__(
        self,
        tmpdir: str,
        clock: Clock | None = None,
        config: Config | None = None,
        peer_client_factory: Any = None,
        **limits: Any,
    ) -> None:
        self.clock = clock or Clock()
        if self.clock.seconds() == 0:
            self.clock.advance(T0)
        self.config = config or make_config(tmpdir, **limits)
        if peer_client_factory is None and self.config.peers:
            # Peers that nobody wired up are unreachable (never a real socket).
            peer_client_factory = _unreachable
        self.node = Node(
            self.config,
            self.clock,
            store_factory=inline_store,
            verifier=Verifier(),
            peer_client_factory=peer_client_factory,
        )
        self.node.startService()
        self.relay = self.node.relay
        self.store = self.node.store
        self.metrics = self.node.metrics
        self.http = StubTreq(self.node.resource())

    def request(
        self, method: str, path: str, body: Any = None, raw: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        """Send a request and return ``(status, decoded JSON body)``; it must complete."""
        d = self.start_request(method, path, body, raw, headers)
        self.http.flush()
        return self.result(d)

    def start_request(
        self, method: str, path: str, body: Any = None, raw: bytes | None = None, headers: dict[str, str] | None = None
    ) -> Any:
        hdrs = {"Content-Type": "application/json"}
        hdrs.update(headers or {})
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        return self.http.request(method, "http://a.test" + path, data=data, headers=hdrs)

    def result(self, d: Any) -> tuple[int, Any]:
        resp, text = stub_answer(self.http, d)
        return resp.code, (json.loads(text) if text else None)

    def send(self, env: dict[str, Any]) -> tuple[int, Any]:
        return self.request("POST", "/api/mesh/dm/send", env)

    def poll(self, who: Identity, **kw: Any) -> tuple[int, Any]:
        ack = kw.pop("ack", ())
        ts = kw.pop("ts", int(self.clock.seconds()))
        return self.request("POST", "/api/mesh/dm/poll", who.poll_body(ts=ts, ack=ack, **kw))

    def stop(self) -> None:
        self.node.stopService()


def replace_limits(config: Config, **kw: Any) -> Config:
    return config.replace(limits=dataclasses.replace(config.limits, **kw))


# --------------------------------------------------------------------------- in-memory meshes


class _Answer(Resource):
    """A peer that answers every request with one error status."""

    isLeaf = True

    def __init__(self, status: int, code: str) -> None:
        super().__init__()
        self.status = status
        self.body = json.dumps({"ok": False, "error": code, "detail": "test peer"}).encode()

    def render(self, request: Any) -> bytes:
        request.setResponseCode(self.status)
        request.setHeader(b"Content-Type", b"application/json")
        return self.body


class V1OnlyPeer(Resource):
    """A test double of a node that speaks wire v1 only, in front of a real node's resource.

    No ``features`` or ``bodies`` route (404 as for any unknown path, before
    auth), ``ids`` is an unknown ``changes`` parameter (400 after routing, as a
    v1 node refuses it), and the node's v1 pages are not bounded in bytes.
    """

    isLeaf = True

    def __init__(self, node: MemNode) -> None:
        super().__init__()
        self.node = node

    def render(self, request: Any) -> Any:
        path = request.uri.split(b"?", 1)[0]
        if path in (b"/api/mesh/dm/features", b"/api/mesh/dm/bodies"):
            return _Answer(404, "not_found").render(request)
        if path == b"/api/mesh/dm/changes" and b"ids" in request.args:
            return _Answer(400, "bad_request").render(request)
        return self.node.node.resource().render(request)


class V3Peer(Resource):
    """A test double of a node that speaks wire v1-v3 but not v4 (no ``held`` lists), in front of a real node.

    ``features`` lists versions 1-3; what a v3 node refuses with 400 (a ``held``
    parameter of ``changes``, a ``held`` key of ``bodies``, a ``held`` list in a
    pushed ack, a v5 ``inc`` parameter) is refused the same way and recorded in
    ``offers`` (a conforming v4 or v5 node never sends it any).
    """

    isLeaf = True

    def __init__(self, node: MemNode, offers: list[str]) -> None:
        super().__init__()
        self.node = node
        self.offers = offers

    def render(self, request: Any) -> Any:
        path = request.uri.split(b"?", 1)[0]
        if path == b"/api/mesh/dm/features":
            request.setHeader(b"Content-Type", b"application/json")
            return json.dumps(
                {"ok": True, "versions": [1, 2, 3], "page_bytes": 1048576, "max_ids": 5000, "max_bodies": 500}
            ).encode()
        body = request.content.read()
        request.content.seek(0)
        if b"held" in request.args or b'"held"' in body or b"inc" in request.args:
            self.offers.append(path.decode())
            return _Answer(400, "bad_request").render(request)
        return self.node.node.resource().render(request)


def make_v1_only(node: MemNode) -> None:
    """Make ``node`` behave as a v1 node: unbounded pages served, v1 requests only when it pulls."""
    node.node.peer_api.page_bytes = lambda: None  # type: ignore[method-assign]
    replication = node.node.replication
    if replication is not None:
        for peer in replication.peers:
            peer.puller.versions = (1,)
            peer.puller.features = None


def make_v3_only(node: MemNode) -> None:
    """Make ``node``'s pullers speak v1-v3 (they never ask for held lists)."""
    replication = node.node.replication
    if replication is not None:
        for peer in replication.peers:
            peer.puller.versions = (1, 2, 3)
            peer.puller.features = None


class Link:
    """One direction of a peer link: what node ``src`` uses as its HTTP client for ``dst``.

    ``mode`` is ``"up"`` (requests reach ``dst``'s real resource through a
    StubTreq), ``"down"`` (connection refused), ``"500"`` (an error answer),
    ``"429"`` (rate limited), ``"hang"`` (never answers; only the caller's
    timeout ends it) or ``"hold"`` (requests wait until :meth:`release`).
    """

    def __init__(self, mesh: Mesh, src: str, dst: str) -> None:
        self.mesh = mesh
        self.src = src
        self.dst = dst
        self.mode = "up"
        self.requests: list[tuple[str, str]] = []
        #: (method, url, body length) of every request
        self.sizes: list[tuple[str, str, int]] = []
        self.held: list[tuple[str, str, dict[str, Any], Deferred[Any]]] = []
        self._stub: StubTreq | None = None
        self._stub_node: Any = None
        self._broken = StubTreq(_Answer(500, "internal"))
        self._throttled = StubTreq(_Answer(429, "rate_limited"))

    def stub(self) -> StubTreq:
        target = self.mesh.nodes[self.dst]
        if self._stub is None or self._stub_node is not target:
            if self.dst in self.mesh.v1_only:
                resource: Resource = V1OnlyPeer(target)
            elif self.dst in self.mesh.v3_only:
                resource = V3Peer(target, self.mesh.held_offers)
            else:
                resource = target.node.resource()
            self._stub = StubTreq(resource)
            self._stub_node = target
        return self._stub

    def stubs(self) -> list[StubTreq]:
        return [s for s in (self._stub, self._broken, self._throttled) if s is not None]

    def request(self, method: str, url: str, **kw: Any) -> Deferred[Any]:
        self.requests.append((method, url))
        self.sizes.append((method, url, len(kw.get("data") or b"")))
        if self.mode == "down":
            return fail(ConnectionRefusedError(string=f"{self.dst} is down"))
        if self.mode == "hang":
            return Deferred()
        if self.mode == "500":
            return self._broken.request(method, url, **kw)  # type: ignore[no-any-return]
        if self.mode == "429":
            return self._throttled.request(method, url, **kw)  # type: ignore[no-any-return]
        if self.mode == "hold":
            d: Deferred[Any] = Deferred()
            self.held.append((method, url, kw, d))
            return d
        return self.stub().request(method, url, **kw)  # type: ignore[no-any-return]

    def release(self) -> None:
        """Deliver the held requests (those whose caller has not given up)."""
        held, self.held = self.held, []
        for method, url, kw, d in held:
            if not d.called:
                self.stub().request(method, url, **kw).chainDeferred(d)


def link_secret(a: str, b: str) -> str:
    return "secret-" + "-".join(sorted((a, b))) + "-0123456789abcdef"


class Mesh:
    """N in-memory nodes sharing one Clock, peered per a topology, wired by StubTreq.

    ``links`` is ``"full"`` or a list of ``(a, b)`` pairs (each a two-way peer
    link).  ``sync`` and ``limits`` apply to every node; ``overrides`` maps a
    node name to ``{section: {key: value}}`` for that node only.
    """

    def __init__(
        self,
        base_dir: str,
        names: tuple[str, ...] = ("a", "b", "c"),
        links: str | list[tuple[str, str]] = "full",
        sync: dict[str, Any] | None = None,
        limits: dict[str, Any] | None = None,
        overrides: dict[str, dict[str, dict[str, Any]]] | None = None,
        v1_only: tuple[str, ...] = (),
        v3_only: tuple[str, ...] = (),
    ) -> None:
        self.base_dir = base_dir
        #: nodes that speak wire v1 only (see :class:`V1OnlyPeer`)
        self.v1_only = v1_only
        #: nodes that speak wire v1-v3, not v4 (see :class:`V3Peer`), and the held lists offered to them
        self.v3_only = v3_only
        self.held_offers: list[str] = []
        self.clock = Clock()
        self.clock.advance(T0)
        self.names = names
        if links == "full":
            pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
        else:
            assert isinstance(links, list)
            pairs = links
        self.neighbours: dict[str, list[str]] = {n: [] for n in names}
        for a, b in pairs:
            self.neighbours[a].append(b)
            self.neighbours[b].append(a)
        # No push linger by default: settle() runs due calls without moving the
        # clock; tests of the linger itself set push_linger_ms.
        self.sync = {"interval": 30, "push_timeout": 10, "push_linger_ms": 0, **(sync or {})}
        self.limits = limits or {}
        self.overrides = overrides or {}
        self.links: dict[tuple[str, str], Link] = {}
        self.nodes: dict[str, MemNode] = {}
        self._generation: dict[str, int] = {}
        for name in names:
            self.nodes[name] = self._make(name)

    @staticmethod
    def url(name: str) -> str:
        return f"http://{name}.test"

    def name_of(self, url: str) -> str:
        return url.split("//", 1)[1].split(".", 1)[0]

    def config(self, name: str, data_dir: str) -> Config:
        raw: dict[str, Any] = {
            "node": {"data_dir": data_dir, "public_url": self.url(name)},
            "limits": dict(self.limits),
            "sync": dict(self.sync),
            "peers": [{"url": self.url(o), "secret": link_secret(name, o)} for o in self.neighbours[name]],
        }
        for section, table in self.overrides.get(name, {}).items():
            raw.setdefault(section, {}).update(table)
        if not raw["peers"]:
            del raw["peers"]
        return build_config(raw)

    def link(self, src: str, dst: str) -> Link:
        key = (src, dst)
        if key not in self.links:
            self.links[key] = Link(self, src, dst)
        return self.links[key]

    def _make(self, name: str) -> MemNode:
        gen = self._generation.get(name, 0)
        self._generation[name] = gen + 1
        data_dir = os.path.join(self.base_dir, f"{name}{gen}")
        node = MemNode(
            data_dir,
            clock=self.clock,
            config=self.config(name, data_dir),
            peer_client_factory=lambda peer: self.link(name, self.name_of(peer.url)),
        )
        if name in self.v1_only:
            make_v1_only(node)
        if name in self.v3_only:
            make_v3_only(node)
        return node

    def replace(self, name: str) -> MemNode:
        """Stop ``name`` and start a fresh node (new, empty store) at the same URL."""
        self.nodes[name].stop()
        self.nodes[name] = self._make(name)
        return self.nodes[name]

    def restart(self, name: str) -> MemNode:
        """Stop ``name`` and start it again on the same data dir, config and clock (a process restart).

        What it had in memory (push queues, requests in flight, replay caches) is gone; what it
        committed is not. Requests in flight to the old process never complete (their callers
        time out), as with a crash.
        """
        old = self.nodes[name]
        old.stop()
        self.nodes[name] = MemNode(
            old.config.node.data_dir,
            clock=self.clock,
            config=old.config,
            peer_client_factory=lambda peer: self.link(name, self.name_of(peer.url)),
        )
        if name in self.v1_only:
            make_v1_only(self.nodes[name])
        if name in self.v3_only:
            make_v3_only(self.nodes[name])
        return self.nodes[name]

    def __getitem__(self, name: str) -> MemNode:
        return self.nodes[name]

    def set_mode(self, src: str, dst: str, mode: str, both: bool = False) -> None:
        self.link(src, dst).mode = mode
        if both:
            self.link(dst, src).mode = mode

    def _stubs(self) -> list[StubTreq]:
        out = [n.http for n in self.nodes.values()]
        for link in self.links.values():
            out.extend(link.stubs())
        return out

    def settle(self, max_rounds: int = 10000) -> None:
        """Run every due call and move every byte between nodes until nothing moves."""
        for _ in range(max_rounds):
            moved = False
            for stub in self._stubs():
                for pump in list(stub._agent._pumps):
                    moved = pump.flush() or moved
                stub.flush()
            now = self.clock.seconds()
            due = any(c.getTime() <= now for c in self.clock.getDelayedCalls())
            if due:
                self.clock.advance(0)
            if not moved and not due:
                return
        raise AssertionError("the mesh did not settle")

    def advance(self, seconds: float, step: float = 1.0) -> None:
        """Move the shared clock forward in steps, settling after each."""
        self.settle()
        remaining = seconds
        while remaining > 0:
            dt = min(step, remaining)
            self.clock.advance(dt)
            remaining -= dt
            self.settle()

    def sync_all(self) -> None:
        """Run one sync pass on every node now and settle."""
        for n in self.nodes.values():
            if n.node.replication is not None:
                n.node.replication.sync_now()
        self.settle()

    def stop(self) -> None:
        for n in self.nodes.values():
            if n.node.running:
                n.stop()
        self.settle()


__all__ = [
    "Identity",
    "Link",
    "MemNode",
    "Mesh",
    "T0",
    "make_config",
    "replace_limits",
    "LimitsConfig",
    "NodeConfig",
]
