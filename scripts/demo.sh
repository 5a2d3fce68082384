#!/usr/bin/env bash
# Ward live demo: builds the release binaries, then brings up a real overlay in network
# namespaces (a coordinator on its embedded SQLite, a server on the open network, two laptops
# behind NAT routers) and shows what Ward does. Everything is torn down at the end.
# Needs root (namespaces, TUN devices). Usage: sudo ./scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $EUID -ne 0 ]]; then echo "the demo needs root (network namespaces and TUN devices): sudo $0"; exit 1; fi
# The system packages it needs (scripts/packages.txt): only the missing ones, apt untouched
# when none is.
./scripts/install-deps.sh
step() { printf '\n\033[1m▶ %s\033[0m\n' "$*"; }
run() { printf '  $ %s\n' "$*"; }

step "Building Ward (release)"
cargo build --release --workspace --bins 2>&1 | tail -n 1

source tests/lab/lab.sh
lab_init
step "Building a small internet out of network namespaces"
lab_add_wan_host db
lab_add_natted_host alice
lab_add_natted_host bob
echo "  wan 10.99.0.0/24 · coordinator at $(lab_ip wan) · server 'db' at $(lab_ip db)"
echo "  laptop 'alice' at $(lab_ip alice) behind NAT router $(lab_public_ip alice)"
echo "  laptop 'bob'   at $(lab_ip bob) behind NAT router $(lab_public_ip bob)"

step "Starting the coordinator (ward-coordinator init + serve)"
lab_start_coordinator
lab_coord status | sed 's/^/  /'

step "Registering a relay and starting it with the credential that prints: devices learn their public address from it"
lab_add_wan_host relay1
run "ward-coordinator relay add r1 --addr $(lab_hostport "$(lab_public_ip relay1)" 3478) > r1.token"
R1=$(lab_start_relay relay1 r1)
run "ward-relay serve --token-file r1.token --listen $R1"
lab_relay_wait_welcomed relay1 15
lab_coord relay ls | sed 's/^/  /'

step "Adding users and enrolling three devices with single-use tokens"
run "ward-coordinator user add alice --group eng"
lab_coord user add alice --group eng
lab_coord user add bob --group ops
for h in db alice bob; do lab_start_device "$h"; done
run "ward-coordinator token create --tag server    # on db: ward up --token-file FILE"
lab_device_up db "$(lab_token --tag db --tag server)" | sed 's/^/  /'
lab_device_up alice "$(lab_token --user alice)" | sed 's/^/  /'
lab_device_up bob "$(lab_token --user bob --ttl 10m)" | sed 's/^/  /'
run "ward-coordinator device ls"
lab_coord device ls | sed 's/^/  /'

DB4=$(lab_ward_ipv4 db); DB6=$(lab_ward_json_get db 's["ipv6"]')
step "Default deny: with no policy, nobody reaches anybody"
run "alice$ ping $DB4"
if lab_exec alice ping -c1 -W1 "$DB4" >/dev/null 2>&1; then echo "  !! alice reached db without a policy"; exit 1; else echo "  no answer: no policy, no access"; fi

step "Applying a policy: eng may reach db (tcp/5432, ping); ops may reach servers' SSH"
sed 's/^/    /' examples/policy.toml | grep -v '^    #' | grep -v '^    $' | head -n 30
run "ward-coordinator policy apply examples/policy.toml"
lab_coord policy apply examples/policy.toml | sed 's/^/  /'
sleep 1

step "alice reaches db over the overlay, through her NAT, by overlay address"
lab_wait_for -t 15 lab_exec alice ping -c1 -W1 "$DB4"
run "alice$ ping $DB4"; lab_exec alice ping -c3 -i0.2 "$DB4" | sed 's/^/  /' | tail -n 2
run "alice$ ping -6 $DB6"; lab_exec alice ping -6 -c3 -i0.2 "$DB6" | sed 's/^/  /' | tail -n 2

step "Behind her home router, alice asked the relay what address it sees her at (ward netcheck)"
alice_found_udp() { [[ "$(lab_netcheck_get alice 'n["udp"]')" == True ]]; }
lab_wait_for -t 15 alice_found_udp
run "alice$ ward netcheck"; lab_ward alice netcheck | sed 's/^/    /'
echo "  (her router's public address; she publishes it as a candidate endpoint, so peers behind"
echo "   ordinary NATs reach her directly)"

