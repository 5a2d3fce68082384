#!/usr/bin/env bash
# Device names in DNS, end to end: alice's agent manages her namespace's resolv.conf (the
# /etc/netns/NS/resolv.conf that `ip netns exec` bind-mounts over /etc/resolv.conf), so
# `ping db.ward.internal` and `nc db.ward.internal 5432` work by name; `secret` (in her netmap,
# but she may not reach it) does not resolve; the service name pg.ward.internal resolves to db;
# a peer's query to alice's resolver is ignored; other names go to the previous resolver (dnsmasq in a lab namespace with a static record);
# garbage to the resolver (truncated, oversized, compression loops, 100 000 random names) gets
# an answer or nothing, the daemon lives on and its RSS stays flat; `ward down`, and a restart
# after `kill -9`, put the resolv.conf back byte for byte. Needs root; prints
# `N passed, N failed`.
set -uo pipefail
source "$(dirname "$0")/common.sh"
need_root
lab_have_ward || { echo "build first: cargo build --release --workspace --bins"; exit 1; }
command -v dnsmasq >/dev/null || { echo "dnsmasq not installed (Debian package dnsmasq-base)"; exit 1; }
T0=$SECONDS

lab_init
NETNS_DIR=""
cleanup_dns() {
    local rc=$?
    lab_cleanup
    [[ -n "$NETNS_DIR" ]] && rm -rf "$NETNS_DIR"
    exit "$rc"
}
trap cleanup_dns EXIT
lab_add_wan_host resolver
lab_add_wan_host alice
lab_add_wan_host db
lab_add_wan_host secret
RESOLVER=$(lab_ip resolver)

say "setup"
# The previous resolver: dnsmasq with one static record, nothing else.
lab_spawn resolver dnsmasq.log dnsmasq --keep-in-foreground --no-resolv --no-hosts \
    --bind-interfaces --listen-address="$RESOLVER" --port 53 --pid-file= --user=root \
    --host-record=outside.lab.example,10.99.0.77 --log-facility=-
# alice's namespace gets its own resolv.conf (created here, removed at exit); a unique line
# proves the daemon's /etc/resolv.conf is this file and never the host's.
NETNS_DIR="/etc/netns/$(lab_ns alice)"
mkdir -p "$NETNS_DIR"
MARK="# dns.sh lab $LAB_ID"
printf '%s\nnameserver %s\noptions timeout:1 attempts:2\n' "$MARK" "$RESOLVER" >"$NETNS_DIR/resolv.conf"
cp "$NETNS_DIR/resolv.conf" "$LAB_DIR/resolv.conf.orig"
if ! lab_exec alice grep -qx "$MARK" /etc/resolv.conf; then
    echo "alice's namespace does not see its own resolv.conf; refusing to run" >&2
    exit 1
fi
lab_start_coordinator
LAB_WARD_DNS_ARGS="--dns resolv.conf --resolv-conf /etc/resolv.conf" lab_start_device alice
lab_start_device db
lab_start_device secret
lab_coord policy apply "$E2E_DIR/policies/dns.toml" >/dev/null
lab_enroll alice --user alice >/dev/null
lab_enroll db --tag db >/dev/null
lab_enroll secret --tag secret >/dev/null
DB4=$(lab_ward_ipv4 db)
A4=$(lab_ward_ipv4 alice)
lab_spawn db listen.log sh -c "while true; do echo hi | nc -l -p 5432 -q 1; done"
APID=$(for p in $(lab_pids alice); do tr '\0' ' ' <"/proc/$p/cmdline" | grep -q "ward daemon" && echo "$p"; done | head -n1)

managed() { lab_exec alice grep -q "^nameserver $A4\$" /etc/resolv.conf; }
restored() { cmp -s "$NETNS_DIR/resolv.conf" "$LAB_DIR/resolv.conf.orig"; }
resolves() { lab_exec alice getent ahostsv4 "$1" | awk '{print $1}' | sort -u | grep -qx "$2"; }
check "alice's resolv.conf points at her agent ($A4)" lab_wait_for -t 10 managed
check "the backup is in the state dir, 0600" test "$(stat -c %a "$LAB_DIR/dev-alice/state/resolv.conf.ward-backup")" = 600
check "the backup holds the original bytes" cmp -s "$LAB_DIR/dev-alice/state/resolv.conf.ward-backup" "$LAB_DIR/resolv.conf.orig"

