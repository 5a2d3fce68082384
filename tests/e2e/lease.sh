#!/usr/bin/env bash
# Leases, end to end: short-lived leases, continuous rotation under live traffic, expiry
# enforced at the peers with the coordinator dead, clock skew. Needs root; prints
# `N passed, N failed`.
set -uo pipefail
source "$(dirname "$0")/common.sh"
need_root
lab_have_ward || { echo "build first: cargo build --release --workspace --bins"; exit 1; }
command -v iperf3 >/dev/null || { echo "iperf3 missing"; exit 1; }
ROT_SECS="${ROT_SECS:-120}"

lab_init
lab_add_wan_host db
lab_add_natted_host alice
lab_add_natted_host skewed
lab_add_natted_host behind
LAB_COORD_SERVE_ARGS="--lease-ttl 20s" lab_start_coordinator
lab_start_device db
lab_start_device alice
LAB_WARD_WRAPPER="faketime -f +10m" lab_start_device skewed
LAB_WARD_WRAPPER="faketime -f -10m" lab_start_device behind
lab_coord user add alice >/dev/null 2>&1
lab_coord user add bob >/dev/null 2>&1
lab_device_up db "$(lab_token --tag server)" >/dev/null
lab_device_up alice "$(lab_token --user alice)" >/dev/null
lab_device_up skewed "$(lab_token --user bob)" >/dev/null
lab_device_up behind "$(lab_token --user bob)" >/dev/null
cat >"$LAB_DIR/policy.toml" <<'TOML'
[groups]
people = ["alice", "bob"]
[services.all]
devices = ["group:people", "tag:server"]
ports = ["tcp/*", "udp/*", "icmp"]
[[rules]]
name = "open"
from = ["group:people", "tag:server"]
to = ["all"]
TOML
lab_coord policy apply "$LAB_DIR/policy.toml" >/dev/null
DB4=$(lab_ward_ipv4 db); AL4=$(lab_ward_ipv4 alice); SK4=$(lab_ward_ipv4 skewed)
lab_wait_for -t 15 lab_exec alice ping -c1 -W1 "$DB4"

say "leases: peers configure only leased keys; status shows key age and lease expiry"
check "alice holds a lease (ttl 20 s)" test "$(lab_ward_json_get alice 's["lease"]["ttl_secs"]')" = 20
check "alice sees db's lease expiry" test -n "$(lab_ward_json_get alice '[p["lease_expires_in_secs"] for p in s["peers"] if p["hostname"]=="db"][0]')"
LS=$(lab_coord device ls --json)
check "device ls has lease_expires_ms for alice" python3 -c "import json,sys; d=[x for x in json.loads(sys.argv[1]) if x['hostname']=='alice'][0]; assert d['lease_expires_ms']" "$LS"

say "clock skew: a device 10 minutes ahead still gets and honours leases"
OFF=$(lab_ward_json_get skewed 's["clock_offset_ms"]')
echo "  skewed device's measured offset: ${OFF} ms"
check "offset is about -10 min" python3 -c "import sys; o=int(sys.argv[1]); assert -610000 < o < -590000, o" "${OFF:-0}"
check "skewed device holds a lease" test -n "$(lab_ward_json_get skewed 's["lease"]["serial"]')"
check "skewed <-> db traffic flows" lab_wait_for -t 15 lab_exec skewed ping -c1 -W1 "$DB4"
check "db -> skewed traffic flows" lab_wait_for -t 15 lab_exec db ping -c1 -W1 "$SK4"
OFF2=$(lab_ward_json_get behind 's["clock_offset_ms"]')
echo "  device 10 minutes behind: measured offset ${OFF2} ms"
check "offset is about +10 min" python3 -c "import sys; o=int(sys.argv[1]); assert 590000 < o < 610000, o" "${OFF2:-0}"
BH4=$(lab_ward_ipv4 behind)
check "behind -> db" lab_wait_for -t 15 lab_exec behind ping -c1 -W1 "$DB4"
check "db -> behind" lab_wait_for -t 15 lab_exec db ping -c1 -W1 "$BH4"
check "skewed <-> behind (20 minutes apart) traffic flows" lab_wait_for -t 15 lab_exec skewed ping -c1 -W1 "$BH4"

