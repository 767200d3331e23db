"""Experiment: where an honest deposit's time goes inside a node, and how late its reactor runs.

Loaded into a bench node through a prelude (``python bench/abuse.py --trace`` does it for each
node it starts); nothing here changes what the node does.  Two things are recorded:

- **each traced deposit** (``POST /api/mesh/dm/send`` from a client whose address starts with
  ``$MESHRELAY_TRACE_SOURCES``, comma-separated prefixes, default ``127.0.1.``: the soak's honest
  senders): when its first bytes were read, when the whole request was, when its write reached
  the store (``SQLiteStore._write``), when the batch holding it went to the writer, when the
  writer's answer came back and when the response was finished.  The segments between those
  moments tell the node's own parts of a deposit's latency apart: the read, the checks before
  the write, the wait for a pipeline slot, the writer (its queue, the batch, the trip through the
  pipe) and the answer.  What is not in them is the time before the reactor reads the request
  at all (see the loop lag) and everything outside the node (the client, the kernel).
- **the reactor's lateness**: a 5 ms repeating timer records how late each call comes (the
  loop lag); a request that arrives while the reactor is busy, or while the node has no core,
  waits about that long before it is read.

At reactor shutdown the figures are written as JSON to ``$MESHRELAY_TRACE_OUT``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from twisted.internet import reactor, task
from twisted.web import http

from meshrelay import web
from meshrelay.store import sqlite as store_sqlite

SOURCES = tuple(p for p in os.environ.get("MESHRELAY_TRACE_SOURCES", "127.0.1.").split(",") if p)
#: the moments of a traced deposit, in order; each segment runs from one to the next
MOMENTS = ("first", "received", "queued", "sent", "answered", "finished")
SEGMENTS = ("read", "checks", "slot", "writer", "answer")
TICK = 0.005

deposits: list[dict[str, float]] = []
lags: list[float] = []
_current: list[Any] = [None]
_by_deferred: dict[int, Any] = {}
now = time.monotonic


def _patch(cls: Any, name: str, make: Any) -> None:
    setattr(cls, name, make(getattr(cls, name)))


def _request_received(orig: Any) -> Any:
    def wrapped(self: Any, command: bytes, path: bytes, version: bytes) -> Any:
        channel = self.channel
        host = str(getattr(channel.transport.getPeer(), "host", ""))
        if path.startswith(b"/api/mesh/dm/send") and host.startswith(SOURCES):
            self.meshrelay_trace = {
                "first": getattr(channel, "meshrelay_trace_first", None) or now(),
                "received": now(),
            }
            _current[0] = self
        try:
            return orig(self, command, path, version)
        finally:
            _current[0] = None

    return wrapped


def _data_received(orig: Any) -> Any:
    def wrapped(self: Any, data: bytes) -> Any:
        if getattr(self, "meshrelay_trace_first", None) is None:
            self.meshrelay_trace_first = now()
        return orig(self, data)

    return wrapped


def _write(orig: Any) -> Any:
    def wrapped(self: Any, op: Any) -> Any:
        d = orig(self, op)
        request = _current[0]
        if request is not None and isinstance(op, tuple) and op[0] == "add":
            request.meshrelay_trace["queued"] = now()
            _by_deferred[id(d)] = request
        return d

    return wrapped


def _flush(orig: Any) -> Any:
    def wrapped(self: Any) -> Any:
        t = now()
        for _, d in self._pending:
            request = _by_deferred.get(id(d))
            if request is not None:
                request.meshrelay_trace["sent"] = t
        return orig(self)

    return wrapped


def _batch_done(orig: Any) -> Any:
    def wrapped(self: Any, outcome: Any, batch: Any) -> Any:
        t = now()
        for _, d in batch:
            request = _by_deferred.pop(id(d), None)
            if request is not None:
                request.meshrelay_trace["answered"] = t
        return orig(self, outcome, batch)

    return wrapped


def _finish(orig: Any) -> Any:
    def wrapped(self: Any) -> Any:
        channel = getattr(self, "channel", None)
        result = orig(self)
        if channel is not None:
            # the next request on this connection starts its own "first"
            channel.meshrelay_trace_first = None
        trace = getattr(self, "meshrelay_trace", None)
        if trace is not None and all(m in trace for m in MOMENTS[:-1]):
            trace["finished"] = now()
            deposits.append(trace)
        return result

    return wrapped


_patch(web.MeshRequest, "requestReceived", _request_received)
_patch(web.MeshChannel, "dataReceived", _data_received)
_patch(store_sqlite.SQLiteStore, "_write", _write)
_patch(store_sqlite.SQLiteStore, "_flush", _flush)
_patch(store_sqlite.SQLiteStore, "_batch_done", _batch_done)
_patch(http.Request, "finish", _finish)

_last = [0.0]


def _tick() -> None:
    t = now()
    lags.append(max(0.0, t - _last[0] - TICK))
    _last[0] = t


def _start() -> None:
    _last[0] = now()
    task.LoopingCall(_tick).start(TICK, now=False)


def _dump() -> None:
    out = os.environ.get("MESHRELAY_TRACE_OUT")
    if not out:
        return
    segments = {name: [d[MOMENTS[i + 1]] - d[MOMENTS[i]] for d in deposits] for i, name in enumerate(SEGMENTS)}
    segments["node"] = [d["finished"] - d["first"] for d in deposits]
    tmp = out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump({"deposits": len(deposits), "segments": segments, "loop_lag": lags}, fh)
    os.replace(tmp, out)


reactor.callWhenRunning(_start)  # type: ignore[attr-defined]
reactor.addSystemEventTrigger("before", "shutdown", _dump)  # type: ignore[attr-defined]
