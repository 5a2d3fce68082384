#!/usr/bin/env bash
# The control-plane load of bench/load.sh twice in one run, side by side: N real device sessions
# against one coordinator on SQLite, then against two replicas of `ward-coordinator serve` on
# one throw-away PostgreSQL cluster (tests/lab/pg.sh), the tool assigning device i to replica
# i mod 2 (its enrollment and its session; admin commands go to replica 1, so replica 2 learns
# every change through the database). Prints one table: enrollment, sessions up, a policy
# change reaching every session (p50/p99/max), revocation, and each process's CPU and peak RSS.
# See bench/README.md ("ha_scale.sh").
#
#   sudo bench/ha_scale.sh [--sessions N] [--smoke] [-- TOOL OPTIONS]
#
#   --sessions N   device sessions in each setup (default 1000)
#   --smoke        10 sessions, 1 s of steady state, checked (`load --check`): a rot check of
#                  seconds (bench/smoke.sh runs it)
#   -- …           passed to the tool in both runs (client/examples/load.rs, `--help` there)
#
# Needs root (the PostgreSQL cluster runs as the postgres user) and the Debian package
# postgresql; without either it prints SKIPPED and exits 0 (WARD_REQUIRE_PG=1: exit 1).
# Builds what it runs unless WARD_BIN_DIR names a directory holding ward-coordinator and
# examples/load. Writes the table and both runs' JSON to bench/results/ha_scale-N-DATE.*
# (not with --smoke). Every run uses --no-restart (the kill -9 resync is bench/load.sh's).
set -euo pipefail
cd "$(dirname "$0")/.."

sessions=1000
smoke=0
extra=()
while (($#)); do
    case "$1" in
    --sessions) sessions="$2"; shift 2 ;;
    --smoke) smoke=1; shift ;;
    --) shift; extra=("$@"); break ;;
    -h | --help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "ha_scale.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

skip() {
    if [[ "${WARD_REQUIRE_PG:-}" == 1 ]]; then
        echo "ha_scale.sh: FAILED: WARD_REQUIRE_PG=1 but $1" >&2
        exit 1
    fi
    echo "ha_scale.sh: SKIPPED: $1; nothing was measured"
    exit 0
}
[[ $EUID -eq 0 ]] || skip "needs root (the PostgreSQL cluster runs as the postgres user)"
source tests/lab/pg.sh
pg_available || skip "PostgreSQL is not installed (Debian package postgresql)"

if [[ -z "${WARD_BIN_DIR:-}" ]]; then
    echo "== building (release): workspace binaries and the load example"
    cargo build --locked --release --workspace --bins --example dp_pair --example netmap_bench --example load
fi
bin_dir="${WARD_BIN_DIR:-target/release}"
tool="$bin_dir/examples/load"
coord="$bin_dir/ward-coordinator"
[[ -x "$tool" && -x "$coord" ]] || { echo "ha_scale.sh: $tool or $coord missing" >&2; exit 1; }
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

