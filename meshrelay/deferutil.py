"""Small Deferred helpers shared by the core and the web layer."""

from __future__ import annotations

from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

T = TypeVar("T")


def shield(d: Deferred[T]) -> Deferred[T]:
    """A new Deferred with ``d``'s result; cancelling it leaves ``d`` alone.

    Klein cancels a route's Deferred when the client disconnects.  Work that
    must finish anyway (a commit and what follows it: waking long-polls,
    queueing pushes) is chained on ``d``; the route awaits ``shield(d)``.
    A result that arrives after the shield was cancelled is dropped quietly.
    """
    out: Deferred[T] = Deferred()

    def deliver(result: Any) -> None:
        if out.called:
            return None
        if isinstance(result, Failure):
            out.errback(result)
        else:
            out.callback(result)
        return None

    d.addBoth(deliver)
    return out
