#!/usr/bin/env bash
# OpenID Connect sign-in and continuous identity, end to end, against a real provider
# (oidc-provider, tests/oidc): `ward up --login` with the device authorization grant, the
# sign-in completed programmatically (login.py); the device is enrolled for the signed-in user
# and the provider's groups decide what it reaches. Identity signals in the policy: a rule
# needing `amr` mfa opens for alice (password + one-time code) and stays shut for bob (password
# only), with the reason in `policy explain` and bob's `ward status`; a rule with a 25 s
# `max_auth_age` shuts by itself when alice's sign-in grows too old. The provider takes access
# away and gives it back, and the device stays connected throughout (its user rules go, it is
# rotated): SCIM active=false/true over 10 trials (cut and restore at the peer, p50/p99) and
# back-channel logout, a group removed (only that group's rule goes), a user disabled at the
# provider and seen by the refresh loop alone (3 s interval). Tampered ID tokens (wrong aud/iss, expired, alg none, forged signature, an
# earlier sign-in's token) are refused with an audit row. With the provider stopped a new
# sign-in is refused but the signed-in device keeps its access.
# Needs root; prints `N passed, N failed`.
set -uo pipefail
source "$(dirname "$0")/common.sh"
need_root
lab_have_ward || { echo "build first: cargo build --release --workspace --bins"; exit 1; }
command -v node >/dev/null || { echo "SKIPPED: oidc.sh needs node (tests/oidc); it was NOT run"; exit 0; }
ROOT=$(lab_repo_root)
OIDC="$ROOT/tests/oidc"
[[ -d "$OIDC/node_modules" ]] || (cd "$OIDC" && npm ci --no-audit --no-fund >/dev/null 2>&1) ||
    { echo "npm ci in tests/oidc failed"; exit 1; }
TOOLS="$E2E_DIR/tools.py"
START=$(date +%s)

lab_init
lab_add_wan_host db
lab_add_wan_host idp
lab_add_natted_host alice
lab_add_natted_host carol
lab_add_natted_host bob
IDP=$(lab_ip idp)
WAN=$(lab_ip wan)
D="$LAB_DIR/idp"
mkdir -p "$D"
"$OIDC/mkcert.sh" "$D" "$IDP" >/dev/null 2>&1
node "$OIDC/genjwks.mjs" "$D/jwks.json" >/dev/null
cat >"$D/users.json" <<'JSON'
[{"sub": "u-alice", "username": "alice", "password": "alice-pw", "email": "alice@example.test",
  "groups": ["eng", "ops"], "mfa": true},
 {"sub": "u-bob", "username": "bob", "password": "bob-pw", "email": "bob@example.test",
  "groups": ["eng"]}]
JSON
export OIDC_CLIENT_SECRET="cs-$RANDOM$RANDOM" OIDC_ADMIN_TOKEN="adm-$RANDOM$RANDOM"
export OIDC_ADMIN_URL=http://127.0.0.1:9444
SCIM_TOKEN="scim-$RANDOM$RANDOM"
printf '%s\n' "$OIDC_CLIENT_SECRET" >"$D/client-secret"
printf '%s\n' "$SCIM_TOKEN" >"$D/scim-token"
chmod 600 "$D/client-secret" "$D/scim-token"
ISSUER="https://$IDP"
start_idp() {
    lab_spawn idp idp.log env OIDC_SCIM_TOKEN="$SCIM_TOKEN" node "$OIDC/provider.mjs" --issuer "$ISSUER" \
        --tls-cert "$D/server.pem" --tls-key "$D/server.key" --jwks "$D/jwks.json" \
        --users "$D/users.json" --client-id ward --admin-listen 127.0.0.1:9444 \
        --backchannel-logout-uri "http://$WAN:8480/oidc/backchannel-logout" \
        --scim-url "http://$WAN:8480/scim/v2" --scim-token "$SCIM_TOKEN"
    IDP_PID=$(lab_last_pid)
    lab_wait_for -t 30 lab_exec idp python3 "$OIDC/admin.py" wait --timeout 1
}
admin() { lab_exec idp python3 "$OIDC/admin.py" "$@" >/dev/null; }
start_idp

