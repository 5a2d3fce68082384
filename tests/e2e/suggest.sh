#!/usr/bin/env bash
# Least-privilege suggestions from observed flows, end to end: a scripted workload (alice uses
# one port of a rule opening tcp/8000-8100 on web, bob is denied again and again on that port,
# bob's grant to web's ssh is never used) makes `policy suggest` propose expiring the unused
# grant, narrowing the range to the used port and a rule for the repeated denials; `--write`
# yields a candidate that `policy check` accepts with its generated tests passing; `policy
# replay` of it denies nothing that was used; a dismissed suggestion leaves the list; `--write
# --shadow` yields a candidate whose narrowing peers watch on live traffic (would-allow on the
# used port, would-deny on another port of the old range) while enforcement is unchanged.
# Windows are 5 s (WARD_FLOW_WINDOW) so records reach the coordinator quickly. The lab's
# evidence spans one day, so the script uses `--min-days 1` (the default is 2).
# Needs root; prints `N passed, N failed`.
set -uo pipefail
source "$(dirname "$0")/common.sh"
need_root
lab_have_ward || { echo "build first: cargo build --release --workspace --bins"; exit 1; }

WIN="WARD_FLOW_WINDOW=5s"
lab_init
lab_add_wan_host web
lab_add_natted_host alice
lab_add_natted_host bob
lab_start_coordinator
for h in web alice bob; do LAB_WARD_WRAPPER="env $WIN" lab_start_device "$h"; done
lab_coord user add alice --group eng >/dev/null 2>&1
lab_coord user add bob >/dev/null 2>&1
lab_device_up web "$(lab_token --tag web --hostname web)" >/dev/null
for h in alice bob; do lab_device_up "$h" "$(lab_token --user "$h")" >/dev/null; done
cat >"$LAB_DIR/policy.toml" <<'TOML'
# The suggest lab's policy.
[groups]
eng = ["alice"]

[services.app]
devices = ["tag:web"]
ports = ["tcp/8000-8100"]

[services.ssh]
devices = ["tag:web"]
ports = ["tcp/22"]

[[rules]]
name = "eng-app"
from = ["group:eng"]
to = ["app"]

[[tests]]
from = "alice"
allow = ["app:8080"]
TOML
check "policy applied" lab_coord policy apply "$LAB_DIR/policy.toml"
# bob's grant makes web his peer (so his attempts on app reach web's filter), and is never used.
GID=$(lab_coord grant add --from bob --to ssh --for 30m --reason "suggest test" 2>/dev/null)
check "grant for bob -> ssh ($GID)" test -n "$GID"
WEB4=$(lab_ward_ipv4 web)
for h in alice bob; do lab_ward_wait_peer "$h" "$WEB4"; done

cat >"$LAB_DIR/tool.py" <<'PY'
import json, socket, sys, threading
cmd = sys.argv[1]
if cmd == "sink":  # accept on tcp/8080, read to the end
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 8080)); s.listen(64)
    while True:
        c, _ = s.accept()
        def drain(c=c):
            while c.recv(65536): pass
            c.close()
        threading.Thread(target=drain, daemon=True).start()
elif cmd == "tcp":  # tcp HOST PORT BYTES
    s = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=10)
    s.sendall(b"w" * int(sys.argv[4])); s.shutdown(socket.SHUT_WR)
    while s.recv(65536): pass
elif cmd == "get":  # get EXPR < JSON: evaluate EXPR over v
    v = json.load(sys.stdin)
    def flows(ini, port):
        return [f for f in v.get("flows", []) if f["initiator"] == ini and f["port"] == port]
    def conns(fs):
        return sum(max((f["initiator_counts"] or {}).get("connections", 0),
                       (f["responder_counts"] or {}).get("connections", 0)) for f in fs)
    def sug(kind, change):
        return [s["suggestion"] for s in v.get("suggestions", [])
                if s["suggestion"]["kind"] == kind and s["suggestion"]["change"]["change"] == change]
    print(eval(sys.argv[2], {"v": v, "flows": flows, "sug": sug, "conns": conns}))
PY
T="$LAB_DIR/tool.py"
get() { python3 "$T" get "$2" <"$LAB_DIR/$1.json"; }
lab_spawn web sink.log python3 "$T" sink
lab_wait_for lab_exec web sh -c "ss -ltn | grep -q ':8080 '"
tcp_ok() { lab_exec alice timeout 3 nc -z -w 2 "$WEB4" 8080 >/dev/null 2>&1; }
lab_wait_for -t 20 tcp_ok

say "workload: alice uses tcp/8080, bob is denied on it repeatedly, bob's grant is unused"
for _ in 1 2 3; do lab_exec alice python3 "$T" tcp "$WEB4" 8080 20000; done
for _ in 1 2 3 4; do lab_exec bob timeout 2 nc -z -w 1 "$WEB4" 8080 >/dev/null 2>&1; done
settled() {
    lab_coord flows --since 1h --limit 5000 --json >"$LAB_DIR/flows.json" 2>/dev/null &&
        test "$(get flows "$1")" = True
}
# Enough evidence to wait for: alice's three connections paired, bob's attempts counted by both
# ends (a span whose other end is still `pending` is not waited for: suggestions ignore it).
check "both ends' records arrive (alice paired, bob denied as both ends saw it)" \
    lab_wait_for -t 40 -i 1 settled \
    'conns([f for f in flows("alice", 8080) if f["status"] == "paired"]) >= 3 and conns([f for f in flows("bob", 8080) if f["status"] == "denied" and f["initiator_counts"] and f["responder_counts"]]) >= 3'

