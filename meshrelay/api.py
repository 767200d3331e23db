"""The client API (docs/protocol.md section 4): thin Klein routes over the relay core.

Each route decodes the body, calls one :class:`~meshrelay.relay.Relay`
method and encodes its result; refusals are exceptions that the error table
in :mod:`meshrelay.web` turns into the protocol's error bodies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.web.iweb import IRequest

from meshrelay import __version__
from meshrelay import envelope as E
from meshrelay.errors import BadRequest, MeshError, RateLimited
from meshrelay.relay import Relay
from meshrelay.web import (
    FALLBACK_ATTR,
    SHARE_KEY_ATTR,
    HeldAnswers,
    Routes,
    body_length,
    install_error_table,
    json_response,
    log_refusal,
    read_json,
    refusal_response,
)


def policy_query(args: dict[bytes, list[bytes]]) -> str:
    """The ``mailbox`` of a policy read: exactly one canonical b64u key, else ``400 bad_request``."""
    if set(args) != {b"mailbox"} or len(args[b"mailbox"]) != 1:
        raise BadRequest("the query is exactly mailbox=<b64u>")
    try:
        text = args[b"mailbox"][0].decode("ascii")
        ok = len(E.b64u_decode(text)) == E.KEY_LEN
    except (UnicodeDecodeError, ValueError):
        ok = False
    if not ok:
        raise BadRequest("mailbox must be canonical base64url of 32 bytes")
    return text


def _body_key(obj: Any, field: str) -> str | None:
    value = obj.get(field) if isinstance(obj, dict) else None
    return value if isinstance(value, str) and len(value) <= 64 else None


class ClientAPI:
    """Routes of the public listener that clients call."""

    app = Klein()
    install_error_table(app)

    def __init__(
        self,
        relay: Relay,
        peer_count: Callable[[], int] = lambda: 0,
        client_limiter: Any = None,
        deposit_limiter: Any = None,
        held: HeldAnswers | None = None,
    ) -> None:
        self.relay = relay
        #: where early over-share refusals wait out their hold (by default none is held)
        self.held = held if held is not None else HeldAnswers(relay.clock, 0)
        self.peer_count = peer_count
        #: used only on a listener whose address means nothing (NodeRoot charges the address otherwise)
        self.client_limiter = client_limiter
        self.deposit_limiter = deposit_limiter

    def _charge_body_keys(self, request: IRequest, keys: tuple[str, ...], write: bool) -> None:
        """Where the address means nothing: charge the request (and a write's bytes: a deposit, a poll's acks) to body keys.

        A body without the keys is left to the core, which refuses it (400).
        """
        if not getattr(request, FALLBACK_ATTR, False) or not keys:
            return
        refused = self.relay.metrics.refused_total
        limiter = self.client_limiter
        if limiter is not None and limiter.enabled and not limiter.allow_all(keys):
            refused.labels("client_rate").inc()
            raise RateLimited("too many requests for this mailbox or sender")
        deposits = self.deposit_limiter
        if write and deposits is not None and deposits.enabled and not deposits.allow_all(keys, body_length(request)):
            refused.labels("deposit_bytes").inc()
            raise RateLimited("too many bytes written for this mailbox or sender; slow down")

    def resource(self) -> Any:
        return Routes(self.app, self)

    def refuse_early(self, request: IRequest, share: str) -> bytes | int | None:
        """The answer to a long-poll over its address's share, before the routes; None: route the poll.

        Called by :class:`~meshrelay.web.NodeRoot` for a poll that passed the per-address
        limits.  An address under its share of waiting polls costs a dict lookup here; one over
        it has the body parsed and shape-checked, and a poll with ``wait > 0`` and no ``ack`` is
        answered ``429 rate_limited`` at once, as :meth:`poll` would answer it (same body,
        ``Retry-After``, metrics and log line) but without Klein's routing, the coroutine and
        the error handler: what a flood of such polls costs the reactor per request (issue 10).
        Anything else (a bad content type, body or shape, a poll that acks or does not wait) is
        routed, and answered there.  The refusal is counted and logged at once, and answered
        after the relay's hold (``limits.over_share_hold``, at most the poll's ``wait``) through
        ``held`` (``NOT_DONE_YET`` then).
        """
        relay = self.relay
        if not relay.share_full(share):
            return None
        try:
            obj = read_json(request)
        except MeshError:
            return None
        found = relay.refuse_over_share(obj, share)
        if found is None:
            return None
        refusal, hold = found
        log_refusal(request, refusal, relay.log_agg)
        return self.held.answer(request, hold, lambda: refusal_response(request, refusal))

    def _answer(self, request: IRequest, d: Deferred[dict[str, Any]]) -> Deferred[bytes]:
        return d.addCallback(lambda result: json_response(request, 200, result))

    @app.route("/api/mesh/dm/send", methods=["POST"])
    def send(self, request: IRequest) -> Deferred[bytes]:
        obj = read_json(request)
        sender, mailbox = _body_key(obj, "sender"), _body_key(obj, "mailbox")
        keys = ("sender:" + sender, "mailbox:" + mailbox) if sender and mailbox else ()
        self._charge_body_keys(request, keys, write=True)
        return self._answer(request, self.relay.deposit(obj))

    @app.route("/api/mesh/dm/poll", methods=["POST"])
    def poll(self, request: IRequest) -> Deferred[bytes]:
        obj = read_json(request)
        mailbox = _body_key(obj, "mailbox")
        self._charge_body_keys(request, ("mailbox:" + mailbox,) if mailbox else (), write=True)
        # The waiting share is this address's, or (no address key) the mailbox's.
        return self._answer(request, self.relay.poll(obj, client=getattr(request, SHARE_KEY_ATTR, None)))

    @app.route("/api/mesh/dm/count", methods=["POST"])
    def count(self, request: IRequest) -> Deferred[bytes]:
        obj = read_json(request)
        mailbox = _body_key(obj, "mailbox")
        self._charge_body_keys(request, ("mailbox:" + mailbox,) if mailbox else (), write=False)
        return self._answer(request, self.relay.count(obj))

    @app.route("/api/mesh/dm/policy", methods=["POST"])
    def set_policy(self, request: IRequest) -> Deferred[bytes]:
        """Store a mailbox's signed policy (protocol v3, 12.2)."""
        obj = read_json(request)
        mailbox = _body_key(obj, "mailbox")
        self._charge_body_keys(request, ("mailbox:" + mailbox,) if mailbox else (), write=False)
        return self._answer(request, self.relay.set_policy(obj))

    @app.route("/api/mesh/dm/policy", methods=["GET"])
    def get_policy(self, request: IRequest) -> bytes:
        """A mailbox's policy, public (protocol v3, 12.2)."""
        return json_response(request, 200, self.relay.get_policy(policy_query(request.args)))

    @app.route("/api/mesh/health", methods=["GET"])
    def health(self, request: IRequest) -> bytes:
        return json_response(request, 200, {"ok": True, "version": __version__, "peers": self.peer_count()})
