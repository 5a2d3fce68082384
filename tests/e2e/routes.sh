#!/usr/bin/env bash
# Subnet routers, end to end: a router device in front of a lab LAN (a namespace behind it)
# with a database host that runs no agent. The router advertises 10.20.5.0/24; nothing is
# routed until `device routes --approve`; then alice reaches the host's tcp/5432 through the
# router, while a denied port and a denied device (bob) are refused at the router and show
# as denied flows; revoking the approval cuts the route (measured, budget 2 s) and removes
# alice's kernel route (before/after `ip route` + `ip rule` compared).
# Exit nodes: an exit device with a lab "internet" host (203.0.113.10, no agent, no route
# back but to the exit node) behind it; carol, behind a NAT router that cannot reach that
# host, chooses the exit node and reaches the host (TCP, ping) through it, seen from the
# exit node's address (SNAT); Ward's own traffic stays on the underlay and a policy change
# still reaches carol; the internet host's IPv6 address (2001:db8:113::10) is reached the
# same way (TCP and ping -6, masqueraded to the exit node's IPv6 address). A relay (r1) on the
# wan: carol's marked traffic to it stays on the underlay, and with UDP between carol's NAT
# and the exit node dropped, carol's path to the exit node moves to the relay and her internet
# traffic keeps flowing through it. `ward status` (text and --json) names the exit node in
# use, and says "unavailable ... blocked (fail closed)" when it is not. Taking carol's grant
# away (or bob, never granted) leaves internet traffic in the tunnel, dropped, never leaked;
# leaving the exit node, and kill -9 + restart + `ward down`, restore `ip rule`, `ip route show
# table all`, the nftables tables and src_valid_mark byte for byte. The exit node's daemon
# killed with kill -9 leaves its forwarding table (inet ward_routes) behind: the next start
# removes it (and puts the forwarding sysctls back) before installing it once anew, and its
# `ward down` leaves ip_forward as it was before Ward.
# Needs root; prints `N passed, N failed`.
set -uo pipefail
source "$(dirname "$0")/common.sh"
need_root
lab_have_ward && lab_have_relay || { echo "build first: cargo build --release --workspace --bins"; exit 1; }
T0=$(date +%s%N)

lab_init
lab_add_wan_host router
lab_add_wan_host alice
lab_add_wan_host bob
lab_add_wan_host exit
lab_add_natted_host carol
lab_add_wan_host relay
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
# The "internet" behind the exit node: 203.0.113.10, with no default route (it answers only
# what comes from 203.0.113.0/24, i.e. what the exit node masqueraded).
INET_NS="${LAB_PREFIX}-inet"
_lab_new_ns "$INET_NS"
: >"$LAB_DIR/hosts/inet"
_lab_set inet ns "$INET_NS"
_lab_set inet kind lan
_lab_set inet ip 203.0.113.10
ip link add name eth1 netns "$(lab_ns exit)" type veth peer name eth0 netns "$INET_NS"
ip -n "$(lab_ns exit)" addr add 203.0.113.1/24 dev eth1
ip -n "$(lab_ns exit)" link set eth1 up
ip -n "$INET_NS" addr add 203.0.113.10/24 dev eth0
ip -n "$INET_NS" link set eth0 up
ip -n "$INET_NS" link set lo up
INET=203.0.113.10
# ... and its IPv6 side: 2001:db8:113::10, on-link to the exit node only.
ip -n "$(lab_ns exit)" addr add 2001:db8:113::1/64 dev eth1 nodad
ip -n "$INET_NS" addr add 2001:db8:113::10/64 dev eth0 nodad
INET6=2001:db8:113::10

WIN="WARD_FLOW_WINDOW=2s"
lab_start_coordinator
RELAY_ADDR=$(lab_start_relay relay r1)
RELAY_IP=${RELAY_ADDR%:*}
lab_relay_wait_welcomed relay 15
fwd_state() { lab_exec "$1" cat /proc/sys/net/ipv4/ip_forward /proc/sys/net/ipv6/conf/all/forwarding; }
EXIT_FWD_BEFORE="$(fwd_state exit)"
for h in router alice bob exit carol; do LAB_WARD_WRAPPER="env $WIN" lab_start_device "$h"; done
for u in alice bob carol; do lab_coord user add "$u" >/dev/null 2>&1; done
check "the routed policy checks (its tests pass)" lab_coord policy check "$E2E_DIR/policies/routes.toml"
lab_coord policy apply "$E2E_DIR/policies/routes.toml" >/dev/null
printf '%s\n' "$(lab_token --tag router --hostname router)" |
    lab_ward router up --token - --hostname router --advertise-routes 10.20.5.0/24 >/dev/null
