#!/usr/bin/env bash
# IPv6 underlays, end to end. Part 1, an IPv6-only underlay (no IPv4 address on any underlay
# interface): the coordinator listens dual-stack on [::], its public address is an IPv6
# literal, three devices enroll over IPv6, publish IPv6 candidates, reach each other directly
# over IPv6 endpoints, and carry ping and TCP over the overlay's IPv4 and IPv6; then a relay with
# an IPv6 address only joins, direct UDP between a and b is dropped (ip6tables), and a and b
# talk through the relay: `ward status` says so, ping and a 20 MB TCP transfer arrive intact,
# and the relay's metrics count the bytes. Part 2, a
# dual-stack underlay: a device reaches a coordinator given by an IPv4 literal through its
# dual-stack endpoint. Part 3, happy eyeballs: a coordinator name with both an IPv6 and an IPv4
# address is reached over IPv6 first, and over IPv4 within the happy-eyeballs delay when IPv6
# to it is dropped.
# Needs root; prints `N passed, N failed` and exits non-zero on any failure.
set -uo pipefail
source "$(dirname "$0")/common.sh"
need_root
lab_have_ward || { echo "build first: cargo build --release --locked --workspace --bins"; exit 1; }

peer_json() { lab_ward_json_get "$1" "[p.get('$3') for p in s['peers'] if p['hostname']=='$2'][0]"; }

# no_underlay_ipv4 HOST: HOST has no IPv4 address on any interface but lo and the overlay's.
no_underlay_ipv4() {
    [[ -z "$(lab_exec "$1" ip -4 -o addr show | awk '$2 != "lo" && $2 !~ /^ward/')" ]]
}
# listens_dual_stack HOST PORT: the UDP listener on PORT is bound to [::] (IPv6 wildcard).
listens_dual_stack() {
    lab_exec "$1" ss -H -uln "sport = :$2" | awk '{print $4}' | grep -Eq '^(\[::\]|\*):'"$2"'$'
}
# direct_v6 HOST PEER: HOST's last authenticated packet from PEER came from an fd00:99:: address.
direct_v6() { peer_json "$1" "$2" endpoint | grep -q '^\[fd00:99::'; }
# enroll HOST: `ward up` in HOST with a new token for the lab's user alice.
enroll() { lab_device_up "$1" "$(lab_token --user alice)" >/dev/null; }
# has_candidate HOST PEER ADDR: PEER's published candidate endpoints (as HOST sees them) hold ADDR.
has_candidate() { peer_json "$1" "$2" endpoints | grep -qxF "$3"; }
# path_is HOST PEER PREFIX: HOST's path to PEER starts with PREFIX.
path_is() { [[ "$(peer_json "$1" "$2" path_text)" == "$3"* ]]; }
# tcp_check FROM TO DST PORT LABEL: $LAB_DIR/blob (10 or 20 MB, SHA-256 in $WANT) over TCP
# from FROM to DST (TO's overlay address), SHA-256 compared.
tcp_check() {
    local from="$1" to="$2" dst="$3" port="$4" label="$5" fam=""
    [[ "$dst" == *:* ]] && fam="-6"
    rm -f "$LAB_DIR/got-$port"
    lab_spawn "$to" "nc-$port.log" sh -c "nc $fam -l -p $port | sha256sum > $LAB_DIR/got-$port"
    lab_wait_for -t 5 sh -c "ip netns exec $(lab_ns "$to") ss -H -tln 'sport = :$port' | grep -q ."
    check "$label: $(($(stat -c %s "$LAB_DIR/blob") >> 20)) MB sent" lab_exec "$from" timeout 30 nc -N "$dst" "$port" <"$LAB_DIR/blob"
    lab_wait_for -t 10 test -s "$LAB_DIR/got-$port"
    check "$label: checksum matches" test "$(cut -d' ' -f1 "$LAB_DIR/got-$port" 2>/dev/null)" = "$WANT"
}

T0=$SECONDS
say "1. IPv6-only underlay: coordinator at an IPv6 literal, three devices on the wan"
lab_init --ipv6-only
for h in a b c relay; do lab_add_wan_host "$h"; done
for h in wan a b c relay; do check "$h has no IPv4 underlay address" no_underlay_ipv4 "$h"; done
check "wan host a is fd00:99::11" test "$(lab_ip a)" = "fd00:99::11"
lab_start_coordinator
check "coordinator public address is [fd00:99::1]:7443" test "$(lab_coord_addr)" = "[fd00:99::1]:7443"
check "coordinator listens on [::]:7443 (dual-stack)" listens_dual_stack wan 7443
for h in a b c; do lab_start_device "$h"; done
lab_coord user add alice >/dev/null
for h in a b c; do
    check "$h enrolls over IPv6" enroll "$h"
