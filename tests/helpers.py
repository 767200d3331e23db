"""Shared test helpers: keys, signed bodies, and in-memory nodes driven by a Clock.

An in-memory node is the real :class:`~meshrelay.node.Node` with inline
executors (no threads) and a ``Clock``; requests go through ``StubTreq`` to the
node's real resource, so routes, the error table and the core all run, and
every Deferred fires synchronously.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from treq.testing import StubTreq
from twisted.internet.task import Clock

from meshrelay import envelope as E
from meshrelay.config import Config, LimitsConfig, NodeConfig, build_config
from meshrelay.node import Node

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
    raw: dict[str, Any] = {
        "node": {"data_dir": tmpdir, "public_url": public_url},
        "limits": limits,
    }
    if peers:
        raw["peers"] = peers
    return build_config(raw)


class MemNode:
    """A real node, in memory: Clock, inline store, StubTreq client."""

    def __init__(self, tmpdir: str, clock: Clock | None = None, config: Config | None = None, **limits: Any) -> None:
        self.clock = clock or Clock()
        if self.clock.seconds() == 0:
            self.clock.advance(T0)
        self.config = config or make_config(tmpdir, **limits)
        self.node = Node(self.config, self.clock, threaded=False)
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
        self.http.flush()
        results: list[Any] = []
        d.addBoth(results.append)
        assert results, "request did not complete"
        resp = results[0]
        if hasattr(resp, "raiseException"):
            resp.raiseException()
        content: list[bytes] = []
        self.http.content(resp).addBoth(content.append)
        self.http.flush()
        text = content[0]
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


__all__ = ["Identity", "MemNode", "T0", "make_config", "replace_limits", "LimitsConfig", "NodeConfig"]
