#!/usr/bin/env bash
# Browser sign-in end to end against a real provider (oidc-provider, tests/oidc): `ward up
# --login --no-browser` (authorization code + PKCE, the provider redirecting to the CLI's
# loopback listener inside the device's namespace), the provider's login and consent completed
# as a browser would (login.py code) and the redirect delivered to the listener.
# - a forged redirect (wrong state) ends the sign-in with one line; nothing is enrolled;
# - a denied consent is refused by the coordinator (audited); nothing is enrolled;
# - alice's sign-in enrolls the device for alice;
# - the console's "Sign in with <provider>": a member of the console administrators' group
#   (--console-admin-group) gets a session that opens /devices; the callback works once and only
#   in the browser that started it; a user outside the group is refused (audited);
#   console-link keeps working.
# Needs root; prints its runtime and `N passed, N failed`.
set -uo pipefail
source "$(dirname "$0")/common.sh"
need_root
lab_have_ward || { echo "build first: cargo build --release --workspace --bins"; exit 1; }
command -v node >/dev/null || { echo "SKIPPED: oidc_login.sh needs node (tests/oidc); it was NOT run"; exit 0; }
T0=$SECONDS

lab_init
lab_add_wan_host idp
lab_add_wan_host dev
# shellcheck source=../oidc/idp.sh
source "$(lab_repo_root)/tests/oidc/idp.sh"
idp_prepare idp '[{"sub": "u-alice", "username": "alice", "password": "alice-pw",
  "email": "alice@example.test", "groups": ["eng", "ward-admins"]},
 {"sub": "u-bob", "username": "bob", "password": "bob-pw", "email": "bob@example.test",
  "groups": ["eng"]}]' || { echo "the test provider could not be prepared (node, npm ci)"; exit 1; }
CONSOLE_PORT=8481
CONSOLE="http://127.0.0.1:$CONSOLE_PORT"
# RFC 8252 loopback redirects: the provider (a native client) accepts them on any port.
idp_start idp --redirect-uri http://127.0.0.1/callback --redirect-uri http://127.0.0.1/oidc/callback ||
    { echo "the test provider did not start"; exit 1; }

LAB_COORD_SERVE_ARGS="$(idp_rp_args) --console-listen 127.0.0.1:$CONSOLE_PORT --console-admin-group ward-admins" \
    lab_start_coordinator
CA_SHA=$(awk '/CA sha256/ {print $NF}' "$LAB_DIR/logs/coordinator-init.log")
COORD=$(lab_coord_addr)
lab_start_device dev

# start_login: `ward up --login --no-browser` in dev; sets LOG, URL (the authorization URL) and
# REDIRECT (the CLI's loopback redirect URI).
start_login() {
    LOG="up-$(date +%s%N).log"
    lab_spawn dev "$LOG" "$(lab_ward_bin ward)" --socket "$(lab_ward_socket dev)" up --login --no-browser \
        --coordinator "$COORD" --ca-sha256 "$CA_SHA" --hostname dev
    LOGIN_PID=$(lab_last_pid)
    LOG="$LAB_DIR/logs/$LOG"
    lab_wait_for -t 20 -i 0.2 grep -qE 'waiting up to|rror' "$LOG"
    URL=$(awk '/To sign in, open:/ {print $NF}' "$LOG")
    REDIRECT=$(awk '/waiting up to/ {print $NF}' "$LOG" | tr -d ')')
    [[ "$URL" == "$ISSUER"/* && "$REDIRECT" == http://127.0.0.1:*/callback ]]
}
# deliver URL: the browser's request to the CLI's loopback listener (inside dev); prints the status.
deliver() {
    lab_exec dev python3 -c '
import sys, urllib.request, urllib.error
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=10).status)
except urllib.error.HTTPError as e:
    print(e.code)' "$1"
}
# browse ARGS: login.py code on the authorization URL (inside dev); prints the redirect URL.
browse() {
    lab_exec dev python3 "$OIDC/login.py" code --url "$URL" --redirect-uri "$REDIRECT" \
        --ca-file "$IDP_CA" "$@"
}
ended() { ! kill -0 "$LOGIN_PID" 2>/dev/null; }
enrolled_as() {
    lab_coord device ls --json | python3 -c '
import json, sys
d = [d for d in json.load(sys.stdin) if d["hostname"] == "dev"]
sys.exit(0 if (d and d[0].get("user") == sys.argv[1]) or (not d and sys.argv[1] == "-") else 1)' "$1"
}

