#!/usr/bin/env bash
# Path MTU, end to end: 50 MB TCP transfers over Ward arrive intact when the underlay carries
# less than 1500 bytes: every link at 1460, every link at 1280, and a router with a 1280-byte
# uplink in front of one device (its own link stays at 1500, so only the router's ICMP
# fragmentation-needed can teach it), the same router at 1400 dropping all ICMP (a path MTU
# black hole: only active probing finds it), and the pair forced onto a relay (direct UDP between
# them dropped) whose link is at 1280. Prints each transfer's throughput against the same
# transfer over 1500-byte links. One lab for all cases: MTUs change with `ip link set mtu`.
# Needs root; prints `N passed, N failed` and exits non-zero on any failure.
set -uo pipefail
source "$(dirname "$0")/common.sh"
need_root
lab_have_ward && lab_have_relay ||
    { echo "build first: cargo build --release --locked --workspace --bins"; exit 1; }

lab_init
lab_add_wan_host srv           # a server directly on the wan
lab_add_natted_host alice      # a laptop behind a home NAT
lab_add_wan_host relay         # a relay, registered only for the relayed case
lab_start_coordinator
for h in srv alice; do lab_start_device "$h"; done
lab_coord user add alice >/dev/null
lab_device_up srv "$(lab_token --tag server)" >/dev/null
lab_device_up alice "$(lab_token --user alice)" >/dev/null
lab_coord policy apply "$E2E_DIR/policies/open-lab.toml" >/dev/null
SRV4=$(lab_ward_ipv4 srv)
AL4=$(lab_ward_ipv4 alice)
SRV6=$(lab_ward_json_get srv 's["ipv6"]')
lab_wait_for -t 15 lab_exec alice ping -c1 -W1 "$SRV4"

head -c 50M /dev/urandom >"$LAB_DIR/blob"
WANT=$(sha256sum <"$LAB_DIR/blob" | cut -d' ' -f1)
PORT=6000
declare -A RATE

# peer_json HOST PEER FIELD: FIELD of PEER (hostname) in HOST's `ward status --json`.
peer_json() { lab_ward_json_get "$1" "[p.get('$3') for p in s['peers'] if p['hostname']=='$2'][0]"; }
path_json() { lab_ward_json_get "$1" "s['counters']['path']['$2']"; }
# peer_mtu_is HOST PEER MTU: HOST's status shows the path MTU to PEER as MTU (probing rounds
# take a second or two to settle, so checks wait for it with a bound).
peer_mtu_is() { test "$(peer_json "$1" "$2" path_mtu)" = "$3"; }

# transfer LABEL FROM TO TO_IP: 50 MB over TCP from FROM to TO_IP (TO's overlay address),
# checks the SHA-256, records the throughput in RATE[LABEL].
transfer() {
    local label="$1" from="$2" to="$3" ip="$4" got t0 t1 ms fam
    PORT=$((PORT + 1))
    got="$LAB_DIR/got-$label"
    fam=-4
    [[ "$ip" == *:* ]] && fam=-6
    lab_spawn "$to" "nc-$label.log" sh -c "nc $fam -l -p $PORT | sha256sum > $got.tmp && mv $got.tmp $got"
    lab_wait_for -t 5 sh -c "ip netns exec $(lab_ns "$to") ss -ltn | grep -q ':$PORT '"
    t0=$(now_ms)
    check "$label: 50 MB $from -> $to sent within ${MTU_E2E_TIMEOUT:-60} s" lab_exec "$from" timeout "${MTU_E2E_TIMEOUT:-60}" nc -N -w 10 "$ip" "$PORT" <"$LAB_DIR/blob"
    lab_wait_for -t 15 test -s "$got"
    t1=$(now_ms)
    ms=$((t1 - t0))
    if [[ "$(cut -d' ' -f1 "$got" 2>/dev/null)" == "$WANT" ]]; then
        pass "$label: checksum matches"
        RATE[$label]=$(python3 -c "print(f'{50*8*1.048576/($ms/1000):.0f}')")
        echo "  $label: ${ms} ms, ${RATE[$label]} Mbit/s"
    else
        fail "$label: checksum matches (transfer incomplete after ${ms} ms)"
    fi
}

