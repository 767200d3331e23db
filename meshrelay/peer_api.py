"""The peer API (PROTOCOL.md section 5): HMAC-gated Klein routes over the relay core.

Every route is registered with :func:`~meshrelay.peers.peer_route`, so it runs
only after the caller proved it is a configured peer (section 4); the body is
read and parsed only then.  Each route decodes, calls one
:class:`~meshrelay.relay.Relay` method and encodes the result.
"""

from __future__ import annotations

import re
from typing import Any

from klein import Klein

from meshrelay.envelope import KEY_LEN, MAX_INT, RawJSON, b64u_decode, require_object, strip_v3_fields
from meshrelay.errors import BadRequest
from meshrelay.peers import PeerAuthenticator, peer_route
from meshrelay.policy_sync import MAX_POLICIES, POLICIES_PATH, policies_page
from meshrelay.relay import Relay
from meshrelay.web import (
    ACK_PATH,
    CHANGES_PATH,
    REPLICATE_PATH,
    install_error_table,
    json_response,
    read_json,
    request_path,
)

CHANGES = CHANGES_PATH.encode()

#: items per replicate-envelope / ack request
MAX_BATCH = 500
#: the largest ``limit`` of a changes page
MAX_CHANGES_LIMIT = 500
DEFAULT_CHANGES_LIMIT = 100
CHANGES_PARAMS = frozenset((b"since", b"limit", b"mailbox"))

_UINT_RE = re.compile(rb"0|[1-9][0-9]{0,15}")


def _item_list(obj: Any, name: str) -> list[Any]:
    """``{name: [items]}`` -> items (at most :data:`MAX_BATCH`); anything else is 400."""
    body = require_object(obj)
    if body.keys() != {name}:
        raise BadRequest(f'body must be {{"{name}": [...]}}')
    items = body[name]
    if not isinstance(items, list):
        raise BadRequest(f"{name} must be a list")
    if len(items) > MAX_BATCH:
        raise BadRequest(f"at most {MAX_BATCH} {name} per request")
    return items


def replicate_items(obj: Any) -> list[Any]:
    """``{"envelope": {...}}`` or ``{"envelopes": [...]}`` -> the envelopes; else 400."""
    body = require_object(obj)
    if body.keys() == {"envelope"}:
        return [body["envelope"]]
    if body.keys() == {"envelopes"}:
        return _item_list(body, "envelopes")
    raise BadRequest('body must be {"envelope": {...}} or {"envelopes": [...]}')


def _query_param(args: dict[bytes, list[bytes]], name: bytes) -> bytes | None:
    values = args.get(name)
    if not values:
        return None
    if len(values) != 1:
        raise BadRequest(f"{name.decode()} given more than once")
    return values[0]


def parse_changes_query(args: dict[bytes, list[bytes]]) -> tuple[int, int, str | None]:
    """Validate ``since``, ``limit`` and ``mailbox`` of a changes request."""
    unknown = set(args) - CHANGES_PARAMS
    if unknown:
        raise BadRequest("unknown query parameter(s): " + ", ".join(sorted(u.decode("latin-1") for u in unknown)))
    raw_since = _query_param(args, b"since")
    since = 0
    if raw_since is not None:
        if _UINT_RE.fullmatch(raw_since) is None or int(raw_since) > MAX_INT:
            raise BadRequest("since must be a non-negative integer")
        since = int(raw_since)
    raw_limit = _query_param(args, b"limit")
    limit = DEFAULT_CHANGES_LIMIT
    if raw_limit is not None:
        if _UINT_RE.fullmatch(raw_limit) is None or not 1 <= int(raw_limit) <= MAX_CHANGES_LIMIT:
            raise BadRequest(f"limit must be an integer in [1, {MAX_CHANGES_LIMIT}]")
        limit = int(raw_limit)
    raw_mailbox = _query_param(args, b"mailbox")
    mailbox: str | None = None
    if raw_mailbox is not None:
        try:
            text = raw_mailbox.decode("ascii")
            if len(b64u_decode(text)) != KEY_LEN:
                raise ValueError("wrong length")
        except ValueError:
            raise BadRequest("mailbox must be a canonical b64u 32-byte key") from None
        mailbox = text
    return since, limit, mailbox


def split_ext(args: dict[bytes, list[bytes]]) -> tuple[dict[bytes, list[bytes]], bool]:
    """Take the v3 ``ext=1`` parameter off a query (envelopes with their permit and stamp); 400 otherwise."""
    if b"ext" not in args:
        return args, False
    if args[b"ext"] != [b"1"]:
        raise BadRequest("ext must be 1")
    return {k: v for k, v in args.items() if k != b"ext"}, True


