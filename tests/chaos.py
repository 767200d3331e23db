"""Chaos runs: three real ``twistd meshrelay`` nodes peered through chaos proxies, under load and faults.

:class:`ChaosRun` is shared by ``tests/test_chaos.py`` (a short run in CI) and
``bench/chaos.py`` (longer runs that print their figures).  One run:

1. starts a proxy child process (:mod:`tests.chaosproxy`) with one link per
   directed peer link, and three nodes whose ``[[peers]] connect`` dials those
   links (sync every second, a 2 s push timeout, small caps, a short sweep);
2. runs ``clients`` client threads for ``load_seconds``: new deposits, re-sends
   of earlier envelopes, polls that ack some of what was seen (at a random
   node), long-polls, remote fetches and counts;
3. meanwhile injects faults on a seeded schedule: SIGKILL of a node (restarted
   after a moment), and cut / black-holed / delayed links, singly or a whole
   node isolated;
4. heals everything, waits for the three feeds to agree (a guard, not a timing
   assertion), waits some sync rounds more and checks again, then checks what
   was promised.

Checks (each failure is a line in ``violations``):

- every node's feed holds the same live envelopes and the same signed acks;
- every envelope answered ``200`` (not a duplicate) and never acked is in that
  live set; nothing acked is (no resurrection); nothing else is either;
- a poll of every mailbox at every node returns exactly its part of the live
  set, and re-sending acked envelopes answers ``duplicate`` at every node;
- during the run: no answer outside the protocol (no 5xx), a node never
  returns an envelope acked at that node before the poll was sent, and a
  re-send at a node that acked it answers ``duplicate``;
- no node log holds a traceback or an unhandled error.

**Caps and convergence.**  Under wire v1 a replica refused at a cap was not
retried, so convergence was promised only while replicas did not meet a cap;
v2 remembers such refusals and fetches them again when space frees
(docs/protocol.md 7.5).  The load still keeps the v1 layout, so that the run
checks convergence of what a v1 peer could promise too:
every (sender, mailbox) pair deposits at one "home" node, a *hot* mailbox takes
all its deposits at one node from more senders than its cap holds (so
``mailbox_full`` happens there), and a *spread* mailbox takes deposits at all
three nodes from few enough senders that ``senders x per_sender_pending`` stays
within ``per_mailbox_pending`` (so only ``sender_cap`` happens).  A node that
applies a peer's feed in order then never meets a cap the origin did not.

Everything random comes from ``seed``: the keys, every client's choices and the
fault schedule (thread timing still varies from run to run).
"""

from __future__ import annotations

import http.client
import os
import random
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshrelay import envelope as E
from tests.chaosproxy import ChaosProxy
from tests.harness import NodeProcess, feed_ids, http_request

NAMES = ("a", "b", "c")
LINKS = tuple((s, d) for s in NAMES for d in NAMES if s != d)
KINDS = ("kill", "cut", "blackhole", "delay", "isolate")
LOG_MARKERS = ("Traceback", "Unhandled error", "Unhandled Error")
SEND = "/api/mesh/dm/send"
POLL = "/api/mesh/dm/poll"
COUNT = "/api/mesh/dm/count"
#: envelope ttl of the long-lived majority (seconds)
LONG_TTL = 3600
#: short-lived envelopes live this many seconds (all expire before the checks)
SHORT_TTL = (6, 15)


def link_secret(a: str, b: str) -> str:
    return "chaos-" + "-".join(sorted((a, b))) + "-0123456789abcdef"


def link_name(src: str, dst: str) -> str:
    return f"{src}-{dst}"


