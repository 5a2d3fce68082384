#!/usr/bin/env bash
# Debian packages and set-up, end to end. scripts/install-deps.sh --check reports a package the
# machine does not have as missing and an installed one as present, and with nothing missing
# never runs apt (no root needed for this part). Then, as root: scripts/package.sh builds
# ward, ward-coordinator and ward-relay from the release binaries; their metadata, contents,
# conffiles and maintainer scripts are checked, and the units' hardening and (with
# systemd-analyze) their syntax; the completions load in bash and the man pages render. The
# packages are unpacked into clean roots (one for the server, one per device) and every unit's
# own ExecStart line runs, with its /etc/default file applied, in lab namespaces: the
# coordinator (after the admin's `init`), the relay (credential as systemd passes it), two
# devices enrolled with the packaged `ward` CLI; they ping each other across the overlay.
# Prints `N passed, N failed`.
set -uo pipefail
source "$(dirname "$0")/common.sh"
REPO="$(lab_repo_root)"
T0=$(now_ms)

say "install-deps.sh: what is missing"
DEPS_TMP=$(mktemp -d)
FAKE="ward-test-no-such-package-$$"
printf '# a comment\ndpkg\n%s   # trailing comment\n\nbash\n' "$FAKE" >"$DEPS_TMP/list"
printf 'dpkg bash\n' >"$DEPS_TMP/present"
out=$("$REPO/scripts/install-deps.sh" --check --list "$DEPS_TMP/list"); rc=$?
check "--check lists the package the machine lacks, and only it" test "$out" = "$FAKE"
check "--check exits 1 when something is missing" test "$rc" = 1
out=$("$REPO/scripts/install-deps.sh" --check --list "$DEPS_TMP/present"); rc=$?
check "--check prints nothing and exits 0 when all are installed" test "$rc/$out" = "0/"
# With nothing missing, apt is never run: an apt-get first on PATH that fails proves it.
mkdir -p "$DEPS_TMP/bin"
printf '#!/bin/sh\necho called >%s/apt-called\nexit 1\n' "$DEPS_TMP" >"$DEPS_TMP/bin/apt-get"
cp "$DEPS_TMP/bin/apt-get" "$DEPS_TMP/bin/apt"
chmod +x "$DEPS_TMP/bin/apt-get" "$DEPS_TMP/bin/apt"
PATH="$DEPS_TMP/bin:$PATH" "$REPO/scripts/install-deps.sh" --list "$DEPS_TMP/present" >/dev/null; rc=$?
check "install with nothing missing succeeds without running apt" test "$rc" = 0 -a ! -e "$DEPS_TMP/apt-called"
if [[ $EUID -ne 0 ]]; then
    PATH="$DEPS_TMP/bin:$PATH" "$REPO/scripts/install-deps.sh" --list "$DEPS_TMP/list" >/dev/null 2>"$DEPS_TMP/err"; rc=$?
    check "without root, a missing package is an error naming it (apt not run)" \
        test "$rc" = 1 -a ! -e "$DEPS_TMP/apt-called" -a -n "$(grep -F "$FAKE" "$DEPS_TMP/err")"
fi
printf 'iproute2\nBad_Name\n' >"$DEPS_TMP/bad"
"$REPO/scripts/install-deps.sh" --check --list "$DEPS_TMP/bad" >/dev/null 2>&1; rc=$?
check "a malformed name in the list is refused (exit 2)" test "$rc" = 2
names=$("$REPO/scripts/install-deps.sh" --names)
has_lines() { local text="$1" l; shift; for l in "$@"; do grep -qxF -- "$l" <<<"$text" || return 1; done; }
has_words() { local text="$1" w; shift; for w in "$@"; do grep -q -- "$w" <<<"$text" || return 1; done; }
check "the project's list names iproute2 and iperf3" has_lines "$names" iproute2 iperf3
rm -rf "$DEPS_TMP"

if [[ $EUID -ne 0 ]]; then
    echo "SKIPPED: the package build and the units in namespaces need root; they were NOT run"
    finish
    exit
fi
for b in ward ward-coordinator ward-relay; do
    [[ -x "$(lab_ward_bin "$b")" ]] || { echo "build first: cargo build --release --workspace --bins"; exit 1; }
done