say "1. 1500-byte links (reference)"
transfer base-up alice srv "$SRV4"
transfer base-down srv alice "$AL4"
MTU_SRV=$(peer_json alice srv path_mtu)
check "1. alice shows srv's path MTU 1500 in ward status (got '$MTU_SRV')" test "$MTU_SRV" = 1500
check "1. nothing dropped for size on 1500-byte paths" test "$(path_json alice dropped_too_big)" -eq 0 -a "$(path_json srv dropped_too_big)" -eq 0

say "2. a router with a 1280-byte uplink in front of alice (alice's own link is 1500)"
lab_set_link_mtu alice-nat 1280
lab_flush_pmtu
ICMP0=$(path_json alice icmp_too_big_sent)
transfer router-up alice srv "$SRV4"
MTU_SRV=$(peer_json alice srv path_mtu)
check "2. alice learned the 1280 path from the router's ICMP (status path_mtu '$MTU_SRV')" test "$MTU_SRV" = 1280
ICMP1=$(path_json alice icmp_too_big_sent)
check "2. alice told its inner stack (ICMP frag-needed into the TUN: $ICMP0 -> $ICMP1)" test "$ICMP1" -gt "$ICMP0"
check "2. alice's kernel lowered the inner route's PMTU to 1220" \
    bash -c "ip netns exec $(lab_ns alice) ip route get $SRV4 | grep -q 'mtu 1220'"
lab_set_link_mtu alice-nat 1500
lab_flush_pmtu
lab_wait_for -t 15 peer_mtu_is alice srv 1500
check "2. alice's path to srv carries 1500 again once the router's link does (status path_mtu '$(peer_json alice srv path_mtu)')" peer_mtu_is alice srv 1500

say "3. a router with a 1400-byte uplink in front of alice that drops all ICMP (a path MTU black hole: no kernel learns it)"
# alice's packets to srv are too big for the router's uplink and the router's
# fragmentation-needed never leaves it: only active probing can find the 1400 bytes. (The other
# way, the lab's veth delivers 1500-byte packets into the router's 1400-byte link, so that
# direction carries 1500, and probing must not say less.)
ip netns exec "$(lab_ns alice-nat)" nft -f - <<'NFT'
table inet wardnoicmp {
    chain forward {
        type filter hook forward priority -10; policy accept;
        meta l4proto icmp drop
        icmpv6 type packet-too-big drop
    }
    chain output {
        type filter hook output priority -10; policy accept;
        meta l4proto icmp drop
        icmpv6 type packet-too-big drop
    }
}
NFT
lab_set_link_mtu alice-nat 1400
lab_flush_pmtu
SRV_PUB=$(lab_public_ip srv)
AL_PUB=$(lab_public_ip alice)
PROBES0=$(path_json alice probes_acked)
transfer hole-up alice srv "$SRV4"
transfer hole-down srv alice "$AL4"
lab_wait_for -t 15 peer_mtu_is alice srv 1400
MTU_SRV=$(peer_json alice srv path_mtu)
MTU_AL=$(peer_json srv alice path_mtu)
check "3. alice probed srv's path MTU down to 1400 (status path_mtu '$MTU_SRV')" test "$MTU_SRV" = 1400
check "3. srv's probes found its path to alice carries 1500 (status path_mtu '$MTU_AL')" test "$MTU_AL" = 1500
check "3. alice's kernel never learned it (no MTU on its route to srv)" \
    bash -c "! ip netns exec $(lab_ns alice) ip route get $SRV_PUB | grep -q ' mtu '"
echo "  alice counters.path: $(lab_ward_json_get alice 's["counters"]["path"]')"
check "3. alice's probes were answered and counted (probes_acked $PROBES0 -> $(path_json alice probes_acked))" \
    test "$(path_json alice probes_acked)" -gt "$PROBES0"
check "3. some of alice's probes were lost (probes_lost $(path_json alice probes_lost))" test "$(path_json alice probes_lost)" -gt 0
check "3. alice logged the probed path MTU" grep -q "path MTU set by probing" "$LAB_DIR/logs/ward-alice.log"
ip netns exec "$(lab_ns alice-nat)" nft delete table inet wardnoicmp
lab_set_link_mtu alice-nat 1500

