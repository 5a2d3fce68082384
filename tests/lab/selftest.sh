#!/usr/bin/env bash
# Self-test of tests/lab/lab.sh: builds a wan host and two natted hosts and
# checks reachability (natted -> wan works; wan -> natted and natted ->
# natted unsolicited fail), process handling, and that cleanup leaves nothing
# behind. Run as root: sudo tests/lab/selftest.sh
# Last line: "N passed, N failed"; exit status non-zero on any failure.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

pass() { echo "PASS: $1"; }
fail() { echo "FAIL: $1"; }
# check DESC CMD...: CMD must succeed
check() {
    local desc="$1"
    shift
    if "$@" >/dev/null 2>&1; then pass "$desc"; else fail "$desc"; fi
}
# check_not DESC CMD...: CMD must fail
check_not() {
    local desc="$1"
    shift
    if "$@" >/dev/null 2>&1; then fail "$desc"; else pass "$desc"; fi
}

inner() {
    # shellcheck source=tests/lab/lab.sh
    source "$here/lab.sh"
    lab_init
    echo "LABINFO $LAB_PREFIX $LAB_DIR"
    lab_add_wan_host srv
    lab_add_natted_host alice
    lab_add_natted_host bob
    lab_add_natted_host carol --symmetric

    local srv alice bob alice_pub bob_pub h
    srv=$(lab_ip srv)
    alice=$(lab_ip alice)
    bob=$(lab_ip bob)
    alice_pub=$(lab_public_ip alice)
    bob_pub=$(lab_public_ip bob)
    echo "INFO srv=$srv alice=$alice (public $alice_pub) bob=$bob (public $bob_pub)"

    local all_lo_up=1
    for h in wan srv alice alice-nat bob bob-nat; do
        lab_exec "$h" ping -c1 -W1 127.0.0.1 >/dev/null 2>&1 || all_lo_up=0
    done
    check "lo is up in every namespace" test "$all_lo_up" = 1
    check "lab_ns names carry the unique prefix" bash -c "[[ $(lab_ns alice) == ${LAB_PREFIX}-alice ]]"
    check "a TUN device can be created inside a natted host" \
        lab_exec alice sh -c 'ip tuntap add mode tun dev wtest0 && ip link set wtest0 up && ip tuntap del mode tun dev wtest0'

    check "wan host -> wan gateway (ping)" lab_exec srv ping -c1 -W2 10.99.0.1
    check "natted alice -> wan host (ping)" lab_exec alice ping -c1 -W2 "$srv"
    check "natted bob -> wan host (ping)" lab_exec bob ping -c1 -W2 "$srv"

    # TCP from behind NAT, and the wan sees the router's address
    lab_spawn srv tcp5000.log nc -n -v -l -k 5000
    lab_wait_for lab_exec srv sh -c 'ss -ltn | grep -q ":5000 "'
    check "natted alice -> wan host (tcp connect)" lab_exec alice nc -z -w2 "$srv" 5000
    check "wan sees alice as her router's public address (masquerade)" \
        lab_wait_for -t 3 grep -q "Connection received on $alice_pub " "$LAB_DIR/logs/tcp5000.log"

    # UDP from behind NAT
    lab_spawn srv udp5001.log nc -u -l 5001
    lab_wait_for lab_exec srv sh -c 'ss -lun | grep -q ":5001 "'
    lab_exec alice sh -c "echo hello-udp | nc -u -w1 $srv 5001" >/dev/null 2>&1 || true
    check "natted alice -> wan host (udp datagram arrives)" \
        lab_wait_for -t 3 grep -q hello-udp "$LAB_DIR/logs/udp5001.log"

    # NAT mapping behaviour: the default NAT keeps the source port (endpoint
    # independent mapping); --symmetric picks a random port per destination
    local carol_pub
    carol_pub=$(lab_public_ip carol)
    lab_spawn srv udp5003.log nc -n -v -u -l 5003
    lab_spawn srv udp5004.log nc -n -v -u -l 5004
    lab_spawn srv udp5005.log nc -n -v -u -l 5005
    lab_wait_for lab_exec srv sh -c 'ss -lun | grep -q ":5005 "'
    lab_exec alice sh -c "echo a | nc -u -p 40000 -w1 $srv 5003" >/dev/null 2>&1 || true
    lab_exec carol sh -c "echo c | nc -u -p 40000 -w1 $srv 5004" >/dev/null 2>&1 || true
    lab_exec carol sh -c "echo c | nc -u -p 40000 -w1 $srv 5005" >/dev/null 2>&1 || true
    check "default NAT preserves the source port" \
        lab_wait_for -t 3 grep -q "Connection received on $alice_pub 40000$" "$LAB_DIR/logs/udp5003.log"
    local p4 p5
    lab_wait_for -t 3 grep -q "Connection received on $carol_pub " "$LAB_DIR/logs/udp5005.log" || true
    p4=$(awk '/Connection received/{print $5}' "$LAB_DIR/logs/udp5004.log")
    p5=$(awk '/Connection received/{print $5}' "$LAB_DIR/logs/udp5005.log")
    echo "INFO symmetric NAT mapped carol:40000 to $carol_pub:$p4 and $carol_pub:$p5"
    check "--symmetric NAT maps one source port to different public ports per destination" \
        test -n "$p4" -a -n "$p5" -a "$p4" != "$p5"

    # a listener on bob that must stay unreachable unsolicited
    lab_spawn bob tcp6000.log nc -l -k 6000
    lab_wait_for lab_exec bob sh -c 'ss -ltn | grep -q ":6000 "'
    check "control: bob's listener answers locally" lab_exec bob nc -z -w2 "$bob" 6000

    check_not "wan -> bob's router public address (tcp 6000) is refused" lab_exec srv nc -z -w2 "$bob_pub" 6000
    check_not "wan -> bob's router (ping) is dropped" lab_exec srv ping -c1 -W1 "$bob_pub"
    # even a wan host that routes straight at the router cannot get in
    lab_exec srv ip route add 192.168.0.0/16 via "$bob_pub"
    check_not "wan -> bob's LAN address via his router (tcp) is dropped" lab_exec srv nc -z -w2 "$bob" 6000
    check_not "wan -> bob's LAN address via his router (ping) is dropped" lab_exec srv ping -c1 -W1 "$bob"
    lab_exec srv ip route del 192.168.0.0/16 via "$bob_pub"

    check_not "natted alice -> bob's public address (tcp, unsolicited) fails" lab_exec alice nc -z -w2 "$bob_pub" 6000
    check_not "natted alice -> bob's LAN address (tcp) fails" lab_exec alice nc -z -w2 "$bob" 6000
    check_not "natted alice -> bob's LAN address (ping) fails" lab_exec alice ping -c1 -W1 "$bob"
    check "control: bob -> wan host (tcp) still works" lab_exec bob nc -z -w2 "$srv" 5000

    # process handling
    lab_spawn alice sleep.log sleep 1000
    local pid="$LAB_LAST_PID"
    check "lab_spawn records the PID" bash -c "grep -q '^$pid alice ' '$LAB_DIR/pids'"
    check "spawned process lives in alice's namespace" bash -c "[[ \$(ip netns identify $pid) == $(lab_ns alice) ]]"
    lab_kill "$pid"
    check_not "lab_kill PID stops it" test -e "/proc/$pid"
    check "lab_last_pid works from a subshell" bash -c "[[ '$(lab_spawn srv s2.log sleep 1000; lab_last_pid)' =~ ^[0-9]+$ ]]"
    check_not "lab_kill refuses a PID that is not ours" lab_kill 1
    check_not "lab_wait_for times out" lab_wait_for -t 1 false
    check "lab_wait_for succeeds" lab_wait_for -t 2 true

    # leave processes running (one with a grandchild) for the cleanup check
    lab_spawn srv left.log sleep 1000
    echo "LABPID $LAB_LAST_PID"
    lab_spawn bob left2.log bash -c 'sleep 1000 & wait'
    lab_wait_for -t 3 bash -c "[[ \$(ip netns pids $(lab_ns bob) | wc -l) -ge 3 ]]" || true
    for pid in $(ip netns pids "$(lab_ns bob)"); do echo "LABPID $pid"; done
}

