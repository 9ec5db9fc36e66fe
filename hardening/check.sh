#!/usr/bin/env bash
# Check this host's hardening: each control pass, fail or n/a (not installed here).
#
#   check.sh [--json] [--root DIR] [--data-dir DIR]
#
# Exit code 1 if any control fails. --root reads configuration files under DIR (images,
# tests); the firewall, sysctl and audit checks always read the running kernel.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

json=0 root="" data_dir=${ENCLAVE_DATA_DIR:-/var/lib/enclave}
while (( $# )); do
    case $1 in
        --json) json=1 ;;
        --root) root=${2:?}; shift ;;
        --data-dir) data_dir=${2:?}; shift ;;
        *) sed -n '2,7s/^# \{0,1\}//p' "$0" >&2; exit 2 ;;
    esac
    shift
done

names=() statuses=() details=()
report() { names+=("$1"); statuses+=("$2"); details+=("$3"); }

check_firewall() {
    local table
    if ! command -v nft > /dev/null; then
        report firewall fail "nft is not installed"; return
    fi
    if ! table=$(nft list table inet enclave 2> /dev/null); then
        report firewall fail "no 'inet enclave' table: run hardening/firewall/nft-policy.sh apply"
        return
    fi
    local chain missing=()
    for chain in input forward output; do
        grep -Eq "hook $chain priority filter; policy drop;" <<< "$table" || missing+=("$chain")
    done
    if (( ${#missing[@]} )); then
        report firewall fail "chains without policy drop: ${missing[*]}"
    else
        report firewall pass "inet enclave: input, forward and output drop by default"
    fi
}

check_sysctl() {
    local key want have bad=()
    while IFS='=' read -r key want; do
        key=${key//[[:space:]]/} want=${want//[[:space:]]/}
        [[ -z $key || $key == \#* ]] && continue
        have=$(sysctl -n "$key" 2> /dev/null || echo absent)
        [[ $have == "$want" ]] || bad+=("$key=$have (want $want)")
    done < "$here/sysctl/99-enclave.conf"
    if (( ${#bad[@]} )); then
        report sysctl fail "${bad[*]}"
    else
        report sysctl pass "all settings of sysctl/99-enclave.conf in force"
    fi
}

check_sshd() {
    if ! command -v sshd > /dev/null; then
        report sshd n/a "sshd is not installed"; return
    fi
    local config
    config=$(sshd -T 2> /dev/null || true)
    if grep -qx "permitrootlogin no" <<< "$config" \
            && grep -qx "passwordauthentication no" <<< "$config"; then
        report sshd pass "no root login, no passwords"
    else
        report sshd fail "root login or password authentication allowed (sshd -T)"
    fi
}

check_audit() {
    if ! command -v auditctl > /dev/null; then
        report auditd n/a "auditd is not installed"; return
    fi
    if grep -q "enclave-secrets" < <(auditctl -l 2> /dev/null); then
        report auditd pass "Enclave watch rules loaded"
    else
        report auditd fail "Enclave audit rules not loaded (augenrules --load)"
    fi
}

mode_of() { stat -c '%a' "$1"; }

check_secrets() {
    local dir=$root$data_dir bad=()
    if [[ ! -d $dir ]]; then
        report secrets n/a "no data directory $dir"; return
    fi
    [[ $(( 8#$(mode_of "$dir") & 8#077 )) -eq 0 ]] || bad+=("$dir is $(mode_of "$dir")")
    if [[ -f $dir/pepper ]]; then
        [[ $(mode_of "$dir/pepper") == 600 ]] || bad+=("pepper is $(mode_of "$dir/pepper")")
    fi
    if (( ${#bad[@]} )); then
        report secrets fail "${bad[*]} (want 700 / 600)"
    else
        report secrets pass "data directory and pepper readable by their owner only"
    fi
}

check_upgrades() {
    local conf=$root/etc/apt/apt.conf.d/50enclave-unattended-upgrades
    if [[ -f $conf ]] && grep -q '"nvidia-";' "$conf"; then
        report upgrades pass "security-only unattended upgrades, GPU stack held back"
    else
        report upgrades fail "$conf missing (install-baseline.sh)"
    fi
}

check_held() {
    local -a patterns installed unheld=()
    mapfile -t patterns < <(grep -v '^#' "$here/patching/held-packages")
    mapfile -t installed < <(dpkg-query -W -f '${Package}\n' "${patterns[@]}" 2> /dev/null || true)
    if (( ! ${#installed[@]} )); then
        report held n/a "no GPU driver, CUDA or container runtime package installed"; return
    fi
    local held pkg
    held=$(apt-mark showhold | sed 's/:.*//')  # foreign architectures print as name:arch
    for pkg in "${installed[@]}"; do
        grep -qxF "$pkg" <<< "$held" || unheld+=("$pkg")
    done
    if (( ${#unheld[@]} )); then
        report held fail "not held: ${unheld[*]}"
    else
        report held pass "${#installed[@]} GPU stack packages held"
    fi
}

check_units() {
    local unit score worst="" bad=()
    shopt -s nullglob
    local units=("$root"/etc/systemd/system/enclave-*.service)
    shopt -u nullglob
    if (( ! ${#units[@]} )) || ! command -v systemd-analyze > /dev/null; then
        report units n/a "no Enclave systemd units installed"; return
    fi
    for unit in "${units[@]}"; do
        score=$(systemd-analyze security --offline=true "$unit" 2> /dev/null \
                | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
        worst+="${unit##*/}=${score:-?} "
        if [[ -z $score ]] || ! awk -v s="$score" 'BEGIN { exit !(s <= 3.0) }'; then
            bad+=("${unit##*/}")
        fi
    done
    if (( ${#bad[@]} )); then
        report units fail "exposure over 3.0: ${bad[*]} (${worst% })"
    else
        report units pass "systemd-analyze security: ${worst% }"
    fi
}

json_string() {
    local s=${1//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//$'\n'/\\n}
    s=${s//$'\t'/\\t}
    s=${s//$'\r'/\\r}
    s=$(tr -d '\000-\010\013\014\016-\037' <<< "$s")  # other control characters
    printf '"%s"' "$s"
}

check_firewall
check_sysctl
check_sshd
check_audit
check_secrets
check_upgrades
check_held
check_units

failed=0
for status in "${statuses[@]}"; do
    [[ $status == fail ]] && failed=1
done
if (( json )); then
    printf '{"passed": %s, "controls": [' "$( (( failed )) && echo false || echo true)"
    for i in "${!names[@]}"; do
        (( i )) && printf ', '
        printf '{"name": %s, "status": %s, "detail": %s}' "$(json_string "${names[$i]}")" \
            "$(json_string "${statuses[$i]}")" "$(json_string "${details[$i]}")"
    done
    printf ']}\n'
else
    for i in "${!names[@]}"; do
        printf '%-4s %-9s %s\n' "${statuses[$i]^^}" "${names[$i]}" "${details[$i]}"
    done
fi
exit "$failed"
