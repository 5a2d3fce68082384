#!/usr/bin/env bash
# Bound device names, end to end: a device that calls itself `ci-runner` with an ordinary user
# token gets nothing from `device:ci-runner` rules (and `policy explain` says why); the device
# enrolling with a `token create --hostname ci-runner` token gets the name, bound, and the
# access, while the first device is moved aside to `ci-runner-2`; `device approve` and
# `device rename` bind names, refuse a name bound elsewhere and are audited; a device moved aside
# or renamed is told its new name (`ward status`). Needs root; prints
# `N passed, N failed`.
set -uo pipefail
source "$(dirname "$0")/common.sh"
need_root
lab_have_ward || { echo "build first: cargo build --release --workspace --bins"; exit 1; }

lab_init
lab_add_wan_host db
lab_add_wan_host mallory
lab_add_wan_host srv
lab_start_coordinator
for h in db mallory srv; do lab_start_device "$h"; done
lab_coord user add mallory >/dev/null 2>&1
lab_coord policy apply "$E2E_DIR/policies/bound-names.toml" >/dev/null
lab_device_up db "$(lab_token --tag db --hostname db)" >/dev/null
lab_device_up mallory "$(lab_token --user mallory)" ci-runner >/dev/null
DB4=$(lab_ward_ipv4 db)
lab_spawn db listen.log sh -c "while true; do echo hi | nc -l -p 5432 -q 1; done"
tcp_ok() { lab_exec "$1" timeout 3 nc -z -w 2 "$2" "$3" >/dev/null 2>&1; }
fails() { ! "$@"; }
# dev_field ID FIELD: a field of `device ls --json` for device ID.
dev_field() {
    lab_coord device ls --json | python3 -c '
import json, sys
d = {x["id"]: x for x in json.load(sys.stdin)}
print(d[sys.argv[1]][sys.argv[2]])' "$1" "$2"
}
MID=$(lab_coord device ls --json | python3 -c 'import json,sys; print([x["id"] for x in json.load(sys.stdin) if x["hostname"]=="ci-runner"][0])')

say "a self-chosen name grants nothing"
check "mallory enrolled as ci-runner, name self-chosen" test "$(dev_field "$MID" name_bound)" = False
connected() { test "$(lab_ward_json_get "$1" 's["state"]')" = connected; }
lab_wait_for -t 10 connected mallory
check "mallory has no peers (its netmap is empty)" test -z "$(lab_ward_peer_ipv4s mallory)"
check "self-chosen ci-runner cannot reach db:5432" fails tcp_ok mallory "$DB4" 5432
explain_self_chosen() { grep -q 'is self-chosen; bind it with' <<<"$(lab_coord policy explain ci-runner db:5432)"; }
check "explain says the name is self-chosen" explain_self_chosen

say "a token-bound name wins and grants"
lab_device_up srv "$(lab_token --tag ci --hostname ci-runner)" whatever >/dev/null
check "srv got the bound name ci-runner" test "$(lab_ward_json_get srv 's["hostname"]')" = ci-runner
check "mallory moved aside to ci-runner-2" test "$(dev_field "$MID" hostname)" = ci-runner-2
named() { test "$(lab_ward_json_get "$1" 's["hostname"]')" = "$2"; }
check "mallory is told its new name (ward status says ci-runner-2)" lab_wait_for -t 10 named mallory ci-runner-2
check "bound ci-runner reaches db:5432" lab_wait_for -t 10 tcp_ok srv "$DB4" 5432
check "mallory still cannot reach db:5432" fails tcp_ok mallory "$DB4" 5432

say "approve and rename"
approve_json() { grep -q '"name_bound": true' <<<"$(lab_coord device approve ci-runner-2 --json)"; }
check "device approve binds, --json" approve_json
check "device rename to a name bound elsewhere refused" fails lab_coord device rename ci-runner-2 ci-runner
check "device rename binds the new name" lab_coord device rename ci-runner-2 mallory-box
check "mallory is told it was renamed (ward status says mallory-box)" lab_wait_for -t 10 named mallory mallory-box
audited() {
    lab_coord audit --json >"$LAB_DIR/audit.json" &&
        grep -q device.approve "$LAB_DIR/audit.json" && grep -q device.rename "$LAB_DIR/audit.json"
}
check "audit has device.rename and device.approve" audited
check "audit verify" lab_coord audit verify

finish
