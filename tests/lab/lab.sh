# shellcheck shell=bash
# Ward network lab: a small library of bash functions that build a throw-away
# "internet" out of Linux network namespaces, with hosts directly on the WAN and
# hosts behind home-style NAT routers, and that start Ward components in them.
#
# Source it (bash >= 4, root, iproute2 and nftables required):
#
#     source tests/lab/lab.sh
#     lab_init                       # unique prefix, wan namespace, cleanup trap
#     lab_add_wan_host relay         # 10.99.0.11, reachable by everyone
#     lab_add_natted_host alice      # 192.168.2.2 behind NAT router 10.99.0.12
#     lab_exec alice ping -c1 "$(lab_ip relay)"
#
# Topology
#   * The "wan" namespace holds a bridge br0 with 10.99.0.1/24. It is the
#     internet: every WAN host and every NAT router's outer leg is a port of
#     br0, on 10.99.0.0/24. The wan namespace itself is also a host, named
#     "wan" (lab_ip wan = 10.99.0.1); lab_start_coordinator puts the
#     coordinator there unless told otherwise. The wan namespace does not
#     forward packets.
#   * Host number N (1, 2, ... in creation order) gets 10.99.0.(10+N) on the
#     wan. A natted host NAME is two namespaces: the router "NAME-nat"
#     (eth0 = 10.99.0.(10+N) on the wan, lan0 = 192.168.N.1/24) and the host
#     "NAME" (eth0 = 192.168.N.2/24, default route via 192.168.N.1).
#   * The router masquerades 192.168.N.0/24 behind its wan address (Linux
#     keeps the source port when it can, so the mapping is endpoint
#     independent; with --symmetric it uses "fully-random" ports, i.e. a
#     symmetric NAT). Its forward and input chains drop everything from the
#     wan except conntrack replies (established,related): unsolicited traffic
#     from the wan or from another natted host never reaches the host.
#   * Everything uses private addresses inside namespaces this library
#     created; no interface is created in the root namespace.
#
# Underlay families: `lab_init` alone builds the IPv4 lab above. `lab_init
# --ipv6-only` builds the same wan with IPv6 only: br0 has fd00:99::1/64 and
# wan host N gets fd00:99::(10+N)/64 (the digits of 10+N, e.g. fd00:99::11);
# no underlay interface has an IPv4 address, and natted hosts are refused (the
# lab has no IPv6 NAT). `lab_init --dual-stack` gives the wan namespace and
# every wan host both addresses (natted hosts and routers stay IPv4-only);
# lab_ip and lab_public_ip keep printing IPv4 there, lab_ip6 prints the IPv6.
# IPv6 addresses are added with nodad, so they are usable at once.
#
# Cleanup: lab_init installs `trap lab_cleanup EXIT` (and makes INT/TERM exit).
# If your script sets its own EXIT trap, call lab_cleanup from it. lab_cleanup
# stops every process started by lab_spawn (by PID, after checking that the PID
# still lives in one of our namespaces), then any process left inside our
# namespaces, deletes the namespaces, and removes the lab's temp dir (kept, and
# its path printed, when the script exits non-zero, unless LAB_KEEP_LOGS=0).
# LAB_KEEP=1 skips the cleanup entirely (for poking around; clean up by hand).
#
# State lives in files under $LAB_DIR, so the functions also work from
# subshells and command substitutions.

if [[ -n "${_WARD_LAB_SOURCED:-}" ]]; then return 0; fi
_WARD_LAB_SOURCED=1

LAB_WAN_SUBNET_PREFIX="10.99.0"
LAB_WAN6_PREFIX="fd00:99:"
LAB_WAIT_TIMEOUT="${LAB_WAIT_TIMEOUT:-20}"

_lab_self="${BASH_SOURCE[0]}"

_lab_die() { echo "lab: $*" >&2; return 1; }
_lab_log() { [[ -n "${LAB_VERBOSE:-}" ]] && echo "lab: $*" >&2; return 0; }

_lab_need_init() {
    [[ -n "${LAB_DIR:-}" && -d "${LAB_DIR}" ]] || _lab_die "call lab_init first"
}

# lab_repo_root: print the repository root (two levels above this file).
lab_repo_root() {
    (cd "$(dirname "$_lab_self")/../.." && pwd)
}

# ---------------------------------------------------------------- host registry
# Each host has a file $LAB_DIR/hosts/NAME with KEY=VALUE lines.
_lab_set() { # NAME KEY VALUE
    local f="$LAB_DIR/hosts/$1"
    if [[ -f "$f" ]]; then
        grep -v "^$2=" "$f" >"$f.tmp" || true
        mv "$f.tmp" "$f"
    fi
    echo "$2=$3" >>"$f"
}
_lab_get() { # NAME KEY
    local f="$LAB_DIR/hosts/$1"
    [[ -f "$f" ]] || _lab_die "no such host: $1" || return 1
    local line
    line=$(grep "^$2=" "$f" | tail -n1) || true
    printf '%s\n' "${line#*=}"
}
_lab_next_index() {
    local f="$LAB_DIR/next_index" n
    n=$(cat "$f")
    echo $((n + 1)) >"$f"
    echo "$n"
}
_lab_valid_name() {
    [[ "$1" =~ ^[a-zA-Z0-9][a-zA-Z0-9_-]{0,30}$ ]] || _lab_die "bad host name '$1' (letters, digits, - and _, at most 31)"
    [[ ! -e "$LAB_DIR/hosts/$1" ]] || _lab_die "host '$1' exists already"
}

