"""Peer authentication (docs/protocol.md section 5): HKDF link keys, HMAC'd requests.

Each peer link has a shared secret.  A caller signs with
``HKDF-SHA256(ikm=secret, salt=b"meshrelay-peer-auth-v1", info=<caller's
normalized public_url>, length=32)``, so the two directions of a link use
different keys and a peer cannot pass for another one.  The MAC covers::

    meshrelay/peer/v1
    METHOD
    request target exactly as sent (path, including any prefix of the peer's URL, plus ?query)
    timestamp
    nonce
    hex(sha256(body))

``\\n``-joined.  A link may hold several secrets at once (a rotation, at most
:data:`~meshrelay.config.MAX_PEER_SECRETS`): the caller signs with the first;
the receiver accepts any of them.  A caller that knows (from the peer's
``features``) that the peer reads key ids names the secret it signed with in
``X-Peer-Key-Id``, which the receiver tries first; without it the receiver
tries each accepted secret in turn.

:class:`PeerSigner` is the caller's side; :class:`PeerAuthenticator`
is the receiver's, and :func:`peer_route` is the decorator that puts it in front
of a Klein route, so the check runs before the handler (and before the body is
parsed).  Every refusal is a 403 ``forbidden`` and a
``peer_auth_failures{reason}`` count.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import re
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.web.iweb import IRequest

from meshrelay.config import KEY_ID_RE, Config, PeerConfig
from meshrelay.envelope import HEX64_RE, NONCE_LEN, b64u_decode, b64u_encode
from meshrelay.errors import Forbidden, RateLimited
from meshrelay.logs import Aggregator
from meshrelay.metrics import Metrics
from meshrelay.replay import REPLAYED, ReplayCache
from meshrelay.store.base import Store

PEER_DOMAIN = "meshrelay/peer/v1"
HKDF_SALT = b"meshrelay-peer-auth-v1"

H_URL = "X-Peer-Url"
H_TS = "X-Peer-Timestamp"
H_NONCE = "X-Peer-Nonce"
H_HMAC = "X-Peer-HMAC"
#: optional (docs/protocol.md 5.6): the id of the secret the caller signed with; not MACed, only a hint
H_KEY_ID = "X-Peer-Key-Id"

#: failure reasons (the ``reason`` label of ``peer_auth_failures``)
MISSING = "missing_header"
MALFORMED = "malformed_header"
UNKNOWN_PEER = "unknown_peer"
STALE = "stale"
BAD_HMAC = "bad_hmac"
REPLAYED_NONCE = "replayed"

_TS_RE = re.compile(r"0|[1-9][0-9]{0,15}")

T = TypeVar("T")


def derive_key(secret: str, caller_url: str) -> bytes:
    """The 32-byte HMAC key the caller at ``caller_url`` signs with on this link."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=HKDF_SALT, info=caller_url.encode("utf-8"))
    return hkdf.derive(secret.encode("utf-8"))


def mac_input(method: str, target: str, ts: int, nonce: str, body: bytes) -> bytes:
    """The bytes the peer HMAC covers."""
    digest = hashlib.sha256(body).hexdigest()
    return "\n".join((PEER_DOMAIN, method.upper(), target, str(ts), nonce, digest)).encode("utf-8")


def compute_mac(key: bytes, method: str, target: str, ts: int, nonce: str, body: bytes) -> str:
    """Hex HMAC-SHA256 of :func:`mac_input` under ``key``."""
    return hmac.new(key, mac_input(method, target, ts, nonce, body), hashlib.sha256).hexdigest()


def url_path(url: str) -> str:
    """The path prefix of a normalized node URL ("" when it has none)."""
    return urlsplit(url).path.rstrip("/")


