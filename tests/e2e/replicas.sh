#!/usr/bin/env bash
# Two coordinator replicas of one instance on ONE database: replica 1 made by `init`, replica 2
# by `export-instance` / `import-instance` (its own data directory; the database shared). Devices
# a and b hold their sessions on replica 1, x and y on replica 2. A `policy apply` on replica 1
# changes x's access to y on replica 2 (20 applies timed from the command to x's netmap: p50/p99
# printed, p99 must be under 1 s), with real pings before and after; `device revoke a` on
# replica 2 takes a out of b's netmap on replica 1 within 2 s and b's ping to a stops; `status`
# on either replica lists both replicas alive with their sessions; `audit verify` passes on
# both; the import refuses a world-readable instance file; after `kill -9` of replica 2,
# replica 1's `status` shows it down; a posture verdict made on replica 2 reaches b on replica
# 1; a port scan by z (replica 2) of b (replica 1) and x (replica 2), whose accusers alone are
# each below the threshold, quarantines z through the evidence both replicas stored. Needs
# root; prints `N passed, N failed`.
#
# WARD_TEST_DB picks the shared database: `sqlite` (default: replica 2's ward.db is a symlink
# to replica 1's file; SQLite follows it, so both processes share one WAL) or `postgres` (a
# throw-away cluster from tests/lab/pg.sh; `init --database` and both `serve`s take its URL
# from WARD_DATABASE_URL; the feed wakes on LISTEN/NOTIFY, or polls every 150 ms with
# WARD_FEED_NOTIFY=false). `status` shows the database on both replicas.
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
        pg_available || { echo "replicas.sh: PostgreSQL not installed (Debian package postgresql); NOT run"; exit 1; }
        ;;
    *) echo "replicas.sh: WARD_TEST_DB must be sqlite or postgres, not $DB_KIND"; exit 1 ;;
esac

lab_init
if [[ "$DB_KIND" == postgres ]]; then
    cleanup_pg() {
        local rc=$?
        lab_cleanup
        pg_cleanup
        exit "$rc"
    }
    trap cleanup_pg EXIT
    pg_start || exit 1
fi
lab_add_wan_host c2
lab_add_wan_host a
lab_add_wan_host b
lab_add_wan_host x
lab_add_wan_host y
BIN=$(lab_ward_bin ward-coordinator)
D1="$LAB_DIR/coordinator"
D2="$LAB_DIR/replica2"
R1_ADDR="$(lab_ip wan):7443"
R2_ADDR="$(lab_ip c2):7443"
coord2() { lab_exec c2 "$BIN" --data-dir "$D2" "$@"; }
P="$E2E_DIR/policies"
TOOLS="$E2E_DIR/tools.py"

say "two replicas, one database ($DB_KIND)"
LAB_COORD_SERVE_ARGS="--listen $R1_ADDR" lab_start_coordinator
lab_coord export-instance "$LAB_DIR/instance.json" >"$LAB_DIR/export.log" 2>&1
check "export-instance writes the file 0600" test "$(stat -c %a "$LAB_DIR/instance.json" 2>/dev/null)" = 600
lease_hex=$(cat "$D1/lease.key")
check "export-instance prints no key" bash -c "! grep -qF '$lease_hex' '$LAB_DIR/export.log'"
cp "$LAB_DIR/instance.json" "$LAB_DIR/readable.json"
chmod 644 "$LAB_DIR/readable.json"
OUT=$(coord2 import-instance "$LAB_DIR/readable.json" 2>&1)
check "import-instance refuses a world-readable file" grep -q "readable by others" <<<"$OUT"
coord2 import-instance "$LAB_DIR/instance.json" >"$LAB_DIR/import.log" 2>&1
check "import-instance makes replica 2's data directory" test -f "$D2/ca.key" -a -f "$D2/lease.key"
check "replica 2 has the same CA" cmp -s "$D1/ca.der" "$D2/ca.der"
# The one database: SQLite resolves the symlink, so the -wal and -shm files are shared too;
# on PostgreSQL replica 2 serves with the same WARD_DATABASE_URL.
[[ "$DB_KIND" == sqlite ]] && ln -s "$D1/ward.db" "$D2/ward.db"
lab_spawn c2 replica2.log "$BIN" serve --data-dir "$D2" --listen "$R2_ADDR"
R2_PID=$(lab_last_pid)
check "replica 2 serves" lab_wait_for -t 20 coord2 device ls --json
lab_coord policy apply "$P/replicas-open.toml" >/dev/null

