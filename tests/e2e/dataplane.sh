#!/usr/bin/env bash
# Data plane, end to end: real binaries, real TUN devices, real WireGuard over a namespace
# "internet" with NAT routers. Needs root; prints `N passed, N failed` and exits non-zero on
# any failure.
set -uo pipefail
source "$(dirname "$0")/common.sh"
need_root
lab_have_ward || { echo "build first: cargo build --release --workspace --bins"; exit 1; }
TOOLS="$E2E_DIR/tools.py"

lab_init
lab_add_wan_host db            # a server directly on the wan
lab_add_natted_host alice      # a laptop behind a home NAT (port-preserving)
lab_add_natted_host bob --symmetric   # a laptop behind a symmetric NAT
lab_add_wan_host junk          # an attacker on the wan, no Ward
lab_start_coordinator
for h in db alice bob; do lab_start_device "$h"; done
lab_coord user add alice >/dev/null
lab_coord user add bob >/dev/null
lab_device_up db "$(lab_token --tag server)" >/dev/null
lab_device_up alice "$(lab_token --user alice)" >/dev/null
lab_device_up bob "$(lab_token --user bob)" >/dev/null
lab_coord policy apply "$E2E_DIR/policies/open-lab.toml" >/dev/null
DB4=$(lab_ward_ipv4 db); DB6=$(lab_ward_json_get db 's["ipv6"]')
AL4=$(lab_ward_ipv4 alice); AL6=$(lab_ward_json_get alice 's["ipv6"]')
BO4=$(lab_ward_ipv4 bob); BO6=$(lab_ward_json_get bob 's["ipv6"]')
DBWAN=$(lab_ip db)
peer_field() { lab_ward_json_get "$1" "[p['$3'] for p in s['peers'] if p['hostname']=='$2'][0]"; }

say "ping over the overlay, IPv4 and IPv6, NAT'd devices <-> wan device"
lab_wait_for -t 15 lab_exec alice ping -c1 -W1 "$DB4"
check "alice -> db IPv4" lab_exec alice ping -c3 -i0.2 -W2 "$DB4"
check "alice -> db IPv6" lab_exec alice ping -6 -c3 -i0.2 -W2 "$DB6"
check "db -> alice IPv4 (reply path opened by alice)" lab_exec db ping -c3 -i0.2 -W2 "$AL4"
check "db -> alice IPv6" lab_exec db ping -6 -c3 -i0.2 -W2 "$AL6"
lab_wait_for -t 15 lab_exec bob ping -c1 -W1 "$DB4"
check "bob (symmetric NAT) -> db IPv4" lab_exec bob ping -c3 -i0.2 -W2 "$DB4"
check "bob -> db IPv6" lab_exec bob ping -6 -c3 -i0.2 -W2 "$DB6"
check "db -> bob IPv4 (roaming follows bob's mapped port)" lab_exec db ping -c3 -i0.2 -W2 "$BO4"
check "db -> bob IPv6" lab_exec db ping -6 -c3 -i0.2 -W2 "$BO6"

say "50 MB TCP transfers arrive intact"
head -c 50M /dev/urandom >"$LAB_DIR/blob"
WANT=$(sha256sum <"$LAB_DIR/blob" | cut -d' ' -f1)
lab_spawn db nc-db.log sh -c "nc -l -p 5001 | sha256sum > $LAB_DIR/got-db"
sleep 0.5
check "alice -> db 50 MB (IPv4) sent" lab_exec alice timeout 60 nc -N "$DB4" 5001 <"$LAB_DIR/blob"
lab_wait_for -t 10 test -s "$LAB_DIR/got-db"
check "alice -> db checksum matches" test "$(cut -d' ' -f1 "$LAB_DIR/got-db")" = "$WANT"
lab_spawn alice nc-alice.log sh -c "nc -6 -l -p 5002 | sha256sum > $LAB_DIR/got-alice"
sleep 0.5
check "db -> alice 50 MB (IPv6) sent" lab_exec db timeout 60 nc -N "$AL6" 5002 <"$LAB_DIR/blob"
lab_wait_for -t 10 test -s "$LAB_DIR/got-alice"
check "db -> alice checksum matches" test "$(cut -d' ' -f1 "$LAB_DIR/got-alice")" = "$WANT"

