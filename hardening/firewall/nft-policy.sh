#!/usr/bin/env bash
# The host firewall: an nftables ruleset generated from a small declarative config.
#
#   nft-policy.sh print CONFIG    print the ruleset (a dry run: nothing is applied)
#   nft-policy.sh check CONFIG    validate the config, then the ruleset with `nft -c`
#   nft-policy.sh apply CONFIG    check, save the table in force, apply in one transaction
#   nft-policy.sh rollback        put back the table saved by the last apply
#
# Everything lives in one table, `inet enclave`: default drop on input, forward and output;
# loopback and established traffic allowed; each role opens only what it serves, to whom
# (examples/*.conf); drops are logged at a limited rate. IPv4 only: IPv6 is dropped.
# ENCLAVE_FIREWALL_STATE_DIR (default /var/lib/enclave-firewall) keeps the previous table and
# the one in force (current.nft), which enclave-firewall.service loads at boot.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=../lib/common.sh
source "$here/../lib/common.sh"

NFT=${NFT:-nft}
STATE_DIR=${ENCLAVE_FIREWALL_STATE_DIR:-/var/lib/enclave-firewall}
ADDRESS_KEYS=(client_cidrs gateway_addrs engine_addrs monitoring_cidrs admin_cidrs dns ntp mirrors)
PORT_KEYS=(gateway_port engine_ports exporter_port node_exporter_port ssh_port)
# services: other internal services this host calls, as ADDRESS:PORT (PostgreSQL, Redis, ...)
# forward: drop (default) or accept (hosts whose container runtime routes through them)
declare -A cfg=([gateway_port]=8000 [exporter_port]=9400 [node_exporter_port]=9100
                [ssh_port]=22 [log_rate]=5/minute [forward]=drop)

usage() { sed -n '2,12s/^# \{0,1\}//p' "$0" >&2; exit 2; }

known_key() {
    local key=$1 k
    for k in role log_rate services forward "${ADDRESS_KEYS[@]}" "${PORT_KEYS[@]}"; do
        [[ $k == "$key" ]] && return 0
    done
    return 1
}

load_config() {
    local file=$1 line key n=0
    local -a words
    [[ -f $file && -r $file ]] || die "cannot read the config $file"
    while IFS= read -r line || [[ -n $line ]]; do
        n=$((n + 1))
        line=${line%%#*}
        [[ $line =~ ^[[:space:]]*$ ]] && continue
        [[ $line =~ ^[[:space:]]*([a-z_]+)[[:space:]]*=(.*)$ ]] \
            || die "$file:$n: expected key=value"
        key=${BASH_REMATCH[1]}
        known_key "$key" || die "$file:$n: unknown key '$key'"
        read -r -a words <<< "${BASH_REMATCH[2]}"
        cfg[$key]="${words[*]}"
    done < "$file"
    validate "$file"
}

validate() {
    local file=$1 key value
    case ${cfg[role]:-} in
        gateway) require "$file" client_cidrs engine_addrs engine_ports admin_cidrs ;;
        engine) require "$file" gateway_addrs engine_ports admin_cidrs ;;
        all-in-one) require "$file" client_cidrs admin_cidrs ;;
        *) die "$file: role must be gateway, engine or all-in-one (got '${cfg[role]:-}')" ;;
    esac
    # admin_cidrs=none: no ssh at all (said explicitly, so nobody locks themselves out by omission)
    [[ ${cfg[admin_cidrs]} == none ]] && cfg[admin_cidrs]=""
    for key in "${ADDRESS_KEYS[@]}"; do
        for value in ${cfg[$key]:-}; do
            is_ipv4 "$value" || die "$file: $key: '$value' is not an IPv4 address or CIDR"
        done
    done
    for value in ${cfg[services]:-}; do
        if ! { [[ $value == *:* ]] && is_ipv4 "${value%:*}" && is_port "${value##*:}"; }; then
            die "$file: services: '$value' is not ADDRESS:PORT"
        fi
    done
    [[ ${cfg[forward]} == drop || ${cfg[forward]} == accept ]] \
        || die "$file: forward must be drop or accept"
    for key in "${PORT_KEYS[@]}"; do
        for value in ${cfg[$key]:-}; do
            is_port "$value" || die "$file: $key: '$value' is not a port (1-65535)"
        done
    done
    [[ ${cfg[log_rate]} =~ ^[0-9]+/(second|minute|hour)$ ]] \
        || die "$file: log_rate must look like 5/minute"
}

require() {
    local file=$1 key
    shift
    for key in "$@"; do
        [[ -n ${cfg[$key]:-} ]] || die "$file: role ${cfg[role]} needs $key"
    done
}

# set_of "a b c" -> "{ a, b, c }"
set_of() {
    local -a items
    read -r -a items <<< "$1"
    local IFS=,
    printf '{ %s }' "${items[*]}" | sed 's/,/, /g'
}

# accept_from KEY PORTS: accept TCP to PORTS from the addresses in KEY, if any.
accept_from() {
    local from=${cfg[$1]:-} ports=$2
    [[ -n $from && -n $ports ]] || return 0
    printf '\t\tip saddr %s tcp dport %s accept\n' "$(set_of "$from")" "$(set_of "$ports")"
}