lab_device_up alice "$(lab_token --user alice)" >/dev/null
lab_device_up bob "$(lab_token --user bob)" >/dev/null
printf '%s\n' "$(lab_token --tag exit --hostname exit)" |
    lab_ward exit up --token - --hostname exit --advertise-exit-node >/dev/null
# carol's host as it is with the daemon running and the device down: what `ward down`
# after a crash must give back.
host_state() { lab_exec "$1" sh -c 'ip rule; ip -6 rule; ip route show table all; ip -6 route show table all; nft list tables; cat /proc/sys/net/ipv4/conf/all/src_valid_mark'; }
CAROL_DOWN="$(host_state carol)"
lab_device_up carol "$(lab_token --user carol)" >/dev/null
lab_spawn inet inet-80.log sh -c "while true; do echo hi | nc -n -v -l -p 80 -q 1; done"
lab_spawn inet inet6-80.log sh -c "while true; do echo hi | nc -6 -n -v -l -s $INET6 -p 80 -q 1; done"
for port in 5432 22; do
    lab_spawn lan "listen-$port.log" sh -c "while true; do echo hi | nc -l -p $port -q 1; done"
done
tcp_ok() { lab_exec "$1" timeout 2 nc -z -w 1 "$2" "$3" >/dev/null 2>&1; }
fails() { ! "$@"; }
routes_json() { lab_coord device routes router --json; }
route_field() { routes_json | python3 -c 'import json,sys; r=[x for x in json.load(sys.stdin)["routes"] if x["prefix"]==sys.argv[1]]; print(r[0][sys.argv[2]] if r else None)' "$1" "$2"; }
connected() { test "$(lab_ward_json_get "$1" 's["state"]')" = connected; }
# exit_json HOST EXPR: EXPR over HOST's `ward status --json` exit_node object (x).
exit_json() { lab_ward_json_get "$1" "(lambda x: $2)(s.get('exit_node') or {})"; }
status_text() { lab_ward "$1" status 2>&1; }
for h in router alice bob exit carol; do lab_wait_for -t 15 connected "$h"; done

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
explain() { grep -q 'allowed via router router (10.20.5.10/32) by rule "alice-db"' <<<"$(lab_coord policy explain alice 10.20.5.10:5432)"; }
check "policy explain names the router and the rule" explain
explain_deny() { grep -q 'no rule opens tcp/22' <<<"$(lab_coord policy explain alice 10.20.5.10:22)"; }
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