for mtu in 1460 1280; do
    n=$((mtu == 1460 ? 4 : 5))
    say "$n. every link at MTU $mtu"
    lab_set_all_mtu "$mtu"
    transfer "all$mtu-up" alice srv "$SRV4"
    transfer "all$mtu-down" srv alice "$AL4"
    # Inner IPv6 learns from packet-too-big (over an IPv4 underlay of 1280 the inner MTU would
    # be 1220, below the IPv6 minimum: not supported).
    [[ $mtu == 1460 ]] && transfer "all$mtu-v6-up" alice srv "$SRV6"
    # A path whose MTU only shrank under a sender that already sends smaller (alice still at
    # the 1400 her probes found) learns it from the kernel's next refresh (every second) and
    # the probe round that follows, not from a failed send.
    lab_wait_for -t 15 peer_mtu_is alice srv "$mtu"
    lab_wait_for -t 15 peer_mtu_is srv alice "$mtu"
    check "$n. alice shows srv's path MTU $mtu (status path_mtu '$(peer_json alice srv path_mtu)')" peer_mtu_is alice srv "$mtu"
    check "$n. srv shows alice's path MTU $mtu (status path_mtu '$(peer_json srv alice path_mtu)')" peer_mtu_is srv alice "$mtu"
done

say "6. send failures are counted by reason, not silent"
FAILED=$(lab_ward_json_get alice 's["counters"]["path"]')
echo "  alice counters.path: $FAILED"
check "6. path counters are in ward status --json" test -n "$FAILED"
check "6. alice logged the path MTU change" grep -q "path MTU to peer endpoint changed" "$LAB_DIR/logs/ward-alice.log"
check "6. srv logged the path MTU change" grep -q "path MTU to peer endpoint changed" "$LAB_DIR/logs/ward-srv.log"

say "7. the pair forced onto a relay whose link is at 1280 (direct UDP between them dropped)"
lab_set_all_mtu 1500
SRV_IP=$(lab_public_ip srv)
ip netns exec "$(lab_ns alice-nat)" nft -f - <<NFT
table ip wardblock {
    chain forward {
        type filter hook forward priority -10; policy accept;
        ip daddr $SRV_IP udp dport 51820 drop
        ip saddr $SRV_IP udp sport 51820 drop
    }
}
NFT
lab_set_link_mtu relay 1280
lab_start_relay relay r1 >/dev/null
check "7. the relay joins the coordinator" lab_relay_wait_welcomed relay 15
# relayed HOST PEER: with a ping to keep traffic flowing, HOST's path to PEER is a relay.
relayed() {
    lab_exec "$1" ping -c1 -W1 "$2" >/dev/null 2>&1
    test "$(lab_ward_json_get "$1" "[p['path']['kind'] for p in s['peers'] if p['hostname']=='$3'][0]" 2>/dev/null)" = relay
}
check "7. alice's path to srv is the relay" lab_wait_for -t 30 -i 0.3 relayed alice "$SRV4" srv
check "7. srv's path to alice is the relay" lab_wait_for -t 15 -i 0.3 relayed srv "$AL4" alice
RB0=$(lab_relay_metric relay ward_relay_relayed_bytes_total)
transfer relay1280-up alice srv "$SRV4"
transfer relay1280-down srv alice "$AL4"
check "7. the transfers stayed on the relay" relayed alice "$SRV4" srv
RB1=$(lab_relay_metric relay ward_relay_relayed_bytes_total)
check "7. the relay forwarded both transfers (>= 100 MB: $((RB1 - RB0)) bytes)" test $((RB1 - RB0)) -ge 104857600
ip netns exec "$(lab_ns alice-nat)" nft delete table ip wardblock

say "throughput, 50 MB single TCP stream (Mbit/s; 1500-byte links = 1.00)"
for dir in up down; do
    base=${RATE[base-$dir]:-0}
    for label in "router-$dir" "hole-$dir" "all1460-$dir" "all1460-v6-$dir" "all1280-$dir" "relay1280-$dir"; do
        [[ -n "${RATE[$label]:-}" ]] || continue
        printf '  %-14s %6s Mbit/s  (%s x of %s Mbit/s over 1500)\n' "$label" "${RATE[$label]}" \
            "$(python3 -c "print(f'{${RATE[$label]}/max($base,1):.2f}')")" "$base"
    done
done

finish