_lab_new_ns() { # NSNAME: create, remember, bring lo up
    ip netns add "$1"
    echo "$1" >>"$LAB_DIR/namespaces"
    ip -n "$1" link set lo up
}

# ------------------------------------------------------------------- lab_init
# lab_init [--ipv6-only | --dual-stack]: create the lab (temp dir, unique
# prefix, wan namespace with br0 at 10.99.0.1/24 and/or fd00:99::1/64, host
# "wan") and register the cleanup trap. Prints nothing. Sets LAB_ID,
# LAB_PREFIX (namespace name prefix) and LAB_DIR.
lab_init() {
    local underlay=ipv4
    case "${1:-}" in
        "") ;;
        --ipv6-only) underlay=ipv6 ;;
        --dual-stack) underlay=dual ;;
        *) _lab_die "usage: lab_init [--ipv6-only | --dual-stack]" || return 1 ;;
    esac
    [[ $EUID -eq 0 ]] || _lab_die "must run as root" || return 1
    [[ -z "${LAB_DIR:-}" ]] || _lab_die "lab_init called twice" || return 1
    command -v ip >/dev/null || _lab_die "iproute2 (ip) is not installed" || return 1
    command -v nft >/dev/null || _lab_die "nftables (nft) is not installed: apt-get install -y nftables" || return 1
    LAB_ID="$(printf '%d%03d' "$$" "$((RANDOM % 1000))")"
    LAB_PREFIX="ward${LAB_ID}"
    LAB_DIR="$(mktemp -d "${TMPDIR:-/tmp}/ward-lab.${LAB_ID}.XXXX")"
    export LAB_ID LAB_PREFIX LAB_DIR
    mkdir -p "$LAB_DIR/hosts" "$LAB_DIR/logs"
    : >"$LAB_DIR/namespaces"
    : >"$LAB_DIR/pids"
    echo 1 >"$LAB_DIR/next_index"
    trap 'lab_cleanup' EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM

    local ns="${LAB_PREFIX}-wan"
    _lab_new_ns "$ns"
    echo "$underlay" >"$LAB_DIR/underlay"
    ip -n "$ns" link add br0 type bridge forward_delay 0 stp_state 0
    [[ "$underlay" == ipv6 ]] || ip -n "$ns" addr add "${LAB_WAN_SUBNET_PREFIX}.1/24" dev br0
    [[ "$underlay" == ipv4 ]] || ip -n "$ns" addr add "${LAB_WAN6_PREFIX}:1/64" dev br0 nodad
    ip -n "$ns" link set br0 up
    ip netns exec "$ns" sysctl -qw net.ipv4.ip_forward=0
    : >"$LAB_DIR/hosts/wan"
    _lab_set wan ns "$ns"
    _lab_set wan kind wan
    if [[ "$underlay" == ipv6 ]]; then
        _lab_set wan ip "${LAB_WAN6_PREFIX}:1"
        _lab_set wan public_ip "${LAB_WAN6_PREFIX}:1"
    else
        _lab_set wan ip "${LAB_WAN_SUBNET_PREFIX}.1"
        _lab_set wan public_ip "${LAB_WAN_SUBNET_PREFIX}.1"
    fi
    [[ "$underlay" == ipv4 ]] || _lab_set wan ip6 "${LAB_WAN6_PREFIX}:1"
    _lab_log "initialised $LAB_PREFIX in $LAB_DIR"
}

# _lab_wan_port NS IFNAME INDEX: veth from namespace NS (named IFNAME there)
# to a port of br0 in the wan namespace.
_lab_wan_port() {
    local ns="$1" ifname="$2" idx="$3" wan
    wan=$(_lab_get wan ns)
    ip link add name "$ifname" netns "$ns" type veth peer name "p$idx" netns "$wan"
    ip -n "$wan" link set "p$idx" master br0
    ip -n "$wan" link set "p$idx" up
    ip -n "$ns" link set "$ifname" up
}

# lab_add_wan_host NAME: a namespace on the wan with address 10.99.0.(10+N)/24
# (and/or fd00:99::(10+N)/64, see lab_init). Prints nothing; lab_ip NAME gives
# the address.
lab_add_wan_host() {
    _lab_need_init || return 1
    local name="${1:?usage: lab_add_wan_host NAME}"
    _lab_valid_name "$name" || return 1
    local idx ns ip
    idx=$(_lab_next_index)
    ((idx <= 240)) || _lab_die "too many hosts" || return 1
    ns="${LAB_PREFIX}-${name}"
    ip="${LAB_WAN_SUBNET_PREFIX}.$((10 + idx))"
    local ip6="${LAB_WAN6_PREFIX}:$((10 + idx))" underlay
    underlay=$(_lab_underlay)
    _lab_new_ns "$ns"
    _lab_wan_port "$ns" eth0 "$idx"
    if [[ "$underlay" != ipv6 ]]; then
        ip -n "$ns" addr add "$ip/24" dev eth0
        ip -n "$ns" route add default via "${LAB_WAN_SUBNET_PREFIX}.1"
    fi
    if [[ "$underlay" != ipv4 ]]; then
        ip -n "$ns" addr add "$ip6/64" dev eth0 nodad
        ip -n "$ns" -6 route add default via "${LAB_WAN6_PREFIX}:1"
    fi
    [[ "$underlay" != ipv6 ]] || ip="$ip6"
    : >"$LAB_DIR/hosts/$name"
    [[ "$underlay" == ipv4 ]] || _lab_set "$name" ip6 "$ip6"
    _lab_set "$name" ns "$ns"
    _lab_set "$name" kind wan
    _lab_set "$name" index "$idx"
    _lab_set "$name" ip "$ip"
    _lab_set "$name" public_ip "$ip"
    _lab_log "wan host $name = $ip ($ns)"
}