say "exit node: carol's internet traffic goes through the exit node"
EXIT_POLICY="$E2E_DIR/policies/routes.toml"
NO_GRANT="$LAB_DIR/routes-no-carol.toml"
sed '/^# carol-internet-begin/,/^# carol-internet-end/d' "$EXIT_POLICY" >"$NO_GRANT"
ping_ok() { lab_exec "$1" ping -c1 -W1 "$2" >/dev/null 2>&1; }
check "carol cannot reach the internet host without an exit node" fails tcp_ok carol "$INET" 80
CAROL_UP="$(host_state carol)"
check "device routes --approve exit" lab_coord device routes exit --approve exit
exit_active() { test "$(lab_coord device routes exit --json | python3 -c 'import json,sys; print(any(x["prefix"]=="0.0.0.0/0" and x["active"] for x in json.load(sys.stdin)["routes"]))')" = True; }
check "... the exit node's default route is active" lab_wait_for -t 10 exit_active
lab_ward carol up --exit-node exit >/dev/null
check "carol reaches $INET:80 (TCP) through the exit node" lab_wait_for -t 15 tcp_ok carol "$INET" 80
check "carol pings $INET through the exit node" ping_ok carol "$INET"
tcp6_ok() { lab_exec "$1" timeout 2 nc -6 -z -w 1 "$2" "$3" >/dev/null 2>&1; }
check "carol reaches [$INET6]:80 (TCP over IPv6) through the exit node" lab_wait_for -t 10 tcp6_ok carol "$INET6" 80
check "carol pings $INET6 (ping -6) through the exit node" lab_exec carol ping -6 -c1 -W2 "$INET6"
snat6() { grep -q "Connection received on 2001:db8:113::1 " "$LAB_DIR/logs/inet6-80.log"; }
check "the IPv6 internet host sees the exit node's IPv6 address (masquerade v6)" lab_wait_for -t 5 snat6
check "carol's IPv6 route to $INET6 goes into the tunnel" grep -q "dev ward0" <<<"$(lab_exec carol ip -6 route get "$INET6")"
in_use() { test "$(exit_json carol "x.get('name') == 'exit' and x.get('allowed') and x.get('reachable')")" = True; }
check "ward status --json: exit node exit, allowed and reachable" lab_wait_for -t 10 in_use
via_direct() { grep -q "^exit node: *exit node exit: internet traffic goes through it (direct " <<<"$(status_text carol)"; }
check "ward status: 'exit node: exit node exit: internet traffic goes through it (direct ...)'" lab_wait_for -t 10 via_direct
via_direct || { echo "status of carol:"; status_text carol | sed "s/^/    /"; }
snat() { grep -q "Connection received on 203.0.113.1 " "$LAB_DIR/logs/inet-80.log"; }
check "the internet host sees the exit node's address (SNAT)" lab_wait_for -t 5 snat
check "carol's route to $INET goes into the tunnel" grep -q "dev ward0" <<<"$(lab_exec carol ip route get "$INET")"
COORD=$(lab_ip wan)
marked_underlay() { local r; r=$(lab_exec carol ip route get "$COORD" mark 0x5741); grep -q "dev eth0" <<<"$r" && ! grep -q ward0 <<<"$r"; }
check "Ward's marked traffic to the coordinator stays on the underlay (ip route get $COORD mark 0x5741)" marked_underlay
CAROL_GW=$(lab_exec carol ip route show default | awk '{print $3; exit}')
lan_direct() { grep -q "dev eth0" <<<"$(lab_exec carol ip route get "$CAROL_GW")"; }
check "carol's LAN stays outside the tunnel (her NAT router's address)" lan_direct
marked_relay_underlay() { local r; r=$(lab_exec carol ip route get "$RELAY_IP" mark 0x5741); grep -q "dev eth0" <<<"$r" && ! grep -q ward0 <<<"$r"; }
check "Ward's marked traffic to the relay stays on the underlay (ip route get $RELAY_IP mark 0x5741)" marked_relay_underlay
check "... while unmarked traffic to the relay would go into the tunnel" grep -q "dev ward0" <<<"$(lab_exec carol ip route get "$RELAY_IP")"
relay_link_up() { test "$(lab_ward_json_get carol "'r1' in s['relay_transports']")" = True; }
check "carol's relay link to r1 is up with the exit node on" lab_wait_for -t 15 relay_link_up
check "ip rule has the exit node's rules" grep -q "not from all fwmark 0x5741 lookup 22337" <<<"$(lab_exec carol ip rule)"
check "replies to Ward's own connections keep the mark (nft table inet ward_exit)" lab_exec carol nft list table inet ward_exit
explain_exit() { lab_coord policy explain carol "$INET:80" >"$LAB_DIR/logs/explain-carol.log" 2>&1; grep -q 'allowed via router exit (0.0.0.0/0) by rule "carol-internet"' "$LAB_DIR/logs/explain-carol.log"; }
check "policy explain names the exit node and the rule" lab_wait_for -t 5 explain_exit
explain_exit >/dev/null 2>&1 || sed 's/^/    /' "$LAB_DIR/logs/explain-carol.log"
exit_flow() { lab_coord flows --from carol --json | python3 -c 'import json,sys; f=json.load(sys.stdin)["flows"]; sys.exit(0 if any(x["port"]==80 and x.get("verdict")=="allowed" for x in f) else 1)'; }
check "carol's flow to the internet host shows in the flow log" lab_wait_for -t 20 exit_flow