lab_init
say "scripts/package.sh builds three packages"
T1=$(now_ms)
mapfile -t DEBS < <("$REPO/scripts/package.sh" --fast --bin-dir "$(dirname "$(lab_ward_bin ward)")" --out "$LAB_DIR/debs")
echo "  built in $(($(now_ms) - T1)) ms: $(cd "$LAB_DIR/debs" && ls)"
check "three .deb files" test "${#DEBS[@]}" = 3
deb_of() { printf '%s\n' "${DEBS[@]}" | grep "/${1}_[^/]*\.deb$"; }
VERSION=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$REPO/Cargo.toml")

for p in ward ward-coordinator ward-relay; do
    say "$p: metadata and contents"
    deb=$(deb_of "$p")
    check "$p: a .deb exists" test -f "$deb"
    field() { dpkg-deb -f "$deb" "$1"; }
    check "$p: Package and Version ($VERSION)" test "$(field Package)/$(field Version)" = "$p/$VERSION"
    check "$p: Architecture is this machine's" test "$(field Architecture)" = "$(dpkg --print-architecture)"
    deps=$(field Depends)
    check "$p: Depends names libc6 with a version and adduser ($deps)" has_words "$deps" 'libc6 (>= 2\.[0-9]*)' adduser
    [[ $p == ward ]] && check "ward: Depends on iproute2 (the TUN is set up with ip)" grep -q iproute2 <<<"$deps"
    dpkg-deb -c "$deb" | awk '{print $NF}' >"$LAB_DIR/$p.files"
    for f in "./usr/bin/$p" "./lib/systemd/system/$p.service" "./etc/default/$p" \
        "./usr/share/bash-completion/completions/$p" "./usr/share/zsh/vendor-completions/_$p" \
        "./usr/share/fish/vendor_completions.d/$p.fish" "./usr/share/man/man1/$p.1.gz" \
        "./usr/share/doc/$p/copyright"; do
        check "$p: ships $f" grep -qxF "$f" "$LAB_DIR/$p.files"
    done
    check "$p: every file is root-owned" test -z "$(dpkg-deb -c "$deb" | awk '$2 != "root/root"')"
    mkdir -p "$LAB_DIR/ctl-$p"
    dpkg-deb -e "$deb" "$LAB_DIR/ctl-$p"
    check "$p: /etc/default/$p is a conffile" grep -qxF "/etc/default/$p" "$LAB_DIR/ctl-$p/conffiles"
    for s in postinst prerm postrm; do
        check "$p: $s is valid sh" sh -n "$LAB_DIR/ctl-$p/$s"
    done
    check "$p: md5sums cover the binary" grep -q " usr/bin/$p\$" "$LAB_DIR/ctl-$p/md5sums"
done
check "ward postinst creates the group ward" grep -q '^ *addgroup --system ward$' "$LAB_DIR/ctl-ward/postinst"
check "ward-coordinator postinst creates its system user" grep -q 'adduser --system --group' "$LAB_DIR/ctl-ward-coordinator/postinst"
check "ward-relay postinst creates its system user" grep -q 'adduser --system --group' "$LAB_DIR/ctl-ward-relay/postinst"
check "ward-coordinator postinst never runs init (the admin does)" \
    test -z "$(grep -v '^ *#' "$LAB_DIR/ctl-ward-coordinator/postinst" | grep -E 'ward-coordinator +init')"

# Clean roots: the server (coordinator and relay), and one per device.
SRV="$LAB_DIR/root-server"
for r in "$SRV" "$LAB_DIR/root-a" "$LAB_DIR/root-b"; do mkdir -p "$r"; done
dpkg-deb -x "$(deb_of ward-coordinator)" "$SRV"
dpkg-deb -x "$(deb_of ward-relay)" "$SRV"
dpkg-deb -x "$(deb_of ward)" "$LAB_DIR/root-a"
dpkg-deb -x "$(deb_of ward)" "$LAB_DIR/root-b"
unit() { case "$1" in ward) echo "$LAB_DIR/root-a/lib/systemd/system/ward.service" ;; *) echo "$SRV/lib/systemd/system/$1.service" ;; esac; }
directive() { sed -n "s/^$2=//p" "$(unit "$1")"; }

