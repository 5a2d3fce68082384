#!/usr/bin/env bash
# Flow logs, end to end: a scripted workload (allowed TCP and UDP, denied attempts to a closed
# service, a flow only a grant allows) shows up in `flows --json` with the right verdicts,
# rules, roles and both ends' counts, byte counts matching what was sent (within headers);
# `kill -9` of the coordinator during a steady UDP stream loses no window and counts none
# twice; a device cut off from the coordinator for two minutes (many windows) sends its spool when back,
# and one with a tiny spool cap reports what it dropped; a device that under-reports
# (WARD_TEST_FLOW_UNDERREPORT=50) shows as `mismatch`. Windows are 5 s (WARD_FLOW_WINDOW).
# Needs root; prints `N passed, N failed`.
set -uo pipefail
source "$(dirname "$0")/common.sh"
need_root
lab_have_ward || { echo "build first: cargo build --release --workspace --bins"; exit 1; }

WIN="WARD_FLOW_WINDOW=5s"
lab_init
lab_add_wan_host db
lab_add_natted_host alice
lab_add_natted_host bob
lab_add_natted_host carol
lab_start_coordinator
LAB_WARD_WRAPPER="env $WIN" lab_start_device db
LAB_WARD_WRAPPER="env $WIN" lab_start_device alice
LAB_WARD_WRAPPER="env $WIN WARD_FLOW_SPOOL_RECORDS=2" lab_start_device bob
LAB_WARD_WRAPPER="env $WIN WARD_TEST_FLOW_UNDERREPORT=50" lab_start_device carol
lab_coord user add alice --group eng >/dev/null 2>&1
lab_coord user add carol --group eng >/dev/null 2>&1
lab_coord user add bob >/dev/null 2>&1
lab_device_up db "$(lab_token --tag db --hostname db)" >/dev/null
for h in alice bob carol; do lab_device_up "$h" "$(lab_token --user "$h")" >/dev/null; done
cat >"$LAB_DIR/flows.toml" <<'TOML'
[groups]
eng = ["alice", "carol"]
[services.db]
devices = ["tag:db"]
ports = ["tcp/5432", "udp/5353", "udp/6000", "udp/6001"]
[[rules]]
name = "eng-db"
from = ["group:eng"]
to = ["db"]
TOML
check "policy applied" lab_coord policy apply "$LAB_DIR/flows.toml"
GID=$(lab_coord grant add --from bob --to db --for 30m --reason "flow test" 2>/dev/null)
check "grant for bob -> db ($GID)" test -n "$GID"
DB4=$(lab_ward_ipv4 db)
for h in alice bob carol; do lab_ward_wait_peer "$h" "$DB4"; done

# The sinks on db: TCP 5432 read to the end; UDP ports counted, one line per datagram.
cat >"$LAB_DIR/flowtool.py" <<'PY'
import socket, sys, threading, time
cmd = sys.argv[1]
if cmd == "sink":
    out = sys.argv[2]
    def tcp():
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", 5432)); s.listen(64)
        while True:
            c, _ = s.accept()
            def drain(c=c):
                while c.recv(65536): pass
                c.close()
            threading.Thread(target=drain, daemon=True).start()
    def udp(port):
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", port))
        with open(f"{out}/udp-{port}", "a") as f:
            while True:
                u.recv(65536); f.write("x\n"); f.flush()
    for p in (5353, 6000, 6001):
        threading.Thread(target=udp, args=(p,), daemon=True).start()
    tcp()
elif cmd == "tcp":  # tcp HOST PORT BYTES: send exactly BYTES, close
    s = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=10)
    s.sendall(b"w" * int(sys.argv[4])); s.shutdown(socket.SHUT_WR)
    while s.recv(65536): pass
elif cmd == "udp":  # udp HOST PORT COUNT SIZE INTERVAL_S: COUNT datagrams of SIZE bytes
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(int(sys.argv[4])):
        u.sendto(b"u" * int(sys.argv[5]), (sys.argv[2], int(sys.argv[3])))
        time.sleep(float(sys.argv[6]))
elif cmd == "get":  # get EXPR < flows.json: evaluate EXPR over v (the JSON), print it
    import json
    v = json.load(sys.stdin)
    def spans(ini, port, proto=None):
        return [f for f in v["flows"] if f["initiator"] == ini and f["port"] == port
                and (proto is None or f["proto"] == proto)]
    def total(ini, port, end, key, proto=None):
        return sum((f[end + "_counts"] or {}).get(key, 0) for f in spans(ini, port, proto))
    def source(dev):
        return next((s for s in v["sources"] if s["device"] == dev), {})
    print(eval(sys.argv[2], {"v": v, "spans": spans, "total": total, "source": source}))