class PeerSigner:
    """Signs this node's requests to one peer (the caller's side).

    ``key_id`` names the secret; it is sent as ``X-Peer-Key-Id`` only while
    ``send_key_id`` is true (set once the peer's ``features`` said it reads key ids).
    """

    def __init__(self, own_url: str, secret: str, key_id: str = "") -> None:
        self.own_url = own_url
        self.key = derive_key(secret, own_url)
        self.key_id = key_id
        self.send_key_id = False

    def headers(self, method: str, target: str, body: bytes, now: float, nonce: bytes | None = None) -> dict[str, str]:
        """The four X-Peer-* headers for a request to ``target`` (path + ?query, as sent)."""
        ts = int(now)
        nonce_text = b64u_encode(nonce if nonce is not None else os.urandom(NONCE_LEN))
        headers = {
            H_URL: self.own_url,
            H_TS: str(ts),
            H_NONCE: nonce_text,
            H_HMAC: compute_mac(self.key, method, target, ts, nonce_text, body),
        }
        if self.send_key_id and self.key_id:
            headers[H_KEY_ID] = self.key_id
        return headers


def _optional_header(request: Any, name: str) -> str | None:
    if not request.requestHeaders.hasHeader(name.encode("ascii")):
        return None
    return _header(request, name)


def _header(request: IRequest, name: str) -> str:
    values = request.requestHeaders.getRawHeaders(name.encode("ascii"))
    if not values:
        raise _AuthFailure(MISSING, f"{name} header missing")
    if len(values) != 1:
        raise _AuthFailure(MALFORMED, f"{name} header given more than once")
    raw = values[0]
    try:
        return raw.decode("ascii") if isinstance(raw, bytes) else str(raw)
    except UnicodeDecodeError:
        raise _AuthFailure(MALFORMED, f"{name} header is not ASCII") from None


