#!/usr/bin/env bash
# A PostgreSQL outage longer than a lease: one coordinator replica (namespace ca, 8 s leases) on a
# throw-away PostgreSQL cluster, real devices alice and bob pinging each other every 100 ms
# (timestamped). PostgreSQL is stopped (`-m immediate`) and stays down until both devices'
# leases have run out. While it is down:
#  - `ward-coordinator status` against the running replica says the database is UNREACHABLE
#    (timed);
#  - a second replica started now (`serve` on an imported data directory) exits with an error
#    naming the unreachable database, promptly (timed), and logs it;
#  - no lease is issued or renewed: the devices' rotations are refused (the replica's log), and
#    after PostgreSQL returns its leases table holds no lease written during the outage (a row
#    stamped during it was committed, by PostgreSQL's commit timestamp, before the stop took
#    effect, or after the restart by a request that waited at most the pool's 5 s wait);
#  - each device's lease runs out at the expiry it showed (`ward status --json`
#    lease.expires_in_secs, read just after the stop; the lease row's not_after_ms read before
#    the stop), and the ping stops then: its last answer is at most 2 s after the earlier of
#    the two expiries and not before it (minus one ping interval).
# After PostgreSQL restarts: both devices get new leases and the ping answers again, without
# operator action (both timed from the restart). Needs root; without PostgreSQL it prints
# SKIPPED and passes, unless WARD_REQUIRE_PG=1. Prints figures, runtime and `N passed, N failed`.
set -uo pipefail
source "$(dirname "$0")/common.sh"
need_root
lab_have_ward || { echo "build first: cargo build --release --workspace --bins"; exit 1; }
source "$E2E_DIR/../lab/pg.sh"
pg_require outage_pg.sh
T0=$SECONDS
P="$E2E_DIR/policies"
BIN=$(lab_ward_bin ward-coordinator)
TTL_S=8

lab_init
PING_PID=""
pg_lab_start || exit 1

for h in ca cb alice bob; do lab_add_wan_host "$h"; done
A=$(lab_hostport "$(lab_ip ca)" 7443)
B=$(lab_hostport "$(lab_ip cb)" 7443)
D2="$LAB_DIR/replica-b"

say "one replica on PostgreSQL, ${TTL_S} s leases, alice and bob"
LAB_COORD_PUBLIC_ADDR="$A,$B" LAB_COORD_SERVE_ARGS="--listen $A --lease-ttl ${TTL_S}s" lab_start_coordinator ca || exit 1
lab_coord export-instance "$LAB_DIR/instance.json" >"$LAB_DIR/logs/export.log" 2>&1
lab_exec cb "$BIN" --data-dir "$D2" import-instance "$LAB_DIR/instance.json" >"$LAB_DIR/logs/import.log" 2>&1
check "replica B's data directory imported" test -f "$D2/lease.key"
lab_coord policy apply "$P/ha-open.toml" >/dev/null
for h in alice bob; do lab_start_device "$h"; done
lab_device_up alice "$(lab_token --tag a)" >/dev/null
lab_device_up bob "$(lab_token --tag b)" >/dev/null
AL=$(lab_ward_json_get alice 's["device_id"]')
BO=$(lab_ward_json_get bob 's["device_id"]')
BO4=$(lab_ward_ipv4 bob)
pings() { lab_exec "$1" ping -c1 -W1 "$2" >/dev/null 2>&1; }
check "alice pings bob" lab_wait_for -t 20 pings alice "$BO4"
serial() { lab_ward_json_get "$1" 's["lease"]["serial"]'; }
# A rotation (every 4 s) shows the devices renew their leases while the database is up.
S0=$(serial alice)
renewed() { [[ "$(serial alice)" != "$S0" ]]; }
check "alice's lease is renewed while the database is up (serial $S0 -> newer)" lab_wait_for -t 10 renewed

say "PostgreSQL stopped until the leases have run out"
lab_spawn alice ping.log ping -D -i 0.1 -W 1 "$BO4"
PING_PID=$LAB_LAST_PID
lab_wait_for -t 5 grep -q "icmp_seq=5 " "$LAB_DIR/logs/ping.log"
DOWN_MS=$(now_ms)
pg_stop_fast
STOPPED_MS=$(now_ms)
# lease_view HOST: "SERIAL EXPIRES_IN_SECS" of the device's own lease, and the time of reading.
lease_view() {
    local t v
    t=$(now_ms)
    v=$(lab_ward_json_get "$1" '"%d %d" % (s["lease"]["serial"], s["lease"]["expires_in_secs"])') || return 1
    echo "$v $t"
}
read -r AS AE AT < <(lease_view alice)
read -r BS BE BT < <(lease_view bob)
echo "  after the stop: alice holds lease ${AS:-?}, expires in ${AE:-?} s; bob holds lease ${BS:-?}, expires in ${BE:-?} s"
AS=${AS:-0} AE=${AE:-0} AT=${AT:-0} BS=${BS:-0} BE=${BE:-0} BT=${BT:-0}