done
lab_coord policy apply "$E2E_DIR/policies/open-lab.toml" >/dev/null
A4=$(lab_ward_ipv4 a); B4=$(lab_ward_ipv4 b); C4=$(lab_ward_ipv4 c)
A6=$(lab_ward_json_get a 's["ipv6"]'); B6=$(lab_ward_json_get b 's["ipv6"]'); C6=$(lab_ward_json_get c 's["ipv6"]')
check "a lists b as a peer" lab_ward_wait_peer a "$B4" 15
check "a lists c as a peer" lab_ward_wait_peer a "$C4" 15
check "c lists a" lab_ward_wait_peer c "$A4" 15
check "b publishes its IPv6 candidate [fd00:99::12]:51820 (seen by a)" has_candidate a b "[fd00:99::12]:51820"

say "2. direct paths over IPv6 endpoints; ping and TCP over the overlay's IPv4 and IPv6"
lab_wait_for -t 15 lab_exec a ping -c1 -W1 "$B4"
check "a -> b overlay IPv4 ping" lab_exec a ping -c3 -i0.2 -W2 "$B4"
check "a -> c overlay IPv6 ping" lab_exec a ping -6 -c3 -i0.2 -W2 "$C6"
check "b -> c overlay IPv4 ping" lab_exec b ping -c3 -i0.2 -W2 "$C4"
check "c -> a overlay IPv6 ping" lab_exec c ping -6 -c3 -i0.2 -W2 "$A6"
check "a sees b on a direct IPv6 endpoint ($(peer_json a b endpoint))" direct_v6 a b
check "b sees a on a direct IPv6 endpoint ($(peer_json b a endpoint))" direct_v6 b a
check "c sees a on a direct IPv6 endpoint" direct_v6 c a
check "a's path to b is direct over IPv6 ($(peer_json a b path))" path_is a b "direct [fd00:99::12]:51820"
head -c 10M /dev/urandom >"$LAB_DIR/blob"
WANT=$(sha256sum <"$LAB_DIR/blob" | cut -d' ' -f1)
tcp_check a b "$B4" 5001 "a -> b TCP over overlay IPv4"
tcp_check c a "$A6" 5002 "c -> a TCP over overlay IPv6"

say "2r. a relay with an IPv6 address only; direct UDP between a and b dropped"
T0R=$SECONDS
check "the relay registers at [fd00:99::14]:3478" test "$(lab_start_relay relay r1)" = "[fd00:99::14]:3478"
check "the relay joins the coordinator over IPv6" lab_relay_wait_welcomed relay 15
# a drops every WireGuard datagram to and from b's underlay address: only the relay is left.
B_UNDER=$(lab_ip b)
lab_exec a ip6tables -A OUTPUT -d "$B_UNDER" -p udp --dport 51820 -j DROP
lab_exec a ip6tables -A INPUT -s "$B_UNDER" -p udp --sport 51820 -j DROP
path_kind() { lab_ward_json_get "$1" "[p['path']['kind'] for p in s['peers'] if p['hostname']=='$2'][0]" 2>/dev/null; }
# relayed HOST PEER PEER_IP: with a ping to keep traffic flowing, HOST's path to PEER is a relay.
relayed() { lab_exec "$1" ping -c1 -W1 "$3" >/dev/null 2>&1; test "$(path_kind "$1" "$2")" = relay; }
check "a's path to b is the relay (ward status --json path.kind)" lab_wait_for -t 30 -i 0.3 relayed a b "$B4"
check "b's path to a is the relay" lab_wait_for -t 15 -i 0.3 relayed b a "$A4"
check "a names relay r1 for b ($(peer_json a b path_text))" path_is a b "relay r1"
check "a's path to c stays direct over IPv6" path_is a c "direct [fd00:99::13]:51820"
check "a -> b overlay IPv4 ping through the relay" lab_exec a ping -c3 -i0.2 -W2 "$B4"
check "b -> a overlay IPv6 ping through the relay" lab_exec b ping -6 -c3 -i0.2 -W2 "$A6"
head -c 20M /dev/urandom >"$LAB_DIR/blob"
WANT=$(sha256sum <"$LAB_DIR/blob" | cut -d' ' -f1)
RB0=$(lab_relay_metric relay ward_relay_relayed_bytes_total)
tcp_check a b "$B4" 5003 "a -> b TCP through the IPv6 relay"
check "the transfer stayed on the relay" test "$(path_kind a b)" = relay
RB1=$(lab_relay_metric relay ward_relay_relayed_bytes_total)
check "the relay's metrics count the transfer (>= 20 MB: $((RB1 - RB0)) bytes)" test $((RB1 - RB0)) -ge 20971520
echo "    relayed part $((SECONDS - T0R))s"
P1=$((SECONDS - T0))

