"""Answering a group-commit batch's Deferreds: what every backend's writer does once a batch ends."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, FirstError, gatherResults
from twisted.logger import Logger
from twisted.python.failure import Failure

from meshrelay.envelope import Envelope
from meshrelay.store.base import AddResult, StoreError, one_line


def settle_batch(
    outcome: Sequence[tuple[bool, Any]] | Failure,
    waiting: Sequence[Deferred[Any]],
    metrics: Any,
    log: Logger,
) -> None:
    """Answer the operations of one group-commit batch, in order.

    ``outcome`` is a Failure when the whole batch failed (nothing of it
    committed), or one ``(ok, value)`` per operation: its result, or the
    exception that operation alone failed with.  Every failure reaches its
    caller as a :class:`StoreError` and counts in ``store_errors_total``.
    """
    if isinstance(outcome, Failure):
        value = outcome.value
        msg = str(value) if isinstance(value, StoreError) else f"store write failed: {outcome.getErrorMessage()}"
        log.error("store write of {n} operations failed: {err}", n=len(waiting), err=" ".join(msg.split()))
        if metrics is not None:
            metrics.store_errors_total.inc(len(waiting))
        for d in waiting:
            d.errback(StoreError(msg))
        return
    if metrics is not None:
        metrics.commit_batch_size.observe(len(waiting))
    for (ok, result), d in zip(outcome, waiting):
        if ok:
            d.callback(result)
            continue
        if metrics is not None:
            metrics.store_errors_total.inc()
        log.error("store operation failed: {err}", err=one_line(result))
        d.errback(result if isinstance(result, StoreError) else StoreError(one_line(result)))


def settle_items(outcomes: Sequence[tuple[bool, Any]], metrics: Any, log: Logger) -> list[Any]:
    """The values of one multi-item operation (``add_envelopes``); a StoreError if any item failed.

    The items that succeeded are committed either way: a caller that retries
    the whole list finds them as duplicates.  Failures count and log as
    :func:`settle_batch`'s do.
    """
    failed = [value for ok, value in outcomes if not ok]
    if not failed:
        return [value for _, value in outcomes]
    if metrics is not None:
        metrics.store_errors_total.inc(len(failed))
    msg = one_line(failed[0])
    log.error("{n} of {total} store operations failed: {err}", n=len(failed), total=len(outcomes), err=msg)
    raise failed[0] if isinstance(failed[0], StoreError) else StoreError(msg)


def add_each(
    add: Callable[[Envelope, int, str | None, str | None], Deferred[AddResult]],
    envs: Sequence[Envelope],
    now: int,
    verify: str | None,
    peer: str | None,
) -> Deferred[list[AddResult]]:
    """``add_envelopes`` for a backend whose own group commit already batches single adds."""

    def first(f: Failure) -> Failure:
        return f.value.subFailure if isinstance(f.value, FirstError) else f

    d = gatherResults([add(env, now, verify, peer) for env in envs], consumeErrors=True)
    return d.addErrback(first)
