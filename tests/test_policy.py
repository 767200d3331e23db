"""Unit tests of the pure first-contact module: policies, permits, stamps, admission, test vectors."""

from __future__ import annotations

import json

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.trial.unittest import SynchronousTestCase

from meshrelay import envelope as E
from meshrelay import policy as P
from meshrelay.errors import (
    STATUS_BY_CODE,
    BadPermit,
    BadPolicy,
    BadStamp,
    BadTimestamp,
    ContactsOnly,
    PermitExpired,
    PermitMismatch,
    PermitRevoked,
    StampRequired,
    WeakStamp,
)

SENDER = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
MAILBOX = Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64)))
SENDER_B64 = "A6EHv_POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg"
MAILBOX_B64 = "Kay64UG8yvCyLhqU000LxzYeUm0L_hLIl5S8kyKWbdc"
#: the envelope of docs/protocol.md Appendix A.1
CIPHERTEXT = bytes.fromhex("70726f746f636f6c2e6d64207465737420766563746f7200feff")
MSG_ID = "57ccbe063da1a1b7ff26af604c26763f552c4453b76a425fefd538313c44ef4c"
T0 = 1800000000

# Test vectors (docs/protocol.md section 12.6): Ed25519 is deterministic, so these are fixed.
POLICY_SIG = "IgcGlapBhKdZ0GtASqqs9kgNNqj9R-p2HPVzBhyiGvF3a7UQhHbk9UOOPHT2_GsT3vZSC-DhzqGvFm0RQdZmDg"
PERMIT_SIG = "vtVO9ztkpQIAeEAeiMjGP4eIE930lzzZKRNMsnOxW2rlDC1FSICmZZ5aBEMBCElkpzylNfHBLMOfU8pKvbHbCA"
PERMIT_TOKEN = (
    "mrp1.Kay64UG8yvCyLhqU000LxzYeUm0L_hLIl5S8kyKWbdcDoQe_884Qvh1w3RjnS8CZZ-TWMJulDV8d3IZkElUxuAAAAABrSyOAAAAAAAAAAAG"
    "-1U73O2SlAgB4QB6IyMY_h4gT3fSXPNkpE0yyc7FbauUMLUVIgKZlnloEQwEISWSnPKU18cEsw59Tykq9sdsI"
)
#: the first stamp of at least 12 bits for MSG_ID, counting up from 0 (counter 0x1131 = 4401; 15 bits)
STAMP = "AAAAAAAAETE"


def _envelope(sender: Ed25519PrivateKey = SENDER, ts: int = T0) -> E.Envelope:
    return E.parse_envelope(E.make_envelope(sender, MAILBOX_B64, CIPHERTEXT, ts, 3600), 8192)


def _policy(**kw: object) -> P.Policy:
    args: dict[str, object] = {"version": 2, "mode": "stamps", "difficulty": 12, "epoch": 1, "ts": T0}
    args.update(kw)
    return P.parse_policy(P.make_policy(MAILBOX, **args))  # type: ignore[arg-type]


class VectorTests(SynchronousTestCase):
    def test_policy_vector(self) -> None:
        """The policy signed bytes and signature match the documented vector."""
        pol = _policy(stranger_cap=64)
        self.assertEqual(pol.signed, f"meshrelay/policy/v1\n{MAILBOX_B64}\n2\nstamps\n12\n64\n1\n{T0}".encode("ascii"))
        self.assertEqual(pol.sig, POLICY_SIG)
        self.assertTrue(P.verify_policy(pol))

    def test_permit_vector_and_token(self) -> None:
        """The permit signature and its printable token match the documented vector and round-trip."""
        permit = P.parse_permit(P.make_permit(MAILBOX, SENDER_B64, T0 + 86400, 1))
        self.assertEqual(
            permit.signed, f"meshrelay/permit/v1\n{MAILBOX_B64}\n{SENDER_B64}\n{T0 + 86400}\n1".encode("ascii")
        )
        self.assertEqual(permit.sig, PERMIT_SIG)
        self.assertEqual(permit.token(), PERMIT_TOKEN)
        self.assertEqual(P.parse_permit_token(PERMIT_TOKEN), permit)
        self.assertTrue(P.verify_permit(permit))

    def test_stamp_vector(self) -> None:
        """The solver finds the documented stamp for the Appendix A.1 msg_id, and its work is 15 bits."""
        self.assertEqual(_envelope().msg_id, MSG_ID)
        self.assertEqual(P.solve_stamp(MSG_ID, 12), STAMP)
        self.assertEqual(P.stamp_work(MSG_ID, E.b64u_decode(STAMP)), 15)