say "a forged redirect (wrong state) ends the sign-in"
check "the CLI prints the authorization URL and its loopback redirect" start_login
check "the URL asks for S256 PKCE, a state and a nonce" grep -q 'code_challenge_method=S256' <<<"$URL"
for p in code_challenge= state= nonce= redirect_uri=http%3A%2F%2F127.0.0.1; do
    [[ "$URL" == *"$p"* ]] || fail "the URL lacks $p"
done
STATUS=$(deliver "${REDIRECT}?code=forged-code&state=forged-state")
check "the listener answers 400" test "$STATUS" = 400
check "the CLI ends" lab_wait_for -t 10 -i 0.2 ended
check "with one line about the state" grep -q "state does not match this sign-in" "$LOG"
check "nothing is enrolled" enrolled_as -

say "a denied consent is refused"
check "sign-in starts again" start_login
FINAL=$(browse --user alice --password alice-pw --deny)
check "the provider redirects with access_denied" grep -q "error=access_denied" <<<"$FINAL"
STATUS=$(deliver "$FINAL")
check "the listener answers 200" test "$STATUS" = 200
check "the CLI ends" lab_wait_for -t 15 -i 0.2 ended
check "the coordinator refuses: the user refused" grep -q "refused the sign-in at the identity provider" "$LOG"
check "nothing is enrolled" enrolled_as -
audited() { grep -q "$1" <<<"$(lab_coord audit --json --limit 200 2>/dev/null)"; }
check "the refusal is audited" audited "refused the sign-in at the identity provider"

say "alice signs in in the browser"
T1=$(now_ms)
check "sign-in starts again" start_login
FINAL=$(browse --user alice --password alice-pw)
check "the provider redirects with a code and the state" grep -qE '[?&]code=.+&?state=|[?&]state=.+&code=' <<<"$FINAL"
STATUS=$(deliver "$FINAL")
check "the listener answers 200" test "$STATUS" = 200
check "ward up --login prints up:" lab_wait_for -t 30 -i 0.2 grep -q '^up:' "$LOG"
echo "  browser sign-in (start to up:): $(($(now_ms) - T1)) ms"
check "the device is enrolled for alice" enrolled_as alice
wait "$LOGIN_PID"
check "the CLI exits 0" test $? -eq 0

say "console sign-in with the provider"
CL=$(lab_exec wan python3 "$OIDC/console_login.py" --console "$CONSOLE" --user alice --password alice-pw \
    --ca-file "$IDP_CA")
echo "  alice: $CL"
jget() { python3 -c 'import json,sys; print(json.loads(sys.argv[1]).get(sys.argv[2]))' "$1" "$2"; }
check "alice (ward-admins) gets a session" test "$(jget "$CL" session)" = True
check "her session opens /devices" test "$(jget "$CL" devices)" = 200
check "the same callback again is refused" test "$(jget "$CL" replay)" = 400
check "the callback in another browser is refused" test "$(jget "$CL" foreign)" = 400
CL=$(lab_exec wan python3 "$OIDC/console_login.py" --console "$CONSOLE" --user bob --password bob-pw \
    --ca-file "$IDP_CA")
echo "  bob: $CL"
check "bob (not in ward-admins) gets no session" test "$(jget "$CL" session)" = False
check "bob is refused with 403" test "$(jget "$CL" callback)" = 403
check "and told why" grep -q "not in the console administrators" <<<"$CL"
AUDIT=$(lab_coord audit --json --limit 200 2>/dev/null)
check "alice's console sign-in is audited (method oidc)" grep -q '"method":"oidc"' <<<"$(tr -d ' ' <<<"$AUDIT")"
check "bob's refusal is audited" grep -q "not in the console administrators" <<<"$AUDIT"
LINK=$(lab_coord console-link 2>/dev/null | grep -o 'http://[^ ]*' | head -n1)
STATUS=$(lab_exec wan python3 -c '
import sys, urllib.request, urllib.error
class N(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *a): return None
try:
    print(urllib.request.build_opener(N()).open(sys.argv[1], timeout=10).status)
except urllib.error.HTTPError as e:
    print(e.code)' "$LINK")
check "console-link still signs in (303)" test "$STATUS" = 303

echo "oidc_login.sh runtime: $((SECONDS - T0)) s"
finish
