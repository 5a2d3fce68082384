#!/usr/bin/env bash
# Continuous identity with two coordinator replicas on one PostgreSQL database, against a real
# OpenID provider (oidc-provider, tests/oidc) that rotates refresh tokens on every use (a
# rotated token used a second time is refused, as real providers do). alice signs in with
# `ward up --login` on replica A; both replicas run the refresh loop every 2 s, but one replica
# at a time holds the claim on her refresh (stored in the database), so her token is never used
# twice: after several rounds on both replicas she still reaches db, the provider refused no
# refresh, and the claim has one holder. `kill -9` of the holder: the other replica takes the
# claim over (its device moves there) and keeps refreshing: disabling alice at the provider then
# cuts her access through the survivor's refresh alone. Needs root, node and PostgreSQL (without
# PostgreSQL: SKIPPED, or a failure with WARD_REQUIRE_PG=1); prints `N passed, N failed`.
set -uo pipefail
source "$(dirname "$0")/common.sh"
need_root
lab_have_ward || { echo "build first: cargo build --release --workspace --bins"; exit 1; }
command -v node >/dev/null || { echo "SKIPPED: oidc_replicas.sh needs node (tests/oidc); it was NOT run"; exit 0; }
source "$E2E_DIR/../lab/pg.sh"
pg_require oidc_replicas.sh
TOOLS="$E2E_DIR/tools.py"
T0=$SECONDS

lab_init
pg_lab_start || exit 1
lab_add_wan_host ca
lab_add_wan_host cb
lab_add_wan_host idp
lab_add_wan_host db
lab_add_wan_host alice
A=$(lab_hostport "$(lab_ip ca)" 7443)
B=$(lab_hostport "$(lab_ip cb)" 7443)
COORD_BIN=$(lab_ward_bin ward-coordinator)
ADIR="$LAB_DIR/coordinator"
BDIR="$LAB_DIR/coordinator-b"
# shellcheck source=../oidc/idp.sh
source "$(lab_repo_root)/tests/oidc/idp.sh"
idp_prepare idp '[{"sub": "u-alice", "username": "alice", "password": "alice-pw",
  "email": "alice@example.test", "groups": ["eng"]}]' ||
    { fail "the provider's files (node, npm ci in tests/oidc)"; finish; exit 1; }
idp_start idp --rt-rotation always || { fail "the provider starts"; finish; exit 1; }
OIDC_ARGS="$(idp_rp_args) --oidc-refresh-interval 2s"