say "rotation every ~10 s under live traffic for ${ROT_SECS} s: TCP and 1000 pps UDP"
lab_spawn db iperf-tcp-server.log iperf3 -s -p 5201
lab_spawn db iperf-udp-server.log iperf3 -s -p 5202
sleep 1
K0_SELF=$(lab_ward_json_get alice 's["key"]')
counters() { lab_ward_json_get "$1" '"%d %d %d" % (s["counters"]["tx_packets"], s["counters"]["rx_packets"], s["counters"]["dropped_no_route"])'; }
read -r A_TX0 A_RX0 A_NR0 <<<"$(counters alice)"
read -r D_TX0 D_RX0 D_NR0 <<<"$(counters db)"
lab_spawn alice iperf-tcp.log iperf3 -c "$DB4" -p 5201 -t "$ROT_SECS" -J -b 200M
TCPPID=$(lab_last_pid)
lab_spawn alice iperf-udp.log iperf3 -c "$DB4" -p 5202 -u -b 8M -l 1000 -t "$ROT_SECS" -J
UDPPID=$(lab_last_pid)
: >"$LAB_DIR/keys"
END=$((SECONDS + ROT_SECS + 2))
while ((SECONDS < END)); do
    { lab_ward_json_get alice 's["key"]'; lab_ward_json_get alice '[p["public_key"] for p in s["peers"] if p["hostname"]=="db"][0]'; } | tr '\n' ' ' >>"$LAB_DIR/keys"
    echo >>"$LAB_DIR/keys"
    sleep 1