step "Laptops and servers behind home NATs: direct when the NATs allow it, through the relay when not"
lab_add_natted_host nas                 # an ordinary home router (port kept)
lab_add_natted_host carol --symmetric   # routers that pick a new port per destination
lab_add_natted_host dave --symmetric
echo "  server 'nas' behind an ordinary NAT; alice's second laptop 'carol' and server 'dave'"
echo "  each behind a NAT that randomizes ports (no direct path can be punched between them)"
for h in nas carol dave; do lab_start_device "$h"; done
lab_device_up nas "$(lab_token --tag db --tag server)" >/dev/null
lab_device_up dave "$(lab_token --tag db --tag server)" >/dev/null
lab_device_up carol "$(lab_token --user alice)" >/dev/null
NAS4=$(lab_ward_ipv4 nas); DAVE4=$(lab_ward_ipv4 dave)
path_kind() { lab_ward_json_get "$1" "[p['path']['kind'] for p in s['peers'] if p['hostname']=='$2'][0]"; }
lab_wait_for -t 30 -i 0.3 sh -c "ip netns exec $(lab_ns alice) ping -c1 -W1 $NAS4 >/dev/null"
lab_wait_for -t 30 -i 0.3 sh -c "ip netns exec $(lab_ns carol) ping -c1 -W1 $DAVE4 >/dev/null"
is_kind() { [[ "$(path_kind "$1" "$2")" == "$3" ]]; }
lab_wait_for -t 15 -i 0.3 is_kind alice nas direct
lab_wait_for -t 15 -i 0.3 is_kind carol dave relay
run "alice$ ward status      # nas: both behind ordinary NATs, a direct path"
lab_ward alice status | grep -E '^\s*(peers:|nas )' | sed 's/^/    /'
run "carol$ ward status      # dave: both behind port-randomizing NATs, through relay r1"
lab_ward carol status | grep -E '^\s*(peers:|dave )' | sed 's/^/    /'
head -c 20M /dev/urandom >"$LAB_DIR/blob-relay"
lab_spawn dave nc-relay.log sh -c "nc -l -p 5432 | sha256sum > $LAB_DIR/got-relay"
lab_wait_for -t 5 sh -c "ip netns exec $(lab_ns dave) ss -ltn | grep -q ':5432 '"
START=$(date +%s%N)
lab_exec carol nc -N "$DAVE4" 5432 <"$LAB_DIR/blob-relay"
lab_wait_for -t 15 test -s "$LAB_DIR/got-relay"
MS=$(( ($(date +%s%N) - START) / 1000000 ))
echo "  carol → dave:5432 through the relay: 20 MB, sha256 $(sha256sum <"$LAB_DIR/blob-relay" | cut -c1-16)… received $(cut -c1-16 "$LAB_DIR/got-relay")… in ${MS} ms"
echo "  (the relay forwards WireGuard ciphertext between ticketed devices; it holds no keys)"
lab_coord relay ls | sed 's/^/  /'

step "A 20 MB TCP transfer alice → db:5432, checked end to end"
head -c 20M /dev/urandom >"$LAB_DIR/blob"
lab_spawn db nc.log sh -c "nc -l -p 5432 | sha256sum > $LAB_DIR/got"
sleep 0.5
START=$(date +%s%N)
lab_exec alice nc -N "$DB4" 5432 <"$LAB_DIR/blob"
lab_wait_for -t 10 test -s "$LAB_DIR/got"
MS=$(( ($(date +%s%N) - START) / 1000000 ))
echo "  sent sha256 $(sha256sum <"$LAB_DIR/blob" | cut -c1-16)…  received $(cut -c1-16 "$LAB_DIR/got")…  in ${MS} ms"

