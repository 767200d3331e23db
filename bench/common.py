"""Shared pieces of the benchmark tools: nodes as processes, envelopes, /proc readings.

Every tool runs this checkout's code: nodes are started as
``sys.executable -c "from twisted.scripts.twistd import run; run()" -n meshrelay
--config FILE`` with ``PYTHONPATH`` set to the repository root, exactly like
``tests/harness.py`` does.  Servers listen on 127.0.0.1 only.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from cryptography.hazmat.primitives.serialization import Encoding  # noqa: E402

from meshrelay import envelope as E  # noqa: E402
from meshrelay.config import to_toml  # noqa: E402
from tests.harness import free_port, http_request, terminate  # noqa: E402

#: envelopes are ~1 KiB of JSON with this much ciphertext (about 1050 bytes on the wire)
CIPHERTEXT_BYTES = 540


# --------------------------------------------------------------------------- processes


def raise_nofile(want: int) -> int:
    """Raise this process's RLIMIT_NOFILE soft limit towards ``want`` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, Threads... from /proc/PID/status (memory in kB)."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "VmSize", "Threads", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0])
    return out


def rss_mb(pid: int) -> float:
    return proc_status(pid)["VmRSS"] / 1024.0


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (e.g. a node's store writer process)."""
    out: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                out.extend(int(c) for c in fh.read().split())
        except OSError:
            continue
    return out


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and its living children (a node and its writer process)."""
    total = cpu_seconds(pid)
    for child in child_pids(pid):
        try:
            total += cpu_seconds(child)
        except OSError:
            continue
    return total


def rss_by_process(pid: int) -> dict[str, float]:
    """VmRSS (MB) of a node and of each child by its role (store writer, verifier)."""
    out = {"node": round(rss_mb(pid), 1)}
    for child in child_pids(pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as fh:
                cmd = fh.read().decode(errors="replace")
            role = "writer" if "writer" in cmd else "verifier" if "child" in cmd else f"child {child}"
            out[role] = round(out.get(role, 0.0) + rss_mb(child), 1)
        except OSError:
            continue
    return out


def tree_rss_mb(pid: int, key: str = "VmRSS") -> float:
    """RSS of ``pid`` plus its living children (``key="VmHWM"``: the sum of their peaks)."""
    total = proc_status(pid)[key] / 1024.0
    for child in child_pids(pid):
        try:
            total += proc_status(child)[key] / 1024.0
        except OSError:
            continue
    return total


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """utime + stime per thread (task id -> seconds); the main (reactor) thread's id is ``pid``."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def request(port: int, method: str, path: str, body: Any = None, timeout: float = 30.0) -> tuple[int, Any]:
    """One blocking request to 127.0.0.1:port; (status, JSON or raw bytes)."""
    return http_request(port, method, path, body, timeout=timeout)


def wait_healthy(port: int, proc: subprocess.Popen[bytes], timeout: float, path: str = "/api/mesh/health") -> None:
    """Poll ``path`` until it answers 200; raise if the process dies or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before answering {path}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            try:
                conn.request("GET", path)
                if conn.getresponse().status == 200:
                    return
            finally:
                conn.close()
        except OSError:
            pass
        time.sleep(0.005)
    raise RuntimeError(f"no 200 from {path} on port {port} within {timeout}s")


def _child_limits(nofile: int) -> Any:
    def pre() -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = nofile if hard == resource.RLIM_INFINITY else min(nofile, hard)
        if soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))

    return pre


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


class Server:
    """A benchmarked server process (a meshrelay node or the baseline app)."""

    def __init__(self, name: str, workdir: str, port: int, command: list[str]) -> None:
        self.name = name
        self.workdir = workdir
        self.port = port
        self.command = command
        self.log_path = os.path.join(workdir, f"{name}.log")
        self.proc: subprocess.Popen[bytes] | None = None
        #: seconds from Popen to the first 200 on the health path
        self.startup_s = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 120.0, nofile: int = 4096, health: str = "/api/mesh/health") -> Server:
        os.makedirs(self.workdir, exist_ok=True)
        log = open(self.log_path, "ab")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            self.command,
            cwd=self.workdir,
            env=child_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_child_limits(nofile),
        )
        log.close()
        try:
            wait_healthy(self.port, self.proc, timeout, health)
        except RuntimeError as e:
            self.kill()
            raise RuntimeError(f"{self.name}: {e}\n{self.tail_log()}") from None
        self.startup_s = time.monotonic() - t0
        return self

    def tail_log(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                return b"\n".join(fh.read().splitlines()[-lines:]).decode(errors="replace")
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc is None:
            return
        terminate(self.proc, timeout)
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self.proc = None


#: set by tools' --switch-interval: run the node with sys.setswitchinterval(this) (an experiment knob)
SWITCH_INTERVAL: float | None = None


def twistd_command(config_path: str, workdir: str) -> list[str]:
    prelude = "" if SWITCH_INTERVAL is None else f"import sys; sys.setswitchinterval({SWITCH_INTERVAL!r}); "
    # experiments: Python statements run in the node before twistd (instrumentation, monkeypatches)
    if os.environ.get("MESHRELAY_BENCH_PRELUDE"):
        prelude += os.environ["MESHRELAY_BENCH_PRELUDE"] + "; "
    return [
        sys.executable,
        "-c",
        prelude + "from twisted.scripts.twistd import run; run()",
        "-n",
        f"--pidfile={os.path.join(workdir, 'twistd.pid')}",
        "meshrelay",
        "--config",
        config_path,
    ]


def meshrelay_node(
    workdir: str,
    name: str,
    data_dir: str,
    durability: str = "normal",
    node: dict[str, Any] | None = None,
    limits: dict[str, Any] | None = None,
) -> tuple[Server, int]:
    """A meshrelay node Server (not started) and its admin port."""
    os.makedirs(workdir, exist_ok=True)
    port, admin = free_port(), free_port()
    raw: dict[str, Any] = {
        "node": {
            "public_url": f"http://127.0.0.1:{port}",
            "listen": f"tcp:{port}:interface=127.0.0.1:backlog=1024",
            "admin_listen": f"tcp:{admin}:interface=127.0.0.1",
            "data_dir": data_dir,
            "durability": durability,
            **(node or {}),
        },
        # The load generator is one client address: no per-IP limit (a bench may set one).
        "limits": {"client_rate": 0, "deposit_bytes_rate": 0, **(limits or {})},
    }
    config_path = os.path.join(workdir, f"{name}.toml")
    with open(config_path, "w") as fh:
        fh.write(to_toml(raw))
    return Server(name, workdir, port, twistd_command(config_path, workdir)), admin


def metrics_text(admin_port: int) -> str:
    status, body = request(admin_port, "GET", "/metrics")
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    return body.decode() if isinstance(body, bytes) else json.dumps(body)


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {"name{labels}": value} (labels as written)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


# --------------------------------------------------------------------------- envelopes


def new_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


key_b64u = E.public_key_b64u


def private_hex(key: Ed25519PrivateKey) -> str:
    from cryptography.hazmat.primitives.serialization import NoEncryption, PrivateFormat

    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()).hex()


def key_from_hex(text: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(text))


def envelope_text(
    sender: Ed25519PrivateKey, sender_b64: str, mailbox_b64: str, ciphertext: bytes, ts: int, ttl: int
) -> tuple[str, str]:
    """(msg_id, canonical compact JSON) of a signed envelope; the text is what the store keeps."""
    signed = E.envelope_signed_bytes(mailbox_b64, sender_b64, ts, ttl, ciphertext)
    msg_id = hashlib.sha256(signed).hexdigest()
    sig = E.b64u_encode(sender.sign(signed))
    text = (
        f'{{"v":1,"msg_id":"{msg_id}","mailbox":"{mailbox_b64}","sender":"{sender_b64}",'
        f'"ts":{ts},"ttl":{ttl},"ciphertext":"{E.b64u_encode(ciphertext)}","sig":"{sig}"}}'
    )
    return msg_id, text


class Population:
    """Mailboxes and senders laid out so that ``n`` envelopes reach no cap.

    Envelope ``i`` goes to mailbox ``i % M`` from sender ``(i // M) % S``; with
    ``M >= n / per_mailbox`` and ``S = per_mailbox / per_sender`` every mailbox
    holds at most ``per_mailbox`` and every (sender, mailbox) pair at most
    ``per_sender`` envelopes.
    """

    def __init__(self, n: int, per_mailbox: int = 128, per_sender: int = 8, min_mailboxes: int = 256) -> None:
        self.n = n
        self.m = max(min_mailboxes, -(-n // per_mailbox))
        self.s = max(1, per_mailbox // per_sender)
        self.mailboxes = [new_key() for _ in range(self.m)]
        self.mailbox_b64 = [key_b64u(k) for k in self.mailboxes]
        self.senders = [new_key() for _ in range(self.s)]
        self.sender_b64 = [key_b64u(k) for k in self.senders]

    def envelopes(
        self, ts: int, ttl: int, ct_bytes: int = CIPHERTEXT_BYTES, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[int, str, str]]:
        """(mailbox index, msg_id, JSON text) for envelopes ``start..stop``."""
        for i in range(start, self.n if stop is None else stop):
            mi = i % self.m
            si = (i // self.m) % self.s
            # distinct ciphertext per envelope: a counter prefix on random bytes
            ct = i.to_bytes(8, "big") + os.urandom(ct_bytes - 8)
            msg_id, text = envelope_text(self.senders[si], self.sender_b64[si], self.mailbox_b64[mi], ct, ts, ttl)
            yield mi, msg_id, text


def write_envelope_file(path: str, n: int, ts: int, ttl: int, ct_bytes: int = CIPHERTEXT_BYTES) -> int:
    """Write ``n`` pre-signed envelopes, one JSON text per line; returns the mean line length."""
    pop = Population(n)
    total = 0
    with open(path, "w") as fh:
        for _, _, text in pop.envelopes(ts, ttl, ct_bytes):
            fh.write(text)
            fh.write("\n")
            total += len(text)
    return total // max(1, n)


# --------------------------------------------------------------------------- figures


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of ``values``."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(p / 100.0 * len(ordered) + 0.5)) - 1))
    return float(ordered[k])


def write_json(path: str, data: Any) -> None:
    """Write ``data`` to ``path`` whole or not at all (a temporary file renamed over it).

    Another process may be waiting for the file to appear (bench/abuse.py's workers): it must
    never read half of one.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, path)


def machine_info() -> dict[str, Any]:
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    return {"cpus": os.cpu_count(), "loadavg": [round(x, 2) for x in load], "python": sys.version.split()[0]}
