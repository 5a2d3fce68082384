# A throw-away PostgreSQL cluster for lab tests (source after common.sh / lab.sh).
#
#   pg_available          0 when the Debian postgresql binaries are installed
#   pg_start              initdb + start under a temp directory (unix socket only, fsync off,
#                         the postgres user), create database `ward`, export PGDIR and
#                         WARD_DATABASE_URL (trust auth: the password in it is a marker)
#   pg_q SQL              one query, unaligned tuples-only output
#   pg_stop_fast          stop the server now (`-m immediate`: like a crash); PGDIR stays
#   pg_start_again        start the stopped server on the same data
#   pg_cleanup            stop and remove everything (call from the script's EXIT trap)
#   pg_lab_start          after lab_init: an EXIT trap tearing down the lab and the cluster,
#                         then pg_start
#   pg_require NAME       returns when PostgreSQL is installed; else NAME prints SKIPPED and
#                         exits 0 (or fails when WARD_REQUIRE_PG=1)
#   pg_variant NAME SCRIPT [ARGS]
#                         runs SCRIPT with WARD_TEST_DB=postgres (its replicas on a cluster of
#                         its own); without PostgreSQL installed NAME prints SKIPPED and exits
#                         0, or fails when WARD_REQUIRE_PG=1
#
# Coordinators in lab namespaces reach the server through its unix socket: a socket bound to a
# file path is not network-namespaced.
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
PGDIR=""

pg_available() { [[ -x "$PGBIN/initdb" && -x "$PGBIN/pg_ctl" ]]; }

# pg_require NAME: returns when PostgreSQL is installed; otherwise NAME prints SKIPPED and the
# script exits 0, or it fails when WARD_REQUIRE_PG=1.
pg_require() {
    pg_available && return 0
    if [[ "${WARD_REQUIRE_PG:-}" == 1 ]]; then
        echo "$1: FAILED: WARD_REQUIRE_PG=1 but PostgreSQL is not installed (Debian package postgresql)"
        exit 1
    fi
    echo "$1: SKIPPED: PostgreSQL is not installed (Debian package postgresql)"
    exit 0
}

pg_variant() {
    local name="$1" script="$2"
    shift 2
    pg_require "$name"
    WARD_TEST_DB=postgres exec bash "$script" "$@"
}

_pg() { runuser -u postgres -- "$PGBIN/$1" "${@:2}"; }

pg_start_again() {
    _pg pg_ctl -D "$PGDIR/data" -o "-k $PGDIR -c listen_addresses='' -c fsync=off -c max_connections=200 -c track_commit_timestamp=on" \
        -l "$PGDIR/server.log" -w start >/dev/null || { cat "$PGDIR/server.log" >&2; return 1; }
}

pg_start() {
    PGDIR=$(mktemp -d /tmp/ward-pg-lab.XXXXXX)
    chown postgres "$PGDIR"
    _pg initdb -D "$PGDIR/data" -A trust -U ward -E UTF8 --no-sync >"$PGDIR/initdb.log" 2>&1 ||
        { cat "$PGDIR/initdb.log" >&2; return 1; }
    pg_start_again || return 1
    _pg createdb -h "$PGDIR" -U ward ward || return 1
    export PGDIR
    export WARD_DATABASE_URL="postgresql://ward:pw-${LAB_ID:-lab}@/ward?host=$PGDIR"
}

# pg_lab_start: for a script whose lab always uses PostgreSQL (after lab_init): tear down the
# lab and the cluster on exit (keeping the script's exit status), then pg_start.
pg_lab_start() {
    trap '_pg_lab_exit' EXIT
    pg_start
}

_pg_lab_exit() {
    local rc=$?
    lab_cleanup
    pg_cleanup
    exit "$rc"
}

pg_q() { _pg psql -h "$PGDIR" -U ward -d ward -At -c "$1"; }

pg_stop_fast() { _pg pg_ctl -D "$PGDIR/data" -m immediate stop >/dev/null 2>&1; }

pg_cleanup() {
    [[ -n "$PGDIR" && -d "$PGDIR" ]] || return 0
    pg_stop_fast
    rm -rf "$PGDIR"
    PGDIR=""
}