step "Key rotation under live traffic: alice gets a new WireGuard key mid-transfer"
lab_spawn db iperf.log iperf3 -s -1 -p 5432
sleep 0.5
K1=$(lab_ward_json_get alice 's["key"]')
lab_spawn alice iperf-client.log iperf3 -c "$DB4" -p 5432 -t 6 -J
IPERF=$(lab_last_pid)
sleep 2
run "ward-coordinator device rotate alice      # (leases also rotate on their own at half-life)"
lab_coord device rotate alice
while kill -0 "$IPERF" 2>/dev/null; do sleep 0.3; done
K2=$(lab_ward_json_get alice 's["key"]')
echo "  alice's key before: $K1"
echo "  alice's key after:  $K2"
python3 -c '
import json,sys
j=json.load(open(sys.argv[1]))
if "error" in j: print("  !! transfer failed:", j["error"]); sys.exit(1)
e=j["end"]; print("  6 s TCP transfer across the rotation: %.2f Gbit/s, %d retransmits, no reset" % (e["sum_received"]["bits_per_second"]/1e9, e["sum_sent"].get("retransmits",0)))
' "$LAB_DIR/logs/iperf-client.log"
[[ "$K1" != "$K2" ]] || { echo "  !! the key did not change"; exit 1; }

step "One allowed and one denied connection, and why"
for p in 5432 22; do lab_spawn db "listen-$p.log" sh -c "while true; do echo hello-from-db-port-$p | nc -l -p $p -q 1; done"; done
sleep 0.5
run "alice$ nc $DB4 5432"
lab_exec alice timeout 3 nc -w 2 "$DB4" 5432 </dev/null | sed 's/^/  /' || true
run "ward-coordinator policy explain alice db:5432"
lab_coord policy explain alice db:5432 | sed 's/^/  /'
run "alice$ nc $DB4 22"
if lab_exec alice timeout 3 nc -z -w 2 "$DB4" 22; then echo "  !! alice reached ssh"; exit 1; else echo "  connection timed out: db's own filter dropped it"; fi
run "ward-coordinator policy explain alice db:22"
lab_coord policy explain alice db:22 | sed 's/^/  /'

step "Posture: db access now requires a marker file on the laptop"
MARK="$LAB_DIR/alice-compliant"
touch "$MARK"
{ cat examples/policy.toml; printf '\n[posture.compliant]\nfiles = [{ path = "%s" }]\nos = ["debian>=12"]\n' "$MARK"; } \
    | sed 's/^to = \["db"\]$/to = ["db"]\nposture = ["compliant"]/' >"$LAB_DIR/policy-posture.toml"
run "ward-coordinator policy apply policy-posture.toml   # rule eng-db now needs posture \"compliant\""
lab_coord policy apply "$LAB_DIR/policy-posture.toml" | sed 's/^/  /'
echo "  (the diff judges alice's last report, which could not include a file no policy asked about yet;"
echo "   the coordinator now asks her agent for it, and her next report, within a second, restores db)"
lab_wait_for -t 15 lab_exec alice ping -c1 -W1 "$DB4"
echo "  alice → db: answers (alice has the file and runs Debian 12)"
run "alice$ rm $MARK      # the device falls out of compliance"
T0=$(date +%s%N); rm -f "$MARK"
lab_wait_for -t 10 -i 0.1 bash -c "! ip netns exec $(lab_ns alice) ping -c1 -W0.3 $DB4"
echo "  alice → db: no answer $(( ($(date +%s%N) - T0) / 1000000 )) ms later (enforced by db itself)"
run "alice$ ward posture"; lab_ward alice posture | sed 's/^/    /'
run "alice$ touch $MARK   # fixed"
T0=$(date +%s%N); touch "$MARK"
lab_wait_for -t 10 -i 0.1 lab_exec alice ping -c1 -W0.3 "$DB4"
echo "  alice → db: answers again $(( ($(date +%s%N) - T0) / 1000000 )) ms later"

step "What each device sees (ward status)"
for h in db alice bob; do run "$h$ ward status"; lab_ward "$h" status | sed 's/^/    /'; done

step "Revoking bob: his session closes at once and every peer drops him"
run "ward-coordinator device revoke bob"
lab_coord device revoke bob
sleep 1
run "bob$ ward status"; lab_ward bob status | sed 's/^/    /'
if lab_exec bob ping -c2 -W1 "$DB4" >/dev/null 2>&1; then echo "  !! bob still reaches db"; exit 1; else echo "  bob → db: no answer (as it should be)"; fi

step "Every action is in the hash-chained audit log"
lab_coord audit | tail -n 6 | sed 's/^/  /'
run "ward-coordinator audit verify"; lab_coord audit verify | sed 's/^/  /'

step "Done: tearing the lab down"