say "while the database is down"
# status against the running replica names the unreachable database.
t=$(now_ms)
timeout 30 ip netns exec "$(lab_ns ca)" "$BIN" --data-dir "$LAB_DIR/coordinator" status >"$LAB_DIR/logs/status-down.log" 2>&1
RC=$?
MS=$(($(now_ms) - t))
echo "  status on A: exit $RC after $MS ms: $(grep -m1 '^database' "$LAB_DIR/logs/status-down.log" || head -c 200 "$LAB_DIR/logs/status-down.log")"
check "status on A answers while the database is down (exit $RC)" test "$RC" -eq 0
check "status on A says the database is UNREACHABLE" grep -q '^database .*UNREACHABLE' "$LAB_DIR/logs/status-down.log"
check "status answered within 10 s ($MS ms)" test "$MS" -le 10000
# A replica started now: a clear error and exit.
t=$(now_ms)
timeout 60 ip netns exec "$(lab_ns cb)" "$BIN" serve --data-dir "$D2" --listen "$B" --lease-ttl "${TTL_S}s" \
    >"$LAB_DIR/logs/replica-b-down.log" 2>&1
RC=$?
MS=$(($(now_ms) - t))
echo "  serve on B while the database is down: exit $RC after $MS ms: $(grep -m1 '^error:' "$LAB_DIR/logs/replica-b-down.log" | head -c 300)"
check "serve on B exits with an error (exit $RC)" test "$RC" -ne 0 -a "$RC" -ne 124
check "within 15 s ($MS ms)" test "$MS" -le 15000
check "naming the database as unreachable" grep -q '^error: the database postgresql://.* is unreachable' "$LAB_DIR/logs/replica-b-down.log"
check "and logging it" grep -q 'ERROR.*the database is unreachable' "$LAB_DIR/logs/replica-b-down.log"
# last_answer_ms: when the ping's last answer came, epoch ms (ping -D stamps its lines; alice's
# own "Packet filtered" errors, sent once she has no peer for bob, are not answers).
last_answer_ms() {
    grep 'bytes from .*icmp_seq=' "$LAB_DIR/logs/ping.log" | tail -n1 |
        sed -n 's/^\[\([0-9]*\)\.\([0-9]\{3\}\).*/\1\2/p'
}
# The ping stops: no answer for 3 s.
stopped() { local l; l=$(last_answer_ms); [[ -n "$l" ]] && (($(now_ms) - l >= 3000)); }
STOP=""
if lab_wait_for -t $((TTL_S + 10)) -i 0.2 stopped; then
    STOP=$(last_answer_ms)
    pass "the ping stopped ($((STOP - DOWN_MS)) ms after the stop)"
else
    fail "the ping stopped after the leases expired"
fi
no_lease() {
    local e
    e=$(lab_ward_json_get "$1" '-1 if s["lease"] is None else s["lease"]["expires_in_secs"]')
    ((e <= 0))
}
check "alice shows no valid lease after its expiry" lab_wait_for -t 5 no_lease alice
check "bob shows no valid lease after its expiry" lab_wait_for -t 5 no_lease bob
check "alice still cannot reach bob" bash -c "! ip netns exec $(lab_ns alice) ping -c2 -i 0.3 -W1 $BO4 >/dev/null 2>&1"
# A renewal asked for late in the outage waits for a pooled connection (5 s) and its connect
# (5 s) before it fails: waited for, not looked for once.
refused_lease() { grep -q 'lease issue failed\|could not issue a lease' "$LAB_DIR/logs/coordinator.log"; }
check "the replica refused leases while the database was down" lab_wait_for -t 15 -i 0.2 refused_lease
OUTAGE_MS=$(($(now_ms) - DOWN_MS))
START_MS=$(now_ms)
pg_start_again || fail "PostgreSQL restarts"
UP_MS=$(now_ms)
echo "  PostgreSQL was down for $OUTAGE_MS ms"

