#!/usr/bin/env bash
# Side-by-side tunnel benchmark: raw veth, wireguard-go, boringtun-cli, nebula
# and Ward, each between two network namespaces joined by one veth pair.
# A benchmark script, never a test. Run as root; see bench/README.md.
#
#   bench/throughput.sh [--rounds 3] [--duration 10] [--only a,b] [--out FILE]
#                       [--bt-threads 1] [--keep-logs] [--smoke] [--soak SECS]
#
# --smoke: a rot check for CI, not a measurement: one round, 2 s iperf3 runs,
#   ward and veth required (fails if Ward's binaries are missing), peers run if
#   installed; exits non-zero if the Ward tunnel or the raw veth carries nothing.
#
# --soak SECS: Ward only, one tunnel kept up for SECS seconds of mixed traffic
#   (single and 4-stream TCP both ways, 1200-byte UDP, ping bursts, idle gaps)
#   while the RSS (VmRSS, VmHWM) of both daemons is sampled every 10 s; prints
#   the samples and the growth after the first minute, writes
#   bench/results/soak-DATE.json (with bench/memmap.py's breakdown at the end).
#
# Figures per implementation (median over rounds):
#   tcp1   iperf3 TCP, 1 stream, Gbit/s (receiver side)
#   tcp4   iperf3 TCP, 4 parallel streams, Gbit/s
#   rtt    ping RTT idle, median ms (50 pings, 20 ms apart)
#   rttL   ping RTT while the single-stream run is going, median ms
#   cpu    tunnel CPU seconds per GB during the single-stream run (utime+stime
#          of both tunnel processes from /proc/PID/stat / GB received)
#   rss    peak RSS (VmHWM) of the larger of the two tunnel processes, MiB
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"

ROUNDS=3
DURATION=10
ONLY=""
OUT=""
BT_THREADS=1
KEEP_LOGS=0
SMOKE=0
SOAK=0
ALL_IMPLS=(veth wireguard-go boringtun-cli nebula ward)
PEERS=(wireguard-go boringtun-cli nebula)

usage() {
    sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'
    echo "implementations: ${ALL_IMPLS[*]}"
}

while (($# > 0)); do
    case "$1" in
        --rounds) ROUNDS="$2"; shift 2 ;;
        --duration) DURATION="$2"; shift 2 ;;
        --only) ONLY="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --bt-threads) BT_THREADS="$2"; shift 2 ;;
        --keep-logs) KEEP_LOGS=1; shift ;;
        --smoke) SMOKE=1; shift ;;
        --soak) SOAK="$2"; ONLY=ward; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done
if ((SMOKE)); then
    ROUNDS=1
    DURATION=2
    [[ -n "$OUT" ]] || OUT="${TMPDIR:-/tmp}/ward-bench-smoke-$$.json"
fi
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || { echo "--rounds must be a positive integer" >&2; exit 2; }
[[ "$DURATION" =~ ^[1-9][0-9]*$ ]] || { echo "--duration must be a positive integer (seconds)" >&2; exit 2; }
[[ $EUID -eq 0 ]] || { echo "throughput.sh: run as root (it creates network namespaces)" >&2; exit 1; }
[[ "$SOAK" =~ ^[0-9]+$ ]] || { echo "--soak must be a number of seconds" >&2; exit 2; }
if ((SOAK)); then
    [[ -n "$OUT" ]] || OUT="$here/results/soak-$(date +%Y%m%d-%H%M%S).json"
fi
[[ -n "$OUT" ]] || OUT="$here/results/throughput-$(date +%Y%m%d-%H%M%S).json"

log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

# ------------------------------------------------------------------ tools
missing=""
for t in ip iperf3 ping python3; do
    command -v "$t" >/dev/null || missing="$missing $t"
done
if [[ -n "$missing" ]]; then
    echo "missing:$missing — apt-get install -y iproute2 iperf3 iputils-ping python3" >&2
    exit 1
fi

