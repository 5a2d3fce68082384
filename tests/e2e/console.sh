#!/usr/bin/env bash
# The admin web console, end to end, in a real headless browser (Chromium driven by Selenium):
# `console-link` prints a one-time URL that signs in; the devices page shows the lab's devices
# with their states; the quarantine button cuts the device's access in the lab (ping to its
# peer fails) and the release button on the quarantine page restores it; the flow graph and
# the maturity chart render as SVG; the policy diff, grants and the audit page (chain verified,
# sign-in and quarantine audited) show; requests without a session, with a wrong CSRF token,
# from another origin or oversized are refused; a reused link is refused. Screenshots go to
# target/test-artifacts/console/. Needs root, chromium, chromium-driver and python3-selenium;
# prints `N passed, N failed`.
set -uo pipefail
source "$(dirname "$0")/common.sh"
need_root
lab_have_ward || { echo "build first: cargo build --release --workspace --bins"; exit 1; }
for t in /usr/bin/chromium /usr/bin/chromedriver; do
    [[ -x "$t" ]] || { echo "FAILED: $t missing (apt-get install chromium chromium-driver python3-selenium)"; exit 1; }
done
/usr/bin/python3 -c 'import selenium' 2>/dev/null ||
    { echo "FAILED: python3-selenium missing (apt-get install python3-selenium)"; exit 1; }
T0=$SECONDS
ART="$(lab_repo_root)/target/test-artifacts/console"
rm -rf "$ART" && mkdir -p "$ART"

lab_init
lab_add_wan_host db
lab_add_wan_host alice
CONSOLE=127.0.0.1:9580
LAB_COORD_SERVE_ARGS="--console-listen $CONSOLE" lab_start_coordinator
# Short flow windows, so the graph has records within seconds.
export LAB_WARD_WRAPPER="env WARD_FLOW_WINDOW=5s"
lab_start_device db
lab_start_device alice
unset LAB_WARD_WRAPPER
lab_coord user add alice >/dev/null 2>&1
lab_device_up db "$(lab_token --tag db --hostname db)" >/dev/null
lab_device_up alice "$(lab_token --user alice)" >/dev/null

say "policy (two versions), a grant, traffic allowed and denied"
cat >"$LAB_DIR/v1.toml" <<'TOML'
[services.db]
devices = ["tag:db"]
ports = ["icmp"]
[[rules]]
name = "alice-db"
from = ["alice"]
to = ["db"]
TOML
sed 's|ports = \["icmp"\]|ports = ["icmp", "tcp/5432"]|' "$LAB_DIR/v1.toml" >"$LAB_DIR/v2.toml"
check "policy v1 applied" lab_coord policy apply "$LAB_DIR/v1.toml"
check "policy v2 applied" lab_coord policy apply "$LAB_DIR/v2.toml"
check "grant added" lab_coord grant add --from alice --to db --for 1h --reason "console e2e"
DB4=$(lab_ward_ipv4 db)
lab_ward_wait_peer alice "$DB4"
check "alice pings db" lab_wait_for -t 15 lab_exec alice ping -c1 -W1 "$DB4"
lab_exec alice nc -z -w1 "$DB4" 22 >/dev/null 2>&1
has_denied() {
    lab_coord flows --denied --since 1h --json |
        /usr/bin/python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin)["flows"] else 1)'
}
check "a denied flow is recorded" lab_wait_for -t 30 has_denied

# Names are DNS labels, so markup never becomes a device name (the pages escape every value
# anyway: the console's unit tests render `<script>` in each field and check it is inert).
if lab_coord token create --tag db --hostname '<script>alert(1)</script>' >/dev/null 2>&1; then
    fail "a <script> hostname is refused"
else
    pass "a <script> hostname is refused"
fi

say "console-link"
LINK=$(lab_coord console-link 2>/dev/null)
check "console-link prints a login URL ($(cut -d= -f1 <<<"$LINK")=…)" grep -Eq "^http://$CONSOLE/login\?secret=[0-9a-f]{64}$" <<<"$LINK"
if lab_exec db "$(lab_ward_bin ward-coordinator)" --data-dir "$LAB_DIR/nowhere" console-link >/dev/null 2>&1; then
    fail "console-link without a coordinator fails"
else
    pass "console-link without a coordinator fails"
fi

say "the browser"
ALICE_NS=$(lab_ns alice)
OUT="$LAB_DIR/driver.out"
lab_exec wan env HOME="$LAB_DIR" CONSOLE_SUBJECT=alice CONSOLE_PEER=db \
    CONSOLE_REACH="ip netns exec $ALICE_NS ping -c1 -W1 $DB4" \
    timeout 100 /usr/bin/python3 "$E2E_DIR/console_driver.py" "$LINK" "$ART" >"$OUT" 2>&1
rc=$?
while IFS= read -r l; do
    case "$l" in
        "PASS "*) pass "${l#PASS }" ;;
        "FAIL "*) fail "${l#FAIL }" ;;
        "screenshot "*) echo "  ${l}" ;;
    esac
done <"$OUT"
if ((rc != 0)) && ! grep -q '^FAIL ' "$OUT"; then
    fail "browser driver crashed (rc $rc)"
    tail -n 30 "$OUT"
fi

say "audit"
AUDIT=$(lab_coord audit --json --limit 200)
for a in console.link console.login console.login_refused device.quarantine device.release; do
    check "audit has $a" grep -q "\"$a\"" <<<"$AUDIT"
done
check "audit chain verifies" lab_coord audit verify
echo "  screenshots: $ART"
echo "  runtime: $((SECONDS - T0)) s"
finish
