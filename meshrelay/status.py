"""The admin listener's ``/status`` page: a small, self-refreshing HTML view for people.

Server-rendered, no JavaScript, every value escaped.  It shows the node (URL,
version, uptime), storage, request rates over the last minute, and one row per
peer from ``node.replication.peer_status()``.

Rates come from :class:`RateSampler`: a ring of counter totals taken every few
seconds on the injected clock.  A rate is ``(total now - total then) /
(now - then)`` against the oldest sample still inside the window, so it is
exact for whatever part of the last minute the ring covers.
"""

from __future__ import annotations

import datetime
import html
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import Counter
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from meshrelay import __version__
from meshrelay.config import Config
from meshrelay.logs import Aggregator
from meshrelay.metrics import Metrics
from meshrelay.store.base import StoreStats

#: page refresh period (seconds, meta refresh)
REFRESH_SECONDS = 5

#: the peer_status() keys of the replication contract, in display order
PEER_KEYS = (
    "url",
    "last_push_outcome",
    "last_push_at",
    "last_sync_outcome",
    "last_sync_at",
    "sync_lag_seconds",
    "queue_depth",
    "inflight",
    "backoff_seconds",
)


def counter_total(counter: Counter, **match: str | tuple[str, ...]) -> float:
    """Sum of a counter's ``_total`` samples whose labels match (a value or a tuple of values)."""
    total = 0.0
    for family in counter.collect():
        for s in family.samples:
            if not s.name.endswith("_total"):
                continue
            ok = True
            for key, want in match.items():
                have = s.labels.get(key)
                if (have not in want) if isinstance(want, tuple) else (have != want):
                    ok = False
                    break
            if ok:
                total += s.value
    return total


_REFUSED_DEPOSITS = ("sender_cap", "mailbox_full", "storage_full", "oversize")


@dataclass(frozen=True)
class Series:
    """One rate shown on the page."""

    key: str
    label: str
    read: Callable[[Metrics], float]


SERIES: tuple[Series, ...] = (
    Series("deposits", "deposits accepted", lambda m: counter_total(m.deposit_total, outcome="accepted")),
    Series(
        "deposits_refused",
        "deposits refused by caps",
        lambda m: counter_total(m.deposit_total, outcome=_REFUSED_DEPOSITS),
    ),
    Series("polls", "polls and counts", lambda m: counter_total(m.polls_total)),
    Series("acks", "envelopes acked", lambda m: counter_total(m.acks_total)),
    Series("replicas", "replicas accepted", lambda m: counter_total(m.replica_total, outcome="accepted")),
    Series("push_ok", "pushed to peers (ok)", lambda m: counter_total(m.push_total, outcome="ok")),
    Series(
        "push_failed",
        "pushed to peers (rejected or error)",
        lambda m: counter_total(m.push_total, outcome=("rejected", "error")),
    ),
    Series("sync_pulls", "sync pages pulled", lambda m: counter_total(m.sync_pull_total)),
    Series("store_errors", "store errors", lambda m: counter_total(m.store_errors_total)),
)


class RateSampler(Service):
    """Takes counter totals every ``interval`` seconds; keeps ``window`` seconds of them."""

    name = "meshrelay-rates"

    def __init__(self, metrics: Metrics, clock: IReactorTime, interval: float = 5.0, window: float = 60.0) -> None:
        self.metrics = metrics
        self.clock = clock
        self.interval = interval
        self.window = window
        self._ring: deque[tuple[float, dict[str, float]]] = deque(maxlen=int(window / interval) + 2)
        self._loop = LoopingCall(self.sample)
        self._loop.clock = clock

    def read(self) -> dict[str, float]:
        return {s.key: s.read(self.metrics) for s in SERIES}

    def sample(self) -> None:
        self._ring.append((self.clock.seconds(), self.read()))

    def rates(self) -> tuple[dict[str, float | None], float]:
        """Per-second rates against the oldest sample in the window, and the seconds covered."""
        now = self.clock.seconds()
        current = self.read()
        base = next(((t, v) for t, v in self._ring if now - t <= self.window + 1e-9 and now > t), None)
        if base is None:
            return {key: None for key in current}, 0.0
        t0, then = base
        dt = now - t0
        return {key: max(0.0, current[key] - then.get(key, 0.0)) / dt for key in current}, dt

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.interval, now=True)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()