say "the underlay carries only WireGuard; a plaintext marker never appears on the wire"
lab_spawn wan tcpdump.log tcpdump -i br0 -U -n -s 0 -w "$LAB_DIR/wan.pcap" udp
TCPDUMP=$(lab_last_pid)
sleep 1
MARKER="WARD-PLAINTEXT-MARKER-$RANDOM$RANDOM"
lab_spawn db nc-marker.log sh -c "nc -l -p 5003 > $LAB_DIR/got-marker"
sleep 0.5
yes "$MARKER" | head -c 2000000 | lab_exec alice timeout 30 nc -N "$DB4" 5003
lab_exec alice ping -c2 -i0.2 -W2 -p "$(printf '%s' "$MARKER" | head -c 16 | od -An -tx1 | tr -d ' \n')" "$DB4" >/dev/null
sleep 1
lab_kill "$TCPDUMP"
check "marker delivered over the overlay" grep -q "$MARKER" "$LAB_DIR/got-marker"
check "capture: only WireGuard types 1-4 on udp/51820, no plaintext" python3 "$TOOLS" pcap-check "$LAB_DIR/wan.pcap" "$MARKER" 51820

say "a device sends only from its own address: spoofed sources are dropped before encryption"
BEFORE=$(lab_ward_json_get alice 's["counters"]["dropped_wrong_source"]')
lab_exec alice ip addr add 100.64.200.200/32 dev ward0
check "spoofed-source ping gets no answer" bash -c "! ip netns exec $(lab_ns alice) ping -c3 -i0.2 -W1 -I 100.64.200.200 $DB4 >/dev/null"
lab_exec alice ip addr del 100.64.200.200/32 dev ward0
AFTER=$(lab_ward_json_get alice 's["counters"]["dropped_wrong_source"]')
check "alice dropped the spoofed packets unsent (dropped_wrong_source $BEFORE -> $AFTER)" test "$AFTER" -ge $((BEFORE + 3))
check "real traffic from alice still passes" lab_exec alice ping -c2 -i0.2 -W2 "$DB4"

say "garbage: 1 000 000 junk datagrams at db's WireGuard port"
# Before the floods below, so what it measures is the junk alone, not their flow tables.
DBPID=$(lab_pids db | head -n1)
RSS0=$(python3 "$TOOLS" rss "$DBPID")
lab_spawn junk tcpdump-junk.log tcpdump -i eth0 -U -n -w "$LAB_DIR/junk.pcap" "udp and src host $DBWAN"
JDUMP=$(lab_last_pid)
lab_spawn alice ping-flood.log ping -i 0.05 -c 200 -W 1 "$DB4"
PINGPID=$(lab_last_pid)
sleep 1
check "sent 1M garbage datagrams" lab_exec junk python3 "$TOOLS" garbage "$DBWAN" 51820 1000000
while kill -0 "$PINGPID" 2>/dev/null; do sleep 0.5; done
sleep 1
lab_kill "$JDUMP"
RSS1=$(python3 "$TOOLS" rss "$DBPID")
REPLIES=$(tcpdump -r "$LAB_DIR/junk.pcap" -n 2>/dev/null | wc -l)
RECV=$(grep -oE '[0-9]+ received' "$LAB_DIR/logs/ping-flood.log" | cut -d' ' -f1)
echo "  db RSS ${RSS0} KiB -> ${RSS1} KiB; replies to junk: $REPLIES; alice's pings answered during the flood: ${RECV:-0}/200"
check "no reply to any garbage datagram" test "$REPLIES" -eq 0
check "memory stays flat (< 16 MiB growth)" test $((RSS1 - RSS0)) -lt 16384
check "real traffic kept flowing during the flood (>= 180/200)" test "${RECV:-0}" -ge 180
GARB=$(lab_ward_json_get db 's["counters"]["dropped_garbage"]')
check "db inspected and dropped the garbage it received ($GARB)" test "$GARB" -ge 500000

say "a peer flooding SYNs cannot take db's flow table from other peers or from db itself"
# 70 000 SYNs from alice (more than db's 65 536-flow table) to two ports db listens on.
lab_spawn db serve-flood.log python3 "$TOOLS" serve 5601 5602
lab_spawn bob serve-bob.log python3 "$TOOLS" serve 5603
lab_wait_for -t 5 bash -c "ip netns exec $(lab_ns db) ss -tln | grep -q ':5602 '"
lab_wait_for -t 5 bash -c "ip netns exec $(lab_ns bob) ss -tln | grep -q ':5603 '"
FLOOD_S=$(lab_exec alice python3 "$TOOLS" synflood "$AL4" "$DB4" 5601 5602 70000)
echo "  70 000 SYNs sent in ${FLOOD_S:-?} s"
check "bob still opens a new connection to db" lab_exec bob timeout 5 nc -z -w3 "$DB4" 5601
check "db still opens a new outbound connection (to bob)" lab_exec db timeout 5 nc -z -w3 "$BO4" 5603