# lab_add_natted_host NAME [--symmetric]: a NAT router namespace "NAME-nat"
# (wan 10.99.0.(10+N), lan 192.168.N.1/24) and a host namespace "NAME"
# (192.168.N.2/24, default via the router). Prints nothing.
lab_add_natted_host() {
    _lab_need_init || return 1
    local name="${1:?usage: lab_add_natted_host NAME [--symmetric]}"
    local symmetric=""
    [[ "${2:-}" == "--symmetric" ]] && symmetric=1
    _lab_valid_name "$name" || return 1
    _lab_valid_name "$name-nat" || return 1
    [[ "$(_lab_underlay)" != ipv6 ]] || _lab_die "lab_add_natted_host: an --ipv6-only lab has no NAT routers" || return 1
    local idx rns hns wan_ip lan_net
    idx=$(_lab_next_index)
    ((idx <= 240)) || _lab_die "too many hosts" || return 1
    rns="${LAB_PREFIX}-${name}-nat"
    hns="${LAB_PREFIX}-${name}"
    wan_ip="${LAB_WAN_SUBNET_PREFIX}.$((10 + idx))"
    lan_net="192.168.${idx}"

    # router
    _lab_new_ns "$rns"
    _lab_wan_port "$rns" eth0 "$idx"
    ip -n "$rns" addr add "$wan_ip/24" dev eth0
    ip -n "$rns" route add default via "${LAB_WAN_SUBNET_PREFIX}.1"
    # host, and the LAN between them
    _lab_new_ns "$hns"
    ip link add name lan0 netns "$rns" type veth peer name eth0 netns "$hns"
    ip -n "$rns" addr add "${lan_net}.1/24" dev lan0
    ip -n "$rns" link set lan0 up
    ip -n "$hns" addr add "${lan_net}.2/24" dev eth0
    ip -n "$hns" link set eth0 up
    ip -n "$hns" route add default via "${lan_net}.1"

    ip netns exec "$rns" sysctl -qw net.ipv4.ip_forward=1
    local masq="masquerade"
    [[ -n "$symmetric" ]] && masq="masquerade fully-random"
    ip netns exec "$rns" nft -f - <<EOF
table ip wardlab {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr ${lan_net}.0/24 oifname "eth0" ${masq}
    }
    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "lan0" oifname "eth0" accept
    }
    chain input {
        type filter hook input priority filter; policy drop;
        iifname "lo" accept
        ct state established,related accept
        iifname "lan0" accept
    }
}
EOF
    : >"$LAB_DIR/hosts/$name-nat"
    _lab_set "$name-nat" ns "$rns"
    _lab_set "$name-nat" kind router
    _lab_set "$name-nat" index "$idx"
    _lab_set "$name-nat" ip "$wan_ip"
    _lab_set "$name-nat" public_ip "$wan_ip"
    _lab_set "$name-nat" lan_ip "${lan_net}.1"
    : >"$LAB_DIR/hosts/$name"
    _lab_set "$name" ns "$hns"
    _lab_set "$name" kind natted
    _lab_set "$name" index "$idx"
    _lab_set "$name" ip "${lan_net}.2"
    _lab_set "$name" public_ip "$wan_ip"
    _lab_set "$name" router "$name-nat"
    _lab_log "natted host $name = ${lan_net}.2 behind $wan_ip ($hns, $rns)"
}

# lab_set_link_mtu NAME MTU: set the MTU of NAME's upstream link, both ends:
# for a wan host or a router, its eth0 and its port on br0; for a natted host,
# its eth0 and the router's lan0. Prints nothing.
lab_set_link_mtu() {
    _lab_need_init || return 1
    local name="${1:?usage: lab_set_link_mtu NAME MTU}" mtu="${2:?usage: lab_set_link_mtu NAME MTU}"
    local kind ns
    kind=$(_lab_get "$name" kind) || return 1
    ns=$(_lab_get "$name" ns)
    case "$kind" in
        wan | router)
            [[ "$name" != wan ]] || _lab_die "lab_set_link_mtu: the wan bridge has no upstream (lab_set_all_mtu)" || return 1
            ip -n "$ns" link set eth0 mtu "$mtu"
            ip -n "$(_lab_get wan ns)" link set "p$(_lab_get "$name" index)" mtu "$mtu"
            ;;
        natted)
            ip -n "$ns" link set eth0 mtu "$mtu"
            ip -n "$(_lab_get "$(_lab_get "$name" router)" ns)" link set lan0 mtu "$mtu"
            ;;
        *) _lab_die "lab_set_link_mtu: unknown host kind '$kind'" || return 1 ;;
    esac
}

