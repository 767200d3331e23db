"""First contact on one in-memory node: policies, permits, stamps and the two buckets (protocol v3)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from meshrelay import policy as P
from tests.helpers import Identity, MemNode, make_config
from tests.pgtest import create_schema, requires_pg

SEND = "/api/mesh/dm/send"
POLICY = "/api/mesh/dm/policy"
#: low difficulty: tests solve hundreds of stamps
BITS = 4


class FirstContactCase(SynchronousTestCase):
    limits: dict[str, Any] = {"per_mailbox_pending": 6, "per_sender_pending": 8}

    def setUp(self) -> None:
        self.n = MemNode(self.mktemp(), **self.limits)
        self.addCleanup(self.n.stop)
        self.owner, self.friend = Identity(), Identity()

    def now(self) -> int:
        return int(self.n.clock.seconds())

    def policy(self, version: int, **kw: Any) -> dict[str, Any]:
        kw.setdefault("ts", self.now())
        return P.make_policy(self.owner.key, version=version, **kw)

    def set_policy(self, version: int, **kw: Any) -> tuple[int, Any]:
        return self.n.request("POST", POLICY, self.policy(version, **kw))

    def permit(self, sender: Identity, expires: int | None = None, epoch: int = 0) -> dict[str, Any]:
        return P.make_permit(self.owner.key, sender.pub, self.now() + 3600 if expires is None else expires, epoch)

    def env(self, sender: Identity, text: bytes = b"hi", **extra: Any) -> dict[str, Any]:
        env = sender.envelope(self.owner, text, ts=self.now())
        if extra.pop("stamp", False):
            env["stamp"] = P.solve_stamp(env["msg_id"], extra.pop("bits", BITS))
        env.update(extra)
        return env

    def assertError(self, result: tuple[int, Any], status: int, code: str) -> None:
        self.assertEqual((result[0], result[1].get("error")), (status, code), result)

    def polled(self) -> list[dict[str, Any]]:
        status, body = self.n.poll(self.owner)
        self.assertEqual(status, 200, body)
        return list(body["messages"])


class PolicyRouteTests(FirstContactCase):
    def test_set_and_read(self) -> None:
        """A signed policy is stored and served publicly; the same again is a duplicate."""
        self.assertEqual(
            self.n.request("GET", POLICY + "?mailbox=" + self.owner.pub), (200, {"ok": True, "policy": None})
        )
        pol = self.policy(1, mode="stamps", difficulty=BITS, stranger_cap=3)
        self.assertEqual(self.n.request("POST", POLICY, pol), (200, {"ok": True, "version": 1, "duplicate": False}))
        self.assertEqual(self.n.request("POST", POLICY, pol)[1]["duplicate"], True)
        self.assertEqual(
            self.n.request("GET", POLICY + "?mailbox=" + self.owner.pub), (200, {"ok": True, "policy": pol})
        )

    def test_old_policy_replayed_is_stale(self) -> None:
        """A policy older than the held one is 409 stale_policy and changes nothing."""
        old = self.policy(1, mode="open")
        self.assertEqual(self.n.request("POST", POLICY, old)[0], 200)
        self.assertEqual(self.set_policy(2, mode="contacts")[0], 200)
        self.assertError(self.n.request("POST", POLICY, old), 409, "stale_policy")
        self.assertEqual(self.n.relay.policies.get(self.owner.pub).mode, "contacts")  # type: ignore[union-attr]

    def test_bad_policies(self) -> None:
        """Malformed, forged and future policies and bad queries each get their own code."""
        self.assertError(self.n.request("POST", POLICY, {"mailbox": self.owner.pub}), 400, "bad_policy")
        forged = P.make_policy(self.friend.key, version=5, mode="open", ts=self.now())
        forged["mailbox"] = self.owner.pub
        self.assertError(self.n.request("POST", POLICY, forged), 400, "bad_signature")
        self.assertError(self.set_policy(1, ts=self.now() + 3600), 422, "bad_timestamp")
        self.assertError(self.n.request("GET", POLICY), 400, "bad_request")
        self.assertError(self.n.request("GET", POLICY + "?mailbox=abc"), 400, "bad_request")
        self.assertError(self.n.request("GET", POLICY + "?mailbox=" + self.owner.pub + "&x=1"), 400, "bad_request")

    def test_policy_survives_a_restart(self) -> None:
        """The policy is stored durably: a node opened again on the same store enforces it."""
        self.assertEqual(self.set_policy(1, mode="contacts")[0], 200)
        self.n.stop()
        self.n = MemNode(self.n.config.node.data_dir, config=self.n.config, clock=self.n.clock)
        self.assertError(self.n.send(self.env(self.friend)), 403, "contacts_only")


class AdmissionTests(FirstContactCase):
    def test_stamps_mode(self) -> None:
        """stamps: no stamp, a malformed one and a weak one are refused; enough work is accepted."""
        self.assertEqual(self.set_policy(1, mode="stamps", difficulty=12)[0], 200)
        status, body = self.n.send(self.env(self.friend))
        self.assertEqual((status, body["error"], body["difficulty"]), (403, "stamp_required", 12))
        bad = self.env(self.friend)
        bad["stamp"] = "xx"
        self.assertError(self.n.send(bad), 400, "bad_stamp")
        weak = self.env(self.friend)
        weak["stamp"] = next(
            s
            for s in (P.solve_stamp(weak["msg_id"], 1, start=i) for i in range(0, 10**6, 7))
            if P.stamp_work(weak["msg_id"], P.E.b64u_decode(s)) < 12
        )
        self.assertError(self.n.send(weak), 403, "weak_stamp")
        ok = self.env(self.friend, stamp=True, bits=12)
        self.assertEqual(self.n.send(ok)[0], 200)
        # The client gets the v1 envelope back: no stamp, and it still verifies.
        (got,) = self.polled()
        self.assertEqual(got, {k: v for k, v in ok.items() if k != "stamp"})

    def test_contacts_mode_and_permits(self) -> None:
        """contacts: strangers are refused; a valid permit gets through; every bad permit has its code."""
        self.assertEqual(self.set_policy(1, mode="contacts", epoch=2)[0], 200)
        self.assertError(self.n.send(self.env(self.friend, stamp=True)), 403, "contacts_only")
        self.assertEqual(self.n.send(self.env(self.friend, permit=self.permit(self.friend, epoch=2)))[0], 200)
        stranger = Identity()
        forged = P.make_permit(stranger.key, self.friend.pub, self.now() + 60, 2)
        forged["mailbox"] = self.owner.pub
        self.assertError(self.n.send(self.env(self.friend, b"f", permit=forged)), 403, "bad_permit")
        self.assertError(
            self.n.send(self.env(self.friend, b"e", permit=self.permit(self.friend, self.now(), 2))),
            403,
            "permit_expired",
        )
        self.assertError(
            self.n.send(self.env(stranger, b"o", permit=self.permit(self.friend, epoch=2))), 403, "permit_mismatch"
        )
        self.assertError(
            self.n.send(self.env(self.friend, b"r", permit=self.permit(self.friend, epoch=1))), 403, "permit_revoked"
        )
        self.assertError(self.n.send(self.env(self.friend, b"m", permit={"x": 1})), 403, "bad_permit")

    def test_forged_envelope_is_bad_signature_first(self) -> None:
        """A forged envelope answers bad_signature even when the policy would also refuse it."""
        self.assertEqual(self.set_policy(1, mode="contacts")[0], 200)
        env = self.env(self.friend)
        env["sig"] = env["sig"][:-2] + ("AA" if env["sig"][-2:] != "AA" else "BA")
        self.assertError(self.n.send(env), 400, "bad_signature")


class BucketTests(FirstContactCase):
    def test_strangers_never_take_a_contacts_place(self) -> None:
        """Fresh keys with valid stamps fill the stranger bucket (stranger_full); the contact still gets in.

        Fails on v1 code, where 6 deposits from fresh keys fill the mailbox and the contact gets mailbox_full.
        """
        self.assertEqual(self.set_policy(1, mode="stamps", difficulty=BITS, stranger_cap=6)[0], 200)
        for i in range(6):
            self.assertEqual(self.n.send(self.env(Identity(), b"spam%d" % i, stamp=True))[0], 200)
        self.assertError(self.n.send(self.env(Identity(), b"more", stamp=True)), 429, "stranger_full")
        permit = self.permit(self.friend)
        for i in range(6):
            self.assertEqual(self.n.send(self.env(self.friend, b"hi%d" % i, permit=permit))[0], 200)
        self.assertError(self.n.send(self.env(self.friend, b"x", permit=permit)), 429, "mailbox_full")

    def test_no_policy_keeps_v1_caps_for_strangers(self) -> None:
        """Without a policy strangers get the v1 answer mailbox_full at per_mailbox_pending; a permit still gets in."""
        for i in range(6):
            self.assertEqual(self.n.send(self.env(Identity(), b"s%d" % i))[0], 200)
        self.assertError(self.n.send(self.env(Identity(), b"s")), 429, "mailbox_full")
        self.assertEqual(self.n.send(self.env(self.friend, permit=self.permit(self.friend)))[0], 200)

    def test_stripped_copy_is_upgraded(self) -> None:
        """A stranger copy (its permit stripped) is upgraded when the copy with the permit arrives."""
        self.assertEqual(self.set_policy(1, mode="open", stranger_cap=6)[0], 200)
        env = self.env(self.friend, permit=self.permit(self.friend))
        stripped = {k: v for k, v in env.items() if k != "permit"}
        self.assertEqual(self.n.send(stripped), (200, {"ok": True, "msg_id": env["msg_id"], "duplicate": False}))
        self.assertEqual(self.n.send(env), (200, {"ok": True, "msg_id": env["msg_id"], "duplicate": True}))
        # The stored copy is contact mail now, and carries the permit for v3 peers.
        for i in range(6):
            self.n.send(self.env(Identity(), b"s%d" % i))
        body = self.n.store._wconn.execute(  # type: ignore[attr-defined]
            "SELECT body FROM envelopes WHERE msg_id = ?", (env["msg_id"],)
        ).fetchone()[0]
        self.assertEqual(json.loads(body)["permit"], env["permit"])
        self.assertEqual(len(self.polled()), 7)


class ReplicaTests(FirstContactCase):
    def test_hostile_peer_cannot_inject(self) -> None:
        """Replicas get the deposit rules: stamp-less stranger mail, forged and moved permits are rejected by code."""
        self.assertEqual(self.set_policy(1, mode="stamps", difficulty=BITS, stranger_cap=2)[0], 200)
        attacker = Identity()
        forged = P.make_permit(attacker.key, attacker.pub, self.now() + 60, 0)
        forged["mailbox"] = self.owner.pub
        moved = self.permit(self.friend)
        moved["sender"] = attacker.pub
        good = self.env(self.friend, b"contact", permit=self.permit(self.friend))
        batch = [
            self.env(attacker, b"no stamp"),
            self.env(attacker, b"forged", permit=forged),
            self.env(attacker, b"moved", permit=moved),
            self.env(attacker, b"other sender", permit=self.permit(self.friend)),
            self.env(attacker, b"stamped", stamp=True),
            good,
        ]
        results = self.successResultOf(self.n.relay.accept_replicas(batch))
        self.assertEqual(
            [r.get("error", r["status"]) for r in results],
            ["stamp_required", "bad_permit", "bad_permit", "permit_mismatch", "accepted", "accepted"],
        )
        self.assertEqual(self.n.metrics.sample("meshrelay_dm_replica_total", {"outcome": "stamp_required"}), 1)

    def test_forged_copy_cannot_upgrade(self) -> None:
        """A copy of a stored envelope with a valid permit but a forged sig is bad_signature; nothing changes."""
        env = self.env(self.friend)
        self.assertEqual(self.n.send(env)[0], 200)
        forged = {**env, "sig": env["sig"][:-2] + ("AA" if env["sig"][-2:] != "AA" else "BA")}
        forged["permit"] = self.permit(self.friend)
        (result,) = self.successResultOf(self.n.relay.accept_replicas([forged]))
        self.assertEqual(result.get("error"), "bad_signature")
        self.assertEqual(self.polled(), [env])


@requires_pg
class PostgresFirstContactTests(SynchronousTestCase):
    """The node-level first-contact rules on the PostgreSQL store (the relay verifies; no writer checks)."""

    def setUp(self) -> None:
        dsn = create_schema(self.addCleanup)
        d = self.mktemp()
        cfg = make_config(d, per_mailbox_pending=3, per_sender_pending=8)
        cfg = dataclasses.replace(cfg, store=dataclasses.replace(cfg.store, backend="postgresql", dsn=dsn))
        self.n = MemNode(d, config=cfg)
        self.addCleanup(self.n.stop)
        self.owner, self.friend = Identity(), Identity()

    def test_buckets_permits_and_stamps(self) -> None:
        """stamps policy: stamp refusals, stranger_full at the stranger cap, contacts still in, bad permits refused."""
        now = int(self.n.clock.seconds())
        pol = P.make_policy(self.owner.key, version=1, mode="stamps", difficulty=BITS, stranger_cap=2, ts=now)
        self.assertEqual(self.n.request("POST", POLICY, pol)[0], 200)

        def send(sender: Identity, text: bytes, **extra: Any) -> str:
            env = {**sender.envelope(self.owner, text, ts=now), **extra}
            if extra.get("stamp") is True:
                env["stamp"] = P.solve_stamp(env["msg_id"], BITS)
            status, body = self.n.send(env)
            return "ok" if status == 200 else str(body["error"])

        self.assertEqual(send(Identity(), b"a"), "stamp_required")
        self.assertEqual([send(Identity(), b"s%d" % i, stamp=True) for i in range(3)], ["ok", "ok", "stranger_full"])
        permit = P.make_permit(self.owner.key, self.friend.pub, now + 60, 0)
        self.assertEqual(
            [send(self.friend, b"c%d" % i, permit=permit) for i in range(4)], ["ok"] * 3 + ["mailbox_full"]
        )
        forged = P.make_permit(Identity().key, self.friend.pub, now + 60, 0)
        forged["mailbox"] = self.owner.pub
        self.assertEqual(send(self.friend, b"f", permit=forged), "bad_permit")
