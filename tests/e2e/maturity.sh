#!/usr/bin/env bash
# Zero trust maturity, end to end: two deployments in one lab, each a coordinator with a user's
# device and a server. The permissive one (one rule opening every port, no posture, no tests,
# no automatic reactions, 1 h leases, reusable week-long enrollment tokens) and the tight one
# (one port, posture on every rule, an expiring rule, tests, automatic quarantine and scan
# detection, 2 min leases, single-use 10 min tokens) carry the same workload. `maturity --json`
# scores the tight one strictly higher in every pillar, with the evidence behind it; applying
# the changes `policy suggest --write` proposes from the permissive one's flows (the every-port
# service narrowed to the port in use, suggestions accepted) raises its score, applying
# tests/e2e/policies/maturity-tight.toml raises it again, and `maturity history --json` records
# each rise (hash chain verified); an edited history row makes
# `maturity history` fail. Needs root; prints
# `N passed, N failed`.
set -uo pipefail
source "$(dirname "$0")/common.sh"
need_root
lab_have_ward || { echo "build first: cargo build --release --workspace --bins"; exit 1; }
POLICIES="$E2E_DIR/policies"
TOOLS="$E2E_DIR/tools.py"
WIN="WARD_FLOW_WINDOW=5s"

lab_init
trap 'lab_cleanup' EXIT
lab_add_wan_host pdb
lab_add_natted_host palice
lab_add_wan_host tdb
lab_add_natted_host talice

# Deployment P (permissive): the lab's coordinator. Deployment T (tight): a second one in the
# same namespace, its own data dir and port.
LAB_COORD_SERVE_ARGS="--lease-ttl 1h --lease-max-ttl 1h" lab_start_coordinator
T_DIR="$LAB_DIR/coordinator-tight"
CBIN=$(lab_ward_bin ward-coordinator)
pc() { lab_coord "$@"; }
tc() { lab_exec "$(cat "$LAB_DIR/coord_host")" "$CBIN" --data-dir "$T_DIR" "$@"; }
lab_exec wan "$CBIN" init --data-dir "$T_DIR" --public-addr "$(lab_hostport "$(lab_public_ip wan)" 7444)" \
    >>"$LAB_DIR/logs/coordinator-tight-init.log" 2>&1
lab_spawn wan coordinator-tight.log "$CBIN" serve --data-dir "$T_DIR" --lease-ttl 2m --lease-max-ttl 5m
check "the tight deployment's coordinator answers" lab_wait_for tc device ls --json

for h in pdb palice tdb talice; do LAB_WARD_WRAPPER="env $WIN" lab_start_device "$h"; done
pc user add alice >/dev/null 2>&1
tc user add alice >/dev/null 2>&1
lab_device_up pdb "$(pc token create --tag db --ttl 7d --uses 3)" db >/dev/null
lab_device_up palice "$(pc token create --user alice --ttl 7d --uses 3)" alice >/dev/null
lab_device_up tdb "$(tc token create --tag db --hostname db --ttl 10m)" db >/dev/null
lab_device_up talice "$(tc token create --user alice --ttl 10m)" alice >/dev/null
check "permissive policy applies" pc policy apply "$POLICIES/maturity-permissive.toml"
check "tight policy applies" tc policy apply "$POLICIES/maturity-tight.toml"

say "workload: alice connects to db:5432 in both deployments"
lab_spawn pdb serve.log python3 "$TOOLS" serve 5432
lab_spawn tdb serve.log python3 "$TOOLS" serve 5432
P_DB=$(lab_ward_ipv4 pdb)
T_DB=$(lab_ward_ipv4 tdb)
reach() { lab_exec "$1" python3 "$TOOLS" await "$2" 5432 open "$(now_ms)" 2 >/dev/null; }
check "permissive: alice -> db:5432 opens" lab_wait_for -t 30 reach palice "$P_DB"
check "tight: alice -> db:5432 opens" lab_wait_for -t 30 reach talice "$T_DB"
for _ in 1 2 3; do reach palice "$P_DB"; reach talice "$T_DB"; done