class PolicyShapeTests(SynchronousTestCase):
    def test_round_trip_canonical(self) -> None:
        """A policy's canonical text parses back to the same policy."""
        pol = _policy()
        self.assertEqual(P.parse_policy(json.loads(pol.raw)), pol)

    def test_bad_shapes(self) -> None:
        """Unknown or missing fields, bad modes and out-of-range values are bad_policy."""
        good = P.make_policy(MAILBOX, version=1, mode="open", ts=T0)
        bad = [
            "x",
            {**good, "extra": 1},
            {k: v for k, v in good.items() if k != "epoch"},
            {**good, "mode": "closed"},
            {**good, "mode": 1},
            {**good, "difficulty": P.MAX_DIFFICULTY + 1},
            {**good, "mode": "stamps", "difficulty": 0},
            {**good, "version": -1},
            {**good, "version": True},
            {**good, "mailbox": MAILBOX_B64 + "A"},
            {**good, "sig": "AA"},
        ]
        for obj in bad:
            self.assertRaises(BadPolicy, P.parse_policy, obj)

    def test_forged_policy_does_not_verify(self) -> None:
        """A policy signed by another key, or altered after signing, does not verify."""
        forged = P.make_policy(SENDER, version=9, mode="open", ts=T0)
        forged["mailbox"] = MAILBOX_B64
        self.assertFalse(P.verify_policy(P.parse_policy(forged)))
        altered = P.make_policy(MAILBOX, version=1, mode="contacts", ts=T0)
        altered["mode"] = "open"
        self.assertFalse(P.verify_policy(P.parse_policy(altered)))

    def test_latest_version_wins_with_deterministic_ties(self) -> None:
        """A higher version replaces a lower one; two of one version order by policy id, the same everywhere."""
        v1, v2 = _policy(version=1), _policy(version=2)
        self.assertTrue(v2.newer_than(v1))
        self.assertFalse(v1.newer_than(v2))
        self.assertFalse(v2.newer_than(v2))
        a, b = _policy(version=3, mode="open", difficulty=0), _policy(version=3, mode="contacts", difficulty=0)
        self.assertNotEqual(a.newer_than(b), b.newer_than(a))

    def test_policy_from_the_future_is_refused(self) -> None:
        """A policy ts more than clock_skew ahead of the node is bad_timestamp."""
        P.check_policy_time(_policy(ts=T0 + 300), T0, 300)
        self.assertRaises(BadTimestamp, P.check_policy_time, _policy(ts=T0 + 301), T0, 300)


class PermitTests(SynchronousTestCase):
    def test_bad_tokens(self) -> None:
        """Tokens with a wrong prefix, bad b64u or a wrong length are bad_permit."""
        for bad in ["", "mrp2." + PERMIT_TOKEN[5:], PERMIT_TOKEN + "A", PERMIT_TOKEN[:-4], "mrp1.***"]:
            self.assertRaises(BadPermit, P.parse_permit_token, bad)

    def test_each_refusal_has_its_code(self) -> None:
        """Forged, expired, another sender's and revoked-epoch permits are each refused with their code."""
        env = _envelope()
        good = P.parse_permit(P.make_permit(MAILBOX, SENDER_B64, T0 + 10, 1))
        P.check_permit(env, good, _policy(epoch=1), P.verify_permit(good))
        forged = P.make_permit(SENDER, SENDER_B64, T0 + 10, 1)
        forged["mailbox"] = MAILBOX_B64
        fp = P.parse_permit(forged)
        with self.assertRaises(BadPermit):
            P.check_permit(env, fp, None, P.verify_permit(fp))
        expired = P.parse_permit(P.make_permit(MAILBOX, SENDER_B64, T0, 1))
        with self.assertRaises(PermitExpired):
            P.check_permit(env, expired, None, True)
        other = Ed25519PrivateKey.from_private_bytes(b"\x07" * 32)
        with self.assertRaises(PermitMismatch):
            P.check_permit(_envelope(sender=other), good, None, True)
        with self.assertRaises(PermitRevoked):
            P.check_permit(env, good, _policy(epoch=2), True)
        codes = {BadPermit.code, PermitExpired.code, PermitMismatch.code, PermitRevoked.code}
        self.assertEqual(len(codes), 4)
        self.assertTrue(codes <= set(STATUS_BY_CODE))

    def test_permit_cannot_move_to_another_senders_envelope(self) -> None:
        """Rewriting a permit's sender to the attacker's key breaks its signature (bad_permit)."""
        attacker = Ed25519PrivateKey.from_private_bytes(b"\x09" * 32)
        moved = P.make_permit(MAILBOX, SENDER_B64, T0 + 10, 0)
        moved["sender"] = E.public_key_b64u(attacker)
        permit = P.parse_permit(moved)
        env, extras = P.split_extras({**E.make_envelope(attacker, MAILBOX_B64, b"x", T0, 3600), "permit": moved})
        parsed = E.parse_envelope(env, 8192)
        with self.assertRaises(BadPermit):
            P.classify(parsed, extras, None, P.verify_permit(permit))


