"""Live reload (``Node.reconfigure`` / SIGHUP) and peer-secret rotation with key ids, in memory."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
from typing import Any

from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from meshrelay import cli, replication
from meshrelay.config import ConfigError, build_config, diff_configs, diff_flat, flat_values, load_config
from meshrelay.peers import H_HMAC, H_KEY_ID, H_NONCE, H_TS, H_URL, PeerSigner
from meshrelay.protocol import CHANGES_PATH
from tests.adminhelpers import AdminClient
from tests.helpers import Identity, MemNode, Mesh, link_secret, make_config, replace_limits

NEW_SECRET = "the-new-secret-of-the-a-b-link-0123456789"


def envelopes_of(mesh: Mesh, name: str, who: Identity) -> set[str]:
    """msg_ids of ``who``'s mailbox held by node ``name`` (an unacked poll reads them)."""
    status, body = mesh[name].poll(who)
    assert status == 200, body
    return {m["msg_id"] for m in body["messages"]}


def auth_failures(mem: MemNode) -> float:
    return mem.metrics.value("meshrelay_peer_auth_failures_total")


def with_peers(mesh: Mesh, name: str, peers: list[dict[str, Any]]) -> Any:
    """``name``'s running config with ``peers`` instead of its own."""
    cfg = mesh[name].node.config
    raw_peers = tuple(build_config({"peers": peers}).peers) if peers else ()
    return cfg.replace(peers=raw_peers)


class ReconfigurePeersTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.mesh = Mesh(self.mktemp(), names=("a", "b", "c"), links=[("a", "b")])
        self.addCleanup(self.mesh.stop)
        self.bob = Identity()
        self.alice = Identity()

    def link(self, x: str, y: str) -> dict[str, Any]:
        return {"url": Mesh.url(y), "secret": link_secret(x, y)}

    def test_added_peer_pushes_and_syncs_from_its_cursor(self) -> None:
        """A peer added by a reload gets what was deposited before (sync) and after (push)."""
        mesh = self.mesh
        before = self.alice.envelope(self.bob, b"before")
        self.assertEqual(mesh["a"].send(before)[0], 200)
        mesh.settle()
        self.assertEqual(envelopes_of(mesh, "c", self.bob), set())
        self.assertIsNone(mesh["c"].node.replication)
        ra = mesh["a"].node.reconfigure(with_peers(mesh, "a", [self.link("a", "b"), self.link("a", "c")]))
        rc = mesh["c"].node.reconfigure(with_peers(mesh, "c", [self.link("c", "a")]))
        self.assertEqual(ra.added, ["http://c.test"])
        self.assertEqual(rc.added, ["http://a.test"])
        self.assertEqual([c.key for c in ra.changes], ["peers[http://c.test]"])
        self.assertTrue(all(c.live for c in ra.changes))
        mesh.settle()
        # c's new puller ran at once (its cursor starts at 0) and got a's item.
        self.assertEqual(envelopes_of(mesh, "c", self.bob), {before["msg_id"]})
        after = self.alice.envelope(self.bob, b"after")
        pushes = mesh.link("a", "c").requests[:]
        self.assertEqual(mesh["a"].send(after)[0], 200)
        mesh.settle()
        sent = [(m, url.split("?")[0]) for m, url in mesh.link("a", "c").requests[len(pushes) :]]
        self.assertIn(("POST", "http://c.test/api/mesh/dm/replicate-envelope"), sent)
        self.assertEqual(envelopes_of(mesh, "c", self.bob), {before["msg_id"], after["msg_id"]})
        # Between the two reloads the end that reloaded first may be refused as an unknown peer; never more.
        for name in ("a", "c"):
            self.assertEqual(
                auth_failures(mesh[name]),
                mesh[name].metrics.value("meshrelay_peer_auth_failures_total", reason="unknown_peer"),
            )
        self.assertEqual(mesh["a"].node.config_generation, 2)
        self.assertEqual(mesh["a"].metrics.value("meshrelay_config_generation"), 2)

    def test_removed_peer_is_dropped_and_refused(self) -> None:
        """A removed peer's queue is dropped, nothing more is pushed to it, and its requests are refused."""
        mesh = self.mesh
        mesh.set_mode("a", "b", "hold")
        for i in range(3):
            self.assertEqual(mesh["a"].send(self.alice.envelope(self.bob, b"m%d" % i))[0], 200)
        mesh.settle()
        repl = mesh["a"].node.replication
        assert repl is not None
        self.assertEqual(len(repl.peers), 1)
        report = mesh["a"].node.reconfigure(with_peers(mesh, "a", []))
        self.assertEqual(report.removed, ["http://b.test"])
        self.assertEqual(repl.peers, [])
        mesh.link("a", "b").release()
        sent = len(mesh.link("a", "b").requests)
        self.assertEqual(mesh["a"].send(self.alice.envelope(self.bob, b"later"))[0], 200)
        mesh.advance(60)
        self.assertEqual(len(mesh.link("a", "b").requests), sent)
        # b still lists a: its pulls are now refused by a as an unknown peer.
        mesh["b"].node.replication.sync_now()  # type: ignore[union-attr]
        mesh.settle()
        self.assertGreater(mesh["a"].metrics.value("meshrelay_peer_auth_failures_total", reason="unknown_peer"), 0)
        # The lag gauge of the removed peer is gone with it.
        self.assertIsNone(mesh["a"].metrics.sample("meshrelay_peer_sync_lag_seconds", {"peer": "http://b.test"}))

    def test_changed_peer_keeps_its_queue(self) -> None:
        """A peer whose secret changes keeps its queued pushes; they arrive, signed with the new secret."""
        mesh = self.mesh
        mesh.set_mode("a", "b", "hold")
        msgs = [Identity().envelope(self.bob, b"q%d" % i) for i in range(12)]
        # The first push is held at the link; the others wait in a's queue behind it.
        for i, env in enumerate(msgs):
            self.assertEqual(mesh["a"].send(env)[0], 200)
            if i == 0:
                mesh.settle()
        mesh.settle()
        repl = mesh["a"].node.replication
        assert repl is not None
        queued = repl.peers[0].push.depth
        self.assertEqual(queued, 11)
        both = {
            "url": "http://b.test",
            "secrets": [{"id": "new", "secret": NEW_SECRET}, {"id": "old", "secret": link_secret("a", "b")}],
        }
        b_accepts = {
            "url": "http://a.test",
            "secrets": [{"id": "old", "secret": link_secret("a", "b")}, {"id": "new", "secret": NEW_SECRET}],
        }
        mesh["b"].node.reconfigure(with_peers(mesh, "b", [b_accepts]))
        report = mesh["a"].node.reconfigure(with_peers(mesh, "a", [both]))
        self.assertEqual(report.changed, ["http://b.test"])
        self.assertIs(repl.peers[0].push, repl.peers[0].push)
        self.assertEqual(repl.peers[0].push.depth, queued)
        mesh.set_mode("a", "b", "up")
        mesh.link("a", "b").release()
        mesh.settle()
        self.assertEqual(envelopes_of(mesh, "b", self.bob), {m["msg_id"] for m in msgs})
        self.assertEqual(auth_failures(mesh["b"]), 0)
        self.assertEqual(mesh["a"].metrics.value("meshrelay_dm_replication_dropped_total"), 0)
        # What b accepted after the reload was signed with the new secret.
        self.assertGreater(
            mesh["b"].metrics.value("meshrelay_peer_auth_keys_total", peer="http://a.test", key_id="new"), 0
        )


class ReconfigureLimitsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.tmp = self.mktemp()
        self.mem = MemNode(self.tmp)
        self.addCleanup(self.mem.stop)

    def test_limits_take_effect(self) -> None:
        """Rates, caps, body caps and fetch_remote bounds come from the new config; nothing needs a restart."""
        mem = self.mem
        site = mem.node.site()
        bob = Identity()
        senders = [Identity() for _ in range(4)]
        self.assertEqual(mem.send(senders[0].envelope(bob))[0], 200)
        new = replace_limits(mem.node.config, per_mailbox_pending=2, client_rate=1, client_burst=3, max_body_bytes=1024)
        new = new.replace(sync=new.sync.__class__(**{**new.sync.__dict__, "fetch_remote_max_concurrent": 3}))
        report = mem.node.reconfigure(new)
        self.assertEqual(report.needs_restart, [])
        self.assertEqual(
            sorted(c.key for c in report.changes),
            [
                "limits.client_burst",
                "limits.client_rate",
                "limits.max_body_bytes",
                "limits.per_mailbox_pending",
                "sync.fetch_remote_max_concurrent",
            ],
        )
        self.assertEqual(mem.store.caps.per_mailbox_pending, 2)
        self.assertEqual(mem.relay.fetch_gate.max_concurrent, 3)
        # The mailbox cap: one more fits, the next is mailbox_full.
        self.assertEqual(mem.send(senders[1].envelope(bob))[0], 200)
        status, body = mem.send(senders[2].envelope(bob))
        self.assertEqual((status, body["error"]), (429, "mailbox_full"))
        # The body cap, on the sites already made.
        self.assertEqual(site.body_caps(b"/api/mesh/dm/send"), 1024)
        # The client rate: a burst of 3 (two sends above), then 429.
        answers = [mem.request("POST", "/api/mesh/dm/count", bob.signed()) for _ in range(3)]
        self.assertEqual([a[0] for a in answers], [200, 429, 429])
        self.assertEqual(answers[1][1]["error"], "rate_limited")

    def test_restart_keys_are_reported_and_kept(self) -> None:
        """Settings that cannot change live are reported and keep their running values; the rest applies."""
        mem = self.mem
        old = mem.node.config
        new = old.replace(
            node=old.node.__class__(**{**old.node.__dict__, "listen": "tcp:9999", "data_dir": "/elsewhere"}),
        )
        new = replace_limits(new, max_waiting_polls=7)
        report = mem.node.reconfigure(new)
        self.assertEqual(sorted(c.key for c in report.needs_restart), ["node.data_dir", "node.listen"])
        self.assertEqual([c.key for c in report.applied], ["limits.max_waiting_polls"])
        self.assertEqual(mem.node.config.node.listen, old.node.listen)
        self.assertEqual(mem.node.config.node.data_dir, old.node.data_dir)
        self.assertEqual(mem.node.config.limits.max_waiting_polls, 7)
        self.assertEqual(mem.relay.limits.max_waiting_polls, 7)


class ReloadFromFileTests(SynchronousTestCase):
    """``Node.reload``: what SIGHUP runs. An invalid file leaves the running config and logs one line."""

    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "node.toml")
        self.write(100)
        self.mem = MemNode(self.dir, config=load_config(self.path))
        self.mem.node.config_loader = lambda: load_config(self.path)
        self.addCleanup(self.mem.stop)
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def write(self, max_waiting: Any) -> None:
        with open(self.path, "w") as fh:
            fh.write(
                f'[node]\npublic_url = "http://a.test"\ndata_dir = "{self.dir}/data"\n'
                f"[limits]\nclient_rate = 0\nmax_waiting_polls = {json.dumps(max_waiting)}\n"
            )

    def reload_lines(self) -> list[dict[str, Any]]:
        return [e for e in self.events if "config reload" in e.get("log_format", "")]

    def test_invalid_file_keeps_running(self) -> None:
        self.write("lots")
        self.assertIsNone(self.mem.node.reload())
        self.assertEqual(self.mem.node.config.limits.max_waiting_polls, 100)
        self.assertEqual(self.mem.node.config_generation, 1)
        self.assertEqual(self.mem.metrics.value("meshrelay_config_reloads_total", outcome="failed"), 1)
        lines = self.reload_lines()
        self.assertEqual(len(lines), 1)
        self.assertIn("limits.max_waiting_polls: expected an integer", lines[0]["error"])
        # Still serving.
        self.assertEqual(self.mem.send(Identity().envelope(Identity()))[0], 200)

    def test_valid_file_applies(self) -> None:
        self.write(5)
        report = self.mem.node.reload()
        assert report is not None
        self.assertEqual([c.key for c in report.changes], ["limits.max_waiting_polls"])
        self.assertEqual(self.mem.relay.limits.max_waiting_polls, 5)
        self.assertEqual(self.mem.node.config_generation, 2)
        self.assertEqual(self.mem.metrics.value("meshrelay_config_reloads_total", outcome="ok"), 1)
        self.assertEqual(len(self.reload_lines()), 1)