say "units: hardening"
for p in ward ward-coordinator ward-relay; do
    for d in ProtectSystem=strict ProtectHome=yes PrivateTmp=yes NoNewPrivileges=yes \
        SystemCallFilter=@system-service "ExecStart=/usr/bin/$p " "EnvironmentFile=-/etc/default/$p"; do
        check "$p.service: $d" grep -q "^$d" "$(unit "$p")"
    done
    check "$p.service: RestrictAddressFamilies set" test -n "$(directive "$p" RestrictAddressFamilies)"
done
check "ward.service: CAP_NET_ADMIN only" test "$(directive ward CapabilityBoundingSet)/$(directive ward AmbientCapabilities)" = "CAP_NET_ADMIN/CAP_NET_ADMIN"
check "ward.service: /dev/net/tun only" test "$(directive ward DevicePolicy)/$(directive ward DeviceAllow)" = "closed//dev/net/tun rw"
check "ward.service: group ward (the socket's group)" test "$(directive ward Group)" = ward
for p in ward-coordinator ward-relay; do
    check "$p.service: no capabilities" test "$(directive "$p" CapabilityBoundingSet)/$(directive "$p" AmbientCapabilities)" = /
    check "$p.service: runs as its system user" test "$(directive "$p" User)" = "$p"
done

