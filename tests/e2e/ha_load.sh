#!/usr/bin/env bash
# Replicas under load: two coordinator replicas (namespaces ca and cb) on one throw-away
# PostgreSQL cluster; real `ward` devices alice (on A), bob and carol (on B); background load on
# both replicas (client/examples/load.rs --target: an enrollment every 500 ms per replica, each
# acknowledged one recorded with its device number, the enrolled devices' sessions sending
# posture reports every 3 s and rotating keys on 30 s leases) and an admin write loop
# (`user add` through alternating replicas, each one that exited 0 recorded). Then:
#  1. kill -9 of replica A mid-load: alice reconnects to B within 10 s (measured), a 100 ms
#     ping alice -> bob loses nothing (counted), every enrollment and admin write acknowledged
#     so far is in PostgreSQL and seen through B, `audit verify` passes on B; A restarted rejoins
#     (B's status shows it alive).
#  2. PostgreSQL stopped (`-m immediate`) under load for at least 5 s (about 11 s: the refused
#     writes are timed while it is down): enrollments and admin writes are
#     refused with a database error within seconds (timed), a narrowing applied just before
#     keeps holding (alice cannot reach carol), alice keeps a valid lease and her ping to bob
#     loses nothing; after the restart enrollment, `user add` and `policy apply` work again
#     without operator action (time from the restart measured), `audit verify` passes on both.
# At the end every acknowledged enrollment and admin write of the whole run is checked against
# PostgreSQL. Needs root; prints figures, runtime and `N passed, N failed`.
set -uo pipefail
source "$(dirname "$0")/common.sh"
need_root
lab_have_ward || { echo "build first: cargo build --release --workspace --bins"; exit 1; }
source "$E2E_DIR/../lab/pg.sh"
pg_available || { echo "PostgreSQL not installed (Debian package postgresql)"; exit 1; }
LOAD=$(lab_ward_bin examples/load)
[[ -x "$LOAD" ]] || { echo "build first: cargo build --release -p ward-client --example load"; exit 1; }
T0=$SECONDS
P="$E2E_DIR/policies"
BIN=$(lab_ward_bin ward-coordinator)
TTL=30s

lab_init
ADMIN_PID=""
cleanup_all() {
    local rc=$?
    [[ -n "$ADMIN_PID" ]] && kill "$ADMIN_PID" 2>/dev/null
    lab_cleanup
    pg_cleanup
    exit "$rc"
}
trap cleanup_all EXIT
pg_start || exit 1

for h in ca cb alice bob carol la lb; do lab_add_wan_host "$h"; done
A=$(lab_hostport "$(lab_ip ca)" 7443)
B=$(lab_hostport "$(lab_ip cb)" 7443)
D1="$LAB_DIR/coordinator"
D2="$LAB_DIR/replica-b"
coord_a() { lab_coord "$@"; }
coord_b() { lab_exec cb "$BIN" --data-dir "$D2" "$@"; }
# coord_within SECONDS a|b ARGS...: the admin CLI of replica A or B, stopped after SECONDS.
coord_within() {
    local t="$1" ns dir
    if [[ "$2" == a ]]; then ns=$(lab_ns ca) dir=$D1; else ns=$(lab_ns cb) dir=$D2; fi
    shift 2
    timeout "$t" ip netns exec "$ns" "$BIN" --data-dir "$dir" "$@"
}
REC_A="$LAB_DIR/enroll-a.rec"
REC_B="$LAB_DIR/enroll-b.rec"
ADMIN_REC="$LAB_DIR/admin.rec"
touch "$REC_A" "$REC_B" "$ADMIN_REC"

say "two replicas on one PostgreSQL cluster"
LAB_COORD_PUBLIC_ADDR="$A,$B" LAB_COORD_SERVE_ARGS="--listen $A --lease-ttl $TTL" lab_start_coordinator ca || exit 1
APID=$(lab_pids ca | head -n1)
coord_a export-instance "$LAB_DIR/instance.json" >"$LAB_DIR/logs/export.log" 2>&1
coord_b import-instance "$LAB_DIR/instance.json" >"$LAB_DIR/logs/import.log" 2>&1
check "replica B's data directory imported" test -f "$D2/lease.key"
lab_spawn cb replica-b.log "$BIN" serve --data-dir "$D2" --listen "$B" --lease-ttl "$TTL"
BPID=$LAB_LAST_PID
check "replica B serves" lab_wait_for -t 20 coord_b device ls --json
coord_a policy apply "$P/ha-open.toml" >/dev/null