PY
T="$LAB_DIR/flowtool.py"
lab_spawn db sink.log python3 "$T" sink "$LAB_DIR"
lab_wait_for lab_exec db sh -c "ss -ltn | grep -q ':5432 '"
flows_json() { lab_coord flows --since 1h --limit 5000 --json >"$LAB_DIR/flows.json" 2>/dev/null; }
get() { python3 "$T" get "$1" <"$LAB_DIR/flows.json"; }
# settled EXPR: refresh flows.json until EXPR is True (reports are at most a window late).
settled() { flows_json && test "$(get "$1")" = True; }
udp_got() { wc -l <"$LAB_DIR/udp-$1" 2>/dev/null || echo 0; }
got_at_least() { test "$(udp_got "$1")" -ge "$2"; }
tcp_ok() { lab_exec "$1" timeout 3 nc -z -w 2 "$2" "$3" >/dev/null 2>&1; }
for h in alice bob carol; do lab_wait_for -t 20 tcp_ok "$h" "$DB4" 5432; done

say "workload: allowed TCP and UDP, denied attempts, a grant, an under-reporting device"
lab_exec alice python3 "$T" tcp "$DB4" 5432 200000
lab_exec alice python3 "$T" udp "$DB4" 5353 50 1000 0.01
for _ in 1 2 3; do lab_exec alice timeout 2 nc -z -w 1 "$DB4" 22 >/dev/null 2>&1; done
lab_exec bob python3 "$T" tcp "$DB4" 5432 50000
lab_exec carol python3 "$T" tcp "$DB4" 5432 300000
check "db got alice's 50 datagrams" lab_wait_for -t 5 got_at_least 5353 50
# Everything reported by both ends (pending turns into a final status). Bob's spool holds two
# records, so one of his may be dropped on purpose (checked below): his flows can stay pending until
# the pairing grace has passed, and only db's side of them is waited for.
check "both ends' records arrive" lab_wait_for -t 40 -i 1 settled \
    'all(f["status"] != "pending" for f in v["flows"] if f["port"] in (5432, 5353, 22) and f["initiator"] != "bob") and total("alice", 5432, "responder", "bytes_in") >= 200000 and total("bob", 5432, "responder", "bytes_in") >= 50000 and total("carol", 5432, "responder", "bytes_in") >= 300000 and total("alice", 22, "responder", "packets_in") >= 1'
get 'v["summary"]' | sed 's/^/    summary: /'

A_TCP_OUT=$(get 'total("alice", 5432, "initiator", "bytes_out")')
D_TCP_IN=$(get 'total("alice", 5432, "responder", "bytes_in")')
echo "  alice -> db tcp/5432: alice sent $A_TCP_OUT bytes, db got $D_TCP_IN (payload 200000)"
within() { (( $1 >= $2 && $1 <= $2 * 110 / 100 + 4000 )); }
check "alice's count of tcp/5432 matches the 200000 bytes sent, within headers" within "$A_TCP_OUT" 200000
check "db's count of tcp/5432 matches too" within "$D_TCP_IN" 200000
check "alice -> db tcp/5432 is paired" test "$(get 'sorted({f["status"] for f in spans("alice", 5432)})')" = "['paired']"
check "allowed by rule eng-db, as the responder names it" test "$(get 'sorted({f["rule"] for f in spans("alice", 5432)})')" = "['eng-db']"
check "roles: alice initiator, db responder" test "$(get 'all(f["initiator_id"] and f["responder"] == "db" for f in spans("alice", 5432))')" = True
A_UDP=$(get 'total("alice", 5353, "initiator", "packets_out")'); A_UDPB=$(get 'total("alice", 5353, "initiator", "bytes_out")')
D_UDP=$(get 'total("alice", 5353, "responder", "packets_in")')
echo "  alice -> db udp/5353: alice sent $A_UDP packets / $A_UDPB bytes, db got $D_UDP packets (50 x 1000 B)"
check "udp/5353: 50 packets each end" test "$A_UDP/$D_UDP" = "50/50"
check "udp/5353: bytes are the payload plus IP/UDP headers (50 x 1028)" test "$A_UDPB" = 51400
check "udp/5353 paired, rule eng-db" test "$(get 'sorted({(f["status"], f["rule"]) for f in spans("alice", 5353)})')" = "[('paired', 'eng-db')]"
DEN=$(get '[(f["status"], f["verdict"], f["reason"]) for f in spans("alice", 22)][:1]')
echo "  alice -> db tcp/22: $DEN"
check "denied attempts to tcp/22 are denied, reason no_rule" test "$DEN" = "[('denied', 'denied', 'no_rule')]"
echo "  tcp/22 packets: alice sent $(get 'total("alice", 22, "initiator", "packets_out")'), db refused $(get 'total("alice", 22, "responder", "packets_in")')"
check "both ends counted the denied attempts (alice at least her 3 SYNs)" test "$(get 'total("alice", 22, "initiator", "packets_out") >= 3 and total("alice", 22, "responder", "packets_in") >= 1')" = True
BR=$(get 'sorted({f["rule"] for f in spans("bob", 5432)})')
echo "  bob -> db tcp/5432 allowed by: $BR"
check "bob's flow is allowed by the grant (grant:$GID) only" test "$BR" = "['grant:$GID']"
CM=$(get 'sorted({f["status"] for f in spans("carol", 5432)})')
echo "  carol (under-reports 50 %) -> db tcp/5432: $CM; disagree $(get '[f["disagree"] for f in spans("carol", 5432) if f["status"] == "mismatch"][:1]')"
check "carol's flow shows as mismatch" grep -q mismatch <<<"$CM"
check "flows --denied lists tcp/22 only" test "$(lab_coord flows --denied --json | python3 -c 'import json,sys; print(sorted({f["port"] for f in json.load(sys.stdin)["flows"]}))')" = "[22]"
check "flows top --by denied names alice -> db tcp/22" grep -qE "alice +db +tcp/22" <<<"$(lab_coord flows top --by denied)"
check "flows --from alice --to tag:db table prints" grep -q eng-db <<<"$(lab_coord flows --from alice --to tag:db)"