# --------------------------------------------------------------------------- formatting


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "\u2014"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def fmt_bytes(n: float) -> str:
    value = float(n)
    if value < 1024:
        return f"{value:.0f} B"
    for unit in ("KiB", "MiB"):
        value /= 1024
        if value < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} GiB"


def fmt_utc(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def fmt_rate(per_second: float | None) -> tuple[str, str]:
    if per_second is None:
        return "\u2014", "\u2014"
    return f"{per_second:.2f}", f"{per_second * 60:.0f}"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _outcome_cell(outcome: Any, at: Any, now: float, running: bool = True) -> str:
    if outcome is None:
        return f'<td><span class="badge none">{"never" if running else "n/a"}</span></td>'
    kind = "ok" if outcome == "ok" else "bad"
    when = _number(at)
    age = ""
    if when is not None:
        age = f' <span class="age" title="{_e(fmt_utc(when))}">{_e(fmt_duration(now - when))} ago</span>'
    return f'<td><span class="badge {kind}">{_e(outcome)}</span>{age}</td>'


def _num_cell(value: Any, fmt: Callable[[float], str] = lambda v: f"{v:.0f}", warn_above: float | None = None) -> str:
    v = _number(value)
    cls = "num warn" if v is not None and warn_above is not None and v > warn_above else "num"
    return f'<td class="{cls}">{_e(fmt(v)) if v is not None else chr(0x2014)}</td>'


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
header{background:#1d2a44;color:#fff;padding:14px 24px;display:flex;align-items:baseline;gap:18px;flex-wrap:wrap}
header h1{font-size:20px;margin:0;font-weight:600}
header .url{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:14px;color:#c9d6f0}
header .meta{margin-left:auto;font-size:13px;color:#c9d6f0}
main{padding:18px 24px;max-width:1150px}
section{background:#fff;border:1px solid #dde1e8;border-radius:6px;padding:12px 16px;margin-bottom:16px}
h2{font-size:15px;margin:0 0 8px;color:#34405a}
.cards{display:flex;gap:12px;flex-wrap:wrap}
.card{flex:1 1 150px;border:1px solid #e4e7ee;border-radius:5px;padding:8px 12px;background:#fafbfc}
.card .v{font-size:22px;font-weight:600}
.card .k{font-size:13px;color:#5d6881}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid #eceef3;vertical-align:middle}
th{font-size:12px;color:#5d6881;text-transform:uppercase;letter-spacing:.03em;font-weight:600}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
td.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;word-break:break-all}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600}
.badge.ok{background:#dff3e4;color:#17692f}
.badge.bad{background:#fbe3e3;color:#a0202a}
.badge.none{background:#eceef3;color:#5d6881}
td.warn{color:#a0202a;font-weight:600}
.age{color:#5d6881;font-size:12px;margin-left:6px}
.note{color:#5d6881;font-size:13px;margin:6px 0 0}
footer{color:#7a849b;font-size:12px;padding:0 24px 18px}
"""


class StatsView(Protocol):
    def stats(self) -> StoreStats: ...


class RelayView(Protocol):
    @property
    def waiting(self) -> int: ...

    @property
    def log_agg(self) -> Aggregator: ...


class ReplicationView(Protocol):
    def peer_status(self) -> list[dict[str, Any]]: ...

    def update_gauges(self) -> None: ...


class NodeView(Protocol):
    """What the admin listener and this page read of a node (:class:`meshrelay.node.Node` is one)."""

    @property
    def config(self) -> Config: ...

    @property
    def clock(self) -> IReactorTime: ...

    @property
    def started_at(self) -> float: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def store(self) -> StatsView: ...

    @property
    def relay(self) -> RelayView: ...

    @property
    def replication(self) -> ReplicationView | None:
        """None while a node without peers (or not started) has no replication."""


def render_status(
    node: NodeView,
    now: float,
    rates: dict[str, float | None],
    window: float,
    peers: list[dict[str, Any]] | None,
) -> str:
    """The whole page.  ``peers`` is ``peer_status()``, or None when replication is not running."""
    cfg = node.config
    stats = node.store.stats()
    metrics = node.metrics
    uptime = now - node.started_at
    used = stats.bytes / cfg.limits.max_stored_bytes * 100 if cfg.limits.max_stored_bytes else 0.0
    used_text = "<0.1%" if 0 < used < 0.1 else f"{used:.1f}%"
    waiting = node.relay.waiting

    cards = [
        ("stored envelopes", f"{stats.envelopes:,}"),
        ("stored bytes", fmt_bytes(stats.bytes)),
        (f"of the {fmt_bytes(cfg.limits.max_stored_bytes)} cap", used_text),
        ("waiting long-polls", f"{waiting:,}"),
        ("peers", f"{len(cfg.peers)}"),
    ]
    card_html = "".join(
        f'<div class="card"><div class="v">{_e(v)}</div><div class="k">{_e(k)}</div></div>' for k, v in cards
    )

    rate_rows = []
    for s in SERIES:
        per_s, per_min = fmt_rate(rates.get(s.key))
        total = s.read(metrics)
        rate_rows.append(
            f'<tr><td>{_e(s.label)}</td><td class="num">{_e(per_s)}</td><td class="num">{_e(per_min)}</td>'
            f'<td class="num">{_e(f"{total:,.0f}")}</td></tr>'
        )
    if window:
        rate_note = f"Rates over the last {fmt_duration(window)} (sampled every few seconds)."
    else:
        rate_note = "Rates appear after the first samples (a few seconds after start)."

    peer_section = _peers_html(cfg, peers, now)

    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>meshrelay {_e(cfg.node.public_url)}</title>
<style>{_CSS}</style>
</head>
<body>
<header>
<h1>meshrelay</h1>
<span class="url">{_e(cfg.node.public_url)}</span>
<span class="meta">version {_e(__version__)} &middot; up {_e(fmt_duration(uptime))} (since {_e(fmt_utc(node.started_at))}) &middot; {_e(cfg.store.backend)}, durability {_e(cfg.node.durability)}</span>
</header>
<main>
<section><h2>Node</h2><div class="cards">{card_html}</div></section>
<section><h2>Peers</h2>{peer_section}</section>
<section><h2>Rates</h2>
<table><thead><tr><th>what</th><th class="num">per second</th><th class="num">per minute</th><th class="num">total since start</th></tr></thead>
<tbody>{"".join(rate_rows)}</tbody></table>
<p class="note">{_e(rate_note)}</p></section>
</main>
<footer>Rendered {_e(fmt_utc(now))}; refreshes every {REFRESH_SECONDS}s. Machine-readable: /metrics (Prometheus), /api/mesh/metrics (JSON).</footer>
</body>
</html>
"""


def _peers_html(cfg: Config, peers: list[dict[str, Any]] | None, now: float) -> str:
    if peers is None:
        if not cfg.peers:
            return '<p class="note">No peers configured: this node runs alone.</p>'
        rows_src: Iterable[dict[str, Any]] = ({"url": p.url} for p in cfg.peers)
        note = '<p class="note">Replication is not running in this build: peers are configured but not contacted.</p>'
        running = False
    else:
        rows_src = peers
        note = "" if peers else '<p class="note">No peers.</p>'
        running = True
    #: a sync lag over three sync intervals is shown in red
    lag_warn = 3 * cfg.sync.interval
    rows = []
    for p in rows_src:
        rows.append(
            "<tr>"
            f'<td class="mono">{_e(p.get("url", "?"))}</td>'
            + _outcome_cell(p.get("last_push_outcome"), p.get("last_push_at"), now, running)
            + _outcome_cell(p.get("last_sync_outcome"), p.get("last_sync_at"), now, running)
            + _num_cell(p.get("sync_lag_seconds"), fmt_duration, warn_above=lag_warn)
            + _num_cell(p.get("queue_depth"))
            + _num_cell(p.get("inflight"))
            + _num_cell(p.get("backoff_seconds"), fmt_duration)
            + "</tr>"
        )
    head = (
        '<table><thead><tr><th>peer</th><th>last push</th><th>last sync</th><th class="num">sync lag</th>'
        '<th class="num">queue</th><th class="num">in flight</th><th class="num">backoff</th></tr></thead>'
    )
    return head + "<tbody>" + "".join(rows) + "</tbody></table>" + note