@dataclass
class Settings:
    seed: int
    load_seconds: float = 60.0
    clients: int = 4
    hot_mailboxes: int = 4
    spread_mailboxes: int = 12
    hot_senders: int = 10
    spread_senders: int = 6
    per_sender_pending: int = 3
    per_mailbox_pending: int = 20
    #: seconds between two fault injections (uniform)
    fault_gap: tuple[float, float] = (1.5, 4.0)
    #: how long a link fault lasts (uniform)
    fault_length: tuple[float, float] = (2.0, 7.0)
    #: how long a SIGKILLed node stays down before it is restarted (uniform)
    down_length: tuple[float, float] = (0.5, 3.0)
    short_ttl_share: float = 0.1
    #: a client's pause between two operations (keeps the load moderate)
    think: float = 0.003
    #: failure guard for convergence after the heal
    converge_guard: float = 120.0
    #: acked envelopes re-sent to every node at the end (a seeded sample)
    resend_sample: int = 300
    sync_interval: int = 1
    push_timeout: int = 2

    def __post_init__(self) -> None:
        if self.spread_senders * self.per_sender_pending > self.per_mailbox_pending:
            raise ValueError("spread mailboxes must not be able to fill (see the module docstring)")


@dataclass
class Sender:
    key: Ed25519PrivateKey
    home: str


@dataclass
class Mailbox:
    index: int
    key: Ed25519PrivateKey
    pub: str
    hot: bool
    senders: list[Sender]


@dataclass
class Sent:
    env: dict[str, Any]
    mailbox: int
    home: str
    expires: int
    short: bool


@dataclass
class Ledger:
    """What the clients were told, shared by the client threads (under ``lock``)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    envs: dict[str, Sent] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    #: answered 200 with duplicate false, at least once
    accepted: set[str] = field(default_factory=set)
    #: the deposit got no answer (the node died or the connection broke): stored or not
    maybe_deposited: set[str] = field(default_factory=set)
    #: msg_id -> nodes whose poll with this ack answered 200
    acked_at: dict[str, set[str]] = field(default_factory=dict)
    #: ids in an ack whose poll got no answer: applied or not
    maybe_acked: set[str] = field(default_factory=set)
    seen: dict[int, set[str]] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)


def _key(rng: random.Random) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(rng.randbytes(32))


def read_feed(node: NodeProcess, reader: NodeProcess) -> tuple[set[str], set[tuple[str, str]]]:
    """Every live envelope id and signed ack (mailbox, nonce) in ``node``'s feed, read as its peer ``reader``."""
    return feed_ids(node, reader.url, link_secret(node.name, reader.name))


