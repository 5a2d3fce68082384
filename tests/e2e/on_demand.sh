#!/usr/bin/env bash
# Peers on demand, end to end: a coordinator that sends every device only the peers it holds
# (`serve --peers-on-demand-above 0`, as a device with more peers than the default 256 gets).
# db (a server), alice and carol (eng: db:5432), bob (ops: db:22); alice and bob are strangers.
# - devices start with no peers, their netmaps say on demand;
# - alice's first TCP connection to db opens without a SYN retransmission (under 1 s: the SYN
#   is held while db is asked for, then sent), and alice and db hold each other, nothing more;
# - a port the policy denies on a held peer stays closed (the filter still decides);
# - alice -> bob (policy allows neither way) fails at once (ICMP administratively prohibited
#   from alice's own data plane), and the coordinator counts a refused want;
# - bob holds db after reaching its SSH port; revoking bob takes him off db within 2 s;
# - with the coordinator dead, alice still reaches db (held) and carol, who never asked for db,
#   cannot (new peers fail closed); after a restart alice holds db again before sending
#   anything (the held peers her hello named), and carol's resolver, asked for db by name,
#   asks the coordinator for it and answers with db's address; then carol reaches db.
# Needs root; prints `N passed, N failed`.
set -uo pipefail
source "$(dirname "$0")/common.sh"
need_root
lab_have_ward || { echo "build first: cargo build --release --workspace --bins"; exit 1; }

CM=127.0.0.1:9560
SERVE_ARGS="--peers-on-demand-above 0 --metrics-listen $CM"
lab_init
lab_add_wan_host db
for h in alice bob carol; do lab_add_natted_host "$h"; done
LAB_COORD_SERVE_ARGS="$SERVE_ARGS" lab_start_coordinator
for h in db alice bob; do lab_start_device "$h"; done
# carol's resolver manages a lab file, never a real resolv.conf; it is queried directly.
printf 'nameserver 127.0.0.1\n' >"$LAB_DIR/carol-resolv.conf"
LAB_WARD_DNS_ARGS="--dns resolv.conf --resolv-conf $LAB_DIR/carol-resolv.conf" lab_start_device carol
lab_coord user add alice >/dev/null 2>&1
lab_coord user add bob >/dev/null 2>&1
lab_coord user add carol >/dev/null 2>&1
cat >"$LAB_DIR/policy.toml" <<'TOML'
[groups]
eng = ["alice", "carol"]
ops = ["bob"]
[services.db]
devices = ["tag:db"]
ports = ["tcp/5432"]
[services.ssh]
devices = ["tag:server"]
ports = ["tcp/22"]
[[rules]]
name = "eng-db"
from = ["group:eng"]
to = ["db"]
[[rules]]
name = "ops-ssh"
from = ["group:ops"]
to = ["ssh"]
TOML
lab_coord policy apply "$LAB_DIR/policy.toml" >/dev/null
lab_device_up db "$(lab_token --tag db --tag server)" >/dev/null
for h in alice bob carol; do lab_device_up "$h" "$(lab_token --user "$h")" >/dev/null; done
DB4=$(lab_ward_ipv4 db); BOB4=$(lab_ward_ipv4 bob)
peers_of() { lab_ward_json_get "$1" '[p["hostname"] for p in s["peers"]]' | sort | tr '\n' ' '; }
on_demand() { [[ $(lab_ward_json_get "$1" 's.get("on_demand")') == True ]]; }
listen() { lab_spawn "$1" "listen-$1-$2.log" sh -c "while true; do echo hello-from-$1 | nc -l -p $2 -q 1; done"; }
tcp_ok() { lab_exec "$1" timeout 4 nc -z -w 3 "$2" "$3" >/dev/null 2>&1; }
fails() { ! "$@"; }
# ms_to HOST IP PORT: print how long a TCP connection took to open (ms), or fail.
ms_to() {
    lab_exec "$1" python3 -c '
import socket, sys, time
t = time.monotonic()
socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()
print(int((time.monotonic() - t) * 1000))
' "$2" "$3"
}
cmetric() { lab_metric wan "$CM" "$1"; }
# resolve HOST SERVER NAME: an A query to SERVER:53 from HOST; prints "MS ADDR" (the answer's
# first address, or the rcode as NXDOMAIN/SERVFAIL) and how long it took.
resolve() {
    lab_exec "$1" python3 -c '
import socket, struct, sys, time
server, name = sys.argv[1], sys.argv[2]
q = struct.pack(">HHHHHH", 0x5eed, 0x0100, 1, 0, 0, 0)
q += b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(4)
t = time.monotonic()
s.sendto(q, (server, 53))
r = s.recv(4096)
ms = int((time.monotonic() - t) * 1000)
rcode, an = r[3] & 15, struct.unpack(">H", r[6:8])[0]
if rcode or not an:
    print(ms, {0: "NOANSWER", 2: "SERVFAIL", 3: "NXDOMAIN"}.get(rcode, rcode))
else:
    print(ms, socket.inet_ntoa(r[-4:]))
' "$2" "$3"
}
for port in 5432 22 9000; do listen db $port; done
lab_wait_for -t 10 on_demand alice

say "devices start with no peers"
check "alice's netmap is on demand" on_demand alice
check "db's netmap is on demand" on_demand db
check "alice holds no peers before sending" test -z "$(peers_of alice | tr -d ' ')"
check "db holds no peers before anyone sends" test -z "$(peers_of db | tr -d ' ')"