class KeyIdAuthTests(SynchronousTestCase):
    """A receiver with two secrets accepts either, with or without X-Peer-Key-Id (protocol 5.6)."""

    def setUp(self) -> None:
        tmp = self.mktemp()
        self.old, self.new = "old-secret-0123456789", "new-secret-0123456789"
        cfg = make_config(
            tmp,
            peers=[
                {
                    "url": "http://b.test",
                    "secrets": [{"id": "k1", "secret": self.old}, {"id": "k2", "secret": self.new}],
                }
            ],
        )
        self.mem = MemNode(tmp, config=cfg)
        self.addCleanup(self.mem.stop)

    def get(self, secret: str, key_id: str | None, send: bool = True) -> int:
        signer = PeerSigner("http://b.test", secret, key_id or "")
        signer.send_key_id = send
        target = CHANGES_PATH + "?since=0&limit=1"
        headers = signer.headers("GET", target, b"", self.mem.clock.seconds())
        if key_id is not None and not send:
            headers[H_KEY_ID] = key_id
        return self.mem.request("GET", target, headers=headers)[0]

    def test_either_secret_with_or_without_key_id(self) -> None:
        self.assertEqual(self.get(self.old, None), 200)
        self.assertEqual(self.get(self.new, None), 200)
        self.assertEqual(self.get(self.old, "k1"), 200)
        self.assertEqual(self.get(self.new, "k2"), 200)
        # A wrong or unknown id is only a hint: the other secrets are still tried.
        self.assertEqual(self.get(self.new, "k1"), 200)
        self.assertEqual(self.get(self.old, "nope"), 200)
        self.assertEqual(auth_failures(self.mem), 0)
        m = self.mem.metrics
        self.assertEqual(m.value("meshrelay_peer_auth_keys_total", key_id="k1"), 3)
        self.assertEqual(m.value("meshrelay_peer_auth_keys_total", key_id="k2"), 3)

    def test_refusals(self) -> None:
        self.assertEqual(self.get("a-third-secret-nobody-has", "k1"), 403)
        self.assertEqual(self.mem.metrics.value("meshrelay_peer_auth_failures_total", reason="bad_hmac"), 1)
        self.assertEqual(self.get(self.new, "bad id!", send=False), 403)
        self.assertEqual(self.mem.metrics.value("meshrelay_peer_auth_failures_total", reason="malformed_header"), 1)
        signer = PeerSigner("http://b.test", self.new, "k2")
        signer.send_key_id = True
        headers = signer.headers("GET", CHANGES_PATH, b"", self.mem.clock.seconds())
        raw = self.mem.http.request(
            "GET",
            "http://a.test" + CHANGES_PATH,
            headers={H_URL: headers[H_URL], H_TS: headers[H_TS], H_NONCE: headers[H_NONCE], H_HMAC: headers[H_HMAC]}
            | {H_KEY_ID: ["k2", "k2"]},
        )
        self.assertEqual(self.mem.result(raw)[0], 403)
        self.assertEqual(self.mem.metrics.value("meshrelay_peer_auth_failures_total", reason="malformed_header"), 2)

    def test_config_validation(self) -> None:
        tmp = self.mktemp()
        for peer, error in [
            ({"url": "http://b.test", "secrets": []}, "peers[0].secrets: expected a non-empty array"),
            ({"url": "http://b.test", "secrets": [{"id": "k", "secret": "x" * 16}] * 2}, "peers[0].secrets[1].id"),
            ({"url": "http://b.test", "secrets": [{"secret": "x" * 16}]}, "peers[0].secrets[0].id: missing"),
            ({"url": "http://b.test", "secrets": [{"id": "a b", "secret": "x" * 16}]}, "peers[0].secrets[0].id"),
            ({"url": "http://b.test", "secrets": [{"id": "k", "secret": "short"}]}, "peers[0].secrets[0].secret"),
            (
                {"url": "http://b.test", "secrets": [{"id": f"k{i}", "secret": "x" * 16} for i in range(4)]},
                "at most 3",
            ),
            (
                {"url": "http://b.test", "secret": "x" * 16, "secrets": [{"id": "k", "secret": "x" * 16}]},
                "peers[0].secrets: give secrets, or secret",
            ),
        ]:
            with self.assertRaises(ConfigError) as ctx:
                make_config(tmp, peers=[peer])
            self.assertIn(error, str(ctx.exception))