# Devices on replica 2 get a token naming replica 2's address (until tokens carry every
# replica's address): the same token, its address field rewritten.
retarget() {
    python3 - "$1" "$2" <<'PY'
import base64, sys
t, addr = sys.argv[1], sys.argv[2].encode()
b = t[len("ward1-"):]
raw = base64.urlsafe_b64decode(b + "=" * (-len(b) % 4))
rest = raw[1 + raw[0]:]
print("ward1-" + base64.urlsafe_b64encode(bytes([len(addr)]) + addr + rest).decode().rstrip("="))
PY
}
for h in a b x y; do lab_start_device "$h"; done
lab_enroll a --tag a >/dev/null
lab_enroll b --tag b >/dev/null
for h in x y; do
    tok=$(coord2 token create --tag "$h") || fail "token on replica 2"
    lab_device_up "$h" "$(retarget "$tok" "$R2_ADDR")" >/dev/null
done
A4=$(lab_ward_ipv4 a)
Y4=$(lab_ward_ipv4 y)
B4=$(lab_ward_ipv4 b)
check "b (replica 1) sees a" lab_ward_wait_peer b "$A4"
check "x (replica 2) sees y" lab_ward_wait_peer x "$Y4"
pings() { lab_exec "$1" ping -c1 -W1 "$2" >/dev/null; }
check "ping b -> a (both on replica 1)" lab_wait_for -t 15 pings b "$A4"
check "ping x -> y (both on replica 2)" lab_wait_for -t 15 pings x "$Y4"

status_json() { "$@" status --json 2>/dev/null; }
replicas_ok() {
    status_json "$@" | python3 -c '
import json, sys
s = json.load(sys.stdin)
r = {x["address"]: x for x in s["replicas"]}
ok = len(r) == 2 and all(x["alive"] for x in r.values())
ok = ok and r[sys.argv[1]]["sessions"] == 2 and r[sys.argv[2]]["sessions"] == 2
ok = ok and sum(1 for x in r.values() if x["this"]) == 1
sys.exit(0 if ok else 1)' "$R1_ADDR" "$R2_ADDR"
}
check "status on replica 1 lists both replicas alive, 2 sessions each" lab_wait_for -t 5 replicas_ok lab_coord
check "status on replica 2 lists both replicas alive, 2 sessions each" lab_wait_for -t 5 replicas_ok coord2
TXT=$(lab_coord status)
check "status (text) has a line per replica" test "$(grep -c '^replica ' <<<"$TXT")" = 2
db_ok() {
    status_json "$@" | python3 -c '
import json, sys
d = json.load(sys.stdin)["database"]
kind, pg = sys.argv[1], sys.argv[1] == "postgres"
want_listen = pg and sys.argv[2] != "false"
ok = d["backend"] == kind and d["reachable"] and d["schema_version"] > 0
ok = ok and d["round_trip_ms"] is not None and d["error"] is None
ok = ok and (d["listener"] or {}).get("listening", False) == want_listen
ok = ok and (d["location"].endswith("/ward") if pg else d["location"].endswith("ward.db"))
sys.exit(0 if ok else 1)' "$DB_KIND" "${WARD_FEED_NOTIFY:-true}"
}
check "status on replica 1 shows the $DB_KIND database reachable, its schema, a round trip" lab_wait_for -t 5 db_ok lab_coord
check "status on replica 2 shows the same" lab_wait_for -t 5 db_ok coord2
no_password() { ! grep -qF "pw-$LAB_ID" <<<"$(lab_coord status; lab_coord status --json)"; }
check "status has a database line and never the password" \
    bash -c 'grep -q "^database .*reachable schema=" <<<"$1"' _ "$TXT"
check "status never shows the database password" no_password

say "policy apply on replica 1 reaches x on replica 2 (20 applies)"
COORD1=(ip netns exec "$(lab_ns wan)" "$BIN" --data-dir "$D1")
WARDX=("$(lab_ward_bin ward)" --socket "$(lab_ward_socket x)")
python3 "$E2E_DIR/replicas_measure.py" applies 20 "${COORD1[@]}" -- "${WARDX[@]}" -- \
    "$P/replicas-open.toml" "$P/replicas-closed.toml" y >"$LAB_DIR/applies.log" 2>&1
RC=$?
sed 's/^/    /' "$LAB_DIR/applies.log"
check "every apply reached x's netmap" test "$RC" = 0
P99=$(sed -n 's/.*P99_MS=\([0-9]*\).*/\1/p' "$LAB_DIR/applies.log")
check "p99 under 1 s (${P99:-?} ms)" test "${P99:-99999}" -lt 1000
# 20 applies end on the open policy: x reaches y again; then closed for real traffic.
check "ping x -> y after the last (opening) apply" lab_wait_for -t 10 pings x "$Y4"
lab_coord policy apply "$P/replicas-closed.toml" >/dev/null
nopings() { ! pings "$1" "$2"; }
check "no ping x -> y once replica 1 closed it" lab_wait_for -t 5 nopings x "$Y4"
check "b -> a still pings" pings b "$A4"