say "after PostgreSQL returns"
leased() {
    local e
    e=$(lab_ward_json_get "$1" '-1 if s["lease"] is None else s["lease"]["expires_in_secs"]')
    ((e > 0))
}
for h in alice bob; do
    if lab_wait_for -t 30 -i 0.2 leased "$h"; then
        echo "  $h holds a new lease $(($(now_ms) - UP_MS)) ms after PostgreSQL restarted"
        pass "$h is leased again without operator action"
    else
        fail "$h is leased again without operator action"
    fi
done
answered_since() { local l; l=$(last_answer_ms); [[ -n "$l" ]] && ((l > UP_MS)); }
if lab_wait_for -t 30 -i 0.2 answered_since; then
    echo "  the ping answers again $(($(last_answer_ms) - UP_MS)) ms after PostgreSQL restarted"
    pass "traffic alice -> bob resumes without operator action"
else
    fail "traffic alice -> bob resumes without operator action"
fi
kill -INT "$PING_PID" 2>/dev/null

say "the outage against the leases table"
# A lease row stamped (issued_ms, the coordinator's clock when the request began) during the
# outage is right only if it was committed (PostgreSQL's commit timestamp) before the stop took
# effect, or after the restart by a request that waited for a connection no longer than the
# pool's wait (5 s): a lease issued during the outage and written later would break both.
OUT=$(pg_q "SELECT serial, device_id, issued_ms, (extract(epoch FROM pg_xact_commit_timestamp(xmin)) * 1000)::bigint
    FROM leases WHERE issued_ms >= $DOWN_MS AND issued_ms < $START_MS ORDER BY serial")
BAD=0 ROWS=0
while IFS='|' read -r serial dev issued committed; do
    [[ -n "$serial" ]] || continue
    ROWS=$((ROWS + 1))
    echo "  lease $serial (device $dev): stamped $((issued - DOWN_MS)) ms after the stop began, committed $((${committed:-0} - START_MS)) ms after the restart began"
    if [[ -z "$committed" ]] || ! ((committed < STOPPED_MS || (committed >= START_MS && issued >= START_MS - 6000))); then
        BAD=$((BAD + 1))
    fi
done <<<"$OUT"
check "no lease was written while the database was down ($ROWS stamped in the outage, $BAD not explained by the stop or the pool's wait)" test "$BAD" -eq 0
# row_after SERIAL: the lease row's not_after_ms, if it was issued before the stop.
row_after() { pg_q "SELECT not_after_ms FROM leases WHERE serial = $1 AND issued_ms < $DOWN_MS"; }
A_NA=$(row_after "$AS")
B_NA=$(row_after "$BS")
check "alice's lease $AS was issued before the stop (not_after ${A_NA:-none})" test -n "$A_NA"
check "bob's lease $BS was issued before the stop (not_after ${B_NA:-none})" test -n "$B_NA"
# The device's view (whole seconds, rounded down) agrees with the row: expiry in [t + e, t + e + 1 s].
shown_ok() { [[ -n "$2" ]] && (($2 >= $1 + $3 * 1000 - 50 && $2 <= $1 + $3 * 1000 + 1050)); }
check "alice's shown expiry (${AE} s) agrees with her lease row" shown_ok "$AT" "$A_NA" "$AE"
check "bob's shown expiry (${BE} s) agrees with his lease row" shown_ok "$BT" "$B_NA" "$BE"
# Each device is usable until the last of its leases issued before the stop ends (a rotation
# finishing just after the stop switches to the newer one); traffic both ways needs both.
last_na() { pg_q "SELECT max(not_after_ms) FROM leases WHERE device_id = $1 AND issued_ms < $DOWN_MS"; }
ANA=$(last_na "$AL")
BNA=$(last_na "$BO")
EXPIRY=$((ANA < BNA ? ANA : BNA))
echo "  last leases before the stop end $((ANA - DOWN_MS)) ms (alice) and $((BNA - DOWN_MS)) ms (bob) after it"
if [[ -n "$STOP" ]]; then
    D=$((STOP - EXPIRY))
    echo "  last ping answer $D ms after the earlier lease expiry"
    check "the ping stopped within 2 s after the earlier expiry ($D ms)" test "$D" -le 2000
    check "and not before it ($D ms; one 100 ms ping interval and a reply allowed)" test "$D" -ge -300
fi
check "audit verify" lab_coord audit verify

echo "outage_pg.sh runtime: $((SECONDS - T0)) s"
finish
