"""The shared peer wire module: what the puller accepts from a peer's features, ids pages and bodies answers."""

from __future__ import annotations

import os
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from meshrelay import protocol as P
from meshrelay.envelope import b64u_decode, b64u_encode
from tests.helpers import Identity

BOX = Identity().pub
NONCE = b64u_encode(os.urandom(16))
MID = os.urandom(32).hex()


def ids_page(items: list[Any], **kw: Any) -> dict[str, Any]:
    return {"ok": True, "feed": "f", "items": items, "next": kw.pop("next", 2), "more": kw.pop("more", False), **kw}


class ProtocolTests(SynchronousTestCase):
    def test_features(self) -> None:
        """A v2 features answer parses; malformed ones are PeerError; a peer without 2 is not v2."""
        good = {"ok": True, "versions": [1, 2], "page_bytes": 65536, "max_ids": 5000, "max_bodies": 500}
        self.assertTrue(P.parse_features(good).v2)
        self.assertFalse(P.parse_features(dict(good, versions=[1, 3])).v2)
        for bad in (
            {},
            dict(good, ok=False),
            dict(good, versions=[]),
            dict(good, versions=["2"]),
            dict(good, page_bytes=0),
        ):
            with self.assertRaises(P.PeerError):
                P.parse_features(bad)

    def test_ids_page(self) -> None:
        """Ids items need kind, a canonical mailbox, a msg_id or nonce, and a size; nothing more."""
        env = {"seq": 1, "kind": "envelope", "mailbox": BOX, "msg_id": MID, "size": 10}
        ack = {"seq": 2, "kind": "ack", "mailbox": BOX, "nonce": NONCE, "size": 20}
        page = P.parse_ids_page(ids_page([env, ack]), 0, 10)
        self.assertEqual((page.envelopes, page.acks), ([(BOX, MID, 10)], [(BOX, NONCE, 20)]))
        for bad in (
            dict(env, kind="ack"),
            dict(env, msg_id=MID.upper()),
            dict(env, size=-1),
            dict(env, size=True),
            dict(env, mailbox=BOX + "A"),
            dict(env, extra=1),
            dict(ack, nonce=NONCE + "A"),
            {"seq": 1, "envelope": {}},
        ):
            with self.assertRaises(P.PeerError):
                P.parse_ids_page(ids_page([bad]), 0, 10)
        with self.assertRaises(P.PeerError):
            P.parse_ids_page(ids_page([env, ack]), 0, 1)  # more items than the limit asked for

    def test_bodies_answer(self) -> None:
        """A bodies answer may not hold more than was asked for, and its gone lists are checked."""
        ok = {"ok": True, "envelopes": [{}], "acks": [], "gone": {"envelopes": [MID], "acks": []}}
        answer = P.parse_bodies(ok, 2, 0)
        self.assertEqual((len(answer.envelopes), answer.gone_envelopes), (1, [MID]))
        with self.assertRaises(P.PeerError):
            P.parse_bodies(ok, 1, 0)
        for bad in (
            dict(ok, gone={"envelopes": ["x"], "acks": []}),
            dict(ok, gone={"envelopes": [], "acks": [{"mailbox": BOX}]}),
            dict(ok, gone=[]),
            dict(ok, envelopes={}),
        ):
            with self.assertRaises(P.PeerError):
                P.parse_bodies(bad, 5, 5)

    def test_response_caps(self) -> None:
        """A bounded answer's cap follows the peer's page_bytes (at most 16 MiB) plus the largest item."""
        item = P.max_item_bytes(8192)
        self.assertEqual(item, 500 * 70 + 1024)
        self.assertEqual(P.bounded_response_cap(1 << 20, 8192), (1 << 20) + item + 4096)
        self.assertEqual(P.bounded_response_cap(1 << 40, 8192), (16 << 20) + item + 4096)
        self.assertEqual(P.v1_response_cap(8192), 500 * (8192 * 4 // 3 + 1024) + 4096)


def _decodes_to(value: str, n: int) -> bool:
    """The reference check the patterns replace: canonical b64u that decodes to ``n`` bytes."""
    try:
        return len(b64u_decode(value)) == n
    except ValueError:
        return False


_B64U_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


class CanonicalKeyPatternTests(SynchronousTestCase):
    """is_mailbox / is_nonce (patterns, no decode) agree with decoding, on keys and on near-misses."""

    @settings(max_examples=400, derandomize=True)
    @given(st.binary(min_size=32, max_size=32), st.binary(min_size=16, max_size=16))
    def test_every_canonical_value_matches(self, key: bytes, nonce: bytes) -> None:
        self.assertTrue(P.is_mailbox(b64u_encode(key)))
        self.assertTrue(P.is_nonce(b64u_encode(nonce)))
        self.assertFalse(P.is_mailbox(b64u_encode(nonce)))
        self.assertFalse(P.is_nonce(b64u_encode(key)))

    @settings(max_examples=2000, derandomize=True)
    @given(st.text(alphabet=_B64U_CHARS + "=+/ \n\u00e9A", min_size=20, max_size=45))
    def test_the_patterns_agree_with_decoding(self, text: str) -> None:
        self.assertEqual(P.is_mailbox(text), len(text) == 43 and _decodes_to(text, 32), text)
        self.assertEqual(P.is_nonce(text), len(text) == 22 and _decodes_to(text, 16), text)

    def test_every_last_character(self) -> None:
        """Each of the 64 last characters: accepted exactly when its unused low bits are zero."""
        for c in _B64U_CHARS:
            key, nonce = "A" * 42 + c, "A" * 21 + c
            self.assertEqual(P.is_mailbox(key), _decodes_to(key, 32), c)
            self.assertEqual(P.is_nonce(nonce), _decodes_to(nonce, 16), c)
        self.assertFalse(P.is_mailbox("A" * 43 + "\n"))
        self.assertFalse(P.is_mailbox(None))
        self.assertFalse(P.is_nonce(22))