say "policy suggest"
lab_coord policy suggest --since 1h --min-days 1 | sed 's/^/    /'
lab_coord policy suggest --since 1h --min-days 1 --json >"$LAB_DIR/s.json"
check "expire the unused grant $GID" test "$(get s 'any(s["change"]["grant"] == "'"$GID"'" and s["confidence"] != "low" for s in sug("expire", "expire_grant"))')" = True
check "narrow app's tcp/8000-8100 to the used tcp/8080" test "$(get s '[s["change"]["ports"] for s in sug("narrow", "narrow_ports") if s["change"]["service"] == "app"]')" = "[[{'proto': 'tcp', 'port': 8080}]]"
ADD8080='[s for s in sug("add", "add_rule") if s["change"]["ports"] == [{"proto": "tcp", "port": 8080}]]'
check "bob's repeated denials flagged as a missing rule (user:bob -> device:web tcp/8080)" test "$(get s '[(s["change"]["from"], s["change"]["devices"], s["confidence"], s["evidence"]["flows"] >= 3) for s in '"$ADD8080"']')" = "[(['user:bob'], ['device:web'], 'medium', True)]"
check "the rule alice uses is not expired" test "$(get s 'sug("expire", "expire_rule")')" = "[]"

say "--write, policy check, policy replay"
lab_coord policy suggest --since 1h --min-days 1 --write "$LAB_DIR/cand.toml" | tail -n 3 | sed 's/^/    /'
sed 's/^/    | /' "$LAB_DIR/cand.toml"
check "the candidate keeps unchanged text (its first comment)" grep -q "^# The suggest lab's policy." "$LAB_DIR/cand.toml"
check "the candidate opens only tcp/8080 on app" grep -q '^ports = \["tcp/8080"\]' "$LAB_DIR/cand.toml"
check "the candidate pins alice's flow as a generated test" grep -q 'allow = \["app:8080/tcp"\]' "$LAB_DIR/cand.toml"
check "policy check accepts the candidate and its tests pass" lab_coord policy check "$LAB_DIR/cand.toml"
lab_coord policy replay "$LAB_DIR/cand.toml" --since 1h | sed 's/^/    /'
lab_coord policy replay "$LAB_DIR/cand.toml" --since 1h --json >"$LAB_DIR/r.json"
check "replay: the candidate denies nothing that was used" test "$(get r 'v["error"] is None and v["replay"]["newly_denied"] == [] and v["replay"]["unchanged"] > 0')" = True
check "replay: bob's denied port would be allowed" test "$(get r '[(f["initiator"], f["port"]["port"]) for f in v["replay"]["newly_allowed"] if f["port"]["proto"] == "tcp"]')" = "[('bob', 8080)]"

say "lifecycle"
SID=$(get s '[s["id"] for s in '"$ADD8080"'][0]')
check "dismiss $SID" lab_coord policy suggestions dismiss "$SID" --reason "bob goes through the bastion" --since 1h --min-days 1
lab_coord policy suggest --since 1h --min-days 1 --json >"$LAB_DIR/s2.json"
check "a dismissed suggestion leaves the list" test "$(get s2 "$ADD8080")" = "[]"
lab_coord policy suggestions ls --since 1h --min-days 1 --json >"$LAB_DIR/ls.json"
check "…and is listed as dismissed by suggestions ls" test "$(get ls '[(s["state"], s["hidden"]) for s in v["suggestions"] if s["suggestion"]["id"] == "'"$SID"'"]')" = "[('dismissed', True)]"
check "audit verify" lab_coord audit verify
AUD=$(lab_coord audit --json --limit 20 | python3 -c 'import json,sys; print(any(a["action"] == "suggestion.dismiss" for a in json.load(sys.stdin)))')
check "the dismissal is in the audit log" test "$AUD" = True

say "--write --shadow: the narrowing watched on live traffic before it is enforced"
lab_coord policy suggest --since 1h --min-days 1 --write "$LAB_DIR/shadow.toml" --shadow >/dev/null
check "the shadow candidate keeps eng-app enforced and watched for removal" grep -q '^shadow_remove = true' "$LAB_DIR/shadow.toml"
check "the shadow candidate adds the narrowed rule as a candidate" grep -q '^shadow = true' "$LAB_DIR/shadow.toml"
check "policy check accepts the shadow candidate" lab_coord policy check "$LAB_DIR/shadow.toml"
check "the shadow candidate is applied" lab_coord policy apply "$LAB_DIR/shadow.toml"
# alice keeps using tcp/8080 (inside the narrowed candidate) and now also opens tcp/8090: still
# in the enforced range, outside the candidate. Both keep passing the filter.
shadow_round() {
    lab_exec alice python3 "$T" tcp "$WEB4" 8080 20000 >/dev/null 2>&1
    lab_exec alice timeout 2 nc -z -w 1 "$WEB4" 8090 >/dev/null 2>&1
    settled "$1"
}
check "alice's tcp/8080 records say would-allow, her tcp/8090 records would-deny" \
    lab_wait_for -t 60 -i 1 shadow_round \
    'any(f.get("shadow") == "would-allow" for f in flows("alice", 8080)) and any(f.get("shadow") == "would-deny" and f["verdict"] == "allowed" for f in flows("alice", 8090))'
check "alice's tcp/8080 still works under the shadow candidate" lab_exec alice python3 "$T" tcp "$WEB4" 8080 20000

finish
