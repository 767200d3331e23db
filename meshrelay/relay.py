"""The relay core: deposits, replicas, polls, acks, caps and long-poll waiters.

Routes call one method here and encode its result; nothing here knows about
HTTP.  Every refusal is a :class:`~meshrelay.errors.MeshError`.  Work that must
happen once a write has committed (waking long-polls, queueing pushes) is
chained on the store's Deferred itself, so a client that disconnects cannot
cancel it: callers only ever see a :func:`~meshrelay.deferutil.shield`.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from meshrelay import contact
from meshrelay import envelope as E
from meshrelay import policy as P
from meshrelay import protocol as W
from meshrelay.config import Config
from meshrelay.deferutil import shield
from meshrelay.echo import PeerHoldings
from meshrelay.errors import (
    BadPermit,
    BadRequest,
    BadSignature,
    MailboxFull,
    MeshError,
    RateLimited,
    Replayed,
    SenderCap,
    StalePolicy,
    StorageFull,
    StrangerFull,
)
from meshrelay.fetchgate import RemoteFetchGate
from meshrelay.logs import Aggregator
from meshrelay.metrics import Metrics
from meshrelay.replay import REPLAYED, ReplayCache
from meshrelay.store.base import (
    ACCEPTED,
    BAD_PERMIT,
    BAD_SIGNATURE,
    DUPLICATE,
    MAILBOX_FULL,
    POLICY_FULL,
    POLICY_STALE,
    SENDER_CAP,
    STORAGE_FULL,
    STRANGER_FULL,
    AckResult,
    AddResult,
    Bodies,
    ChangesPage,
    Store,
    StoreError,
    SweepResult,
)
from meshrelay.verifier import Verifier

T = TypeVar("T")

#: add_envelope status -> replica metric outcome
_REPLICA_OUTCOME = {
    ACCEPTED: "accepted",
    DUPLICATE: "duplicate",
    SENDER_CAP: "drop_per_sender_cap",
    MAILBOX_FULL: "drop_full",
    STRANGER_FULL: "drop_stranger_full",
    STORAGE_FULL: "drop_storage_full",
    BAD_SIGNATURE: "bad_signature",
}
#: error code -> deposit metric outcome
_DEPOSIT_OUTCOME = {"too_large": "oversize"}


class ReplicationHooks(Protocol):
    """What the relay tells replication, and asks of it (one typed collaborator)."""

    def envelope_committed(self, env: E.Envelope) -> None:
        """A *client* deposit committed: push it to the peers."""

    def ack_committed(self, ack: E.SignedAck, held: Sequence[str]) -> None:
        """A new *client* ack committed, which deleted ``held`` here: push it to the peers."""

    def fetch_remote(self, mailbox: str) -> Deferred[None] | None:
        """Pull ``mailbox`` from the peers (a poll with fetch_remote); None when there is nobody to ask."""

    def space_freed(self, mailbox: str | None) -> None:
        """Acks deleted envelopes of ``mailbox`` (None: the sweeper expired some): refused replicas may fit now."""


class NoReplication:
    """The replication collaborator of a node without peers: does nothing."""

    def envelope_committed(self, env: E.Envelope) -> None:
        pass

    def ack_committed(self, ack: E.SignedAck, held: Sequence[str]) -> None:
        pass

    def fetch_remote(self, mailbox: str) -> Deferred[None] | None:
        return None

    def space_freed(self, mailbox: str | None) -> None:
        pass


NO_REPLICATION: ReplicationHooks = NoReplication()


def _run(coro: Coroutine[Any, Any, T]) -> Deferred[T]:
    return Deferred.fromCoroutine(coro)


def _reraise(_: Any, e: BaseException) -> Any:
    raise e


class _Waiter:
    """One waiting long-poll.  Woken (at most once) by an arrival or its timeout."""

    __slots__ = ("mailbox", "share", "woken", "_d", "_timer")

    def __init__(self, mailbox: str, share: str) -> None:
        self.mailbox = mailbox
        #: the share of waiting polls it counts against (its client's address key, or its mailbox)
        self.share = share
        self.woken = False
        self._d: Deferred[None] | None = None
        self._timer: IDelayedCall | None = None

    def wake(self) -> None:
        if self.woken:
            return
        self.woken = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._d is not None and not self._d.called:
            self._d.callback(None)

    def wait(self, clock: IReactorTime, timeout: float) -> Deferred[None]:
        """Fire after a wake or ``timeout`` seconds; cancelling stops the timer."""

        def cancel(_: Deferred[None]) -> None:
            self.woken = True
            if self._timer is not None and self._timer.active():
                self._timer.cancel()

        self._d = Deferred(cancel)
        if self.woken:
            self._d.callback(None)
        else:
            self._timer = clock.callLater(timeout, self.wake)
        return self._d


class Relay:
    """The domain core of one node."""

    log = Logger()

    def __init__(
        self,
        store: Store,
        config: Config,
        clock: IReactorTime,
        metrics: Metrics | None = None,
        verifier: Verifier | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.limits = config.limits
        self.clock = clock
        self.metrics = metrics if metrics is not None else Metrics()
        self.verifier = verifier if verifier is not None else Verifier()
        skew = self.limits.clock_skew
        self.poll_nonces = ReplayCache(2 * skew, self.limits.max_nonces)
        #: mailbox -> waiters; the values are insertion-ordered dicts used as sets
        self._waiters: dict[str, dict[_Waiter, None]] = {}
        self._waiting = 0
        #: share key -> waiting polls (only keys with at least one)
        self._waiting_by_share: dict[str, int] = {}
        #: push, fetch_remote and refetch of refused replicas (set by replication while it runs)
        self.replication: ReplicationHooks = NO_REPLICATION
        #: per-request log lines (cap hits, refusals, peer auth failures...): one per reason per
        #: minute, with counts; the node's APIs share it
        self.log_agg = Aggregator(clock, 60.0)
        #: v5 (docs/protocol.md 14): this process's incarnation, and what each peer is known to hold
        self.holdings = PeerHoldings()
        #: the bounds on fetch_remote (coalescing, interval, concurrency, timeout) around replication's
        sync = config.sync
        self.fetch_gate = RemoteFetchGate(
            clock,
            self._remote_fetch,
            max_concurrent=sync.fetch_remote_max_concurrent,
            min_interval=sync.fetch_remote_min_interval,
            timeout=sync.fetch_remote_timeout,
            on_outcome=lambda outcome: self.metrics.fetch_remote_total.labels(outcome).inc(),
            log_agg=self.log_agg,
        )
        #: first contact (v3): the newest policy of each mailbox, loaded from the store
        self.policies = contact.PolicyBook()
        #: permits whose signature verified (a contact's later messages skip that check)
        self.permits = contact.PermitCache()
        self._load_policies()
        #: called after a *client* sets a new policy (replication pushes it)
        self.policy_listeners: list[Callable[[P.Policy], None]] = []
        self._update_gauges()

    def reconfigure(self, config: Config) -> None:
        """Take a reloaded config's limits and fetch_remote bounds (read per request from here on)."""
        self.config = config
        self.limits = config.limits
        self.poll_nonces.window = 2 * config.limits.clock_skew
        self.poll_nonces.max_entries = config.limits.max_nonces
        sync = config.sync
        gate = self.fetch_gate
        gate.max_concurrent = sync.fetch_remote_max_concurrent
        gate.min_interval = sync.fetch_remote_min_interval
        gate.timeout = sync.fetch_remote_timeout

    # ------------------------------------------------------------------ helpers

    def now(self) -> int:
        return int(self.clock.seconds())

    def _update_gauges(self) -> None:
        stats = self.store.stats()
        self.metrics.stored_envelopes.set(stats.envelopes)
        self.metrics.stored_bytes.set(stats.bytes)

    def _cap_hit(self, cap: str, fmt: str, level: LogLevel = LogLevel.info, **fields: Any) -> None:
        self.log_agg.emit(self.log, "cap:" + cap, "cap hit: " + fmt, level, cap=cap, **fields)

    def attach_replication(self, hooks: ReplicationHooks | None) -> None:
        """Install (or with None remove) the replication collaborator."""
        self.replication = hooks if hooks is not None else NO_REPLICATION

    # Replication must never fail a write that has committed: these three never raise.

    def _envelope_committed(self, env: E.Envelope) -> None:
        try:
            self.replication.envelope_committed(env)
        except Exception:
            self._replication_failed("a deposit")

    def _ack_committed(self, ack: E.SignedAck, held: Sequence[str]) -> None:
        try:
            self.replication.ack_committed(ack, held)
        except Exception:
            self._replication_failed("an ack")

    def _space_freed(self, mailbox: str | None) -> None:
        try:
            self.replication.space_freed(mailbox)
        except Exception:
            self._replication_failed("freed space")

    def _replication_failed(self, what: str) -> None:
        self.log_agg.emit(
            self.log, "replication_failed", "replication failed to take " + what, LogLevel.critical, Failure()
        )

    def _remote_fetch(self, mailbox: str) -> Deferred[None]:
        d = self.replication.fetch_remote(mailbox)
        return d if d is not None else succeed(None)

    async def _verify(self, key: bytes, sig: bytes, msg: bytes) -> None:
        E.require_valid_signature(await shield(self.verifier.verify(key, sig, msg)))

    # ------------------------------------------------------------------ envelopes

    def _store_envelope(self, env: E.Envelope, verify: str | None = None) -> Deferred[AddResult]:
        """Add a client's ``env``; on commit wake its mailbox's long-polls and push it to the peers.

        With ``verify`` a store that ``verifies_signatures`` checks the signature in its writer.
        """

        def committed(result: AddResult) -> AddResult:
            if result.status == ACCEPTED:
                self._update_gauges()
                self.wake(env.mailbox)
                self._envelope_committed(env)
            return result

        return self.store.add_envelope(env, self.now(), verify=verify).addCallback(committed)

    def _store_replicas(
        self, envs: list[E.Envelope], verify: str | None, peer: str | None
    ) -> Deferred[list[AddResult]]:
        """Add a page of replicas as one store operation; on commit wake the mailboxes of those accepted."""
        now = self.now()

        def committed(results: list[AddResult]) -> list[AddResult]:
            accepted = False
            for env, result in zip(envs, results):
                if result.status == ACCEPTED:
                    accepted = True
                    self.wake(env.mailbox)
                    self.metrics.replication_lag.observe(max(0, now - env.ts))
            if accepted:
                self._update_gauges()
            return results

        return self.store.add_envelopes(envs, now, verify=verify, peer=peer).addCallback(committed)

    def deposit(self, obj: Any) -> Deferred[dict[str, Any]]:
        """A client deposit (3.1): size, shape, msg_id, signature, time, dedup, caps.

        One path whoever checks the signature.  A deposit refused before the
        store (the time rule, first contact) is verified here, so that a
        forged one still answers bad_signature, as the order of 3.1 says.
        Otherwise, with a store that ``verifies_signatures``, the hot path:
        plain callbacks, no coroutine, the signature (and an unknown permit's)
        verified in the writer (off this thread, before dedup); with one that
        does not, verified here before first contact admits it.
        """
        started = self.clock.seconds()
        lim = self.limits
        d: Deferred[Any]
        try:
            # The request body is ours: the v3 fields are taken off it in place.
            body, extras = P.split_extras(obj, copy=False)
            env = E.parse_envelope(body, lim.max_message_bytes)
        except MeshError as e:
            return fail(self._deposit_refused(e))
        try:
            E.check_deposit_time(env, self.now(), lim.clock_skew, lim.min_ttl, lim.max_ttl)
            if self.store.verifies_signatures:
                d = shield(self._store_envelope(self._admit_unverified(env, extras), verify="deposit"))
            else:
                d = _run(self._verify_then_store(env, extras))
        except MeshError as e:
            # Refused before the store: a forged envelope answers bad_signature instead.
            d = _run(self._verify(env.sender_key, env.sig_bytes, env.signed))
            d.addCallback(_reraise, e)
        d.addErrback(self._deposit_error)
        return d.addCallback(self._deposit_result, env, started)

    async def _verify_then_store(self, env: E.Envelope, extras: P.Extras) -> AddResult:
        await self._verify(env.sender_key, env.sig_bytes, env.signed)
        env = await self._admit(env, extras)
        return await shield(self._store_envelope(env))

    def _admit_unverified(self, env: E.Envelope, extras: P.Extras) -> E.Envelope:
        """First contact (v3) for a store that verifies: no I/O, the policy's rules and the permit's fields.

        A permit not verified before is left on the envelope for the writer, which checks it after the envelope.
        """
        policy = self.policies.get(env.mailbox)
        if extras is P.NO_EXTRAS and policy is None:
            return env
        permit = extras.permit
        check = None
        if permit is not None and not self.permits.known(permit):
            check = (permit.mailbox_key, permit.sig_bytes, permit.signed)
        return contact.admitted(env, extras, policy, permit is not None, check)

    async def _admit(self, env: E.Envelope, extras: P.Extras) -> E.Envelope:
        """First contact (v3): the permit, the mailbox policy's stranger rules, the bucket (12.3, 12.4)."""
        policy = self.policies.get(env.mailbox)
        if extras is P.NO_EXTRAS and policy is None:
            return env
        ok = await shield(contact.verify_permit(self.verifier, extras, self.permits)) if extras.permit else False
        return contact.admitted(env, extras, policy, ok)

    def _deposit_refused(self, e: MeshError) -> MeshError:
        self.metrics.deposit_total.labels(_DEPOSIT_OUTCOME.get(e.code, e.code)).inc()
        return e

    def _deposit_error(self, failure: Failure) -> Failure:
        if isinstance(failure.value, MeshError):
            self._deposit_refused(failure.value)
        return failure

    def _deposit_result(self, result: AddResult, env: E.Envelope, started: float) -> dict[str, Any]:
        status = result.status
        if status == BAD_PERMIT:
            self.metrics.deposit_total.labels(status).inc()
            raise BadPermit("the permit's signature is not the mailbox owner's")
        if env.permit_check is not None and (status == ACCEPTED or status == DUPLICATE):
            _, sig, signed = env.permit_check
            self.permits.add_signed(signed, sig)
        self.metrics.deposit_total.labels(status).inc()
        if status == ACCEPTED or status == DUPLICATE:
            self.metrics.deposit_latency.observe(self.clock.seconds() - started)
            return {"ok": True, "msg_id": env.msg_id, "duplicate": status == DUPLICATE}
        if status == BAD_SIGNATURE:
            E.require_valid_signature(False)
        if status == SENDER_CAP:
            self._cap_hit(
                "per_sender_pending",
                "per-sender cap reached for a mailbox ({pending}/{limit}); deposit refused",
                pending=result.pending,
                limit=result.limit,
            )
            raise SenderCap("too many pending envelopes from this sender", pending=result.pending, limit=result.limit)
        if status == MAILBOX_FULL:
            self._cap_hit("per_mailbox_pending", "mailbox cap reached ({limit}); deposit refused", limit=result.limit)
            raise MailboxFull("the mailbox is full")
        if status == STRANGER_FULL:
            self._cap_hit("stranger_cap", "stranger bucket full ({limit}); deposit refused", limit=result.limit)
            raise StrangerFull("the mailbox takes no more mail from strangers for now")
        self._cap_hit(
            "max_stored_bytes",
            "storage cap reached: refusing deposits until acks or expiry free space",
            LogLevel.warn,
        )
        raise StorageFull("the node's storage is full")

    def accept_replicas(
        self, objs: list[Any], peer: str | None = None, new: bool = False
    ) -> Deferred[list[dict[str, Any]]]:
        """Replicas from ``peer`` (push, sync, refetch, fetch_remote): per-envelope results, never pushed on.

        A replica refused at a cap is remembered by the store with ``peer``, so
        replication can obtain it again from that peer once space frees.
        ``new`` says the caller fetched these because this node lacks them (an
        ids-first pull): they are then verified on this node's verifier threads
        rather than in the store's writer, so a catch-up uses both, and the
        writer only stores.  Otherwise (a push may carry many duplicates) a
        store that verifies does it in its writer, only for replicas it does
        not hold.
        """
        return _run(self._accept_replicas(objs, peer, new))

    async def _accept_replicas(self, objs: list[Any], peer: str | None, new: bool) -> list[dict[str, Any]]:
        lim = self.limits
        results: list[dict[str, Any] | None] = [None] * len(objs)
        parsed: list[tuple[int, E.Envelope]] = []
        extras: dict[int, P.Extras] = {}
        for i, obj in enumerate(objs):
            try:
                body, extra = P.split_extras(obj)
                parsed.append((i, E.parse_envelope(body, lim.max_message_bytes)))
                if extra is not P.NO_EXTRAS:
                    extras[i] = extra
            except MeshError as e:
                results[i] = self._replica_rejected(obj, e)
        now = self.now()
        # Verified in the store's writer (only the replicas it does not hold) when the store
        # verifies and these are not ``new``; otherwise every one on the verifier here.
        in_store = self.store.verifies_signatures and not new
        late: dict[int, MeshError] = {}
        for i, env in parsed:
            try:
                E.check_replica_time(env, now, lim.clock_skew, lim.min_ttl, lim.max_ttl)
            except MeshError as e:
                late[i] = e
        # Those the time rule refuses are verified here either way, so a forged one reports bad_signature.
        here = [(i, env) for i, env in parsed if not in_store or i in late]
        checks = [(env.sender_key, env.sig_bytes, env.signed) for _, env in here]
        verdicts = await shield(self.verifier.verify_many(checks)) if checks else []
        forged = {i for (i, _), ok in zip(here, verdicts) if not ok}
        kept = []
        for i, env in parsed:
            if i in forged:
                results[i] = self._replica_rejected(env.to_json(), BadSignature("signature does not verify"))
            elif i in late:
                results[i] = self._replica_rejected(env.to_json(), late[i])
            else:
                kept.append((i, env))
        parsed = kept
        # First contact (v3): every replica is admitted exactly like a deposit (12.5).
        admitted: list[tuple[int, E.Envelope]] = []
        for i, env in parsed:
            try:
                admitted.append((i, await self._admit(env, extras.get(i, P.NO_EXTRAS))))
            except MeshError as e:
                results[i] = self._replica_rejected(env.to_json(), e)
        parsed = admitted
        envs = [env for _, env in parsed]
        done = await shield(self._store_replicas(envs, "replica" if in_store else None, peer)) if envs else []
        refused: dict[str, int] = {}
        outcomes: dict[str, int] = {}
        for (i, env), res in zip(parsed, done):
            outcomes[res.status] = outcomes.get(res.status, 0) + 1
            if res.status in (ACCEPTED, DUPLICATE):
                results[i] = {"msg_id": env.msg_id, "status": res.status}
            else:
                results[i] = {"msg_id": env.msg_id, "status": "rejected", "error": res.status}
                if res.status != BAD_SIGNATURE:  # a forgery, not a cap (counted in replica_total)
                    refused[res.status] = refused.get(res.status, 0) + 1
        for status, n in outcomes.items():  # one metric update per outcome, not per replica
            self.metrics.replica_total.labels(_REPLICA_OUTCOME[status]).inc(n)
        for status, n in refused.items():
            self._cap_hit("replica_" + status, "{n} replica(s) refused at a cap ({status})", n=n, status=status)
        return [r for r in results if r is not None]

    def _replica_rejected(self, obj: Any, e: MeshError) -> dict[str, Any]:
        self.metrics.replica_total.labels(e.code).inc()
        msg_id = obj.get("msg_id") if isinstance(obj, dict) else None
        return {"msg_id": msg_id if isinstance(msg_id, str) else None, "status": "rejected", "error": e.code}

    # ------------------------------------------------------------------ acks

    def _store_ack(self, ack: E.SignedAck, origin: str, attested: Sequence[str] = ()) -> Deferred[AckResult]:
        lim = self.limits
        expires = E.tombstone_expiry(ack.ts, lim.max_ttl, lim.clock_skew)

        def committed(result: AckResult) -> AckResult:
            if result.deleted:
                self.metrics.acks_total.inc(len(result.deleted))
                self._update_gauges()
                self._space_freed(ack.mailbox)
            if origin == "client" and result.new:
                self._ack_committed(ack, result.deleted)
            return result

        d = self.store.apply_ack(ack, expires, from_peer=origin == "peer", attested=attested)
        return d.addCallback(committed)

    def accept_acks(self, objs: list[Any]) -> Deferred[list[dict[str, Any]]]:
        """Signed acks from a peer (5.2): verified against the mailbox key, never pushed on.

        An ack from a v4 peer may carry ``held`` (docs/protocol.md 13): the
        ids the peer held; their tombstones here are not junk.
        """
        return _run(self._accept_acks(objs))

    async def _accept_acks(self, objs: list[Any]) -> list[dict[str, Any]]:
        lim = self.limits
        out: list[dict[str, Any]] = []
        for obj in objs:
            try:
                try:
                    obj, held = W.split_held(obj)
                except ValueError as e:
                    raise BadRequest(str(e)) from None
                ack = E.parse_signed_ack(obj)
                if not ack.ack:
                    raise BadRequest("a signed ack must list at least one msg_id")
                await self._verify(ack.mailbox_key, ack.sig_bytes, ack.signed)
                E.check_ack_replica_time(ack, self.now(), lim.clock_skew, lim.max_ttl)
                await shield(self._store_ack(ack, "peer", held))
            except MeshError as e:
                self.metrics.ack_intake_total.labels(e.code).inc()
                out.append({"status": "rejected", "error": e.code})
                continue
            self.metrics.ack_intake_total.labels("applied").inc()
            out.append({"status": "applied"})
        return out

    # ------------------------------------------------------------------ polls

    async def _authorize(self, req: E.PollRequest) -> None:
        """Signature, time and nonce of a poll/count; the nonce is used up on success."""
        auth = req.auth
        await self._verify(auth.mailbox_key, auth.sig_bytes, auth.signed)
        now = self.now()
        E.check_poll_time(auth, now, self.limits.clock_skew)
        # Kept 2 x skew (docs/protocol.md 4.4), and past every moment a request with this ts is in time
        # (|ts - now| <= skew, so ts + skew < expires): a sweep never frees a nonce a replay could use.
        expires = now + 2 * self.limits.clock_skew + 1
        verdict = await self.poll_nonces.use(
            (auth.mailbox, auth.nonce),
            self.now,
            lambda: self.store.claim_nonce("poll:" + auth.mailbox, auth.nonce, expires),
        )
        if verdict == REPLAYED:
            raise Replayed("nonce already used")

    def poll(self, obj: Any, client: str | None = None) -> Deferred[dict[str, Any]]:
        """A poll (3.2): acks first, then up to ``limit`` messages; long-polls when asked.

        ``client`` is the share key of the client's address: a long-poll counts
        against its share of waiting polls (``max_waiting_polls_per_address``).
        Without one (the address means nothing) the mailbox's share is used.
        """
        return _run(self._counted(self._poll(obj, client)))

    def count(self, obj: Any) -> Deferred[dict[str, Any]]:
        """A count (3.3): a read-only poll that still uses up its nonce."""
        return _run(self._counted(self._count(obj)))

    async def _counted(self, coro: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
        try:
            result = await coro
        except MeshError as e:
            self.metrics.polls_total.labels(e.code).inc()
            raise
        self.metrics.polls_total.labels("ok").inc()
        return result

    async def _count(self, obj: Any) -> dict[str, Any]:
        req = E.parse_poll(obj, count=True)
        await self._authorize(req)
        n = await shield(self.store.count(req.auth.mailbox, self.now()))
        return {"ok": True, "count": n}

    async def _poll(self, obj: Any, client: str | None = None) -> dict[str, Any]:
        req = E.parse_poll(obj)
        share = client if client is not None else "mailbox:" + req.auth.mailbox
        if req.wait > 0 and not req.auth.ack:
            # A long-poll from an address (or mailbox) whose share of waiting polls is full is
            # refused before its signature check, nonce claim and reads: a flood of them costs the
            # node a parse, not a store write each (issue 10).  A poll that acks still gets its
            # acks applied first (acks free space), and one without wait is served.  The node-wide
            # bound is checked only when the poll would really wait (mail pending is served).
            self._check_share(share)
        await self._authorize(req)
        auth = req.auth
        if auth.ack:
            await shield(self._store_ack(auth, "client"))
        if req.fetch_remote and self.replication is not NO_REPLICATION:
            await self._fetch_remote(auth.mailbox)
        result = await self._messages(auth.mailbox, req.limit)
        if result["messages"] or req.wait == 0:
            return result
        # Register, then look again: an envelope that committed between the
        # first read and the registration is found by the second read, one
        # that commits later wakes the waiter.  Only a poll that really waits
        # counts toward max_waiting_polls.
        waiter = self._register(auth.mailbox, share)
        try:
            result = await self._messages(auth.mailbox, req.limit)
            if result["messages"]:
                return result
            await waiter.wait(self.clock, req.wait)
            return await self._messages(auth.mailbox, req.limit)
        finally:
            self._unregister(waiter)

    async def _messages(self, mailbox: str, limit: int) -> dict[str, Any]:
        bodies, more = await shield(self.store.fetch(mailbox, self.now(), limit))
        # Clients get the v1 text: permit and stamp are for nodes (v3, 12.5).
        return {"ok": True, "messages": [E.RawJSON(E.strip_v3_fields(b)) for b in bodies], "has_more": more}

    async def _fetch_remote(self, mailbox: str) -> None:
        # Bounded, coalesced and never failing: see meshrelay.fetchgate.
        await self.fetch_gate.run(mailbox)

    # ------------------------------------------------------------------ waiters

    def _register(self, mailbox: str, share: str | None = None) -> _Waiter:
        share = share if share is not None else "mailbox:" + mailbox
        if self._waiting >= self.limits.max_waiting_polls:
            self._cap_hit(
                "max_waiting_polls",
                "{limit} long-polls already waiting; refusing more with rate_limited",
                limit=self.limits.max_waiting_polls,
            )
            raise RateLimited("too many waiting polls on this node")
        self._check_share(share)
        waiter = _Waiter(mailbox, share)
        self._waiters.setdefault(mailbox, {})[waiter] = None
        self._waiting_by_share[share] = self._waiting_by_share.get(share, 0) + 1
        self._waiting += 1
        self.metrics.waiting_polls.set(self._waiting)
        return waiter

    def _per_share(self) -> int:
        # An address's share, and never more than half of all: no one address holds every slot.
        return min(self.limits.max_waiting_polls_per_address, max(1, self.limits.max_waiting_polls // 2))

    def share_full(self, share: str) -> bool:
        """Whether ``share`` (an address, or a mailbox) already has its share of waiting polls."""
        per_share = self._per_share()
        return bool(per_share) and self._waiting_by_share.get(share, 0) >= per_share

    def _share_refusal(self, share: str) -> RateLimited | None:
        """The refusal of a long-poll from ``share`` when it already has its share of waiting polls (logged)."""
        if not self.share_full(share):
            return None
        self._cap_hit(
            "max_waiting_polls_per_address",
            "an address (or mailbox) already has {limit} long-polls waiting; refusing more with rate_limited",
            limit=self._per_share(),
        )
        return RateLimited("too many waiting polls from this address")

    def _check_share(self, share: str) -> None:
        """Raise RateLimited when ``share`` (an address, or a mailbox) already has its share of waiting polls."""
        refusal = self._share_refusal(share)
        if refusal is not None:
            raise refusal

    def refuse_over_share(self, obj: Any, client: str) -> tuple[MeshError, int] | None:
        """The refusal of a long-poll over its address's share, decided with no Deferred, and how
        long it may be held before it is answered; None: serve it as usual.

        The cheap path of docs/protocol.md 4.4 step 8 for a flood of long-polls from one address:
        a poll with ``wait > 0`` and no ``ack`` from an address whose share of waiting polls is
        full is refused right after its shape check, exactly as :meth:`poll` would refuse it
        (``429 rate_limited``, counted and logged the same), but without the coroutine and
        Deferred machinery :meth:`poll` runs (issue 10: about 200 such refusals a second per
        node, each of which the node's reactor serves before the next honest request).  A body
        that is not a poll of that kind is left to :meth:`poll` (its shape errors included).

        The hold is ``min(wait, limits.over_share_hold)`` seconds (4.4 step 8): a client that
        re-sends refused long-polls at once is answered a few times a minute, not hundreds of
        times a second, and such refusals stop coming in bursts.
        """
        if not self.share_full(client):
            return None
        try:
            req = E.parse_poll(obj)
        except MeshError:
            return None
        if req.wait <= 0 or req.auth.ack:
            return None
        refusal = self._share_refusal(client)
        if refusal is None:
            return None
        self.metrics.polls_total.labels(refusal.code).inc()
        return refusal, min(req.wait, self.limits.over_share_hold)

    def _unregister(self, waiter: _Waiter) -> None:
        group = self._waiters.get(waiter.mailbox)
        if group is None or waiter not in group:
            return
        del group[waiter]
        if not group:
            del self._waiters[waiter.mailbox]
        left = self._waiting_by_share.get(waiter.share, 0) - 1
        if left > 0:
            self._waiting_by_share[waiter.share] = left
        else:
            self._waiting_by_share.pop(waiter.share, None)
        self._waiting -= 1
        self.metrics.waiting_polls.set(self._waiting)

    @property
    def waiting(self) -> int:
        return self._waiting

    def waiting_mailboxes(self) -> list[str]:
        """The mailboxes that have long-polls waiting on this node (for a store's wake re-check)."""
        return list(self._waiters)

    def wake(self, mailbox: str) -> None:
        """Wake every long-poll waiting on ``mailbox`` (an envelope arrived for it)."""
        group = self._waiters.get(mailbox)
        if group:
            for waiter in list(group):
                waiter.wake()

    # ------------------------------------------------------------------ policies (v3, section 12.2)

    def _load_policies(self) -> None:
        for text in self.store.load_policies():
            try:
                self.policies.put(P.parse_policy(E.loads_json(text.encode("utf-8"))))
            except MeshError:
                self.log.warn("a stored mailbox policy does not parse; ignored")

    def get_policy(self, mailbox: str) -> dict[str, Any]:
        """The mailbox's newest policy at this node, public (``GET /api/mesh/dm/policy``)."""
        policy = self.policies.get(mailbox)
        return {"ok": True, "policy": None if policy is None else E.RawJSON(policy.raw)}

    def set_policy(self, obj: Any) -> Deferred[dict[str, Any]]:
        """A client stores a signed policy (``POST /api/mesh/dm/policy``); pushed to the peers when new."""
        return _run(self._set_policy(obj))

    async def _set_policy(self, obj: Any) -> dict[str, Any]:
        policy = P.parse_policy(obj)
        status = await self._store_policy(policy, "client")
        if status == POLICY_STALE:
            raise StalePolicy("the node holds a newer policy for this mailbox")
        if status == POLICY_FULL:
            raise StorageFull("the node holds limits.max_policies mailbox policies")
        return {"ok": True, "version": policy.version, "duplicate": status != "accepted"}

    async def _store_policy(self, policy: P.Policy, origin: str) -> str:
        """Verify, time-check and store ``policy``; latest version wins (``accepted``/``duplicate``/``stale``)."""
        ok = await shield(self.verifier.verify(policy.mailbox_key, policy.sig_bytes, policy.signed))
        P.require_policy_signature(ok)
        P.check_policy_time(policy, self.now(), self.limits.clock_skew)
        judged = self.policies.judge(policy)
        if judged != contact.NEWER:
            # Ordered by the book (held at least as new): nothing to write.
            return judged
        status: str = await shield(self.store.put_policy(policy.mailbox, policy.version, policy.policy_id, policy.raw))
        if status == "accepted":
            self.policies.put(policy)
            self.metrics.policy_total.labels(origin).inc()
            if origin == "client":
                for listener in self.policy_listeners:
                    try:
                        listener(policy)
                    except Exception:
                        self.log.failure("a replication listener failed to take a policy")
        elif status == POLICY_STALE:
            self.policies.put(policy)  # keeps the newer one: put orders them
        return status

    def policy_feed(self, since: int, limit: int) -> Deferred[list[tuple[int, str]]]:
        """This node's policy feed for peers: ``(pseq, body)`` after ``since`` (v3, 12.5)."""
        return shield(self.store.policies_since(since, limit))

    def accept_policies(self, objs: list[Any]) -> Deferred[list[dict[str, Any]]]:
        """Signed policies from a peer (push or sync): one result each; never pushed on."""
        return _run(self._accept_policies(objs))

    async def _accept_policies(self, objs: list[Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for obj in objs:
            try:
                policy = P.parse_policy(obj)
                status = await self._store_policy(policy, "peer")
                if status == POLICY_STALE:
                    raise StalePolicy("a newer policy is held")
                if status == POLICY_FULL:
                    raise StorageFull("the node holds limits.max_policies mailbox policies")
            except MeshError as e:
                out.append({"status": "rejected", "error": e.code})
                continue
            out.append({"status": status})
        return out

    # ------------------------------------------------------------------ feed and upkeep

    def changes(
        self,
        since: int,
        limit: int,
        mailbox: str | None = None,
        max_bytes: int | None = None,
        ids_only: bool = False,
    ) -> Deferred[ChangesPage]:
        """One page of this node's feed (5.3): bodies within ``max_bytes``, or ids only (wire v2)."""
        return shield(self.store.changes(since, limit, self.now(), mailbox, max_bytes=max_bytes, ids_only=ids_only))

    def bodies(self, msg_ids: Sequence[str], acks: Sequence[tuple[str, str]], max_bytes: int) -> Deferred[Bodies]:
        """The held envelopes and signed acks among those asked for (wire v2 ``bodies``)."""
        return shield(self.store.bodies(msg_ids, acks, self.now(), max_bytes))

    def with_held(self, ack_texts: Sequence[str]) -> Deferred[list[str]]:
        """Stored signed-ack texts with their v4 ``held`` lists (docs/protocol.md 13).

        An ack's ``held`` lists those of its ids whose tombstone here is not
        junk: mail this node held when it was acked, or that a peer attested.
        """
        parsed: list[tuple[str, list[str]]] = []
        pairs: list[tuple[str, str]] = []
        for text in ack_texts:
            obj = E.loads_json(text.encode("utf-8"))
            mailbox, ids = str(obj["mailbox"]), list(dict.fromkeys(str(m) for m in obj["ack"]))
            parsed.append((mailbox, ids))
            pairs.extend((mailbox, m) for m in ids)
        if not pairs:
            return succeed(list(ack_texts))

        def splice(held: set[tuple[str, str]]) -> list[str]:
            # Junk acks (ids nobody held) are most of what a flood serves: they go out as stored.
            mailboxes = {mailbox for mailbox, _ in held}
            return [
                W.with_held(text, [m for m in ids if (mailbox, m) in held]) if mailbox in mailboxes else text
                for text, (mailbox, ids) in zip(ack_texts, parsed)
            ]

        return shield(self.store.held_tombstones(pairs)).addCallback(splice)

    def sweep(self) -> Deferred[SweepResult | None]:
        """Delete expired envelopes, tombstones, acks and nonces (the sweeper's tick)."""

        def done(result: SweepResult) -> SweepResult:
            self.metrics.tombstones.set(result.live_tombstones)
            for kind in ("envelopes", "tombstones", "acks", "nonces"):
                n = getattr(result, kind)
                if n:
                    self.metrics.expired_total.labels(kind).inc(n)
            if result.envelopes:
                self._update_gauges()
                self._space_freed(None)
                self.log.info(
                    "expiry sweep removed {envelopes} envelopes, {tombstones} tombstones",
                    envelopes=result.envelopes,
                    tombstones=result.tombstones,
                )
            return result

        def failed(f: Failure) -> None:
            if f.check(StoreError):
                # The store said what failed (and counted it); the next tick tries again.
                self.log.warn("expiry sweep stopped: {err}", err=f.value)
            else:
                self.log.failure("expiry sweep failed", f)
            return None

        return self.store.sweep(self.now()).addCallbacks(done, failed)
