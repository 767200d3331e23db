"""Integration tests: real ``twistd -n meshrelay`` processes on loopback ports.

Durability across SIGKILL and SIGTERM restarts, long-polls through a real
socket, and the command line (bad configs, options that override the file).
Every wait is bounded by a failure guard; no assertion is about elapsed time.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from typing import Any

import pytest
from twisted.trial.unittest import SynchronousTestCase

from meshrelay.config import to_toml
from tests.harness import NodeProcess, free_port, http_request
from tests.helpers import Identity

pytestmark = pytest.mark.integration

#: failure guard for anything a test waits for (never an assertion on speed)
GUARD = 60.0


def now() -> int:
    return int(time.time())


def metric(node: NodeProcess, name: str) -> float:
    return node.metric(name)


def stop_cleanly(node: NodeProcess) -> None:
    """SIGTERM the node and check it shut down through its services.

    twistd re-raises the signal it stopped on once it has shut down cleanly,
    so the exit status is -SIGTERM; the log shows the node's own stop.
    """
    code = node.stop()
    assert code in (0, -signal.SIGTERM), code
    with open(node.log_path, encoding="utf-8", errors="replace") as fh:
        last_run = fh.read().rsplit("starting up.", 1)[-1]
    assert "meshrelay node stopped" in last_run and "Server Shut Down." in last_run, last_run[-3000:]


def wait_for(predicate: Any, what: str, guard: float = GUARD) -> None:
    """Poll ``predicate`` until it is true; fail (not time out silently) after ``guard`` s."""
    deadline = time.monotonic() + guard
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {guard}s")
        time.sleep(0.02)


class Traffic:
    """Envelopes spread over mailboxes and senders so that no cap is reached."""

    def __init__(self, mailboxes: int = 10, senders: int = 10) -> None:
        self.boxes = [Identity() for _ in range(mailboxes)]
        self.senders = [Identity() for _ in range(senders)]
        #: msg_id -> the envelope as sent
        self.sent: dict[str, dict[str, Any]] = {}

    def envelope(self, i: int) -> dict[str, Any]:
        # envelope i goes to mailbox i % M from sender (i // M) % S: with 500
        # envelopes, 10 x 10 gives 50 per mailbox and 5 per (sender, mailbox).
        box = self.boxes[i % len(self.boxes)]
        sender = self.senders[(i // len(self.boxes)) % len(self.senders)]
        return sender.envelope(box, f"message {i} ".encode() + os.urandom(64), ts=now(), ttl=3600)

    def send(self, node: NodeProcess, first: int, n: int) -> None:
        for i in range(first, first + n):
            env = self.envelope(i)
            status, body = node.send(env)
            assert status == 200, (i, status, body)
            assert body == {"ok": True, "msg_id": env["msg_id"], "duplicate": False}, body
            self.sent[env["msg_id"]] = env

    def expected(self, box: Identity) -> set[str]:
        return {m for m, env in self.sent.items() if env["mailbox"] == box.pub}


def drain(node: NodeProcess, box: Identity, page: int = 20) -> list[dict[str, Any]]:
    """Poll ``box`` page by page, acking each page with the next poll; return every envelope."""
    got: list[dict[str, Any]] = []
    ack: list[str] = []
    for _ in range(1000):  # bounded: far more pages than any test stores
        status, body = node.poll(box.poll_body(ts=now(), ack=ack, limit=page))
        assert status == 200, (status, body)
        got.extend(body["messages"])
        ack = [m["msg_id"] for m in body["messages"]]
        if not ack:
            return got
    raise AssertionError("mailbox never drained")


def count(node: NodeProcess, box: Identity) -> int:
    status, body = node.request("POST", "/api/mesh/dm/count", box.poll_body(ts=now()))
    assert status == 200, (status, body)
    return int(body["count"])


class DurabilityTests(SynchronousTestCase):
    """Everything answered 200 is still there after the process dies or stops."""

    def start(self, durability: str) -> NodeProcess:
        node = NodeProcess(os.path.abspath(self.mktemp()), "n1", config={"node": {"durability": durability}})
        self.addCleanup(node.kill)
        return node.start()

    def check_all_there(self, node: NodeProcess, traffic: Traffic) -> None:
        # count first (read-only), then drain with acks: exactly the sent msg_ids, intact
        for box in traffic.boxes:
            self.assertEqual(count(node, box), len(traffic.expected(box)))
        seen: dict[str, dict[str, Any]] = {}
        for box in traffic.boxes:
            msgs = drain(node, box)
            ids = [m["msg_id"] for m in msgs]
            self.assertEqual(len(ids), len(set(ids)), "a message was delivered twice while draining")
            self.assertEqual(set(ids), traffic.expected(box))
            seen.update((m["msg_id"], m) for m in msgs)
        self.assertEqual(seen, traffic.sent)
        for box in traffic.boxes:
            self.assertEqual(count(node, box), 0)

    def kill_after_last_answer(self, durability: str) -> None:
        node = self.start(durability)
        traffic = Traffic()
        traffic.send(node, 0, 300)
        traffic.send(node, 300, 200)
        node.kill()  # SIGKILL right after the 500th 200
        node.start()
        self.assertEqual(metric(node, "meshrelay_stored_envelopes"), 500.0)
        self.check_all_there(node, traffic)

    def test_sigkill_after_last_answer_loses_nothing_normal(self) -> None:
        """durability=normal: 500 envelopes answered 200 survive a SIGKILL right after the last answer."""
        self.kill_after_last_answer("normal")

    def test_sigkill_after_last_answer_loses_nothing_full(self) -> None:
        """durability=full: 500 envelopes answered 200 survive a SIGKILL right after the last answer."""
        self.kill_after_last_answer("full")

    def test_clean_sigterm_restart_keeps_the_store(self) -> None:
        """After a clean SIGTERM shutdown a node started on the existing store serves everything it held."""
        node = self.start("normal")
        traffic = Traffic(mailboxes=4, senders=4)
        traffic.send(node, 0, 60)
        stop_cleanly(node)
        node.start()
        self.assertEqual(metric(node, "meshrelay_stored_envelopes"), 60.0)
        # a second clean restart after more deposits, on the same store
        traffic.send(node, 60, 20)
        stop_cleanly(node)
        node.start()
        self.check_all_there(node, traffic)

    def test_acked_messages_stay_acked_across_sigkill(self) -> None:
        """Acks answered 200 survive a SIGKILL: acked mail neither comes back nor can be re-sent."""
        node = self.start("normal")
        traffic = Traffic(mailboxes=2, senders=2)
        traffic.send(node, 0, 8)
        box = traffic.boxes[0]
        acked = [m["msg_id"] for m in drain(node, box)]
        self.assertEqual(set(acked), traffic.expected(box))
        node.kill()
        node.start()
        self.assertEqual(count(node, box), 0)
        for msg_id in acked:
            status, body = node.send(traffic.sent[msg_id])
            self.assertEqual((status, body["duplicate"]), (200, True))
        self.assertEqual(count(node, box), 0)
        self.assertEqual(len(drain(node, traffic.boxes[1])), len(traffic.expected(traffic.boxes[1])))


class LongPollTests(SynchronousTestCase):
    """Long-polls held by a real node over real sockets."""

    def setUp(self) -> None:
        self.node = NodeProcess(os.path.abspath(self.mktemp()), "lp")
        self.addCleanup(self.node.kill)
        self.node.start()

    def waiting(self) -> float | None:
        return metric(self.node, "meshrelay_waiting_polls")

    def test_long_poll_is_answered_by_a_deposit(self) -> None:
        """A poll with wait=30 held in another thread is answered with the envelope deposited meanwhile."""
        box, sender = Identity(), Identity()
        result: list[tuple[int, Any]] = []
        thread = threading.Thread(
            target=lambda: result.append(self.node.poll(box.poll_body(ts=now(), wait=30), timeout=GUARD)),
            daemon=True,
        )
        thread.start()
        wait_for(lambda: self.waiting() == 1.0, "the poll to be waiting")
        env = sender.envelope(box, b"wake up", ts=now())
        self.assertEqual(self.node.send(env)[0], 200)
        thread.join(GUARD)
        self.assertFalse(thread.is_alive())
        status, body = result[0]
        self.assertEqual(status, 200)
        self.assertEqual([m["msg_id"] for m in body["messages"]], [env["msg_id"]])
        self.assertEqual(body["messages"][0], env)
        wait_for(lambda: self.waiting() == 0.0, "the waiter to be released")

    def test_disconnected_long_poll_leaves_no_waiter(self) -> None:
        """A client that hangs up mid-long-poll unregisters its waiter long before its wait=30 runs out."""
        box, sender = Identity(), Identity()
        body = json.dumps(box.poll_body(ts=now(), wait=30)).encode()
        sock = socket.create_connection(("127.0.0.1", self.node.port), timeout=GUARD)
        sock.sendall(
            b"POST /api/mesh/dm/poll HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        wait_for(lambda: self.waiting() == 1.0, "the poll to be waiting")
        sock.close()
        # The guard must stay well under the poll's 30 s: a leaked waiter would
        # only go away when its own timer fires.
        wait_for(lambda: self.waiting() == 0.0, "the disconnected waiter to be unregistered", guard=15.0)
        # the mailbox still works: the envelope is kept for the next poll
        env = sender.envelope(box, b"later", ts=now())
        self.assertEqual(self.node.send(env)[0], 200)
        self.assertEqual([m["msg_id"] for m in drain(self.node, box)], [env["msg_id"]])
        self.assertEqual(self.waiting(), 0.0)


class WaitingBoundTests(SynchronousTestCase):
    """limits.max_waiting_polls bounds polls that wait, and only those."""

    def setUp(self) -> None:
        self.node = NodeProcess(os.path.abspath(self.mktemp()), "bound", config={"limits": {"max_waiting_polls": 1}})
        self.addCleanup(self.node.kill)
        self.node.start()

    def hold_the_only_waiting_slot(self) -> threading.Thread:
        idle = Identity()
        thread = threading.Thread(
            target=lambda: self.node.poll(idle.poll_body(ts=now(), wait=5), timeout=GUARD), daemon=True
        )
        thread.start()
        wait_for(lambda: metric(self.node, "meshrelay_waiting_polls") == 1.0, "the first poll to be waiting")
        self.addCleanup(thread.join, GUARD)
        return thread

    def test_long_poll_over_the_bound_is_refused(self) -> None:
        """A long-poll that would wait while the bound is reached answers 429 rate_limited."""
        self.hold_the_only_waiting_slot()
        status, body = self.node.poll(Identity().poll_body(ts=now(), wait=30))
        self.assertEqual((status, body["error"]), (429, "rate_limited"))

    def test_long_poll_with_mail_pending_is_served_when_the_bound_is_reached(self) -> None:
        """A long-poll whose mailbox has mail never waits, so the waiting bound must not refuse it."""
        box, sender = Identity(), Identity()
        env = sender.envelope(box, b"already here", ts=now())
        self.assertEqual(self.node.send(env)[0], 200)
        self.hold_the_only_waiting_slot()
        status, body = self.node.poll(box.poll_body(ts=now(), wait=30))
        self.assertEqual(status, 200, body)
        self.assertEqual([m["msg_id"] for m in body["messages"]], [env["msg_id"]])


class _OverriddenNode(NodeProcess):
    """A node whose command line gives --listen and --data-dir over different values in its file."""

    def __init__(self, base_dir: str, name: str) -> None:
        super().__init__(base_dir, name)
        self.file_port = self.port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cli_data_dir = os.path.join(self.dir, "cli-data")

    def write_config(self) -> None:
        cli_port, self.port = self.port, self.file_port
        try:
            super().write_config()
        finally:
            self.port = cli_port

    def command(self) -> list[str]:
        return super().command() + [
            "--listen",
            f"tcp:{self.port}:interface=127.0.0.1",
            "--data-dir",
            self.cli_data_dir,
        ]


class CommandLineTests(SynchronousTestCase):
    """The real ``twistd meshrelay`` command: bad configs and option overrides."""

    def run_bad(self, raw: dict[str, Any] | None = None, config_path: str | None = None) -> str:
        """Run twistd on a bad config; it must exit non-zero with one line of output, before listening."""
        node = NodeProcess(os.path.abspath(self.mktemp()), "bad")
        if raw is not None:
            with open(node.config_path, "w") as fh:
                fh.write(to_toml(raw))
        if config_path is not None:
            node.config_path = config_path
        proc = subprocess.run(
            node.command(),
            cwd=node.dir,
            env=node.env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=GUARD,
        )
        out = (proc.stdout + proc.stderr).decode(errors="replace")
        self.assertNotEqual(proc.returncode, 0, out)
        lines = [line for line in out.splitlines() if line.strip()]
        self.assertEqual(len(lines), 1, out)
        # it never started half-configured: no store was created
        self.assertFalse(os.path.exists(os.path.join(node.dir, "meshrelay-data")), out)
        return lines[0]

    def assertNames(self, line: str, key: str) -> None:
        self.assertIn(key, line)
        self.assertTrue(line.startswith("meshrelay: config error: "), line)

    def test_unknown_key(self) -> None:
        """An unknown key exits non-zero naming it."""
        self.assertNames(self.run_bad({"limits": {"per_sender_pendng": 8}}), "limits.per_sender_pendng")

    def test_unknown_section(self) -> None:
        """An unknown section exits non-zero naming it."""
        self.assertNames(self.run_bad({"nodes": {"listen": "tcp:1"}}), "nodes")

    def test_wrong_type(self) -> None:
        """A value of the wrong type exits non-zero naming the key."""
        self.assertNames(self.run_bad({"limits": {"clock_skew": "five"}}), "limits.clock_skew")

    def test_bad_choice(self) -> None:
        """A durability that is neither normal nor full exits non-zero naming the key."""
        self.assertNames(self.run_bad({"node": {"durability": "sometimes"}}), "node.durability")

    def test_unreadable_file(self) -> None:
        """A config file that does not exist exits non-zero naming it."""
        missing = os.path.abspath(os.path.join(self.mktemp(), "nope.toml"))
        line = self.run_bad(config_path=missing)
        self.assertNames(line, "config")
        self.assertIn(missing, line)

    def test_config_is_a_directory(self) -> None:
        """A config path that is a directory exits non-zero naming it."""
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        self.assertIn(path, self.run_bad(config_path=path))

    def test_not_toml(self) -> None:
        """A file that is not TOML exits non-zero with one line."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as fh:
            fh.write("[node\nlisten = \n")
        self.assertNames(self.run_bad(config_path=path), path)

    def test_peer_without_secret(self) -> None:
        """A peer with neither secret nor secret_file exits non-zero naming peers[0].secret."""
        line = self.run_bad({"peers": [{"url": "http://127.0.0.1:1"}]})
        self.assertNames(line, "peers[0].secret")

    def test_short_secret(self) -> None:
        """A peer secret under 16 characters exits non-zero naming the key."""
        line = self.run_bad({"peers": [{"url": "http://127.0.0.1:1", "secret": "fifteen-chars.."}]})
        self.assertNames(line, "peers[0].secret")
        self.assertNotIn("fifteen-chars..", line)

    def test_short_secret_file(self) -> None:
        """A secret_file holding under 16 characters exits non-zero naming the key."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as fh:
            fh.write("short\n")
        os.chmod(path, 0o600)
        line = self.run_bad({"peers": [{"url": "http://127.0.0.1:1", "secret_file": path}]})
        self.assertNames(line, "peers[0].secret_file")

    def test_unreadable_secret_file(self) -> None:
        """A secret_file that cannot be read exits non-zero naming the key and the path."""
        path = os.path.abspath(os.path.join(self.mktemp(), "peer.secret"))
        line = self.run_bad(
            {
                "peers": [
                    {"url": "http://127.0.0.1:2", "secret": "x" * 20},
                    {"url": "http://127.0.0.1:1", "secret_file": path},
                ]
            }
        )
        self.assertNames(line, "peers[1].secret_file")
        self.assertIn(path, line)

    def test_bad_listen_endpoint(self) -> None:
        """A listen value that is not a Twisted endpoint exits non-zero naming node.listen."""
        self.assertNames(self.run_bad({"node": {"listen": "carrier-pigeon:8080"}}), "node.listen")

    def test_command_line_overrides_the_file(self) -> None:
        """--listen and --data-dir win over listen and data_dir in the config file."""
        node = _OverriddenNode(os.path.abspath(self.mktemp()), "cli")
        self.addCleanup(node.kill)
        node.start()
        # the file's port was never bound; the command line's answers
        with self.assertRaises(OSError):
            http_request(node.file_port, "GET", "/api/mesh/health", timeout=5)
        box, sender = Identity(), Identity()
        env = sender.envelope(box, b"where am I stored?", ts=now())
        self.assertEqual(node.send(env)[0], 200)
        stop_cleanly(node)
        self.assertFalse(os.path.exists(node.data_dir))
        db = sqlite3.connect(os.path.join(node.cli_data_dir, "meshrelay.sqlite3"))
        try:
            rows = db.execute("SELECT msg_id FROM envelopes").fetchall()
        finally:
            db.close()
        self.assertEqual(rows, [(env["msg_id"],)])