say "exit node over a relay: UDP between carol's NAT and the exit node dropped"
EXIT_WAN=$(lab_ip exit)
lab_exec carol-nat nft -f - <<NFT
table ip wardblock {
    chain forward {
        type filter hook forward priority -10; policy accept;
        ip daddr $EXIT_WAN udp dport 51820 drop
        ip saddr $EXIT_WAN udp sport 51820 drop
    }
}
NFT
path_kind() { lab_ward_json_get "$1" "[p['path']['kind'] for p in s['peers'] if p['hostname']=='$2'][0]"; }
relayed() { test "$(path_kind "$1" "$2" 2>/dev/null)" = relay; }
# Path selection notices a dead direct path by traffic that goes unanswered: keep some flowing.
relayed_busy() { lab_exec carol ping -c1 -W0.3 "$INET" >/dev/null 2>&1; relayed carol exit; }
check "carol's path to the exit node moves to the relay" lab_wait_for -t 20 -i 0.2 relayed_busy
check "carol reaches $INET:80 through the exit node over the relay" lab_wait_for -t 10 tcp_ok carol "$INET" 80
check "carol pings $INET6 through the exit node over the relay" lab_exec carol ping -6 -c1 -W2 "$INET6"
check "ward status: the exit node is in use over relay r1" \
    grep -q "^exit node: *exit node exit: internet traffic goes through it (relay r1)" <<<"$(status_text carol)"
RELAYED=$(lab_relay_metric relay ward_relay_relayed_bytes_total)
check "the relay forwarded the exit node's traffic ($RELAYED bytes)" test "${RELAYED:-0}" -gt 0
lab_exec carol-nat nft delete table ip wardblock

say "exit node: grant taken away, then given back (policy changes reach carol meanwhile)"
EXIT_IP=$(lab_ward_ipv4 exit)
lab_coord policy apply "$NO_GRANT" >/dev/null
no_exit_peer() { ! lab_ward_has_peer carol "$EXIT_IP"; }
check "the policy change reaches carol while she uses the exit node" lab_wait_for -t 10 no_exit_peer
check "carol cannot reach $INET without the grant" fails tcp_ok carol "$INET" 80
check "... her internet traffic still goes into the tunnel (fail closed, no leak)" grep -q "dev ward0" <<<"$(lab_exec carol ip route get "$INET")"
not_allowed() { test "$(exit_json carol "x.get('allowed')")" = False; }
check "ward status --json: the exit node is not allowed" not_allowed
check "ward status: 'exit node exit unavailable ...: internet traffic is blocked (fail closed)'" \
    grep -Eq "^exit node: *exit node exit unavailable .*internet traffic is blocked \(fail closed\)" <<<"$(status_text carol)"
lab_coord policy apply "$EXIT_POLICY" >/dev/null
check "the grant given back reaches carol: she reaches $INET again" lab_wait_for -t 15 tcp_ok carol "$INET" 80
lab_ward bob up --exit-node exit >/dev/null
bob_diverted() { grep -q "dev ward0" <<<"$(lab_exec bob ip route get "$INET")"; }
check "bob (no grant) choosing the exit node: his internet traffic goes into the tunnel" lab_wait_for -t 10 bob_diverted
check "... and bob cannot reach $INET" fails tcp_ok bob "$INET" 80
explain_bob_denied() { local out; out=$(lab_coord policy explain bob "$INET:80"); grep -qi "denied" <<<"$out" && ! grep -q "allowed via" <<<"$out"; }
check "policy explain says bob may not use the exit node" explain_bob_denied
lab_ward bob up >/dev/null

say "exit node off: carol's routing is restored byte for byte"
lab_ward carol up >/dev/null
check "ward status --json has no exit node once none is chosen" test "$(lab_ward_json_get carol "'exit_node' in s")" = False
# same_state HOST WANT: HOST's routing state is WANT (else the difference goes to a log).
same_state() {
    local now
    # A session restart makes a new TUN, and the kernel draws a new link-local address for
    # it; eth0's appears once duplicate address detection ends, which can be after the first
    # snapshot. Those local-table lines are the kernel's, not Ward's routing: left out.
    local ll='^local fe80::[0-9a-f:]+ dev [a-z0-9]+ table local '
    now=$(host_state "$1" | grep -vE "$ll")
    set -- "$1" "$(grep -vE "$ll" <<<"$2")"
    [[ "$now" == "$2" ]] && return 0
    diff <(printf '%s\n' "$2") <(printf '%s\n' "$now") >"$LAB_DIR/logs/state-diff-$1.log"
    return 1
}
carol_up_restored() { same_state carol "$CAROL_UP"; }
check "ward up without --exit-node restores ip rule, ip route show table all, nft tables, src_valid_mark" lab_wait_for -t 10 carol_up_restored
check "no record of exit-node routes left in the state dir" test ! -e "$LAB_DIR/dev-carol/state/exit-routes.json"

