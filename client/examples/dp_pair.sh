#!/usr/bin/env bash
# Two Ward data planes in two network namespaces joined by a veth pair
# (10.203.0.1/24 <-> 10.203.0.2/24); ping and a single-stream iperf3 over the overlay
# (100.64.0.1 -> 100.64.0.2). Needs root, iproute2, iperf3, python3.
#
#   cargo build --release -p ward-client --examples
#   sudo client/examples/dp_pair.sh [SECONDS]        # default 10
#
# Env: DP_PAIR_BIN (binary), RAW=1 (also measure the raw veth), REVERSE=1 (also iperf3 -R),
#      RUST_LOG (data-plane log level, logs in the temp dir printed at the end).
set -euo pipefail

SECS=${1:-10}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${DP_PAIR_BIN:-$ROOT/target/release/examples/dp_pair}
[ -x "$BIN" ] || { echo "build first: cargo build --release -p ward-client --examples" >&2; exit 1; }

SUF=$(head -c4 /dev/urandom | od -An -tx1 | tr -d ' \n')
NSA=wdpa$SUF
NSB=wdpb$SUF
VA=wdpva$SUF
VB=wdpvb$SUF
TMP=$(mktemp -d /tmp/wdp.XXXXXX)
PIDS=()

cleanup() {
  set +e
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null
  done
  ip netns del "$NSA" 2>/dev/null
  ip netns del "$NSB" 2>/dev/null
  echo "logs: $TMP"
}
trap cleanup EXIT INT TERM

ip netns add "$NSA"
ip netns add "$NSB"
ip link add "$VA" netns "$NSA" type veth peer name "$VB" netns "$NSB"
ip -n "$NSA" addr add 10.203.0.1/24 dev "$VA"
ip -n "$NSB" addr add 10.203.0.2/24 dev "$VB"
for ns in "$NSA" "$NSB"; do ip -n "$ns" link set lo up; done
ip -n "$NSA" link set "$VA" up
ip -n "$NSB" link set "$VB" up

read -r KA PA < <("$BIN" genkey)
read -r KB PB < <("$BIN" genkey)

DP_PRIVATE_KEY=$KA ip netns exec "$NSA" "$BIN" run --ipv4 100.64.0.1 --ipv6 fd00:77::1 \
  --peer-key "$PB" --peer-ipv4 100.64.0.2 --peer-ipv6 fd00:77::2 \
  --endpoint 10.203.0.2:51820 >"$TMP/a.out" 2>"$TMP/a.log" &
PIDS+=($!)
DP_PRIVATE_KEY=$KB ip netns exec "$NSB" "$BIN" run --ipv4 100.64.0.2 --ipv6 fd00:77::2 \
  --peer-key "$PA" --peer-ipv4 100.64.0.1 --peer-ipv6 fd00:77::1 \
  --endpoint 10.203.0.1:51820 >"$TMP/b.out" 2>"$TMP/b.log" &
PIDS+=($!)
DPA=${PIDS[0]}
DPB=${PIDS[1]}

for f in a b; do # "up:" is printed once the TUN, addresses and routes are in place
  for _ in $(seq 100); do grep -q '^up:' "$TMP/$f.out" 2>/dev/null && break; sleep 0.1; done
  grep -q '^up:' "$TMP/$f.out" || { echo "data plane $f did not start:" >&2; cat "$TMP/$f.log" >&2; exit 1; }
done

echo "== ping (IPv4, IPv6) over the overlay"
ip netns exec "$NSA" ping -c 5 -i 0.2 -W 2 100.64.0.2 | tail -2
ip netns exec "$NSA" ping -6 -c 3 -i 0.2 -W 2 fd00:77::2 | tail -2

ip netns exec "$NSB" iperf3 -s -D -I "$TMP/iperf3.pid" >/dev/null
sleep 0.3
IPERF_PID=$(cat "$TMP/iperf3.pid")
PIDS+=("$IPERF_PID")

cpu_ticks() { # utime + stime of a process, in clock ticks
  awk '{print $14 + $15}' "/proc/$1/stat"
}

gbps() { python3 -c 'import json,sys; d=json.load(sys.stdin); print("%.2f" % (d["end"]["sum_received"]["bits_per_second"]/1e9))'; }
bytes() { python3 -c 'import json,sys; d=json.load(sys.stdin); print(int(d["end"]["sum_received"]["bytes"]))'; }

if [ "${RAW:-0}" = 1 ]; then
  echo "== raw veth: ping, iperf3 single stream ${SECS}s"
  ip netns exec "$NSA" ping -c 5 -i 0.2 -W 2 10.203.0.2 | tail -1
  ip netns exec "$NSA" iperf3 -c 10.203.0.2 -t "$SECS" -J >"$TMP/raw.json"
  echo "raw veth: $(gbps <"$TMP/raw.json") Gbit/s"
fi

run_iperf() { # $1 = label, rest = extra iperf3 args
  local label=$1; shift
  local a0 b0 a1 b1 hz
  hz=$(getconf CLK_TCK)
  a0=$(cpu_ticks "$DPA"); b0=$(cpu_ticks "$DPB")
  ip netns exec "$NSA" iperf3 -c 100.64.0.2 -t "$SECS" -J "$@" >"$TMP/$label.json"
  a1=$(cpu_ticks "$DPA"); b1=$(cpu_ticks "$DPB")
  local gb cpu
  gb=$(bytes <"$TMP/$label.json")
  cpu=$(python3 -c "print('%.2f' % ((($a1-$a0)+($b1-$b0))/$hz))")
  echo "ward overlay ($label): $(gbps <"$TMP/$label.json") Gbit/s;" \
    "data-plane CPU ${cpu}s for $(python3 -c "print('%.2f' % ($gb/1e9))") GB" \
    "= $(python3 -c "print('%.1f' % ((($a1-$a0)+($b1-$b0))/$hz/($gb/1e9)))") s/GB (both ends)"
}

echo "== iperf3 single stream ${SECS}s over the overlay"
run_iperf forward
if [ "${REVERSE:-0}" = 1 ]; then run_iperf reverse -R; fi

kill -TERM "$DPA" "$DPB"
wait "$DPA" "$DPB" 2>/dev/null || true
grep -h counters "$TMP/a.out" "$TMP/b.out" || true