# m.py CMD ARGS: reads maturity JSON files; see each command.
M="$LAB_DIR/m.py"
cat >"$M" <<'PY'
import json, sys
cmd = sys.argv[1]
def load(f):
    with open(f) as fh:
        return json.load(fh)
def stages(v):
    return {p["pillar"]: p["stage"] for p in v["assessment"]["pillars"]}
ORDER = ["traditional", "initial", "advanced", "optimal"]
if cmd == "ready":  # ready FILE: both devices report flows, at least one flow both ends confirmed
    e = load(sys.argv[2])["evidence"]
    assert e["devices_reporting_flows"] == 2 and e["flows_confirmed"] >= 1, e
elif cmd == "table":  # table P T: stage per pillar side by side
    p, t = stages(load(sys.argv[2])), stages(load(sys.argv[3]))
    for k in p:
        print(f"    {k:<26} permissive {p[k]:<12} tight {t[k]}")
elif cmd == "higher":  # higher LOW HIGH: HIGH is strictly higher in every pillar
    lo, hi = stages(load(sys.argv[2])), stages(load(sys.argv[3]))
    assert len(lo) == 6 and lo.keys() == hi.keys(), (lo, hi)
    bad = [k for k in lo if ORDER.index(hi[k]) <= ORDER.index(lo[k])]
    assert not bad, bad
elif cmd == "rose":  # rose BEFORE AFTER: none lower, at least one higher
    b, a = stages(load(sys.argv[2])), stages(load(sys.argv[3]))
    assert all(ORDER.index(a[k]) >= ORDER.index(b[k]) for k in b), (b, a)
    assert any(ORDER.index(a[k]) > ORDER.index(b[k]) for k in b), (b, a)
elif cmd == "ev":  # ev FILE EXPR: EXPR over e (evidence) and f(pillar, function) must be true
    v = load(sys.argv[2])
    e = v["evidence"]
    def f(pillar, fn):
        p = next(p for p in v["assessment"]["pillars"] if p["pillar"] == pillar)
        return next(x for x in p["functions"] if x["function"] == fn)
    def pred(pillar, fn, name):
        return [x for x in f(pillar, fn)["predicates"] if x["name"] == name]
    assert eval(sys.argv[3], {"v": v, "e": e, "f": f, "pred": pred}), sys.argv[3]
elif cmd == "history-rose":  # history-rose FILE: verified; last entry vs the one before
    h = load(sys.argv[2])
    assert h["verified"] is True, h
    en = h["entries"]
    assert len(en) >= 2, en
    b, a = en[-2]["stages"], en[-1]["stages"]
    assert a.keys() == b.keys() and len(a) == 6, (b, a)
    assert all(ORDER.index(a[k]) >= ORDER.index(b[k]) for k in b), (b, a)
    assert any(ORDER.index(a[k]) > ORDER.index(b[k]) for k in b), (b, a)
    assert en[-1]["trigger"].startswith("policy.apply v"), en[-1]
    assert en[-1]["changes"], en[-1]
    for x in en:
        print(f"    #{x['seq']} {x['trigger']:<18} " + " ".join(f"{k}={v}" for k, v in x["stages"].items()))
    print("    changes: " + "; ".join(en[-1]["changes"]))
PY
pj() { pc maturity --json >"$LAB_DIR/p.json" 2>>"$LAB_DIR/logs/maturity-cli.log"; }
tj() { tc maturity --json >"$LAB_DIR/t.json" 2>>"$LAB_DIR/logs/maturity-cli.log"; }
p_ready() { pj && python3 "$M" ready "$LAB_DIR/p.json"; }
t_ready() { tj && python3 "$M" ready "$LAB_DIR/t.json"; }
# Alice's posture under the tight policy: every live device compliant and reported.
t_settled() { t_ready && python3 "$M" ev "$LAB_DIR/t.json" 'e["devices_compliant"] == 2 and e["posture_reports_missing"] == 0'; }
check "permissive: both ends' flow reports arrive" lab_wait_for -t 60 -i 1 p_ready
check "tight: both ends' flow reports arrive and alice is compliant" lab_wait_for -t 60 -i 1 t_settled

