#!/usr/bin/env bash
# Relayed against direct, side by side on one lab: a coordinator, one relay and two devices on
# the lab's wan (no NAT between them). Each round measures the direct path, then drops direct
# UDP between the two devices (nftables in their own namespaces) so their traffic moves to the
# relay, measures again, and lifts the block. A benchmark script, never a test. Run as root.
#
#   bench/relay.sh [--rounds 3] [--duration 10] [--out FILE] [--smoke]
#
# --smoke: a rot check for CI, not a measurement: one round, 2 s iperf3 runs; exits non-zero
#   if either path carries nothing or the relayed run did not go through the relay.
#
# Figures per path (median over rounds):
#   tcp1   iperf3 TCP, 1 stream, Gbit/s (receiver side)
#   rtt    ping RTT idle, median ms (50 pings, 20 ms apart; 10 with --smoke)
#   relay  ward-relay CPU seconds per GB during the single-stream run
#   a, b   the sending (a) and receiving (b) device daemons' CPU seconds per GB, same run
# and, per run only, the sender's TCP retransmissions and the datagrams the relay could not
# hand on (queue_full, too_large), and for relayed runs where datagrams were lost: `loss_ab`
# (a's relayed datagrams out, the relay's datagrams in and forwarded, b's in), the same for
# the other direction `loss_ba` (the relay's counts are of both directions together), the
# daemons' relay queue drops, and UDP receive-buffer drops (`RcvbufErrors`) per namespace,
# and the relayed/direct ratios.
#
# WARD_BENCH_PERF=DIR: also records `perf record -g` of the relay and both daemons during each
# relayed run, one file per process and round in DIR (for `perf report -i`), and counts of
# its send/receive/write/futex syscalls and context switches (`*.syscalls`).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"

ROUNDS=3
DURATION=10
OUT=""
SMOKE=0
PINGS=50
while (($# > 0)); do
    case "$1" in
        --rounds) ROUNDS="$2"; shift 2 ;;
        --duration) DURATION="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --smoke) SMOKE=1; shift ;;
        -h | --help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
if ((SMOKE)); then
    ROUNDS=1
    DURATION=2
    PINGS=10
    [[ -n "$OUT" ]] || OUT="${TMPDIR:-/tmp}/ward-bench-relay-smoke-$$.json"
fi
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || { echo "--rounds must be a positive integer" >&2; exit 2; }
[[ "$DURATION" =~ ^[1-9][0-9]*$ ]] || { echo "--duration must be a positive integer (seconds)" >&2; exit 2; }
[[ $EUID -eq 0 ]] || { echo "bench/relay.sh needs root (network namespaces, TUN devices)" >&2; exit 1; }
for t in iperf3 ping python3 nft; do
    command -v "$t" >/dev/null || { echo "missing $t" >&2; exit 1; }
done
if [[ -z "$OUT" ]]; then
    mkdir -p "$repo/bench/results"
    OUT="$repo/bench/results/relay-$(date +%Y%m%d-%H%M%S).json"
fi

# shellcheck source=../tests/lab/lab.sh
source "$repo/tests/lab/lab.sh"
lab_have_ward && lab_have_relay ||
    { echo "build first: cargo build --release --locked --workspace --bins" >&2; exit 1; }

lab_init
lab_add_wan_host relay1
lab_add_wan_host a
lab_add_wan_host b
lab_start_coordinator
lab_start_relay relay1 r1 >/dev/null
lab_relay_wait_welcomed relay1 15
# Loopback metrics in each device's namespace, for the loss accounting.
LAB_WARD_ARGS="${LAB_WARD_ARGS:-} --metrics-listen 127.0.0.1:9561"
for h in a b; do
    lab_start_device "$h"
    lab_coord user add "$h" >/dev/null
    lab_device_up "$h" "$(lab_token --user "$h")" >/dev/null