ruleset() {
    local role=${cfg[role]} log="limit rate ${cfg[log_rate]} burst 10 packets log"
    printf 'table inet enclave\ndelete table inet enclave\n'
    printf 'table inet enclave {\n'
    printf '\tchain input {\n\t\ttype filter hook input priority filter; policy drop;\n'
    printf '\t\tiif "lo" accept\n\t\tct state established,related accept\n'
    printf '\t\tct state invalid drop\n'
    printf '\t\ticmp type { echo-request, destination-unreachable, time-exceeded, '
    printf 'parameter-problem } limit rate 10/second accept\n'
    # Prometheus scrapes /metrics on the gateway port, the engine ports and the exporters.
    if [[ $role == engine ]]; then
        accept_from gateway_addrs "${cfg[engine_ports]}"
        accept_from monitoring_cidrs \
            "${cfg[engine_ports]} ${cfg[exporter_port]} ${cfg[node_exporter_port]}"
    else
        accept_from client_cidrs "${cfg[gateway_port]}"
        # engine hosts call the admin API when they are patched (drain, undrain)
        accept_from engine_addrs "${cfg[gateway_port]}"
        if [[ $role == all-in-one ]]; then
            accept_from monitoring_cidrs \
                "${cfg[gateway_port]} ${cfg[exporter_port]} ${cfg[node_exporter_port]}"
        else
            accept_from monitoring_cidrs "${cfg[gateway_port]} ${cfg[node_exporter_port]}"
        fi
    fi
    accept_from admin_cidrs "${cfg[ssh_port]}"
    printf '\t\t%s prefix "enclave drop in: " level warn\n\t}\n' "$log"
    printf '\tchain forward {\n\t\ttype filter hook forward priority filter; policy %s;\n' \
        "${cfg[forward]}"
    printf '\t\t%s prefix "enclave drop fwd: " level warn\n\t}\n' "$log"
    printf '\tchain output {\n\t\ttype filter hook output priority filter; policy drop;\n'
    printf '\t\toif "lo" accept\n\t\tct state established,related accept\n'
    if [[ -n ${cfg[dns]:-} ]]; then
        printf '\t\tip daddr %s meta l4proto { tcp, udp } th dport 53 accept\n' \
            "$(set_of "${cfg[dns]}")"
    fi
    if [[ -n ${cfg[ntp]:-} ]]; then
        printf '\t\tip daddr %s udp dport 123 accept\n' "$(set_of "${cfg[ntp]}")"
    fi
    if [[ -n ${cfg[mirrors]:-} ]]; then
        printf '\t\tip daddr %s tcp dport { 80, 443 } accept\n' "$(set_of "${cfg[mirrors]}")"
    fi
    if [[ $role == gateway ]]; then
        printf '\t\tip daddr %s tcp dport %s accept\n' "$(set_of "${cfg[engine_addrs]}")" \
            "$(set_of "${cfg[engine_ports]}")"
    elif [[ $role == engine ]]; then  # the patch script drains through the gateways' admin API
        printf '\t\tip daddr %s tcp dport %s accept\n' "$(set_of "${cfg[gateway_addrs]}")" \
            "$(set_of "${cfg[gateway_port]}")"
    fi
    local service
    for service in ${cfg[services]:-}; do
        printf '\t\tip daddr %s tcp dport %s accept\n' "${service%:*}" "${service##*:}"
    done
    printf '\t\t%s prefix "enclave drop out: " level warn\n\t}\n}\n' "$log"
}

# check FILE: write the ruleset to FILE and have nft validate it (in this shell: die exits).
check() {
    ruleset > "$1"
    if ! "$NFT" -c -f "$1"; then
        rm -f "$1"
        die "nft refused the generated ruleset; nothing was applied"
    fi
}

apply() {
    local file previous=$STATE_DIR/previous.nft
    file=$(mktemp)
    check "$file"
    install -d -m 700 "$STATE_DIR"
    if "$NFT" list table inet enclave > "$previous.tmp" 2> /dev/null; then
        mv "$previous.tmp" "$previous"
    else
        rm -f "$previous.tmp" "$previous"  # no table before: rollback removes ours
    fi
    if ! "$NFT" -f "$file"; then  # one transaction: on failure nothing changed
        rm -f "$file"
        die "nft failed to apply; the previous ruleset is still in force"
    fi
    mv "$file" "$STATE_DIR/current.nft"
    log "applied the ${cfg[role]} ruleset (previous table saved for rollback)"
}

rollback() {
    local previous=$STATE_DIR/previous.nft file
    file=$(mktemp)
    if [[ -s $previous ]]; then
        { printf 'table inet enclave\ndelete table inet enclave\n'; cat "$previous"; } > "$file"
    else
        printf 'table inet enclave\ndelete table inet enclave\n' > "$file"
    fi
    "$NFT" -f "$file" || { rm -f "$file"; die "rollback failed; nothing changed"; }
    rm -f "$file"
    if [[ -s $previous ]]; then
        cp "$previous" "$STATE_DIR/current.nft"
        log "rolled back to the table in force before the last apply"
    else
        rm -f "$STATE_DIR/current.nft"
        log "WARNING: there was no Enclave table before the last apply: this host now has NO" \
            "Enclave firewall"
    fi
}

main() {
    local cmd=${1:-}
    case $cmd in
        print) [[ $# -eq 2 ]] || usage; load_config "$2"; ruleset ;;
        check)
            [[ $# -eq 2 ]] || usage
            load_config "$2"
            local file
            file=$(mktemp)
            check "$file"
            rm -f "$file"
            log "ok" ;;
        apply) [[ $# -eq 2 ]] || usage; load_config "$2"; apply ;;
        rollback) [[ $# -eq 1 ]] || usage; rollback ;;
        *) usage ;;
    esac
}

main "$@"