if [[ "${1:-}" == "--inner" ]]; then
    inner
    exit 0
fi

[[ $EUID -eq 0 ]] || { echo "selftest: must run as root"; echo "0 passed, 1 failed"; exit 1; }
missing=""
for tool in ip nft ping nc ss python3; do
    command -v "$tool" >/dev/null || missing="$missing $tool"
done
if [[ -n "$missing" ]]; then
    echo "selftest: missing tools:$missing (apt-get install -y iproute2 nftables iputils-ping netcat-openbsd python3)"
    echo "0 passed, 1 failed"
    exit 1
fi

out=$(mktemp)
trap 'rm -f "$out"' EXIT
set +e
bash "$here/selftest.sh" --inner 2>&1 | tee "$out"
rc=${PIPESTATUS[0]}
set -e

passed=$(grep -c '^PASS: ' "$out" || true)
failed=$(grep -c '^FAIL: ' "$out" || true)
if [[ "$rc" == 0 ]]; then pass "scenario ran to the end"; passed=$((passed + 1)); else fail "scenario exited with $rc"; failed=$((failed + 1)); fi

prefix=$(awk '/^LABINFO /{print $2}' "$out")
dir=$(awk '/^LABINFO /{print $3}' "$out")
if [[ -n "$prefix" ]] && ! ip netns ls | grep -q "^${prefix}-"; then
    pass "cleanup deleted every namespace"; passed=$((passed + 1))
else
    fail "cleanup left namespaces: $(ip netns ls | grep "^${prefix:-none}-" | tr '\n' ' ')"; failed=$((failed + 1))
fi
if [[ -n "$dir" && ! -e "$dir" ]]; then
    pass "cleanup removed the temp dir"; passed=$((passed + 1))
else
    fail "cleanup left $dir"; failed=$((failed + 1))
fi
left=0
for pid in $(awk '/^LABPID /{print $2}' "$out"); do
    [[ -e "/proc/$pid" ]] && [[ "$(tr -d '\0' <"/proc/$pid/cmdline" 2>/dev/null)" == sleep1000 ]] && left=1
done
if [[ "$left" == 0 ]]; then
    pass "cleanup stopped spawned processes"; passed=$((passed + 1))
else
    fail "cleanup left spawned processes running"; failed=$((failed + 1))
fi

echo "$passed passed, $failed failed"
[[ "$failed" == 0 ]]