done
cat >"$LAB_DIR/policy.toml" <<'POL'
[groups]
pair = ["a", "b"]

[services.pair]
devices = ["group:pair"]
ports = ["tcp/*", "udp/*", "icmp"]

[[rules]]
name = "pair"
from = ["group:pair"]
to = ["pair"]
POL
lab_coord policy apply "$LAB_DIR/policy.toml" >/dev/null
A_IP=$(lab_ip a)
B_IP=$(lab_ip b)
B4=$(lab_ward_ipv4 b)
RELAY_PID=$(lab_pids relay1 | head -n1)
A_PID=$(lab_pids a | head -n1)
B_PID=$(lab_pids b | head -n1)

path_kind() { lab_ward_json_get "$1" "[p['path']['kind'] for p in s['peers'] if p['hostname']=='$2'][0]"; }
is_kind() { [[ "$(path_kind "$1" "$2" 2>/dev/null)" == "$3" ]]; }
both() { is_kind a b "$1" && is_kind b a "$1"; }
block() {
    local h peer
    for h in a b; do
        [[ $h == a ]] && peer=$B_IP || peer=$A_IP
        ip netns exec "$(lab_ns "$h")" nft -f - <<NFT
table ip wardbench {
    chain out {
        type filter hook output priority -10; policy accept;
        ip daddr $peer udp dport 51820 drop
    }
    chain in {
        type filter hook input priority -10; policy accept;
        ip saddr $peer udp sport 51820 drop
    }
}
NFT
    done
}
unblock() {
    local h
    for h in a b; do ip netns exec "$(lab_ns "$h")" nft delete table ip wardbench 2>/dev/null || true; done
}
# drops REASON: datagrams the relay could not hand on for REASON so far.
drops() { lab_relay_metric relay1 "ward_relay_dropped_total{reason=\"$1\"}" 2>/dev/null || echo 0; }
# dev_metric HOST METRIC: a device daemon's metric (0 if unreadable).
dev_metric() { lab_metric "$1" 127.0.0.1:9561 "$2" 2>/dev/null || echo 0; }
# counters: the loss-accounting counters now, as one JSON object.
counters() {
    local h
    printf '{"a_out":%s,"a_in":%s,"b_out":%s,"b_in":%s,"a_qfull":%s,"b_qfull":%s,"relay_fwd":%s,"relay_drop":%s' \
        "$(dev_metric a 'ward_device_relay_datagrams_total{direction="out"}')" \
        "$(dev_metric a 'ward_device_relay_datagrams_total{direction="in"}')" \
        "$(dev_metric b 'ward_device_relay_datagrams_total{direction="out"}')" \
        "$(dev_metric b 'ward_device_relay_datagrams_total{direction="in"}')" \
        "$(dev_metric a 'ward_device_dropped_packets_total{reason="relay_queue_full"}')" \
        "$(dev_metric b 'ward_device_dropped_packets_total{reason="relay_queue_full"}')" \
        "$(lab_relay_metric relay1 ward_relay_relayed_datagrams_total 2>/dev/null || echo 0)" \
        "$(lab_relay_metric relay1 ward_relay_dropped_total 2>/dev/null || echo 0)"
    for h in relay1 a b; do
        printf ',"rcvbuf_%s":%s' "$h" "$(ip netns exec "$(lab_ns "$h")" awk \
            '/^Udp:/ { if (!n++) { for (i = 2; i <= NF; i++) if ($i == "RcvbufErrors") c = i } else print $c }' /proc/net/snmp)"
    done
    printf '}'
}
cpu_s() { python3 -c 'import os,sys; f=open(f"/proc/{sys.argv[1]}/stat").read().rsplit(")",1)[1].split(); print((int(f[11])+int(f[12]))/os.sysconf("SC_CLK_TCK"))' "$1"; }

