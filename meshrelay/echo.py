"""Echo suppression (docs/protocol.md section 14): what each peer is known to hold.

An envelope pushed from node A to node B comes back to A in B's feed, and
from A's feed to B, at every sync run: each side then lists, parses and
looks up an id the other side is known to hold.  Between two version-5
nodes each process has a random *incarnation* token.  A node remembers,
per peer and per that peer's incarnation, the msg_ids the peer is known to
hold:

- the peer pushed them here (a push from incarnation T: the peer committed
  them before pushing);
- the peer answered a push from here with ``accepted`` or ``duplicate``
  and named its incarnation T.

When the peer then pulls a feed page naming the same incarnation, those
envelopes are left out of the page (``next`` and ``more`` are unchanged).

Why this is safe: a peer only stops holding an envelope by an ack (its
tombstone then refuses the envelope anyway) or by expiry (which happens
everywhere), or by losing its data, which takes a restart: a restarted
process has a new incarnation, and nothing learned about the old one is
used for it.  The memory is only in this process: a restart here forgets
it, and the next pages list everything again.  A node of several processes
sharing one store (PostgreSQL) has one incarnation per process, which only
means less is left out.

Memory is bounded: at most :data:`MAX_TOKENS_PER_PEER` incarnations and
:data:`MAX_IDS_PER_PEER` ids per peer, the oldest dropped first (a dropped
id is listed again: nothing is lost, only work is not saved).
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterable
from typing import Protocol, TypeVar

from meshrelay.envelope import b64u_encode

#: ids remembered per peer (over all its incarnations): about 100 bytes each
MAX_IDS_PER_PEER = 32_768
#: incarnations remembered per peer (a multi-process peer has one per process)
MAX_TOKENS_PER_PEER = 8
#: an incarnation token: 16 random bytes in canonical unpadded base64url (the last character
#: carries 4 unused low bits, zero)
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{21}[AQgw]")


class _Item(Protocol):
    """A feed item as :meth:`PeerHoldings.leave_out` reads it (``store.base.FeedItem``)."""

    @property
    def kind(self) -> str: ...

    @property
    def key(self) -> str: ...


ItemT = TypeVar("ItemT", bound=_Item)


def new_token() -> str:
    """A fresh incarnation token (16 random bytes, b64u)."""
    return b64u_encode(os.urandom(16))


def is_token(value: object) -> bool:
    """Whether ``value`` is a well-formed incarnation token."""
    return isinstance(value, str) and _TOKEN_RE.fullmatch(value) is not None


class PeerHoldings:
    """Per peer and incarnation: msg_ids the peer is known to hold (bounded, in memory)."""

    def __init__(self, max_ids: int = MAX_IDS_PER_PEER, max_tokens: int = MAX_TOKENS_PER_PEER) -> None:
        #: this process's own incarnation, sent with its pushes and pulls
        self.token = new_token()
        self.max_ids = max_ids
        self.max_tokens = max_tokens
        #: peer -> token -> msg_ids (dicts keep insertion order: the oldest first)
        self._held: dict[str, dict[str, dict[str, bool]]] = {}

    def learn(self, peer: str, token: str, msg_ids: Iterable[str]) -> None:
        """``peer``, at incarnation ``token``, holds these envelopes."""
        tokens = self._held.setdefault(peer, {})
        ids = tokens.get(token)
        if ids is None:
            if len(tokens) >= self.max_tokens:
                del tokens[next(iter(tokens))]
            ids = tokens[token] = {}
        ids.update(dict.fromkeys(msg_ids, True))
        # Over the bound: drop the oldest ids, oldest incarnation first.
        excess = self.size(peer) - self.max_ids
        while excess > 0:
            first = next(iter(tokens))
            oldest = tokens[first]
            if excess >= len(oldest):
                excess -= len(oldest)
                del tokens[first]
            else:
                for m in list(itertools.islice(oldest, excess)):
                    del oldest[m]
                excess = 0

    def leave_out(self, peer: str, token: str, items: list[ItemT]) -> list[ItemT]:
        """A feed page's items for ``peer`` at ``token``, without the envelopes it is known to hold.

        Each id left out is forgotten: the peer's cursor moves past it.
        """
        ids = self._held.get(peer, {}).get(token)
        if not ids:
            return items
        return [i for i in items if i.kind != "envelope" or not ids.pop(i.key, False)]

    def size(self, peer: str) -> int:
        """Ids remembered for ``peer``, over all its incarnations."""
        return sum(len(ids) for ids in self._held.get(peer, {}).values())

    def forget(self, peer: str) -> None:
        """A peer left the config."""
        self._held.pop(peer, None)
