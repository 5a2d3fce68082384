#!/usr/bin/env bash
# Policy, end to end: default deny, services and port-level rules enforced at the peers with
# real traffic, policy tests gating apply, explain, time-bound grants that expire at the peers
# even with the coordinator dead. Needs root; prints `N passed, N failed`.
set -uo pipefail
source "$(dirname "$0")/common.sh"
need_root
lab_have_ward || { echo "build first: cargo build --release --workspace --bins"; exit 1; }
P="$E2E_DIR/policies"

lab_init
lab_add_wan_host db
lab_add_natted_host alice
lab_add_natted_host bob
lab_start_coordinator
for h in db alice bob; do lab_start_device "$h"; done
lab_coord user add alice --group eng >/dev/null 2>&1
lab_coord user add bob --group ops >/dev/null 2>&1
lab_device_up db "$(lab_token --tag db --tag server)" >/dev/null
lab_device_up alice "$(lab_token --user alice)" >/dev/null
lab_device_up bob "$(lab_token --user bob)" >/dev/null
DB4=$(lab_ward_ipv4 db); AL4=$(lab_ward_ipv4 alice)
peers_of() { lab_ward_json_get "$1" '[p["hostname"] for p in s["peers"]]' | sort | tr '\n' ' '; }
# tcp_ok HOST IP PORT: a TCP connection opens within 2 s
tcp_ok() { lab_exec "$1" timeout 3 nc -z -w 2 "$2" "$3" >/dev/null 2>&1; }
fails() { ! "$@"; }
listen() { lab_spawn "$1" "listen-$1-$2.log" sh -c "while true; do echo hello-from-$1 | nc -l -p $2 -q 1; done"; }

say "no policy: default deny, nobody is anybody's peer"
sleep 1
check "alice has no peers before any policy" test -z "$(peers_of alice | tr -d ' ')"
check "alice cannot ping db" fails lab_exec alice ping -c1 -W1 "$DB4"

say "policy check and apply"
check "policy check passes" lab_coord policy check "$P/base.toml"
check "policy apply passes" lab_coord policy apply "$P/base.toml"
for port in 5432 22 9000; do listen db $port; done
listen alice 9000
lab_spawn db udp.log sh -c "nc -u -l -p 5353 > $LAB_DIR/udp-got"
lab_wait_for -t 10 tcp_ok alice "$DB4" 5432

say "enforcement with real traffic"
check "alice -> db:5432 connects" tcp_ok alice "$DB4" 5432
reply() { lab_exec alice timeout 3 nc -w 2 "$DB4" 5432 </dev/null | grep -q hello-from-db; }
check "alice -> db:5432 gets the server's reply" lab_wait_for -t 6 -i 0.5 reply
check "alice -> db:22 fails" fails tcp_ok alice "$DB4" 22
lab_exec alice sh -c "echo udp-probe | timeout 2 nc -u -w 1 $DB4 5353" >/dev/null 2>&1
sleep 1
check "alice -> db any UDP fails (nothing received)" test ! -s "$LAB_DIR/udp-got"
check "bob -> db:5432 fails" fails tcp_ok bob "$DB4" 5432
check "bob -> db:22 connects" tcp_ok bob "$DB4" 22
check "db -> alice (new connection) fails" fails tcp_ok db "$AL4" 9000
check "db -> alice ping fails" fails lab_exec db ping -c1 -W1 "$AL4"
check "alice's netmap holds db only (not bob's laptop)" test "$(peers_of alice)" = "db "
check "db's netmap holds alice and bob" test "$(peers_of db)" = "alice bob "
RE=$(lab_ward_json_get alice '[r["service"]+"@"+r["hostname"]+":"+r["ports"] for r in s["reach"]]')
check "alice can reach exactly db@db:tcp/5432 ($RE)" test "$RE" = "db@db:tcp/5432"
INB=$(lab_ward_json_get db '[r["service"]+" "+r["ports"]+" from "+",".join(r["from"]) for r in s["inbound"]]' | sort | tr '\n' ';')
check "db is reachable by alice on 5432 and bob on 22 ($INB)" test "$INB" = "db tcp/5432 from alice;ssh tcp/22 from bob;"
DENIED=$(lab_ward_json_get db 's["counters"]["dropped_filter_no_rule"]')
check "db counted the denied packets ($DENIED)" test "${DENIED:-0}" -ge 1

say "explain"
ex() { lab_coord policy explain "$@" 2>&1; }
E1=$(ex alice db:5432); echo "  alice db:5432 -> $E1"
check "explain alice -> db:5432 allowed by eng-db" grep -qiE "allowed.*eng-db|eng-db.*allow" <<<"$E1"
E2=$(ex alice db:22); echo "  alice db:22 -> $E2"
check "explain alice -> db:22 denied" grep -qi denied <<<"$E2"
E3=$(ex bob db:5432); echo "  bob db:5432 -> $E3"
check "explain bob -> db:5432 denied" grep -qi denied <<<"$E3"
E4=$(ex bob db:22); echo "  bob db:22 -> $E4"
check "explain bob -> db:22 allowed by ops-ssh" grep -qiE "allowed.*ops-ssh|ops-ssh.*allow" <<<"$E4"
E5=$(ex db alice:9000); echo "  db alice:9000 -> $E5"
check "explain db -> alice:9000 denied" grep -qi denied <<<"$E5"

