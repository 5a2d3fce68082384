#!/usr/bin/env bash
# tests/e2e/replicas.sh with both replicas on a throw-away PostgreSQL cluster (WARD_TEST_DB=postgres):
# the same checks as on SQLite. Without PostgreSQL installed it prints SKIPPED and passes,
# unless WARD_REQUIRE_PG=1, which makes that a failure.
set -uo pipefail
if [[ ! -x "${PGBIN:-/usr/lib/postgresql/15/bin}/initdb" ]]; then
    if [[ "${WARD_REQUIRE_PG:-}" == 1 ]]; then
        echo "replicas_pg.sh: FAILED: WARD_REQUIRE_PG=1 but PostgreSQL is not installed (Debian package postgresql)"
        exit 1
    fi
    echo "replicas_pg.sh: SKIPPED: PostgreSQL is not installed (Debian package postgresql)"
    exit 0
fi
WARD_TEST_DB=postgres exec bash "$(dirname "$0")/replicas.sh" "$@"