say "maturity --json: the tight deployment scores higher in every pillar"
python3 "$M" table "$LAB_DIR/p.json" "$LAB_DIR/t.json"
check "tight is strictly higher than permissive in all six pillars" python3 "$M" higher "$LAB_DIR/p.json" "$LAB_DIR/t.json"
ev() { python3 "$M" ev "$@"; }
check "permissive evidence: 0 of 1 rules port-scoped, none gated, no tests" \
    ev "$LAB_DIR/p.json" 'e["rules"] == 1 and e["rules_port_scoped"] == 0 and e["rules_posture_gated"] == 0 and e["tests"] == 0'
check "permissive evidence: reusable week-long tokens, 1 h leases" \
    ev "$LAB_DIR/p.json" 'e["tokens_reusable"] == 2 and e["token_lifetime_max_ms"] == 7*86400000 and e["lease_ttl_max_ms"] == 3600000'
check "permissive: segmentation fails rules_port_scoped at advanced, evidence listed" \
    ev "$LAB_DIR/p.json" 'f("networks","segmentation")["stage"] == "initial" and any(not x["pass"] and x["value"].startswith("0 of 1") for x in pred("networks","segmentation","rules_port_scoped"))'
check "tight evidence: the rule is port-scoped, gated, time-bound and tested" \
    ev "$LAB_DIR/t.json" 'e["rules"] == 1 and e["rules_port_scoped"] == 1 and e["rules_posture_gated"] == 1 and e["rules_time_bound"] == 1 and e["rules_tested"] == 1 and e["tests"] == 2 and e["tests_failing"] == 0'
check "tight evidence: single-use 10 min tokens, 2 min leases, automatic reactions on" \
    ev "$LAB_DIR/t.json" 'e["tokens_reusable"] == 0 and e["token_lifetime_max_ms"] == 600000 and 0 < e["lease_ttl_max_ms"] <= 120000 and e["auto_quarantine_on_failure"] and e["scan_detection"] and e["risky_lease_ttl"]'
check "tight evidence: allowed flows go through the expiring rule, confirmed by both ends" \
    ev "$LAB_DIR/t.json" 'e["allowed_flows"] >= 1 and e["allowed_flows_expiring"] == e["allowed_flows"] and e["flows_confirmed"] >= 1'
ALL_PREDS='[x for p in v["assessment"]["pillars"] for fn in p["functions"] for x in fn["predicates"]]'
for d in p t; do
    check "$d: audit chain verified; every predicate lists its value, threshold and stage" \
        ev "$LAB_DIR/$d.json" "e['audit_verified'] and len($ALL_PREDS) >= 30 and all(x['value'] and x['threshold'] and x['stage'] for x in $ALL_PREDS)"
done
check "without --explain no next steps; data and applications listed out of scope" \
    ev "$LAB_DIR/p.json" 'all(fn["next_step"] is None for p in v["assessment"]["pillars"] for fn in p["functions"]) and {"data", "applications_workloads"} <= {o["pillar"] for o in v["assessment"]["out_of_scope"]}'
EXPLAIN=$(pc maturity --explain)
check "maturity --explain names the step: scope the rule to ports" grep -q "next: 1 of 1 rules allow whole hosts or wide port ranges: scope them to ports" <<<"$EXPLAIN"
check "maturity lists out-of-scope functions (data, applications)" grep -q "data / \*" <<<"$EXPLAIN"

