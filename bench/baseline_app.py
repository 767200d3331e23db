"""The deposit benchmark's baseline: a bare Klein app on one reactor.

It does what a relay must do at the very least for a deposit - decode the JSON
body, keep it (in a list), answer with a small JSON body - and nothing else: no
signature check, no disk.  Like a meshrelay node it has no per-request access
log, and it runs on the same (default, epoll) reactor in one process.

Run::

    python bench/baseline_app.py PORT

Routes: ``POST /api/mesh/dm/send`` (the deposit), ``GET /api/mesh/health``,
``GET /count`` (how many bodies it kept, to check a run).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from klein import Klein
from twisted.internet import reactor
from twisted.web.server import Site

app = Klein()
received: list[Any] = []


@app.route("/api/mesh/dm/send", methods=["POST"])
def send(request: Any) -> bytes:
    obj = json.loads(request.content.read())
    received.append(obj)
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps({"ok": True, "msg_id": obj.get("msg_id"), "duplicate": False}).encode()


@app.route("/api/mesh/health", methods=["GET"])
def health(request: Any) -> bytes:
    request.setHeader(b"Content-Type", b"application/json")
    return b'{"ok": true}'


@app.route("/count", methods=["GET"])
def count(request: Any) -> bytes:
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps({"count": len(received)}).encode()


def main(argv: list[str]) -> None:
    port = int(argv[1]) if len(argv) > 1 else 8099
    site = Site(app.resource())
    site.log = lambda request: None  # no access log, as meshrelay by default
    reactor.listenTCP(port, site, interface="127.0.0.1", backlog=1024)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main(sys.argv)
