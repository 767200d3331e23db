"""CORS on the client API, so that a web page on another origin can call a node.

Only the client routes carry CORS headers (:data:`CLIENT_ROUTES`); peer
routes, unknown paths and the admin listener (another site altogether) never
do.  :class:`CorsResource` wraps the public listener's root, so every answer
of a client route carries the headers: the routes' own answers, the error
table's, and the per-address ``429`` of :class:`~meshrelay.web.NodeRoot`.
The ``413`` that :class:`~meshrelay.web.MeshRequest` writes before any
resource runs asks :func:`raw_headers` for the same lines.

Why ``*`` is a safe default: a client request is authorised by an Ed25519
signature inside its body, never by a cookie, an HTTP auth header or the
caller's network position, so a page on any origin can do exactly what any
program can, and nothing more.  No ``Access-Control-Allow-Credentials`` is
ever sent.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from meshrelay.web import request_path

#: client route -> the methods it serves (what a preflight may ask for)
CLIENT_ROUTES: dict[bytes, bytes] = {
    b"/api/mesh/dm/send": b"POST",
    b"/api/mesh/dm/poll": b"POST",
    b"/api/mesh/dm/count": b"POST",
    b"/api/mesh/health": b"GET",
    # version 3: a page reads a mailbox's policy and its owner sets one (signed by the mailbox key)
    b"/api/mesh/dm/policy": b"GET, POST",
}

#: response headers a page may read besides the CORS-safelisted ones
EXPOSE_HEADERS = b"Retry-After"
#: seconds a browser may cache a preflight answer (Chromium caps it at 7200)
PREFLIGHT_MAX_AGE = b"3600"


def normalize_origin(text: str) -> str:
    """An origin as browsers send it: ``scheme://host[:port]``, lower-case, no default port.

    Raises ``ValueError`` for anything else (a path, a query, userinfo, another scheme).
    """
    parts = urlsplit(text.strip())
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) origin: {text!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError(f"an origin is scheme://host[:port] only: {text!r}")
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port  # ValueError for a bad port
    default = 80 if scheme == "http" else 443
    return f"{scheme}://{host}" if port in (None, default) else f"{scheme}://{host}:{port}"


class CorsPolicy:
    """Which origins may call the client API: ``"*"`` (any), a comma-separated list, or ``""`` (none)."""

    def __init__(self, origins: str = "*") -> None:
        text = origins.strip()
        self.any_origin = text == "*"
        allowed: set[str] = set()
        if not self.any_origin:
            for item in text.split(","):
                if not item.strip():
                    continue
                if item.strip() == "*":
                    raise ValueError('"*" must be the only entry')
                allowed.add(normalize_origin(item))
        self.origins = frozenset(allowed)

    @property
    def enabled(self) -> bool:
        return self.any_origin or bool(self.origins)

    def allow_origin(self, origin: bytes | None) -> bytes | None:
        """The ``Access-Control-Allow-Origin`` value for a request from ``origin``, or None."""
        if self.any_origin:
            return b"*"
        if origin is None:
            return None
        try:
            # A browser sends the origin already normalised; normalising again makes
            # "https://Example.org:443" (a hand-written request) match as well.
            normal = normalize_origin(origin.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            return None
        return normal.encode("ascii") if normal in self.origins else None

    def headers(self, origin: bytes | None) -> list[tuple[bytes, bytes]]:
        """The CORS headers of an answer of a client route (not a preflight)."""
        out: list[tuple[bytes, bytes]] = []
        if not self.any_origin and self.origins:
            # The answer depends on Origin: caches must keep one copy per origin.
            out.append((b"Vary", b"Origin"))
        allowed = self.allow_origin(origin)
        if allowed is not None:
            out.append((b"Access-Control-Allow-Origin", allowed))
            out.append((b"Access-Control-Expose-Headers", EXPOSE_HEADERS))
        return out


def raw_headers(site: Any, path: bytes, origin: bytes | None) -> bytes:
    """CORS header lines (``Name: value\\r\\n``...) for an answer written raw on ``site``; b"" if none."""
    resource = getattr(site, "resource", None)
    policy = getattr(resource, "cors", None)
    if not isinstance(policy, CorsPolicy) or path not in CLIENT_ROUTES:
        return b""
    return b"".join(b"%s: %s\r\n" % pair for pair in policy.headers(origin))


class CorsResource(Resource):
    """The public listener's root with CORS for the client routes; everything else passes through.

    An ``OPTIONS`` request to a client route answers ``204`` with ``Allow``
    (and, for an allowed origin, the preflight headers) here, before the rate
    limits: it costs nothing and a refused preflight would hide the real
    answer's error code from the page.  For a disallowed origin the headers
    are left out, so the browser refuses the call; the node does not.
    """

    isLeaf = True

    def __init__(self, inner: Resource, policy: CorsPolicy) -> None:
        super().__init__()
        self.inner = inner
        self.cors = policy

    def render(self, request: IRequest) -> Any:
        methods = CLIENT_ROUTES.get(request_path(request))
        if methods is None:
            return self.inner.render(request)
        origin = request.getHeader(b"origin")
        for name, value in self.cors.headers(origin):
            request.setHeader(name, value)
        if request.method != b"OPTIONS":
            return self.inner.render(request)
        request.setResponseCode(204)
        request.setHeader(b"Allow", methods + b", OPTIONS")
        if self.cors.allow_origin(origin) is not None and request.getHeader(b"access-control-request-method"):
            request.setHeader(b"Access-Control-Allow-Methods", methods + b", OPTIONS")
            request.setHeader(b"Access-Control-Allow-Headers", b"Content-Type")
            request.setHeader(b"Access-Control-Max-Age", PREFLIGHT_MAX_AGE)
        return b""