lab_cleanup
T1=$SECONDS
say "3. dual-stack underlay: IPv4-literal coordinator address, dual-stack device endpoint"
lab_init --dual-stack
for h in d e; do lab_add_wan_host "$h"; done
check "d has both families (10.99.0.11, fd00:99::11)" test "$(lab_ip d) $(lab_ip6 d)" = "10.99.0.11 fd00:99::11"
lab_start_coordinator
check "coordinator public address is the IPv4 literal 10.99.0.1:7443" test "$(lab_coord_addr)" = "10.99.0.1:7443"
check "coordinator listens on [::]:7443 (dual-stack)" listens_dual_stack wan 7443
for h in d e; do lab_start_device "$h"; done
lab_coord user add alice >/dev/null
check "d enrolls at the IPv4 address" enroll d
check "e enrolls at the IPv4 address" enroll e
lab_coord policy apply "$E2E_DIR/policies/open-lab.toml" >/dev/null
D4=$(lab_ward_ipv4 d); E4=$(lab_ward_ipv4 e)
check "d lists e as a peer" lab_ward_wait_peer d "$E4" 15
lab_wait_for -t 15 lab_exec d ping -c1 -W1 "$E4"
check "d -> e overlay IPv4 ping" lab_exec d ping -c3 -i0.2 -W2 "$E4"
check "e -> d overlay IPv4 ping" lab_exec e ping -c3 -i0.2 -W2 "$D4"
P2=$((SECONDS - T1))

lab_cleanup
T2=$SECONDS
say "4. happy eyeballs: a coordinator name with an IPv6 and an IPv4 address"
lab_init --dual-stack
for h in f g; do lab_add_wan_host "$h"; done
# `ip netns exec` bind-mounts /etc/netns/NS/hosts over /etc/hosts: the name resolves to both
# families inside f and g only.
NETNS_ETC=()
for h in f g; do
    NETNS_ETC+=("/etc/netns/$(lab_ns "$h")")
    mkdir -p "/etc/netns/$(lab_ns "$h")"
    printf '10.99.0.1 coord.ward-lab.test\nfd00:99::1 coord.ward-lab.test\n' >"/etc/netns/$(lab_ns "$h")/hosts"
done
cleanup_etc() { local rc=$?; rm -rf "${NETNS_ETC[@]}"; (exit "$rc"); lab_cleanup; }
trap cleanup_etc EXIT
LAB_COORD_PUBLIC_ADDR="coord.ward-lab.test:7443" lab_start_coordinator
# g's IPv6 route to the coordinator silently drops everything.
lab_exec g ip -6 route add blackhole fd00:99::1/128
for h in f g; do lab_start_device "$h"; done
lab_coord user add alice >/dev/null
check "f enrolls at the name" enroll f
t0=$(now_ms)
check "g enrolls at the name with IPv6 to it dropped" enroll g
EG=$(($(now_ms) - t0))
check "g's enrollment fell back to IPv4 quickly (${EG} ms < 3000 ms)" test "$EG" -lt 3000
# remote_of HOST: the remote address the coordinator logged for HOST's control session.
remote_of() {
    sed 's/\x1b\[[0-9;]*m//g' "$LAB_DIR/logs/coordinator.log" |
        sed -n "s/.*device connected .*hostname=$1 remote=\(.*\)$/\1/p" | tail -n1
}
# remote_is HOST PREFIX: that address starts with PREFIX.
remote_is() { [[ "$(remote_of "$1")" == "$2"* ]]; }
lab_wait_for -t 5 test -s "$LAB_DIR/logs/coordinator.log"
lab_wait_for -t 5 remote_is g "["
check "f's control session came over IPv6, tried first ($(remote_of f))" remote_is f "[fd00:99::11]:"
check "g's control session came over IPv4 ($(remote_of g))" remote_is g "[::ffff:10.99.0.12]:"
rm -rf "${NETNS_ETC[@]}"
P3=$((SECONDS - T2))

echo "timing: IPv6-only part ${P1}s, dual-stack part ${P2}s, happy-eyeballs part ${P3}s"
finish