say "device revoke on replica 2 cuts a on replica 1"
COORD2=(ip netns exec "$(lab_ns c2)" "$BIN" --data-dir "$D2")
WARDB=("$(lab_ward_bin ward)" --socket "$(lab_ward_socket b)")
python3 "$E2E_DIR/replicas_measure.py" gone "${COORD2[@]}" -- "${WARDB[@]}" -- a b >"$LAB_DIR/revoke.log" 2>&1
RC=$?
sed 's/^/    /' "$LAB_DIR/revoke.log"
check "a left b's netmap" test "$RC" = 0
REV=$(sed -n 's/.*REVOKE_MS=\([0-9]*\).*/\1/p' "$LAB_DIR/revoke.log")
check "within 2 s (${REV:-?} ms)" test "${REV:-99999}" -lt 2000
check "ping b -> a stops" lab_wait_for -t 5 nopings b "$A4"
online1() { [[ "$(status_json lab_coord | python3 -c 'import json,sys; print(json.load(sys.stdin)["online"])')" == "$1" ]]; }
check "replica 1 closed a's session (1 online there)" lab_wait_for -t 3 online1 1
revoked_log() { grep -q "device has been revoked\|revoked" "$LAB_DIR/logs/ward-a.log"; }
check "a's agent heard it was revoked" lab_wait_for -t 5 revoked_log

say "one audit log"
check "audit verify on replica 1" lab_coord audit verify
check "audit verify on replica 2" coord2 audit verify
both_logged() { grep -q '"device.revoke"' <<<"$(lab_coord audit --json 2>/dev/null)"; }
check "replica 2's revoke is in the log replica 1 reads" both_logged
answers() { "$@" status >/dev/null 2>&1; }
check "replica 1 still answers" answers lab_coord
check "replica 2 still answers" answers coord2

say "a replica that stops is shown down"
kill -9 "$R2_PID" 2>/dev/null
r2_down() {
    status_json lab_coord | python3 -c '
import json, sys
r = {x["address"]: x for x in json.load(sys.stdin)["replicas"]}
sys.exit(0 if not r[sys.argv[1]]["alive"] and r[sys.argv[2]]["alive"] else 1)' "$R2_ADDR" "$R1_ADDR"
}
check "status on replica 1 shows replica 2 down within 8 s, itself alive" lab_wait_for -t 8 r2_down
check "audit verify on replica 1 after replica 2 died" lab_coord audit verify

say "a posture verdict made on replica 2 reaches b on replica 1"
# Replica 2 again (same data directory, same id); z enrolls on it. z reaches b (replica 1) only
# while its posture passes: z's posture is judged on replica 2, b's netmap is made by replica 1.
lab_spawn c2 replica2-again.log "$BIN" serve --data-dir "$D2" --listen "$R2_ADDR"
R2_PID=$(lab_last_pid)
check "replica 2 serves again" lab_wait_for -t 20 coord2 device ls --json
ZMARK="$LAB_DIR/z-posture-ok"
touch "$ZMARK"
cat >"$LAB_DIR/replicas-posture.toml" <<TOML
# replicas.sh: z may ping b only while the file $ZMARK exists on z.
[posture.marker]
files = [{ path = "$ZMARK" }]

[services.b]
devices = ["tag:b"]
ports = ["icmp"]

[[rules]]
name = "z-b"
from = ["tag:z"]
to = ["b"]
posture = ["marker"]
TOML
check "the posture-gated policy applies (on replica 1)" lab_coord policy apply "$LAB_DIR/replicas-posture.toml"
lab_add_wan_host z
lab_start_device z
tok=$(coord2 token create --tag z) || fail "token for z on replica 2"
lab_device_up z "$(retarget "$tok" "$R2_ADDR")" >/dev/null
Z4=$(lab_ward_ipv4 z)
sessions_on() {
    status_json "$1" | python3 -c '
import json, sys
r = {x["address"]: x for x in json.load(sys.stdin)["replicas"]}
sys.exit(0 if r[sys.argv[1]]["sessions"] >= 1 else 1)' "$2"
}
check "z holds its session on replica 2" lab_wait_for -t 10 sessions_on lab_coord "$R2_ADDR"
check "b (replica 1) sees z while z's posture passes on replica 2" lab_ward_wait_peer b "$Z4" 15
peer_online() {
    lab_ward b status --json | python3 -c '
import json, sys
p = [p for p in json.load(sys.stdin).get("peers", []) if p["ipv4"] == sys.argv[1]]
sys.exit(0 if p and p[0].get("online") else 1)' "$Z4"
}
check "b's netmap shows z online (its session is on replica 2)" lab_wait_for -t 5 peer_online
check "ping z -> b" lab_wait_for -t 15 pings z "$B4"
z_listed_online() {
    "$@" device ls --json 2>/dev/null | python3 -c '
import json, sys
d = json.load(sys.stdin)
d = d.get("devices", d) if isinstance(d, dict) else d
sys.exit(0 if any(x["hostname"] == "z" and x["online"] for x in d) else 1)'
}
check "device ls on replica 1 lists z online" lab_wait_for -t 3 z_listed_online lab_coord
check "device ls on replica 2 lists z online" z_listed_online coord2
python3 "$E2E_DIR/replicas_measure.py" posture "${COORD1[@]}" -- "${WARDB[@]}" -- "$ZMARK" z \
    >"$LAB_DIR/posture.log" 2>&1
