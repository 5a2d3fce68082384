#!/usr/bin/env bash
# Makes a throw-away CA and a server certificate for the test OpenID provider.
# Usage: tests/oidc/mkcert.sh DIR IP_OR_NAME [MORE_IPS_OR_NAMES...]
# Writes DIR/ca.pem (give it to the relying party, e.g. --oidc-ca-file), DIR/ca.key,
# DIR/server.pem and DIR/server.key (give them to provider.mjs --tls-cert/--tls-key).
set -euo pipefail
if (($# < 2)); then
    echo "usage: $0 DIR IP_OR_NAME [MORE...]" >&2
    exit 2
fi
dir=$1
shift
command -v openssl >/dev/null || { echo "mkcert.sh: openssl is not installed" >&2; exit 2; }
mkdir -p "$dir"
umask 077
san=""
for h in "$@"; do
    if [[ $h =~ ^[0-9.]+$ || $h == *:* ]]; then san+="IP:$h,"; else san+="DNS:$h,"; fi
done
san=${san%,}
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj "/CN=Ward test OIDC CA" -keyout "$dir/ca.key" -out "$dir/ca.pem" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$1" \
    -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' "$san" >"$dir/server.ext"
openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial \
    -days 2 -extfile "$dir/server.ext" -out "$dir/server.pem" 2>/dev/null
rm -f "$dir/server.csr" "$dir/server.ext" "$dir/ca.srl"
chmod 0644 "$dir/ca.pem" "$dir/server.pem"
