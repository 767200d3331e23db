"""The peer API (docs/protocol.md sections 6-7): HMAC-gated Klein routes over the relay core.

Every route is registered with :func:`~meshrelay.peers.peer_route`, so it runs
only after the caller proved it is a configured peer (section 4); the body is
read and parsed only then.  Each route decodes, calls one
:class:`~meshrelay.relay.Relay` method and encodes the result.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from klein import Klein
from twisted.web.iweb import IRequest

from meshrelay.echo import is_token
from meshrelay.envelope import KEY_LEN, MAX_INT, RawJSON, b64u_decode, require_object, strip_v3_fields
from meshrelay.errors import BadRequest
from meshrelay.peers import PeerAuthenticator, peer_route
from meshrelay.policy_sync import MAX_POLICIES, policies_page
from meshrelay.protocol import (
    ACK_PATH,
    BODIES_PATH,
    CHANGES_PATH,
    DEFAULT_CHANGES_LIMIT,
    DEFAULT_IDS_LIMIT,
    FEATURES_PATH,
    MAX_BATCH,
    MAX_BODIES,
    MAX_CHANGES_LIMIT,
    MAX_IDS_LIMIT,
    POLICIES_PATH,
    PROTOCOL_VERSIONS,
    PUSHED_OK,
    REPLICATE_PATH,
    parse_bodies_request,
)
from meshrelay.relay import Relay
from meshrelay.web import Routes, install_error_table, json_response, read_json, request_path

CHANGES = CHANGES_PATH.encode()

__all__ = ["MAX_BATCH", "MAX_CHANGES_LIMIT", "DEFAULT_CHANGES_LIMIT", "PeerAPI", "parse_changes_query"]

CHANGES_PARAMS = frozenset((b"since", b"limit", b"mailbox", b"ids"))
POLICY_FEED_PARAMS = frozenset((b"since", b"limit"))

_UINT_RE = re.compile(rb"0|[1-9][0-9]{0,15}")


@dataclass(frozen=True)
class ChangesQuery:
    since: int
    limit: int
    mailbox: str | None
    ids: bool


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


def refuse_unknown(args: dict[bytes, list[bytes]], allowed: frozenset[bytes]) -> None:
    """Query strings are closed (docs/protocol.md 10): a parameter not in ``allowed`` is 400."""
    unknown = set(args) - allowed
    if unknown:
        raise BadRequest("unknown query parameter(s): " + ", ".join(sorted(u.decode("latin-1") for u in unknown)))


def parse_changes_query(args: dict[bytes, list[bytes]]) -> ChangesQuery:
    """Validate ``since``, ``limit``, ``mailbox`` and ``ids`` of a changes request."""
    refuse_unknown(args, CHANGES_PARAMS)
    raw_ids = _query_param(args, b"ids")
    if raw_ids is not None and raw_ids != b"1":
        raise BadRequest("ids must be 1")
    ids = raw_ids is not None
    raw_since = _query_param(args, b"since")
    since = 0
    if raw_since is not None:
        if _UINT_RE.fullmatch(raw_since) is None or int(raw_since) > MAX_INT:
            raise BadRequest("since must be a non-negative integer")
        since = int(raw_since)
    raw_limit = _query_param(args, b"limit")
    top = MAX_IDS_LIMIT if ids else MAX_CHANGES_LIMIT
    limit = DEFAULT_IDS_LIMIT if ids else DEFAULT_CHANGES_LIMIT
    if raw_limit is not None:
        if _UINT_RE.fullmatch(raw_limit) is None or not 1 <= int(raw_limit) <= top:
            raise BadRequest(f"limit must be an integer in [1, {top}]")
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
    return ChangesQuery(since, limit, mailbox, ids)


def split_incarnation(args: dict[bytes, list[bytes]]) -> tuple[dict[bytes, list[bytes]], str | None]:
    """Take the v5 ``inc`` (the caller's incarnation token, docs/protocol.md 14) off a query; malformed is 400."""
    raw = _query_param(args, b"inc")
    if raw is None:
        return args, None
    token = raw.decode("latin-1")
    if not is_token(token):
        raise BadRequest("inc must be an incarnation token (16 bytes, b64u)")
    return {k: v for k, v in args.items() if k != b"inc"}, token


def split_flag(args: dict[bytes, list[bytes]], name: str) -> tuple[dict[bytes, list[bytes]], bool]:
    """Take a flag parameter off a query: v3 ``ext=1`` (envelopes with their permit and stamp),
    v4 ``held=1`` (signed acks with their held list); any other value is 400."""
    key = name.encode("ascii")
    if key not in args:
        return args, False
    if args[key] != [b"1"]:
        raise BadRequest(f"{name} must be 1")
    return {k: v for k, v in args.items() if k != key}, True


def split_flag_body(obj: Any, name: str) -> tuple[Any, bool]:
    """Take a flag key off a bodies request: v3 ``"ext": true``, v4 ``"held": true``; any other value is 400."""
    if not isinstance(obj, dict) or name not in obj:
        return obj, False
    if obj[name] is not True:
        raise BadRequest(f"{name} must be true")
    return {k: v for k, v in obj.items() if k != name}, True


def v3_body(kind: str, body: str, ext: bool) -> str:
    """A feed item's text for a caller: envelopes lose ``permit``/``stamp`` unless it speaks v3 (12.5)."""
    return body if ext or kind != "envelope" else strip_v3_fields(body)


def parse_policy_feed_query(args: dict[bytes, list[bytes]]) -> tuple[int, int]:
    """``since`` and ``limit`` of a policy feed read (v3); anything else is 400."""
    refuse_unknown(args, POLICY_FEED_PARAMS)
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

    def limiter_for(self, request: IRequest) -> Any:
        """The budget a request draws from: fetch_limiter for a mailbox-filtered changes request."""
        if self.fetch_limiter is not None and b"mailbox" in request.args and request_path(request) == CHANGES:
            return self.fetch_limiter
        return self.limiter

    def resource(self) -> Any:
        return Routes(self.app, self)

    @peer_route(app, REPLICATE_PATH, ["POST"])
    async def replicate(self, request: IRequest, peer: str) -> bytes:
        args, token = split_incarnation(request.args)
        refuse_unknown(args, frozenset())
        envelopes = replicate_items(read_json(request))
        results = await self.relay.accept_replicas(envelopes, peer=peer) if envelopes else []
        if token is None:
            return json_response(request, 200, {"ok": True, "results": results})
        # v5: the pushing process committed these before pushing them; say which process answers.
        holdings = self.relay.holdings
        holdings.learn(peer, token, [r["msg_id"] for r in results if r["status"] in PUSHED_OK])
        return json_response(request, 200, {"ok": True, "results": results, "inc": holdings.token})

    @peer_route(app, ACK_PATH, ["POST"])
    async def ack(self, request: IRequest, peer: str) -> bytes:
        acks = _item_list(read_json(request), "acks")
        results = await self.relay.accept_acks(acks) if acks else []
        return json_response(request, 200, {"ok": True, "results": results})

    @peer_route(app, FEATURES_PATH, ["GET"])
    async def features(self, request: IRequest, peer: str) -> bytes:
        if request.args:
            raise BadRequest("features takes no query")
        return json_response(
            request,
            200,
            {
                "ok": True,
                "versions": list(PROTOCOL_VERSIONS),
                "page_bytes": self.relay.config.sync.page_bytes,
                "max_ids": MAX_IDS_LIMIT,
                "max_bodies": MAX_BODIES,
                "key_ids": True,
            },
        )

    @peer_route(app, CHANGES_PATH, ["GET"])
    async def changes(self, request: IRequest, peer: str) -> bytes:
        args, ext = split_flag(request.args, "ext")
        args, held = split_flag(args, "held")
        args, token = split_incarnation(args)
        q = parse_changes_query(args)
        page = await self.relay.changes(
            q.since, q.limit, q.mailbox, max_bytes=None if q.ids else self.page_bytes(), ids_only=q.ids
        )
        if token is not None and q.mailbox is None:
            # v5 (docs/protocol.md 14): leave out what this incarnation of the peer is known to hold.
            kept = self.relay.holdings.leave_out(peer, token, page.items)
            if len(kept) != len(page.items):
                self.relay.metrics.sync_echo_left_out_total.labels(peer).inc(len(page.items) - len(kept))
                page = dataclasses.replace(page, items=kept)
        if q.ids:
            items: list[dict[str, Any]] = [
                {"seq": i.seq, "kind": i.kind, "mailbox": i.mailbox, _KEY_NAME[i.kind]: i.key, "size": i.size}
                for i in page.items
            ]
        else:
            # Envelopes keep their v3 fields only for a caller that asked (ext=1, a v3 puller);
            # signed acks get their held list only for one that asked (held=1, a v4 puller).
            texts = [v3_body(item.kind, item.body, ext) for item in page.items]
            if held:
                acks = [i for i, item in enumerate(page.items) if item.kind == "ack"]
                for i, text in zip(acks, await self.relay.with_held([texts[i] for i in acks])):
                    texts[i] = text
            items = [{"seq": item.seq, item.kind: RawJSON(text)} for item, text in zip(page.items, texts)]
        return json_response(
            request, 200, {"ok": True, "feed": page.feed, "items": items, "next": page.next, "more": page.more}
        )

    @peer_route(app, POLICIES_PATH, ["POST"])
    async def push_policies(self, request: IRequest, peer: str) -> bytes:
        """Signed mailbox policies from a peer (v3, 12.5): one result each."""
        policies = _item_list(read_json(request), "policies")
        results = await self.relay.accept_policies(policies) if policies else []
        return json_response(request, 200, {"ok": True, "results": results})

    @peer_route(app, POLICIES_PATH, ["GET"])
    async def policy_feed(self, request: IRequest, peer: str) -> bytes:
        """This node's policy feed (v3, 12.5): the newest policy of each mailbox, by pseq."""
        since, limit = parse_policy_feed_query(request.args)
        rows = await self.relay.policy_feed(since, limit + 1)
        return json_response(request, 200, policies_page(rows, since, limit))

    @peer_route(app, BODIES_PATH, ["POST"])
    async def bodies(self, request: IRequest, peer: str) -> bytes:
        obj, ext = split_flag_body(read_json(request), "ext")
        obj, held = split_flag_body(obj, "held")
        try:
            msg_ids, acks = parse_bodies_request(obj)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        found = await self.relay.bodies(msg_ids, acks, self.relay.config.sync.page_bytes)
        ack_texts = await self.relay.with_held(found.acks) if held and found.acks else found.acks
        return json_response(
            request,
            200,
            {
                "ok": True,
                "envelopes": [RawJSON(b if ext else strip_v3_fields(b)) for b in found.envelopes],
                "acks": [RawJSON(b) for b in ack_texts],
                "gone": {
                    "envelopes": found.gone_envelopes,
                    "acks": [{"mailbox": m, "nonce": n} for m, n in found.gone_acks],
                },
            },
        )

    def page_bytes(self) -> int | None:
        """The byte budget of a v1 changes page (``sync.page_bytes``)."""
        return self.relay.config.sync.page_bytes


_KEY_NAME = {"envelope": "msg_id", "ack": "nonce"}
