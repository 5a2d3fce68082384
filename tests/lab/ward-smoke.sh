#!/usr/bin/env bash
# Smoke test of the lab's Ward glue: a coordinator on the wan, a server on the
# wan, a laptop behind NAT; enrol both and ping across the overlay.
# Needs built binaries (${WARD_BIN_DIR:-target/release}); skips otherwise.
# Last line: "N passed, N failed".
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tests/lab/lab.sh
source "$here/lab.sh"

passed=0 failed=0
check() {
    local desc="$1"
    shift
    if "$@" >/dev/null 2>&1; then echo "PASS: $desc"; passed=$((passed + 1)); else echo "FAIL: $desc"; failed=$((failed + 1)); fi
}
finish() { echo "$passed passed, $failed failed"; [[ "$failed" == 0 ]]; }

if ! lab_have_ward; then
    echo "SKIP: $(lab_ward_bin ward) or ward-coordinator not built"
    echo "0 passed, 0 failed, 1 skipped"
    exit 0
fi

lab_init
lab_add_wan_host srv
lab_add_natted_host lap
lab_start_coordinator
check "coordinator answers device ls" lab_coord device ls --json
lab_start_device srv
lab_start_device lap
check "server enrols with a tag token" lab_enroll srv --tag server
check "laptop behind NAT enrols with a user token" lab_enroll lap --user alice
srv_ip=$(lab_ward_ipv4 srv || true)
lap_ip=$(lab_ward_ipv4 lap || true)
echo "INFO srv=$srv_ip lap=$lap_ip"
check "both devices have overlay addresses" test -n "$srv_ip" -a -n "$lap_ip"
check "laptop sees the server as a peer" lab_ward_wait_peer lap "$srv_ip"
check "laptop -> server over the overlay (ping)" lab_wait_for -t 10 lab_exec lap ping -c1 -W1 "$srv_ip"
if ((failed > 0)); then lab_dump_logs 20; fi
finish
