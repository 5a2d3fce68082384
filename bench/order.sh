#!/usr/bin/env bash
# The link order of the `ward` binary: which of its functions the daemon runs, for
# client/build.rs to place next to each other (client/build.rs says why).
#
#   sudo bench/order.sh            # regenerate client/link-order.txt (about 2 minutes once built)
#   bench/order.sh --check         # how much of client/link-order.txt this build still has
#   sudo bench/order.sh --smoke    # regenerate into a temporary file and check it (CI)
#
# Regenerating runs bench/throughput.sh for one short round of Ward alone (enrollment, a tunnel,
# TCP both ways, pings) and one 40-second cycle of its soak (UDP, the reverse direction, idle
# gaps), with both daemons under valgrind's callgrind, which records every
# function that runs, not a sample; the list is every such function of the `ward` binary, by its
# symbol name, the most called first (the code a running tunnel keeps using, which stays resident
# after the daemon lets go of its read-only pages), then by the instructions each ran itself. Symbol names carry hashes that depend on the features a build unifies,
# so this is done for both release builds the scripts make: with the examples (bench/smoke.sh,
# load.sh, ha_scale.sh) and without (scripts/test.sh, package.sh, demo.sh); the list holds both
# sets of names, and each build finds its own. `--smoke` does the first alone. Needs root, valgrind and what throughput.sh needs. Regenerate after
# changes to the daemon's code or to the crates' features or versions: names that a change
# renames are skipped at link time (never an error), so a stale list only packs less.
# `--check` prints the share still found (each build finds its own names, about half), with a
# warning under 30%.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
list="$repo/client/link-order.txt"
bin="$repo/target/release/ward"

MODE=write
SOAK_SECS=40
case "${1:-}" in
    "") ;;
    --check) MODE=check ;;
    --smoke) MODE=smoke ;;
    -h | --help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
esac

# Text symbols of a binary: "name size" a line.
text_symbols() {
    nm -S --defined-only "$1" | awk '$3 ~ /^[tTwW]$/ && NF == 4 { print $4, $2 }'
}

check() {
    local names="$1"
    [[ -x "$bin" ]] || { echo "order: $bin not built (cargo build --release --workspace --bins)" >&2; return 1; }
    python3 - "$names" <(text_symbols "$bin") <<'PY'
import sys
names = [l.strip() for l in open(sys.argv[1]) if l.strip()]
syms = {}
for line in open(sys.argv[2]):
    n, s = line.split()
    syms[n] = int(s, 16)
found = [n for n in names if n in syms]
share = len(found) / len(names) if names else 0.0
print(f"order: {len(found)} of {len(names)} listed functions in this build ({share:.0%}), "
      f"{sum(syms[n] for n in found) / 1048576:.2f} of {sum(syms.values()) / 1048576:.2f} MiB of code")
if share < 0.3:
    print("order: WARNING: the list is stale; regenerate it with `sudo bench/order.sh`")
PY
}

if [[ $MODE == check ]]; then
    check "$list"
    exit
fi

[[ $EUID -eq 0 ]] || { echo "order: needs root (network namespaces, TUN)" >&2; exit 1; }
command -v valgrind >/dev/null || { echo "order: needs valgrind (apt-get install valgrind)" >&2; exit 1; }
cd "$repo"

work=$(mktemp -d /tmp/ward-order.XXXXXX)
trap 'rm -rf "$work"' EXIT