# lab_set_all_mtu MTU: set the MTU of every link in the lab (br0, every wan
# and LAN link, both ends), and forget the path MTUs every namespace learned
# (route exceptions), so the next packets see the new links. Prints nothing.
lab_set_all_mtu() {
    _lab_need_init || return 1
    local mtu="${1:?usage: lab_set_all_mtu MTU}" h kind
    ip -n "$(_lab_get wan ns)" link set br0 mtu "$mtu"
    for h in $(lab_hosts); do
        kind=$(_lab_get "$h" kind)
        [[ "$kind" == wan && "$h" == wan ]] && continue
        lab_set_link_mtu "$h" "$mtu" || return 1
    done
    lab_flush_pmtu
}

# lab_flush_pmtu: forget every learned path MTU (IPv4 and IPv6 route
# exceptions) in every namespace of the lab. Prints nothing.
lab_flush_pmtu() {
    _lab_need_init || return 1
    local ns
    while read -r ns; do
        [[ -n "$ns" ]] || continue
        ip -n "$ns" route flush cache 2>/dev/null || true
        ip -n "$ns" -6 route flush cache 2>/dev/null || true
    done <"$LAB_DIR/namespaces"
}

# lab_ns NAME: print the real namespace name of host NAME.
lab_ns() { _lab_need_init || return 1; _lab_get "${1:?usage: lab_ns NAME}" ns; }

# lab_ip NAME: print the host's own underlay address (for a natted host, its
# LAN address 192.168.N.2; for wan hosts and routers, the wan address).
lab_ip() { _lab_need_init || return 1; _lab_get "${1:?usage: lab_ip NAME}" ip; }

# lab_public_ip NAME: print the address the wan sees for NAME (the router's
# wan address for a natted host).
lab_public_ip() { _lab_need_init || return 1; _lab_get "${1:?usage: lab_public_ip NAME}" public_ip; }

# lab_ip6 NAME: print the host's IPv6 underlay address (empty in an IPv4 lab
# and for natted hosts and routers).
lab_ip6() { _lab_need_init || return 1; _lab_get "${1:?usage: lab_ip6 NAME}" ip6; }

# lab_underlay: print the lab's underlay: ipv4, ipv6 (--ipv6-only) or dual.
lab_underlay() { _lab_need_init || return 1; _lab_underlay; }
_lab_underlay() { cat "$LAB_DIR/underlay" 2>/dev/null || echo ipv4; }

# lab_hostport IP PORT: print IP:PORT, with an IPv6 address in brackets.
lab_hostport() {
    local ip="${1:?usage: lab_hostport IP PORT}" port="${2:?usage: lab_hostport IP PORT}"
    if [[ "$ip" == *:* ]]; then echo "[$ip]:$port"; else echo "$ip:$port"; fi
}

# lab_hosts: print the names of all hosts, one a line.
lab_hosts() { _lab_need_init || return 1; ls "$LAB_DIR/hosts"; }

# lab_exec NAME CMD...: run CMD inside host NAME's namespace (foreground).
lab_exec() {
    local ns
    ns=$(lab_ns "${1:?usage: lab_exec NAME CMD...}") || return 1
    shift
    ip netns exec "$ns" "$@"
}

