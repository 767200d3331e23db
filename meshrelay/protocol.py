"""The peer wire protocol shared by both sides: paths, limits, page parsing and the JSON codec.

The server side (:mod:`meshrelay.peer_api`, :mod:`meshrelay.web`) and the
client side (:mod:`meshrelay.replication`) both import this module, so the
peer client never imports the server's routes.  Wire v2 (issue 9) adds
``features`` (version negotiation), ids-first ``changes?ids=1`` pages and
``bodies``; a v1-only peer keeps working with v1 requests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from meshrelay.envelope import HEX64_RE, KEY_LEN, MAX_ACK_IDS, MAX_INT, NONCE_LEN, dumps_json, loads_json

__all__ = [
    "ACK_PATH",
    "BODIES_PATH",
    "CHANGES_PATH",
    "FEATURES_PATH",
    "POLICIES_PATH",
    "REPLICATE_PATH",
    "PEER_PATHS",
    "MAX_ACK_IDS",
    "dumps_json",
    "loads_json",
]

# ---------------------------------------------------------------------- paths

REPLICATE_PATH = "/api/mesh/dm/replicate-envelope"
ACK_PATH = "/api/mesh/dm/ack"
CHANGES_PATH = "/api/mesh/dm/changes"
FEATURES_PATH = "/api/mesh/dm/features"
BODIES_PATH = "/api/mesh/dm/bodies"
#: version 3 (first contact): mailbox policies pushed and pulled between peers (meshrelay.policy_sync)
POLICIES_PATH = "/api/mesh/dm/policies"
#: the peer API's routes (HMAC-gated, with their own body cap)
PEER_PATHS = frozenset(
    p.encode() for p in (REPLICATE_PATH, ACK_PATH, CHANGES_PATH, FEATURES_PATH, BODIES_PATH, POLICIES_PATH)
)

# ---------------------------------------------------------------------- limits

#: items per replicate-envelope / ack request
MAX_BATCH = 500
#: the largest ``limit`` of a v1 changes page, and its default
MAX_CHANGES_LIMIT = 500
DEFAULT_CHANGES_LIMIT = 100
#: the largest ``limit`` of an ids-only changes page, and its default
MAX_IDS_LIMIT = 5000
DEFAULT_IDS_LIMIT = 1000
#: entries (envelopes + acks) in one bodies request
MAX_BODIES = 500
#: protocol versions this code speaks
PROTOCOL_VERSIONS = (1, 2, 3, 4, 5)
#: the version whose peers exchange signed acks with their ``held`` list (docs/protocol.md 13)
HELD_VERSION = 4
#: the version whose peers leave out of feed pages what the puller is known to hold (docs/protocol.md 14)
ECHO_VERSION = 5
#: push results that mean the receiver now holds the envelope (6.1)
PUSHED_OK = frozenset(("accepted", "duplicate"))
#: the largest sync.page_bytes a puller accepts from a peer's features
MAX_PAGE_BYTES = 16 * 1024 * 1024
#: JSON around the items of a page or bodies answer
PAGE_OVERHEAD = 4096


class PeerError(Exception):
    """A peer answered something other than a well-formed success."""


def max_item_bytes(max_message_bytes: int) -> int:
    """The largest canonical JSON of one feed item (an envelope or a signed ack of MAX_ACK_IDS ids)."""
    return max(max_message_bytes * 4 // 3 + 1024, MAX_ACK_IDS * 70 + 1024)


def bounded_response_cap(page_bytes: int, max_message_bytes: int) -> int:
    """What a puller accepts for a byte-bounded page or bodies answer of a peer with ``page_bytes``."""
    return min(page_bytes, MAX_PAGE_BYTES) + max_item_bytes(max_message_bytes) + PAGE_OVERHEAD


def v1_response_cap(max_message_bytes: int) -> int:
    """What a puller accepts for an (unbounded) v1 changes page of MAX_CHANGES_LIMIT items."""
    return MAX_CHANGES_LIMIT * (max_message_bytes * 4 // 3 + 1024) + PAGE_OVERHEAD


# ---------------------------------------------------------------------- features


@dataclass(frozen=True)
class Features:
    versions: tuple[int, ...]
    page_bytes: int
    max_ids: int
    max_bodies: int
    #: the peer reads ``X-Peer-Key-Id`` (section 5.6)
    key_ids: bool = False

    @property
    def v2(self) -> bool:
        return 2 in self.versions

    @property
    def held(self) -> bool:
        """The peer takes and serves signed acks with their ``held`` list (v4)."""
        return HELD_VERSION in self.versions

    @property
    def echo(self) -> bool:
        """The peer takes incarnation tokens and leaves echoes out of its pages (v5)."""
        return ECHO_VERSION in self.versions


V1_ONLY = Features((1,), 0, 0, 0)


def _int(obj: dict[str, Any], name: str, low: int, high: int) -> int:
    value = obj.get(name)
    if type(value) is not int or not low <= value <= high:
        raise PeerError(f"features {name} must be an integer in [{low}, {high}]")
    return value


def parse_features(obj: Any) -> Features:
    """Validate a ``features`` answer."""
    if not isinstance(obj, dict) or obj.get("ok") is not True:
        raise PeerError("features answer is not {ok: true, ...}")
    versions = obj.get("versions")
    if not isinstance(versions, list) or not versions or len(versions) > 100:
        raise PeerError("features versions must be a non-empty list")
    if not all(type(v) is int for v in versions):
        raise PeerError("features versions must be integers")
    return Features(
        tuple(versions),
        _int(obj, "page_bytes", 1, MAX_INT),
        _int(obj, "max_ids", 1, MAX_INT),
        _int(obj, "max_bodies", 1, MAX_INT),
        obj.get("key_ids") is True,
    )


# ---------------------------------------------------------------------- pages


@dataclass(frozen=True)
class Page:
    """One validated ``changes`` page (or the bodies an ids page led to), ready to apply."""

    feed: str
    envelopes: list[Any]
    acks: list[Any]
    next: int
    more: bool
    #: the envelopes were fetched because the puller lacked them (an ids-first pull)
    lacking: bool = False
    #: a full-body page from a v2 peer, pulled because the puller lacked nearly all (7.3)
    full: bool = False


@dataclass(frozen=True)
class IdsPage:
    """One validated ids-only ``changes`` page: (mailbox, msg_id | nonce, size) per item."""

    feed: str
    envelopes: list[tuple[str, str, int]]
    acks: list[tuple[str, str, int]]
    next: int
    more: bool


def _page_frame(obj: Any, since: int, limit: int) -> tuple[str, list[Any], int, bool]:
    if not isinstance(obj, dict) or obj.get("ok") is not True:
        raise PeerError("changes answer is not {ok: true, ...}")
    feed, items, nxt, more = obj.get("feed"), obj.get("items"), obj.get("next"), obj.get("more")
    if not isinstance(feed, str) or not 0 < len(feed) <= 200:
        raise PeerError("changes answer has no feed id")
    if not isinstance(items, list) or len(items) > limit:
        raise PeerError("changes items must be a list of at most limit items")
    if type(nxt) is not int or not since <= nxt <= MAX_INT:
        raise PeerError("changes next must be an integer >= since")
    if type(more) is not bool:
        raise PeerError("changes more must be a boolean")
    # A v5 page may leave out every item it covers (docs/protocol.md 14): progress is ``next``.
    if more and nxt == since:
        raise PeerError("changes answer says more but made no progress")
    return feed, items, nxt, more


def parse_page(obj: Any, since: int, limit: int) -> Page:
    """Validate a v1 ``changes`` answer; raise :class:`PeerError` for anything malformed."""
    feed, items, nxt, more = _page_frame(obj, since, limit)
    envelopes: list[Any] = []
    acks: list[Any] = []
    for item in items:
        if not isinstance(item, dict) or len(item) != 2 or type(item.get("seq")) is not int:
            raise PeerError("a changes item must be {seq, envelope | ack}")
        if "envelope" in item:
            envelopes.append(item["envelope"])
        elif "ack" in item:
            acks.append(item["ack"])
        else:
            raise PeerError("a changes item must be {seq, envelope | ack}")
    return Page(feed, envelopes, acks, nxt, more)


# Canonical b64u of n bytes, as one pattern (checked per item of every ids page, so no decode):
# 32 bytes are 43 characters whose last one carries 2 unused low bits (zero), 16 bytes are 22
# characters whose last one carries 4.  tests/test_protocol.py checks them against b64u_decode.
_KEY_RE = re.compile(r"[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]")
_NONCE_RE = re.compile(r"[A-Za-z0-9_-]{21}[AQgw]")
assert KEY_LEN == 32 and NONCE_LEN == 16


def is_mailbox(value: Any) -> bool:
    """A canonical b64u 32-byte key."""
    return isinstance(value, str) and _KEY_RE.fullmatch(value) is not None


def is_nonce(value: Any) -> bool:
    """A canonical b64u 16-byte nonce."""
    return isinstance(value, str) and _NONCE_RE.fullmatch(value) is not None


def is_msg_id(value: Any) -> bool:
    return isinstance(value, str) and HEX64_RE.fullmatch(value) is not None


def parse_ids_page(obj: Any, since: int, limit: int) -> IdsPage:
    """Validate an ids-only ``changes`` answer."""
    feed, items, nxt, more = _page_frame(obj, since, limit)
    envelopes: list[tuple[str, str, int]] = []
    acks: list[tuple[str, str, int]] = []
    for item in items:
        if not isinstance(item, dict) or type(item.get("seq")) is not int:
            raise PeerError("an ids item must be {seq, kind, mailbox, msg_id | nonce, size}")
        kind, mailbox, size = item.get("kind"), item.get("mailbox"), item.get("size")
        if not is_mailbox(mailbox) or type(size) is not int or not 0 <= size <= MAX_INT:
            raise PeerError("an ids item needs a mailbox and a size")
        if kind == "envelope" and len(item) == 5 and is_msg_id(item.get("msg_id")):
            envelopes.append((str(mailbox), item["msg_id"], size))
        elif kind == "ack" and len(item) == 5 and is_nonce(item.get("nonce")):
            acks.append((str(mailbox), item["nonce"], size))
        else:
            raise PeerError("an ids item must be {seq, kind, mailbox, msg_id | nonce, size}")
    return IdsPage(feed, envelopes, acks, nxt, more)


@dataclass(frozen=True)
class BodiesAnswer:
    envelopes: list[Any]
    acks: list[Any]
    gone_envelopes: list[str]
    gone_acks: list[tuple[str, str]]


def bodies_request(msg_ids: list[str], acks: list[tuple[str, str]], ext: bool = False, held: bool = False) -> bytes:
    """The JSON body of a ``bodies`` request (v3 ``ext``: envelopes with their permit and stamp; v4 ``held``)."""
    body: dict[str, Any] = {"envelopes": msg_ids, "acks": [{"mailbox": m, "nonce": n} for m, n in acks]}
    if ext:
        body["ext"] = True
    if held:
        body["held"] = True
    return dumps_json(body)


# ---------------------------------------------------------------------- v4: held lists


def split_held(obj: Any) -> tuple[Any, tuple[str, ...]]:
    """Take the v4 ``held`` list off a signed-ack object a peer sent (docs/protocol.md 13).

    ``held`` must be a list of distinct msg_ids, each one of the ack's own
    ``ack`` ids; anything else raises ``ValueError``.  An object without
    ``held`` (any older peer) passes through unchanged, with nothing attested.
    """
    if not isinstance(obj, dict) or "held" not in obj:
        return obj, ()
    held, acked = obj["held"], obj.get("ack")
    if not isinstance(held, list) or not isinstance(acked, list):
        raise ValueError("held must be a list of the ack's msg_ids")
    # The ids first: set() of an unhashable item (a list, a dict) would raise TypeError.
    if (
        not all(is_msg_id(m) for m in held)
        or len(set(held)) != len(held)
        or not set(held) <= {m for m in acked if isinstance(m, str)}
    ):
        raise ValueError("held must list distinct msg_ids of the ack's own ack list")
    return {k: v for k, v in obj.items() if k != "held"}, tuple(held)


def with_held(text: str, held: Any) -> str:
    """A canonical signed-ack text with the v4 ``held`` list added as its last key (none: unchanged)."""
    if not held:
        return text
    return text[:-1] + ',"held":' + dumps_json(list(held)).decode("ascii") + "}"


def held_response_cap(cap: int) -> int:
    """What a puller accepts when it asked for ``held`` lists: each ack may grow by at most its own ack list."""
    return 2 * cap


def _ack_key(obj: Any) -> tuple[str, str]:
    if not isinstance(obj, dict) or obj.keys() != {"mailbox", "nonce"}:
        raise ValueError('an ack key must be {"mailbox", "nonce"}')
    mailbox, nonce = obj["mailbox"], obj["nonce"]
    if not is_mailbox(mailbox) or not is_nonce(nonce):
        raise ValueError("an ack key needs a canonical b64u mailbox and nonce")
    return mailbox, nonce


def parse_bodies_request(obj: Any) -> tuple[list[str], list[tuple[str, str]]]:
    """``{"envelopes": [msg_id...], "acks": [{mailbox, nonce}...]}``; ValueError when malformed."""
    if not isinstance(obj, dict) or obj.keys() != {"envelopes", "acks"}:
        raise ValueError('body must be {"envelopes": [...], "acks": [...]}')
    envs, acks = obj["envelopes"], obj["acks"]
    if not isinstance(envs, list) or not isinstance(acks, list):
        raise ValueError("envelopes and acks must be lists")
    if len(envs) + len(acks) > MAX_BODIES:
        raise ValueError(f"at most {MAX_BODIES} entries per bodies request")
    if not all(is_msg_id(m) for m in envs):
        raise ValueError("envelopes must be msg_ids (64 lowercase hex)")
    return list(envs), [_ack_key(a) for a in acks]


def parse_bodies(obj: Any, asked_envelopes: int, asked_acks: int) -> BodiesAnswer:
    """Validate a ``bodies`` answer (no more items than were asked for)."""
    if not isinstance(obj, dict) or obj.get("ok") is not True:
        raise PeerError("bodies answer is not {ok: true, ...}")
    envs, acks, gone = obj.get("envelopes"), obj.get("acks"), obj.get("gone")
    if not isinstance(envs, list) or not isinstance(acks, list) or not isinstance(gone, dict):
        raise PeerError("bodies answer needs envelopes, acks and gone")
    gone_envs, gone_acks = gone.get("envelopes"), gone.get("acks")
    if not isinstance(gone_envs, list) or not isinstance(gone_acks, list):
        raise PeerError("bodies gone needs envelopes and acks")
    if len(envs) + len(gone_envs) > asked_envelopes or len(acks) + len(gone_acks) > asked_acks:
        raise PeerError("bodies answer has more items than were asked for")
    if not all(is_msg_id(m) for m in gone_envs):
        raise PeerError("bodies gone envelopes must be msg_ids")
    try:
        gone_ack_keys = [_ack_key(a) for a in gone_acks]
    except ValueError as e:
        raise PeerError(str(e)) from None
    return BodiesAnswer(envs, acks, list(gone_envs), gone_ack_keys)
