#!/usr/bin/env bash
# Devices fail over between coordinator replicas: two `ward-coordinator serve` processes (in
# namespaces ca and cb) serve one instance; devices enrolled with a token that carries both
# addresses know the list (state file, `ward status`); `addrs set` on running A reaches both
# connected devices at once (timed), is audited, and a malformed list is refused with nothing
# changed; `kill -9` of replica A moves every device to B within 10 s (measured and printed)
# while a continuous ping between two devices loses nothing (their leases stay valid, so the
# data plane never stops), and `ward status` shows B afterwards; a relay (whose credential
# names both replicas) moves its control session to B.
#
# Replicas share one SQLite database for now: B's data dir holds copies of A's instance files
# (CA, lease key, audit key, config) and a symlink to A's ward.db (SQLite takes several
# processes on one file; its WAL follows the symlink). B starts AFTER enrollment so it loads
# the devices at start: SQLite replicas do not learn each other's changes. Separate data dirs
# because the admin socket, the audit checkpoint and the narrowing journal are per process
# (two processes on one data dir would fight over admin.sock). With WARD_TEST_DB=postgres
# both replicas share a throw-away PostgreSQL cluster (tests/lab/pg.sh) through
# WARD_DATABASE_URL instead; every check is the same. Needs root; prints `N passed, N failed`.
set -uo pipefail
source "$(dirname "$0")/common.sh"
need_root
lab_have_ward || { echo "build first: cargo build --release --workspace --bins"; exit 1; }
T0=$SECONDS
DB_KIND="${WARD_TEST_DB:-sqlite}"
case "$DB_KIND" in
    sqlite) ;;
    postgres)
        source "$E2E_DIR/../lab/pg.sh"
        pg_available || { echo "failover.sh: PostgreSQL not installed (Debian package postgresql); NOT run"; exit 1; }
        ;;
    *) echo "failover.sh: WARD_TEST_DB must be sqlite or postgres, not $DB_KIND"; exit 1 ;;
esac

lab_init
cleanup_all() {
    local rc=$?
    lab_cleanup
    [[ "$DB_KIND" == postgres ]] && pg_cleanup
    exit "$rc"
}
trap cleanup_all EXIT
if [[ "$DB_KIND" == postgres ]]; then
    pg_start || exit 1
fi
lab_add_wan_host ca
lab_add_wan_host cb
lab_add_wan_host alice
lab_add_wan_host bob
lab_add_wan_host relay
A=$(lab_hostport "$(lab_ip ca)" 7443)
B=$(lab_hostport "$(lab_ip cb)" 7443)
COORD=$(lab_ward_bin ward-coordinator)
BDIR="$LAB_DIR/coordinator-b"

say "setup: replica A, two devices enrolled with both addresses"
LAB_COORD_PUBLIC_ADDR="$A,$B" lab_start_coordinator ca
APID=$(lab_pids ca | head -n1)
addrs=$(lab_coord addrs show)
check "the instance has both addresses, A first" test "$addrs" = "$A"$'\n'"$B"
lab_coord policy apply "$E2E_DIR/policies/open-lab.toml" >/dev/null
lab_start_device alice
lab_start_device bob
lab_enroll alice --user alice >/dev/null
lab_enroll bob --user bob >/dev/null
A4=$(lab_ward_ipv4 alice)
B4=$(lab_ward_ipv4 bob)
list_of() { lab_ward_json_get "$1" '",".join(s.get("coordinators", []))'; }
knows_both() { [[ "$(list_of "$1")" == "$A,$B" ]]; }
check "alice knows both addresses (from the token)" lab_wait_for -t 10 knows_both alice
check "bob knows both addresses" lab_wait_for -t 10 knows_both bob
state_list() { python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); print(",".join(s.get("coordinators", [])), s["coordinator"])' "$LAB_DIR/dev-$1/state/state.json"; }
check "alice's state file keeps the list" test "$(state_list alice)" = "$A,$B $A"
# A new list reaches connected devices at once (no restart), and the old one comes back the
# same way: a third address on cb where nothing listens, then the first list again.
X=$(lab_hostport "$(lab_ip cb)" 7444)
t=$(now_ms)
OUT=$(lab_coord addrs set "$A,$B,$X" 2>&1)
check "addrs set on running A is sent to its devices ($(head -n1 <<<"$OUT"))" grep -q "^saved; sent to 2 connected devices" <<<"$OUT"
knows_three() { [[ "$(list_of "$1")" == "$A,$B,$X" ]]; }
check "alice learns the new list while connected" lab_wait_for -t 10 -i 0.1 knows_three alice
echo "  alice knew the new list $(($(now_ms) - t)) ms after addrs set began"
check "bob learns the new list" lab_wait_for -t 10 knows_three bob
check "addrs show prints the new list" test "$(lab_coord addrs show)" = "$A"$'\n'"$B"$'\n'"$X"
check "the change is audited" grep -q "addrs.set" <<<"$(lab_coord audit 2>&1)"
check "A's list is put back" grep -q "^saved; sent to 2" <<<"$(lab_coord addrs set "$A,$B" 2>&1)"
check "alice has the first list again" lab_wait_for -t 10 knows_both alice
refused_bad() { ! lab_coord addrs set "no-port-here" >/dev/null 2>&1 && [[ "$(lab_coord addrs show)" == "$A"$'\n'"$B" ]]; }
check "a malformed list is refused and changes nothing" refused_bad
on() { [[ "$(lab_ward_json_get "$1" 's["state"] + " " + s["coordinator"]')" == "connected $2" ]]; }
check "alice is connected to A" lab_wait_for -t 10 on alice "$A"
check "bob is connected to A" lab_wait_for -t 10 on bob "$A"
check "alice has bob as a peer" lab_ward_wait_peer alice "$B4" 15
check "bob has alice as a peer" lab_ward_wait_peer bob "$A4" 15
check "alice pings bob over the tunnel" lab_wait_for -t 15 lab_exec alice ping -c1 -W1 "$B4"
RELAY=$(lab_start_relay relay r1)
check "the relay joined A" lab_relay_wait_welcomed relay 15
# The relay credential names every replica: A first, then B.
relay_on() { [[ "$(grep "control session up" "$LAB_DIR/logs/relay-relay.log" | tail -n1 | sed 's/\x1b\[[0-9;]*m//g')" == *"coordinator=$(lab_ip "$1"):"* ]]; }
check "the relay's control session is on A" relay_on ca