say "names"
check "db.ward.internal resolves to db ($DB4)" lab_wait_for -t 15 resolves db.ward.internal "$DB4"
pings() { lab_exec alice ping -c1 -W2 "$1" >/dev/null; }
check "ping db.ward.internal" pings db.ward.internal
check "TCP by name: nc db.ward.internal 5432" lab_exec alice timeout 5 nc -z -w 3 db.ward.internal 5432
check "upper case works: DB.Ward.Internal" resolves DB.Ward.Internal "$DB4"
check "alice's own name resolves" resolves alice.ward.internal "$A4"
check "the service name pg.ward.internal resolves to db" resolves pg.ward.internal "$DB4"
in_netmap() { grep -qx secret <<<"$(lab_ward_json_get alice '[p["hostname"] for p in s["peers"]]')"; }
check "secret is in alice's netmap (it may reach her)" lab_wait_for -t 10 in_netmap
known() { lab_exec alice getent hosts "$1" >/dev/null; }
fails() { ! "$@"; }
check "secret.ward.internal does not resolve for alice" fails known secret.ward.internal
check "an unknown name under the domain does not resolve" fails known nobody.ward.internal
check "outside.lab.example resolves through the previous resolver" resolves outside.lab.example 10.99.0.77
check "ward status: mode resolv.conf" test "$(lab_ward_json_get alice 's["dns"]["mode"]')" = resolv.conf
check "ward status: own name" test "$(lab_ward_json_get alice 's["dns"]["name"]')" = alice.ward.internal
check "ward status: db's name" test "$(lab_ward_json_get alice '[p["dns_name"] for p in s["peers"] if p["hostname"]=="db"][0]')" = db.ward.internal
check "ward status (text) shows the DNS mode" bash -c "ip netns exec $(lab_ns alice) $(lab_ward_bin ward) --socket $(lab_ward_socket alice) status | grep -q '^dns: .*alice.ward.internal (resolv.conf'"

peer_query() {
    lab_exec secret python3 -c '
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1.5)
s.sendto(bytes.fromhex("abcd01000001000000000000") + b"\x02db\x04ward\x08internal\x00\x00\x01\x00\x01", (sys.argv[1], 53))
s.recv(512)' "$A4" 2>/dev/null
}
check "a peer allowed to reach port 53 gets no answer from alice's resolver" fails peer_query
ignored_log() { grep -q "query from another device ignored" "$LAB_DIR/logs/ward-alice.log"; }
check "alice's agent logged that it ignored it" lab_wait_for -t 5 ignored_log
# (before the garbage below: its log lines would use up the rate-bounded budget)

say "the wire: rcodes, TCP, garbage"
rss() { awk '/VmRSS/ {print $2}' "/proc/$APID/status"; }
RSS0=$(rss)
lab_exec alice python3 "$E2E_DIR/dns_probe.py" "$A4" "$DB4" >"$LAB_DIR/probe.log" 2>&1
PROBE=$?
sed 's/^/    /' "$LAB_DIR/probe.log"
check "probe: NXDOMAIN for secret, TCP answers, garbage answered or dropped" test "$PROBE" = 0
RSS1=$(rss)
echo "    agent RSS before ${RSS0} KiB, after ${RSS1} KiB"
check "daemon alive after the garbage" kill -0 "$APID"
check "RSS flat (grew less than 8 MiB)" test $((RSS1 - RSS0)) -lt 8192
check "still answering after the garbage" resolves db.ward.internal "$DB4"

say "restore"
lab_ward alice down >/dev/null
check "ward down restores resolv.conf byte for byte" restored
check "no marker left" test ! -e "$LAB_DIR/dev-alice/state/dns-managed.json"
lab_ward alice up >/dev/null
check "ward up manages it again" lab_wait_for -t 10 managed
{ kill -9 "$APID"; wait "$APID"; } 2>/dev/null
check "after kill -9 the file is still managed" managed
LAB_WARD_DNS_ARGS="--dns resolv.conf --resolv-conf /etc/resolv.conf" lab_start_device alice
restored_log() { grep -q "restored the resolv.conf a previous run left managed" "$LAB_DIR/logs/ward-alice.log"; }
check "the restarted daemon restores the leftover first" lab_wait_for -t 10 restored_log
check "and manages it again (enabled device)" lab_wait_for -t 10 managed
check "names resolve after the restart" lab_wait_for -t 15 resolves db.ward.internal "$DB4"
lab_ward alice down >/dev/null
check "ward down after the crash restores the original byte for byte" restored

echo "dns.sh runtime: $((SECONDS - T0)) s"
finish