class ChaosRun:
    """One chaos run in ``base_dir``; :meth:`run` returns the figures, ``violations`` what went wrong."""

    def __init__(self, base_dir: str, settings: Settings, say: Callable[[str], None] | None = None) -> None:
        self.base_dir = os.path.abspath(base_dir)
        self.s = settings
        self.say = say or (lambda text: None)
        self.ledger = Ledger()
        self.violations: list[str] = []
        self.events: list[str] = []
        self.figures: dict[str, Any] = {"seed": settings.seed}
        self.stop = threading.Event()
        self.started = time.monotonic()
        self.load_end_wall = 0.0
        self.nodes: dict[str, NodeProcess] = {}
        self.proxy: ChaosProxy | None = None
        self.down: set[str] = set()
        self.node_lock = threading.Lock()
        #: node counters read just before each SIGKILL
        self.counted: Counter[str] = Counter()
        rng = random.Random(f"{settings.seed}:population")
        self.mailboxes: list[Mailbox] = []
        for i in range(settings.hot_mailboxes + settings.spread_mailboxes):
            hot = i < settings.hot_mailboxes
            key = _key(rng)
            n_senders = settings.hot_senders if hot else settings.spread_senders
            senders = [Sender(_key(rng), NAMES[i % 3] if hot else NAMES[(i + j) % 3]) for j in range(n_senders)]
            self.mailboxes.append(Mailbox(i, key, E.public_key_b64u(key), hot, senders))
            self.ledger.seen[i] = set()

    # ------------------------------------------------------------------ bookkeeping

    def violation(self, text: str) -> None:
        with self.ledger.lock:
            self.violations.append(text)
        self.say("VIOLATION: " + text)

    def event(self, text: str) -> None:
        line = f"{time.monotonic() - self.started:7.2f}s {text}"
        with self.ledger.lock:
            self.events.append(line)
        self.say(line)

    # ------------------------------------------------------------------ mesh

    def start_mesh(self) -> None:
        s = self.s
        config = {
            "node": {"sweep_interval": 2},
            "limits": {
                "per_sender_pending": s.per_sender_pending,
                "per_mailbox_pending": s.per_mailbox_pending,
                "min_ttl": 5,
                "clock_skew": 3600,
            },
            "sync": {"interval": s.sync_interval, "push_timeout": s.push_timeout, "fetch_remote_timeout": 1},
        }
        os.makedirs(self.base_dir, exist_ok=True)
        self.proxy = ChaosProxy(os.path.join(self.base_dir, "proxy.log"), max_seconds=s.load_seconds + 3600).start()
        # The links hold their ports before the nodes pick theirs, so the two cannot collide.
        ports = {link_name(src, dst): self.proxy.add(link_name(src, dst)) for src, dst in LINKS}
        self.nodes = {n: NodeProcess(self.base_dir, n, config=config) for n in NAMES}
        for src, dst in LINKS:
            name = link_name(src, dst)
            self.proxy.target(name, self.nodes[dst].port)
            self.nodes[src].peers.append(
                {
                    "url": self.nodes[dst].url,
                    "secret": link_secret(src, dst),
                    "connect": f"http://127.0.0.1:{ports[name]}",
                }
            )
        for p in self.nodes.values():
            p.start(wait=False)
        for p in self.nodes.values():
            p.wait_ready(60)

    def stop_mesh(self) -> None:
        for p in self.nodes.values():
            p.stop()
        if self.proxy is not None:
            self.proxy.close()

    def running(self) -> list[str]:
        with self.node_lock:
            return [n for n in NAMES if n not in self.down]

    def call(self, name: str, path: str, body: Any, timeout: float = 30.0) -> tuple[Any, Any]:
        """POST to a node; ``("refused", None)`` when nothing listens, ``("lost", None)`` when no answer came."""
        try:
            return http_request(self.nodes[name].port, "POST", path, body, timeout=timeout)
        except ConnectionRefusedError:
            return "refused", None
        except (OSError, http.client.HTTPException):
            return "lost", None

    # ------------------------------------------------------------------ client operations

    def _unexpected(self, what: str, node: str, status: Any, body: Any) -> None:
        self.violation(f"{what} at {node} answered {status}: {body!r}"[:500])

    def _record_deposit(self, msg_id: str, node: str, status: Any, body: Any, expect_duplicate: bool) -> None:
        led = self.ledger
        with led.lock:
            if status == "refused":
                led.counts["deposit_unreachable"] += 1
            elif status == "lost":
                led.counts["deposit_no_answer"] += 1
                led.maybe_deposited.add(msg_id)
            elif status == 200 and isinstance(body, dict) and body.get("ok") is True:
                if body.get("duplicate"):
                    led.counts["deposit_duplicate"] += 1
                else:
                    led.counts["deposit_accepted"] += 1
                    led.accepted.add(msg_id)
            elif status == 429 and isinstance(body, dict) and body.get("error") in ("sender_cap", "mailbox_full"):
                led.counts["deposit_" + body["error"]] += 1
            else:
                status = ("unexpected", status)
        if isinstance(status, tuple):
            self._unexpected("a deposit", node, status[1], body)
        elif expect_duplicate and status == 200 and not body.get("duplicate"):
            self.violation(f"resurrection: {msg_id} acked at {node} was accepted again there")

    def op_deposit(self, rng: random.Random) -> None:
        mb = rng.choice(self.mailboxes)
        sender = rng.choice(mb.senders)
        now = int(time.time())
        short = rng.random() < self.s.short_ttl_share and now + SHORT_TTL[1] + 3 < self.load_end_wall
        ttl = rng.randint(*SHORT_TTL) if short else LONG_TTL
        ciphertext = rng.randbytes(rng.randint(16, 256))
        env = E.make_envelope(sender.key, mb.pub, ciphertext, now, ttl)
        msg_id = env["msg_id"]
        with self.ledger.lock:
            self.ledger.envs[msg_id] = Sent(env, mb.index, sender.home, now + ttl, short)
            self.ledger.order.append(msg_id)
        status, body = self.call(sender.home, SEND, env)
        self._record_deposit(msg_id, sender.home, status, body, expect_duplicate=False)

    def op_resend(self, rng: random.Random) -> None:
        led = self.ledger
        now = int(time.time())
        with led.lock:
            if not led.order:
                return
            sent = led.envs[rng.choice(led.order)]
            if sent.expires <= now + 1:
                return
            acked_here = sent.home in led.acked_at.get(sent.env["msg_id"], ())
        status, body = self.call(sent.home, SEND, sent.env)
        with led.lock:
            led.counts["resend"] += 1
        self._record_deposit(sent.env["msg_id"], sent.home, status, body, expect_duplicate=acked_here)

    def op_poll(self, rng: random.Random) -> None:
        led = self.ledger
        mb = rng.choice(self.mailboxes)
        node = rng.choice(NAMES)
        with led.lock:
            seen = led.seen[mb.index]
            fresh = sorted(m for m in seen if m not in led.acked_at)
            old = sorted(m for m in seen if m in led.acked_at)
            acked_here = {m for m in old if node in led.acked_at[m]}
        ack = rng.sample(fresh, min(len(fresh), rng.randint(0, 5)))
        if old and rng.random() < 0.1:
            ack.append(rng.choice(old))  # acking twice, elsewhere, is harmless
        body = E.make_signed_request(mb.key, int(time.time()), rng.randbytes(16), ack)
        body["limit"] = rng.choice((5, 20, 100))
        kind = "poll"
        if rng.random() < 0.05:
            body["wait"] = 1
            kind = "long_poll"
        if rng.random() < 0.1:
            body["fetch_remote"] = True
            kind = "fetch_remote_poll"
        status, answer = self.call(node, POLL, body)
        with led.lock:
            if status == "refused":
                led.counts["poll_unreachable"] += 1
                return
            if status == "lost":
                led.counts["poll_no_answer"] += 1
                led.maybe_acked.update(ack)
                return
        if status != 200 or not isinstance(answer, dict) or not isinstance(answer.get("messages"), list):
            self._unexpected(f"a {kind}", node, status, answer)
            return
        got = [m.get("msg_id") for m in answer["messages"]]
        with led.lock:
            led.counts[kind] += 1
            led.counts["ack_ids"] += len(ack)
            for m in ack:
                led.acked_at.setdefault(m, set()).add(node)
            led.seen[mb.index].update(m for m in got if m in led.envs)
            strangers = [m for m in got if m not in led.envs or led.envs[m].mailbox != mb.index]
        back = acked_here.intersection(got) | set(ack).intersection(got)
        if back:
            self.violation(f"resurrection: {node} returned {sorted(back)} acked at {node} before this poll")
        if strangers:
            self.violation(f"{node} returned envelopes that are not this mailbox's: {strangers}")

    def op_count(self, rng: random.Random) -> None:
        mb = rng.choice(self.mailboxes)
        node = rng.choice(NAMES)
        body = E.make_signed_request(mb.key, int(time.time()), rng.randbytes(16), [])
        status, answer = self.call(node, COUNT, body)
        if status in ("refused", "lost"):
            return
        if status != 200 or not isinstance(answer, dict) or type(answer.get("count")) is not int:
            self._unexpected("a count", node, status, answer)
            return
        with self.ledger.lock:
            self.ledger.counts["count"] += 1

    def client(self, index: int) -> None:
        rng = random.Random(f"{self.s.seed}:client:{index}")
        ops = (
            (0.55, self.op_deposit),
            (0.62, self.op_resend),
            (0.95, self.op_poll),
            (1.00, self.op_count),
        )
        max_ops = int(self.s.load_seconds * 1000) + 1000  # a bound beyond the time bound
        for _ in range(max_ops):
            if self.stop.is_set():
                return
            r = rng.random()
            op = next(fn for limit, fn in ops if r < limit)
            try:
                op(rng)
            except Exception:
                self.violation(f"client {index} failed:\n{traceback.format_exc()}")
                return
            if self.s.think:
                time.sleep(self.s.think)

    # ------------------------------------------------------------------ faults

    def _kill(self, name: str) -> None:
        self.counted.update(self.node_counters(name))  # the counters die with the process
        with self.node_lock:
            self.down.add(name)
        self.nodes[name].kill()

    def _restart(self, name: str) -> None:
        try:
            self.nodes[name].start(wait=True, timeout=60)
        except RuntimeError as e:
            self.violation(f"node {name} did not restart: {e}")
        with self.node_lock:
            self.down.discard(name)

    def chaos(self, load_end: float) -> None:
        """Inject faults until ``load_end`` (monotonic); every fault ends by then."""
        s = self.s
        assert self.proxy is not None
        proxy = self.proxy
        rng = random.Random(f"{s.seed}:chaos")
        faults: list[tuple[float, str, str]] = []  # (ends at, kind, target)
        busy_links: set[str] = set()
        next_fault = time.monotonic() + rng.uniform(*s.fault_gap)
        counts: Counter[str] = Counter()
        # Every kind of fault early on (in a seeded order), then a seeded random mix.
        plan = list(KINDS)
        rng.shuffle(plan)

        def end(fault: tuple[float, str, str]) -> None:
            _, kind, target = fault
            if kind == "kill":
                self.event(f"restart {target}")
                self._restart(target)
            else:
                for name in target.split(","):
                    proxy.heal(name)
                    busy_links.discard(name)
                self.event(f"heal {target}")

        for _ in range(100000):
            now = time.monotonic()
            for fault in [f for f in faults if f[0] <= now]:
                faults.remove(fault)
                end(fault)
            if now >= load_end:
                break
            if now >= next_fault:
                next_fault = now + rng.uniform(*s.fault_gap)
                if plan:
                    kind = plan.pop()
                else:
                    kind = rng.choices(KINDS, (3, 3, 2, 2, 1))[0]
                length = rng.uniform(*s.fault_length)
                if kind == "kill":
                    if self.down:
                        kind = "delay"
                    else:
                        name = rng.choice(NAMES)
                        until = min(now + rng.uniform(*s.down_length), load_end)
                        self.event(f"SIGKILL {name}")
                        self._kill(name)
                        faults.append((until, "kill", name))
                        counts["kill"] += 1
                        continue
                free = [link_name(a, b) for a, b in LINKS if link_name(a, b) not in busy_links]
                until = min(now + length, load_end)
                if kind == "isolate":
                    node = rng.choice(NAMES)
                    names = [link_name(a, b) for a, b in LINKS if node in (a, b)]
                    if any(n in busy_links for n in names):
                        if len(plan) < len(KINDS):
                            plan.append("isolate")  # planned: try again at the next fault
                        continue
                    for n in names:
                        proxy.cut(n)
                    busy_links.update(names)
                    self.event(f"isolate {node} (cut {', '.join(names)}) for {until - now:.1f}s")
                    faults.append((until, "isolate", ",".join(names)))
                    counts["isolate"] += 1
                    continue
                if not free:
                    continue
                name = rng.choice(free)
                busy_links.add(name)
                if kind == "delay":
                    delay = round(rng.uniform(0.05, 2.0 * s.push_timeout), 2)
                    proxy.delay(name, delay)
                    self.event(f"delay {name} by {delay}s for {until - now:.1f}s")
                elif kind == "cut":
                    proxy.cut(name)
                    self.event(f"cut {name} for {until - now:.1f}s")
                else:
                    proxy.blackhole(name)
                    self.event(f"black-hole {name} for {until - now:.1f}s")
                faults.append((until, kind, name))
                counts[kind] += 1
                continue
            wake = min([next_fault, load_end] + [f[0] for f in faults])
            time.sleep(max(0.0, min(0.5, wake - time.monotonic())))
        for fault in faults:
            end(fault)
        proxy.heal("*")
        self.figures["faults"] = dict(counts)

    # ------------------------------------------------------------------ checks

    def feeds(self) -> dict[str, tuple[set[str], set[tuple[str, str]]]]:
        return {n: read_feed(self.nodes[n], self.nodes[NAMES[(i + 1) % 3]]) for i, n in enumerate(NAMES)}

    def wait_for_sync_rounds(self, rounds: int) -> None:
        """Wait (bounded by converge_guard) until every link has had ``rounds`` more good pulls."""
        links = [(self.nodes[n], self.nodes[p].url) for n in NAMES for p in NAMES if p != n]

        def pulls(node: NodeProcess, peer: str) -> float:
            return node.metric("meshrelay_sync_pull_total", peer=peer, outcome="ok")

        before = [pulls(node, peer) for node, peer in links]
        deadline = time.monotonic() + self.s.converge_guard
        while any(pulls(node, peer) < b + rounds for (node, peer), b in zip(links, before)):
            if time.monotonic() > deadline:
                self.violation(f"the nodes did not complete {rounds} more sync rounds")
                return
            time.sleep(0.2)

    def converge(self) -> dict[str, tuple[set[str], set[tuple[str, str]]]]:
        started = time.monotonic()
        deadline = started + self.s.converge_guard
        for _ in range(100000):
            feeds = self.feeds()
            first = feeds[NAMES[0]]
            if all(f == first for f in feeds.values()):
                self.figures["converge_seconds"] = round(time.monotonic() - started, 2)
                return feeds
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        self.figures["converge_seconds"] = None
        self.violation("the nodes did not converge:\n" + self.describe(feeds))
        return feeds

    def describe(self, feeds: dict[str, tuple[set[str], set[tuple[str, str]]]]) -> str:
        led = self.ledger
        union = set().union(*(f[0] for f in feeds.values()))
        lines = []
        for n, (envs, acks) in feeds.items():
            missing = union - envs
            lines.append(f"  {n}: {len(envs)} envelopes, {len(acks)} acks; lacks {len(missing)}")
            for m in sorted(missing)[:10]:
                sent = led.envs.get(m)
                where = f"mailbox {sent.mailbox} home {sent.home}" if sent else "unknown"
                lines.append(f"    {m[:16]} ({where}; acked at {sorted(led.acked_at.get(m, ()))})")
        return "\n".join(lines)

    def check_final(self, feeds: dict[str, tuple[set[str], set[tuple[str, str]]]]) -> None:
        led = self.ledger
        now = int(time.time())
        live = set().union(*(f[0] for f in feeds.values()))
        acked = set(led.acked_at)
        expired = {m for m, sent in led.envs.items() if sent.expires <= now}
        for n, (envs, _) in feeds.items():
            for m in sorted(envs & acked):
                self.violation(f"resurrection: {n} holds {m} which was acked at {sorted(led.acked_at[m])}")
            for m in sorted(envs & expired):
                self.violation(f"{n} serves {m} after it expired")
            strangers = envs - led.accepted - led.maybe_deposited
            if strangers:
                self.violation(f"{n} holds {len(strangers)} envelopes never answered 200: {sorted(strangers)[:5]}")
        must_live = led.accepted - acked - led.maybe_acked - expired
        for n, (envs, _) in feeds.items():
            lost = must_live - envs
            if lost:
                self.violation(f"lost at {n}: {len(lost)} envelopes answered 200, never acked: {sorted(lost)[:5]}")
        self.figures["live_at_end"] = len(live)
        self.figures["acks_in_feed"] = len(feeds[NAMES[0]][1])

    def check_polls(self, feeds: dict[str, tuple[set[str], set[tuple[str, str]]]]) -> None:
        led = self.ledger
        live = feeds[NAMES[0]][0]
        by_box: dict[int, set[str]] = {mb.index: set() for mb in self.mailboxes}
        for m in live:
            by_box[led.envs[m].mailbox].add(m)
        rng = random.Random(f"{self.s.seed}:final")
        for mb in self.mailboxes:
            for n in NAMES:
                body = E.make_signed_request(mb.key, int(time.time()), rng.randbytes(16), [])
                status, answer = self.call(n, POLL, body)
                if status != 200:
                    self._unexpected("a final poll", n, status, answer)
                    continue
                got = {m["msg_id"] for m in answer["messages"]}
                if got & set(led.acked_at):
                    self.violation(f"resurrection: a poll at {n} returned acked {sorted(got & set(led.acked_at))}")
                if got != by_box[mb.index]:
                    self.violation(
                        f"a poll of mailbox {mb.index} at {n} returned {len(got)} envelopes, "
                        f"the feeds hold {len(by_box[mb.index])}"
                    )
        now = int(time.time())
        acked = sorted(m for m in led.acked_at if m in led.envs and led.envs[m].expires > now + 5)
        sample = rng.sample(acked, min(len(acked), self.s.resend_sample))
        for m in sample:
            for n in NAMES:
                status, answer = self.call(n, SEND, led.envs[m].env)
                if status != 200 or not isinstance(answer, dict) or answer.get("duplicate") is not True:
                    self.violation(f"re-sending acked {m} at {n} answered {status}: {answer!r}")
        self.figures["acked_resent"] = len(sample) * len(NAMES)

    def check_logs(self) -> None:
        paths = [(n, p.log_path) for n, p in self.nodes.items()]
        paths.append(("proxy", os.path.join(self.base_dir, "proxy.log")))
        for name, path in paths:
            try:
                with open(path, "rb") as fh:
                    text = fh.read().decode(errors="replace")
            except OSError:
                continue
            for marker in LOG_MARKERS:
                if marker in text:
                    at = text.index(marker)
                    self.violation(f"{name} logged {marker!r}:\n{text[max(0, at - 1500) : at + 3000]}")

    def node_counters(self, name: str) -> Counter[str]:
        """A few counters of one node that tell what the faults did (empty if it does not answer)."""
        wanted = {
            "meshrelay_dm_replica_total": "replica",
            "meshrelay_dm_replication_push_total": "push",
            "meshrelay_sync_pull_total": "sync_pull",
            "meshrelay_dm_replication_dropped_total": "push_dropped",
        }
        out: Counter[str] = Counter()
        try:
            status, body = self.nodes[name].admin("/api/mesh/metrics")
        except (OSError, http.client.HTTPException):
            return out
        if status != 200:
            return out
        for metric, short in wanted.items():
            for sample in body["metrics"].get(metric, []):
                outcome = sample["labels"].get("outcome", "")
                out[f"{short}_{outcome}".rstrip("_")] += sample["value"]
        return out

    def metrics(self) -> dict[str, float]:
        """Those counters summed over the nodes and over every life of each (read before each SIGKILL)."""
        out = Counter(self.counted)
        for name in NAMES:
            out.update(self.node_counters(name))
        return {k: v for k, v in sorted(out.items()) if v}

    # ------------------------------------------------------------------ the run

    def run(self) -> dict[str, Any]:
        s = self.s
        self.say(f"chaos run: seed={s.seed} load={s.load_seconds}s clients={s.clients} dir={self.base_dir}")
        self.start_mesh()
        try:
            load_end = time.monotonic() + s.load_seconds
            self.load_end_wall = time.time() + s.load_seconds
            threads = [threading.Thread(target=self.client, args=(i,), daemon=True) for i in range(s.clients)]
            for t in threads:
                t.start()
            try:
                self.chaos(load_end)
            finally:
                self.stop.set()
                for t in threads:
                    t.join(120)
                    if t.is_alive():
                        self.violation("a client thread did not stop")
            self.event("load over, every fault healed; waiting for convergence")
            # Short-lived envelopes all expire before the checks look.
            time.sleep(max(0.0, self.load_end_wall + 1 - time.time()))
            feeds = self.converge()
            if self.figures["converge_seconds"] is not None:
                self.wait_for_sync_rounds(2)  # more sync rounds: still the same?
                again = self.feeds()
                if any(f != feeds[NAMES[0]] for f in again.values()):
                    self.violation("the nodes diverged again after converging:\n" + self.describe(again))
                feeds = again
            self.check_final(feeds)
            self.check_polls(feeds)
            self.figures["node_metrics"] = self.metrics()
        finally:
            self.stop.set()
            self.stop_mesh()
        self.check_logs()
        led = self.ledger
        self.figures["ops"] = dict(sorted(led.counts.items()))
        self.figures["envelopes_made"] = len(led.envs)
        self.figures["accepted"] = len(led.accepted)
        self.figures["acked"] = len(led.acked_at)
        self.figures["maybe_deposited"] = len(led.maybe_deposited)
        self.figures["maybe_acked"] = len(led.maybe_acked)
        self.figures["wall_seconds"] = round(time.monotonic() - self.started, 1)
        self.figures["violations"] = len(self.violations)
        return self.figures