# measure PATH: one single-stream run and the idle RTT over the current path; prints a JSON object.
measure() {
    local kind="$1" c0 c1 json rtt a0 a1 b0 b1 q0 q1 l0 l1 k0 k1
    rtt=$(lab_exec a ping -q -c "$PINGS" -i 0.02 -W 1 "$B4" | python3 -c '
import re, sys
m = re.search(r"= [\d.]+/([\d.]+)/", sys.stdin.read())
print(m.group(1) if m else "null")')
    lab_spawn b "iperf3-s-$kind.log" iperf3 -s -1 -B "$B4" -p 5201
    lab_wait_for -t 5 sh -c "ip netns exec $(lab_ns b) ss -ltn | grep -q ':5201 '"
    c0=$(cpu_s "$RELAY_PID") a0=$(cpu_s "$A_PID") b0=$(cpu_s "$B_PID")
    q0=$(drops queue_full) l0=$(drops too_large) k0=$(counters)
    local perf_pids=()
    if [[ -n "${WARD_BENCH_PERF:-}" && "$kind" == relay ]]; then
        mkdir -p "$WARD_BENCH_PERF"
        local who pid
        for who in relay:$RELAY_PID a:$A_PID b:$B_PID; do
            pid=${who#*:}
            perf record -g -q -o "$WARD_BENCH_PERF/${who%%:*}-$r.data" -p "$pid" -- sleep "$DURATION" \
                >/dev/null 2>&1 &
            perf_pids+=($!)
            perf stat -x, -o "$WARD_BENCH_PERF/${who%%:*}-$r.syscalls" -p "$pid" \
                -e 'syscalls:sys_enter_sendmsg,syscalls:sys_enter_sendmmsg,syscalls:sys_enter_recvmsg,syscalls:sys_enter_recvmmsg,syscalls:sys_enter_write,syscalls:sys_enter_writev,syscalls:sys_enter_futex,context-switches' \
                -- sleep "$DURATION" >/dev/null 2>&1 &
            perf_pids+=($!)
        done
    fi
    json=$(lab_exec a iperf3 -c "$B4" -p 5201 -t "$DURATION" -J) || json='{"error":"iperf3 failed"}'
    ((${#perf_pids[@]} == 0)) || wait "${perf_pids[@]}" || true
    c1=$(cpu_s "$RELAY_PID") a1=$(cpu_s "$A_PID") b1=$(cpu_s "$B_PID")
    q1=$(drops queue_full) l1=$(drops too_large) k1=$(counters)
    python3 -c '
import json, sys
r = json.loads(sys.argv[1])
kind, rtt = sys.argv[2], sys.argv[3]
c0, c1, a0, a1, b0, b1 = map(float, sys.argv[4:10])
q0, q1, l0, l1 = map(int, sys.argv[10:14])
out = {"path": kind, "rtt_idle_ms": None if rtt == "null" else float(rtt),
       "relay_drop_queue_full": q1 - q0, "relay_drop_too_large": l1 - l0}
k0, k1 = json.loads(sys.argv[14]), json.loads(sys.argv[15])
k = {n: k1[n] - k0[n] for n in k0}
if kind == "relay":
    out["loss_ab"] = [k["a_out"], k["relay_fwd"] + k["relay_drop"], k["relay_fwd"], k["b_in"]]
    out["loss_ba"] = [k["b_out"], k["a_in"]]
    out["dev_queue_full"] = [k["a_qfull"], k["b_qfull"]]
out["rcvbuf_errors"] = [k["rcvbuf_relay1"], k["rcvbuf_a"], k["rcvbuf_b"]]
if "error" in r:
    out["error"] = r["error"]
else:
    e = r["end"]["sum_received"]
    out["tcp1_gbps"] = e["bits_per_second"] / 1e9
    out["bytes"] = e["bytes"]
    out["retransmits"] = r["end"].get("sum_sent", {}).get("retransmits")
    gb = e["bytes"] / 1e9
    out["relay_cpu_s_per_gb"] = (c1 - c0) / gb if gb > 0 else None
    out["a_cpu_s_per_gb"] = (a1 - a0) / gb if gb > 0 else None
    out["b_cpu_s_per_gb"] = (b1 - b0) / gb if gb > 0 else None
print(json.dumps(out))' "$json" "$kind" "$rtt" "$c0" "$c1" "$a0" "$a1" "$b0" "$b1" "$q0" "$q1" "$l0" "$l1" "$k0" "$k1"
}

lab_wait_for -t 30 -i 0.2 both direct || { echo "the two devices never went direct" >&2; exit 1; }
RUNS=()
for ((r = 1; r <= ROUNDS; r++)); do
    lab_wait_for -t 30 -i 0.2 both direct || { echo "round $r: not direct" >&2; exit 1; }
    RUNS+=("$(measure direct)")
    block
    lab_exec a ping -q -c 3 -i 0.2 -W 1 "$B4" >/dev/null 2>&1 || true
    lab_wait_for -t 30 -i 0.2 both relay || { echo "round $r: never relayed" >&2; exit 1; }
    RUNS+=("$(measure relay)")
    unblock
    lab_exec a ping -q -c 3 -i 0.2 -W 1 "$B4" >/dev/null 2>&1 || true
done

printf '%s\n' "${RUNS[@]}" | python3 -c '
import json, statistics, sys
runs = [json.loads(l) for l in sys.stdin if l.strip()]
out_path, smoke, rounds, duration = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
def med(kind, key):
    v = [r[key] for r in runs if r["path"] == kind and r.get(key) is not None]
    return statistics.median(v) if v else None
FIELDS = ("tcp1_gbps", "rtt_idle_ms", "relay_cpu_s_per_gb", "a_cpu_s_per_gb", "b_cpu_s_per_gb")
summary = {k: {f: med(k, f) for f in FIELDS} for k in ("direct", "relay")}
d, r = summary["direct"], summary["relay"]
ratio = lambda a, b: (a / b) if a is not None and b else None
summary["ratio_tcp1"] = ratio(r["tcp1_gbps"], d["tcp1_gbps"])
summary["ratio_rtt"] = ratio(r["rtt_idle_ms"], d["rtt_idle_ms"])
json.dump({"rounds": rounds, "duration_s": duration, "runs": runs, "summary": summary}, open(out_path, "w"), indent=1)
f = lambda x, p=2: "-" if x is None else "%.*f" % (p, x)
for r in runs:
    extra = " ".join("%s=%s" % (k, r.get(k)) for k in ("retransmits", "relay_drop_queue_full", "relay_drop_too_large", "loss_ab", "loss_ba", "dev_queue_full", "rcvbuf_errors") if k in r)
    print("run %-6s %s %s" % (r["path"], " ".join("%s=%s" % (k, f(r.get(k), 3)) for k in FIELDS), extra))
print("%-8s %12s %12s %15s %11s %11s" % ("path", "tcp1 Gbit/s", "rtt idle ms", "relay cpu s/GB", "a cpu s/GB", "b cpu s/GB"))
for k in ("direct", "relay"):
    s = summary[k]
    print("%-8s %12s %12s %15s %11s %11s" % (k, f(s["tcp1_gbps"]), f(s["rtt_idle_ms"], 3), f(s["relay_cpu_s_per_gb"]), f(s["a_cpu_s_per_gb"]), f(s["b_cpu_s_per_gb"])))
print("relayed/direct: throughput %sx, idle RTT %sx (target: throughput >= 0.5x)" % (f(summary["ratio_tcp1"]), f(summary["ratio_rtt"])))
print(f"results written to {out_path}")
errors = [r for r in runs if "error" in r]
if smoke and (errors or not all((r.get("bytes") or 0) > 0 for r in runs)):
    print("smoke: a path carried nothing", file=sys.stderr); sys.exit(1)
' "$OUT" "$SMOKE" "$ROUNDS" "$DURATION"