# The functions the daemons of the current release build of ward run, into $work/ran.$1.
profile() {
    local n="$1" dir="$work/bin.$1"
    mkdir -p "$dir"
    cp target/release/ward "$dir/ward.real"
    cp target/release/ward-coordinator "$dir/ward-coordinator"
    # The daemons run under callgrind; every other `ward` command (up, status) runs as it is.
    cat >"$dir/ward" <<WRAP
#!/usr/bin/env bash
for a in "\$@"; do
    if [[ \$a == daemon ]]; then
        exec valgrind -q --tool=callgrind --demangle=no --compress-strings=no --compress-pos=no \\
            --dump-instr=no --callgrind-out-file="$dir/cg.%p.out" "$dir/ward.real" "\$@"
    fi
done
exec "$dir/ward.real" "\$@"
WRAP
    chmod +x "$dir/ward"
    WARD_BIN_DIR="$dir" bench/throughput.sh --only ward --rounds 1 --duration 2 \
        --out "$dir/throughput.json" >"$dir/throughput.log" 2>&1 || {
        cat "$dir/throughput.log" >&2
        return 1
    }
    grep -q "ward: tcp1" "$dir/throughput.log" || {
        cat "$dir/throughput.log" >&2
        echo "order: the tunnel under callgrind carried nothing" >&2
        return 1
    }
    # Then one cycle of the soak's mix (UDP, the reverse direction, idle gaps), whose code a
    # round does not all run.
    WARD_BIN_DIR="$dir" bench/throughput.sh --soak "$SOAK_SECS" --out "$dir/soak.json" \
        >"$dir/soak.log" 2>&1 || {
        cat "$dir/soak.log" >&2
        return 1
    }
    ls "$dir"/cg.*.out >/dev/null 2>&1 || { echo "order: callgrind wrote nothing" >&2; return 1; }
    python3 - "$work/ran.$n" <(text_symbols "$dir/ward.real") "$dir"/cg.*.out <<'PY'
import sys
out, syms_file, profiles = sys.argv[1], sys.argv[2], sys.argv[3:]
syms = {}
for line in open(syms_file):
    n, s = line.split()
    syms[n] = int(s, 16)
# Per function of the binary: how often it was called and its own instruction count
# (callgrind's "fn=" blocks: cost lines are the function's own, except the one after each
# "calls=" line, which is that call's inclusive cost).
calls, own = {}, {}
for p in profiles:
    fn = cfn = None
    after_call = False
    for line in open(p):
        if line.startswith("fn="):
            fn = line[3:].strip()
            after_call = False
        elif line.startswith("cfn="):
            cfn = line[4:].strip()
        elif line.startswith("calls="):
            if cfn in syms:
                calls[cfn] = calls.get(cfn, 0) + int(line[6:].split()[0])
            after_call = True
        elif line[:1].isdigit() or line[:1] in "+-*":
            if after_call:
                after_call = False
            elif fn in syms:
                parts = line.split()
                own[fn] = own.get(fn, 0) + (int(parts[1]) if len(parts) > 1 else 0)
ran = set(calls) | set(own)
if len(ran) < 500:
    sys.exit(f"order: only {len(ran)} functions recorded; something went wrong")
with open(out, "w") as f:
    f.write("".join(f"{calls.get(n, 0)} {own.get(n, 0)} {n}\n" for n in sorted(ran)))
print(f"order: {len(ran)} functions run, {sum(syms[n] for n in ran) / 1048576:.2f} of "
      f"{sum(syms.values()) / 1048576:.2f} MiB of code")
PY
}

builds=("--workspace --bins --example dp_pair --example netmap_bench --example load" "--workspace --bins")
[[ $MODE == smoke ]] && builds=("${builds[0]}") && SOAK_SECS=15
for i in "${!builds[@]}"; do
    echo "order: cargo build --locked --release ${builds[$i]}"
    # shellcheck disable=SC2086 # the build's arguments, split on purpose
    cargo build --locked --release ${builds[$i]}
    profile "$i"
done

out="$list"
[[ $MODE == smoke ]] && out="$work/link-order.txt"
# The most called first (what the daemon runs per packet and per batch), then the rest by their
# own instruction count: the code a running tunnel keeps using is packed at the front, start-up
# and enrollment behind it.
python3 - "$out" "$work"/ran.* <<'PY'
import sys
best = {}
for p in sys.argv[2:]:
    for line in open(p):
        c, i, n = line.split(maxsplit=2)
        n = n.strip()
        c0, i0 = best.get(n, (0, 0))
        best[n] = (max(c0, int(c)), max(i0, int(i)))
names = sorted(best, key=lambda n: (-best[n][0], -best[n][1], n))
with open(sys.argv[1], "w") as f:
    f.write("".join(n + "\n" for n in names))
PY
echo "order: $(wc -l <"$out") names written to $out"
check "$out"
[[ $MODE == smoke ]] && check "$list"
exit 0