say "applying the suggested changes to the permissive deployment raises its score"
cp "$LAB_DIR/p.json" "$LAB_DIR/p-before.json"
pc policy suggest --since 1h --min-days 1 --json >"$LAB_DIR/sug.json"
pc policy suggest --since 1h --min-days 1 | sed 's/^/    /'
sug() { python3 -c 'import json, sys; v = json.load(open(sys.argv[1])); print(eval(sys.argv[2], {"v": v, "S": [s["suggestion"] for s in v["suggestions"]]}))' "$LAB_DIR/sug.json" "$1"; }
check "policy suggest narrows the every-port service to alice's tcp/5432" \
    test "$(sug '[(s["change"]["service"], s["change"]["ports"]) for s in S if s["kind"] == "narrow" and s["change"]["change"] == "narrow_ports"]')" = "[('all', [{'proto': 'tcp', 'port': 5432}])]"
pc policy suggest --since 1h --min-days 1 --write "$LAB_DIR/suggested.toml" >/dev/null
check "policy check accepts the written candidate" pc policy check "$LAB_DIR/suggested.toml"
for id in $(sug '" ".join(s["id"] for s in S if s["confidence"] != "low" and s["kind"] != "investigate")'); do
    check "suggestion $id accepted" pc policy suggestions accept "$id" --since 1h --min-days 1
done
check "the suggested policy applies to the permissive deployment" pc policy apply "$LAB_DIR/suggested.toml"
for _ in 1 2 3; do reach palice "$P_DB"; done
p_suggested() { pj && python3 "$M" ev "$LAB_DIR/p.json" 'e["rules_port_scoped"] == e["rules"] and e["accepted_suggestions"] >= 1'; }
check "the evidence follows: every rule port-scoped, the accepted suggestions counted" lab_wait_for -t 30 -i 1 p_suggested
python3 "$M" table "$LAB_DIR/p-before.json" "$LAB_DIR/p.json" | sed 's/permissive/before/; s/tight/after/'
check "its live score rose: none lower, at least one pillar higher" python3 "$M" rose "$LAB_DIR/p-before.json" "$LAB_DIR/p.json"
pc maturity history --json >"$LAB_DIR/hist.json"
check "maturity history --json: verified, the suggested policy's entry higher than the one before" python3 "$M" history-rose "$LAB_DIR/hist.json"

say "tightening it further (posture, expiry, tests, automatic reactions) raises it again"
cp "$LAB_DIR/p.json" "$LAB_DIR/p-before.json"
check "the tightened policy applies to the permissive deployment" pc policy apply "$POLICIES/maturity-tight.toml"
for _ in 1 2 3; do reach palice "$P_DB"; done
p_tight() { pj && python3 "$M" ev "$LAB_DIR/p.json" 'e["rules_port_scoped"] == 1 and e["devices_compliant"] == 2'; }
check "permissive deployment's evidence follows the new policy" lab_wait_for -t 30 -i 1 p_tight
python3 "$M" table "$LAB_DIR/p-before.json" "$LAB_DIR/p.json" | sed 's/permissive/before/; s/tight/after/'
check "its live score rose: none lower, at least one pillar higher" python3 "$M" rose "$LAB_DIR/p-before.json" "$LAB_DIR/p.json"
pc maturity history --json >"$LAB_DIR/hist.json"
check "maturity history --json: verified, the apply's entry higher than the one before" python3 "$M" history-rose "$LAB_DIR/hist.json"
check "maturity history (text) says the chain verified" grep -q "hash chain verified" <<<"$(pc maturity history)"

say "an edited history row breaks the chain: maturity history refuses"
python3 -c 'import sqlite3, sys; c = sqlite3.connect(sys.argv[1], timeout=10); c.execute("UPDATE maturity SET trigger = ? WHERE seq = 2", ("edited",)); c.commit()' \
    "$LAB_DIR/coordinator/ward.db"
broken() { ! pc maturity history --json >/dev/null 2>"$LAB_DIR/broken.err" && grep -q "hash chain is broken at row 2" "$LAB_DIR/broken.err"; }
check "maturity history fails, naming row 2" broken

finish