# A token of replica B dials B first: its addresses swapped (first address, then the others).
b_first() {
    python3 - "$1" <<'PY'
import base64, sys
t = sys.argv[1]
b = t[len("ward1-"):]
raw = base64.urlsafe_b64decode(b + "=" * (-len(b) % 4))
n = raw[0]
first, fixed = raw[1:1 + n], raw[1 + n:1 + n + 72]
rest = raw[1 + n + 72:]
others, i = [], 1
for _ in range(rest[0] if rest else 0):
    others.append(rest[i + 1:i + 1 + rest[i]])
    i += 1 + rest[i]
addrs = others[:1] + [first] + others[1:]
out = bytes([len(addrs[0])]) + addrs[0] + fixed + bytes([len(addrs) - 1])
for a in addrs[1:]:
    out += bytes([len(a)]) + a
print("ward1-" + base64.urlsafe_b64encode(out).decode().rstrip("="))
PY
}
for h in alice bob carol; do lab_start_device "$h"; done
lab_device_up alice "$(coord_a token create --tag a)" >/dev/null
lab_device_up bob "$(b_first "$(coord_b token create --tag b)")" >/dev/null
lab_device_up carol "$(b_first "$(coord_b token create --tag c)")" >/dev/null
AL4=$(lab_ward_ipv4 alice)
BO4=$(lab_ward_ipv4 bob)
CA4=$(lab_ward_ipv4 carol)
on() { [[ "$(lab_ward_json_get "$1" 's["state"] + " " + s["coordinator"]')" == "connected $2" ]]; }
check "alice is on A" lab_wait_for -t 15 on alice "$A"
check "bob is on B" lab_wait_for -t 15 on bob "$B"
check "carol is on B" lab_wait_for -t 15 on carol "$B"
pings() { lab_exec "$1" ping -c1 -W1 "$2" >/dev/null 2>&1; }
check "alice (A) pings bob (B)" lab_wait_for -t 20 pings alice "$BO4"
check "alice (A) pings carol (B)" lab_wait_for -t 20 pings alice "$CA4"

say "background load on both replicas"
for r in a b; do
    "coord_$r" token create --tag load --uses 500 --ttl 1h >"$LAB_DIR/load-token-$r" || fail "load token on $r"
    chmod 600 "$LAB_DIR/load-token-$r"
done
lab_spawn la load-a.log "$LOAD" --target "$A" --token-file "$LAB_DIR/load-token-a" --sessions 80 \
    --enroll-every-ms 500 --posture-interval 3 --duration 600 --name-prefix la --record "$REC_A"
LOAD_A=$LAB_LAST_PID
lab_spawn lb load-b.log "$LOAD" --target "$B" --token-file "$LAB_DIR/load-token-b" --sessions 80 \
    --enroll-every-ms 500 --posture-interval 3 --duration 600 --name-prefix lb --record "$REC_B"
LOAD_B=$LAB_LAST_PID
# Admin writes through alternating replicas; each that exited 0 is recorded with its name.
admin_loop() {
    local i=0 r name
    while [[ ! -e "$LAB_DIR/admin.stop" ]]; do
        i=$((i + 1))
        r=$([[ $((i % 2)) == 1 ]] && echo a || echo b)
        name="hu$i"
        if coord_within 30 "$r" user add "$name" >/dev/null 2>>"$LAB_DIR/logs/admin-loop.log"; then
            echo "$(now_ms) $r $name" >>"$ADMIN_REC"
        else
            echo "$(now_ms) $r $name FAILED" >>"$LAB_DIR/logs/admin-loop.log"
        fi
        sleep 0.2
    done
}
admin_loop &
ADMIN_PID=$!
acked() { grep -c '^enrolled ' "$1"; }
enough() { (($(acked "$REC_A") >= 8 && $(acked "$REC_B") >= 8 && $(wc -l <"$ADMIN_REC") >= 6)); }
check "load under way (8 enrollments per replica, 6 admin writes)" lab_wait_for -t 30 enough