# lab_spawn NAME LOGFILE CMD...: start CMD in the background inside host NAME,
# stdout+stderr appended to LOGFILE (relative paths are under $LAB_DIR/logs).
# Records the PID for lab_kill/lab_cleanup and sets LAB_LAST_PID; prints
# nothing. (From a command substitution, read the PID with lab_last_pid.)
lab_spawn() {
    local name="${1:?usage: lab_spawn NAME LOGFILE CMD...}" log="${2:?usage: lab_spawn NAME LOGFILE CMD...}"
    shift 2
    (($# > 0)) || _lab_die "lab_spawn: no command" || return 1
    local ns
    ns=$(lab_ns "$name") || return 1
    [[ "$log" == /* ]] || log="$LAB_DIR/logs/$log"
    mkdir -p "$(dirname "$log")"
    # `ip netns exec` execs CMD in place, so $! is CMD's PID.
    ip netns exec "$ns" "$@" </dev/null >>"$log" 2>&1 &
    LAB_LAST_PID=$!
    echo "$LAB_LAST_PID $name $ns" >>"$LAB_DIR/pids"
    echo "$LAB_LAST_PID" >"$LAB_DIR/last_pid"
    _lab_log "spawned $LAB_LAST_PID in $name: $*"
}

# lab_last_pid: print the PID of the most recent lab_spawn (any subshell).
lab_last_pid() { _lab_need_init || return 1; cat "$LAB_DIR/last_pid"; }

# lab_pids [NAME]: print the live PIDs started by lab_spawn (in host NAME).
lab_pids() {
    _lab_need_init || return 1
    local pid host ns
    while read -r pid host ns; do
        [[ -z "${1:-}" || "$host" == "$1" ]] || continue
        _lab_alive "$pid" "$ns" && echo "$pid"
    done <"$LAB_DIR/pids"
    return 0
}

# _lab_alive PID NS: PID runs (not a zombie) and is in namespace NS.
_lab_alive() {
    local pid="$1" ns="$2" state
    [[ -r "/proc/$pid/stat" ]] || return 1
    state=$(sed -E 's/.*\) ([A-Z]).*/\1/' "/proc/$pid/stat" 2>/dev/null) || return 1
    [[ "$state" != "Z" && "$state" != "X" ]] || return 1
    [[ -z "$ns" ]] && return 0
    # guards against PID reuse: the process must still be inside our namespace
    [[ "$(ip netns identify "$pid" 2>/dev/null)" == "$ns" ]]
}

# _lab_stop "PID NS"...: SIGTERM, wait up to 5 s, then SIGKILL; reap.
_lab_stop() {
    local entry pid ns alive=() i
    for entry in "$@"; do
        pid=${entry%% *}
        ns=${entry#* }
        if _lab_alive "$pid" "$ns"; then
            kill -TERM "$pid" 2>/dev/null || true
            alive+=("$entry")
        fi
    done
    for ((i = 0; i < 50 && ${#alive[@]} > 0; i++)); do
        local still=()
        for entry in "${alive[@]}"; do
            _lab_alive "${entry%% *}" "${entry#* }" && still+=("$entry")
        done
        alive=("${still[@]+"${still[@]}"}")
        ((${#alive[@]} == 0)) || sleep 0.1
    done
    for entry in "${alive[@]+"${alive[@]}"}"; do
        kill -KILL "${entry%% *}" 2>/dev/null || true
    done
    for entry in "$@"; do
        wait "${entry%% *}" 2>/dev/null || true
    done
}

# lab_kill NAME_OR_PID: stop one of our processes (a PID from lab_spawn) or
# all of those spawned in host NAME. SIGTERM, then SIGKILL after 5 s.
lab_kill() {
    _lab_need_init || return 1
    local target="${1:?usage: lab_kill NAME_OR_PID}" pid host ns entries=() found=""
    while read -r pid host ns; do
        if [[ "$pid" == "$target" || "$host" == "$target" ]]; then
            entries+=("$pid $ns")
            found=1
        fi
    done <"$LAB_DIR/pids"
    [[ -n "$found" ]] || _lab_die "lab_kill: $target is not a PID or host of ours" || return 1
    _lab_stop "${entries[@]}"
    return 0
}

# lab_wait_for [-t SECONDS] [-i INTERVAL] CMD...: run CMD (quietly) until it
# succeeds; return 1 with a message on stderr after SECONDS (default
# $LAB_WAIT_TIMEOUT = 20).
lab_wait_for() {
    local timeout="$LAB_WAIT_TIMEOUT" interval=0.2
    while (($# > 0)); do
        case "$1" in
            -t) timeout="$2"; shift 2 ;;
            -i) interval="$2"; shift 2 ;;
            --) shift; break ;;
            *) break ;;
        esac
    done
    (($# > 0)) || _lab_die "lab_wait_for: no command" || return 1
    local deadline=$((SECONDS + ${timeout%.*}))
    while true; do
        if "$@" >/dev/null 2>&1; then return 0; fi
        if ((SECONDS >= deadline)); then
            echo "lab: timed out after ${timeout}s waiting for: $*" >&2
            return 1
        fi
        sleep "$interval"
    done
}

# lab_dump_logs [LINES]: print the tail of every log under $LAB_DIR/logs.
lab_dump_logs() {
    _lab_need_init || return 1
    local f
    for f in "$LAB_DIR"/logs/*; do
        [[ -f "$f" ]] || continue
        echo "----- $f"
        tail -n "${1:-40}" "$f"
    done
}

# lab_cleanup: stop our processes, delete our namespaces, remove $LAB_DIR.
# Installed as the EXIT trap by lab_init; safe to call more than once.
lab_cleanup() {
    local rc=$?
    [[ -n "${LAB_DIR:-}" && -d "${LAB_DIR}" ]] || return 0
    if [[ "${LAB_KEEP:-0}" == 1 ]]; then
        echo "lab: LAB_KEEP=1, leaving namespaces ${LAB_PREFIX}-* and $LAB_DIR" >&2
        return 0
    fi
    local had_e=0
    [[ $- == *e* ]] && had_e=1
    set +e
    local pid host ns entries=()
    while read -r pid host ns; do
        entries+=("$pid $ns")
    done <"$LAB_DIR/pids"
    ((${#entries[@]} == 0)) || _lab_stop "${entries[@]}"
    # anything else still running inside our namespaces (children of our
    # processes) is ours too
    local leftovers=()
    while read -r ns; do
        [[ -n "$ns" ]] || continue
        for pid in $(ip netns pids "$ns" 2>/dev/null); do
            leftovers+=("$pid $ns")
        done
    done <"$LAB_DIR/namespaces"
    ((${#leftovers[@]} == 0)) || _lab_stop "${leftovers[@]}"
    while read -r ns; do
        [[ -n "$ns" ]] || continue
        ip netns del "$ns" 2>/dev/null
    done <"$LAB_DIR/namespaces"
    if [[ "$rc" != 0 && "${LAB_KEEP_LOGS:-1}" == 1 ]]; then
        echo "lab: exit status $rc; logs kept in $LAB_DIR/logs" >&2
    else
        rm -rf "$LAB_DIR"
    fi
    LAB_DIR=""
    ((had_e == 0)) || set -e
    return 0
}

# =================================================================== Ward glue
# Binaries: ${WARD_BIN_DIR:-target/release}/{ward,ward-coordinator}; a
# relative WARD_BIN_DIR is relative to the repository root.

# lab_ward_bin NAME: print the path of binary NAME (ward, ward-coordinator).
lab_ward_bin() {
    local dir="${WARD_BIN_DIR:-target/release}"
    [[ "$dir" == /* ]] || dir="$(lab_repo_root)/$dir"
    echo "$dir/${1:?usage: lab_ward_bin NAME}"
}

# lab_have_ward: succeed if both ward and ward-coordinator binaries exist.
lab_have_ward() {
    [[ -x "$(lab_ward_bin ward)" && -x "$(lab_ward_bin ward-coordinator)" ]]
}

# lab_start_coordinator [HOST=wan] [PORT=7443]: (extra `serve` flags in
# $LAB_COORD_SERVE_ARGS) init a coordinator data dir
# ($LAB_DIR/coordinator) with --public-addr $(lab_public_ip HOST):PORT (an
# IPv6 address in brackets; $LAB_COORD_PUBLIC_ADDR replaces it whole) and
# start `serve` in HOST. Waits until the admin CLI answers. Prints nothing.
lab_start_coordinator() {
    _lab_need_init || return 1
    local host="${1:-wan}" port="${2:-7443}" bin dir addr
    bin=$(lab_ward_bin ward-coordinator)
    [[ -x "$bin" ]] || _lab_die "$bin not built" || return 1
    dir="$LAB_DIR/coordinator"
    addr="${LAB_COORD_PUBLIC_ADDR:-$(lab_hostport "$(lab_public_ip "$host")" "$port")}"
    lab_exec "$host" "$bin" init --data-dir "$dir" --public-addr "$addr" \
        >>"$LAB_DIR/logs/coordinator-init.log" 2>&1 ||
        { tail -n 20 "$LAB_DIR/logs/coordinator-init.log" >&2; _lab_die "coordinator init failed"; return 1; }
    # shellcheck disable=SC2086 # LAB_COORD_SERVE_ARGS is a list of extra flags
    lab_spawn "$host" coordinator.log "$bin" serve --data-dir "$dir" ${LAB_COORD_SERVE_ARGS:-}
    echo "$host" >"$LAB_DIR/coord_host"
    echo "$addr" >"$LAB_DIR/coord_addr"
    lab_wait_for lab_coord device ls --json ||
        { tail -n 20 "$LAB_DIR/logs/coordinator.log" >&2; _lab_die "coordinator did not come up"; return 1; }
}

# lab_coord ARGS...: run `ward-coordinator --data-dir DIR ARGS...` (the admin
# CLI) in the coordinator's namespace; its output is the command's.
lab_coord() {
    _lab_need_init || return 1
    [[ -f "$LAB_DIR/coord_host" ]] || _lab_die "no coordinator (lab_start_coordinator)" || return 1
    lab_exec "$(cat "$LAB_DIR/coord_host")" "$(lab_ward_bin ward-coordinator)" \
        --data-dir "$LAB_DIR/coordinator" "$@"
}

# lab_coord_addr: print the coordinator's public HOST:PORT.
lab_coord_addr() { _lab_need_init || return 1; cat "$LAB_DIR/coord_addr"; }

# lab_ward_socket HOST: print the agent socket path of HOST's daemon.
lab_ward_socket() { _lab_need_init || return 1; echo "$LAB_DIR/dev-${1:?usage: lab_ward_socket HOST}/ward.sock"; }

# lab_start_device HOST [PORT=51820] [TUN=ward0]: start `ward daemon` in HOST
# (prefixed by $LAB_WARD_WRAPPER if set, e.g. LAB_WARD_WRAPPER="faketime -f +10m";
# extra daemon flags from $LAB_WARD_ARGS, e.g. LAB_WARD_ARGS="--posture-checks-dir DIR")
# (state dir $LAB_DIR/dev-HOST, socket $LAB_DIR/dev-HOST/ward.sock) and wait
# for its socket. Prints nothing.
lab_start_device() {
    _lab_need_init || return 1
    local host="${1:?usage: lab_start_device HOST [PORT] [TUN]}" port="${2:-51820}" tun="${3:-ward0}"
    local bin state sock
    bin=$(lab_ward_bin ward)
    [[ -x "$bin" ]] || _lab_die "$bin not built" || return 1
    state="$LAB_DIR/dev-$host"
    sock="$state/ward.sock"
    mkdir -p "$state/state"
    chmod 700 "$state" "$state/state"
    # shellcheck disable=SC2086 # LAB_WARD_WRAPPER is a command prefix, e.g. "faketime +10m"
    # DNS is off unless the script says where the device's resolv.conf is (LAB_WARD_DNS_ARGS,
    # e.g. "--dns resolv.conf --resolv-conf FILE"): a daemon must never manage the host's own
    # /etc/resolv.conf, which is what a namespace without /etc/netns/NS/resolv.conf sees.
    # shellcheck disable=SC2086
    lab_spawn "$host" "ward-$host.log" ${LAB_WARD_WRAPPER:-} "$bin" daemon --state-dir "$state/state" \
        --socket "$sock" --tun "$tun" --port "$port" ${LAB_WARD_DNS_ARGS:---dns off} ${LAB_WARD_ARGS:-}
    lab_wait_for test -S "$sock" ||
        { tail -n 20 "$LAB_DIR/logs/ward-$host.log" >&2; _lab_die "ward daemon in $host did not come up"; return 1; }
}

# lab_ward HOST ARGS...: run `ward --socket SOCK ARGS...` in HOST.
lab_ward() {
    local host="${1:?usage: lab_ward HOST ARGS...}"
    shift
    lab_exec "$host" "$(lab_ward_bin ward)" --socket "$(lab_ward_socket "$host")" "$@"
}

# lab_token ARGS...: print a new enrollment token (`token create ARGS...`),
# e.g. lab_token --user alice ; lab_token --tag server ; lab_token --tag server --hostname web1
# (binds the name: a policy's `device:web1` matches only a name bound this way or by
# `device approve`/`device rename`; a name the device picks itself matches nothing).
lab_token() { lab_coord token create "$@"; }

# lab_device_up HOST TOKEN [HOSTNAME=HOST]: `ward up` in HOST, the token given on stdin
# (`--token -`), so it never appears in a command line.
lab_device_up() {
    local host="${1:?usage: lab_device_up HOST TOKEN [HOSTNAME]}" token="${2:?usage: lab_device_up HOST TOKEN [HOSTNAME]}"
    printf '%s\n' "$token" | lab_ward "$host" up --token - --hostname "${3:-$host}"
}

# lab_enroll HOST (--user NAME | --tag TAG): make a token and bring HOST up.
# For --user, the user is added first if missing.
lab_enroll() {
    local host="${1:?usage: lab_enroll HOST --user NAME | --tag TAG}" token
    shift
    if [[ "${1:-}" == "--user" ]]; then
        lab_coord user add "$2" >/dev/null 2>&1 || true
    fi
    token=$(lab_token "$@") || return 1
    lab_device_up "$host" "$token"
}

# lab_ward_json_get HOST PYEXPR: evaluate PYEXPR on `ward status --json`
# (bound to `s`) and print the result, e.g. lab_ward_json_get a 's["ipv4"]'.
lab_ward_json_get() {
    local host="${1:?}" expr="${2:?}" json
    json=$(lab_ward "$host" status --json) || return 1
    printf '%s' "$json" | python3 -c '
import json, sys
s = json.load(sys.stdin)
v = eval(sys.argv[1], {"s": s})
if isinstance(v, list):
    print("\n".join(str(x) for x in v))
elif v is not None:
    print(v)
' "$expr"
}

# lab_ward_ipv4 HOST: print HOST's overlay IPv4 (status --json field ipv4).
lab_ward_ipv4() { lab_ward_json_get "${1:?usage: lab_ward_ipv4 HOST}" 's["ipv4"]'; }

# lab_ward_peer_ipv4s HOST: print the overlay IPv4s of HOST's peers.
lab_ward_peer_ipv4s() { lab_ward_json_get "${1:?usage: lab_ward_peer_ipv4s HOST}" '[p["ipv4"] for p in s.get("peers", [])]'; }

# lab_ward_has_peer HOST PEER_IPV4: succeed if HOST's status lists the peer.
# A here-string, not a pipe: `grep -q` leaves at its first match, and a writer still writing then
# dies of SIGPIPE, which fails the whole pipeline under `set -o pipefail` (the e2e scripts' mode).
lab_ward_has_peer() {
    grep -qx "${2:?usage: lab_ward_has_peer HOST PEER_IPV4}" <<<"$(lab_ward_peer_ipv4s "${1:?usage: lab_ward_has_peer HOST PEER_IPV4}")"
}

# lab_ward_wait_peer HOST PEER_IPV4 [SECONDS=LAB_WAIT_TIMEOUT]: wait until
# HOST's status lists the peer; 1 + message on timeout.
lab_ward_wait_peer() {
    lab_wait_for -t "${3:-$LAB_WAIT_TIMEOUT}" lab_ward_has_peer "${1:?}" "${2:?}"
}

# ---- relays (forwarding and address discovery) -----------------------------

# lab_have_relay: succeed if the ward-relay binary is built.
lab_have_relay() { [[ -x "$(lab_ward_bin ward-relay)" ]]; }

# lab_start_relay HOST NAME [PORT=3478]: register relay NAME with the coordinator
# (`ward-coordinator relay add NAME --addr IP:PORT`, IP being HOST's public
# address), keep the credential it prints in a 0600 file, start
# `ward-relay serve --token-file FILE --listen IP:PORT` in HOST (a wan host) and
# wait until the UDP port is bound. Needs a running coordinator. Prints the
# relay's HOST:PORT. The relay answers address discovery at once and takes
# device connections once the coordinator welcomes it (lab_relay_wait_welcomed).
lab_start_relay() {
    _lab_need_init || return 1
    local host="${1:?usage: lab_start_relay HOST NAME [PORT]}" name="${2:?usage: lab_start_relay HOST NAME [PORT]}"
    local port="${3:-3478}" bin addr cred
    bin=$(lab_ward_bin ward-relay)
    [[ -x "$bin" ]] || _lab_die "$bin not built" || return 1
    addr=$(lab_hostport "$(lab_public_ip "$host")" "$port")
    cred="$LAB_DIR/relay-$name.token"
    (umask 077 && lab_coord relay add "$name" --addr "$addr" >"$cred") ||
        { _lab_die "relay add $name --addr $addr failed"; return 1; }
    [[ "$(head -c 11 "$cred")" == wardrelay1- ]] ||
        { _lab_die "relay add $name printed no relay credential"; return 1; }
    lab_spawn "$host" "relay-$host.log" "$bin" serve --token-file "$cred" --listen "$addr" \
        --metrics-listen "$(lab_hostport "$(lab_public_ip "$host")" 9464)"
    lab_wait_for -t 10 sh -c "ip netns exec $(lab_ns "$host") ss -lun | grep -qF ' $addr '" ||
        { tail -n 20 "$LAB_DIR/logs/relay-$host.log" >&2; _lab_die "ward-relay in $host did not come up"; return 1; }
    echo "$addr"
}

# lab_relay_pid HOST: the PID of the ward-relay this lab runs in HOST (empty if none).
lab_relay_pid() {
    local pid
    for pid in $(lab_pids "${1:?usage: lab_relay_pid HOST}"); do
        [[ "$(readlink "/proc/$pid/exe" 2>/dev/null)" == *ward-relay ]] && { echo "$pid"; return 0; }
    done
    return 0
}

# lab_restart_relay HOST NAME [PORT=3478]: start relay NAME again in HOST with the
# credential lab_start_relay kept (after it was stopped), and wait until its
# control session is up again.
lab_restart_relay() {
    _lab_need_init || return 1
    local host="${1:?usage: lab_restart_relay HOST NAME [PORT]}" name="${2:?usage: lab_restart_relay HOST NAME [PORT]}"
    local port="${3:-3478}" addr n
    addr=$(lab_hostport "$(lab_public_ip "$host")" "$port")
    n=$(grep -c "control session up" "$LAB_DIR/logs/relay-$host.log" 2>/dev/null)
    lab_spawn "$host" "relay-$host.log" "$(lab_ward_bin ward-relay)" serve \
        --token-file "$LAB_DIR/relay-$name.token" --listen "$addr" \
        --metrics-listen "$(lab_hostport "$(lab_public_ip "$host")" 9464)"
    lab_wait_for -t 15 sh -c "test \$(grep -c 'control session up' '$LAB_DIR/logs/relay-$host.log') -gt ${n:-0}"
}

# lab_relay_wait_welcomed HOST [SECONDS=LAB_WAIT_TIMEOUT]: wait until the relay
# in HOST has its control session up (it then accepts device connections).
lab_relay_wait_welcomed() {
    local host="${1:?usage: lab_relay_wait_welcomed HOST [SECONDS]}"
    lab_wait_for -t "${2:-$LAB_WAIT_TIMEOUT}" grep -q "control session up" "$LAB_DIR/logs/relay-$host.log"
}

# lab_relay_metric HOST METRIC: the value of METRIC (a Prometheus sample name
# with its labels, e.g. ward_relay_relayed_bytes_total) on the relay in HOST,
# summed over matching series; prints 0 if it has none.
lab_relay_metric() {
    local host="${1:?usage: lab_relay_metric HOST METRIC}" metric="${2:?usage: lab_relay_metric HOST METRIC}"
    lab_metric "$host" "$(lab_hostport "$(lab_public_ip "$host")" 9464)" "$metric"
}

# lab_scrape HOST ADDR: print the body of `GET http://ADDR/metrics`, fetched in
# HOST's namespace (so a loopback ADDR is HOST's own loopback); fails if the
# endpoint does not answer 200.
lab_scrape() {
    local host="${1:?usage: lab_scrape HOST ADDR}" addr="${2:?usage: lab_scrape HOST ADDR}"
    lab_exec "$host" python3 -c '
import sys, urllib.request
sys.stdout.write(urllib.request.urlopen("http://%s/metrics" % sys.argv[1], timeout=5).read().decode())
' "$addr"
}

# lab_metric HOST ADDR METRIC: the value of METRIC on the endpoint ADDR in HOST:
# a sample name, alone (every series summed) or with its exact labels
# (`ward_device_bytes_total{direction="out"}`); prints 0 if it has none.
lab_metric() {
    local host="${1:?usage: lab_metric HOST ADDR METRIC}" addr="${2:?usage: lab_metric HOST ADDR METRIC}"
    local metric="${3:?usage: lab_metric HOST ADDR METRIC}" body
    body=$(lab_scrape "$host" "$addr") || return 1
    printf '%s\n' "$body" | python3 -c '
import sys
total = 0
for line in sys.stdin.read().splitlines():
    if line.startswith("#") or not line.strip():
        continue
    name, _, value = line.rpartition(" ")
    if name == sys.argv[1] or name.split("{", 1)[0] == sys.argv[1]:
        total += float(value)
print(int(total) if total == int(total) else total)
' "$metric"
}

# lab_check_metrics HOST ADDR: scrape ADDR in HOST and run `promtool check
# metrics` on it (the text format parsed strictly, names linted); fails on any
# finding or an empty scrape.
lab_check_metrics() {
    local host="${1:?usage: lab_check_metrics HOST ADDR}" addr="${2:?usage: lab_check_metrics HOST ADDR}" body
    command -v promtool >/dev/null || { echo "promtool missing (Debian package prometheus)" >&2; return 1; }
    body=$(lab_scrape "$host" "$addr") || return 1
    [[ -n "$body" ]] || { echo "empty scrape of $addr in $host" >&2; return 1; }
    printf '%s\n' "$body" | promtool check metrics
}

# lab_netcheck_get HOST PYEXPR: evaluate PYEXPR on `ward netcheck --json`
# (bound to `n`) and print the result (lists one item a line; None prints nothing).
lab_netcheck_get() {
    local host="${1:?}" expr="${2:?}" json
    json=$(lab_ward "$host" netcheck --json) || return 1
    printf '%s' "$json" | python3 -c '
import json, sys
n = json.load(sys.stdin)
v = eval(sys.argv[1], {"n": n})
if isinstance(v, list):
    print("\n".join(str(x) for x in v))
elif v is not None:
    print(v)
' "$expr"
}
