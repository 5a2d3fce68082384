#!/usr/bin/env bash
# Every benchmark and example in its quick mode, for CI: a rot check that each still builds,
# starts and carries traffic, never a timed test (no figure is compared with anything).
#
#   sudo bench/smoke.sh        # about a minute once built; without root the namespace parts
#                              # (dp_pair.sh, throughput.sh, relay.sh, order.sh) and ha_scale.sh
#                              # (a PostgreSQL cluster) are reported SKIPPED
#
# Builds what it runs (release, --locked). throughput.sh --smoke needs iperf3, ping and
# python3, and runs the peers (wireguard-go, boringtun-cli, nebula) only if installed.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== building (release): ward, ward-coordinator, examples dp_pair, netmap_bench and load"
# One invocation, so the bins and the examples share one feature resolution (one build).
cargo build --locked --release --workspace --bins --example dp_pair --example netmap_bench --example load

echo "== netmap_bench, 200 devices"
target/release/examples/netmap_bench 200

echo "== dp_pair genkey"
target/release/examples/dp_pair genkey >/dev/null

echo "== bench/load.sh --smoke (20 real device sessions on loopback, no root)"
WARD_BIN_DIR=target/release bench/load.sh --smoke

if [[ $EUID -ne 0 ]]; then
    echo "SKIPPED: client/examples/dp_pair.sh, bench/throughput.sh --smoke, bench/relay.sh --smoke, bench/order.sh --smoke and bench/ha_scale.sh --smoke need root (network namespaces, TUN, a PostgreSQL cluster); they were NOT run"
    exit 0
fi

echo "== bench/ha_scale.sh --smoke (10 sessions: one SQLite coordinator, then two replicas on PostgreSQL)"
WARD_BIN_DIR=target/release bench/ha_scale.sh --smoke

echo "== client/examples/dp_pair.sh, 1 s iperf3"
client/examples/dp_pair.sh 1

echo "== bench/throughput.sh --smoke"
bench/throughput.sh --smoke

echo "== bench/relay.sh --smoke"
bench/relay.sh --smoke

echo "== bench/order.sh --smoke (the link order of ward, regenerated under callgrind into a temporary file)"
bench/order.sh --smoke