say "exit node: kill -9 with the exit node on, restart, ward down: restored"
lab_ward carol up --exit-node exit >/dev/null
check "carol reaches $INET through the exit node again" lab_wait_for -t 15 tcp_ok carol "$INET" 80

# kill_daemon HOST: kill -9 the ward daemon this lab runs in HOST.
kill_daemon() {
    local p pid=""
    for p in $(lab_pids "$1"); do
        if tr '\0' ' ' <"/proc/$p/cmdline" | grep -q "ward.*daemon"; then pid=$p; fi
    done
    [[ -n "$pid" ]] || return 1
    { kill -9 "$pid"; wait "$pid"; } 2>/dev/null
    return 0
}
say "the exit node's daemon killed with kill -9: its forwarding table is cleaned at the next start"
fwd_tables() { lab_exec exit nft list tables | grep -c "^table inet ward_routes$"; }
fwd_installs() { grep -c "forwarding routed prefixes" "$LAB_DIR/logs/ward-exit.log"; }
check "the exit node forwards (one inet ward_routes table)" test "$(fwd_tables)" = 1
kill_daemon exit
check "after kill -9 the exit node's inet ward_routes table is still there" test "$(fwd_tables)" = 1
check "... and so is its record in the state dir" test -e "$LAB_DIR/dev-exit/state/forwarding.json"
N0=$(fwd_installs)
LAB_WARD_WRAPPER="env $WIN" lab_start_device exit
fwd_cleaned() { grep -q "removed the forwarding rules (nftables inet ward_routes) a previous run left" "$LAB_DIR/logs/ward-exit.log"; }
check "the restarted exit node removes the table the killed run left" lab_wait_for -t 10 fwd_cleaned
check "carol reaches $INET through the restarted exit node" lab_wait_for -t 20 tcp_ok carol "$INET" 80
check "the table was installed again exactly once (one table, one install logged)" \
    test "$(fwd_tables) $(($(fwd_installs) - N0))" = "1 1"
say "carol's daemon killed with kill -9 while on the exit node"
kill_daemon carol
check "after kill -9 the exit node's rules are still there" grep -q "lookup 22337" <<<"$(lab_exec carol ip rule)"
LAB_WARD_WRAPPER="env $WIN" lab_start_device carol
leftover_log() { grep -q "removed the exit-node routes and rules a previous run left" "$LAB_DIR/logs/ward-carol.log"; }
check "the restarted daemon removes what the killed run left" lab_wait_for -t 10 leftover_log
check "... and comes back on the exit node (the choice is saved): carol reaches $INET" lab_wait_for -t 15 tcp_ok carol "$INET" 80
lab_ward carol down >/dev/null
check "ward down after the crash: ip rule, routes, nft tables, src_valid_mark as before carol first came up" same_state carol "$CAROL_DOWN"

say "the exit node leaves: forwarding off as before Ward"
lab_ward exit down >/dev/null
fwd_off() { test "$(fwd_tables)" = 0 && test "$(fwd_state exit)" = "$EXIT_FWD_BEFORE"; }
check "exit's ward down: no ward_routes table, ip_forward and IPv6 forwarding as before Ward ($(tr '\n' ' ' <<<"$EXIT_FWD_BEFORE"))" lab_wait_for -t 5 fwd_off
check "... and no forwarding record left in the state dir" test ! -e "$LAB_DIR/dev-exit/state/forwarding.json"
[[ -s "$LAB_DIR/logs/state-diff-carol.log" ]] && { echo "  carol's routing state, expected vs found:"; cat "$LAB_DIR/logs/state-diff-carol.log"; }
echo "  runtime: $((($(date +%s%N) - T0) / 1000000000)) s"
finish