RC=$?
sed 's/^/    /' "$LAB_DIR/posture.log"
check "z's failing and passing posture reached b's netmap" test "$RC" = 0
CROSS=$(sed -n 's/.*CROSS_FAIL_MS=\([0-9]*\).*/\1/p' "$LAB_DIR/posture.log")
check "replica 2's failing verdict reached b on replica 1 within 1 s (${CROSS:-?} ms)" test "${CROSS:-99999}" -lt 1000
CROSSB=$(sed -n 's/.*CROSS_BACK_MS=\([0-9]*\).*/\1/p' "$LAB_DIR/posture.log")
check "and its passing verdict within 1 s (${CROSSB:-?} ms)" test "${CROSSB:-99999}" -lt 1000
check "ping z -> b works again" lab_wait_for -t 10 pings z "$B4"
rm -f "$ZMARK"
check "no ping z -> b while z's posture fails" lab_wait_for -t 5 nopings z "$B4"
touch "$ZMARK"
check "ping z -> b once it passes again" lab_wait_for -t 10 pings z "$B4"

say "a port scan whose accusers hold their sessions on different replicas is caught"
# z (replica 2) may ping b (replica 1) and reach x (replica 2) on tcp/7, so both see its scan.
# Each accuser weighs at most half of scan_denied_flows: neither replica's own reports reach
# it, only the evidence both stored together does. Replica 2, holding z's session, decides.
cat >"$LAB_DIR/replicas-scan.toml" <<'TOML'
# replicas.sh: z's scan of b (replica 1) and x (replica 2).
[services.b]
devices = ["tag:b"]
ports = ["icmp"]

[services.x]
devices = ["tag:x"]
ports = ["tcp/7"]

[[rules]]
name = "z-b"
from = ["tag:z"]
to = ["b"]

[[rules]]
name = "z-x"
from = ["tag:z"]
to = ["x"]

[trust]
scan_denied_flows = 20
scan_window = "60s"
TOML
check "the scan policy applies (on replica 1)" lab_coord policy apply "$LAB_DIR/replicas-scan.toml"
X4=$(lab_ward_ipv4 x)
check "b (replica 1) has z as a peer" lab_ward_wait_peer b "$Z4" 15
check "x (replica 2) has z as a peer" lab_ward_wait_peer x "$Z4" 15
check "ping z -> b before the scan" lab_wait_for -t 10 pings z "$B4"
lab_exec z python3 "$TOOLS" scan "$B4" 1000 1029 | sed 's/^/  /'
lab_exec z python3 "$TOOLS" scan "$X4" 2000 2029 | sed 's/^/  /'
SCANNED=$(now_ms)
z_state() {
    "$@" device ls --json 2>/dev/null | python3 -c '
import json, sys
d = json.load(sys.stdin)
d = d.get("devices", d) if isinstance(d, dict) else d
print([x["state"] for x in d if x["hostname"] == "z"][0])'
}
z_quarantined() { [[ $(z_state lab_coord) == quarantined ]]; }
check "z is quarantined within 15 s of its scan" lab_wait_for -t 15 -i 0.2 z_quarantined
QMS=$(($(now_ms) - SCANNED))
echo "    scan end -> quarantine listed on replica 1: ${QMS} ms (includes the agents' denied-flow reporting)"
check "replica 2 lists z quarantined too" test "$(z_state coord2)" = quarantined
check "the quarantine names both accusers (b on replica 1, x on replica 2)" python3 -c '
import json, sys
a = [e for e in json.load(sys.stdin) if e["action"] == "device.quarantine" and e["target"] == "z"]
r = a[-1]["detail"]["quarantine"]["reason"] if a else ""
print("   ", r)
assert a and a[-1]["detail"]["quarantine"]["automatic"] and "scan" in r and "to 2 device(s)" in r, a' \
    <<<"$(lab_coord audit --limit 100000 --json)"
check "replica 2 (holding z) decided it, replica 1 did not" bash -c "
    grep -q 'quarantining device automatically' '$LAB_DIR/logs/replica2-again.log' &&
    ! grep -q 'quarantining device automatically' '$LAB_DIR/logs/coordinator.log'"
check "quarantined z no longer pings b" lab_wait_for -t 5 nopings z "$B4"

echo "replicas.sh runtime: $((SECONDS - T0)) s"
finish
