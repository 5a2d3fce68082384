#!/usr/bin/env bash
# Direct paths through home NATs, end to end: a coordinator and two relays on the wan, two
# laptops each behind a plain masquerading NAT (port kept, endpoint-independent mapping). Both
# learn their public address from the relays (`ward netcheck`), publish it, and end up on a
# direct path to each other (hole punching): ping and a 20 MB TCP transfer. Then two laptops
# behind port-randomizing NATs: netcheck says the mapping varies by destination, and
# `ward status` says no direct path answered (relays will carry this later), without hanging.
# Needs root; prints `N passed, N failed` and exits non-zero on any failure.
set -uo pipefail
source "$(dirname "$0")/common.sh"
need_root
lab_have_ward && lab_have_relay ||
    { echo "build first: cargo build --release --locked --workspace --bins"; exit 1; }

lab_init
lab_add_wan_host relay1
lab_add_wan_host relay2
lab_add_natted_host alice              # plain masquerade
lab_add_natted_host bob                # plain masquerade
lab_add_natted_host carol --symmetric  # masquerade fully-random
lab_add_natted_host dave --symmetric
lab_start_coordinator
R1=$(lab_start_relay relay1 r1)
R2=$(lab_start_relay relay2 r2)

say "0. both relays join the coordinator with the credentials relay add printed"
for h in relay1 relay2; do
    check "0. $h: control session up" lab_relay_wait_welcomed "$h" 15
done
relays_online() {
    test "$(lab_coord relay ls --json | python3 -c 'import json, sys; print(sum(bool(r["online"]) for r in json.load(sys.stdin)))')" = 2
}
check "0. relay ls shows both online" lab_wait_for -t 5 relays_online
for h in alice bob carol dave; do
    lab_start_device "$h"
    lab_coord user add "$h" >/dev/null
    lab_device_up "$h" "$(lab_token --user "$h")" >/dev/null
done
cat >"$LAB_DIR/policy.toml" <<'POL'
[groups]
plain = ["alice", "bob"]
random = ["carol", "dave"]

[services.plain]
devices = ["group:plain"]
ports = ["tcp/*", "udp/*", "icmp"]

[services.random]
devices = ["group:random"]
ports = ["tcp/*", "udp/*", "icmp"]

[[rules]]
name = "plain-pair"
from = ["group:plain"]
to = ["plain"]

[[rules]]
name = "random-pair"
from = ["group:random"]
to = ["random"]
POL
lab_coord policy apply "$LAB_DIR/policy.toml" >/dev/null
AL4=$(lab_ward_ipv4 alice)
BO4=$(lab_ward_ipv4 bob)
DA4=$(lab_ward_ipv4 dave)
peer_field() { lab_ward_json_get "$1" "[p['$3'] for p in s['peers'] if p['hostname']=='$2'][0]"; }

# netcheck_done HOST: both relays answered or failed (no relay still waiting).
netcheck_done() {
    test "$(lab_netcheck_get "$1" 'len([r for r in n["relays"] if r["observed"] or r["error"]])')" = 2
}

say "1. plain NATs: each laptop learns its router's public address from two relays"
for h in alice bob; do
    lab_wait_for -t 15 netcheck_done "$h"
    want="$(lab_public_ip "$h"):51820"
    check "1. $h: netcheck udp is true" test "$(lab_netcheck_get "$h" 'n["udp"]')" = True
    check "1. $h: reflexive is its router's wan address ($want)" \
        test "$(lab_netcheck_get "$h" 'n["reflexive"]')" = "$want"
    check "1. $h: the mapping does not vary by destination" \
        test "$(lab_netcheck_get "$h" 'n["mapping_varies_by_dest"]')" = False
    check "1. $h: both relays report a latency" \
        test "$(lab_netcheck_get "$h" 'len([r for r in n["relays"] if r["latency_ms"] is not None])')" = 2
    check "1. $h: discovery counters show answers and nothing malformed" \
        test "$(lab_ward_json_get "$h" 'int(s["counters"]["discovery"]["responses_received"] >= 2 and s["counters"]["discovery"]["malformed"] == 0)')" = 1
done
lab_ward alice netcheck | sed 's/^/    /'

