"""The helper child's side of :mod:`meshrelay.child`: read requests, answer them, in order.

Free of Twisted on purpose: a child imports only this module, the standard
library and what its work needs (the store writer: SQLite and the envelope
codec; the verifier: libsodium), so it is ready in a fraction of the time
the node's own imports take, and holds less memory.
"""

from __future__ import annotations

import gc
import pickle
import struct
import sys
from collections.abc import Callable
from typing import Any

#: every request and answer is a pickle behind its length (4 bytes, big-endian)
HEAD = struct.Struct(">I")


def call_main(argv: list[str]) -> int:
    """A :class:`ProcessExecutor`'s child: each request is ``(fn, args)``, answered with ``fn(*args)``."""

    def handle(request: Any) -> tuple[str, Any]:
        fn, args = request
        try:
            return ("ok", fn(*args))
        except Exception as e:
            return ("error", f"{type(e).__name__}: {e}")

    serve(handle)
    return 0


def serve(handle: Callable[[Any], tuple[str, Any]]) -> None:
    """The child's loop: each request on stdin is answered with ``handle(request)`` on stdout, until EOF.

    ``handle`` returns ``("ok", value)`` or ``("error", message)``.
    """
    # What is loaded now lives as long as the child: no full collection walks it again (a
    # collection's pause is a pause of every request queued behind it).
    gc.collect()
    gc.freeze()
    inp = sys.stdin.buffer
    out = sys.stdout.buffer
    while True:
        head = inp.read(4)
        if len(head) < 4:
            return
        (n,) = HEAD.unpack(head)
        outcome = handle(pickle.loads(inp.read(n)))
        data = pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)
        out.write(HEAD.pack(len(data)) + data)
        out.flush()
