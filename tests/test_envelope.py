"""Unit tests of the pure envelope module: encodings, signed bytes, shapes, time rules."""

from __future__ import annotations

import hashlib
import json
import os

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.trial.unittest import SynchronousTestCase

from meshrelay import envelope as E
from meshrelay.errors import BadEnvelope, BadJSON, BadRequest, BadTimestamp, BadTTL, Stale, TooLarge
from tests.helpers import T0, Identity

MAX = 8192


class B64uTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        """Every length round-trips through b64u without padding."""
        for n in range(0, 70):
            data = bytes(range(n))
            text = E.b64u_encode(data)
            self.assertNotIn("=", text)
            self.assertEqual(E.b64u_decode(text), data)

    def test_rejects_padding_and_foreign_characters(self) -> None:
        """Padding, '+', '/', whitespace and other characters are refused."""
        for bad in ["AAAA=", "AA==", "ab+c", "ab/c", "ab c", "ab\nc", "ab.c", "é"]:
            self.assertRaises(ValueError, E.b64u_decode, bad)

    def test_rejects_impossible_length(self) -> None:
        """A length of 4k+1 characters cannot be base64."""
        self.assertRaises(ValueError, E.b64u_decode, "AAAAA")

    def test_rejects_non_canonical_trailing_bits(self) -> None:
        """The same bytes have one spelling: set trailing bits are refused."""
        self.assertEqual(E.b64u_decode("AA"), b"\x00")
        self.assertRaises(ValueError, E.b64u_decode, "AB")
        self.assertEqual(E.b64u_decode("AAA"), b"\x00\x00")
        self.assertRaises(ValueError, E.b64u_decode, "AAB")

    def test_rejects_non_string(self) -> None:
        """Only str decodes."""
        self.assertRaises(ValueError, E.b64u_decode, b"AAAA")  # type: ignore[arg-type]


class StrictJSONTests(SynchronousTestCase):
    def test_valid(self) -> None:
        """Ordinary JSON parses."""
        self.assertEqual(E.loads_json(b' {"a": [1, 2.5, "x", null]} '), {"a": [1, 2.5, "x", None]})

    def test_refusals(self) -> None:
        """Truncated, non-UTF-8, NaN, duplicate keys, huge ints and deep nesting are bad_json."""
        for body in [
            b"",
            b"{",
            b'{"a": 1',
            b'{"a": 1}}',
            b"\xff\xfe{}",
            b'{"a": NaN}',
            b'{"a": Infinity}',
            b'{"a": 1, "a": 2}',
            b'{"a": ' + b"9" * 5000 + b"}",
            b"[" * 100000 + b"]" * 100000,
        ]:
            self.assertRaises(BadJSON, E.loads_json, body)

    def test_raw_json_is_spliced(self) -> None:
        """RawJSON values are written as-is, everything else is encoded."""
        out = E.dumps_json({"ok": True, "messages": [E.RawJSON('{"x":1}')], "n": "é"})
        self.assertEqual(json.loads(out), {"ok": True, "messages": [{"x": 1}], "n": "é"})


def _signed_bytes_by_hand(env: dict) -> bytes:
    ct = E.b64u_decode(env["ciphertext"])
    return "\n".join(
        [
            "meshrelay/envelope/v1",
            env["mailbox"],
            env["sender"],
            str(env["ts"]),
            str(env["ttl"]),
            hashlib.sha256(ct).hexdigest(),
        ]
    ).encode()


class EnvelopeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.alice, self.bob = Identity(), Identity()
        self.env = self.alice.envelope(self.bob, b"secret bytes", ts=T0, ttl=600)

    def test_signed_bytes_and_msg_id(self) -> None:
        """msg_id is sha256 of the protocol's newline-joined signed bytes, signed by the sender."""
        signed = _signed_bytes_by_hand(self.env)
        self.assertEqual(self.env["msg_id"], hashlib.sha256(signed).hexdigest())
        self.alice.key.public_key().verify(E.b64u_decode(self.env["sig"]), signed)
        env = E.parse_envelope(self.env, MAX)
        self.assertEqual(env.signed, signed)
        self.assertTrue(E.verify_envelope(env))

    def test_raw_is_canonical_json_of_the_fields(self) -> None:
        """The stored form decodes to exactly the envelope that was sent."""
        self.assertEqual(json.loads(E.parse_envelope(self.env, MAX).raw), self.env)

    def test_msg_id_mismatch(self) -> None:
        """A msg_id that is not the hash of the signed bytes is refused (no shadowing)."""
        other = self.alice.envelope(self.bob, b"other", ts=T0)
        self.assertRaises(BadEnvelope, E.parse_envelope, dict(self.env, msg_id=other["msg_id"]), MAX)
        self.assertRaises(BadEnvelope, E.parse_envelope, dict(self.env, ttl=601), MAX)

    def test_unknown_and_missing_fields(self) -> None:
        """Unknown top-level fields and missing fields are bad_envelope."""
        self.assertRaises(BadEnvelope, E.parse_envelope, dict(self.env, extra=1), MAX)
        for key in self.env:
            partial = {k: v for k, v in self.env.items() if k != key}
            self.assertRaises(BadEnvelope, E.parse_envelope, partial, MAX)

    def test_wrong_types(self) -> None:
        """Numbers as strings, floats, booleans, negatives and huge values are bad_envelope."""
        for key, value in [
            ("v", 2),
            ("v", "1"),
            ("v", True),
            ("ts", "1795000000"),
            ("ts", 1795000000.0),
            ("ts", True),
            ("ts", -1),
            ("ts", 10**30),
            ("ttl", 60.5),
            ("ttl", None),
            ("ttl", -60),
            ("ttl", 2**53),
            ("mailbox", 123),
            ("sender", None),
            ("sig", ["x"]),
            ("msg_id", 5),
            ("msg_id", "AB" * 32),
            ("msg_id", "ab" * 31),
            ("ciphertext", {"a": 1}),
        ]:
            with self.subTest(key=key, value=value):
                self.assertRaises(BadEnvelope, E.parse_envelope, dict(self.env, **{key: value}), MAX)

    def test_not_an_object(self) -> None:
        """Arrays, strings and null are not envelopes."""
        for value in [[], "x", None, 5]:
            self.assertRaises(BadEnvelope, E.parse_envelope, value, MAX)

    def test_bad_base64_and_key_lengths(self) -> None:
        """Bad base64 and keys or signatures of the wrong length are bad_envelope."""
        short_key = E.b64u_encode(b"\x01" * 31)
        long_key = E.b64u_encode(b"\x01" * 33)
        for key, value in [
            ("mailbox", short_key),
            ("mailbox", long_key),
            ("sender", short_key),
            ("mailbox", self.env["mailbox"] + "="),
            ("sig", self.env["sig"][:-2]),
            ("sig", E.b64u_encode(b"\x00" * 65)),
            ("ciphertext", "not base64!"),
            ("ciphertext", "A"),
        ]:
            with self.subTest(key=key):
                self.assertRaises(BadEnvelope, E.parse_envelope, dict(self.env, **{key: value}), MAX)

    def test_bit_flipped_signature_does_not_verify(self) -> None:
        """Flipping any single bit of the signature makes it fail verification."""
        sig = bytearray(E.b64u_decode(self.env["sig"]))
        for bit in (0, 100, 511):
            flipped = bytearray(sig)
            flipped[bit // 8] ^= 1 << (bit % 8)
            env = E.parse_envelope(dict(self.env, sig=E.b64u_encode(bytes(flipped))), MAX)
            self.assertFalse(E.verify_envelope(env))

    def test_signature_by_someone_else(self) -> None:
        """A valid signature by another key than the sender's does not verify."""
        mallory = Ed25519PrivateKey.generate()
        forged = dict(self.env, sig=E.b64u_encode(mallory.sign(_signed_bytes_by_hand(self.env))))
        self.assertFalse(E.verify_envelope(E.parse_envelope(forged, MAX)))

    def test_size_limit(self) -> None:
        """Ciphertext of exactly the limit passes; one byte more is too_large."""
        at = self.alice.envelope(self.bob, b"x" * 100, ts=T0)
        over = self.alice.envelope(self.bob, b"x" * 101, ts=T0)
        self.assertEqual(E.parse_envelope(at, 100).ct_size, 100)
        self.assertRaises(TooLarge, E.parse_envelope, over, 100)

    def test_size_checked_before_shape(self) -> None:
        """An oversize ciphertext is too_large even when other fields are also wrong."""
        over = dict(self.alice.envelope(self.bob, b"x" * 2000, ts=T0), extra=True)
        self.assertRaises(TooLarge, E.parse_envelope, over, 1000)

    def test_deposit_time_rule(self) -> None:
        """Deposit ts must be within skew of now, unexpired, with ttl in range."""
        env = E.parse_envelope(self.env, MAX)
        E.check_deposit_time(env, T0 + 300, 300, 60, 259200)
        E.check_deposit_time(env, T0 - 300, 300, 60, 259200)
        self.assertRaises(BadTimestamp, E.check_deposit_time, env, T0 + 301, 300, 60, 259200)
        self.assertRaises(BadTimestamp, E.check_deposit_time, env, T0 - 301, 300, 60, 259200)
        short = E.parse_envelope(self.alice.envelope(self.bob, ts=T0, ttl=60), MAX)
        self.assertRaises(BadTimestamp, E.check_deposit_time, short, T0 + 60, 300, 60, 259200)
        self.assertRaises(BadTTL, E.check_deposit_time, short, T0, 300, 61, 259200)
        self.assertRaises(BadTTL, E.check_deposit_time, env, T0, 300, 60, 599)

    def test_replica_time_rule(self) -> None:
        """A replica may be old (until it expires) but not in the future beyond skew."""
        env = E.parse_envelope(self.env, MAX)
        E.check_replica_time(env, T0 + 599, 300, 60, 259200)
        self.assertRaises(BadTimestamp, E.check_replica_time, env, T0 + 600, 300, 60, 259200)
        E.check_replica_time(env, T0 - 300, 300, 60, 259200)
        self.assertRaises(BadTimestamp, E.check_replica_time, env, T0 - 301, 300, 60, 259200)


class PollParseTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.bob = Identity()

    def test_signed_bytes(self) -> None:
        """A poll signs domain, mailbox, ts, nonce and the ack ids joined by commas."""
        ids = ["a" * 64, "b" * 64]
        body = self.bob.signed(ts=T0, ack=ids, nonce=b"\x07" * 16)
        expected = "\n".join(
            ["meshrelay/poll/v1", self.bob.pub, str(T0), E.b64u_encode(b"\x07" * 16), ",".join(ids)]
        ).encode()
        self.bob.key.public_key().verify(E.b64u_decode(body["sig"]), expected)
        req = E.parse_poll(body)
        self.assertEqual(req.auth.signed, expected)
        self.assertTrue(E.verify_signed(req.auth))
        empty = E.parse_poll(self.bob.signed(ts=T0, nonce=b"\x07" * 16))
        self.assertTrue(empty.auth.signed.endswith(b"\n"))

    def test_ack_ids_are_checked_item_by_item(self) -> None:
        """Each ack id must be its own 64 lowercase hex characters; anything else is refused."""
        good = [os.urandom(32).hex() for _ in range(3)]
        self.assertEqual(E.parse_poll(self.bob.signed(ts=T0, ack=good)).auth.ack, tuple(good))
        self.assertEqual(E.parse_poll(self.bob.signed(ts=T0, ack=[])).auth.ack, ())
        for bad in (
            good[0].upper(),  # uppercase
            good[0][:63],  # short
            good[0] + "0",  # long
            good[0][:63] + " ",  # whitespace
            good[0][:63] + "\u0660",  # a non-ASCII digit
            good[0] + "," + good[1],  # two valid ids in one item
            good[0][:62] + "0x",
            " " + good[0][:62] + " ",  # whitespace around whole bytes (which fromhex skips)
            good[0][:30] + "\t\n" + good[0][:32],
        ):
            body = self.bob.signed(ts=T0, ack=good)
            body["ack"] = [*good, bad]  # the shape is checked before the signature
            with self.assertRaises(BadRequest, msg=bad):
                E.parse_poll(body)
        for bad_item in (1, None, [good[0]], {"id": good[0]}):
            body = self.bob.signed(ts=T0, ack=good)
            body["ack"] = [*good, bad_item]
            with self.assertRaises(BadRequest, msg=repr(bad_item)):
                E.parse_poll(body)
        # Split differently, the same characters are still refused: 64 + 64 is not 32 + 96.
        body = self.bob.signed(ts=T0, ack=good)
        body["ack"] = [good[0][:32], good[0][32:] + good[1]]
        with self.assertRaises(BadRequest):
            E.parse_poll(body)

    def test_signed_ack_json_text(self) -> None:
        """A signed ack's stored and pushed text is exactly the generic encoder's, for any ack list."""
        for n in (0, 1, 2, E.MAX_ACK_IDS):
            ids = [os.urandom(32).hex() for _ in range(n)]
            ack = E.parse_poll(self.bob.signed(ts=T0, ack=ids)).auth
            text = ack.json_text()
            self.assertEqual(text, E.dumps_json(ack.to_json()).decode("utf-8"))
            self.assertEqual(E.loads_json(text.encode()), ack.to_json())

    def test_defaults(self) -> None:
        """limit defaults to 100, wait to 0, fetch_remote to false, ack to empty."""
        body = self.bob.signed(ts=T0)
        del body["ack"]
        req = E.parse_poll(body)
        self.assertEqual((req.limit, req.wait, req.fetch_remote, req.auth.ack), (100, 0, False, ()))

    def test_refusals(self) -> None:
        """Out-of-range or mistyped poll fields are bad_request."""
        base = self.bob.signed(ts=T0)
        for key, value in [
            ("limit", 0),
            ("limit", 101),
            ("limit", 5.0),
            ("limit", "5"),
            ("wait", -1),
            ("wait", 31),
            ("wait", 1.5),
            ("wait", True),
            ("fetch_remote", 1),
            ("fetch_remote", "yes"),
            ("ack", "a" * 64),
            ("ack", ["A" * 64]),
            ("ack", ["a" * 63]),
            ("ack", [1]),
            ("ack", ["a" * 64] * 501),
            ("nonce", E.b64u_encode(b"\x00" * 15)),
            ("nonce", E.b64u_encode(b"\x00" * 17)),
            ("nonce", 7),
            ("ts", -5),
            ("ts", "now"),
            ("mailbox", "short"),
            ("sig", "!!"),
            ("unexpected", 1),
        ]:
            with self.subTest(key=key, value=value):
                self.assertRaises(BadRequest, E.parse_poll, dict(base, **{key: value}))
        for missing in ("mailbox", "ts", "nonce", "sig"):
            self.assertRaises(BadRequest, E.parse_poll, {k: v for k, v in base.items() if k != missing})
        self.assertRaises(BadRequest, E.parse_poll, [base])

    def test_count_takes_no_acks(self) -> None:
        """A count with a non-empty ack list is bad_request."""
        self.assertRaises(BadRequest, E.parse_poll, self.bob.signed(ts=T0, ack=["a" * 64]), count=True)
        E.parse_poll(self.bob.signed(ts=T0), count=True)

    def test_poll_time(self) -> None:
        """A poll ts outside the skew is stale."""
        auth = E.parse_poll(self.bob.signed(ts=T0)).auth
        E.check_poll_time(auth, T0 + 300, 300)
        self.assertRaises(Stale, E.check_poll_time, auth, T0 + 301, 300)
        self.assertRaises(Stale, E.check_poll_time, auth, T0 - 301, 300)

    def test_signed_ack_shape_and_time(self) -> None:
        """A peer ack has exactly the five signed fields; it may not be from the future or too old."""
        body = self.bob.signed(ts=T0, ack=["a" * 64])
        ack = E.parse_signed_ack(body)
        self.assertEqual(ack.to_json(), body)
        self.assertRaises(BadRequest, E.parse_signed_ack, dict(body, limit=5))
        self.assertRaises(BadRequest, E.parse_signed_ack, {k: v for k, v in body.items() if k != "ack"})
        E.check_ack_replica_time(ack, T0 + 300, 300, 1000)
        self.assertRaises(BadTimestamp, E.check_ack_replica_time, ack, T0 - 301, 300, 1000)
        E.check_ack_replica_time(ack, T0 + 1600, 300, 1000)
        self.assertRaises(BadTimestamp, E.check_ack_replica_time, ack, T0 + 1601, 300, 1000)
        self.assertEqual(E.tombstone_expiry(T0, 1000, 300), T0 + 1600)
