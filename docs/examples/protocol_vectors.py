"""Compute the test vectors of docs/protocol.md with meshrelay's own code.

Run:  python docs/examples/protocol_vectors.py
Every value is deterministic (fixed seeds, fixed times, fixed nonces;
Ed25519 signatures are deterministic), and tests/test_docs.py checks that
docs/protocol.md still shows exactly these values.  Never make real keys
from fixed seeds.
"""

from __future__ import annotations

import hashlib
import json

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshrelay import envelope as E
from meshrelay import peers as P
from meshrelay.config import normalize_url


def vectors() -> dict[str, str]:
    """Every value docs/protocol.md quotes, by name."""
    out: dict[str, str] = {}
    sender_seed = bytes(range(0, 32))  # 00 01 .. 1f
    mailbox_seed = bytes(range(32, 64))  # 20 21 .. 3f
    sender = Ed25519PrivateKey.from_private_bytes(sender_seed)
    owner = Ed25519PrivateKey.from_private_bytes(mailbox_seed)
    mailbox = E.public_key_b64u(owner)
    ciphertext = b"protocol.md test vector\x00\xfe\xff"
    ts, ttl = 1800000000, 3600
    env = E.make_envelope(sender, mailbox, ciphertext, ts, ttl)
    parsed = E.parse_envelope(env, 8192)
    assert E.verify_envelope(parsed)
    out["sender_seed_hex"] = sender_seed.hex()
    out["mailbox_seed_hex"] = mailbox_seed.hex()
    out["sender"] = env["sender"]
    out["mailbox"] = mailbox
    out["ciphertext_hex"] = ciphertext.hex()
    out["ciphertext_b64u"] = env["ciphertext"]
    out["ciphertext_sha256"] = hashlib.sha256(ciphertext).hexdigest()
    out["envelope_signed"] = parsed.signed.decode("ascii")
    out["envelope_signed_hex"] = parsed.signed.hex()
    out["msg_id"] = env["msg_id"]
    out["envelope_sig"] = env["sig"]
    out["envelope_json"] = parsed.raw
    out["envelope_json_bytes"] = str(len(parsed.raw.encode("utf-8")))

    # A poll (or count) with no ack ids: the signed bytes end with "\n".
    nonce1 = bytes(range(16))  # 00 .. 0f
    poll = E.make_signed_request(owner, ts + 60, nonce1)
    out["poll_nonce"] = poll["nonce"]
    out["poll_signed"] = E.poll_signed_bytes(mailbox, ts + 60, poll["nonce"], []).decode("ascii")
    out["poll_signed_hex"] = E.poll_signed_bytes(mailbox, ts + 60, poll["nonce"], []).hex()
    out["poll_sig"] = poll["sig"]
    # A poll that acks the envelope; its signed ack is what peers receive.
    nonce2 = bytes(range(16, 32))  # 10 .. 1f
    ack = E.make_signed_request(owner, ts + 120, nonce2, [env["msg_id"]])
    auth = E.parse_signed_ack(ack)
    assert E.verify_signed(auth)
    out["ack_nonce"] = ack["nonce"]
    out["ack_signed"] = auth.signed.decode("ascii")
    out["ack_sig"] = ack["sig"]
    out["ack_json"] = E.dumps_json(auth.to_json()).decode("utf-8")
    out["ack_tombstone_expires"] = str(E.tombstone_expiry(ts + 120, 259200, 300))

    # Peer HMAC: node A (caller) pushes the envelope to node B, whose URL has a path prefix.
    secret = "correct-horse-battery-staple-1"
    caller = normalize_url("HTTP://Node-A.example:80/")
    callee = normalize_url("https://node-b.example:443/relay/")
    out["peer_secret"] = secret
    out["peer_caller_url"] = caller
    out["peer_callee_url"] = callee
    key = P.derive_key(secret, caller)
    out["peer_key_hex"] = key.hex()
    out["peer_key_reverse_hex"] = P.derive_key(secret, callee).hex()
    body = b'{"envelopes":[' + parsed.raw.encode("utf-8") + b"]}"
    target = P.url_path(callee) + "/api/mesh/dm/replicate-envelope"
    peer_ts = ts + 5
    peer_nonce = bytes(range(32, 48))  # 20 .. 2f
    headers = P.PeerSigner(caller, secret).headers("POST", target, body, peer_ts, nonce=peer_nonce)
    out["peer_body"] = body.decode("utf-8")
    out["peer_body_sha256"] = hashlib.sha256(body).hexdigest()
    out["peer_target"] = target
    out["peer_ts"] = headers[P.H_TS]
    out["peer_nonce"] = headers[P.H_NONCE]
    out["peer_mac_input"] = P.mac_input("POST", target, peer_ts, headers[P.H_NONCE], body).decode("utf-8")
    out["peer_hmac"] = headers[P.H_HMAC]
    # A changes request: GET, empty body.
    target2 = P.url_path(callee) + "/api/mesh/dm/changes?since=0&limit=500"
    h2 = P.PeerSigner(caller, secret).headers("GET", target2, b"", peer_ts, nonce=peer_nonce)
    out["peer_get_target"] = target2
    out["peer_get_mac_input"] = P.mac_input("GET", target2, peer_ts, h2[P.H_NONCE], b"").decode("utf-8")
    out["peer_get_hmac"] = h2[P.H_HMAC]
    return out


if __name__ == "__main__":
    for name, value in vectors().items():
        print(f"{name}: {json.dumps(value)}")