say "a policy whose tests fail, or that does not parse, is refused; nothing changes"
V0=$(lab_coord policy history --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
OUT=$(lab_coord policy apply "$P/bad-tests.toml" 2>&1); RC=$?
echo "$OUT" | sed 's/^/    /' | head -n 8
check "apply with failing tests exits non-zero" test "$RC" -ne 0
check "the failing test is named" grep -q "FAIL" <<<"$OUT"
OUT=$(lab_coord policy apply "$P/syntax-error.toml" 2>&1); RC=$?
echo "    $OUT" | head -n 3
check "syntax error refused" test "$RC" -ne 0
check "syntax error names file and line" grep -qE "syntax-error.toml:[0-9]+" <<<"$OUT"
printf '\xff\xfe[groups]\n' >"$LAB_DIR/binary.toml"
OUT=$(lab_coord policy apply "$LAB_DIR/binary.toml" 2>&1); RC=$?
check "non-UTF-8 refused" test "$RC" -ne 0
check "non-UTF-8 error says so ($OUT)" grep -qi "utf" <<<"$OUT"
V1=$(lab_coord policy history --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
check "no new policy version stored ($V0 -> $V1)" test "$V0" = "$V1"
check "alice still cannot reach ssh" fails tcp_ok alice "$DB4" 22
check "alice still reaches db:5432" tcp_ok alice "$DB4" 5432

say "applying a policy change does not disturb an open allowed connection"
# bob keeps an SSH-port connection open, sending a line every 0.2 s for 8 s.
lab_spawn db listen-keep.log sh -c "nc -l -p 2222 > $LAB_DIR/kept.txt"
sleep 0.3
cat >"$LAB_DIR/keep.toml" <<'TOML'
[groups]
ops = ["bob"]
eng = ["alice"]
[services.db]
devices = ["tag:db"]
ports = ["tcp/5432"]
[services.ssh]
devices = ["tag:server"]
ports = ["tcp/22", "tcp/2222"]
[[rules]]
name = "eng-db"
from = ["group:eng"]
to = ["db"]
[[rules]]
name = "ops-ssh"
from = ["group:ops"]
to = ["ssh"]
TOML
lab_coord policy apply "$LAB_DIR/keep.toml" >/dev/null
sleep 1
lab_spawn bob keep.log sh -c "for i in \$(seq 1 40); do echo line-\$i; sleep 0.2; done | nc -N $DB4 2222"
KEEP=$(lab_last_pid)
sleep 3
sed 's/tcp\/5432"\]/tcp\/5432", "tcp\/6432"]/' "$LAB_DIR/keep.toml" >"$LAB_DIR/keep2.toml"
check "applying an unrelated change succeeds" lab_coord policy apply "$LAB_DIR/keep2.toml"
while kill -0 "$KEEP" 2>/dev/null; do sleep 0.3; done
sleep 0.5
check "all 40 lines arrived across the policy change" test "$(grep -c line- "$LAB_DIR/kept.txt")" = 40
lab_coord policy apply "$P/base.toml" >/dev/null

say "a 60-second grant for bob -> db: works at once, ends within 2 s of expiry, even with the coordinator dead"
G0=$(now_ms)
GID=$(lab_coord grant add --from bob --to db --for 60s --reason "incident 42" 2>/dev/null)
check "grant created ($GID)" test -n "$GID"
check "bob -> db:5432 works within 2 s" lab_wait_for -t 2 -i 0.1 tcp_ok bob "$DB4" 5432
check "grant ls lists it" grep -q "incident 42" <<<"$(lab_coord grant ls)"
E6=$(ex bob db:5432); echo "  bob db:5432 -> $E6"
check "explain names the grant" grep -q "grant" <<<"$E6"
# Kill the coordinator: the peers must end the grant on their own.
for p in $(lab_pids wan); do
    if tr '\0' ' ' <"/proc/$p/cmdline" | grep -q "ward-coordinator.*serve"; then kill -9 "$p"; fi
done
EXP=$((G0 + 60000))
while (( $(now_ms) < EXP - 3000 )); do sleep 0.5; done
check "bob -> db:5432 still works just before expiry (coordinator dead)" tcp_ok bob "$DB4" 5432
while (( $(now_ms) < EXP )); do sleep 0.1; done
STOP=""
for i in $(seq 1 40); do
    if ! lab_exec bob timeout 1 nc -z -w 1 "$DB4" 5432 >/dev/null 2>&1; then STOP=$(now_ms); break; fi
    sleep 0.1
done
echo "  grant expired at +0 ms; first refused connection at +$(( ${STOP:-0} - EXP )) ms"
check "access ended within 2 s of expiry without the coordinator" test "$(( ${STOP:-99999999999999} - EXP ))" -le 2000
check "and stays ended" fails tcp_ok bob "$DB4" 5432
lab_spawn wan coordinator2.log "$(lab_ward_bin ward-coordinator)" serve --data-dir "$LAB_DIR/coordinator"
lab_wait_for -t 10 lab_coord status
check "after restart, grant ls is empty" test "$(lab_coord grant ls --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')" = 0
check "audit verify" lab_coord audit verify

finish
