"""The browser inbox, served by the node when ``web.inbox_dir`` names its built files.

The inbox (``clients/web/``) is a static page: the node serves the flat
directory ``web.inbox_dir`` at ``/inbox/`` and nothing else.  A file name is
one path segment of a restricted alphabet with a known extension, so no
request can reach outside that directory; sub-directories, dot files and
directory listings do not exist here.  Files are read on each request (a
rebuilt inbox is served at once); they are small.
"""

from __future__ import annotations

import os
import re
from typing import Any

from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from meshrelay.web import error_body, json_response, request_path

PREFIX = b"/inbox"

CONTENT_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".mjs": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".json": b"application/json",
    ".map": b"application/json",
    ".png": b"image/png",
    ".svg": b"image/svg+xml",
    ".ico": b"image/x-icon",
    ".txt": b"text/plain; charset=utf-8",
}

_NAME = re.compile(rb"[A-Za-z0-9][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]+)*")
#: the largest file served (the inbox bundle is well under 2 MiB)
MAX_FILE_BYTES = 16 * 1024 * 1024

#: The page loads only its own files and calls any node (connect-src); libsodium compiles WebAssembly.
CSP = (
    b"default-src 'none'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self'; img-src 'self' data:; "
    b"connect-src *; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


class InboxResource(Resource):
    """``/inbox/`` and ``/inbox/<file>`` from ``directory``; every other path goes to ``inner``."""

    isLeaf = True

    def __init__(self, directory: str, inner: Resource) -> None:
        super().__init__()
        self.directory = directory
        self.inner = inner

    def render(self, request: IRequest) -> Any:
        path = request_path(request)
        if path != PREFIX and not path.startswith(PREFIX + b"/"):
            return self.inner.render(request)
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"Allow", b"GET, HEAD")
            return json_response(request, 405, error_body("method_not_allowed", "the inbox is read with GET"))
        if path == PREFIX:
            request.setResponseCode(308)
            request.setHeader(b"Location", PREFIX + b"/")
            return b""
        name = path[len(PREFIX) + 1 :] or b"index.html"
        data = self._read(name)
        if data is None:
            return json_response(request, 404, error_body("not_found", "no such file in the inbox"))
        ext = os.path.splitext(name.decode("ascii"))[1]
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", CONTENT_TYPES[ext])
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Referrer-Policy", b"no-referrer")
        request.setHeader(b"Content-Security-Policy", CSP)
        return data

    def _read(self, name: bytes) -> bytes | None:
        if not _NAME.fullmatch(name) or os.path.splitext(name.decode("ascii"))[1] not in CONTENT_TYPES:
            return None
        full = os.path.join(self.directory, name.decode("ascii"))
        try:
            if not os.path.isfile(full) or os.path.getsize(full) > MAX_FILE_BYTES:
                return None
            with open(full, "rb") as fh:
                return fh.read(MAX_FILE_BYTES)
        except OSError:
            return None