class _AuthFailure(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class PeerAuthenticator:
    """Checks the X-Peer-* headers of incoming peer requests (the receiver's side)."""

    log = Logger()

    def __init__(
        self, config: Config, store: Store, metrics: Metrics, clock: IReactorTime, log_agg: Aggregator | None = None
    ) -> None:
        self.store = store
        #: refusals are logged through this: one line per reason per interval, with counts
        self.log_agg = log_agg if log_agg is not None else Aggregator(clock)
        self.metrics = metrics
        self.clock = clock
        self.skew = config.limits.clock_skew
        #: peer URL -> (key id, key) of each secret accepted from that peer (derived from *its* URL)
        self.keys: dict[str, tuple[tuple[str, bytes], ...]] = {}
        #: this node's own URL path prefix; a reverse proxy in front of the
        #: node strips it before the request reaches us, the caller MACs it
        self.prefix = url_path(config.node.public_url)
        self.nonces = ReplayCache(2 * self.skew, config.limits.max_nonces)
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        """Take the peers, secrets and limits of a reloaded config (the public URL stays)."""
        self.keys = {p.url: self._peer_keys(p) for p in config.peers}
        self.skew = config.limits.clock_skew
        self.nonces.window = 2 * self.skew
        self.nonces.max_entries = config.limits.max_nonces

    @staticmethod
    def _peer_keys(peer: PeerConfig) -> tuple[tuple[str, bytes], ...]:
        return tuple((s.id, derive_key(s.secret, peer.url)) for s in peer.accepted())

    def target(self, request: IRequest) -> str:
        """The request target the caller signed: our URL's path prefix + the target we received."""
        uri: bytes = request.uri
        return self.prefix + uri.decode("latin-1")

    def authenticate(self, request: IRequest) -> Deferred[str]:
        """Fire with the authenticated peer URL, or fail with 403 ``forbidden``."""
        return Deferred.fromCoroutine(self._authenticate(request))

    async def _authenticate(self, request: IRequest) -> str:
        try:
            return await self._check(request)
        except _AuthFailure as e:
            self.metrics.peer_auth_failures.labels(e.reason).inc()
            self.log_agg.emit(
                self.log,
                "peer_auth:" + e.reason,
                "peer request refused ({reason}): {detail}",
                LogLevel.warn,
                reason=e.reason,
                detail=e.detail,
            )
            raise Forbidden("peer authentication failed") from None

    async def _check(self, request: IRequest) -> str:
        peer = _header(request, H_URL)
        ts_text = _header(request, H_TS)
        nonce = _header(request, H_NONCE)
        mac = _header(request, H_HMAC)
        key_id = _optional_header(request, H_KEY_ID)
        keys = self.keys.get(peer)
        if keys is None:
            raise _AuthFailure(UNKNOWN_PEER, f"{peer[:200]!r} is not a configured peer")
        if key_id is not None and KEY_ID_RE.fullmatch(key_id) is None:
            raise _AuthFailure(MALFORMED, "X-Peer-Key-Id is not 1-64 characters of A-Z a-z 0-9 . _ -")
        if _TS_RE.fullmatch(ts_text) is None:
            raise _AuthFailure(MALFORMED, "X-Peer-Timestamp is not an integer")
        ts = int(ts_text)
        now = self.clock.seconds()
        if abs(ts - now) > self.skew:
            raise _AuthFailure(STALE, f"timestamp {ts} is not within {self.skew}s of {int(now)}")
        try:
            if len(b64u_decode(nonce)) != NONCE_LEN:
                raise ValueError("wrong length")
        except ValueError:
            raise _AuthFailure(MALFORMED, "X-Peer-Nonce is not b64u of 16 bytes") from None
        if HEX64_RE.fullmatch(mac) is None:
            raise _AuthFailure(BAD_HMAC, "X-Peer-HMAC is not 64 lowercase hex characters")
        content = request.content
        content.seek(0)
        body = content.read()
        content.seek(0)
        method = request.method.decode("ascii", "replace")
        target = self.target(request)
        # The named key first (a hint: an id this side does not know, or names otherwise, costs
        # only the trial of the others); at most MAX_PEER_SECRETS MACs per request.
        ordered = sorted(keys, key=lambda k: k[0] != key_id) if key_id is not None else keys
        matched: str | None = None
        for kid, key in ordered:
            if hmac.compare_digest(compute_mac(key, method, target, ts, nonce, body), mac):
                matched = kid
                break
        if matched is None:
            raise _AuthFailure(BAD_HMAC, f"HMAC does not match for {peer}")
        # Only a request that carries a valid MAC may use up a nonce.
        # Kept 2 x skew (docs/protocol.md 5.5), and past every moment a request with this ts is in time
        # (|ts - now| <= skew, so ts + skew < expires): a sweep never frees a nonce a replay could use.
        expires = int(now) + 2 * self.skew + 1
        verdict = await self.nonces.use(
            (peer, nonce), self.clock.seconds, lambda: self.store.claim_nonce("peer:" + peer, nonce, expires)
        )
        if verdict == REPLAYED:
            raise _AuthFailure(REPLAYED_NONCE, "nonce already used")
        self.metrics.peer_auth_keys.labels(peer, matched).inc()
        return peer


Handler = Callable[[Any, Any, str], Coroutine[Any, Any, T]]


def peer_route(app: Klein, path: str, methods: list[str]) -> Callable[[Handler[T]], Handler[T]]:
    """Register ``handler(self, request, peer_url)`` on ``app`` behind peer authentication.

    The instance must have an ``auth`` attribute (a :class:`PeerAuthenticator`)
    and may have a ``limiter`` (anything with ``allow(key) -> bool``, keyed by
    the authenticated peer URL; a refusal is ``429 rate_limited``), or a
    ``limiter_for(request)`` that picks the limiter for each request.  The
    handler runs only for an authenticated request, so it never sees, and
    never parses, an unauthenticated body.
    """

    def decorate(handler: Handler[T]) -> Handler[T]:
        @functools.wraps(handler)
        async def gated(self: Any, request: IRequest) -> T:
            peer = await self.auth.authenticate(request)
            pick = getattr(self, "limiter_for", None)
            limiter = pick(request) if pick is not None else getattr(self, "limiter", None)
            if limiter is not None and not limiter.allow(peer):
                wait = getattr(limiter, "retry_after", None)
                raise RateLimited("too many requests from this peer; slow down").wait(wait() if wait else 1)
            return await handler(self, request, peer)

        app.route(path, methods=methods, branch=False)(cast(Any, gated))
        return handler

    return decorate
