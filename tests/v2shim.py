"""TEMPORARY: the wire-v2 store API (wire-v2.md) over the v1 SQLite store, until the store9 merge."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from twisted.internet.defer import Deferred, succeed

from meshrelay.store.base import ACCEPTED, MAILBOX_FULL, SENDER_CAP, STORAGE_FULL, ChangesPage, FeedItem


@dataclass(frozen=True)
class ShimItem:
    seq: int
    kind: str
    body: str
    size: int = 0
    mailbox: str = ""
    key: str = ""


@dataclass(frozen=True)
class Bodies:
    envelopes: list[str]
    acks: list[str]
    gone_envelopes: list[str]
    gone_acks: list[tuple[str, str]]


@dataclass(frozen=True)
class Refused:
    msg_id: str
    mailbox: str
    peer: str
    reason: str
    expires: int


class V2Shim:
    def __init__(self, inner: Any) -> None:
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "rows", {})

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.inner, name, value)

    def _sync(self, d: Deferred[Any]) -> Any:
        out: list[Any] = []
        d.addBoth(out.append)
        if hasattr(out[0], "raiseException"):
            out[0].raiseException()
        return out[0]

    def changes(
        self,
        since: int,
        limit: int,
        now: int,
        mailbox: str | None = None,
        max_bytes: int | None = None,
        ids_only: bool = False,
    ) -> Deferred[ChangesPage]:
        page = self._sync(self.inner.changes(since, limit, now, mailbox))
        items = []
        used = 0
        cut = False
        for it in page.items:
            size = len(it.body.encode())
            if max_bytes is not None and items and used + size > max_bytes:
                cut = True
                break
            used += size
            obj = json.loads(it.body)
            key = obj["msg_id"] if it.kind == "envelope" else obj["nonce"]
            items.append(ShimItem(it.seq, it.kind, "" if ids_only else it.body, size, obj["mailbox"], key))
        more = page.more or cut
        return succeed(ChangesPage(page.feed, items, items[-1].seq if items else since, more))  # type: ignore[arg-type]

    def missing(self, envelopes: Any, acks: Any, now: int) -> Deferred[Any]:
        c = self.inner._wconn
        envs = [
            (m, k)
            for m, k in envelopes
            if not c.execute("SELECT 1 FROM envelopes WHERE msg_id = ?", (k,)).fetchone()
            and not c.execute(
                "SELECT 1 FROM tombstones WHERE mailbox = ? AND msg_id = ? AND expires > ?", (m, k, now)
            ).fetchone()
        ]
        ak = [
            (m, n)
            for m, n in acks
            if not c.execute("SELECT 1 FROM acks WHERE mailbox = ? AND nonce = ?", (m, n)).fetchone()
        ]
        return succeed((envs, ak))

    def bodies(self, msg_ids: Any, acks: Any, now: int, max_bytes: int) -> Deferred[Bodies]:
        c = self.inner._wconn
        out = Bodies([], [], [], [])
        used = 0
        full = False
        for m in msg_ids:
            row = c.execute("SELECT body FROM envelopes WHERE msg_id = ? AND expires > ?", (m, now)).fetchone()
            if row is None:
                out.gone_envelopes.append(m)
            elif not full:
                size = len(row[0].encode())
                if (out.envelopes or out.acks) and used + size > max_bytes:
                    full = True
                    continue
                used += size
                out.envelopes.append(row[0])
        for mb, n in acks:
            row = c.execute(
                "SELECT body FROM acks WHERE mailbox = ? AND nonce = ? AND expires > ?", (mb, n, now)
            ).fetchone()
            if row is None:
                out.gone_acks.append((mb, n))
            elif not full:
                size = len(row[0].encode())
                if (out.envelopes or out.acks) and used + size > max_bytes:
                    full = True
                    continue
                used += size
                out.acks.append(row[0])
        return succeed(out)

    def add_envelope(self, env: Any, now: int, verify: Any = None, peer: str | None = None) -> Deferred[Any]:
        d = self.inner.add_envelope(env, now, verify) if verify is not None else self.inner.add_envelope(env, now)

        def seen(res: Any) -> Any:
            if res.status == ACCEPTED:
                for key in [k for k in self.rows if k[0] == env.msg_id]:
                    del self.rows[key]
            elif peer is not None and res.status in (SENDER_CAP, MAILBOX_FULL, STORAGE_FULL):
                self.rows[(env.msg_id, peer)] = Refused(env.msg_id, env.mailbox, peer, res.status, env.ts + env.ttl)
            return res

        return d.addCallback(seen)

    def apply_ack(self, ack: Any, expires: int) -> Deferred[Any]:
        def seen(res: Any) -> Any:
            for key in [k for k in self.rows if k[0] in ack.ack and self.rows[k].mailbox == ack.mailbox]:
                del self.rows[key]
            return res

        return self.inner.apply_ack(ack, expires).addCallback(seen)

    def refused(self, now: int, limit: int, mailbox: str | None = None) -> Deferred[list[Refused]]:
        rows = [r for r in self.rows.values() if r.expires > now and (mailbox is None or r.mailbox == mailbox)]
        return succeed(rows[:limit])

    def forget_refused(self, items: Any) -> Deferred[None]:
        for k in items:
            self.rows.pop(tuple(k), None)
        return succeed(None)


__all__ = ["V2Shim", "replace", "FeedItem"]
