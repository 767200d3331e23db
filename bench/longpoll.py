"""5,000 concurrent waiting long-polls: the node's RSS, and wake latency under a steady deposit rate.

    python bench/longpoll.py [--polls 5000] [--rate 500] [--deposit-connections 8]

A Twisted client (one process, one reactor, a minimal HTTP/1.1 client
protocol) opens ``--polls`` connections, each long-polling its own mailbox with
``wait=30``, in batches of ``--batch``, and waits until the node's
``meshrelay_waiting_polls`` gauge shows them all waiting.  It then reads the
node's RSS (VmRSS, ``/proc/PID/status``) while they wait, and deposits one
pre-signed envelope per mailbox at a steady ``--rate`` per second over
``--deposit-connections`` keep-alive connections.

Wake latency = time from the deposit's 200 reaching the client to the
long-poll's response reaching the client (both seen by the same client
reactor).  The poll's answer may even arrive first (the node wakes waiters when
the commit lands, then writes the deposit's answer): such samples count as 0
and are reported.  The latency from sending the deposit to the poll's response
is reported too.  Every woken poll must return exactly its envelope.

Targets (issue 2): RSS < 300 MB with 5,000 waiting; p99 wake latency < 50 ms.
RLIMIT_NOFILE is raised for the client and the node.  All deposits must land
within the 30 s wait: ``polls / rate`` must stay well under 30 s (it is checked).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common
from twisted.internet import defer, protocol, task
from twisted.internet.defer import Deferred

from meshrelay import envelope as E

HERE = os.path.dirname(os.path.abspath(__file__))


def http_bytes(method: str, path: str, body: bytes | None = None, keep_alive: bool = True) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    if not keep_alive:
        head += "Connection: close\r\n"
    return head.encode() + b"\r\n" + (body or b"")


def parse_response(buf: bytes) -> tuple[int, bytes, int] | None:
    """(status, body, bytes used) of the first complete response in ``buf``, or None.

    Handles ``Content-Length`` and ``Transfer-Encoding: chunked`` bodies.
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buf[:end].decode("latin-1").split("\r\n")
    status = int(head[0].split()[1])
    length = 0
    chunked = False
    for line in head[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value.strip())
        elif name == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    pos = end + 4
    if not chunked:
        if len(buf) < pos + length:
            return None
        return status, buf[pos : pos + length], pos + length
    body = b""
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(buf[pos:eol].split(b";")[0], 16)
        start = eol + 2
        if len(buf) < start + size + 2:
            return None
        body += buf[start : start + size]
        pos = start + size + 2
        if size == 0:
            return status, body, pos


class HTTPClient(protocol.Protocol):
    """Sequential requests on one connection; each answer fires with (status, body, arrival time)."""

    def __init__(self) -> None:
        self.buf = b""
        self.waiting: list[Deferred[tuple[int, bytes, float]]] = []
        self.connected_d: Deferred[HTTPClient] = Deferred()
        self.lost = False

    def connectionMade(self) -> None:
        self.connected_d.callback(self)

    def send(self, raw: bytes) -> Deferred[tuple[int, bytes, float]]:
        d: Deferred[tuple[int, bytes, float]] = Deferred()
        if self.lost:
            d.errback(ConnectionError("connection lost"))
            return d
        self.waiting.append(d)
        assert self.transport is not None
        self.transport.write(raw)
        return d

    def dataReceived(self, data: bytes) -> None:
        now = time.perf_counter()
        self.buf += data
        while self.waiting:
            parsed = parse_response(self.buf)
            if parsed is None:
                return
            status, body, used = parsed
            self.buf = self.buf[used:]
            self.waiting.pop(0).callback((status, body, now))

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            d.errback(ConnectionError("connection lost before the answer"))


def connect(reactor: Any, port: int) -> Deferred[HTTPClient]:
    client = HTTPClient()

    class F(protocol.ClientFactory):
        def buildProtocol(self, addr: Any) -> HTTPClient:
            return client

        def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
            if not client.connected_d.called:
                client.connected_d.errback(reason)

    reactor.connectTCP("127.0.0.1", port, F(), timeout=30)
    return client.connected_d


async def get_metrics(reactor: Any, admin_port: int) -> dict[str, float]:
    client = await connect(reactor, admin_port)
    status, body, _ = await client.send(http_bytes("GET", "/metrics", keep_alive=False))
    assert client.transport is not None
    client.transport.loseConnection()
    return common.parse_metrics(body.decode())


def ms(v: float) -> float:
    return round(v * 1000, 2)