say "the first connection asks for the peer and opens without a retransmission"
MS=$(ms_to alice "$DB4" 5432); echo "  alice -> db:5432 opened in ${MS:-?} ms (first packet held while db was asked for)"
check "alice's first connection to db opened within 1 s (${MS:-none} ms)" test -n "$MS" -a "${MS:-9999}" -lt 1000
check "alice holds db only" test "$(peers_of alice)" = "db "
check "db holds alice only" test "$(peers_of db)" = "alice "
reply() { grep -q hello-from-db <<<"$(lab_exec alice timeout 3 nc -w 2 "$DB4" 5432 </dev/null)"; }
check "the server's reply arrives" lab_wait_for -t 6 -i 0.5 reply
check "db:22 stays closed to alice (the filter decides, not the peer list)" fails tcp_ok alice "$DB4" 22
HELD=$(lab_ward_json_get alice 's["counters"]["held_for_peer"]')
check "alice's data plane held packets for the peer it asked for ($HELD)" test "${HELD:-0}" -ge 1

say "a stranger is refused at once"
T0=$(now_ms)
lab_exec alice timeout 4 nc -z -w 3 "$BOB4" 22 >/dev/null 2>&1; RC=$?
T1=$(now_ms)
echo "  alice -> bob:22 ended in $((T1 - T0)) ms (exit $RC)"
check "alice -> bob fails" test "$RC" -ne 0
check "and fails fast, not by timeout ($((T1 - T0)) ms)" test $((T1 - T0)) -lt 2500
check "alice does not hold bob" test "$(peers_of alice)" = "db "
REFUSED=$(cmetric 'ward_coordinator_peer_wants_total{outcome="refused"}')
GRANTED=$(cmetric 'ward_coordinator_peer_wants_total{outcome="granted"}')
check "the coordinator counted the refused want ($REFUSED) and the granted one ($GRANTED)" test "${REFUSED:-0}" -ge 1 -a "${GRANTED:-0}" -ge 1
check "sessions on demand are counted ($(cmetric ward_coordinator_sessions_on_demand))" test "$(cmetric ward_coordinator_sessions_on_demand)" -eq 4

say "a revoked device leaves the peers that held it"
check "bob -> db:22 connects" tcp_ok bob "$DB4" 22
check "db holds alice and bob" test "$(peers_of db)" = "alice bob "
R0=$(now_ms)
lab_coord device revoke bob >/dev/null
db_without_bob() { [[ "$(peers_of db)" == "alice " ]]; }
check "db dropped bob within 2 s" lab_wait_for -t 2 -i 0.05 db_without_bob
echo "  db dropped bob $(( $(now_ms) - R0 )) ms after the revoke command"
check "bob cannot reach db" fails tcp_ok bob "$DB4" 22

say "the coordinator down: held peers keep working, new ones fail closed"
for p in $(lab_pids wan); do
    if tr '\0' ' ' <"/proc/$p/cmdline" | grep -q "ward-coordinator.*serve"; then kill -9 "$p"; fi
done
sleep 1
check "alice -> db:5432 still works (held)" tcp_ok alice "$DB4" 5432
check "carol -> db:5432 fails (never held, nobody to ask)" fails tcp_ok carol "$DB4" 5432
RESTART=$SECONDS
# shellcheck disable=SC2086 # SERVE_ARGS is a list of flags
lab_spawn wan coordinator2.log "$(lab_ward_bin ward-coordinator)" serve --data-dir "$LAB_DIR/coordinator" $SERVE_ARGS
lab_wait_for -t 10 lab_coord status
connected() { [[ $(lab_ward_json_get "$1" 's["state"]') == connected ]]; }
lab_wait_for -t 15 connected alice
check "after the restart alice holds db before sending anything (hello named it)" test "$(peers_of alice)" = "db "
# A session opened since the restart (an idle device notices the old one is gone only when
# it next sends: the first thing sent on it is lost, and asked for again a second later).
reconnected() { (( $(lab_ward_json_get "$1" 's.get("connected_secs") or 10**6') <= SECONDS - RESTART )); }
lab_ward carol status >/dev/null 2>&1
lab_wait_for -t 20 reconnected carol
CAROL4=$(lab_ward_ipv4 carol)
DOMAIN=$(lab_ward_json_get carol 's["dns"]["domain"]' 2>/dev/null)
DOMAIN=${DOMAIN:-ward.internal}
check "carol holds no peers before asking" test -z "$(peers_of carol | tr -d ' ')"
read -r MS ANSWER <<<"$(resolve carol "$CAROL4" "db.$DOMAIN")"
echo "  carol's resolver answered db.$DOMAIN with ${ANSWER:-nothing} in ${MS:-?} ms (db asked for by name)"
check "db.$DOMAIN resolves on demand to db's address ($ANSWER)" test "${ANSWER:-}" = "$DB4"
check "within 1 s (${MS:-none} ms)" test "${MS:-9999}" -lt 1000
read -r _ ANSWER <<<"$(resolve carol "$CAROL4" "bob.$DOMAIN")"
check "a name carol may not reach is NXDOMAIN ($ANSWER)" test "${ANSWER:-}" = NXDOMAIN
check "carol -> db:5432 works once the coordinator is back" lab_wait_for -t 10 -i 0.5 tcp_ok carol "$DB4" 5432
check "carol holds db only" test "$(peers_of carol)" = "db "
check "audit verify" lab_coord audit verify

finish
