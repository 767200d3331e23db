"""The client library: key files, sealing and opening messages, signing, error mapping."""

from __future__ import annotations

import json
import os
import stat

from twisted.trial.unittest import SynchronousTestCase

from meshrelay import client as C
from meshrelay import envelope as E
from meshrelay.errors import STATUS_BY_CODE
from tests.helpers import T0, MemNode


def resign(sender: C.Identity, env: dict, ciphertext: bytes) -> dict:
    """A new envelope with ``ciphertext``, signed by ``sender`` (what any sender can do)."""
    return E.make_envelope(sender.signing_key, env["mailbox"], ciphertext, env["ts"], env["ttl"])


class KeyFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "me.key")

    def test_save_load_round_trip_mode_0600(self) -> None:
        """A saved key file has mode 0600 and loads back to the same address."""
        ident = C.Identity.generate()
        ident.save(self.path)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(C.Identity.load(self.path).address, ident.address)

    def test_refuses_overwrite_without_force(self) -> None:
        """An existing key file is never replaced unless force is given."""
        first = C.Identity.generate()
        first.save(self.path)
        with self.assertRaises(C.KeyFileError) as cm:
            C.Identity.generate().save(self.path)
        self.assertIn("--force", str(cm.exception))
        self.assertEqual(C.Identity.load(self.path).address, first.address)
        second = C.Identity.generate()
        second.save(self.path, force=True)
        self.assertEqual(C.Identity.load(self.path).address, second.address)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(sorted(os.listdir(self.dir)), ["me.key"])

    def test_refuses_group_readable_key(self) -> None:
        """A key file others can read is refused with the chmod to run."""
        C.Identity.generate().save(self.path)
        os.chmod(self.path, 0o644)
        with self.assertRaises(C.KeyFileError) as cm:
            C.Identity.load(self.path)
        self.assertIn("chmod 600", str(cm.exception))

    def _write(self, text: str) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)

    def test_bad_key_files_are_one_line_errors(self) -> None:
        """Missing, non-JSON, wrong-format, short-seed and damaged key files each raise KeyFileError."""
        with self.assertRaises(C.KeyFileError):
            C.Identity.load(self.path)
        good = C.Identity.generate().to_json()
        cases = [
            "not json",
            json.dumps({"format": "something-else"}),
            json.dumps({**good, "ed25519_seed": "AAAA"}),
            json.dumps({**good, "address": C.Identity.generate().address}),
            "[]",
        ]
        for text in cases:
            self._write(text)
            with self.assertRaises(C.KeyFileError) as cm:
                C.Identity.load(self.path)
            self.assertNotIn("\n", str(cm.exception))


class MessageTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.alice = C.Identity.generate()
        self.bob = C.Identity.generate()
        self.carol = C.Identity.generate()

    def test_seal_open_round_trip(self) -> None:
        """A message sealed to bob opens with bob's key and names alice as its sender."""
        env = self.alice.envelope(self.bob.address, self.alice.seal_text(self.bob.address, "hi bob ✓".encode()), now=T0)
        msg = self.bob.open_envelope(env)
        self.assertEqual(msg.text, "hi bob ✓".encode())
        self.assertEqual(msg.sender, self.alice.address)
        self.assertEqual(msg.msg_id, env["msg_id"])

    def test_wrong_key_cannot_decrypt(self) -> None:
        """A message sealed to carol but deposited in bob's mailbox fails with DecryptError."""
        env = self.alice.envelope(self.bob.address, self.alice.seal_text(self.carol.address, b"x"), now=T0)
        with self.assertRaises(C.DecryptError):
            self.bob.open_envelope(env)

    def test_tampered_ciphertext_is_refused(self) -> None:
        """A ciphertext altered and re-signed fails to decrypt."""
        env = self.alice.envelope(self.bob.address, self.alice.seal_text(self.bob.address, b"pay 10"), now=T0)
        ct = bytearray(E.b64u_decode(env["ciphertext"]))
        ct[-1] ^= 1
        with self.assertRaises(C.DecryptError):
            self.bob.open_envelope(resign(self.alice, env, bytes(ct)))

    def test_resigned_by_someone_else_is_refused(self) -> None:
        """Alice's ciphertext re-signed by carol is refused: the sealed sender is alice."""
        env = self.alice.envelope(self.bob.address, self.alice.seal_text(self.bob.address, b"hi"), now=T0)
        stolen = resign(self.carol, env, E.b64u_decode(env["ciphertext"]))
        with self.assertRaises(C.SenderMismatch):
            self.bob.open_envelope(stolen)

    def test_forged_signature_and_msg_id_are_refused(self) -> None:
        """An envelope with a bad signature, a wrong msg_id or another mailbox is a BadMessage."""
        env = self.alice.envelope(self.bob.address, self.alice.seal_text(self.bob.address, b"hi"), now=T0)
        sig = bytearray(E.b64u_decode(env["sig"]))
        sig[0] ^= 1
        for bad in (
            {**env, "sig": E.b64u_encode(bytes(sig))},
            {**env, "msg_id": "0" * 64},
            {**env, "extra": 1},
            "not an envelope",
        ):
            with self.assertRaises(C.BadMessage):
                self.bob.open_envelope(bad)
        with self.assertRaises(C.BadMessage):
            self.carol.open_envelope(env)

    def test_bad_addresses(self) -> None:
        """Non-base64url, wrong-length and non-curve addresses raise BadAddress."""
        for address in ("", "xyz", "!!!", E.b64u_encode(b"\x00" * 31), E.b64u_encode(b"\xff" * 32)):
            with self.assertRaises(C.BadAddress):
                C.encryption_key_for(address)

    def test_address_with_surrounding_space_gives_a_canonical_envelope(self) -> None:
        """An address pasted with spaces around it is accepted, and the envelope names the canonical mailbox."""
        env = self.alice.envelope(f" {self.bob.address}\n", b"x", now=T0)
        self.assertEqual(env["mailbox"], self.bob.address)
        self.assertEqual(E.parse_envelope(env, 8192).mailbox, self.bob.address)

    def test_requests_use_fresh_nonces(self) -> None:
        """Two signed requests never share a nonce, and each verifies."""
        a, b = self.bob.signed_request(), self.bob.signed_request(["ab" * 32])
        self.assertNotEqual(a["nonce"], b["nonce"])
        for body in (a, b):
            self.assertEqual(len(E.b64u_decode(body["nonce"])), 16)
            self.assertTrue(E.verify_signed(E.parse_poll(body).auth))


class ErrorMappingTests(SynchronousTestCase):
    def test_one_class_per_protocol_code(self) -> None:
        """Every error code of the protocol table has its own exception class."""
        self.assertEqual(set(C.ERROR_CLASSES), set(STATUS_BY_CODE))
        self.assertEqual(len(set(C.ERROR_CLASSES.values())), len(STATUS_BY_CODE))

    def test_sender_cap_carries_pending_and_limit(self) -> None:
        """A sender_cap answer becomes SenderCapError with pending and limit."""
        e = C.error_from_response(429, {"ok": False, "error": "sender_cap", "detail": "d", "pending": 8, "limit": 8})
        assert isinstance(e, C.SenderCapError)
        self.assertEqual((e.pending, e.limit, e.status), (8, 8, 429))
        self.assertIn("8 of 8", str(e))

    def test_unknown_and_non_protocol_answers(self) -> None:
        """An unknown code is a RemoteError; a body without one is a ProtocolError."""
        self.assertIs(type(C.error_from_response(418, {"error": "teapot"})), C.RemoteError)
        self.assertIsInstance(C.error_from_response(502, b"<html>"), C.ProtocolError)

    def test_node_url_checked(self) -> None:
        """A node URL must be http(s) with a host."""
        for url in ("127.0.0.1:8080", "ftp://x", "http://", "http://h:99999"):
            with self.assertRaises(C.ClientError):
                C.NodeClient(url)
        self.assertEqual(C.NodeClient("http://h:1/").base_url, "http://h:1")


class AgainstNodeTests(SynchronousTestCase):
    def test_client_built_bodies_are_accepted_by_a_node(self) -> None:
        """Envelopes and polls built by the client library pass a real node's checks."""
        node = MemNode(self.mktemp())
        alice, bob = C.Identity.generate(), C.Identity.generate()
        env = alice.envelope(bob.address, alice.seal_text(bob.address, b"hello"), now=T0)
        status, body = node.send(env)
        self.assertEqual((status, body["msg_id"]), (200, env["msg_id"]))
        status, body = node.request("POST", "/api/mesh/dm/poll", bob.signed_request(now=T0))
        self.assertEqual(status, 200)
        self.assertEqual(bob.open_envelope(body["messages"][0]).text, b"hello")
        status, body = node.request("POST", "/api/mesh/dm/poll", bob.signed_request([env["msg_id"]], now=T0))
        self.assertEqual((status, body["messages"]), (200, []))
        node.stop()