LAB_COORD_SERVE_ARGS="--oidc-issuer $ISSUER --oidc-client-id ward --oidc-client-secret-file $D/client-secret \
 --oidc-ca-file $D/ca.pem --oidc-listen $WAN:8480 --scim-token-file $D/scim-token --oidc-refresh-interval 3s" \
    lab_start_coordinator
CA_SHA=$(awk '/CA sha256/ {print $NF}' "$LAB_DIR/logs/coordinator-init.log")
COORD=$(lab_coord_addr)
lab_start_device db
lab_start_device alice
lab_start_device carol
lab_start_device bob
lab_device_up db "$(lab_token --tag db)" >/dev/null
cat >"$LAB_DIR/policy.toml" <<'TOML'
# Members come from the provider (each signed-in user's provider groups).
[groups]
eng = []
ops = []

# Identity signals, judged from each device's sign-in at the provider.
[posture.mfa]
amr = ["mfa", "hwk"]

[posture.fresh]
max_auth_age = "25s"

[services.db]
devices = ["tag:db"]
ports = ["tcp/5432"]

[services.web]
devices = ["tag:db"]
ports = ["tcp/8080"]

[services.mfadb]
devices = ["tag:db"]
ports = ["tcp/5433"]

[services.freshdb]
devices = ["tag:db"]
ports = ["tcp/5434"]

[[rules]]
name = "eng-db"
from = ["group:eng"]
to = ["db"]

[[rules]]
name = "ops-web"
from = ["group:ops"]
to = ["web"]

[[rules]]
name = "mfa-db"
from = ["group:eng"]
to = ["mfadb"]
posture = ["mfa"]

[[rules]]
name = "fresh-db"
from = ["alice"]
to = ["freshdb"]
posture = ["fresh"]
TOML
check "policy applies" lab_coord policy apply "$LAB_DIR/policy.toml"
lab_spawn db serve.log python3 "$TOOLS" serve 5432 8080 5433 5434
DB4=$(lab_ward_ipv4 db)

# login HOST USER PASSWORD [--mfa]: `ward up --login` in HOST, the provider's page completed by
# login.py; prints the `ward up` output. Returns ward up's success.

login() {
    local host=$1 user=$2 pw=$3 mfa=${4:-} log uri

    log="up-$(date +%s%N).log"
    lab_spawn "$host" "$log" "$(lab_ward_bin ward)" --socket "$(lab_ward_socket "$host")" up --login \
        --coordinator "$COORD" --ca-sha256 "$CA_SHA" --hostname "$host"
    lab_wait_for -t 20 grep -qE 'To sign in, open:|rror' "$LAB_DIR/logs/$log"
    uri=$(awk '/To sign in, open:/ {print $NF}' "$LAB_DIR/logs/$log")
    if [[ -n "$uri" ]]; then
        # shellcheck disable=SC2086
        lab_exec idp python3 "$OIDC/login.py" device --uri "$uri" --user "$user" --password "$pw" $mfa \
            --ca-file "$D/ca.pem" >/dev/null 2>&1
    fi
    lab_wait_for -t 30 grep -qE '^up:|rror' "$LAB_DIR/logs/$log"
    cat "$LAB_DIR/logs/$log"
    grep -q '^up:' "$LAB_DIR/logs/$log"
}
await() { lab_exec alice python3 "$TOOLS" await "$DB4" "$1" "$2" "$3" "${4:-10}"; }
sees() { await "$@" >/dev/null; }
bob_sees() { lab_exec bob python3 "$TOOLS" await "$DB4" "$1" "$2" "$3" "${4:-10}" >/dev/null; }
# pctl MS...: prints p50 p99 max.
pctl() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {i50=int((NR+1)/2); i99=int(NR*0.99+0.999); print a[i50], a[i99], a[NR]}'; }

say "sign-in: ward up --login, completed at the provider with password + one-time code"
OUT=$(login alice alice alice-pw --mfa)
T_ALICE=$(now_ms)
echo "$OUT" | sed 's/^/    /'
check "ward up --login prints the verification URI and the code" grep -q 'confirm the code' <<<"$OUT"
check "ward up --login enrolls the device" grep -q '^up: alice' <<<"$OUT"
DEV=$(lab_coord device ls --json)
check "the device belongs to the signed-in user alice" python3 -c '
import json,sys; d=[d for d in json.loads(sys.argv[1]) if d["hostname"]=="alice"][0]; assert d["user"]=="alice", d' "$DEV"
UL=$(lab_coord user ls --json)
check "user alice was created with the provider's groups" python3 -c '
import json,sys; u=[u for u in json.loads(sys.argv[1]) if u["name"]=="alice"][0]; assert set(u["groups"])>={"eng","ops"}, u' "$UL"
check "the sign-in is audited" grep -q '"oidc.sign_in"' <<<"$(lab_coord audit --json)"
check "alice -> db:5432 (group eng from the provider) opens" sees 5432 open "$(now_ms)" 20
check "alice -> web:8080 (group ops from the provider) opens" sees 8080 open "$(now_ms)" 10

