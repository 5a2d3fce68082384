#!/usr/bin/env bash
# Control-plane load regression check: 500 real device sessions (each enrolled for real, with
# its own key and certificate, mutual-TLS QUIC, the device's agent core) against one
# coordinator on loopback, through bench/load.sh --check, with a policy of 50 rules whose
# groups hold 10% of the users each. Measured on the shared 2-core machine (bench/README.md,
# "500 sessions all up"): at load average 5, all 500 up within 8 s, a policy change at every
# session p99 2.2 s, a revocation at 324 peer sessions within 1.2 s, all 499 back 37 s after
# kill -9, 55 s in all; at load average 9-16, up within 38 s, policy change p99 7.7 s, peers
# within 25 s. The bounds are about 10x the quiet figures (and above the loaded ones), so only
# a large regression (or sessions that stop coming up) fails:
#   - every device enrolls and every session gets its first netmap within 90 s;
#   - a policy change reaches every session, p99 under 30 s;
#   - a revocation and a quarantine reach the device and every peer session within 45 s;
#   - after kill -9 and a restart, every session has a new netmap within 120 s, at least half
#     of them learned of the restart from a QUIC stateless reset (the restarted coordinator
#     derives the same reset keys; otherwise a device waits out its 6 s idle timeout), and at
#     most a tenth of them get a new lease on the key they held (a fresh lease is sent again:
#     without that, every reconnect made a lease that every peer had to check), and at least
#     half of the new first netmaps are resumed: each agent said what it held, and the netmap
#     left those peers out.
# Needs no root and no namespace: loopback only (the tool binds 127.1.x.y source addresses).
set -euo pipefail
cd "$(dirname "$0")/../.."
start=$(date +%s)
pass=0
failed=0
out=$(mktemp)
trap 'rm -f "$out"' EXIT
if WARD_BIN_DIR="${WARD_BIN_DIR:-}" bench/load.sh --sessions 500 --check --json "$out.json" -- --steady 1 --revocations 1 --phase-timeout 90 --max-policy-p99-ms 30000 --max-revoke-ms 45000 --max-resync-ms 120000 --group-percent 10; then
    pass=1
    echo "  PASS 500 sessions: enrolled, policy change, revoke, quarantine and restart within bounds"
else
    failed=1
    echo "  FAIL 500 sessions: see the load check lines above"
fi
rm -f "$out.json"
echo "runtime: $(($(date +%s) - start)) s"
echo "$pass passed, $failed failed"
((failed == 0))
