#!/usr/bin/env bash
# One-shot setup for the one-host compose federation (the `setup` service of compose.yaml).
#
# Makes the federation's CA and TLS certificates, the Paillier keypair and the federation
# file, and sorts them into one volume per role, so that each container mounts only what
# it may hold:
#   /fed/public      ca.pem, public_key.json, federation.json         every service (ro)
#   /fed/aggregator  aggregator.pem/.key                              aggregator
#   /fed/relay-1     relay.pem/.key                                   relay-1
#   /fed/relay-2     relay.pem/.key                                   relay-2
#   /fed/clients     client-<i>.pem/.key                              clients
#   /fed/committee   private_key.json                                 committee client ONLY
#   /fed/authority   ca.key and the raw outputs                       nobody else
# The Paillier private key never reaches the aggregator or a relay; ca.key stays in the
# authority volume. Idempotent: a second run keeps the existing federation (the
# aggregator's checkpoints are tied to its key); `docker compose down -v` starts afresh.
set -euo pipefail

CLIENTS="${FEDCORE_CLIENTS:-5}"          # client-0 is the committee member
KEY_BITS="${FEDCORE_KEY_BITS:-2048}"
CONFIG="${FEDCORE_CONFIG:-/deploy/aggregator.toml}"
FED=/fed

if [ -s "$FED/public/federation.json" ] && [ -s "$FED/committee/private_key.json" ]; then
    echo "setup: federation already set up in $FED; nothing to do"
    exit 0
fi

mkdir -p "$FED"/{public,aggregator,relay-1,relay-2,clients,committee,authority}
work="$FED/authority"
rm -rf "$work/pki" "$work/keys"

# Every relay certificate carries the same SANs as the aggregator's: list every service
# name a client or relay dials.
fedcore certs --out "$work/pki" --clients "$CLIENTS" --relays 2 \
    --san aggregator --san relay-1 --san relay-2 --san localhost
fedcore keygen --out "$work/keys" --bits "$KEY_BITS"

install -m 0644 "$work/pki/ca.pem" "$work/keys/public_key.json" "$FED/public/"
fedcore federation --config "$CONFIG" --public-key "$FED/public/public_key.json" \
    --out "$FED/public/federation.json"
chmod 0644 "$FED/public/federation.json"

install -m 0644 "$work/pki/aggregator.pem" "$FED/aggregator/aggregator.pem"
install -m 0600 "$work/pki/aggregator.key" "$FED/aggregator/aggregator.key"

# `fedcore certs --relays 2` names them relay-<i>; whichever numbering it uses, the first
# goes to relay-1 and the second to relay-2 (both carry the same SANs).
mapfile -t relay_certs < <(find "$work/pki" -maxdepth 1 -name 'relay-*.pem' | sort -V)
if [ "${#relay_certs[@]}" -lt 2 ]; then
    echo "setup: expected 2 relay certificates from fedcore certs --relays 2, got ${#relay_certs[@]}" >&2
    exit 1
fi
for i in 1 2; do
    pem="${relay_certs[$((i - 1))]}"
    install -m 0644 "$pem" "$FED/relay-$i/relay.pem"
    install -m 0600 "${pem%.pem}.key" "$FED/relay-$i/relay.key"
done

for pem in "$work"/pki/client-*.pem; do
    install -m 0644 "$pem" "$FED/clients/"
    install -m 0600 "${pem%.pem}.key" "$FED/clients/"
done

install -m 0600 "$work/keys/private_key.json" "$FED/committee/private_key.json"

# The services run as the image's user (uid 10001); the authority volume stays root's.
chown -R 10001:10001 "$FED"/{public,aggregator,relay-1,relay-2,clients,committee}
chmod 0700 "$work"
echo "setup: federation ready (public key SHA-256 in the line above)"
