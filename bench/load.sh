#!/usr/bin/env bash
# Control-plane load: N real device sessions (each enrolled for real, mutual-TLS QUIC, the
# device's own agent core) against one coordinator on loopback; prints a table of enrollment
# rate, policy-change and revocation latency to every session, netmap bytes, coordinator CPU
# and RSS, and resync time after kill -9. See bench/README.md ("load.sh").
#
#   bench/load.sh [--sessions N] [--smoke] [--check] [--json FILE] [-- TOOL OPTIONS]
#
#   --sessions N   device sessions (default 1000)
#   --smoke        20 sessions, 1 s of steady state, no restart, --check: a rot check of seconds
#   --check        exit non-zero unless every device enrolled and every change reached every
#                  session within generous bounds (`load --help`: --max-policy-p99-ms, …)
#   --json FILE    every figure as JSON (default bench/results/load-N-DATE.json; none with --smoke)
#   -- …           passed to the tool (client/examples/load.rs; `--help` there lists them)
#
# No root needed. Builds what it runs (release, --locked) unless WARD_BIN_DIR names a directory
# holding ward-coordinator and examples/load. The coordinator runs in a temporary data dir and
# is stopped by its PID on exit (also on Ctrl-C); KEEP=1 keeps the directory and its log.
set -euo pipefail
cd "$(dirname "$0")/.."

sessions=1000
smoke=0
check=0
json=""
extra=()
while (($#)); do
    case "$1" in
    --sessions) sessions="$2"; shift 2 ;;
    --smoke) smoke=1; shift ;;
    --check) check=1; shift ;;
    --json) json="$2"; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h | --help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "load.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

if [[ -z "${WARD_BIN_DIR:-}" ]]; then
    echo "== building (release): workspace binaries and the load example"
    # The same invocation as bench/smoke.sh: one feature resolution, one build.
    cargo build --locked --release --workspace --bins --example dp_pair --example netmap_bench --example load
fi
bin_dir="${WARD_BIN_DIR:-target/release}"
tool="$bin_dir/examples/load"
coord="$bin_dir/ward-coordinator"
[[ -x "$tool" && -x "$coord" ]] || { echo "load.sh: $tool or $coord missing" >&2; exit 1; }

# Sessions share UDP sockets (64 a socket), but the coordinator holds one socket per TCP
# fallback connection and the tool one per admin command: use the hard limit.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

work=$(mktemp -d "${TMPDIR:-/tmp}/ward-load.XXXXXX")
tool_pid=""
cleanup() {
    local rc=$?
    if [[ -n "$tool_pid" ]] && kill -0 "$tool_pid" 2>/dev/null; then
        kill "$tool_pid" 2>/dev/null || true
        wait "$tool_pid" 2>/dev/null || true
    fi
    # The tool stops its coordinator itself; this is for a tool that died first. Only the
    # process the PID file names, and only if it is still our coordinator (its data dir).
    if [[ -f "$work/coordinator.pid" ]]; then
        local pid
        pid=$(cat "$work/coordinator.pid")
        if [[ "$pid" =~ ^[0-9]+$ ]] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "$work/coordinator"; then
            kill -9 "$pid" 2>/dev/null || true
        fi
    fi
    if [[ "${KEEP:-0}" == 1 || $rc -ne 0 ]]; then
        echo "load.sh: kept $work (coordinator.log)" >&2
    else
        rm -rf "$work"
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

args=(--sessions "$sessions" --coordinator "$coord" --work-dir "$work")
if ((smoke)); then
    # Checked too: 20 sessions that do not all come up, or a change that misses one, is rot.
    args=(--sessions 20 --coordinator "$coord" --work-dir "$work" --steady 1 --revocations 1 --no-restart)
    check=1
    sessions=20
elif [[ -z "$json" ]]; then
    mkdir -p bench/results
    json="bench/results/load-$sessions-$(date -u +%Y%m%dT%H%M%SZ).json"
fi
[[ -n "$json" ]] && args+=(--json "$json")
((check)) && args+=(--check)

echo "== load: $sessions sessions; machine load before: $(cut -d' ' -f1-3 /proc/loadavg) ($(nproc) cores)"
start=$(date +%s)
"$tool" "${args[@]}" "${extra[@]}" &
tool_pid=$!
rc=0
wait "$tool_pid" || rc=$?
tool_pid=""
echo "== load: done in $(($(date +%s) - start)) s; machine load after: $(cut -d' ' -f1-3 /proc/loadavg)"
[[ -n "$json" ]] && echo "== figures: $json"
exit $rc
