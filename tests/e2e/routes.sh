#!/usr/bin/env bash
# Subnet routers, end to end: a router device in front of a lab LAN (a namespace behind it)
# with a database host that runs no agent. The router advertises 10.20.5.0/24; nothing is
# routed until `device routes --approve`; then alice reaches the host's tcp/5432 through the
# router, while a denied port and a denied device (bob) are refused at the router and show
# as denied flows; revoking the approval cuts the route (measured, budget 2 s) and removes
# alice's kernel route (before/after `ip route` + `ip rule` compared). Needs root; prints
# `N passed, N failed`.
set -uo pipefail
source "$(dirname "$0")/common.sh"
need_root
lab_have_ward || { echo "build first: cargo build --release --workspace --bins"; exit 1; }
T0=$(date +%s%N)

lab_init
lab_add_wan_host router
lab_add_wan_host alice
lab_add_wan_host bob
# The LAN behind the router: 10.20.5.0/24, the database at .10 (no agent).
LAN_NS="${LAB_PREFIX}-lan"
_lab_new_ns "$LAN_NS"
: >"$LAB_DIR/hosts/lan"
_lab_set lan ns "$LAN_NS"
_lab_set lan kind lan
_lab_set lan ip 10.20.5.10
ip link add name eth1 netns "$(lab_ns router)" type veth peer name eth0 netns "$LAN_NS"
ip -n "$(lab_ns router)" addr add 10.20.5.1/24 dev eth1
ip -n "$(lab_ns router)" link set eth1 up
ip -n "$LAN_NS" addr add 10.20.5.10/24 dev eth0
ip -n "$LAN_NS" link set eth0 up
ip -n "$LAN_NS" link set lo up
ip -n "$LAN_NS" route add default via 10.20.5.1

WIN="WARD_FLOW_WINDOW=2s"
lab_start_coordinator
for h in router alice bob; do LAB_WARD_WRAPPER="env $WIN" lab_start_device "$h"; done
lab_coord user add alice >/dev/null 2>&1
lab_coord user add bob >/dev/null 2>&1
check "the routed policy checks (its tests pass)" lab_coord policy check "$E2E_DIR/policies/routes.toml"
lab_coord policy apply "$E2E_DIR/policies/routes.toml" >/dev/null
printf '%s\n' "$(lab_token --tag router --hostname router)" |
    lab_ward router up --token - --hostname router --advertise-routes 10.20.5.0/24 >/dev/null
lab_device_up alice "$(lab_token --user alice)" >/dev/null
lab_device_up bob "$(lab_token --user bob)" >/dev/null
for port in 5432 22; do
    lab_spawn lan "listen-$port.log" sh -c "while true; do echo hi | nc -l -p $port -q 1; done"
done
tcp_ok() { lab_exec "$1" timeout 2 nc -z -w 1 "$2" "$3" >/dev/null 2>&1; }
fails() { ! "$@"; }
routes_json() { lab_coord device routes router --json; }
route_field() { routes_json | python3 -c 'import json,sys; r=[x for x in json.load(sys.stdin)["routes"] if x["prefix"]==sys.argv[1]]; print(r[0][sys.argv[2]] if r else None)' "$1" "$2"; }
connected() { test "$(lab_ward_json_get "$1" 's["state"]')" = connected; }
for h in router alice bob; do lab_wait_for -t 15 connected "$h"; done

say "advertised, not yet approved: nothing is routed"
advertised() { test "$(route_field 10.20.5.0/24 advertised)" = True; }
check "device routes lists the advertised prefix" lab_wait_for -t 10 advertised
check "... not active before approval" test "$(route_field 10.20.5.0/24 active)" = False
check "alice cannot reach 10.20.5.10:5432 yet" fails tcp_ok alice 10.20.5.10 5432
check "an overlay-overlapping prefix is refused for approval" fails lab_coord device routes router --approve 100.64.0.0/16
ROUTES_BEFORE="$(lab_exec alice ip route; lab_exec alice ip rule)"

say "approved: alice reaches the LAN host through the router"
check "device routes --approve" lab_coord device routes router --approve 10.20.5.0/24
check "... now active" test "$(route_field 10.20.5.0/24 active)" = True
check "alice reaches 10.20.5.10:5432 through the router" lab_wait_for -t 10 tcp_ok alice 10.20.5.10 5432
check "alice has a kernel route for 10.20.5.10 into the tunnel" grep -q "10.20.5.10 dev ward0" <<<"$(lab_exec alice ip route)"
check "alice's denied port (22) is refused" fails tcp_ok alice 10.20.5.10 22
check "bob (no rule) cannot reach 10.20.5.10:5432" fails tcp_ok bob 10.20.5.10 5432
check "the LAN host cannot open a connection into the overlay" fails tcp_ok lan "$(lab_ward_ipv4 alice)" 9
explain() { lab_coord policy explain alice 10.20.5.10:5432 | grep -q 'allowed via router router (10.20.5.10/32) by rule "alice-db"'; }
check "policy explain names the router and the rule" explain
explain_deny() { lab_coord policy explain alice 10.20.5.10:22 | grep -q 'no rule opens tcp/22'; }
check "policy explain says why port 22 is denied" explain_deny
denied22() { lab_coord flows --denied --json | python3 -c 'import json,sys; f=json.load(sys.stdin)["flows"]; sys.exit(0 if any(x["port"]==22 for x in f) else 1)'; }
check "the denied port shows as a denied flow" lab_wait_for -t 20 denied22
check "the audit log records the approval" grep -q "device.routes" <<<"$(lab_coord audit)"

say "revoked: the route is cut within 2 s"
lab_spawn alice probe.log sh -c 'while true; do if timeout 0.3 nc -z -w 1 10.20.5.10 5432 2>/dev/null; then echo "ok $(date +%s%N)"; else echo "fail $(date +%s%N)"; fi; sleep 0.05; done'
PROBE=$(lab_last_pid)
sleep 1
R0=$(date +%s%N)
lab_coord device routes router --revoke 10.20.5.0/24 >/dev/null
cut() { awk -v r0="$R0" '$1=="fail" && $2 > r0 {f=1} END {exit !f}' "$LAB_DIR/logs/probe.log"; }
lab_wait_for -t 5 cut
# The first failed probe that started after the revocation was sent.
R1=$(awk -v r0="$R0" '$1=="fail" && $2 > r0 {print $2; exit}' "$LAB_DIR/logs/probe.log")
lab_kill "$PROBE" 2>/dev/null || kill "$PROBE" 2>/dev/null
CUT_MS=$(((R1 - R0) / 1000000))
echo "  revocation → route cut: ${CUT_MS} ms"
check "revoking cuts the route within 2 s" test "$CUT_MS" -le 2000
check "alice cannot reach 10.20.5.10:5432 after revocation" fails tcp_ok alice 10.20.5.10 5432
restored() { test "$(lab_exec alice ip route; lab_exec alice ip rule)" = "$ROUTES_BEFORE"; }
check "alice's routing table is restored (ip route + ip rule as before approval)" lab_wait_for -t 5 restored
nft_gone() { ! lab_exec router nft list table inet ward_routes >/dev/null 2>&1; }
check "the router stopped forwarding (its nftables table is gone)" nft_gone

echo "  runtime: $((($(date +%s%N) - T0) / 1000000000)) s"
finish
