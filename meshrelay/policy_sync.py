"""Mailbox policies across the mesh (protocol v3, docs/protocol.md 12.5).

Policies travel like acks, but on their own small feed: one policy per mailbox,
so a peer's whole policy feed is short, and v1/v2 pullers (which refuse item
kinds they do not know in ``changes``) never see one.

- **push**: when a client stores a new policy, each peer gets it at once with
  ``POST /api/mesh/dm/policies`` ``{"policies": [<policy>]}``; a failure is left
  to the pull.
- **pull**: every ``sync.interval`` (and at start-up) each peer's policy feed is
  read from an in-memory cursor, ``GET /api/mesh/dm/policies?since=<pseq>&limit=<n>``
  page after page; every item is verified and ordered like a client's
  (:meth:`meshrelay.relay.Relay.accept_policies`).  After a restart the
  cursor starts at 0 again: re-applying a policy is a duplicate.
- A peer that answers ``404``/``405`` to the policy routes is before version 3:
  it is left alone (asked again after ``sync.interval``).

Only :class:`PolicyPeer` knows these routes; it sends through the replication
transport of its peer (``request(method, path, query, body)``), so every
request is peer-authenticated and timed out like every other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from meshrelay import policy as P
from meshrelay.envelope import RawJSON, loads_json
from meshrelay.peernet import describe_failure
from meshrelay.protocol import POLICIES_PATH

#: policies per push or page
MAX_POLICIES = 500
#: pages per pull before waiting for the next interval
MAX_PAGES = 100
#: the most bytes a policy page answer may have (a policy is under 400 bytes)
MAX_PAGE_ANSWER = MAX_POLICIES * 512 + 4096

Request = Callable[..., Deferred[tuple[int, bytes]]]


class PolicyFeedError(Exception):
    """A peer's policy answer was not the protocol."""


def parse_policy_page(obj: Any, since: int, limit: int) -> tuple[list[Any], int, bool]:
    """Check a policy page: ``{"ok": true, "items": [{"seq", "policy"}], "next", "more"}``."""
    if not isinstance(obj, dict) or obj.get("ok") is not True:
        raise PolicyFeedError("not a policy page")
    items, nxt, more = obj.get("items"), obj.get("next"), obj.get("more")
    if not isinstance(items, list) or len(items) > limit or type(nxt) is not int or type(more) is not bool:
        raise PolicyFeedError("malformed policy page")
    if nxt < since or (more and nxt == since):
        raise PolicyFeedError("policy page makes no progress")
    policies = []
    for item in items:
        if not isinstance(item, dict) or item.keys() != {"seq", "policy"} or type(item["seq"]) is not int:
            raise PolicyFeedError("malformed policy item")
        policies.append(item["policy"])
    return policies, nxt, more


class PolicyPeer:
    """Policy push and pull with one peer."""

    log = Logger()

    def __init__(self, url: str, request: Request, relay: Any, clock: IReactorTime, interval: float) -> None:
        self.url = url
        self.request = request
        self.relay = relay
        self.clock = clock
        self.interval = interval
        #: the peer's policy feed position (in memory; 0 after a restart)
        self.since = 0
        #: False once the peer answered 404/405: before v3 (asked again at the next pull)
        self.speaks_v3: bool | None = None
        self._loop: LoopingCall | None = None
        self._pulling: Deferred[None] | None = None
        self._outstanding: set[Deferred[Any]] = set()

    def set_interval(self, interval: float) -> None:
        """A reloaded ``sync.interval``: from the next pull on."""
        self.interval = interval
        if self._loop is not None:
            self._loop.interval = interval

    def start(self) -> None:
        self._loop = LoopingCall(self.pull_now)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True).addErrback(lambda f: None)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        for d in list(self._outstanding):
            d.cancel()

    def _track(self, d: Deferred[Any]) -> Deferred[Any]:
        self._outstanding.add(d)

        def forget(result: Any) -> Any:
            self._outstanding.discard(d)
            return result

        return d.addBoth(forget)

    # ------------------------------------------------------------------ push

    def push(self, policy: P.Policy) -> None:
        """Send one new policy to the peer; failures are left to the pull."""
        if self.speaks_v3 is False:
            return
        body = b'{"policies":[' + policy.raw.encode("ascii") + b"]}"
        d = self.request("POST", POLICIES_PATH, "", body)

        def failed(f: Failure) -> None:
            if not f.check(CancelledError):
                self.log.debug("policy push to {peer} failed: {why}", peer=self.url, why=describe_failure(f))

        self._track(d).addErrback(failed)

    # ------------------------------------------------------------------ pull

    def pull_now(self) -> Deferred[None]:
        """Read the peer's policy feed from the cursor (one pull at a time); never fails."""
        if self._pulling is not None:
            return self._pulling
        d = Deferred.fromCoroutine(self._pull())

        def done(result: Any) -> None:
            self._pulling = None
            if isinstance(result, Failure) and not result.check(CancelledError):
                self.log.info("policy pull from {peer} failed: {why}", peer=self.url, why=describe_failure(result))
            return None

        self._pulling = d
        self._track(d).addBoth(done)
        return d

    async def _pull(self) -> None:
        for _ in range(MAX_PAGES):
            status, answer = await self.request(
                "GET", POLICIES_PATH, f"since={self.since}&limit={MAX_POLICIES}", b"", cap=MAX_PAGE_ANSWER
            )
            if status in (404, 405):
                self.speaks_v3 = False
                return
            if status != 200:
                raise PolicyFeedError(f"HTTP {status}")
            self.speaks_v3 = True
            policies, nxt, more = parse_policy_page(loads_json(answer), self.since, MAX_POLICIES)
            if policies:
                await self.relay.accept_policies(policies)
            self.since = nxt
            if not more:
                return


def policies_page(rows: list[tuple[int, str]], since: int, limit: int) -> dict[str, Any]:
    """The answer to a policy feed read: rows ``(pseq, body)`` of one page (at most ``limit + 1``)."""
    page = rows[:limit]
    return {
        "ok": True,
        "items": [{"seq": seq, "policy": RawJSON(body)} for seq, body in page],
        "next": page[-1][0] if page else since,
        "more": len(rows) > limit,
    }