async def run(reactor: Any, args: argparse.Namespace, server: common.Server, admin: int) -> dict[str, Any]:
    n = args.polls
    boxes = [common.new_key() for _ in range(n)]
    box_b64 = [common.key_b64u(k) for k in boxes]
    sender = common.new_key()
    sender_b64 = common.key_b64u(sender)
    now = int(time.time())
    deposits = []
    for i in range(n):
        msg_id, text = common.envelope_text(
            sender, sender_b64, box_b64[i], os.urandom(common.CIPHERTEXT_BYTES), now, 3600
        )
        deposits.append((msg_id, http_bytes("POST", "/api/mesh/dm/send", text.encode())))

    # ---- phase 1: open the long-polls
    results: dict[int, tuple[int, bytes, float]] = {}
    failures: dict[int, str] = {}
    polls: list[Deferred[Any]] = []
    t_open = time.monotonic()
    for start in range(0, n, args.batch):
        for i in range(start, min(n, start + args.batch)):
            body = E.make_signed_request(boxes[i], int(time.time()), os.urandom(16))
            body.update({"wait": 30, "limit": 100})
            raw = http_bytes("POST", "/api/mesh/dm/poll", json.dumps(body).encode(), keep_alive=False)

            async def one(i: int = i, raw: bytes = raw) -> None:
                try:
                    client = await connect(reactor, server.port)
                    results[i] = await client.send(raw)
                except Exception as e:
                    failures[i] = repr(e)

            d = Deferred.fromCoroutine(one())
            polls.append(d)
        # let this batch connect before the next one (bounded by the listen backlog)
        await task.deferLater(reactor, 0.05, lambda: None)
    # wait for the node to report them all waiting (bounded)
    deadline = time.monotonic() + 60
    waiting = 0.0
    while time.monotonic() < deadline:
        waiting = (await get_metrics(reactor, admin)).get("meshrelay_waiting_polls", 0.0)
        if waiting >= n or failures or results:
            break
        await task.deferLater(reactor, 0.1, lambda: None)
    open_s = time.monotonic() - t_open
    pstat = common.proc_status(server.pid)
    rss_waiting = common.tree_rss_mb(server.pid)  # the node and its store writer process
    client_rss = common.proc_status(os.getpid())["VmRSS"] / 1024
    print(
        f"{int(waiting)} long-polls waiting after {open_s:.1f}s (early answers {len(results)}, failures {len(failures)}); "
        f"node RSS {rss_waiting:.1f} MB, {pstat['Threads']} threads; client RSS {client_rss:.1f} MB",
        flush=True,
    )

    # ---- phase 2: one deposit per mailbox at a steady rate
    early = set(results)
    pool = [await connect(reactor, server.port) for _ in range(args.deposit_connections)]
    free = list(pool)
    queue: list[int] = []
    t_sent: dict[int, float] = {}
    t_200: dict[int, float] = {}
    deposit_errors: dict[int, str] = {}
    inflight: list[Deferred[Any]] = []

    def dispatch() -> None:
        while queue and free:
            i = queue.pop(0)
            client = free.pop()
            t_sent[i] = time.perf_counter()
            d = client.send(deposits[i][1])

            def answered(res: tuple[int, bytes, float], i: int = i, client: HTTPClient = client) -> None:
                status, body, at = res
                try:
                    ok = status == 200 and json.loads(body).get("duplicate") is False
                except ValueError:
                    ok = False
                if ok:
                    t_200[i] = at
                else:
                    deposit_errors[i] = f"{status} {body[:200]!r}"
                free.append(client)
                dispatch()

            def failed(f: Any, i: int = i) -> None:
                deposit_errors[i] = f.getErrorMessage()

            d.addCallbacks(answered, failed)
            inflight.append(d)

    t_dep = time.monotonic()
    interval = 1.0 / args.rate
    todo = [i for i in range(n) if i not in early]
    for k, i in enumerate(todo):
        # steady schedule: deposit k at t_dep + k / rate
        delay = t_dep + k * interval - time.monotonic()
        if delay > 0.0005:
            await task.deferLater(reactor, delay, lambda: None)
        if i in results:  # its wait ran out before its turn
            continue
        queue.append(i)
        dispatch()
    deposit_s = time.monotonic() - t_dep
    # every deposit answered, every poll answered (bounded by the polls' own 30 s wait)
    await defer.DeferredList(inflight)
    await defer.DeferredList(polls)
    for client in pool:
        assert client.transport is not None
        client.transport.loseConnection()
    waiting_after = (await get_metrics(reactor, admin)).get("meshrelay_waiting_polls")

    # ---- figures
    wake: list[float] = []
    from_send: list[float] = []
    negative = 0
    wrong = 0
    timed_out = 0
    for i in range(n):
        if i not in results or i not in t_200:
            continue
        status, body, at = results[i]
        try:
            msgs = json.loads(body).get("messages", []) if status == 200 else None
        except ValueError:
            msgs = None
        if not msgs:
            timed_out += 1
            continue
        if [m["msg_id"] for m in msgs] != [deposits[i][0]]:
            wrong += 1
            continue
        lat = at - t_200[i]
        if lat < 0:
            negative += 1
        wake.append(max(0.0, lat))
        from_send.append(at - t_sent[i])
    problems = []
    if waiting < n:
        problems.append(f"only {int(waiting)} of {n} polls were waiting")
    if failures:
        problems.append(f"{len(failures)} polls failed, e.g. {next(iter(failures.values()))}")
    if deposit_errors:
        problems.append(f"{len(deposit_errors)} deposits failed, e.g. {next(iter(deposit_errors.values()))}")
    if wrong:
        problems.append(f"{wrong} polls returned something other than their envelope")
    if timed_out or early:
        problems.append(f"{timed_out + len(early)} polls ended before their deposit (raise --rate or lower --polls)")
    if waiting_after:
        problems.append(f"{waiting_after} waiters left after every poll was answered")
    return {
        "polls": n,
        "waiting": int(waiting),
        "open_s": round(open_s, 2),
        "node_rss_waiting_mb": round(rss_waiting, 1),
        "node_threads": pstat["Threads"],
        "client_rss_mb": round(client_rss, 1),
        "rate": args.rate,
        "deposit_s": round(deposit_s, 2),
        "woken": len(wake),
        "wake_ms_p50": ms(common.percentile(wake, 50)),
        "wake_ms_p90": ms(common.percentile(wake, 90)),
        "wake_ms_p99": ms(common.percentile(wake, 99)),
        "wake_ms_max": ms(max(wake)) if wake else None,
        "wake_before_200": negative,
        "send_to_wake_ms_p50": ms(common.percentile(from_send, 50)),
        "send_to_wake_ms_p99": ms(common.percentile(from_send, 99)),
        "node_peak_rss_mb": round(common.tree_rss_mb(server.pid, "VmHWM"), 1),
        "problems": problems,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--polls", type=int, default=5000)
    p.add_argument("--rate", type=float, default=500.0, help="deposits per second (default 500)")
    p.add_argument("--batch", type=int, default=250, help="long-polls opened per 50 ms step")
    p.add_argument("--deposit-connections", type=int, default=8)
    p.add_argument("--out", default=os.path.join(HERE, "results", "longpoll.json"))
    args = p.parse_args(argv)
    if args.polls / args.rate > 20:
        p.error("polls / rate must be at most 20 s so every deposit lands within the 30 s wait")
    nofile = args.polls + args.deposit_connections + 200
    got = common.raise_nofile(nofile)
    if got < nofile:
        p.error(f"RLIMIT_NOFILE is {got}; {nofile} needed (raise the hard limit)")

    workdir = tempfile.mkdtemp(prefix="meshrelay-bench-longpoll-")
    server, admin = common.meshrelay_node(workdir, "node", os.path.join(workdir, "data"))
    server.start(nofile=nofile)
    report: dict[str, Any] = {"benchmark": "longpoll", "machine": common.machine_info()}
    try:
        rss_idle = common.tree_rss_mb(server.pid)
        out: dict[str, Any] = {}
        from twisted.internet import reactor

        async def body() -> None:
            out.update(await run(reactor, args, server, admin))

        failure: list[Any] = []
        d = Deferred.fromCoroutine(body())
        d.addErrback(failure.append)
        d.addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]
        reactor.run()  # type: ignore[attr-defined]
        if failure:
            failure[0].raiseException()
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    report.update(out)
    report["node_rss_idle_mb"] = round(rss_idle, 1)
    print()
    print(
        f"{out['waiting']} waiting long-polls: node RSS {out['node_rss_waiting_mb']} MB "
        f"(idle {report['node_rss_idle_mb']} MB, peak {out['node_peak_rss_mb']} MB)   target < 300 MB"
    )
    print(
        f"{out['woken']} woken by deposits at {args.rate:.0f}/s: wake latency (deposit's 200 -> poll's answer) "
        f"p50 {out['wake_ms_p50']} ms, p90 {out['wake_ms_p90']} ms, p99 {out['wake_ms_p99']} ms, "
        f"max {out['wake_ms_max']} ms   target p99 < 50 ms"
    )
    print(
        f"  answered before the deposit's 200: {out['wake_before_200']}; deposit sent -> poll answered: "
        f"p50 {out['send_to_wake_ms_p50']} ms, p99 {out['send_to_wake_ms_p99']} ms"
    )
    for prob in out["problems"]:
        print(f"PROBLEM: {prob}")
    common.write_json(args.out, report)
    print(f"wrote {args.out}")
    return 1 if out["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