class StampTests(SynchronousTestCase):
    def test_bad_stamp_shapes(self) -> None:
        """A stamp that is not canonical b64u of 8 bytes is bad_stamp."""
        for bad in [1, None, "AAAAAAAAAA", "AAAAAAAAAAAA", "AAAAAAAAET+", "AAAAAAAAETF"]:
            self.assertRaises(BadStamp, P.parse_stamp, bad)

    def test_stamp_is_bound_to_the_msg_id(self) -> None:
        """A stamp solved for one msg_id has (almost surely) no work for another."""
        other = "0" * 64
        self.assertLess(P.stamp_work(other, E.b64u_decode(STAMP)), 12)

    def test_solver_reports_progress(self) -> None:
        """The solver calls progress with the tries so far while it works."""
        seen: list[int] = []
        P.solve_stamp(MSG_ID, 12, progress=seen.append, every=1000)
        self.assertEqual(seen, [1000, 2000, 3000, 4000])


class ClassifyTests(SynchronousTestCase):
    def _extras(self, stamp: str | None = None, permit: dict[str, object] | None = None) -> P.Extras:
        obj = E.make_envelope(SENDER, MAILBOX_B64, CIPHERTEXT, T0, 3600)
        if stamp is not None:
            obj["stamp"] = stamp
        if permit is not None:
            obj["permit"] = permit
        return P.split_extras(obj)[1]

    def test_open_and_no_policy_take_strangers(self) -> None:
        """Without a policy, or with an open one, a stamp-less stranger is stranger mail."""
        env = _envelope()
        self.assertEqual(P.classify(env, P.NO_EXTRAS, None, False), P.STRANGER)
        self.assertEqual(P.classify(env, P.NO_EXTRAS, _policy(mode="open", difficulty=0), False), P.STRANGER)

    def test_stamps_mode(self) -> None:
        """stamps: no stamp is stamp_required, a weak one weak_stamp, enough work is stranger mail."""
        env = _envelope()
        with self.assertRaises(StampRequired) as cm:
            P.classify(env, P.NO_EXTRAS, _policy(), False)
        self.assertEqual(cm.exception.extra, {"difficulty": 12})
        self.assertEqual(P.classify(env, self._extras(stamp=STAMP), _policy(difficulty=15), False), P.STRANGER)
        with self.assertRaises(WeakStamp):
            P.classify(env, self._extras(stamp=STAMP), _policy(difficulty=16), False)

    def test_contacts_mode(self) -> None:
        """contacts: a stranger is refused even with a stamp; a permit makes contact mail."""
        env = _envelope()
        pol = _policy(mode="contacts", difficulty=0, epoch=1)
        with self.assertRaises(ContactsOnly):
            P.classify(env, self._extras(stamp=STAMP), pol, False)
        permit = P.make_permit(MAILBOX, SENDER_B64, T0 + 60, 1)
        self.assertEqual(P.classify(env, self._extras(permit=permit), pol, True), P.CONTACT)

    def test_split_extras_keeps_v1_envelope(self) -> None:
        """permit and stamp are taken off; the rest parses as the same v1 envelope and msg_id."""
        v1 = E.make_envelope(SENDER, MAILBOX_B64, CIPHERTEXT, T0, 3600)
        permit = P.make_permit(MAILBOX, SENDER_B64, T0 + 60, 1)
        rest, extras = P.split_extras({**v1, "permit": permit, "stamp": STAMP})
        self.assertEqual(rest, v1)
        env = E.parse_envelope(rest, 8192)
        full = json.loads(P.with_extras(env.raw, extras.suffix))
        self.assertEqual(full, {**v1, "permit": permit, "stamp": STAMP})
        self.assertEqual(P.split_extras(v1), (v1, P.NO_EXTRAS))

    def test_stranger_cap_never_above_node_cap(self) -> None:
        """The stranger bucket's cap is the policy's, clamped to per_mailbox_pending; v1 cap with no policy."""
        self.assertEqual(P.stranger_cap(None, 256), 256)
        self.assertEqual(P.stranger_cap(_policy(stranger_cap=10), 256), 10)
        self.assertEqual(P.stranger_cap(_policy(stranger_cap=1000), 256), 256)
