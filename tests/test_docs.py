"""The docs stay true: config keys documented, the worked example, the curl client, backup and restore."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import tomllib
from typing import Any

import pytest
from twisted.trial.unittest import SynchronousTestCase

from meshrelay import client as C
from meshrelay import config as cfg_mod
from meshrelay import envelope as E
from meshrelay.config import load_config
from tests.harness import REPO, NodeProcess

DOCS = os.path.join(REPO, "docs")
EXAMPLE_TOML = os.path.join(REPO, "etc", "meshrelay.example.toml")
PEER_KEYS = ("url", "secret", "secret_file", "connect", "secrets")


def read(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def config_keys() -> dict[str, list[str]]:
    """Every key config.py accepts: section -> keys (peers included)."""
    keys = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in cfg_mod._SECTIONS.items()}
    keys["peers"] = list(PEER_KEYS)
    return keys


def load_worked_example() -> Any:
    spec = importlib.util.spec_from_file_location("worked_example", os.path.join(DOCS, "examples", "worked_example.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ConfigDocsTests(SynchronousTestCase):
    def test_every_key_in_operator_guide(self) -> None:
        """docs/operator.md has a table row for every config key, under its section's heading."""
        text = read(os.path.join(DOCS, "operator.md"))
        for section, keys in config_keys().items():
            heading = "### `[[peers]]`" if section == "peers" else f"### `[{section}]`"
            self.assertIn(heading, text)
            part = text.split(heading, 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
            for key in keys:
                self.assertIn(f"| `{key}` |", part, f"{section}.{key} is not documented")

    def test_every_key_in_example_toml(self) -> None:
        """etc/meshrelay.example.toml has every key (set or as a #key = line) under its section, with a comment."""
        text = read(EXAMPLE_TOML)
        # Uncomment the "#key = value" lines: the result must be TOML with every key.
        uncommented = re.sub(r"(?m)^#(\[\[peers\]\]|[a-z_]+ = )", r"\1", text)
        doc = tomllib.loads(uncommented.replace('secret = "use', 'secret_x = "use'))
        doc["peers"][0]["secret"] = "x"
        for section, keys in config_keys().items():
            table = doc[section][0] if section == "peers" else doc[section]
            for key in keys:
                self.assertIn(key, table, f"{section}.{key} missing from the example")
        lines = text.splitlines()
        for i, line in enumerate(lines):
            if re.match(r"^#?[a-z_]+ = ", line):
                self.assertTrue(lines[i - 1].startswith("#"), f"no comment above: {line}")

    def test_example_toml_is_valid(self) -> None:
        """The example config loads as is, and with its peer uncommented."""
        cfg = load_config(EXAMPLE_TOML)
        self.assertEqual(cfg.peers, ())
        d = self.mktemp()
        os.makedirs(d)
        with open(os.path.join(d, "peer-b.secret"), "w") as fh:
            fh.write("a-long-enough-secret\n")
        os.chmod(os.path.join(d, "peer-b.secret"), 0o600)
        text = read(EXAMPLE_TOML)
        text = re.sub(r"(?m)^#(\[\[peers\]\]|url = |connect = )", r"\1", text)
        text = text.replace("#secret_file = ", "secret_file = ").replace(
            "/etc/meshrelay/peer-b.secret", "peer-b.secret"
        )
        path = os.path.join(d, "n.toml")
        with open(path, "w") as fh:
            fh.write(text)
        cfg = load_config(path)
        self.assertEqual([p.url for p in cfg.peers], ["http://127.0.0.1:8081"])
        self.assertEqual(cfg.peers[0].secret, "a-long-enough-secret")

    def test_defaults_in_example_match_config(self) -> None:
        """Each value set in the example is the default of config.py."""
        doc = tomllib.loads(read(EXAMPLE_TOML))
        for name, cls in cfg_mod._SECTIONS.items():
            defaults = {f.name: f.default for f in dataclasses.fields(cls)}
            for key, value in doc.get(name, {}).items():
                self.assertEqual(value, defaults[key], f"{name}.{key}")

    def test_systemd_unit(self) -> None:
        """The systemd unit runs twistd in the foreground with the meshrelay plugin and a config."""
        unit = read(os.path.join(REPO, "etc", "meshrelay.service"))
        exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
        self.assertIn("twistd --nodaemon", exec_start)
        self.assertIn(" meshrelay --config ", exec_start)
        self.assertIn("KillSignal=SIGTERM", unit)


class WorkedExampleTests(SynchronousTestCase):
    def test_doc_values_match_the_code(self) -> None:
        """Every value of the worked example in docs/client.md is what the code computes."""
        values = load_worked_example().example()
        doc = read(os.path.join(DOCS, "client.md"))
        for key in (
            "sender_seed_hex",
            "mailbox_seed_hex",
            "sender",
            "mailbox",
            "ciphertext_b64u",
            "ciphertext_sha256",
            "envelope_signed",
            "msg_id",
            "envelope_sig",
            "envelope_json",
            "nonce_b64u",
            "poll_signed",
            "poll_sig",
        ):
            self.assertIn(values[key], doc, key)
        # The poll body in the doc is the computed one plus limit and wait.
        block = doc.split('"nonce": "AAECAwQFBgcICQoLDA0ODw"', 1)[0].rsplit("```json", 1)[1]
        block += doc.split('"nonce": "AAECAwQFBgcICQoLDA0ODw"', 1)[1].split("```", 1)[0]
        poll = json.loads(block.replace('"ts": 1795000100,', '"ts": 1795000100, "nonce": "AAECAwQFBgcICQoLDA0ODw"'))
        self.assertEqual({k: v for k, v in poll.items() if k not in ("limit", "wait")}, json.loads(values["poll_json"]))

    def test_example_verifies(self) -> None:
        """The worked envelope and poll pass the node's own parsing and signature checks."""
        values = load_worked_example().example()
        env = E.parse_envelope(json.loads(values["envelope_json"]), 8192)
        self.assertTrue(E.verify_envelope(env))
        poll = E.parse_poll(json.loads(values["poll_json"]))
        self.assertTrue(E.verify_signed(poll.auth))
        self.assertEqual(poll.auth.ack, (values["msg_id"],))


def load_protocol_vectors() -> Any:
    path = os.path.join(DOCS, "examples", "protocol_vectors.py")
    spec = importlib.util.spec_from_file_location("protocol_vectors", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ProtocolDocTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.doc = read(os.path.join(DOCS, "protocol.md"))

    def test_vectors_match_the_code(self) -> None:
        """Every test vector of docs/protocol.md is what protocol_vectors.py computes with the node's code."""
        for name, value in load_protocol_vectors().vectors().items():
            self.assertIn(value, self.doc, name)

    def test_vectors_follow_the_spec_text(self) -> None:
        """The vectors rebuilt from the spec's rules with hashlib/hmac alone match the code's (spec and code agree)."""
        import base64
        import hashlib
        import hmac

        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        v = load_protocol_vectors().vectors()

        def b64u(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).decode().rstrip("=")

        def pub(seed_hex: str) -> str:
            key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed_hex))
            return b64u(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))

        self.assertEqual(pub(v["sender_seed_hex"]), v["sender"])
        self.assertEqual(pub(v["mailbox_seed_hex"]), v["mailbox"])
        ct = bytes.fromhex(v["ciphertext_hex"])
        self.assertEqual(b64u(ct), v["ciphertext_b64u"])
        lines = [
            "meshrelay/envelope/v1",
            v["mailbox"],
            v["sender"],
            "1800000000",
            "3600",
            hashlib.sha256(ct).hexdigest(),
        ]
        signed = "\n".join(lines).encode("ascii")
        self.assertEqual(signed.hex(), v["envelope_signed_hex"])
        self.assertEqual(hashlib.sha256(signed).hexdigest(), v["msg_id"])
        sender = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(v["sender_seed_hex"]))
        self.assertEqual(b64u(sender.sign(signed)), v["envelope_sig"])
        poll = "\n".join(["meshrelay/poll/v1", v["mailbox"], "1800000060", b64u(bytes(range(16))), ""]).encode()
        self.assertEqual(poll.hex(), v["poll_signed_hex"])
        hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"meshrelay-peer-auth-v1", info=b"http://node-a.example")
        key = hkdf.derive(v["peer_secret"].encode())
        self.assertEqual(key.hex(), v["peer_key_hex"])
        body_hash = hashlib.sha256(v["peer_body"].encode()).hexdigest()
        mac_in = "\n".join(
            [
                "meshrelay/peer/v1",
                "POST",
                "/relay/api/mesh/dm/replicate-envelope",
                "1800000005",
                v["peer_nonce"],
                body_hash,
            ]
        )
        self.assertEqual(hmac.new(key, mac_in.encode(), hashlib.sha256).hexdigest(), v["peer_hmac"])

    def test_poll_example_verifies(self) -> None:
        """The poll request shown in docs/protocol.md's appendix passes the node's parsing and signature check."""
        block = self.doc.split("The poll request carrying it", 1)[1].split("```json", 1)[1].split("```", 1)[0]
        poll = E.parse_poll(json.loads(block))
        self.assertTrue(E.verify_signed(poll.auth))
        self.assertEqual((poll.limit, poll.wait), (100, 25))

    def test_every_error_code_with_its_status(self) -> None:
        """docs/protocol.md's error table lists every code of meshrelay/errors.py with its status."""
        from meshrelay.errors import STATUS_BY_CODE

        table = self.doc.split("### 4.1", 1)[1].split("\n### ", 1)[0]
        for code, status in STATUS_BY_CODE.items():
            self.assertIn(f"| {status} | `{code}` |", table, code)

    def test_limits_table_has_every_key_and_default(self) -> None:
        """docs/protocol.md's limits table has a row with the default of every [limits] and [sync] key."""
        table = self.doc.split("## 9. Limits", 1)[1].split("\n## ", 1)[0]
        for section in ("limits", "sync"):
            for f in dataclasses.fields(cfg_mod._SECTIONS[section]):
                default = '""' if f.default == "" else str(f.default)
                if isinstance(f.default, bool):
                    default = default.lower()  # as TOML writes it
                shown = f"`{default}`" if isinstance(f.default, str) else default
                self.assertIn(f"| `{section}.{f.name}` | {shown} |", table, f"{section}.{f.name}")

    def test_pointers_to_the_spec(self) -> None:
        """README's wire-protocol line and docs/protocol-notes.md point to docs/protocol.md."""
        readme = read(os.path.join(REPO, "README.md"))
        line = next(line for line in readme.splitlines() if line.startswith("- Wire protocol:"))
        self.assertIn("docs/protocol.md", line)
        self.assertIn("(protocol.md)", read(os.path.join(DOCS, "protocol-notes.md")).split("\n## ", 1)[0])