say "identity signals: amr and max_auth_age in the policy"
check "alice (amr pwd+otp+mfa) -> mfadb:5433 opens" sees 5433 open "$(now_ms)" 15
check "alice -> freshdb:5434 opens (a fresh sign-in)" sees 5434 open "$(now_ms)" 5
OUT=$(login bob bob bob-pw)
echo "$OUT" | sed 's/^/    /'
check "bob signs in with a password only" grep -q '^up: bob' <<<"$OUT"
check "bob -> db:5432 (group eng) opens" bob_sees 5432 open "$(now_ms)" 20
check "bob (amr pwd) -> mfadb:5433 stays shut" bob_sees 5433 closed "$(now_ms)" 3
EXPL=$(lab_coord policy explain bob mfadb:5433 2>&1)
grep -E 'mfa-db|amr' <<<"$EXPL" | head -n 3 | sed 's/^/    /'
check "policy explain: bob is denied mfadb for his sign-in's amr" grep -q 'amr: sign-in used \[pwd\], the rule needs mfa or hwk' <<<"$EXPL"
bob_status_says_amr() { grep -q 'unavailable:.*mfadb.*amr: sign-in used \[pwd\]' <<<"$(lab_ward bob status)"; }
check "bob's ward status says mfadb is unavailable for the amr" lab_wait_for -t 10 bob_status_says_amr
lab_ward bob status | grep 'unavailable:' | sed 's/^/    /'
MS=$(await 5434 closed "$T_ALICE" 45) || MS=99999
echo "  max_auth_age 25 s: fresh-db shut ${MS} ms after alice signed in (no report or push needed)"
# auth_time is when alice finished at the provider, a few seconds before `ward up` returned.
check "fresh-db shut by itself once the sign-in is older than 25 s" test "$MS" -ge 10000 -a "$MS" -le 30000
EXPL=$(lab_coord policy explain alice freshdb:5434 2>&1)
check "policy explain names max_auth_age" grep -q 'max_auth_age: signed in .* ago, the rule allows 25s' <<<"$EXPL"
check "device show names max_auth_age" grep -q 'max_auth_age' <<<"$(lab_coord device show alice)"
check "alice -> mfadb:5433 still opens" sees 5433 open "$(now_ms)" 3

LAT=()
RESTORE=()
say "SCIM active=false / true: access cut and restored at the peer, the device connected (10 trials)"
for i in $(seq 1 10); do
    T0=$(now_ms)
    admin scim u-alice --active false
    MS=$(await 5432 closed "$T0" 10) || MS=99999
    LAT+=("$MS")
    T1=$(now_ms)
    admin scim u-alice --active true
    MS=$(await 5432 open "$T1" 15) || MS=99999
    RESTORE+=("$MS")
done
echo "  SCIM disable -> refused at the peer (ms): ${LAT[*]}"
echo "  SCIM enable -> open again at the peer (ms): ${RESTORE[*]}"
read -r C50 C99 CMAX < <(pctl "${LAT[@]}")
read -r R50 R99 RMAX < <(pctl "${RESTORE[@]}")
echo "  cut: p50 ${C50} ms, p99 ${C99} ms; restore: p50 ${R50} ms, p99 ${R99} ms (10 trials)"
check "every SCIM cut enforced at the peer within 2 s (max ${CMAX} ms)" test "${CMAX:-99999}" -le 2000
check "every SCIM restore within 3 s (max ${RMAX} ms)" test "${RMAX:-99999}" -le 3000
check "alice's device stayed enrolled (state active)" python3 -c '
import json,sys; d=[d for d in json.loads(sys.argv[1]) if d["hostname"]=="alice"][0]; assert d["state"]=="active", d' "$(lab_coord device ls --json)"
check "the provider's changes are audited" grep -q '"oidc.user_change"' <<<"$(lab_coord audit --json)"

