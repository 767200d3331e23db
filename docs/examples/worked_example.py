"""The worked signing example of docs/client.md, computed from fixed inputs.

Run ``python docs/examples/worked_example.py`` to print every value the doc
shows; ``tests/test_docs.py`` recomputes them and checks that the doc still
contains each one, so the doc cannot drift from the code.

The keys are derived from fixed phrases (sha256 of the phrase is the
Ed25519 seed) so that anyone can reproduce them; never derive real keys
this way.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshrelay import envelope as E

SENDER_PHRASE = b"meshrelay docs alice"
MAILBOX_PHRASE = b"meshrelay docs bob"
CIPHERTEXT = b"example ciphertext: a real client sends a sealed box here"
TS = 1795000000
TTL = 86400
POLL_TS = 1795000100
NONCE = bytes(range(16))


def example() -> dict[str, Any]:
    sender_seed = hashlib.sha256(SENDER_PHRASE).digest()
    mailbox_seed = hashlib.sha256(MAILBOX_PHRASE).digest()
    sender = Ed25519PrivateKey.from_private_bytes(sender_seed)
    mailbox = Ed25519PrivateKey.from_private_bytes(mailbox_seed)
    mailbox_b64 = E.public_key_b64u(mailbox)
    env = E.make_envelope(sender, mailbox_b64, CIPHERTEXT, TS, TTL)
    env_signed = E.envelope_signed_bytes(mailbox_b64, env["sender"], TS, TTL, CIPHERTEXT)
    poll = E.make_signed_request(mailbox, POLL_TS, NONCE, [env["msg_id"]])
    poll_signed = E.poll_signed_bytes(mailbox_b64, POLL_TS, poll["nonce"], poll["ack"])
    return {
        "sender_seed_hex": sender_seed.hex(),
        "mailbox_seed_hex": mailbox_seed.hex(),
        "sender": env["sender"],
        "mailbox": mailbox_b64,
        "ciphertext_b64u": env["ciphertext"],
        "ciphertext_sha256": hashlib.sha256(CIPHERTEXT).hexdigest(),
        "envelope_signed": env_signed.decode("ascii"),
        "msg_id": env["msg_id"],
        "envelope_sig": env["sig"],
        "envelope_json": json.dumps(env, indent=2),
        "nonce_b64u": poll["nonce"],
        "poll_signed": poll_signed.decode("ascii"),
        "poll_sig": poll["sig"],
        "poll_json": json.dumps(poll, indent=2),
    }


def main() -> None:
    for key, value in example().items():
        print(f"--- {key}\n{value}")


if __name__ == "__main__":
    main()
