#!/usr/bin/env bash
# A meshrelay client in plain shell: curl, OpenSSL 3 and coreutils, no meshrelay code.
#
#   docs/examples/curl_client.sh http://127.0.0.1:8080
#
# Makes a throw-away sender key and mailbox key, deposits one envelope into
# the mailbox, polls it, then acks it. The "ciphertext" here is plain bytes:
# the relay treats it as opaque, but a real client encrypts it for the
# recipient (the meshrelay command uses a libsodium sealed box).
#
# Needs OpenSSL >= 3.0 (`openssl pkeyutl -sign -rawin` for Ed25519; it
# reads the message from a file, not from a pipe).
set -euo pipefail

NODE=${1:?usage: curl_client.sh NODE_URL}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

b64u() { base64 | tr '+/' '-_' | tr -d '=\n'; }            # base64url, no padding
pub_of() { openssl pkey -in "$1" -pubout -outform DER | tail -c 32 | b64u; }
sign() {                                                   # sign KEY FORMAT ARGS... -> b64u signature
    local key=$1; shift
    printf "$@" > "$work/signed"                           # exact bytes, no trailing newline
    openssl pkeyutl -sign -inkey "$key" -rawin -in "$work/signed" | b64u
}
post() { curl -sS -H 'Content-Type: application/json' --data-binary "$2" "$NODE$1"; echo; }

openssl genpkey -algorithm ed25519 -out "$work/sender.pem"
openssl genpkey -algorithm ed25519 -out "$work/mailbox.pem"
SENDER=$(pub_of "$work/sender.pem")
MAILBOX=$(pub_of "$work/mailbox.pem")
echo "mailbox $MAILBOX"

# 1. Deposit: sign "meshrelay/envelope/v1\nMAILBOX\nSENDER\nTS\nTTL\nhex(sha256(ciphertext))".
printf 'opaque bytes: a real client encrypts here' > "$work/ct"
CT=$(b64u < "$work/ct")
CT_SHA=$(sha256sum "$work/ct" | cut -d' ' -f1)
TS=$(date +%s)
TTL=3600
ENV_FMT='meshrelay/envelope/v1\n%s\n%s\n%s\n%s\n%s'
MSG_ID=$(printf "$ENV_FMT" "$MAILBOX" "$SENDER" "$TS" "$TTL" "$CT_SHA" | sha256sum | cut -d' ' -f1)
SIG=$(sign "$work/sender.pem" "$ENV_FMT" "$MAILBOX" "$SENDER" "$TS" "$TTL" "$CT_SHA")
echo "msg_id $MSG_ID"
post /api/mesh/dm/send "{\"v\":1,\"msg_id\":\"$MSG_ID\",\"mailbox\":\"$MAILBOX\",\"sender\":\"$SENDER\",\
\"ts\":$TS,\"ttl\":$TTL,\"ciphertext\":\"$CT\",\"sig\":\"$SIG\"}"

# 2. Poll (and ack): sign "meshrelay/poll/v1\nMAILBOX\nTS\nNONCE\nACK_IDS_JOINED_BY_COMMA".
poll() {                                                   # poll ACK_CSV ACK_JSON_ARRAY
    local ts nonce sig
    ts=$(date +%s)
    nonce=$(openssl rand 16 | b64u)                        # fresh 16 random bytes per request
    sig=$(sign "$work/mailbox.pem" 'meshrelay/poll/v1\n%s\n%s\n%s\n%s' "$MAILBOX" "$ts" "$nonce" "$1")
    post /api/mesh/dm/poll "{\"mailbox\":\"$MAILBOX\",\"ts\":$ts,\"nonce\":\"$nonce\",\"ack\":$2,\"sig\":\"$sig\"}"
}
echo "poll:"
poll "" "[]"
echo "ack:"
poll "$MSG_ID" "[\"$MSG_ID\"]"
