"""``meshrelay demo-mesh``: three peered nodes on loopback, in one step.

Writes three configs with full peering (docs/operator.md, peers: each node's
``public_url`` is what the others list as its peer ``url``; each link has one
generated secret, in a mode-0600 file read by both ends), two identities to
try messages with, starts ``twistd -n meshrelay`` for each node, prints the
addresses and the commands to try, and stops all three cleanly on Ctrl-C or
SIGTERM.  Everything lives in one directory (a new temporary one unless
``--dir`` is given), including each node's log and data.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import meshrelay
from meshrelay.client import ClientError, Identity, NodeClient
from meshrelay.config import ConfigError, load_config, new_peer_secret, to_toml
from meshrelay.files import PrivateFileError, write_private_file

NAMES = ("node-a", "node-b", "node-c")
#: how long a node may take to answer /api/mesh/health after its start
START_TIMEOUT = 30.0
#: how long a node may take to exit after SIGTERM before it is killed
STOP_TIMEOUT = 20.0


def _say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _err(text: str) -> None:
    sys.stderr.write(f"meshrelay: {text}\n")
    sys.stderr.flush()


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def choose_ports(base_port: int) -> list[tuple[int, int]]:
    """(public, admin) per node: ``base``, ``base+1``, ``base+2`` and ``base+10``...; 0 = any free."""
    if base_port == 0:
        return [(_free_port(), _free_port()) for _ in NAMES]
    ports = [(base_port + i, base_port + 10 + i) for i in range(len(NAMES))]
    for public, admin in ports:
        for port in (public, admin):
            if not _port_free(port):
                raise ClientError(f"port {port} on 127.0.0.1 is in use (choose another --base-port, or 0)")
    return ports


def write_mesh(directory: str, ports: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """Write the secrets and the three configs; return one dict per node (name, url, paths)."""
    nodes = []
    for name, (public, admin) in zip(NAMES, ports):
        node_dir = os.path.join(directory, name)
        os.makedirs(node_dir, exist_ok=True)
        nodes.append(
            {
                "name": name,
                "dir": node_dir,
                "url": f"http://127.0.0.1:{public}",
                "listen": f"tcp:{public}:interface=127.0.0.1",
                "admin_listen": f"tcp:{admin}:interface=127.0.0.1",
                "admin_url": f"http://127.0.0.1:{admin}",
                "config": os.path.join(node_dir, "meshrelay.toml"),
                "log": os.path.join(node_dir, "twistd.log"),
            }
        )
    secret_dir = os.path.join(directory, "secrets")
    os.makedirs(secret_dir, mode=0o700, exist_ok=True)
    secret_files: dict[frozenset[str], str] = {}
    for i, a in enumerate(nodes):
        for b in nodes[i + 1 :]:
            path = os.path.join(secret_dir, f"{a['name']}--{b['name']}.secret")
            # A fresh secret per link and per run; both ends read the same file.
            try:
                write_private_file(path, new_peer_secret() + "\n", force=True)
            except PrivateFileError as e:
                raise ClientError(str(e)) from None
            secret_files[frozenset((a["name"], b["name"]))] = path
    for node in nodes:
        raw: dict[str, Any] = {
            "node": {
                "public_url": node["url"],
                "listen": node["listen"],
                "admin_listen": node["admin_listen"],
                "data_dir": os.path.join(node["dir"], "data"),
            },
            "sync": {"interval": 5},
            "peers": [
                {"url": other["url"], "secret_file": secret_files[frozenset((node["name"], other["name"]))]}
                for other in nodes
                if other is not node
            ],
        }
        with open(node["config"], "w", encoding="utf-8") as fh:
            fh.write(f"# meshrelay demo mesh: {node['name']}\n" + to_toml(raw))
        try:
            load_config(node["config"])
        except ConfigError as e:
            raise ClientError(f"demo config {node['config']} is invalid: {e}") from None
    return nodes


def _identity(directory: str, name: str) -> tuple[str, Identity]:
    path = os.path.join(directory, f"{name}.key")
    if os.path.exists(path):
        return path, Identity.load(path)
    ident = Identity.generate()
    ident.save(path)
    return path, ident


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # The directory holding the meshrelay package, so twistd finds this
    # meshrelay (and its plugin) whether it is installed or run from a checkout.
    root = os.path.dirname(os.path.dirname(os.path.abspath(meshrelay.__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def start_node(node: dict[str, Any]) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-c",
        "from twisted.scripts.twistd import run; run()",
        "-n",
        f"--pidfile={os.path.join(node['dir'], 'twistd.pid')}",
        f"--logfile={node['log']}",
        "meshrelay",
        "--config",
        node["config"],
    ]
    # A session of its own: the terminal's Ctrl-C reaches only this process,
    # which then stops the nodes in order.
    with open(os.path.join(node["dir"], "stderr.log"), "ab") as err:  # the child keeps its own descriptor
        return subprocess.Popen(
            cmd,
            cwd=node["dir"],
            env=_child_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )


def _tail(path: str, lines: int = 5) -> str:
    try:
        with open(path, "rb") as fh:
            return "\n".join(fh.read().decode(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_ready(
    nodes: list[dict[str, Any]], procs: list[subprocess.Popen[bytes]], should_stop: Callable[[], bool] = lambda: False
) -> None:
    """Wait until every node answers its health check (or ``should_stop()``)."""
    deadline = time.monotonic() + START_TIMEOUT
    pending = list(range(len(nodes)))
    while pending and not should_stop():
        for i in list(pending):
            if procs[i].poll() is not None:
                node = nodes[i]
                errs = _tail(os.path.join(node["dir"], "stderr.log")) or _tail(node["log"])
                raise ClientError(f"{node['name']} exited with {procs[i].returncode}: {errs.strip()}")
            try:
                NodeClient(nodes[i]["url"], timeout=2.0).health()
                pending.remove(i)
            except ClientError:
                pass
        if pending and time.monotonic() > deadline:
            raise ClientError(f"{nodes[pending[0]]['name']} did not start within {START_TIMEOUT:.0f}s")
        if pending:
            time.sleep(0.1)


def stop_nodes(nodes: list[dict[str, Any]], procs: list[subprocess.Popen[bytes]]) -> bool:
    """SIGTERM every node, wait for each (SIGKILL after STOP_TIMEOUT); True if all exited 0."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    clean = True
    for node, p in zip(nodes, procs):
        try:
            code = p.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            p.kill()
            code = p.wait()
            _err(f"{node['name']} did not stop in {STOP_TIMEOUT:.0f}s; killed")
        # twistd ends a clean SIGTERM shutdown by re-raising the signal.
        ok = code in (0, -signal.SIGTERM)
        clean = clean and ok
        _say(f"stopped {node['name']}" + ("" if ok else f" (exit {code})"))
    return clean


