#!/usr/bin/env bash
# Self-test of the test OpenID provider on loopback (no root, no namespaces): starts provider.mjs
# with a throw-away CA and drives it as a relying party (selftest.py). Prints `N passed, N failed`.
# Usage: tests/oidc/selftest.sh      (installs node_modules with `npm ci` when they are missing)
set -euo pipefail
cd "$(dirname "$0")"
for tool in node npm python3 openssl; do
    if ! command -v "$tool" >/dev/null; then
        echo "tests/oidc/selftest.sh: $tool is not installed" >&2
        echo "0 passed, 1 failed"
        exit 1
    fi
done
if ! python3 -c 'import cryptography' 2>/dev/null; then
    echo "tests/oidc/selftest.sh: python3-cryptography is not installed" >&2
    echo "0 passed, 1 failed"
    exit 1
fi
if [[ ! -d node_modules/oidc-provider ]]; then
    npm ci --no-audit --no-fund
fi
exec python3 selftest.py
