#!/usr/bin/env bash
# tests/e2e/failover.sh with both replicas on a throw-away PostgreSQL cluster (WARD_TEST_DB=postgres):
# the same checks as on SQLite. Without PostgreSQL installed it prints SKIPPED and passes,
# unless WARD_REQUIRE_PG=1, which makes that a failure.
set -uo pipefail
source "$(dirname "$0")/../lab/pg.sh"
pg_variant failover_pg.sh "$(dirname "$0")/failover.sh" "$@"