find_bin() { # NAME: print path (PATH, then /opt/ward-bench/bin) or fail
    command -v "$1" 2>/dev/null || { [[ -x "/opt/ward-bench/bin/$1" ]] && echo "/opt/ward-bench/bin/$1"; }
}
WG=$(find_bin wg || true)
WGGO=$(find_bin wireguard-go || true)
BORINGTUN=$(find_bin boringtun-cli || true)
NEBULA=$(find_bin nebula || true)
NEBULA_CERT=$(find_bin nebula-cert || true)
WARD_BIN_DIR_ABS="${WARD_BIN_DIR:-target/release}"
[[ "$WARD_BIN_DIR_ABS" == /* ]] || WARD_BIN_DIR_ABS="$repo/$WARD_BIN_DIR_ABS"
WARD="$WARD_BIN_DIR_ABS/ward"
WARD_COORD="$WARD_BIN_DIR_ABS/ward-coordinator"

# available IMPL: 0 if it can run, else prints why
available() {
    case "$1" in
        veth) return 0 ;;
        wireguard-go)
            [[ -n "$WG" && -n "$WGGO" ]] || { echo "not installed (apt-get install -y wireguard-tools wireguard-go)"; return 1; } ;;
        boringtun-cli)
            [[ -n "$WG" && -n "$BORINGTUN" ]] || { echo "not installed (apt-get install -y wireguard-tools; cargo install boringtun-cli --locked --root /opt/ward-bench)"; return 1; } ;;
        nebula)
            [[ -n "$NEBULA" && -n "$NEBULA_CERT" ]] || { echo "not installed (apt-get install -y nebula)"; return 1; } ;;
        ward)
            [[ -x "$WARD" && -x "$WARD_COORD" ]] || { echo "SKIPPED (binaries not built)"; return 1; } ;;
        *) echo "unknown implementation"; return 1 ;;
    esac
}

selected() {
    [[ -z "$ONLY" ]] && return 0
    [[ ",$ONLY," == *",$1,"* ]]
}

if [[ -n "$ONLY" ]]; then
    IFS=',' read -r -a _only <<<"$ONLY"
    for i in "${_only[@]}"; do
        [[ " ${ALL_IMPLS[*]} " == *" $i "* ]] || { echo "--only: unknown implementation '$i' (${ALL_IMPLS[*]})" >&2; exit 2; }
    done
fi

IMPLS=()
for i in "${ALL_IMPLS[@]}"; do
    selected "$i" || continue
    if why=$(available "$i"); then
        IMPLS+=("$i")
    elif ((SMOKE)) && [[ "$i" == ward || "$i" == veth ]]; then
        echo "$i: $why; --smoke needs it" >&2
        exit 1
    else
        echo "$i: $why" >&2
    fi
done
((${#IMPLS[@]} > 0)) || { echo "nothing to run" >&2; exit 1; }

# ------------------------------------------------------------------ topology
ID="$$"
NSA="wardbench-$ID-a"
NSB="wardbench-$ID-b"
UA=10.201.0.1
UB=10.201.0.2
WORK="$(mktemp -d "${TMPDIR:-/tmp}/ward-bench.$ID.XXXX")"
RESULTS="$WORK/runs.jsonl"
: >"$RESULTS"
PIDS=()        # every process we started: "PID NS"
TUN_PIDS=()    # the current implementation's tunnel processes
INNER_A=""
INNER_B=""
UAPI_SOCKS=()  # /var/run/wireguard/*.sock names we created

alive() { # PID NS
    [[ -r "/proc/$1/stat" ]] || return 1
    local st
    st=$(sed -E 's/.*\) ([A-Z]).*/\1/' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ "$st" != Z && "$st" != X ]] || return 1
    [[ "$(ip netns identify "$1" 2>/dev/null)" == "$2" ]]
}

stop_pids() { # "PID NS"...: TERM, wait up to 5 s, KILL; only ours
    local e i left
    for e in "$@"; do
        alive "${e%% *}" "${e#* }" && kill -TERM "${e%% *}" 2>/dev/null || true
    done
    for ((i = 0; i < 50; i++)); do
        left=0
        for e in "$@"; do alive "${e%% *}" "${e#* }" && left=1; done
        ((left)) || break
        sleep 0.1
    done
    for e in "$@"; do
        alive "${e%% *}" "${e#* }" && kill -KILL "${e%% *}" 2>/dev/null || true
        wait "${e%% *}" 2>/dev/null || true
    done
}

# spawn NS LOG CMD...: background process in NS; sets SPAWNED
spawn() {
    local ns="$1" logf="$2"
    shift 2
    ip netns exec "$ns" "$@" </dev/null >>"$logf" 2>&1 &
    SPAWNED=$!
    PIDS+=("$SPAWNED $ns")
}

cleanup() {
    local rc=$?
    set +e
    ((${#PIDS[@]} == 0)) || stop_pids "${PIDS[@]}"
    local ns p left=()
    for ns in "$NSA" "$NSB"; do
        ip netns ls | grep -q "^$ns\b" || continue
        for p in $(ip netns pids "$ns" 2>/dev/null); do left+=("$p $ns"); done
    done
    ((${#left[@]} == 0)) || stop_pids "${left[@]}"
    ip netns del "$NSA" 2>/dev/null
    ip netns del "$NSB" 2>/dev/null
    for p in "${UAPI_SOCKS[@]+"${UAPI_SOCKS[@]}"}"; do rm -f "/var/run/wireguard/$p.sock"; done
    if [[ "$rc" != 0 || "$KEEP_LOGS" == 1 ]]; then
        echo "logs kept in $WORK" >&2
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

setup_underlay() {
    ip netns add "$NSA"
    ip netns add "$NSB"
    ip -n "$NSA" link set lo up
    ip -n "$NSB" link set lo up
    ip link add name eth0 netns "$NSA" type veth peer name eth0 netns "$NSB"
    ip -n "$NSA" addr add "$UA/24" dev eth0
    ip -n "$NSB" addr add "$UB/24" dev eth0
    ip -n "$NSA" link set eth0 mtu 1500 up
    ip -n "$NSB" link set eth0 mtu 1500 up
}

# ------------------------------------------------------------ implementations
# Each setup_X starts the tunnel and sets INNER_A, INNER_B (addresses to use
# from A to B) and TUN_PIDS ("PID NS" of the tunnel processes). It returns
# non-zero if something failed. teardown stops TUN_PIDS and helpers.

setup_veth() {
    INNER_A=$UA
    INNER_B=$UB
    TUN_PIDS=()
}

wg_keys() { # DIR
    mkdir -p "$1"
    (umask 077 && "$WG" genkey >"$1/a.key" && "$WG" genkey >"$1/b.key") || return 1
    "$WG" pubkey <"$1/a.key" >"$1/a.pub" && "$WG" pubkey <"$1/b.key" >"$1/b.pub"
}

# wg_configure NS IF KEY PEERPUB PEERINNER PEERENDPOINT INNER/24
wg_configure() {
    local ns=$1 ifn=$2 key=$3 peer=$4 pinner=$5 pend=$6 addr=$7
    ip netns exec "$ns" "$WG" set "$ifn" listen-port 51820 private-key "$key" \
        peer "$(cat "$peer")" allowed-ips "$pinner/32" endpoint "$pend:51820" || return 1
    ip -n "$ns" addr add "$addr" dev "$ifn" || return 1
    ip -n "$ns" link set "$ifn" mtu 1420 up
}

wait_uapi() { # IFNAME
    local i
    for ((i = 0; i < 100; i++)); do
        [[ -S "/var/run/wireguard/$1.sock" ]] && return 0
        sleep 0.1
    done
    echo "no UAPI socket for $1" >&2
    return 1
}

# setup_wg_userspace IMPL BIN-ARGS-PREFIX...: common to wireguard-go and boringtun
setup_wg_userspace() {
    local impl=$1 tag=$2
    shift 2
    local d="$WORK/r$CUR_ROUND-$impl-tunnel" ifa="${tag}${ID}a" ifb="${tag}${ID}b"
    wg_keys "$d" || return 1
    UAPI_SOCKS+=("$ifa" "$ifb")
    TUN_PIDS=()
    spawn "$NSA" "$d/a.log" "$@" "$ifa"
    TUN_PIDS+=("$SPAWNED $NSA")
    spawn "$NSB" "$d/b.log" "$@" "$ifb"
    TUN_PIDS+=("$SPAWNED $NSB")
    wait_uapi "$ifa" && wait_uapi "$ifb" || return 1
    wg_configure "$NSA" "$ifa" "$d/a.key" "$d/b.pub" 10.202.0.2 "$UB" 10.202.0.1/24 || return 1
    wg_configure "$NSB" "$ifb" "$d/b.key" "$d/a.pub" 10.202.0.1 "$UA" 10.202.0.2/24 || return 1
    INNER_A=10.202.0.1
    INNER_B=10.202.0.2
}

setup_wireguard-go() {
    # -f keeps it in the foreground so that $! is the tunnel process
    setup_wg_userspace wireguard-go wgg env LOG_LEVEL=error "$WGGO" -f
}

setup_boringtun-cli() {
    setup_wg_userspace boringtun-cli wgb env WG_LOG_LEVEL=error \
        "$BORINGTUN" --foreground --disable-drop-privileges --threads "$BT_THREADS" \
        --log "$WORK/r$CUR_ROUND-boringtun-cli.out"
}

setup_nebula() {
    local d="$WORK/r$CUR_ROUND-nebula-tunnel" n
    mkdir -p "$d"
    (cd "$d" && "$NEBULA_CERT" ca -name ward-bench -out-crt ca.crt -out-key ca.key >/dev/null &&
        "$NEBULA_CERT" sign -name a -ip 10.203.0.1/24 -ca-crt ca.crt -ca-key ca.key -out-crt a.crt -out-key a.key >/dev/null &&
        "$NEBULA_CERT" sign -name b -ip 10.203.0.2/24 -ca-crt ca.crt -ca-key ca.key -out-crt b.crt -out-key b.key >/dev/null) || return 1
    for n in a b; do
        local me_u peer_u peer_i
        if [[ $n == a ]]; then me_u=$UA peer_u=$UB peer_i=10.203.0.2; else me_u=$UB peer_u=$UA peer_i=10.203.0.1; fi
        cat >"$d/$n.yml" <<EOF
pki:
  ca: $d/ca.crt
  cert: $d/$n.crt
  key: $d/$n.key
static_host_map:
  "$peer_i": ["$peer_u:4242"]
lighthouse:
  am_lighthouse: false
  interval: 60
  hosts: []
listen:
  host: $me_u
  port: 4242
punchy:
  punch: false
tun:
  disabled: false
  dev: neb${ID}$n
  drop_local_broadcast: false
  drop_multicast: false
  tx_queue: 500
  mtu: 1420
logging:
  level: warning
  format: text
firewall:
  conntrack:
    tcp_timeout: 12m
    udp_timeout: 3m
    default_timeout: 10m
  outbound:
    - port: any
      proto: any
      host: any
  inbound:
    - port: any
      proto: any
      host: any
EOF
    done
    TUN_PIDS=()
    spawn "$NSA" "$d/a.log" "$NEBULA" -config "$d/a.yml"
    TUN_PIDS+=("$SPAWNED $NSA")
    spawn "$NSB" "$d/b.log" "$NEBULA" -config "$d/b.yml"
    TUN_PIDS+=("$SPAWNED $NSB")
    INNER_A=10.203.0.1
    INNER_B=10.203.0.2
}

# ============================================================== setup_ward ===
# Brings up a Ward coordinator (in namespace A, on the underlay address
# 10.201.0.1:7443) and one Ward device in each namespace, using the CLI
# contract of DESIGN.md section 4. The tunnel processes are the two
# `ward daemon`s; the coordinator is not counted.
#
# Adapt here if the CLI changes: policy syntax (WARD_BENCH_POLICY=FILE
# overrides the built-in allow-all policy for tag:bench), status JSON fields
# (`ipv4` for self, `peers[].ipv4` for peers).
WARD_COORD_PORT=7443
ward_status_field() { # NS SOCK PYEXPR (s = status JSON)
    ip netns exec "$1" "$WARD" --socket "$2" status --json 2>/dev/null | python3 -c '
import json, sys
s = json.load(sys.stdin)
v = eval(sys.argv[1], {"s": s})
if isinstance(v, list):
    print("\n".join(str(x) for x in v))
elif v is not None:
    print(v)
' "$3"
}

setup_ward() {
    local d="$WORK/r$CUR_ROUND-ward-tunnel" i coord_pid
    mkdir -p "$d"
    chmod 700 "$d"
    local cdir="$d/coordinator"
    ip netns exec "$NSA" "$WARD_COORD" init --data-dir "$cdir" --public-addr "$UA:$WARD_COORD_PORT" \
        >"$d/coordinator-init.log" 2>&1 || { echo "ward-coordinator init failed (see $d/coordinator-init.log)" >&2; return 1; }
    spawn "$NSA" "$d/coordinator.log" "$WARD_COORD" serve --data-dir "$cdir"
    coord_pid=$SPAWNED
    COORD_PIDS=("$coord_pid $NSA")
    coord() { ip netns exec "$NSA" "$WARD_COORD" --data-dir "$cdir" "$@"; }
    for ((i = 0; i < 100; i++)); do
        coord device ls --json >/dev/null 2>&1 && break
        sleep 0.2
    done
    coord device ls --json >/dev/null 2>&1 || { echo "coordinator did not come up (see $d/coordinator.log)" >&2; return 1; }

    local policy="${WARD_BENCH_POLICY:-$d/policy.toml}"
    if [[ -z "${WARD_BENCH_POLICY:-}" ]]; then
        cat >"$policy" <<'EOF'
# ward bench: the two bench devices may reach each other on every port
[services.bench]
devices = ["tag:bench"]
ports = ["tcp/*", "udp/*", "icmp"]

[[rules]]
from = ["tag:bench"]
to = ["bench"]
EOF
    fi
    coord policy apply "$policy" >"$d/policy-apply.log" 2>&1 ||
        echo "ward: policy apply failed (see $d/policy-apply.log); continuing" >&2

    TUN_PIDS=()
    local n ns sock token
    for n in a b; do
        if [[ $n == a ]]; then ns=$NSA; else ns=$NSB; fi
        sock="$d/$n/ward.sock"
        mkdir -p "$d/$n/state"
        chmod 700 "$d/$n" "$d/$n/state"
        spawn "$ns" "$d/$n.log" "$WARD" daemon --state-dir "$d/$n/state" --socket "$sock" \
            --tun "wrd${ID}$n" --port 51820 --dns off
        TUN_PIDS+=("$SPAWNED $ns")
        for ((i = 0; i < 100; i++)); do [[ -S "$sock" ]] && break; sleep 0.1; done
        [[ -S "$sock" ]] || { echo "ward daemon $n did not create $sock" >&2; return 1; }
        token=$(coord token create --tag bench 2>>"$d/token.log") || { echo "token create failed" >&2; return 1; }
        ip netns exec "$ns" "$WARD" --socket "$sock" up --token "$token" --hostname "bench-$n" \
            >>"$d/up.log" 2>&1 || { echo "ward up ($n) failed (see $d/up.log)" >&2; return 1; }
    done
    # overlay addresses, from A's and B's status
    for ((i = 0; i < 100; i++)); do
        INNER_A=$(ward_status_field "$NSA" "$d/a/ward.sock" 's["ipv4"]' || true)
        INNER_B=$(ward_status_field "$NSB" "$d/b/ward.sock" 's["ipv4"]' || true)
        if [[ -n "$INNER_A" && -n "$INNER_B" ]] &&
            ward_status_field "$NSA" "$d/a/ward.sock" '[p["ipv4"] for p in s.get("peers", [])]' | grep -qx "$INNER_B"; then
            break
        fi
        sleep 0.2
    done
    INNER_A=${INNER_A%%/*}
    INNER_B=${INNER_B%%/*}
    [[ -n "$INNER_A" && -n "$INNER_B" ]] || { echo "ward: no overlay addresses in status --json" >&2; return 1; }
}
# ========================================================== end setup_ward ===

COORD_PIDS=()
HELPER_PIDS=()
teardown() {
    local all=("${TUN_PIDS[@]+"${TUN_PIDS[@]}"}" "${HELPER_PIDS[@]+"${HELPER_PIDS[@]}"}" "${COORD_PIDS[@]+"${COORD_PIDS[@]}"}")
    ((${#all[@]} == 0)) || stop_pids "${all[@]}"
    TUN_PIDS=()
    HELPER_PIDS=()
    COORD_PIDS=()
    # drop any interface left besides lo and eth0 (TUNs go with their process)
    local ns ifn
    for ns in "$NSA" "$NSB"; do
        for ifn in $(ip -n "$ns" -o link show | awk -F': ' '{print $2}' | cut -d@ -f1); do
            [[ "$ifn" == lo || "$ifn" == eth0 ]] || ip -n "$ns" link del "$ifn" 2>/dev/null || true
        done
    done
}

# ------------------------------------------------------------ measurement
cpu_ticks() { # sum utime+stime over TUN_PIDS
    local e sum=0 f
    for e in "${TUN_PIDS[@]+"${TUN_PIDS[@]}"}"; do
        f=$(sed -E 's/.*\) //' "/proc/${e%% *}/stat" 2>/dev/null) || continue
        # after "comm) ": field 3 is state, so utime (14) and stime (15) are $12 $13
        sum=$((sum + $(awk '{print $12 + $13}' <<<"$f")))
    done
    echo "$sum"
}

rss_list() { # VmHWM kB of each TUN_PID, comma separated
    local e out=""
    for e in "${TUN_PIDS[@]+"${TUN_PIDS[@]}"}"; do
        out="$out$(awk '/^VmHWM:/{print $2}' "/proc/${e%% *}/status" 2>/dev/null || echo 0),"
    done
    echo "${out%,}"
}

tunnel_ok() { ip netns exec "$NSA" ping -c1 -W1 "$INNER_B" >/dev/null 2>&1; }

# other_cpu_snapshot: JSON {time, procs: {pid: [ticks, comm]}} of the user
# processes outside our two namespaces, to tell when other work competed for
# the CPUs during a run (short-lived processes are missed: a lower bound).
other_cpu_snapshot() {
    python3 - "$NSA" "$NSB" <<'EOF'
import json, os, sys, time
ours = set()
for ns in sys.argv[1:]:
    try:
        ours.add(os.stat("/run/netns/" + ns).st_ino)
    except OSError:
        pass
me = os.getpid()
procs = {}
for p in os.listdir("/proc"):
    if not p.isdigit() or int(p) == me:
        continue
    try:
        st = open(f"/proc/{p}/stat").read()
        if os.stat(f"/proc/{p}/ns/net").st_ino in ours:
            continue
    except OSError:
        continue
    comm = st[st.index("(") + 1:st.rindex(")")]
    f = st[st.rindex(")") + 2:].split()
    if int(f[6]) & 0x00200000:  # PF_KTHREAD: softirq/kworker time is partly ours
        continue
    procs[p] = [int(f[11]) + int(f[12]), comm]
print(json.dumps({"time": time.monotonic(), "procs": procs}))
EOF
}

# measure IMPL ROUND: runs the figures, appends one JSON line to $RESULTS
measure() {
    local impl=$1 round=$2 d="$WORK/r$2-$1" load
    mkdir -p "$d"
    load=$(cut -d' ' -f1 /proc/loadavg)
    local i
    for ((i = 0; i < 40; i++)); do tunnel_ok && break; sleep 0.5; done
    tunnel_ok || { echo "$impl: tunnel did not come up ($INNER_A -> $INNER_B)" >&2; return 1; }

    spawn "$NSB" "$d/iperf3-server.log" iperf3 -s -B "$INNER_B" -p 5201
    HELPER_PIDS+=("$SPAWNED $NSB")
    for ((i = 0; i < 50; i++)); do
        ip netns exec "$NSB" ss -ltn | grep -q "$INNER_B:5201 " && break
        sleep 0.1
    done

    # idle RTT
    ip netns exec "$NSA" ping -c 50 -i 0.02 -W 1 "$INNER_B" >"$d/ping-idle.txt" 2>&1 || true

    # single stream, with CPU accounting and ping under load
    local t0 t1 ping_secs=$((DURATION > 3 ? DURATION - 2 : 1))
    other_cpu_snapshot >"$d/other0.json"
    t0=$(cpu_ticks)
    (sleep 1; ip netns exec "$NSA" ping -i 0.05 -w "$ping_secs" -W 1 "$INNER_B" >"$d/ping-load.txt" 2>&1 || true) &
    local pinger=$!
    ip netns exec "$NSA" iperf3 -c "$INNER_B" -p 5201 -t "$DURATION" -J >"$d/tcp1.json" 2>"$d/tcp1.err" || true
    t1=$(cpu_ticks)
    other_cpu_snapshot >"$d/other1.json"
    wait "$pinger" || true
    local rss
    rss=$(rss_list)
    sleep 0.5
    # four streams
    ip netns exec "$NSA" iperf3 -c "$INNER_B" -p 5201 -t "$DURATION" -P 4 -J >"$d/tcp4.json" 2>"$d/tcp4.err" || true
    rss=$(rss_list)
    # where each tunnel process's memory is, after the load (bench/memmap.py)
    local e k=0
    for e in "${TUN_PIDS[@]+"${TUN_PIDS[@]}"}"; do
        python3 "$here/memmap.py" "${e%% *}" --json >"$d/mem-$k.json" 2>/dev/null || rm -f "$d/mem-$k.json"
        k=$((k + 1))
    done

    python3 - "$impl" "$round" "$d" "$((t1 - t0))" "$(getconf CLK_TCK)" "$rss" "${#TUN_PIDS[@]}" "$load" >>"$RESULTS" <<'EOF'
import json, os, re, statistics, sys
impl, rnd, d, ticks, hz, rss, ntun = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6], int(sys.argv[7])
out = {"impl": impl, "round": rnd, "errors": [], "warnings": [], "loadavg_before": float(sys.argv[8])}
def iperf(name):
    try:
        j = json.load(open(f"{d}/{name}.json"))
    except Exception as e:
        out["errors"].append(f"{name}: unreadable iperf3 output ({e})")
        return None, None
    if "error" in j:
        out["errors"].append(f"{name}: {j['error']}")
    s = j.get("end", {}).get("sum_received")
    if not s:
        return None, None
    return s["bits_per_second"] / 1e9, s["bytes"]
def rtts(name):
    try:
        t = [float(x) for x in re.findall(r"time=([0-9.]+) ms", open(f"{d}/{name}").read())]
    except OSError:
        t = []
    return (statistics.median(t) if t else None), len(t)
out["tcp1_gbps"], bytes1 = iperf("tcp1")
out["tcp4_gbps"], _ = iperf("tcp4")
out["rtt_idle_ms"], out["rtt_idle_n"] = rtts("ping-idle.txt")
out["rtt_load_ms"], out["rtt_load_n"] = rtts("ping-load.txt")
out["tcp1_bytes"] = bytes1
out["cpu_s"] = ticks / hz if ntun else None
out["cpu_s_per_gb"] = (ticks / hz) / (bytes1 / 1e9) if ntun and bytes1 else None
kb = [int(x) for x in rss.split(",") if x] if rss else []
out["rss_mib_each"] = [k / 1024 for k in kb]
out["rss_mib"] = max(kb) / 1024 if kb else None
out["mem"] = []
for k in range(ntun):
    try:
        out["mem"].append(json.load(open(f"{d}/mem-{k}.json")))
    except (OSError, ValueError):
        pass
try:
    a, b = json.load(open(f"{d}/other0.json")), json.load(open(f"{d}/other1.json"))
    used, by = 0, {}
    for pid, (t, comm) in b["procs"].items():
        dt = t - a["procs"][pid][0] if pid in a["procs"] else t
        if dt > 0:
            used += dt
            by[comm] = by.get(comm, 0) + dt
    secs = b["time"] - a["time"]
    out["other_cpu_pct"] = round(100 * used / hz / secs / os.cpu_count(), 1)
    out["other_cpu_top"] = sorted(by, key=by.get, reverse=True)[:3]
    if out["other_cpu_pct"] > 10:
        out["warnings"].append(f"other processes used {out['other_cpu_pct']}% of the CPUs during tcp1 ({', '.join(out['other_cpu_top'])}): figures are not trustworthy")
except Exception as e:
    out["other_cpu_pct"] = None
print(json.dumps(out))
EOF
    tail -n1 "$RESULTS" | python3 -c '
import json, sys
r = json.loads(sys.stdin.read())
def f(k, p):
    v = r.get(k)
    return "-" if v is None else "%.*f" % (p, v)
line = "  %s: tcp1 %s Gbit/s, tcp4 %s Gbit/s, rtt %s ms idle / %s ms loaded, cpu %s s/GB, rss %s MiB" % (
    r["impl"], f("tcp1_gbps", 2), f("tcp4_gbps", 2), f("rtt_idle_ms", 3), f("rtt_load_ms", 3),
    f("cpu_s_per_gb", 2), f("rss_mib", 1))
if r["errors"]:
    line += "  ERRORS: " + "; ".join(r["errors"])
if r.get("warnings"):
    line += "  WARNING: " + "; ".join(r["warnings"])
print(line)
' >&2
}

versions_json() {
    python3 - "$(uname -r)" "$(nproc)" \
        "$("$WGGO" --version 2>/dev/null | head -n1 || true)" \
        "$("$BORINGTUN" --version 2>/dev/null | head -n1 || true)" \
        "$("$NEBULA" -version 2>/dev/null | head -n1 || true)" \
        "$(iperf3 --version 2>/dev/null | head -n1 || true)" \
        "$("$WARD" --version 2>/dev/null | head -n1 || true)" <<'EOF'
import json, sys
k = ["kernel", "nproc", "wireguard-go", "boringtun-cli", "nebula", "iperf3", "ward"]
print(json.dumps(dict(zip(k, sys.argv[1:]))))
EOF
}

# ------------------------------------------------------------------ main
# how busy are the CPUs right now (percent, over one second)?
cpu_busy_pct() {
    python3 -c '
import time
def snap():
    v = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return sum(v), v[3] + v[4]
t0, i0 = snap(); time.sleep(1); t1, i1 = snap()
print(round(100 * (1 - (i1 - i0) / max(1, t1 - t0))))
'
}
busy=$(cpu_busy_pct)
if ((busy > 15)); then
    log "WARNING: the CPUs are ${busy}% busy with other work; figures will be noisy and low"
fi
# soak: one Ward tunnel, mixed traffic for SOAK seconds, RSS of both daemons every 10 s
soak() {
    local d="$WORK/soak" end i e line
    mkdir -p "$d"
    CUR_ROUND=1
    setup_ward || { echo "soak: ward setup failed (logs in $WORK)" >&2; KEEP_LOGS=1; exit 1; }
    for ((i = 0; i < 40; i++)); do tunnel_ok && break; sleep 0.5; done
    tunnel_ok || { echo "soak: tunnel did not come up" >&2; KEEP_LOGS=1; exit 1; }
    spawn "$NSB" "$d/iperf3-server.log" iperf3 -s -B "$INNER_B" -p 5201
    HELPER_PIDS+=("$SPAWNED $NSB")
    for ((i = 0; i < 50; i++)); do
        ip netns exec "$NSB" ss -ltn | grep -q "$INNER_B:5201 " && break
        sleep 0.1
    done
    end=$((SECONDS + SOAK))
    ( # the traffic mix, in a loop until the end
        while ((SECONDS < end)) && [[ -e "/run/netns/$NSA" ]]; do
            ip netns exec "$NSA" iperf3 -c "$INNER_B" -p 5201 -t 8 >/dev/null 2>&1
            ip netns exec "$NSA" ping -c 50 -i 0.02 -W 1 "$INNER_B" >/dev/null 2>&1
            ip netns exec "$NSA" iperf3 -c "$INNER_B" -p 5201 -t 8 -P 4 >/dev/null 2>&1
            sleep 3
            ip netns exec "$NSA" iperf3 -c "$INNER_B" -p 5201 -t 5 -u -b 300M -l 1200 >/dev/null 2>&1
            ip netns exec "$NSA" iperf3 -c "$INNER_B" -p 5201 -t 5 -R >/dev/null 2>&1
            sleep 5
        done
    ) &
    local traffic=$!
    log "soak: ${SOAK}s of mixed traffic; VmRSS of both daemons every 10 s"
    : >"$d/samples.jsonl"
    local t0=$SECONDS
    while ((SECONDS < end)); do
        sleep 10
        line="{\"t\": $((SECONDS - t0))"
        i=0
        for e in "${TUN_PIDS[@]}"; do
            line="$line, \"rss_kib_$i\": $(awk '/^VmRSS:/{print $2}' "/proc/${e%% *}/status" 2>/dev/null || echo null)"
            line="$line, \"hwm_kib_$i\": $(awk '/^VmHWM:/{print $2}' "/proc/${e%% *}/status" 2>/dev/null || echo null)"
            i=$((i + 1))
        done
        echo "$line}" | tee -a "$d/samples.jsonl" >&2
    done
    wait "$traffic" 2>/dev/null || true
    i=0
    for e in "${TUN_PIDS[@]}"; do
        python3 "$here/memmap.py" "${e%% *}" --json >"$d/mem-$i.json" 2>/dev/null || echo '{}' >"$d/mem-$i.json"
        i=$((i + 1))
    done
    mkdir -p "$(dirname "$OUT")"
    python3 - "$d" "$OUT" "$SOAK" "${#TUN_PIDS[@]}" <<'EOF'
import datetime, json, sys
d, out_f, secs, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
samples = [json.loads(l) for l in open(f"{d}/samples.jsonl") if l.strip()]
doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
       "soak_s": secs, "samples": samples, "daemons": {}}
for k in range(n):
    name = "ab"[k] if k < 2 else str(k)
    rss = [s[f"rss_kib_{k}"] for s in samples if s.get(f"rss_kib_{k}") is not None]
    if not rss:
        continue
    warm = [s[f"rss_kib_{k}"] for s in samples if s["t"] >= 60 and s.get(f"rss_kib_{k}") is not None] or rss
    v = {"rss_first_kib": rss[0], "rss_max_kib": max(rss), "rss_last_kib": rss[-1],
         "hwm_last_kib": samples[-1].get(f"hwm_kib_{k}"),
         "growth_after_1min_kib": warm[-1] - warm[0], "mem_end": json.load(open(f"{d}/mem-{k}.json"))}
    doc["daemons"][name] = v
    print(f"daemon {name}: VmRSS first {rss[0]} KiB, max {max(rss)} KiB, last {rss[-1]} KiB, "
          f"growth after the first minute {v['growth_after_1min_kib']:+d} KiB; VmHWM {v['hwm_last_kib']} KiB")
json.dump(doc, open(out_f, "w"), indent=2)
print(f"results written to {out_f}")
EOF
}

if ((SOAK)); then
    setup_underlay
    soak
    exit 0
fi

log "implementations: ${IMPLS[*]}; rounds $ROUNDS; duration ${DURATION}s; boringtun-cli threads $BT_THREADS"
setup_underlay
for ((round = 1; round <= ROUNDS; round++)); do
    CUR_ROUND=$round
    for impl in "${IMPLS[@]}"; do
        log "round $round/$ROUNDS: $impl"
        if "setup_$impl" && measure "$impl" "$round"; then
            :
        else
            echo "{\"impl\": \"$impl\", \"round\": $round, \"errors\": [\"setup or measurement failed\"]}" >>"$RESULTS"
            echo "  $impl: FAILED (logs in $WORK)" >&2
            KEEP_LOGS=1
        fi
        teardown
    done
done

mkdir -p "$(dirname "$OUT")"
python3 - "$RESULTS" "$OUT" "$ROUNDS" "$DURATION" "$BT_THREADS" "$(versions_json)" "${PEERS[*]}" "${IMPLS[*]}" <<'EOF'
import json, statistics, sys, datetime
runs_f, out_f, rounds, duration, bt_threads, versions, peers, impls = sys.argv[1:9]
runs = [json.loads(l) for l in open(runs_f) if l.strip()]
peers = peers.split()
impls = impls.split()
figs = [  # key, title, higher is better, decimals
    ("tcp1_gbps", "tcp1 Gbit/s", True, 2),
    ("tcp4_gbps", "tcp4 Gbit/s", True, 2),
    ("rtt_idle_ms", "rtt idle ms", False, 3),
    ("rtt_load_ms", "rtt load ms", False, 3),
    ("cpu_s_per_gb", "cpu s/GB", False, 2),
    ("rss_mib", "rss MiB", False, 1),
]
med = {}
for i in impls:
    med[i] = {}
    for k, *_ in figs:
        v = [r[k] for r in runs if r["impl"] == i and r.get(k) is not None]
        med[i][k] = statistics.median(v) if v else None
# added idle RTT over raw veth
base = med.get("veth", {}).get("rtt_idle_ms")
for i in impls:
    v = med[i].get("rtt_idle_ms")
    med[i]["rtt_added_ms"] = (v - base) if (v is not None and base is not None and i != "veth") else None
figs.append(("rtt_added_ms", "rtt +ms", False, 3))
best = {}
for k, _, hi, _ in figs:
    c = [(med[p][k], p) for p in peers if p in med and med[p].get(k) is not None]
    if c:
        v, p = (max if hi else min)(c)
        best[k] = {"impl": p, "value": v}
ratios = {}
for i in impls:
    ratios[i] = {}
    for k, *_ in figs:
        v, b = med[i].get(k), best.get(k, {}).get("value")
        ratios[i][k] = (v / b) if (v is not None and b) else None

def cell(v, p, w):
    return ("-" if v is None else f"{v:.{p}f}").rjust(w)
w = 14
print()
print(f"medians over {rounds} round(s), {duration} s per iperf3 run")
clean = {}
for i in impls:
    rr = [r for r in runs if r["impl"] == i]
    clean[i] = f"{sum(1 for r in rr if not r.get('warnings') and not r.get('errors'))}/{len(rr)}"
print("implementation".ljust(15) + "".join(t.rjust(w) for _, t, _, _ in figs) + "clean runs".rjust(w))
for i in impls:
    print(i.ljust(15) + "".join(cell(med[i][k], p, w) for k, _, _, p in figs) + clean[i].rjust(w))
print()
print("ratio vs best peer (" + "/".join(peers) + "); throughput: higher is better, others: lower is better")
print("best peer".ljust(15) + "".join((best[k]["impl"] if k in best else "-").rjust(w) for k, *_ in figs))
for i in impls:
    print(i.ljust(15) + "".join(("-" if ratios[i][k] is None else f"{ratios[i][k]:.2f}x").rjust(w) for k, *_ in figs))
errs = [r for r in runs if r.get("errors")]
for r in errs:
    print(f"errors in {r['impl']} round {r['round']}: " + "; ".join(r["errors"]))
for r in runs:
    for w_ in r.get("warnings", []):
        print(f"warning in {r['impl']} round {r['round']}: {w_}")
doc = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "rounds": int(rounds), "duration_s": int(duration), "boringtun_threads": int(bt_threads),
    "underlay": "veth pair, MTU 1500, 10.201.0.1/24 <-> 10.201.0.2/24; inner MTU 1420 (wireguard-go, boringtun-cli, nebula)",
    "versions": json.loads(versions),
    "figures": {k: t for k, t, _, _ in figs},
    "runs": runs, "medians": med, "clean_runs": clean, "best_peer": best, "ratios_vs_best_peer": ratios,
}
with open(out_f, "w") as f:
    json.dump(doc, f, indent=2)
print(f"\nresults written to {out_f}")
EOF
if ((SMOKE)); then
    # Every selected run of ward and veth must have carried bytes; peers only warn.
    python3 - "$RESULTS" "${IMPLS[*]}" <<'EOF'
import json, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
bad = []
for impl in sys.argv[2].split():
    ok = [r for r in runs if r["impl"] == impl and (r.get("tcp1_bytes") or 0) > 0 and not r.get("errors")]
    if ok:
        continue
    if impl in ("ward", "veth"):
        bad.append(impl)
    else:
        print(f"smoke: warning: {impl} carried nothing (see the errors above)", file=sys.stderr)
if bad:
    print(f"smoke: FAILED: {', '.join(bad)} carried nothing", file=sys.stderr)
    sys.exit(1)
print("smoke: ok (ward and veth carried traffic)", file=sys.stderr)
EOF
fi