# Every device number in the records' `enrolled` lines is a row of PostgreSQL's devices table.
missing_enrollments() {
    local ids
    ids=$(pg_q 'SELECT id FROM devices')
    cat "$REC_A" "$REC_B" | awk '$1 == "enrolled" {print $5}' | sort -u | comm -23 - <(sort -u <<<"$ids")
}
missing_users() {
    local names
    names=$(pg_q 'SELECT name FROM users')
    awk '{print $3}' "$ADMIN_REC" | sort -u | comm -23 - <(sort -u <<<"$names")
}
# ping_losses LOG: requests from the first (seq 1) to the last answered one that got no reply
# (the request in flight when ping was stopped is not a loss).
ping_losses() {
    read -r LAST GOT < <(grep -o 'icmp_seq=[0-9]*' "$1" | cut -d= -f2 |
        sort -n | uniq | awk '{l = $1; n++} END {print l + 0, n + 0}')
    FIRST=1
    SPAN=$((LAST - FIRST + 1))
    LOST=$((SPAN - GOT))
}
seq_past() { grep -q "icmp_seq=$2 " "$1"; }
last_seq() { grep -o 'icmp_seq=[0-9]*' "$1" | tail -n1 | cut -d= -f2; }
stop_ping() {
    kill -INT "$1" 2>/dev/null
    lab_wait_for -t 5 grep -q "packets transmitted" "$2"
}

say "1. kill -9 replica A under load"
lab_spawn alice ping1.log ping -i 0.1 -W 1 "$BO4"
PING1=$LAB_LAST_PID
lab_wait_for -t 5 seq_past "$LAB_DIR/logs/ping1.log" 5
KILL_MS=$(now_ms)
kill -9 "$APID"
if lab_wait_for -t 20 -i 0.1 on alice "$B"; then
    FAILOVER_MS=$(($(now_ms) - KILL_MS))
    echo "  alice reconnected to B ${FAILOVER_MS} ms after kill -9 of A"
    check "alice on B within 10 s (${FAILOVER_MS} ms)" test "$FAILOVER_MS" -le 10000
else
    fail "alice reconnected to B within 20 s"
fi
# Twenty more replies on B's netmaps, then the ping's count.
S=$(last_seq "$LAB_DIR/logs/ping1.log")
lab_wait_for -t 10 seq_past "$LAB_DIR/logs/ping1.log" $((S + 20))
stop_ping "$PING1" "$LAB_DIR/logs/ping1.log"
ping_losses "$LAB_DIR/logs/ping1.log"
echo "  ping alice -> bob every 100 ms: $SPAN requests (seq $FIRST..$LAST), $GOT answered, $LOST lost"
check "the ping went on through the kill ($SPAN requests)" test "$SPAN" -ge 30
check "no ping lost across the kill ($LOST lost)" test "$LOST" -eq 0
N_ENR=$(($(acked "$REC_A") + $(acked "$REC_B")))
N_ADM=$(wc -l <"$ADMIN_REC")
M=$(missing_enrollments)
check "all $N_ENR enrollments acknowledged so far are rows in PostgreSQL (missing: ${M:-none})" test -z "$M"
M=$(missing_users)
check "all $N_ADM admin writes acknowledged so far are in PostgreSQL (missing: ${M:-none})" test -z "$M"
# Through B: the last enrollment A acknowledged before the kill, and the last admin write.
LAST_A=$(awk -v k="$KILL_MS" '$1 == "enrolled" && $2 < k {h = $4} END {print h}' "$REC_A")
b_has_device() { coord_b device show "$1" >/dev/null 2>&1; }
check "B shows A's last acknowledged enrollment before the kill (${LAST_A:-none})" b_has_device "${LAST_A:-none}"
LAST_U=$(awk -v k="$KILL_MS" '$1 < k && $2 == "a" {n = $3} END {print n}' "$ADMIN_REC")
b_has_user() { grep -qw "$1" <<<"$(coord_b user ls 2>/dev/null)"; }
check "B lists A's last admin write before the kill (${LAST_U:-none})" b_has_user "${LAST_U:-none}"
check "audit verify on B after the kill" coord_b audit verify