def _cli() -> str:
    return "meshrelay" if shutil.which("meshrelay") else f"{shlex.quote(sys.executable)} -m meshrelay.cli"


def run_demo(directory: str | None, base_port: int) -> int:
    """Start the mesh, print how to use it, run until Ctrl-C or SIGTERM, stop it."""
    directory = os.path.abspath(directory or tempfile.mkdtemp(prefix="meshrelay-demo-"))
    ports = choose_ports(base_port)
    try:
        os.makedirs(directory, exist_ok=True)
        nodes = write_mesh(directory, ports)
        alice_path, alice = _identity(directory, "alice")
        bob_path, bob = _identity(directory, "bob")
    except OSError as e:
        raise ClientError(f"cannot use {directory}: {e.strerror or e}") from None

    stop_requested: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        stop_requested.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for node in nodes:
            procs.append(start_node(node))
        try:
            wait_ready(nodes, procs, lambda: bool(stop_requested))
        except ClientError as e:
            _err(str(e))
            stop_nodes(nodes, procs)
            return 1
        if stop_requested:
            _say("stopping the demo mesh")
            return 0 if stop_nodes(nodes, procs) else 1
        cli = _cli()
        q = shlex.quote
        _say(f"meshrelay demo mesh: {len(nodes)} nodes on 127.0.0.1 with full peering, in {directory}")
        for node in nodes:
            _say(f"  {node['name']}  {node['url']}   status {node['admin_url']}/status   log {node['log']}")
        _say(f"identities:\n  alice {alice.address}  ({alice_path})\n  bob   {bob.address}  ({bob_path})")
        _say("try:")
        _say(f"  {cli} send --key {q(alice_path)} --node {nodes[0]['url']} --to {bob.address} 'hello bob'")
        _say(f"  {cli} poll --key {q(bob_path)} --node {nodes[2]['url']} --wait 10 --ack")
        _say(f"  {cli} watch --key {q(bob_path)} --node {nodes[1]['url']}")
        _say("Ctrl-C stops all three nodes.")
        _say("ready")
        while not stop_requested:
            for node, p in zip(nodes, procs):
                if p.poll() is not None:
                    _err(f"{node['name']} exited with {p.returncode}; stopping the others. Log: {node['log']}")
                    stop_nodes(nodes, procs)
                    return 1
            time.sleep(0.2)
        _say("stopping the demo mesh")
        return 0 if stop_nodes(nodes, procs) else 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