say "kill -9 of the coordinator during a steady UDP stream: no window lost, none counted twice"
lab_spawn alice stream.log python3 "$T" udp "$DB4" 6000 600 200 0.05
STREAM=$(lab_last_pid)
sleep 8
for p in $(lab_pids wan); do
    if tr '\0' ' ' <"/proc/$p/cmdline" | grep -q "ward-coordinator.*serve"; then kill -9 "$p"; fi
done
sleep 8
lab_spawn wan coordinator2.log "$(lab_ward_bin ward-coordinator)" serve --data-dir "$LAB_DIR/coordinator"
lab_wait_for -t 10 lab_coord status
while kill -0 "$STREAM" 2>/dev/null; do sleep 0.5; done
lab_wait_for -t 3 got_at_least 6000 600
GOT=$(udp_got 6000)
check "db received all 600 datagrams ($GOT)" test "$GOT" = 600
check "alice's and db's records add up to exactly 600 each" lab_wait_for -t 40 -i 1 settled \
    'total("alice", 6000, "initiator", "packets_out") == 600 and total("alice", 6000, "responder", "packets_in") == 600'
echo "  udp/6000: alice $(get 'total("alice", 6000, "initiator", "packets_out")'), db $(get 'total("alice", 6000, "responder", "packets_in")') packets in $(get 'len(spans("alice", 6000))') spans"
sleep 6
flows_json
check "and still exactly 600 later (no window stored twice)" test "$(get 'total("alice", 6000, "initiator", "packets_out"), total("alice", 6000, "responder", "packets_in")')" = "(600, 600)"
check "no report missing from alice or db" test "$(get 'source("alice").get("missing_seqs"), source("db").get("missing_seqs")')" = "(0, 0)"

say "alice and bob cut off from the coordinator for two minutes (24 windows): spools sent when back"
COORD_IP=$(lab_public_ip wan)
block() { lab_exec "$1" iptables "$2" OUTPUT -d "$COORD_IP" -j DROP; }
block alice -I; block bob -I
lab_spawn alice offline.log python3 "$T" udp "$DB4" 6001 120 100 1
OFF=$(lab_last_pid)
# bob: three kinds of flow per window, far more records than its spool (2) holds.
for i in $(seq 1 24); do
    lab_exec bob python3 "$T" udp "$DB4" 6000 1 100 0
    lab_exec bob python3 "$T" udp "$DB4" 6001 1 100 0
    lab_exec bob python3 "$T" udp "$DB4" 5353 1 100 0
    sleep 5
done
while kill -0 "$OFF" 2>/dev/null; do sleep 0.5; done
flows_json
check "while cut off, alice's offline windows are not at the coordinator" test "$(get 'total("alice", 6001, "initiator", "packets_out")')" -lt 120
block alice -D; block bob -D
check "back online: alice's spooled windows arrive, all 120 datagrams counted" lab_wait_for -t 120 -i 1 settled \
    'total("alice", 6001, "initiator", "packets_out") == 120'
