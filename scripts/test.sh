#!/usr/bin/env bash
# Ward's whole test suite: formatting, lints, unit/golden/pair/property tests, whole-system
# tests on loopback, and (as root) the end-to-end tests in network namespaces.
# Usage: sudo ./scripts/test.sh     (without root the namespace tests are reported SKIPPED)
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== system packages (scripts/packages.txt)"
if [[ $EUID -eq 0 ]]; then
    ./scripts/install-deps.sh # only the missing ones; apt untouched when none is
elif ! missing=$(./scripts/install-deps.sh --check); then
    echo "missing (the tests that need them will fail): $(echo $missing); sudo ./scripts/install-deps.sh"
fi
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== dependency rules (ARCHITECTURE.md)"
./scripts/check-deps.sh
echo "== cargo clippy -D warnings"
cargo clippy --locked --workspace --all-targets -- -D warnings
echo "== building binaries (debug for system tests, release for namespace tests)"
cargo build --locked --workspace --bins
cargo build --locked --release --workspace --bins
echo "== cargo test"
# The store suite runs on SQLite and on a throw-away PostgreSQL cluster; as root (CI) the
# postgresql package is installed above, so a missing PostgreSQL fails instead of skipping.
if [[ $EUID -eq 0 ]]; then export WARD_REQUIRE_PG=1; fi
cargo test --locked --workspace
echo "== benchmarks and examples in smoke mode (a rot check, never a timed test)"
./bench/smoke.sh
echo "== end-to-end tests in network namespaces"
if [[ $EUID -ne 0 ]]; then
    echo "SKIPPED: tests/e2e/*.sh need root (network namespaces, TUN); they were NOT run"
    exit 0
fi
# The identity tests drive a real OpenID provider (tests/oidc, npm package oidc-provider).
if command -v npm >/dev/null; then
    echo "== npm ci in tests/oidc (the test OpenID provider)"
    # Not fatal here: the scripts that need the provider then fail on their own, the rest still run.
    (cd tests/oidc && npm ci --no-audit --no-fund) || echo "FAILED: npm ci in tests/oidc; the identity tests will fail"
else
    echo "NOTE: npm is not installed: tests/oidc (the test OpenID provider) was NOT installed; the identity tests that need it will fail"
fi
pass=0
failed=()
for t in tests/lab/selftest.sh tests/e2e/*.sh; do
    [[ "$t" == */common.sh ]] && continue # sourced by the others
    echo "-- $t"
    if bash "$t"; then pass=$((pass + 1)); else failed+=("$t"); fi
done
echo "end-to-end scripts: $pass passed, ${#failed[@]} failed ${failed[*]:-}"
((${#failed[@]} == 0))
