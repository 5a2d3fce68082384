#!/usr/bin/env bash
# Installs the system packages Ward needs that are missing: the list is scripts/packages.txt
# (one name a line, `#` comments). Asks dpkg-query which are installed; when all are, apt is
# not touched at all. Otherwise, as root: apt-get update, then apt-get install -y of the
# missing ones only.
#
# Usage: scripts/install-deps.sh [--check | --names] [--list FILE]
#   (none)   install what is missing (needs root when something is)
#   --check  print the missing packages, one a line; exit 1 if any, 0 if none
#   --names  print every package of the list, one a line
#   --list   read FILE instead of scripts/packages.txt
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
list="$here/packages.txt"
mode=install
while (($# > 0)); do
    case "$1" in
    --check) mode=check; shift ;;
    --names) mode=names; shift ;;
    --list) list="${2:?--list FILE}"; shift 2 ;;
    -h | --help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "install-deps.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ -r "$list" ]] || { echo "install-deps.sh: cannot read $list" >&2; exit 2; }

mapfile -t names < <(sed 's/#.*//' "$list" | tr -s ' \t' '\n' | grep -v '^$')
for n in "${names[@]}"; do
    [[ "$n" =~ ^[a-z0-9][a-z0-9.+-]+$ ]] || { echo "install-deps.sh: '$n' in $list is not a package name" >&2; exit 2; }
done
if [[ $mode == names ]]; then
    printf '%s\n' "${names[@]}"
    exit 0
fi

missing=()
for n in "${names[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$n" 2>/dev/null || true)
    [[ "$status" == installed ]] || missing+=("$n")
done

if [[ $mode == check ]]; then
    ((${#missing[@]} == 0)) && exit 0
    printf '%s\n' "${missing[@]}"
    exit 1
fi
if ((${#missing[@]} == 0)); then
    echo "system packages: all ${#names[@]} installed"
    exit 0
fi
if [[ $EUID -ne 0 ]]; then
    echo "missing system packages: ${missing[*]}" >&2
    echo "install them: sudo apt-get install -y ${missing[*]}   (or sudo $0)" >&2
    exit 1
fi
echo "system packages: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q "${missing[@]}"
still=$("$0" --check --list "$list" || true)
if [[ -n "$still" ]]; then
    echo "install-deps.sh: still missing after apt-get install: $(echo $still)" >&2
    exit 1
fi