done
while kill -0 "$TCPPID" 2>/dev/null || kill -0 "$UDPPID" 2>/dev/null; do sleep 0.5; done
sleep 1
read -r A_TX1 A_RX1 A_NR1 <<<"$(counters alice)"
read -r D_TX1 D_RX1 D_NR1 <<<"$(counters db)"
SELF_KEYS=$(awk '{print $1}' "$LAB_DIR/keys" | sort -u | grep -c .)
DB_KEYS=$(awk '{print $2}' "$LAB_DIR/keys" | sort -u | grep -c .)
TCP=$(python3 -c '
import json,sys
j=json.load(open(sys.argv[1]))
if "error" in j: print("ERROR", j["error"]); sys.exit()
e=j["end"]; print("%.2f Gbit/s, %d retransmits" % (e["sum_received"]["bits_per_second"]/1e9, e["sum_sent"].get("retransmits",0)))
' "$LAB_DIR/logs/iperf-tcp.log")
UDP=$(python3 -c '
import json,sys
j=json.load(open(sys.argv[1]))
if "error" in j: print("ERROR", j["error"]); sys.exit()
s=j["end"]["sum"]; print("%d/%d lost %.3f%%" % (s["lost_packets"], s["packets"], s["lost_percent"]))
' "$LAB_DIR/logs/iperf-udp.log")
ROTS=$(lab_ward_json_get alice 's["rotations"]')
echo "  alice used $SELF_KEYS keys, saw db use $DB_KEYS keys; alice rotations: $ROTS"
echo "  TCP: $TCP"
echo "  UDP: $UDP"
MIN_KEYS=$((ROT_SECS / 10 - 2))
check "alice's own key changed at every rotation (>= $MIN_KEYS keys)" test "$SELF_KEYS" -ge "$MIN_KEYS"
check "db's key, as alice sees it, changed too (>= $MIN_KEYS keys)" test "$DB_KEYS" -ge "$MIN_KEYS"
check "TCP stream survived every rotation (no reset, no error)" bash -c "[[ '$TCP' != ERROR* && -n '$TCP' ]]"
echo "  tunnel: alice encrypted $((A_TX1 - A_TX0)) packets for db, db delivered $((D_RX1 - D_RX0)); db encrypted $((D_TX1 - D_TX0)), alice delivered $((A_RX1 - A_RX0)); no-route drops $((A_NR1 - A_NR0))/$((D_NR1 - D_NR0))"
for h in alice db; do
    echo "  $h ward0 kernel counters: $(lab_exec "$h" ip -s -o link show ward0 | grep -oE 'TX: .*' | tr -s ' ' | cut -c1-120)"
done
check "no packet lost in the tunnel across the rotations (alice -> db)" test $((A_TX1 - A_TX0)) -gt 10000 -a $((A_TX1 - A_TX0)) -eq $((D_RX1 - D_RX0))
check "no packet lost in the tunnel across the rotations (db -> alice)" test $((D_TX1 - D_TX0)) -gt 1000 -a $((D_TX1 - D_TX0)) -eq $((A_RX1 - A_RX0))
check "UDP loss <= 0.1 %" python3 -c "import json,sys; s=json.load(open(sys.argv[1]))['end']['sum']; assert s['lost_percent'] <= 0.1, s['lost_percent']" "$LAB_DIR/logs/iperf-udp.log"
check "audit records lease issue and revoke" bash -c "[[ \$(ip netns exec $(lab_ns wan) $(lab_ward_bin ward-coordinator) --data-dir $LAB_DIR/coordinator audit --limit 100000 --json | python3 -c 'import json,sys; a=json.load(sys.stdin); print(sum(1 for e in a if e[\"action\"]==\"lease.issue\")>5 and sum(1 for e in a if e[\"action\"]==\"lease.revoke\")>5)') == True ]]"

say "coordinator down: traffic continues until the leases end, then stops within 2 s; resumes after restart"
for p in $(lab_pids wan); do
    if tr '\0' ' ' <"/proc/$p/cmdline" | grep -q "ward-coordinator.*serve"; then CPID=$p; fi
done
LAB_COORD_SERVE_ARGS="--lease-ttl 30s"
kill -TERM "$CPID"; sleep 0.5
lab_spawn wan coordinator-30s.log "$(lab_ward_bin ward-coordinator)" serve --data-dir "$LAB_DIR/coordinator" --lease-ttl 30s
lab_wait_for -t 10 lab_coord status
# Wait until both sides hold a fresh 30 s lease, then kill the coordinator.
lab_wait_for -t 40 bash -c "[[ \$(ip netns exec $(lab_ns alice) $(lab_ward_bin ward) --socket $(lab_ward_socket alice) status --json | python3 -c 'import json,sys; s=json.load(sys.stdin); print(s[\"lease\"][\"ttl_secs\"])') == 30 ]]"
lab_wait_for -t 40 bash -c "[[ \$(ip netns exec $(lab_ns db) $(lab_ward_bin ward) --socket $(lab_ward_socket db) status --json | python3 -c 'import json,sys; s=json.load(sys.stdin); print(s[\"lease\"][\"ttl_secs\"])') == 30 ]]"
sleep 1
# The first lease to end (alice's as db sees it, or db's as alice sees it) ends the path.
A_END=$(lab_ward_json_get db '[p["lease_expires_in_secs"] for p in s["peers"] if p["hostname"]=="alice"][0]')
D_END=$(lab_ward_json_get alice '[p["lease_expires_in_secs"] for p in s["peers"] if p["hostname"]=="db"][0]')
for p in $(lab_pids wan); do
    if tr '\0' ' ' <"/proc/$p/cmdline" | grep -q "ward-coordinator.*serve"; then kill -9 "$p"; fi
done
KILLED=$(now_ms)
FIRST_END=$(( (A_END < D_END ? A_END : D_END) ))
echo "  coordinator killed; leases end in ${A_END}s (alice) and ${D_END}s (db)"
lab_spawn alice ping-down.log ping -D -i 0.1 -W 1 -w $((FIRST_END + 8)) "$DB4"
PPID2=$(lab_last_pid)
while kill -0 "$PPID2" 2>/dev/null; do sleep 0.5; done
LAST=$(grep -oE '^\[[0-9.]+\] [0-9]+ bytes from' "$LAB_DIR/logs/ping-down.log" | tail -n1 | grep -oE '[0-9]+\.[0-9]+' | head -n1)
LAST_MS=$(python3 -c "print(int(float('${LAST:-0}')*1000))")
REPLIES=$(grep -c 'bytes from' "$LAB_DIR/logs/ping-down.log")
END_MS=$((KILLED + FIRST_END * 1000))
echo "  $REPLIES replies; last reply at $(( (LAST_MS - END_MS) )) ms relative to the first lease end (±1 s: status shows whole seconds)"
check "traffic continued while the leases were valid (coordinator dead)" test "$REPLIES" -ge $(( (FIRST_END - 2) * 10 ))
check "traffic stopped within 2 s of the lease end" test $((LAST_MS - END_MS)) -le 3000
RESTART=$(now_ms)
lab_spawn wan coordinator-back.log "$(lab_ward_bin ward-coordinator)" serve --data-dir "$LAB_DIR/coordinator" --lease-ttl 30s
check "traffic resumes within 10 s of the coordinator's return" lab_wait_for -t 10 -i 0.2 lab_exec alice ping -c1 -W1 "$DB4"
echo "  resumed after $(( $(now_ms) - RESTART )) ms"

say "device rotate: an admin forces a new key"
K1=$(lab_ward_json_get alice 's["key"]')
check "device rotate accepted" lab_coord device rotate alice
check "alice's key changed within 3 s" lab_wait_for -t 3 -i 0.2 bash -c "[[ \$(ip netns exec $(lab_ns alice) $(lab_ward_bin ward) --socket $(lab_ward_socket alice) status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"key\"])') != '$K1' ]]"
check "traffic still flows after the forced rotation" lab_wait_for -t 5 lab_exec alice ping -c1 -W1 "$DB4"

finish