say "two replicas on PostgreSQL, both refreshing every 2 s"
LAB_COORD_PUBLIC_ADDR="$A,$B" LAB_COORD_SERVE_ARGS="$OIDC_ARGS" lab_start_coordinator ca
APID=$(lab_pids ca | head -n1)
CA_SHA=$(awk '/CA sha256/ {print $NF}' "$LAB_DIR/logs/coordinator-init.log")
mkdir -p "$BDIR"
chmod 700 "$BDIR"
for f in "$ADIR"/*; do
    case "$(basename "$f")" in
        admin.sock | replica.id) ;;
        *) [[ -f "$f" ]] && cp -p "$f" "$BDIR/" ;;
    esac
done
# shellcheck disable=SC2086 # OIDC_ARGS is a list of flags
lab_spawn cb coordinator-b.log "$COORD_BIN" serve --data-dir "$BDIR" $OIDC_ARGS
BPID=$LAB_LAST_PID
coord_b() { lab_exec cb "$COORD_BIN" --data-dir "$BDIR" "$@"; }
check "replica B serves beside A" lab_wait_for -t 20 coord_b device ls --json
cat >"$LAB_DIR/policy.toml" <<'TOML'
[groups]
eng = []

[services.db]
devices = ["tag:db"]
ports = ["tcp/5432"]

[[rules]]
name = "eng-db"
from = ["group:eng"]
to = ["db"]
TOML
check "policy applies" lab_coord policy apply "$LAB_DIR/policy.toml"
lab_start_device db
lab_enroll db --tag db >/dev/null
lab_spawn db serve.log python3 "$TOOLS" serve 5432
DB4=$(lab_ward_ipv4 db)

say "alice signs in on replica A (device authorization grant)"
lab_start_device alice
lab_spawn alice up.log "$(lab_ward_bin ward)" --socket "$(lab_ward_socket alice)" up --login \
    --coordinator "$A" --ca-sha256 "$CA_SHA" --hostname alice
lab_wait_for -t 20 grep -qE 'To sign in, open:|rror' "$LAB_DIR/logs/up.log"
URI=$(awk '/To sign in, open:/ {print $NF}' "$LAB_DIR/logs/up.log")
[[ -n "$URI" ]] && lab_exec idp python3 "$OIDC/login.py" device --uri "$URI" --user alice \
    --password alice-pw --ca-file "$IDP_CA" >/dev/null 2>&1
lab_wait_for -t 30 grep -qE '^up:|rror' "$LAB_DIR/logs/up.log"
check "alice is enrolled for the signed-in user" grep -q '^up: alice' "$LAB_DIR/logs/up.log"
sees() { lab_exec alice python3 "$TOOLS" await "$DB4" 5432 "$1" "$(now_ms)" "${2:-10}" >/dev/null; }
check "alice -> db:5432 opens (group eng from the provider)" sees open 20

say "several refresh rounds on both replicas: one holder, no refusal"
ids() { printf "%s\n%s\n" "$(cat "$ADIR/replica.id")" "$(cat "$BDIR/replica.id")"; }
holder() { pg_q "SELECT coalesce(refresh_holder, '') FROM oidc_users"; }
last_refresh() { pg_q "SELECT coalesce(last_refresh_ms, 0) FROM oidc_users"; }
has_holder() { [[ -n "$(holder)" ]]; }
check "a replica claims alice's refresh" lab_wait_for -t 10 has_holder
H1=$(holder)
check "the holder is one of the two replicas" grep -qx "$H1" <<<"$(ids)"
R0=$(last_refresh)
refreshed_since() { (($(last_refresh) > $1)); }
# Four rounds (2 s each) on both replicas; each round refreshes through the holder alone.
sleep 8
check "alice's refresh ran again (last_refresh advanced)" refreshed_since "$R0"
check "the holder did not change while it lives" test "$(holder)" = "$H1"
REFUSED=$(grep -c "identity provider changed the user's access" "$LAB_DIR/logs/coordinator.log" "$LAB_DIR/logs/coordinator-b.log" | awk -F: '{s += $2} END {print s + 0}')
check "no replica saw a refused refresh (rotated tokens never reused)" test "$REFUSED" = 0
check "alice is not suspended" test "$(pg_q 'SELECT provider_disabled FROM oidc_users')" = 0
check "alice -> db:5432 still open" sees open 5

say "kill -9 the holder: the other replica takes the refresh over"
if [[ "$H1" == "$(cat "$ADIR/replica.id")" ]]; then
    HPID=$APID SURVIVOR=$(cat "$BDIR/replica.id") SLOG=coordinator-b.log
else
    HPID=$BPID SURVIVOR=$(cat "$ADIR/replica.id") SLOG=coordinator.log
fi
KILL_MS=$(now_ms)
kill -9 "$HPID"
# The claim outlives two rounds plus 10 s (14 s): then the survivor claims it.
survivor_holds() { [[ "$(holder)" == "$SURVIVOR" ]]; }
if lab_wait_for -t 30 -i 0.5 survivor_holds; then
    echo "  the survivor holds the claim $(($(now_ms) - KILL_MS)) ms after kill -9 of the holder"
    pass "the survivor takes the claim over after the holder's ran out"
else
    fail "the survivor takes the claim over after the holder's ran out (holder: $(holder))"
fi
R1=$(last_refresh)
check "the survivor refreshes alice" lab_wait_for -t 10 refreshed_since "$R1"
check "alice -> db:5432 still open after the failover" sees open 20

say "disabled at the provider: cut through the survivor's refresh alone"
lab_exec idp python3 "$OIDC/admin.py" disable u-alice >/dev/null
check "alice -> db:5432 shuts within 10 s" sees closed 10
check "the survivor made the verdict" grep -q "identity provider changed the user's access" "$LAB_DIR/logs/$SLOG"
if [[ "$SLOG" == coordinator-b.log ]]; then
    check "audit verify passes on the survivor" coord_b audit verify
else
    check "audit verify passes on the survivor" lab_coord audit verify
fi

echo "  runtime $((SECONDS - T0)) s"
finish