say "replica A restarted"
lab_spawn ca coordinator-a2.log "$BIN" serve --data-dir "$D1" --listen "$A" --lease-ttl "$TTL"
APID=$LAB_LAST_PID
check "A serves again" lab_wait_for -t 20 coord_a device ls --json
both_alive() {
    coord_b status --json 2>/dev/null | python3 -c '
import json, sys
r = {x["address"]: x for x in json.load(sys.stdin)["replicas"]}
sys.exit(0 if all(a in r and r[a]["alive"] for a in sys.argv[1:]) else 1)' "$A" "$B"
}
check "B's status shows A alive again" lab_wait_for -t 15 both_alive

say "2. PostgreSQL restarted under load"
coord_a policy apply "$P/ha-narrow.toml" >/dev/null
check "narrowing (applied on A) cuts alice from carol" lab_wait_for -t 10 bash -c "! ip netns exec $(lab_ns alice) ping -c1 -W1 $CA4"
check "alice still pings bob" lab_wait_for -t 10 pings alice "$BO4"
lab_spawn alice ping2.log ping -i 0.1 -W 1 "$BO4"
PING2=$LAB_LAST_PID
lab_wait_for -t 5 seq_past "$LAB_DIR/logs/ping2.log" 5
DOWN_MS=$(now_ms)
pg_stop_fast
timed_write() { # REPLICA NAME: prints "RC MS" and the output to $LAB_DIR/logs/down-$1.log
    local t0 rc
    t0=$(now_ms)
    coord_within 60 "$1" user add "$2" >"$LAB_DIR/logs/down-$1.log" 2>&1
    rc=$?
    echo "$rc $(($(now_ms) - t0))"
}
for r in a b; do
    read -r RC MS < <(timed_write "$r" "down-$r")
    echo "  user add on $r while PostgreSQL is down: exit $RC after $MS ms: $(head -c 200 "$LAB_DIR/logs/down-$r.log")"
    check "admin write on $r refused while the database is down" test "$RC" -ne 0 -a "$RC" -ne 124
    check "within 10 s ($MS ms)" test "$MS" -le 10000
    check "with a database error" grep -qi "database\|postgres" "$LAB_DIR/logs/down-$r.log"
done
# Attempts started after the stop (a record's $2 is when the attempt ended, $3 how long it took:
# one that began while A was still down from the kill is not the database's refusal).
failed_since() { awk -v k="$DOWN_MS" '$1 == "failed" && $2 - $3 > k' "$1" | grep -q .; }
for r in A B; do
    rec="$LAB_DIR/enroll-${r,,}.rec"
    check "an enrollment on $r was refused during the outage" lab_wait_for -t 15 failed_since "$rec"
    L=$(awk -v k="$DOWN_MS" '$1 == "failed" && $2 - $3 > k' "$rec" | head -n1)
    echo "  first enrollment refused on $r: after ${L:+$(cut -d' ' -f3 <<<"$L")} ms: $(cut -d' ' -f5- <<<"$L" | head -c 160)"
    check "refused within 10 s" test "$(cut -d' ' -f3 <<<"$L")" -le 10000
    check "with the database named" grep -q "database" <<<"$L"
done
check "alice still cannot reach carol while the database is down" bash -c "! ip netns exec $(lab_ns alice) ping -c3 -i 0.3 -W1 $CA4"
lease_ok() { [[ "$(lab_ward_json_get "$1" 's["lease"]["expires_in_secs"] > 0')" == True ]]; }
check "alice holds a valid lease during the outage" lease_ok alice
check "bob holds a valid lease during the outage" lease_ok bob
# At least five seconds of outage in all.
while (($(now_ms) - DOWN_MS < 5000)); do sleep 0.2; done
OUTAGE_MS=$(($(now_ms) - DOWN_MS))
pg_start_again || fail "PostgreSQL restarts"
UP_MS=$(now_ms)
echo "  PostgreSQL was down for $OUTAGE_MS ms"
k=0
write_ok() { k=$((k + 1)); "coord_$1" user add "back-$1-$k" >/dev/null 2>&1; }
for r in a b; do
    if lab_wait_for -t 60 -i 0.2 write_ok "$r"; then
        echo "  user add on $r works again $(($(now_ms) - UP_MS)) ms after PostgreSQL restarted"
        pass "admin writes on $r recover without operator action"
    else
        fail "admin writes on $r recover without operator action"
    fi
