"""Peer authentication primitives: HKDF link keys and the request MAC (docs/protocol.md section 5)."""

from __future__ import annotations

import hashlib
import hmac

from twisted.trial.unittest import SynchronousTestCase

from meshrelay import peers
from meshrelay.envelope import b64u_decode


def rfc5869_hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """HKDF written out from RFC 5869 with the stdlib, to cross-check the library call."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


class KeyDerivationTests(SynchronousTestCase):
    def test_key_is_rfc5869_hkdf_of_secret_salt_and_caller_url(self) -> None:
        """The link key is HKDF-SHA256(secret, salt, info=caller's URL), 32 bytes."""
        secret, url = "a shared secret of the link", "http://a.example:8080"
        expected = rfc5869_hkdf_sha256(secret.encode(), b"meshrelay-peer-auth-v1", url.encode(), 32)
        self.assertEqual(peers.derive_key(secret, url), expected)

    def test_rfc5869_helper_matches_the_published_vector(self) -> None:
        """The cross-check helper reproduces RFC 5869 test case 1."""
        okm = rfc5869_hkdf_sha256(
            bytes.fromhex("0b" * 22),
            bytes.fromhex("000102030405060708090a0b0c"),
            bytes.fromhex("f0f1f2f3f4f5f6f7f8f9"),
            42,
        )
        self.assertEqual(
            okm.hex(),
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865",
        )

    def test_the_two_directions_of_a_link_use_different_keys(self) -> None:
        """Same secret, different caller URL: different keys."""
        secret = "0123456789abcdef-link"
        self.assertNotEqual(peers.derive_key(secret, "http://a.test"), peers.derive_key(secret, "http://b.test"))


class MacTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.key = peers.derive_key("0123456789abcdef-link", "http://a.test")
        self.args = ("POST", "/api/mesh/dm/ack", 1795000000, "AAAAAAAAAAAAAAAAAAAAAA", b'{"acks":[]}')

    def test_mac_input_is_the_newline_joined_fields(self) -> None:
        """The MACed bytes are domain, METHOD, target, ts, nonce, hex(sha256(body))."""
        digest = hashlib.sha256(b'{"acks":[]}').hexdigest()
        self.assertEqual(
            peers.mac_input(*self.args),
            f"meshrelay/peer/v1\nPOST\n/api/mesh/dm/ack\n1795000000\nAAAAAAAAAAAAAAAAAAAAAA\n{digest}".encode(),
        )

    def test_every_field_changes_the_mac(self) -> None:
        """Changing the method, target, ts, nonce or body changes the MAC."""
        base = peers.compute_mac(self.key, *self.args)
        variants = [
            ("GET", *self.args[1:]),
            (self.args[0], "/api/mesh/dm/ack?x=1", *self.args[2:]),
            (*self.args[:2], 1795000001, *self.args[3:]),
            (*self.args[:3], "AAAAAAAAAAAAAAAAAAAAAQ", self.args[4]),
            (*self.args[:4], b'{"acks": []}'),
        ]
        for variant in variants:
            self.assertNotEqual(peers.compute_mac(self.key, *variant), base, variant)

    def test_signer_headers(self) -> None:
        """The signer sends its own URL, the ts, a 16-byte b64u nonce and the hex MAC."""
        signer = peers.PeerSigner("http://a.test", "0123456789abcdef-link")
        h = signer.headers("POST", "/api/mesh/dm/ack", b"{}", 1795000000.7)
        self.assertEqual(h[peers.H_URL], "http://a.test")
        self.assertEqual(h[peers.H_TS], "1795000000")
        self.assertEqual(len(b64u_decode(h[peers.H_NONCE])), 16)
        self.assertEqual(
            h[peers.H_HMAC],
            peers.compute_mac(signer.key, "POST", "/api/mesh/dm/ack", 1795000000, h[peers.H_NONCE], b"{}"),
        )
        other = signer.headers("POST", "/api/mesh/dm/ack", b"{}", 1795000000)
        self.assertNotEqual(other[peers.H_NONCE], h[peers.H_NONCE])

    def test_url_path_prefix(self) -> None:
        """A node URL's path prefix is what callers put before the API path."""
        self.assertEqual(peers.url_path("http://b.test"), "")
        self.assertEqual(peers.url_path("http://b.test/relay/mesh"), "/relay/mesh")