say "a scan of 100 000 distinct flows: db's flow log keeps to its caps, memory stays bounded"
# 100 000 SYNs from alice to 50 000 ports of db (two source ports each): 100 000 distinct flows,
# 50 000 distinct flow records at db, past every cap (16 384 samples between harvests, 4 096
# records a window).
DBPID=$(lab_pids db | head -n1)
SCAN_RSS0=$(python3 "$TOOLS" rss "$DBPID"); SCAN_HWM0=$(python3 "$TOOLS" hwm "$DBPID")
SCAN_S=$(lab_exec alice python3 "$TOOLS" synflood "$AL4" "$DB4" 1 50000 100000)
flow_field() { lab_ward_json_get db "s['flow_log']['$1']"; }
scan_counted() { test "$(flow_field flow_records_dropped)" -gt 0; }
lab_wait_for -t 10 scan_counted   # harvested (once a second)
SCAN_RSS1=$(python3 "$TOOLS" rss "$DBPID"); SCAN_HWM1=$(python3 "$TOOLS" hwm "$DBPID")
echo "  100 000 SYNs sent in ${SCAN_S:-?} s; db RSS ${SCAN_RSS0} -> ${SCAN_RSS1} KiB, peak (VmHWM) ${SCAN_HWM0} -> ${SCAN_HWM1} KiB"
echo "  db flow log: $(lab_ward_json_get db 's["flow_log"]')"
check "db's flow log stays within its window cap (<= 4096 records)" test "$(flow_field window_records)" -le 4096
check "records beyond the caps are counted, not lost silently" test "$(flow_field flow_records_dropped)" -gt 0
check "db's peak memory stays bounded through the scan (< 32 MiB growth)" test $((SCAN_HWM1 - SCAN_HWM0)) -lt 32768
check "bob still opens a new connection to db after the scan" lab_exec bob timeout 5 nc -z -w3 "$DB4" 5601

say "a peer (a modified agent with bob's key, on junk) reaches db and nothing behind it"
# bob may open every port on db. With bob's WireGuard key, tools.py handshakes with db from junk
# and sends UDP through the tunnel, in order: to db's underlay address, a network behind db
# (dropped); from a source that is not bob's (dropped); to db's overlay address (delivered, so
# once it arrived the two before it were judged).
PIVOT_PORT=5399
lab_spawn db udp-log.log python3 "$TOOLS" udp-log "$PIVOT_PORT" "$LAB_DIR/pivot-got"
lab_wait_for -t 5 bash -c "ip netns exec $(lab_ns db) ss -uln | grep -q ':$PIVOT_PORT '"
WD0=$(lab_ward_json_get db 's["counters"]["dropped_wrong_destination"]')
BS0=$(lab_ward_json_get db 's["counters"]["dropped_bad_source"]')
DBKEY=$(lab_ward_json_get bob "[p['public_key'] for p in s['peers'] if p['hostname']=='db'][0]")
check "handshake with db as bob" lab_exec junk python3 "$TOOLS" wg-send "$LAB_DIR/dev-bob/state/state.json" \
    "$DBKEY" "$DBWAN" 51820 "$BO4" "$DBWAN:$PIVOT_PORT" "100.64.200.200>$DB4:$PIVOT_PORT" "$DB4:$PIVOT_PORT"
check "the packet for db's overlay address arrives" lab_wait_for -t 5 grep -qx "ward-$DB4" "$LAB_DIR/pivot-got"
check "the packet for db's underlay address does not" bash -c "! grep -q 'ward-$DBWAN' '$LAB_DIR/pivot-got'"
check "only one packet arrived (the spoofed source did not)" test "$(wc -l <"$LAB_DIR/pivot-got")" -eq 1
WD1=$(lab_ward_json_get db 's["counters"]["dropped_wrong_destination"]')
BS1=$(lab_ward_json_get db 's["counters"]["dropped_bad_source"]')
check "db counted it (dropped_wrong_destination $WD0 -> $WD1)" test "$WD1" -ge $((WD0 + 1))
check "db counted the spoofed source (dropped_bad_source $BS0 -> $BS1)" test "$BS1" -ge $((BS0 + 1))

