"""Client library and CLI pieces of first contact that need no node: tokens, permits file, stamps."""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout

from twisted.trial.unittest import SynchronousTestCase

from meshrelay import cli
from meshrelay import envelope as E
from meshrelay import policy as P
from meshrelay.client import ClientError, Identity, check_permit_token, first_contact


class FirstContactTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.owner = Identity(b"\x01" * 32)
        self.contact = Identity(b"\x02" * 32)
        self.env = self.contact.envelope(self.owner.address, b"hello", ttl=3600)

    def test_permit_token_checked_offline(self) -> None:
        """A token for this sender verifies; one for another sender, expired or altered is refused."""
        token = self.owner.permit(self.contact.address, int(time.time()) + 3600, epoch=2)
        permit = check_permit_token(token, self.contact.address)
        self.assertEqual((permit.mailbox, permit.epoch), (self.owner.address, 2))
        self.assertRaises(ClientError, check_permit_token, token, self.owner.address)
        old = self.owner.permit(self.contact.address, int(time.time()) - 1)
        self.assertRaises(ClientError, check_permit_token, old, self.contact.address)
        altered = token[:-3] + ("A" if token[-3] != "A" else "B") + token[-2:]
        self.assertRaises(ClientError, check_permit_token, altered, self.contact.address)

    def test_first_contact_attaches_what_the_policy_asks(self) -> None:
        """A permit is attached as is; a stamps policy gets a stamp with enough work; contacts-only refuses."""
        token = self.owner.permit(self.contact.address, int(time.time()) + 3600)
        with_permit = first_contact(self.env, P.parse_permit_token(token), None)
        self.assertEqual(with_permit["permit"]["sender"], self.contact.address)
        self.assertEqual(first_contact(self.env, None, None), self.env)
        seen: list[tuple[int, int]] = []
        stamped = first_contact(self.env, None, {"mode": "stamps", "difficulty": 10}, lambda t, d: seen.append((t, d)))
        self.assertGreaterEqual(P.stamp_work(self.env["msg_id"], E.b64u_decode(stamped["stamp"])), 10)
        self.assertEqual({k: v for k, v in stamped.items() if k != "stamp"}, self.env)
        self.assertRaises(ClientError, first_contact, self.env, None, {"mode": "contacts", "difficulty": 0})


class PermitCommandTests(SynchronousTestCase):
    def _cli(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = cli.main([*argv])
        return code, out.getvalue(), err.getvalue()

    def test_issue_then_add_then_list(self) -> None:
        """permit issue prints a token the contact keeps with permit add; list shows it; a wrong one fails."""
        d = tempfile.mkdtemp()
        owner_key, contact_key = os.path.join(d, "owner.key"), os.path.join(d, "contact.key")
        Identity(b"\x01" * 32).save(owner_key)
        contact = Identity(b"\x02" * 32)
        contact.save(contact_key)
        code, out, _ = self._cli("permit", "issue", "--key", owner_key, "--for", contact.address, "--epoch", "0")
        self.assertEqual(code, 0)
        token = out.strip()
        self.assertTrue(token.startswith(P.TOKEN_PREFIX))
        self.assertEqual(self._cli("permit", "add", token, "--key", contact_key)[0], 0)
        with open(os.path.join(d, "permits.json"), encoding="utf-8") as fh:
            self.assertEqual(json.load(fh), {Identity(b"\x01" * 32).address: token})
        code, out, _ = self._cli("permit", "list", "--key", contact_key)
        self.assertIn(Identity(b"\x01" * 32).address, out)
        code, _, err = self._cli("permit", "add", token, "--key", owner_key)
        self.assertEqual(code, 1)
        self.assertIn("not for this key", err)
