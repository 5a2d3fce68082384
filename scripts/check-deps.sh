#!/usr/bin/env bash
# Proves the dependency rules of ARCHITECTURE.md:
#  1. crates: ward-shared depends on no async runtime, QUIC, CLI, database or OS-randomness crate;
#     ward-coordinator does not depend on ward-client, nor ward-client on ward-coordinator or rusqlite,
#     nor ward-relay on ward-client or ward-coordinator;
#  2. I/O-free cores (listed below) open no sockets, read no clock, spawn no threads and draw no
#     OS randomness: time and random values are passed in.
# Exits non-zero naming every violation.
set -euo pipefail
cd "$(dirname "$0")/.."
fail=0
bad() { echo "dependency rule broken: $*" >&2; fail=1; }

deps_of() { # normal (non-dev) dependencies of a package, one crate name per line
    cargo tree --locked -p "$1" -e normal --prefix none --format '{p}' 2>/dev/null |
        awk '{print $1}' | sort -u
}

shared_deps="$(deps_of ward-shared)"
[[ -n "$shared_deps" ]] || bad "cargo tree printed nothing for ward-shared"
for forbidden in tokio quinn clap rusqlite mio socket2 tun-rs rand getrandom ward-runtime; do
    grep -qx "$forbidden" <<<"$shared_deps" && bad "ward-shared depends on $forbidden"
done
grep -qx ward-client <<<"$(deps_of ward-coordinator)" && bad "ward-coordinator depends on ward-client"
client_deps="$(deps_of ward-client)"
for forbidden in ward-coordinator rusqlite; do
    grep -qx "$forbidden" <<<"$client_deps" && bad "ward-client depends on $forbidden"
done
runtime_deps="$(deps_of ward-runtime)"
[[ -n "$runtime_deps" ]] || bad "cargo tree printed nothing for ward-runtime"
for forbidden in clap rusqlite ward-client ward-coordinator ward-relay; do
    grep -qx "$forbidden" <<<"$runtime_deps" && bad "ward-runtime depends on $forbidden"
done
relay_deps="$(deps_of ward-relay)"
[[ -n "$relay_deps" ]] || bad "cargo tree printed nothing for ward-relay"
for forbidden in ward-client ward-coordinator; do
    grep -qx "$forbidden" <<<"$relay_deps" && bad "ward-relay depends on $forbidden"
done

clidoc_deps="$(deps_of ward-clidoc)"
[[ -n "$clidoc_deps" ]] || bad "cargo tree printed nothing for ward-clidoc"
for forbidden in tokio ward-shared ward-runtime ward-client ward-coordinator ward-relay; do
    grep -qx "$forbidden" <<<"$clidoc_deps" && bad "ward-clidoc depends on $forbidden"
done

# I/O-free cores: every file here must exist (a renamed core must be renamed here too).
cores=(
    shared/src
    coordinator/src/registry.rs
    coordinator/src/replicas.rs
    coordinator/src/trust.rs
    coordinator/src/behaviour
    coordinator/src/limits.rs
    coordinator/src/tickets.rs
    coordinator/src/model.rs
    coordinator/src/audit.rs
    coordinator/src/gate.rs
    coordinator/src/flows.rs
    coordinator/src/fanout.rs
    coordinator/src/maturity
    coordinator/src/suggest
    coordinator/src/console/auth.rs
    coordinator/src/console/html.rs
    coordinator/src/console/svg.rs
    coordinator/src/console/views.rs
    coordinator/src/oidc/jwt.rs
    coordinator/src/oidc/core.rs
    client/src/dataplane/engine
    client/src/dataplane/pmtu.rs
    client/src/dataplane/probe.rs
    client/src/agent
    client/src/dns
    relay/src/core.rs
    relay/src/forward.rs
    relay/src/gate.rs
    relay/src/udp_bind.rs
)
forbidden_re='tokio::|quinn::|std::net::(UdpSocket|TcpStream|TcpListener)|UnixStream|SystemTime::now|Instant::now|thread_rng|OsRng|std::thread::spawn|std::fs::|std::process::|ward_runtime'
for c in "${cores[@]}"; do
    [[ -e "$c" ]] || { bad "core path $c does not exist (update scripts/check-deps.sh)"; continue; }
    # Test modules may use the clock; they are cut off at `mod tests` / in tests.rs files.
    while IFS= read -r f; do
        [[ "$f" == */tests.rs || "$f" == */tests/* ]] && continue
        hits="$(awk '/^#\[cfg\(test\)\]/{exit} {print FILENAME":"FNR": "$0}' "$f" | grep -E "$forbidden_re" | grep -vE '^\S+:[0-9]+: *//' || true)"
        [[ -n "$hits" ]] && bad "I/O in a core:"$'\n'"$hits"
    done < <(find "$c" -name '*.rs' | sort)
done

if ((fail)); then exit 1; fi
echo "dependency rules hold: ward-shared free of runtime/QUIC/CLI/DB/OS-randomness crates; ${#cores[@]} core paths free of sockets, clocks, threads and OS randomness"