say "two devices both behind NAT (one symmetric): status says unreachable, does not pretend"
sleep 16
PATH_AB=$(peer_field alice bob path_text)
echo "  alice sees bob: $PATH_AB"
check "alice reports bob unreachable" grep -q "unreachable" <<<"$PATH_AB"
check "alice marks bob not reachable" test "$(peer_field alice bob reachable)" = "False"
check "ping alice -> bob fails fast, no hang" bash -c "! timeout 5 ip netns exec $(lab_ns alice) ping -c2 -W1 $BO4 >/dev/null"

say "kill -9 and restart a daemon: TUN cleaned up and rebuilt, peers reconnect by themselves"
APID=$(lab_pids alice | head -n1)
for p in $(lab_pids alice); do
    if tr '\0' ' ' <"/proc/$p/cmdline" | grep -q "ward.*daemon"; then APID=$p; fi
done
kill -9 "$APID"
lab_wait_for -t 5 bash -c "! ip netns exec $(lab_ns alice) ip link show ward0"
check "alice's ward0 is gone after kill -9" bash -c "! ip netns exec $(lab_ns alice) ip link show ward0 2>/dev/null"
lab_start_device alice
check "alice's ward0 is back" lab_wait_for -t 10 lab_exec alice ip link show ward0
check "alice's routes are back" lab_wait_for -t 10 bash -c "ip netns exec $(lab_ns alice) ip route | grep -q '100.64.0.0/10 dev ward0'"
check "alice -> db works again without operator action" lab_wait_for -t 15 lab_exec alice ping -c1 -W1 "$DB4"
check "db -> alice works again" lab_wait_for -t 15 lab_exec db ping -c1 -W1 "$AL4"
# Graceful stop removes everything too.
for p in $(lab_pids alice); do
    if tr '\0' ' ' <"/proc/$p/cmdline" | grep -q "ward.*daemon"; then APID=$p; fi
done
kill -TERM "$APID"
lab_wait_for -t 5 bash -c "! kill -0 $APID 2>/dev/null"
check "SIGTERM removes ward0 and its routes" bash -c "! ip netns exec $(lab_ns alice) ip link show ward0 2>/dev/null && ! ip netns exec $(lab_ns alice) ip route | grep -q ward0"
lab_start_device alice
lab_wait_for -t 15 lab_exec alice ping -c1 -W1 "$DB4"

say "revoke a device while traffic flows: peers stop delivering its packets within 2 s"
lab_spawn alice ping-revoke.log ping -D -i 0.1 -c 80 -W 1 "$DB4"
PINGPID=$(lab_last_pid)
sleep 3
T0=$(now_ms)
lab_coord device revoke alice >/dev/null 2>&1
T1=$(now_ms)
lab_wait_for -t 5 bash -c "[[ -z \$(ip netns exec $(lab_ns db) $(lab_ward_bin ward) --socket $(lab_ward_socket db) status --json | python3 -c 'import json,sys; s=json.load(sys.stdin); print(\"x\" if any(p[\"hostname\"]==\"alice\" for p in s[\"peers\"]) else \"\")') ]]"
T2=$(now_ms)
while kill -0 "$PINGPID" 2>/dev/null; do sleep 0.5; done
LAST=$(grep -oE '^\[[0-9.]+\] [0-9]+ bytes from' "$LAB_DIR/logs/ping-revoke.log" | tail -n1 | grep -oE '[0-9]+\.[0-9]+' | head -n1)
LAST_MS=$(python3 -c "print(int(float('${LAST:-0}')*1000))")
BEFORE_REVOKE=$(grep -cE 'bytes from' "$LAB_DIR/logs/ping-revoke.log")
echo "  revoke issued at +0 ms (command took $((T1 - T0)) ms); db dropped alice from its peers at +$((T2 - T0)) ms; last reply delivered at +$((LAST_MS - T0)) ms"
check "traffic was flowing before the revoke ($BEFORE_REVOKE replies)" test "$BEFORE_REVOKE" -ge 20
check "db removed alice from its peers within 2 s" test $((T2 - T0)) -le 2000
check "no packet of alice's delivered later than 2 s after the revoke" test $((LAST_MS - T0)) -le 2000
check "alice -> db is dead now" bash -c "! ip netns exec $(lab_ns alice) ping -c2 -W1 $DB4 >/dev/null"

finish