class RotationUnderTrafficTests(SynchronousTestCase):
    """The operator's procedure (docs/operator.md section 4) on two nodes with deposits flowing both ways."""

    def test_rotation_without_one_refusal(self) -> None:
        self.rotate(key_ids=True)

    def test_rotation_with_peers_that_send_no_key_id(self) -> None:
        """Peers that never name their key (no key_ids in features, as an older node): trial alone suffices."""
        real = replication.parse_features

        def without_key_ids(obj: Any) -> Any:
            return dataclasses.replace(real(obj), key_ids=False)

        self.patch(replication, "parse_features", without_key_ids)
        self.rotate(key_ids=False)

    def rotate(self, key_ids: bool) -> None:
        mesh = Mesh(self.mktemp(), names=("a", "b"), sync={"interval": 5})
        self.addCleanup(mesh.stop)
        old = link_secret("a", "b")
        bob, carol = Identity(), Identity()
        sent: set[str] = set()

        def traffic(rounds: int) -> None:
            for _ in range(rounds):
                for name, box in (("a", bob), ("b", carol)):
                    env = Identity().envelope(box, b"%s-%d" % (name.encode(), len(sent)))
                    self.assertEqual(mesh[name].send(env)[0], 200)
                    sent.add(env["msg_id"])
                mesh.advance(2)

        def step(secrets: list[tuple[str, str]], first: str = "a") -> None:
            for name in (first, "b" if first == "a" else "a"):
                other = "b" if name == "a" else "a"
                entries = [{"id": kid, "secret": sec} for kid, sec in secrets]
                report = mesh[name].node.reconfigure(
                    with_peers(mesh, name, [{"url": Mesh.url(other), "secrets": entries}])
                )
                self.assertEqual(report.changed, [Mesh.url(other)])
                # Traffic between the two ends' reloads: one end is a step ahead of the other.
                traffic(3)

        traffic(3)
        step([("old", old), ("new", NEW_SECRET)])  # 2. both accept the new one
        traffic(3)
        step([("new", NEW_SECRET), ("old", old)], first="b")  # 3. both sign with it
        traffic(3)
        for name, other in (("a", "b"), ("b", "a")):
            used_new = mesh[name].metrics.value("meshrelay_peer_auth_keys_total", peer=Mesh.url(other), key_id="new")
            self.assertGreater(used_new, 0)
            # After step 3 each side negotiated and names its key.
            repl = mesh[name].node.replication
            assert repl is not None
            self.assertEqual(repl.peers[0].transport.signer.send_key_id, key_ids)
        step([("new", NEW_SECRET)])  # 5. both drop the old one
        traffic(3)
        mesh.sync_all()
        for name in ("a", "b"):
            self.assertEqual(auth_failures(mesh[name]), 0, name)
            self.assertEqual(mesh[name].metrics.value("meshrelay_dm_replication_push_total", outcome="error"), 0)
            self.assertEqual(mesh[name].metrics.value("meshrelay_sync_pull_total", outcome="error"), 0)
            self.assertEqual(envelopes_of(mesh, name, bob) | envelopes_of(mesh, name, carol), sent, name)


class CheckConfigDiffTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)

    def write(self, name: str, text: str) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "w") as fh:
            fh.write(text)
        return path

    def run_cli(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(["check-config", *argv])
        return code, out.getvalue(), err.getvalue()

    OLD = (
        '[node]\nlisten = "tcp:8080:interface=127.0.0.1"\n[limits]\nclient_rate = 100\n'
        '[[peers]]\nurl = "http://b.test"\nsecret = "old-secret-0123456789"\n'
        '[[peers]]\nurl = "http://c.test"\nsecret = "c-secret-0123456789"\n'
    )
    NEW = (
        '[node]\nlisten = "tcp:8081:interface=127.0.0.1"\n[limits]\nclient_rate = 50\n'
        '[[peers]]\nurl = "http://b.test"\nsecrets = [{id = "k2", secret = "new-secret-0123456789"}, '
        '{id = "k1", secret = "old-secret-0123456789"}]\n'
        '[[peers]]\nurl = "http://d.test"\nsecret = "d-secret-0123456789"\n'
    )

    def test_diff_two_files(self) -> None:
        old = self.write("old.toml", self.OLD)
        new = self.write("new.toml", self.NEW)
        code, out, _ = self.run_cli(new, "--diff", old)
        self.assertEqual(code, 0)
        lines = out.splitlines()
        self.assertIn(
            'node.listen: "tcp:8080:interface=127.0.0.1" -> "tcp:8081:interface=127.0.0.1"  (needs a restart)', lines
        )
        self.assertIn("limits.client_rate: 100 -> 50  (applies on reload)", lines)
        self.assertIn("peers[http://b.test].secret: *** -> *** (changed)  (applies on reload)", lines)
        self.assertIn('peers[http://b.test].key_id: "" -> "k2"  (applies on reload)', lines)
        self.assertIn("peers[http://b.test].secrets: [] -> [k2=***, k1=***]  (applies on reload)", lines)
        self.assertIn("peers[http://c.test]: present -> removed  (applies on reload)", lines)
        self.assertIn("peers[http://d.test]: (none) -> added  (applies on reload)", lines)
        self.assertEqual(lines[-1], "# 7 changes: 6 apply on reload, 1 need a restart")
        for secret in ("old-secret", "new-secret", "d-secret"):
            self.assertNotIn(secret, out)

    def test_same_file_no_changes_and_bad_file(self) -> None:
        old = self.write("old.toml", self.OLD)
        code, out, _ = self.run_cli(old, "--diff", old)
        self.assertEqual((code, out.splitlines()[-1]), (0, "# no changes"))
        bad = self.write("bad.toml", "[limits]\nclient_rate = -1\n")
        code, out, err = self.run_cli(bad, "--diff", old)
        self.assertEqual(code, 1)
        self.assertIn("limits.client_rate: must be at least 0", err)

    def test_running_config_from_the_admin_listener(self) -> None:
        """/api/mesh/config gives salted secret tags: a diff against it sees a changed secret, never the secret."""
        old = load_config(self.write("old.toml", self.OLD.replace("[node]\n", f'[node]\ndata_dir = "{self.dir}/d"\n')))
        mem = MemNode(self.dir, config=old)
        self.addCleanup(mem.stop)
        admin = AdminClient(mem)
        salt = bytes(range(16))
        code, _, body = admin.get("/api/mesh/config?salt=" + salt.hex())
        self.assertEqual(code, 200)
        self.assertNotIn("old-secret", body)
        running = json.loads(body)
        self.assertEqual(running["generation"], 1)
        self.assertEqual(diff_flat(running["values"], flat_values(old, salt)), [])
        new = load_config(self.write("new.toml", self.NEW.replace("[node]\n", f'[node]\ndata_dir = "{self.dir}/d"\n')))
        self.assertEqual(diff_flat(running["values"], flat_values(new, salt)), diff_configs(old, new))
        # Another salt: the secrets no longer compare equal (a tag is bound to its salt).
        changed = [c.key for c in diff_flat(running["values"], flat_values(old, b"other"))]
        self.assertEqual(changed, ["peers[http://b.test].secret", "peers[http://c.test].secret"])
        for query in ("?salt=xyz", "?salt=00&salt=01", "?colour=blue"):
            self.assertEqual(admin.get("/api/mesh/config" + query)[0], 400, query)