work=$(mktemp -d "${TMPDIR:-/tmp}/ward-ha-scale.XXXXXX")
tool_pid=""
cleanup() {
    local rc=$?
    if [[ -n "$tool_pid" ]] && kill -0 "$tool_pid" 2>/dev/null; then
        kill "$tool_pid" 2>/dev/null || true
        wait "$tool_pid" 2>/dev/null || true
    fi
    # Coordinators the tool left behind (it died first): only the PIDs its files name, and
    # only while that process is still ours (its command line names our work directory).
    local f pid
    for f in "$work"/*/*.pid; do
        [[ -f "$f" ]] || continue
        pid=$(cat "$f")
        if [[ "$pid" =~ ^[0-9]+$ ]] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "$work/"; then
            kill -9 "$pid" 2>/dev/null || true
        fi
    done
    pg_cleanup
    if [[ "${KEEP:-0}" == 1 || $rc -ne 0 ]]; then
        echo "ha_scale.sh: kept $work (the coordinators' logs)" >&2
    else
        rm -rf "$work"
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

args=(--sessions "$sessions" --coordinator "$coord" --no-restart)
if ((smoke)); then
    sessions=10
    args=(--sessions 10 --coordinator "$coord" --no-restart --steady 1 --revocations 1 --check)
fi

# run NAME ENV [TOOL ARGS...]: one setup (ENV: one `env` argument), its JSON in
# $work/NAME.json; the tool's exit code.
run() {
    local name="$1" envarg="$2" rc=0
    shift 2
    mkdir -p "$work/$name"
    echo "== $name: $sessions sessions; machine load before: $(cut -d' ' -f1-3 /proc/loadavg) ($(nproc) cores)"
    local t0=$SECONDS
    env "$envarg" "$tool" "${args[@]}" "$@" --work-dir "$work/$name" --json "$work/$name.json" "${extra[@]}" &
    tool_pid=$!
    wait "$tool_pid" || rc=$?
    tool_pid=""
    echo "== $name: done in $((SECONDS - t0)) s (exit $rc); machine load after: $(cut -d' ' -f1-3 /proc/loadavg)"
    return $rc
}

failed=0
run sqlite -uWARD_DATABASE_URL || failed=1
pg_start || { echo "ha_scale.sh: PostgreSQL did not start" >&2; exit 1; }
# `init` makes a PostgreSQL instance when WARD_DATABASE_URL is set; both replicas serve on it.
run pg2 "WARD_DATABASE_URL=$WARD_DATABASE_URL" --replicas 2 || failed=1

table=$(python3 - "$work/sqlite.json" "$work/pg2.json" "$sessions" <<'PY'
import json, sys
def load(p):
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}
s, p, n = load(sys.argv[1]), load(sys.argv[2]), sys.argv[3]
def g(d, *path):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d
def ms(v):
    return "-" if v is None else f"{v:.0f}"
def col(d):
    e, o, pc = g(d, "enroll") or {}, g(d, "open") or {}, g(d, "policy_change") or {}
    rv = g(d, "revoke") or {}
    reps = g(d, "replicas") or []
    rows = [
        f"{e.get('enrolled', '-')} in {e.get('secs', 0):.1f} s ({e.get('per_sec', 0):.0f}/s)",
        f"{o.get('up', '-')} of {e.get('enrolled', '-')}, p99 {ms(o.get('p99_ms'))} ms",
        f"{o.get('netmap_bytes_mean', 0)/1e3:.0f} KB, {o.get('peers_mean', 0):.0f} peers",
        f"{pc.get('reached', '-')} of {pc.get('sessions', '-')}",
        f"{ms(pc.get('p50_ms'))} / {ms(pc.get('p99_ms'))} / {ms(pc.get('max_ms'))}",
        f"{ms(pc.get('apply_command_ms'))}",
        f"{rv.get('device_reached', '-')}/{rv.get('targets', '-')}, peers {rv.get('peers_reached', '-')}/{rv.get('peer_sessions', '-')} p99 {ms(rv.get('peers_p99_ms'))} ms",
    ]
    for i in range(2):
        if i < len(reps):
            r = reps[i]
            rows.append(f"{r['cpu_s']:.1f} cpu s, peak {r['peak_rss_mib']:.0f} MiB")
        else:
            rows.append("")
    tot = g(d, "coordinator_total") or {}
    rows.append(f"{tot.get('tool_cpu_s', 0):.1f} cpu s")
    rows.append(f"{g(d, 'load_before') or '-'} -> {g(d, 'load_after') or '-'}")
    return rows
names = ["enrolled", "sessions up (first netmap)", "first netmap (mean)",
         "policy change reached", "policy change p50/p99/max ms", "policy apply command ms",
         "revoke: device, peers", "coordinator 1 (SQLite) / replica 1",
         "replica 2", "load tool", "load average"]
a, b = col(s), col(p)
w0 = max(map(len, names))
w1 = max(len("SQLite, 1 coordinator"), *map(len, a))
print(f"{n} sessions".ljust(w0) + "  " + "SQLite, 1 coordinator".ljust(w1) + "  PostgreSQL, 2 replicas")
for k, x, y in zip(names, a, b):
    print(k.ljust(w0) + "  " + x.ljust(w1) + "  " + y)
PY
)
echo
echo "$table"
if ((smoke == 0)); then
    mkdir -p bench/results
    stamp=$(date -u +%Y%m%dT%H%M%SZ)
    out="bench/results/ha_scale-$sessions-$stamp"
    {
        echo "# bench/ha_scale.sh --sessions $sessions ${extra[*]}; $(nproc) cores; $(date -u)"
        echo "$table"
    } >"$out.txt"
    cp "$work/sqlite.json" "$out-sqlite.json" 2>/dev/null || true
    cp "$work/pg2.json" "$out-pg2.json" 2>/dev/null || true
    echo "== figures: $out.txt (and -sqlite.json, -pg2.json)"
fi
exit $failed
