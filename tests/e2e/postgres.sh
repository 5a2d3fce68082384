#!/usr/bin/env bash
# Ward on PostgreSQL, end to end: a throw-away PostgreSQL cluster (initdb + pg_ctl under a
# temporary directory, unix socket only, as the postgres user), `init --database` and `serve`
# with the URL from WARD_DATABASE_URL (its password never written to config.json nor printed),
# two devices enrolled in a lab namespace pinging each other, their rows in PostgreSQL (and no
# ward.db), `policy apply` narrowing access (the ping stops), `audit verify`, and `serve`
# without the URL refused. Needs root; prints `N passed, N failed`.
set -uo pipefail
source "$(dirname "$0")/common.sh"
need_root
lab_have_ward || { echo "build first: cargo build --release --workspace --bins"; exit 1; }
source "$E2E_DIR/../lab/pg.sh"
pg_available || { echo "PostgreSQL not installed (Debian package postgresql)"; exit 1; }
T0=$SECONDS
P="$E2E_DIR/policies"

lab_init
cleanup_pg() {
    local rc=$?
    lab_cleanup
    pg_cleanup
    exit "$rc"
}
trap cleanup_pg EXIT

say "PostgreSQL"
pg_start || exit 1
psql_q() { pg_q "$1"; }
check "the cluster answers" test "$(psql_q 'SELECT 1')" = 1
# Trust authentication ignores the password: it is here to prove it is never written or shown.
SECRET=e2e-pw-$LAB_ID
export WARD_DATABASE_URL="postgresql://ward:$SECRET@/ward?host=$PGDIR"

say "init and serve on PostgreSQL"
lab_add_wan_host alice
lab_add_wan_host db
lab_start_coordinator
CDIR="$LAB_DIR/coordinator"
check "config.json records the database kind" grep -q '"database": "postgres"' "$CDIR/config.json"
check "no ward.db in the data directory" test ! -e "$CDIR/ward.db"
check "init shows the URL with the password redacted" grep -q "ward:\*\*\*@" "$LAB_DIR/logs/coordinator-init.log"
no_secret() { ! grep -rqF "$SECRET" "$CDIR" "$LAB_DIR/logs"; }
check "the password is in no file of the data directory and no log" no_secret
check "the schema is migrated (version row)" test "$(psql_q 'SELECT version > 0 FROM ward_schema')" = t

say "two devices"
lab_start_device alice
lab_start_device db
lab_coord user add alice --group eng >/dev/null 2>&1
lab_coord policy apply "$P/open-lab.toml" >/dev/null
lab_device_up alice "$(lab_token --user alice)" >/dev/null
lab_device_up db "$(lab_token --tag db --tag server)" >/dev/null
DB4=$(lab_ward_ipv4 db)
pings() { lab_exec alice ping -c1 -W1 "$DB4" >/dev/null 2>&1; }
check "alice pings db through the overlay" lab_wait_for -t 15 -i 0.2 pings
check "both devices are rows in PostgreSQL" test "$(psql_q 'SELECT count(*) FROM devices')" = 2
check "their tokens were redeemed in PostgreSQL" test "$(psql_q 'SELECT sum(uses_left) FROM tokens')" = 0

say "policy apply"
lab_coord policy apply "$P/base.toml" >/dev/null
check "the new policy version is stored in PostgreSQL" test "$(psql_q 'SELECT count(*) FROM policies')" = 2
no_ping() { ! pings; }
check "the narrower policy stops alice's ping to db" lab_wait_for -t 10 -i 0.2 no_ping
check "audit verify" lab_coord audit verify
check "audit rows are in PostgreSQL" test "$(psql_q 'SELECT count(*) > 5 FROM audit')" = t

say "refusals"
BIN=$(lab_ward_bin ward-coordinator)
OUT=$(env -u WARD_DATABASE_URL timeout 10 "$BIN" --data-dir "$CDIR" serve 2>&1)
RC=$?
check "serve without the database URL is refused" test "$RC" -ne 0
check "and says where the state is" grep -q "keeps its state in PostgreSQL" <<<"$OUT"
OUT=$(timeout 10 "$BIN" --data-dir "$LAB_DIR/second" init --public-addr 127.0.0.1:7443 2>&1)
RC=$?
check "a second init into the same database is refused" test "$RC" -ne 0
check "because it already holds an instance" grep -q "already holds a Ward instance" <<<"$OUT"
check "the refusals did not print the password" test "$(grep -cF "$SECRET" <<<"$OUT")" = 0
serves() { lab_coord device ls --json >/dev/null; }
check "the coordinator still serves" serves

echo "postgres.sh runtime: $((SECONDS - T0)) s"
finish