say "replica B on the same database ($DB_KIND)"
mkdir -p "$BDIR"
chmod 700 "$BDIR"
for f in "$LAB_DIR/coordinator"/*; do
    case "$(basename "$f")" in
        ward.db | ward.db-wal | ward.db-shm | admin.sock) ;;
        *) [[ -f "$f" ]] && cp -p "$f" "$BDIR/" ;;
    esac
done
[[ "$DB_KIND" == sqlite ]] && ln -s "$LAB_DIR/coordinator/ward.db" "$BDIR/ward.db"
lab_spawn cb coordinator-b.log "$COORD" serve --data-dir "$BDIR"
BPID=$LAB_LAST_PID
coord_b() { lab_exec cb "$COORD" --data-dir "$BDIR" "$@"; }
check "B serves beside A on the shared database" lab_wait_for -t 15 coord_b device ls --json
a_answers() { lab_coord device ls --json >/dev/null; }
check "A still answers with B running" a_answers
both_alive() { kill -0 "$APID" && kill -0 "$BPID"; }
check "both replicas are running" both_alive

say "kill -9 A under a continuous ping"
lab_spawn alice ping.log ping -i 0.1 -W 1 "$B4"
PINGPID=$LAB_LAST_PID
lab_wait_for -t 5 grep -q "icmp_seq=5 " "$LAB_DIR/logs/ping.log"
KILL_MS=$(now_ms)
kill -9 "$APID"
both_on_b() { on alice "$B" && on bob "$B"; }
if lab_wait_for -t 20 -i 0.1 both_on_b; then
    FAILOVER_MS=$(($(now_ms) - KILL_MS))
    echo "  both devices reconnected to B ${FAILOVER_MS} ms after kill -9 of A"
    check "failover within 10 s (${FAILOVER_MS} ms)" test "$FAILOVER_MS" -le 10000
else
    fail "both devices reconnected to B within 20 s"
fi
# A few more seconds of traffic on B's netmaps, then the ping's summary.
lab_wait_for -t 5 lab_exec alice ping -c1 -W1 "$B4"
sleep 2
kill -INT "$PINGPID" 2>/dev/null
lab_wait_for -t 5 grep -q "packets transmitted" "$LAB_DIR/logs/ping.log"
# Replies by sequence number: every request between the first and the last answered one must
# have its reply (the request in flight when ping was stopped is not a loss).
read -r FIRST LAST GOT < <(grep -o 'icmp_seq=[0-9]*' "$LAB_DIR/logs/ping.log" | cut -d= -f2 |
    sort -n | uniq | awk 'NR == 1 {f = $1} {l = $1; n++} END {print f + 0, l + 0, n + 0}')
SPAN=$((LAST - FIRST + 1))
LOST=$((SPAN - GOT))
echo "  ping alice -> bob every 100 ms: $SPAN requests from seq $FIRST to $LAST, $GOT answered, $LOST lost"
check "the ping went on through the failover ($SPAN requests)" test "$SPAN" -ge 50
check "no ping lost across the failover ($LOST lost)" test "$LOST" -eq 0

say "after the failover"
text=$(lab_ward alice status)
check "ward status shows B in use and both known" grep -qF "coordinator:  $B (known: $A, $B)" <<<"$text"
lease_ok() { [[ "$(lab_ward_json_get alice 's["lease"]["expires_in_secs"] > 0')" == True ]]; }
check "alice holds a valid lease" lease_ok
preferred_b() { [[ "$(state_list alice)" == "$A,$B $B" ]]; }
check "alice's state file now dials B first" lab_wait_for -t 5 preferred_b
online() { [[ "$(coord_b device ls --json | python3 -c 'import json,sys; d=json.load(sys.stdin); print(sum(1 for x in (d if isinstance(d, list) else d.get("devices", [])) if x.get("online")))')" == 2 ]]; }
check "B has both devices online" lab_wait_for -t 5 online
check "alice still pings bob" lab_exec alice ping -c3 -i 0.2 -W1 "$B4"
relay_on_b() { relay_on cb; }
if lab_wait_for -t 30 -i 0.2 relay_on_b; then
    up=$(grep "control session up" "$LAB_DIR/logs/relay-relay.log" | tail -n1 | sed 's/\x1b\[[0-9;]*m//g' | awk '{print $1}')
    echo "  the relay's control session up on B $(($(date -d "$up" +%s%3N) - KILL_MS)) ms after kill -9 of A"
    pass "the relay moved its control session to B (its credential lists both)"
else
    fail "the relay moved its control session to B within 30 s (its credential lists both)"
fi
check "the relay is up on B" test "$(lab_relay_metric relay ward_relay_control_up)" = 1
check "the daemons logged the move to the next address" grep -q "trying the next coordinator address" "$LAB_DIR/logs/ward-alice.log"

echo "runtime: $((SECONDS - T0)) s"
finish