say "2. alice and bob reach each other directly through both NATs"
BOB_PUB="$(lab_public_ip bob):51820"
ALICE_PUB="$(lab_public_ip alice):51820"
# endpoint_is HOST PEER ADDR: HOST's session with PEER runs to ADDR.
endpoint_is() { test "$(peer_field "$1" "$2" endpoint 2>/dev/null)" = "$3"; }
t0=$(now_ms)
check "2. alice: bob's endpoint is bob's router ($BOB_PUB)" lab_wait_for -t 30 -i 0.2 endpoint_is alice bob "$BOB_PUB"
check "2. bob: alice's endpoint is alice's router ($ALICE_PUB)" lab_wait_for -t 10 -i 0.2 endpoint_is bob alice "$ALICE_PUB"
echo "  direct path seen $(($(now_ms) - t0)) ms after the netcheck checks"
check "2. alice's path to bob says direct" \
    test "$(peer_field alice bob path)" = "direct $BOB_PUB"
check "2. bob published its public address first among its candidates" \
    test "$(lab_ward_json_get alice "[p['endpoints'][0] for p in s['peers'] if p['hostname']=='bob'][0]")" = "$BOB_PUB"
check "2. alice -> bob ping" lab_exec alice ping -q -c3 -i0.2 -W2 "$BO4"
check "2. bob -> alice ping" lab_exec bob ping -q -c3 -i0.2 -W2 "$AL4"

head -c 20M /dev/urandom >"$LAB_DIR/blob"
WANT=$(sha256sum <"$LAB_DIR/blob" | cut -d' ' -f1)
lab_spawn bob nc-bob.log sh -c "nc -l -p 5001 | sha256sum > $LAB_DIR/got.tmp && mv $LAB_DIR/got.tmp $LAB_DIR/got"
lab_wait_for -t 5 sh -c "ip netns exec $(lab_ns bob) ss -ltn | grep -q ':5001 '"
t0=$(now_ms)
check "2. alice -> bob 20 MB TCP sent" lab_exec alice timeout 60 nc -N -w 10 "$BO4" 5001 <"$LAB_DIR/blob"
lab_wait_for -t 15 test -s "$LAB_DIR/got"
echo "  20 MB in $(($(now_ms) - t0)) ms"
check "2. alice -> bob checksum matches" test "$(cut -d' ' -f1 "$LAB_DIR/got" 2>/dev/null)" = "$WANT"
check "2. the transfer stayed on the direct path" endpoint_is alice bob "$BOB_PUB"

say "3. port-randomizing NATs: the mapping varies, no direct path, nothing hangs"
for h in carol dave; do
    lab_wait_for -t 15 netcheck_done "$h"
    check "3. $h: netcheck udp is true" test "$(lab_netcheck_get "$h" 'n["udp"]')" = True
    check "3. $h: the mapping varies by destination" \
        test "$(lab_netcheck_get "$h" 'n["mapping_varies_by_dest"]')" = True
    check "3. $h: the relays saw its router's wan address" \
        test "$(lab_netcheck_get "$h" 'sorted(set(a.rsplit(":", 1)[0] for a in n["reflexive"]))')" = "$(lab_public_ip "$h")"
done
lab_ward carol netcheck | sed 's/^/    /'
# unreachable_said HOST PEER: HOST's status says no direct path answered to PEER, and why.
unreachable_said() {
    local path
    path=$(peer_field "$1" "$2" path 2>/dev/null) || return 1
    [[ "$path" == "unreachable: no direct path answered"* && "$path" == *"maps by destination"* ]]
}
check "3. carol's status says no direct path answered to dave (NAT maps by destination)" \
    lab_wait_for -t 40 -i 0.5 unreachable_said carol dave
echo "    carol -> dave: $(peer_field carol dave path)"
check "3. carol -> dave ping fails fast (no hang)" sh -c "! ip netns exec $(lab_ns carol) timeout 10 ping -c1 -W2 $DA4 >/dev/null"
check "3. ward status and ward netcheck answer at once" \
    lab_exec carol timeout 5 sh -c "'$(lab_ward_bin ward)' --socket '$(lab_ward_socket carol)' status >/dev/null && '$(lab_ward_bin ward)' --socket '$(lab_ward_socket carol)' netcheck >/dev/null"

finish