check "db's side of them too" lab_wait_for -t 20 -i 1 settled 'total("alice", 6001, "responder", "packets_in") == 120'
BD=$(get 'source("bob").get("dropped_records", 0)')
echo "  bob (spool cap 2 records) reported $BD dropped record(s); summary: $(get 'v["summary"]')"
check "bob's dropped records are counted and reported" lab_wait_for -t 30 -i 1 settled 'source("bob").get("dropped_records", 0) > 0'
check "the summary counts them" test "$(get 'v["summary"]["dropped_records"] > 0')" = True
check "audit verify" lab_coord audit verify

say "shadow rules: eng-db watched for removal beside a narrower candidate; traffic keeps flowing, records say would-deny / would-allow"
# eng-db stays enforced but leaves the candidate view (shadow_remove); the candidate eng-db-udp
# covers only udp/5353, so alice's tcp/5432 would be denied and her udp/5353 allowed; bob's
# grant counts in both views.
cat >"$LAB_DIR/shadow.toml" <<'TOML'
[groups]
eng = ["alice", "carol"]
[services.db]
devices = ["tag:db"]
ports = ["tcp/5432", "udp/5353", "udp/6000", "udp/6001"]
[services.db-dns]
devices = ["tag:db"]
ports = ["udp/5353"]
[[rules]]
name = "eng-db"
from = ["group:eng"]
to = ["db"]
shadow_remove = true
[[rules]]
name = "eng-db-dns"
from = ["group:eng"]
to = ["db-dns"]
shadow = true
TOML
SH_OUT=$(lab_coord policy apply "$LAB_DIR/shadow.toml" 2>&1)
echo "$SH_OUT" | grep -i shadow | sed 's/^/    /'
check "policy with shadow rules applied; apply counts them" grep -q "2 shadow rule(s)" <<<"$SH_OUT"
SH_EXPLAIN=$(lab_coord policy explain alice db:5432 2>&1)
echo "$SH_EXPLAIN" | grep shadow: | sed 's/^/    /'
check "explain: alice -> db:5432 allowed, and the candidate would deny it (eng-db removed)" \
    grep -qE 'shadow: would deny \(rule "eng-db" \(line 9\) is removed in the candidate\)' <<<"$SH_EXPLAIN"
check "explain: alice -> db:5353/udp would be allowed by eng-db-dns" \
    grep -q 'shadow: would allow (by rule "eng-db-dns"' <<<"$(lab_coord policy explain alice db:5353/udp 2>&1)"
SH_TCP_FAIL=0
# One round of traffic (new flows, so the device judges them under the candidate filter it
# holds now), then the records are looked at; repeated until the verdicts are in.
shadow_round() {
    lab_exec alice python3 "$T" tcp "$DB4" 5432 20000 || SH_TCP_FAIL=$((SH_TCP_FAIL + 1))
    lab_exec alice python3 "$T" udp "$DB4" 5353 3 100 0
    lab_exec bob python3 "$T" tcp "$DB4" 5432 1000 || SH_TCP_FAIL=$((SH_TCP_FAIL + 1))
    settled 'any(f.get("shadow") == "would-deny" for f in spans("alice", 5432)) and any(f.get("shadow") == "would-allow" for f in spans("alice", 5353, "udp")) and any(f.get("shadow") == "would-allow" for f in spans("bob", 5432))'
}
check "records show would-deny for alice tcp/5432, would-allow for her udp/5353 and bob's grant" \
    lab_wait_for -t 60 -i 1 shadow_round
check "the would-denied flow kept working: every transfer completed" test "$SH_TCP_FAIL" = 0
check "its records are allowed by eng-db, verdict allowed" test "$(get 'sorted({(f["verdict"], f["rule"]) for f in spans("alice", 5432) if f.get("shadow") == "would-deny"})')" = "[('allowed', 'eng-db')]"
check "flows --shadow would-deny lists tcp/5432, not udp/5353" test "$(lab_coord flows --shadow would-deny --json | python3 -c 'import json,sys; print(sorted({(f["proto"], f["port"]) for f in json.load(sys.stdin)["flows"]}))')" = "[('tcp', 5432)]"
check "flows --shadow would-allow lists udp/5353" grep -q "'udp', 5353" <<<"$(lab_coord flows --shadow would-allow --json | python3 -c 'import json,sys; print(sorted({(f["proto"], f["port"]) for f in json.load(sys.stdin)["flows"]}))')"
check "the flows table has a SHADOW column showing would-deny" grep -qE "eng-db +would-deny" <<<"$(lab_coord flows --from alice --shadow would-deny)"
shadow_refused() { ! lab_coord flows --shadow maybe >/dev/null 2>&1; }
check "flows --shadow with another value is refused" shadow_refused

finish