def _openssl_3() -> bool:
    if not (shutil.which("openssl") and shutil.which("curl")):
        return False
    out = subprocess.run(["openssl", "version"], capture_output=True, text=True).stdout
    return bool(re.match(r"OpenSSL [3-9]\.", out))


@pytest.mark.integration
class AgainstNodeDocsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.base = tempfile.mkdtemp(prefix="meshrelay-docs-")
        self.addCleanup(shutil.rmtree, self.base, True)
        self.node = NodeProcess(self.base, "node").start()
        self.addCleanup(self.node.stop)

    def test_curl_client_script(self) -> None:
        """docs/examples/curl_client.sh deposits, polls and acks against a real node with curl and openssl."""
        if not _openssl_3():
            raise self.skipTest("needs curl and OpenSSL >= 3")
        r = subprocess.run(
            ["bash", os.path.join(DOCS, "examples", "curl_client.sh"), self.node.url], capture_output=True, timeout=120
        )
        self.assertEqual(r.returncode, 0, r.stderr)
        out = r.stdout.decode().splitlines()
        msg_id = next(line for line in out if line.startswith("msg_id ")).split()[1]
        sent, polled, acked = (json.loads(line) for line in out if line.startswith("{"))
        self.assertEqual(sent, {"ok": True, "msg_id": msg_id, "duplicate": False})
        self.assertEqual([m["msg_id"] for m in polled["messages"]], [msg_id])
        self.assertEqual(acked, {"ok": True, "messages": [], "has_more": False})

    def test_online_backup_and_restore(self) -> None:
        """The operator guide's `meshrelay backup` and `meshrelay restore` commands, as written, keep every envelope."""
        alice, bob = C.Identity.generate(), C.Identity.generate()
        ids = []
        for i in range(3):
            env = alice.envelope(bob.address, alice.seal_text(bob.address, b"m%d" % i))
            self.assertEqual(self.node.send(env)[0], 200)
            ids.append(env["msg_id"])
        guide = read(os.path.join(DOCS, "operator.md"))
        backup = os.path.join(self.base, "backup.sqlite3")
        r = _run_documented(
            guide.split("### 7.1 Back up a live node", 1)[1],
            "meshrelay backup",
            {"/etc/meshrelay/meshrelay.toml": self.node.config_path, "/backup/meshrelay-$(date +%F).sqlite3": backup},
        )
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("3 envelopes", r.stdout)

        restored = NodeProcess(self.base, "restored")
        restored.write_config()
        r = _run_documented(
            guide.split("### 7.2 Restore a node", 1)[1],
            "meshrelay restore",
            {"/etc/meshrelay/meshrelay.toml": restored.config_path, "/backup/meshrelay-2026-12-04.sqlite3": backup},
        )
        self.assertEqual(r.returncode, 0, r.stderr)
        conn = sqlite3.connect(os.path.join(restored.data_dir, "meshrelay.sqlite3"))
        new_feed, old_feed = (
            dict(conn.execute("SELECT key, value FROM meta").fetchall())[k] for k in ("feed_id", "restored_from")
        )
        conn.close()
        self.assertNotEqual(old_feed, new_feed)
        self.assertIn(f"new feed id {new_feed}", r.stdout)
        restored.start()
        try:
            result = C.NodeClient(restored.url).poll(bob)
            self.assertEqual([m["msg_id"] for m in result.messages], ids)
            self.assertEqual(bob.open_envelope(result.messages[2]).text, b"m2")
        finally:
            restored.stop()


def _run_documented(section: str, command: str, paths: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run the first ``sudo -u meshrelay <command> ...`` shell block of ``section``, with ``paths`` replaced."""
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    line = " ".join(part.strip() for part in block.replace("\\\n", " ").splitlines())
    prefix = f"sudo -u meshrelay {command} "
    assert line.startswith(prefix), line
    for documented, actual in paths.items():
        assert documented in line, (documented, line)
        line = line.replace(documented, actual)
    argv = shlex.split(line.removeprefix("sudo -u meshrelay meshrelay "))
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run(
        [sys.executable, "-m", "meshrelay.cli", *argv], capture_output=True, text=True, timeout=120, env=env
    )
