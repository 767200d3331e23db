"""Real ``twistd meshrelay`` processes on loopback ports, for integration tests.

Each :class:`NodeProcess` gets its own directory (config, data, log), listens
on free ``127.0.0.1`` ports, and can be started, SIGKILLed, stopped and
restarted.  The child runs this checkout's code (``PYTHONPATH`` is the repo
root), so an un-reinstalled working tree is what gets tested.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from meshrelay import envelope as E
from meshrelay.config import to_toml
from meshrelay.peers import H_HMAC, H_NONCE, H_TS, H_URL, compute_mac, derive_key

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


#: ports handed to test nodes: below Linux's ephemeral range (32768-60999), so
#: an outgoing connection of this or another process cannot take a node's port
#: between our check and the node's bind (or while a SIGKILLed node restarts)
STABLE_PORTS = (20000, 32000)
_handed_out: set[int] = set()


def terminate(proc: subprocess.Popen[Any], timeout: float) -> int:
    """SIGTERM ``proc`` and wait up to ``timeout`` s for it to exit, then SIGKILL; returns its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
    return proc.returncode


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.2) -> None:
    """Poll ``predicate`` until true; fail after ``timeout`` seconds (a guard, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting: {what}")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port on 127.0.0.1, free a moment ago, outside the ephemeral range, not handed out before."""
    pick = random.SystemRandom()
    for _ in range(1000):
        port = pick.randrange(*STABLE_PORTS)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free port below the ephemeral range")


def http_request(
    port: int, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None, timeout: float = 40.0
) -> tuple[int, Any]:
    """One blocking HTTP request to 127.0.0.1:port; returns (status, decoded JSON or raw bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        hdrs = {"Content-Type": "application/json"}
        hdrs.update(headers or {})
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw
    finally:
        conn.close()


class NodeProcess:
    """One meshrelay node run by ``twistd -n meshrelay --config FILE``."""

    def __init__(
        self,
        base_dir: str,
        name: str,
        *,
        port: int | None = None,
        admin_port: int | None = None,
        config: dict[str, Any] | None = None,
        peers: list[dict[str, Any]] | None = None,
    ) -> None:
        self.name = name
        # absolute: the child runs with cwd=self.dir, so relative config/data paths would break
        self.dir = os.path.abspath(os.path.join(base_dir, name))
        os.makedirs(self.dir, exist_ok=True)
        self.port = port or free_port()
        self.admin_port = admin_port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = os.path.join(self.dir, "data")
        self.config_path = os.path.join(self.dir, "meshrelay.toml")
        self.log_path = os.path.join(self.dir, "twistd.log")
        self.extra = config or {}
        self.peers = list(peers or [])
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self) -> None:
        raw: dict[str, Any] = {
            "node": {
                "public_url": self.url,
                "listen": f"tcp:{self.port}:interface=127.0.0.1",
                "admin_listen": f"tcp:{self.admin_port}:interface=127.0.0.1",
                "data_dir": self.data_dir,
            },
            # The test process is one client address generating all the load: no per-address
            # request rate, deposit byte budget or waiting-poll share (the connection share stays).
            "limits": {"client_rate": 0, "deposit_bytes_rate": 0, "max_waiting_polls_per_address": 0},
        }
        for section, table in self.extra.items():
            raw.setdefault(section, {}).update(table)
        if self.peers:
            raw["peers"] = self.peers
        with open(self.config_path, "w") as fh:
            fh.write(to_toml(raw))

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            f"--pidfile={os.path.join(self.dir, 'twistd.pid')}",
            "meshrelay",
            "--config",
            self.config_path,
        ]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        return env

    def start(self, wait: bool = True, timeout: float = 30.0) -> NodeProcess:
        self.write_config()
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.command(), cwd=self.dir, env=self.env(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log.close()
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0, interval: float = 0.05) -> None:
        """Until the node answers its health check (polled every ``interval`` s)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"node {self.name} exited with {self.proc.returncode}:\n{self.tail_log()}")
            try:
                status, _ = http_request(self.port, "GET", "/api/mesh/health", timeout=2)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(interval)
        raise RuntimeError(f"node {self.name} did not become ready in {timeout}s:\n{self.tail_log()}")

    def tail_log(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                return b"\n".join(fh.read().splitlines()[-lines:]).decode(errors="replace")
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        self.proc = None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait for a clean exit; returns the exit code."""
        if self.proc is None:
            return None
        code = terminate(self.proc, timeout)
        self.proc = None
        return code

    def restart(self, wait: bool = True) -> NodeProcess:
        self.stop()
        return self.start(wait)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def request(self, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        return http_request(self.port, method, path, body, **kw)

    def admin(self, path: str) -> tuple[int, Any]:
        return http_request(self.admin_port, "GET", path)

    def metric(self, name: str, **labels: str) -> float:
        """The sum of ``name``'s samples on the node's admin JSON metrics whose labels include ``labels``.

        An unknown name fails (it would otherwise read as 0 and pass an ``== 0`` check).
        """
        status, body = self.admin("/api/mesh/metrics")
        assert status == 200, (status, body)
        assert name in body["metrics"], f"the node exports no metric sample named {name!r}"
        return float(
            sum(s["value"] for s in body["metrics"][name] if all(s["labels"].get(k) == v for k, v in labels.items()))
        )

    def send(self, env: dict[str, Any]) -> tuple[int, Any]:
        return self.request("POST", "/api/mesh/dm/send", env)

    def poll(self, body: dict[str, Any], timeout: float = 40.0) -> tuple[int, Any]:
        return self.request("POST", "/api/mesh/dm/poll", body, timeout=timeout)


def changes_page(node: NodeProcess, reader_url: str, secret: str, since: int, limit: int = 500) -> dict[str, Any]:
    """One page of ``node``'s changes feed, read (peer-HMAC-signed) as the peer ``reader_url``."""
    key = derive_key(secret, reader_url)
    target = f"/api/mesh/dm/changes?since={since}&limit={limit}"
    ts = int(time.time())
    nonce = E.b64u_encode(os.urandom(16))
    headers = {
        H_URL: reader_url,
        H_TS: str(ts),
        H_NONCE: nonce,
        H_HMAC: compute_mac(key, "GET", target, ts, nonce, b""),
    }
    status, page = http_request(node.port, "GET", target, headers=headers, timeout=30)
    if status != 200:
        raise AssertionError(f"changes at {node.name} answered {status}: {page!r}")
    return dict(page)


def feed_ids(node: NodeProcess, reader_url: str, secret: str) -> tuple[set[str], set[tuple[str, str]]]:
    """Every live envelope id and signed ack (mailbox, nonce) in ``node``'s changes feed.

    Read page by page as the peer ``reader_url``, whose link to ``node`` has
    ``secret``.
    """
    envelopes: set[str] = set()
    acks: set[tuple[str, str]] = set()
    since = 0
    for _ in range(100000):
        page = changes_page(node, reader_url, secret, since)
        for item in page["items"]:
            if "envelope" in item:
                envelopes.add(item["envelope"]["msg_id"])
            else:
                acks.add((item["ack"]["mailbox"], item["ack"]["nonce"]))
        since = page["next"]
        if not page["more"]:
            return envelopes, acks
    raise AssertionError(f"the feed of {node.name} did not end")
