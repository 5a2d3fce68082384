# shellcheck shell=bash
# Shared by the end-to-end scripts: pass/fail bookkeeping on top of tests/lab/lab.sh.
E2E_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../lab/lab.sh
source "$E2E_DIR/../lab/lab.sh"
E2E_PASS=0
E2E_FAIL=0
E2E_FAILED=()

say() { printf '\n== %s\n' "$*"; }
pass() { E2E_PASS=$((E2E_PASS + 1)); printf '  PASS %s\n' "$*"; }
fail() { E2E_FAIL=$((E2E_FAIL + 1)); E2E_FAILED+=("$*"); printf '  FAIL %s\n' "$*"; }
check() { local what="$1"; shift; if "$@"; then pass "$what"; else fail "$what"; fi; }

# finish: print the summary line and exit non-zero on any failure.
finish() {
    if ((E2E_FAIL > 0)); then
        printf 'failed: %s\n' "${E2E_FAILED[@]}"
        # The last lines of every log, each one whole: a failure names its device's history.
        lab_dump_logs 30 2>/dev/null || true
    fi
    echo "$E2E_PASS passed, $E2E_FAIL failed"
    ((E2E_FAIL == 0))
}

need_root() {
    if [[ $EUID -ne 0 ]]; then
        echo "SKIPPED: $(basename "$0") needs root (network namespaces, TUN); it was NOT run"
        exit 0
    fi
}

now_ms() { date +%s%3N; }