def v3_body(kind: str, body: str, ext: bool) -> str:
    """A feed item's text for a caller: envelopes lose ``permit``/``stamp`` unless it speaks v3 (12.5)."""
    return body if ext or kind != "envelope" else strip_v3_fields(body)


def parse_policy_feed_query(args: dict[bytes, list[bytes]]) -> tuple[int, int]:
    """``since`` and ``limit`` of a policy feed read (v3); anything else is 400."""
    unknown = set(args) - {b"since", b"limit"}
    if unknown:
        raise BadRequest("unknown query parameter(s): " + ", ".join(sorted(u.decode("latin-1") for u in unknown)))
    since, limit = 0, MAX_POLICIES
    raw_since = _query_param(args, b"since")
    if raw_since is not None:
        if _UINT_RE.fullmatch(raw_since) is None or int(raw_since) > MAX_INT:
            raise BadRequest("since must be a non-negative integer")
        since = int(raw_since)
    raw_limit = _query_param(args, b"limit")
    if raw_limit is not None:
        if _UINT_RE.fullmatch(raw_limit) is None or not 1 <= int(raw_limit) <= MAX_POLICIES:
            raise BadRequest(f"limit must be an integer in [1, {MAX_POLICIES}]")
        limit = int(raw_limit)
    return since, limit


class PeerAPI:
    """Routes of the public listener that peers call (HMAC-gated)."""

    app = Klein()
    install_error_table(app)

    def __init__(self, relay: Relay, auth: PeerAuthenticator, limiter: Any = None, fetch_limiter: Any = None) -> None:
        self.relay = relay
        self.auth = auth
        #: optional per-peer request limiter (``allow(peer_url) -> bool``)
        self.limiter = limiter
        #: optional per-peer limiter for mailbox-filtered changes (a peer's fetch_remote): a budget
        #: of their own, so they never use up the one that push and sync need
        self.fetch_limiter = fetch_limiter

    def limiter_for(self, request: Any) -> Any:
        """The budget a request draws from: fetch_limiter for a mailbox-filtered changes request."""
        if self.fetch_limiter is not None and b"mailbox" in request.args and request_path(request) == CHANGES:
            return self.fetch_limiter
        return self.limiter

    def resource(self) -> Any:
        return self.app.resource()

    @peer_route(app, REPLICATE_PATH, ["POST"])
    async def replicate(self, request: Any, peer: str) -> bytes:
        envelopes = replicate_items(read_json(request))
        results = await self.relay.accept_replicas(envelopes) if envelopes else []
        return json_response(request, 200, {"ok": True, "results": results})

    @peer_route(app, ACK_PATH, ["POST"])
    async def ack(self, request: Any, peer: str) -> bytes:
        acks = _item_list(read_json(request), "acks")
        results = await self.relay.accept_acks(acks) if acks else []
        return json_response(request, 200, {"ok": True, "results": results})

    @peer_route(app, CHANGES_PATH, ["GET"])
    async def changes(self, request: Any, peer: str) -> bytes:
        args, ext = split_ext(request.args)
        since, limit, mailbox = parse_changes_query(args)
        page = await self.relay.changes(since, limit, mailbox)
        # Envelopes keep their v3 fields only for a caller that asked (ext=1, a v3 puller).
        items = [{"seq": item.seq, item.kind: RawJSON(v3_body(item.kind, item.body, ext))} for item in page.items]
        return json_response(
            request, 200, {"ok": True, "feed": page.feed, "items": items, "next": page.next, "more": page.more}
        )

    @peer_route(app, POLICIES_PATH, ["POST"])
    async def push_policies(self, request: Any, peer: str) -> bytes:
        """Signed mailbox policies from a peer (v3, 12.5): one result each."""
        policies = _item_list(read_json(request), "policies")
        results = await self.relay.accept_policies(policies) if policies else []
        return json_response(request, 200, {"ok": True, "results": results})

    @peer_route(app, POLICIES_PATH, ["GET"])
    async def policy_feed(self, request: Any, peer: str) -> bytes:
        """This node's policy feed (v3, 12.5): the newest policy of each mailbox, by pseq."""
        since, limit = parse_policy_feed_query(request.args)
        rows = await self.relay.policy_feed(since, limit + 1)
        return json_response(request, 200, policies_page(rows, since, limit))