say "back-channel logout: access lost at the peer"
T0=$(now_ms)
admin logout u-alice
MS=$(await 5432 closed "$T0" 10) || MS=99999
echo "  back-channel logout -> refused at the peer: ${MS} ms"
LAT+=("$MS")
UL=$(lab_coord user ls --json)
check "user ls shows why (signed out at the provider)" grep -q 'back-channel logout' <<<"$UL"
alice_status_says_identity() { grep -q 'unavailable:.*identity: user alice has no access from the identity provider' <<<"$(lab_ward alice status)"; }
check "alice's ward status names the identity loss" lab_wait_for -t 5 alice_status_says_identity
check "policy explain names the identity loss" grep -q 'user alice has no access from the identity provider' <<<"$(lab_coord policy explain device:alice db:5432 2>&1)"
T1=$(now_ms)
admin scim u-alice --active true
MS=$(await 5432 open "$T1" 15) || MS=99999
echo "  SCIM active=true after the logout -> open again: ${MS} ms"
check "SCIM active=true restores access after the logout within 3 s" test "$MS" -le 3000
read -r P50 P99 MAX < <(pctl "${LAT[@]}")
echo "  push -> enforced at the peer over ${#LAT[@]} trials: p50 ${P50} ms, p99 ${P99} ms"
check "every push enforced at the peer within 2 s (max ${MAX} ms)" test "${MAX:-99999}" -le 2000

say "group removed at the provider: only that group's rule goes (refresh every 3 s)"
T0=$(now_ms)
admin groups u-alice eng
MS=$(await 8080 closed "$T0" 10) || MS=99999
echo "  group ops removed -> web:8080 refused after ${MS} ms"
check "web:8080 (ops) refused within interval + 2 s" test "$MS" -le 5000
check "db:5432 (eng) still opens" sees 5432 open "$(now_ms)" 5

say "user disabled at the provider, seen by the refresh loop alone"
T0=$(now_ms)
admin disable u-alice
MS=$(await 5432 closed "$T0" 10) || MS=99999
echo "  disabled at the provider -> refused after ${MS} ms (refresh interval 3 s)"
check "refused within interval + 2 s" test "$MS" -le 5000
T1=$(now_ms)
admin enable u-alice
MS=$(await 5432 open "$T1" 15) || MS=99999
echo "  enabled again -> restored after ${MS} ms"
check "restored within the refresh interval + 2 s (no reconnect needed)" test "$MS" -le 5000

say "tampered ID tokens are refused, each with a clear error and an audit row"
# replay first: the provider then hands back the token of alice's first sign-in, minutes old.
# (A token of a sign-in made within the coordinator's 5 s clock allowance before this one
# cannot be told apart without a nonce, which this provider leaves out of device-flow tokens.)
for mode in replay wrong_aud wrong_iss expired alg_none forged; do
    admin tamper "$mode" --grant-type urn:ietf:params:oauth:grant-type:device_code
    OUT=$(login carol alice alice-pw --mfa)
    WHY=$(grep -i 'rror' <<<"$OUT" | head -n1)
    echo "    $mode: ${WHY:0:160}"
    check "$mode: sign-in refused" test -n "$WHY" -a "$(grep -c '^up:' <<<"$OUT")" = 0
    admin tamper off
done
AUD=$(lab_coord audit --json)
REFUSED=$(grep -o 'oidc.sign_in_refused' <<<"$AUD" | wc -l)
echo "  audit rows oidc.sign_in_refused: $REFUSED"
check "six refusals audited" test "$REFUSED" -ge 6

say "provider stopped: a new sign-in is refused, the signed-in device keeps its access"
lab_kill "$IDP_PID"
lab_wait_for -t 10 bash -c "! kill -0 $IDP_PID 2>/dev/null"
OUT=$(login carol alice alice-pw)
echo "$OUT" | grep -i rror | head -n1 | sed 's/^/    /'
check "new sign-in refused while the provider is down" test "$(grep -c '^up:' <<<"$OUT")" = 0
sleep 7
check "alice still reaches db:5432 after two refresh intervals" sees 5432 open "$(now_ms)" 5

echo "  runtime: $(($(date +%s) - START)) s"
finish