if command -v systemd-analyze >/dev/null; then
    say "units: systemd-analyze verify"
    VR="$LAB_DIR/verify-root"
    mkdir -p "$VR/usr/bin" "$VR/lib/systemd"
    cp -r /lib/systemd/system "$VR/lib/systemd/" # the targets the units name
    cp "$SRV"/usr/bin/* "$LAB_DIR/root-a/usr/bin/ward" "$VR/usr/bin/"
    for p in ward ward-coordinator ward-relay; do
        cp "$(unit "$p")" "$VR/lib/systemd/system/"
        out=$(systemd-analyze verify --man=no --root="$VR" "$VR/lib/systemd/system/$p.service" 2>&1); rc=$?
        check "$p.service: verify is clean${out:+ ($out)}" test "$rc/$out" = "0/"
    done
    # The check can fail: a unit with a bad value is reported.
    sed 's/^ProtectSystem=strict/ProtectSystem=very/' "$(unit ward)" >"$VR/lib/systemd/system/ward-broken.service"
    out=$(systemd-analyze verify --man=no --root="$VR" "$VR/lib/systemd/system/ward-broken.service" 2>&1)
    check "a unit with a bad value is reported by verify" grep -q "ward-broken.service:[0-9]*: Failed to parse" <<<"$out"
else
    echo "  systemd-analyze is not installed: the units' syntax was NOT verified"
fi

say "completions and man pages"
for p in ward ward-coordinator ward-relay; do
    comp="$SRV/usr/share/bash-completion/completions/$p"
    [[ $p == ward ]] && comp="$LAB_DIR/root-a/usr/share/bash-completion/completions/ward"
    out=$(bash -c "source '$comp' && complete -p $p" 2>&1)
    # clap_complete names the function after the program, `-` spelled `__`.
    check "$p: bash completion registers ($out)" grep -q -- "-F _${p//-/__} $p\$" <<<"$out"
done
# Completing `ward st` offers `status`; `ward-coordinator device ` offers `ls`.
out=$(bash -c "source '$LAB_DIR/root-a/usr/share/bash-completion/completions/ward'
COMP_WORDS=(ward st); COMP_CWORD=1; COMP_LINE='ward st'; COMP_POINT=7; _ward ward st ward; echo \"\${COMPREPLY[*]}\"" 2>&1)
check "bash completes 'ward st' to status ($out)" grep -qw status <<<"$out"
out=$(bash -c "source '$SRV/usr/share/bash-completion/completions/ward-coordinator'
COMP_WORDS=(ward-coordinator device ''); COMP_CWORD=2; COMP_LINE='ward-coordinator device '; COMP_POINT=24; _ward__coordinator ward-coordinator '' device; echo \"\${COMPREPLY[*]}\"" 2>&1)
check "bash completes 'ward-coordinator device ' with ls and revoke ($out)" has_words "$out" '\bls\b' '\brevoke\b'
check "zsh completion for ward" grep -q '^#compdef ward$' "$LAB_DIR/root-a/usr/share/zsh/vendor-completions/_ward"
check "fish completion for ward-relay names serve" grep -q "complete -c ward-relay .*-a \"serve\"" "$SRV/usr/share/fish/vendor_completions.d/ward-relay.fish"
check "a page per subcommand (ward-coordinator-device-ls.1.gz)" test -f "$SRV/usr/share/man/man1/ward-coordinator-device-ls.1.gz"
check "no page for the hidden generator commands" test -z "$(ls "$SRV/usr/share/man/man1" "$LAB_DIR/root-a/usr/share/man/man1" | grep -E 'completions|-man\.1')"
render() {
    if command -v man >/dev/null; then MANWIDTH=100 MANPAGER=cat man -l "$1" 2>/dev/null | sed 's/.\x08//g'
    elif command -v groff >/dev/null; then zcat "$1" | groff -man -Tutf8 2>/dev/null
    else zcat "$1"; fi
}
command -v man >/dev/null || command -v groff >/dev/null || echo "  neither man nor groff is installed: the pages' roff source is checked, not rendered"
out=$(render "$LAB_DIR/root-a/usr/share/man/man1/ward.1.gz")
check "ward(1) renders its NAME and SUBCOMMANDS with ward-daemon(1)" has_words "$out" '^NAME' '^SUBCOMMANDS' 'ward-daemon(1)'
out=$(render "$LAB_DIR/root-a/usr/share/man/man1/ward-daemon.1.gz")
check "ward-daemon(1) documents --state-dir and its variable WARD_STATE_DIR" has_words "$out" '--state-dir' WARD_STATE_DIR
out=$(render "$SRV/usr/share/man/man1/ward-relay-serve.1.gz")
check "ward-relay-serve(1) documents --token-file" grep -q -- '--token-file' <<<"$out"

# run_unit HOST ROOT UNIT_NAME LOG [VAR=VALUE...]: start the unit's ExecStart in HOST the way
# systemd would, relocated into ROOT: a clean environment, the unit's EnvironmentFile applied
# (absolute paths in it moved under ROOT), extra VAR=VALUE (e.g. CREDENTIALS_DIRECTORY), then
# ${VAR} expanded in the command line and its /usr/bin/ program taken from ROOT.
run_unit() {
    local host="$1" root="$2" name="$3" log="$4" u line envf k v w
    shift 4
    u="$root/lib/systemd/system/$name.service"
    local -a envs=("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin") argv=()
    envf=$(sed -n 's/^EnvironmentFile=-\{0,1\}//p' "$u")
    while IFS= read -r line; do
        [[ "$line" =~ ^([A-Z_][A-Z0-9_]*)=(.*)$ ]] || continue
        k=${BASH_REMATCH[1]} v=${BASH_REMATCH[2]}
        [[ "$v" == /* ]] && v="$root$v"
        envs+=("$k=$v")
    done <"$root$envf"
    envs+=("$@")
    line=$(sed -n 's/^ExecStart=//p' "$u")
    for w in $line; do
        while [[ "$w" =~ \$\{([A-Z_][A-Z0-9_]*)\} ]]; do
            k=${BASH_REMATCH[1]} v=""
            for e in "${envs[@]}"; do [[ "$e" == "$k="* ]] && v=${e#*=}; done
            w=${w/\$\{$k\}/$v}
        done
        argv+=("$w")
    done
    argv[0]="$root${argv[0]}"
    lab_spawn "$host" "$log" env -i "${envs[@]}" "${argv[@]}"
}
# The directories systemd makes for a unit (StateDirectory=, RuntimeDirectory=), under ROOT.
unit_dirs() {
    local root="$1" u="$1/lib/systemd/system/$2.service" d
    for d in $(sed -n 's/^StateDirectory=//p' "$u"); do install -d -m 0700 "$root/var/lib/$d"; done
    for d in $(sed -n 's/^RuntimeDirectory=//p' "$u"); do install -d -m 0750 "$root/run/$d"; done
}
# condition_met ROOT UNIT: the unit's ConditionPathExists= holds inside ROOT.
condition_met() { test -e "$1$(sed -n 's/^ConditionPathExists=//p' "$1/lib/systemd/system/$2.service")"; }

say "the units run: coordinator, relay, two devices"
lab_add_wan_host relay1
lab_add_wan_host a
lab_add_wan_host b
coord() { lab_exec wan env -i WARD_DATA_DIR="$SRV/var/lib/ward-coordinator" "$SRV/usr/bin/ward-coordinator" "$@"; }
check "ward-coordinator.service waits for init (condition unmet)" sh -c "! test -e '$SRV$(directive ward-coordinator ConditionPathExists)'"
coord init --public-addr "$(lab_ip wan):7443" >"$LAB_DIR/logs/init.log" 2>&1
check "the admin's init (default data dir from the env) satisfies the unit's condition" condition_met "$SRV" ward-coordinator
unit_dirs "$SRV" ward-coordinator
run_unit wan "$SRV" ward-coordinator coordinator.log
check "coordinator: ExecStart serves the admin socket" lab_wait_for -t 15 coord device ls --json
check "ward-relay.service waits for its credential (condition unmet)" sh -c "! test -e '$SRV$(directive ward-relay ConditionPathExists)'"
install -d -m 0700 "$SRV/etc/ward-relay"
(umask 077 && coord relay add r1 --addr "$(lab_ip relay1):3478" >"$SRV/etc/ward-relay/relay.token")
check "the credential in place satisfies the relay unit's condition" condition_met "$SRV" ward-relay
# LoadCredential=relay.token:/etc/ward-relay/relay.token: systemd copies it into a private dir.
CREDS="$LAB_DIR/credentials/ward-relay"
install -d -m 0700 "$CREDS"
cred_src=$(sed -n 's/^LoadCredential=relay.token://p' "$(unit ward-relay)")
install -m 0400 "$SRV$cred_src" "$CREDS/relay.token"
run_unit relay1 "$SRV" ward-relay relay-relay1.log CREDENTIALS_DIRECTORY="$CREDS"
check "relay: ExecStart joins the coordinator" lab_relay_wait_welcomed relay1 15
coord user add alice >/dev/null
coord user add bob >/dev/null
coord policy apply "$E2E_DIR/policies/open-lab.toml" >/dev/null
declare -A USER_OF=([a]=alice [b]=bob)
for h in a b; do
    R="$LAB_DIR/root-$h"
    unit_dirs "$R" ward
    run_unit "$h" "$R" ward "ward-$h.log"
    sock=$(sed -n 's/^WARD_SOCKET=//p' "$R/etc/default/ward")
    check "$h: ward daemon from ExecStart serves its socket ($sock)" lab_wait_for -t 15 test -S "$R$sock"
    token=$(coord token create --user "${USER_OF[$h]}")
    out=$(printf '%s\n' "$token" | lab_exec "$h" env -i WARD_SOCKET="$R$sock" "$R/usr/bin/ward" up --token - --hostname "$h" 2>&1)
    check "$h: the packaged ward CLI enrolls ($(head -n 1 <<<"$out"))" test -n "$out"
done
wardc() { local h="$1"; shift; lab_exec "$h" env -i WARD_SOCKET="$LAB_DIR/root-$h/run/ward/ward.sock" "$LAB_DIR/root-$h/usr/bin/ward" "$@"; }
ipv4() { wardc "$1" status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["ipv4"])'; }
B4=$(ipv4 b)
A4=$(ipv4 a)
check "both devices have overlay addresses ($A4, $B4)" test -n "$A4" -a -n "$B4"
check "state lives in the unit's StateDirectory" test -s "$LAB_DIR/root-a/var/lib/ward/state.json"
check "a pings b across the overlay" lab_wait_for -t 20 lab_exec a ping -c1 -W1 "$B4"
check "b pings a across the overlay" lab_wait_for -t 10 lab_exec b ping -c1 -W1 "$A4"
relay_online() { coord relay ls --json | python3 -c 'import json,sys; sys.exit(0 if [r for r in json.load(sys.stdin) if r["name"] == "r1" and r["online"]] else 1)'; }
check "the coordinator lists relay r1 online" relay_online
for p in coordinator.log relay-relay1.log ward-a.log; do
    check "$p: no panic" sh -c "! grep -q panicked '$LAB_DIR/logs/$p'"
done

echo "  packages.sh ran in $(($(now_ms) - T0)) ms"
finish