done
if lab_wait_for -t 30 -i 0.2 coord_b policy apply "$P/ha-narrow2.toml"; then
    echo "  policy apply on B works $(($(now_ms) - UP_MS)) ms after PostgreSQL restarted"
    pass "policy apply recovers"
else
    fail "policy apply recovers"
fi
enrolled_since() { awk -v k="$UP_MS" '$1 == "enrolled" && $2 > k' "$1" | grep -q .; }
for r in A B; do
    rec="$LAB_DIR/enroll-${r,,}.rec"
    if lab_wait_for -t 30 -i 0.2 enrolled_since "$rec"; then
        T=$(awk -v k="$UP_MS" '$1 == "enrolled" && $2 > k {print $2 - k; exit}' "$rec")
        echo "  first enrollment on $r acknowledged $T ms after PostgreSQL restarted"
        pass "enrollment on $r recovers"
    else
        fail "enrollment on $r recovers"
    fi
done
S=$(last_seq "$LAB_DIR/logs/ping2.log")
lab_wait_for -t 10 seq_past "$LAB_DIR/logs/ping2.log" $((S + 10))
stop_ping "$PING2" "$LAB_DIR/logs/ping2.log"
ping_losses "$LAB_DIR/logs/ping2.log"
echo "  ping alice -> bob every 100 ms across the outage: $SPAN requests (seq $FIRST..$LAST), $GOT answered, $LOST lost"
check "the ping went on across the outage ($SPAN requests)" test "$SPAN" -ge 60
check "no ping lost across the outage ($LOST lost)" test "$LOST" -eq 0
check "alice still cannot reach carol after the outage" bash -c "! ip netns exec $(lab_ns alice) ping -c2 -i 0.3 -W1 $CA4"
check "audit verify on A" coord_a audit verify
check "audit verify on B" coord_b audit verify

say "the whole run"
touch "$LAB_DIR/admin.stop"
wait "$ADMIN_PID" 2>/dev/null
ADMIN_PID=""
kill -INT "$LOAD_A" "$LOAD_B" 2>/dev/null
lab_wait_for -t 10 grep -q "enrollments tried" "$LAB_DIR/logs/load-a.log"
lab_wait_for -t 10 grep -q "enrollments tried" "$LAB_DIR/logs/load-b.log"
for r in a b; do echo "  replica ${r^^}: $(grep "enrollments tried" "$LAB_DIR/logs/load-$r.log")"; done
ROT=$(cat "$LAB_DIR"/logs/load-[ab].log | sed -n 's/.* \([0-9]*\) key rotations.*/\1/p' | awk '{s += $1} END {print s + 0}')
check "the load's devices rotated keys during the run ($ROT rotations)" test "$ROT" -gt 0
N_ENR=$(($(acked "$REC_A") + $(acked "$REC_B")))
N_ADM=$(wc -l <"$ADMIN_REC")
echo "  acknowledged: $N_ENR enrollments, $N_ADM admin writes; $(grep -c FAILED "$LAB_DIR/logs/admin-loop.log" 2>/dev/null || echo 0) admin writes failed"
M=$(missing_enrollments)
check "every acknowledged enrollment ($N_ENR) is a row in PostgreSQL (missing: ${M:-none})" test -z "$M"
M=$(missing_users)
check "every acknowledged admin write ($N_ADM) is in PostgreSQL (missing: ${M:-none})" test -z "$M"
both() { kill -0 "$APID" && kill -0 "$BPID"; }
check "both replicas still run" both

echo "ha_load.sh runtime: $((SECONDS - T0)) s"
finish
