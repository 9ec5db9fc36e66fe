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
# (examples/*.conf); ping only from the configured networks; drops are logged at a limited
# rate. IPv4 only: IPv6 is dropped.
#
# Every address must be private (RFC 1918, loopback or link-local) unless
# allow_public_cidrs=yes; a network wider than /8 (0.0.0.0/0, two /1s...) is refused always;
# numbers with leading zeros are refused (nft reads them as octal).
#
# Exit status: 0 done; 1 nft refused or failed (nothing changed); 64 usage; 65 bad config
# (nothing generated, nothing changed).
# ENCLAVE_FIREWALL_STATE_DIR (default /var/lib/enclave-firewall) keeps the previous table
# (previous.nft, for rollback; kept as it is when an apply changes nothing) and the one in
# force (current.nft), which enclave-firewall.service loads at boot. Temporary files go to
# TMPDIR (default /tmp) and are removed.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=../lib/common.sh
source "$here/../lib/common.sh"

NFT=${NFT:-nft}
STATE_DIR=${ENCLAVE_FIREWALL_STATE_DIR:-/var/lib/enclave-firewall}
ADDRESS_KEYS=(client_cidrs gateway_addrs engine_addrs monitoring_cidrs admin_cidrs dns ntp mirrors)
# Where traffic may come from: ping (echo request) is answered from these only.
SOURCE_KEYS=(client_cidrs gateway_addrs engine_addrs monitoring_cidrs admin_cidrs)
PORT_KEYS=(gateway_port engine_ports exporter_port node_exporter_port ssh_port)
# services: other internal services this host calls, as ADDRESS:PORT (PostgreSQL, Redis, ...)
# forward: drop (default) or accept (hosts whose container runtime routes through them)
# allow_public_cidrs: yes lets an address key hold public addresses (never 0.0.0.0/0)
declare -A cfg=([gateway_port]=8000 [exporter_port]=9400 [node_exporter_port]=9100
                [ssh_port]=22 [log_rate]=5/minute [forward]=drop [allow_public_cidrs]=no)
EX_FAILED=1
EX_USAGE=64
EX_CONFIG=65

usage() {  # the header comment, up to the first line of code
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
    exit "$EX_USAGE"
}
bad_config() { printf 'error: %s\n' "$*" >&2; exit "$EX_CONFIG"; }
failed() { printf 'error: %s\n' "$*" >&2; exit "$EX_FAILED"; }

known_key() {
    local key=$1 k
    for k in role log_rate services forward allow_public_cidrs "${ADDRESS_KEYS[@]}" \
            "${PORT_KEYS[@]}"; do
        [[ $k == "$key" ]] && return 0
    done
    return 1
}

load_config() {
    local file=$1 line key n=0
    local -a words
    [[ -f $file && -r $file ]] || bad_config "cannot read the config $file"
    while IFS= read -r line || [[ -n $line ]]; do
        n=$((n + 1))
        line=${line%%#*}
        [[ $line =~ ^[[:space:]]*$ ]] && continue
        [[ $line =~ ^[[:space:]]*([a-z_]+)[[:space:]]*=(.*)$ ]] \
            || bad_config "$file:$n: expected key=value"
        key=${BASH_REMATCH[1]}
        known_key "$key" || bad_config "$file:$n: unknown key '$key'"
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
        *) bad_config "$file: role must be gateway, engine or all-in-one (got '${cfg[role]:-}')" ;;
    esac
    [[ ${cfg[allow_public_cidrs]} == yes || ${cfg[allow_public_cidrs]} == no ]] \
        || bad_config "$file: allow_public_cidrs must be yes or no"
    # admin_cidrs=none: no ssh at all (said explicitly, so nobody locks themselves out by omission)
    [[ ${cfg[admin_cidrs]} == none ]] && cfg[admin_cidrs]=""
    for key in "${ADDRESS_KEYS[@]}"; do
        for value in ${cfg[$key]:-}; do
            check_address "$file" "$key" "$value"
        done
    done
    for value in ${cfg[services]:-}; do
        if ! { [[ $value == *:* ]] && is_ipv4 "${value%:*}" && is_port "${value##*:}"; }; then
            bad_config "$file: services: '$value' is not ADDRESS:PORT"
        fi
        check_address "$file" services "${value%:*}"
        check_port "$file" services "${value##*:}"
    done
    [[ ${cfg[forward]} == drop || ${cfg[forward]} == accept ]] \
        || bad_config "$file: forward must be drop or accept"
    for key in "${PORT_KEYS[@]}"; do
        for value in ${cfg[$key]:-}; do
            is_port "$value" || bad_config "$file: $key: '$value' is not a port (1-65535)"
            check_port "$file" "$key" "$value"
        done
    done
    [[ ${cfg[log_rate]} =~ ^[0-9]+/(second|minute|hour)$ ]] \
        || bad_config "$file: log_rate must look like 5/minute"
}

# A number written with a leading zero means one thing to a reader (and to this validator)
# and another to nft, which reads it as octal: 010.0.1.010 is 8.0.1.8, port 0443 is 291.
has_leading_zero() { [[ $1 =~ (^|[./:])0[0-9] ]]; }

check_port() {
    local file=$1 key=$2 value=$3
    has_leading_zero "$value" \
        && bad_config "$file: $key: '$value' has a leading zero (nft would read it as octal)"
    return 0
}

# check_address FILE KEY VALUE: an IPv4 address or CIDR, without leading zeros, never wider
# than /8, and private (RFC 1918, loopback, link-local) unless allow_public_cidrs=yes.
check_address() {
    local file=$1 key=$2 value=$3
    has_leading_zero "$value" \
        && bad_config "$file: $key: '$value' has a leading zero (nft would read it as octal)"
    is_ipv4 "$value" || bad_config "$file: $key: '$value' is not an IPv4 address or CIDR"
    if [[ $value == */* ]] && (( 10#${value#*/} < 8 )); then
        [[ ${value#*/} == 0 ]] \
            && bad_config "$file: $key: '$value' is every address; name the networks instead"
        bad_config "$file: $key: '$value' is wider than a /8; name the networks instead"
    fi
    if [[ ${cfg[allow_public_cidrs]} != yes ]] && ! is_private "$value"; then
        bad_config "$file: $key: '$value' is not a private network (RFC 1918); set" \
            "allow_public_cidrs=yes if it must be"
    fi
    return 0
}

# is_private ADDR[/PREFIX]: the whole range lies in 10/8, 172.16/12, 192.168/16, loopback
# 127/8 or link-local 169.254/16 (never routed: a cloud's time and metadata services).
is_private() {
    local value=$1 addr prefix a b
    addr=${value%/*}
    prefix=32
    [[ $value == */* ]] && prefix=${value#*/}
    IFS=. read -r a b _ _ <<< "$addr"
    if (( a == 10 || a == 127 )); then (( prefix >= 8 )); return; fi
    if (( a == 172 && b >= 16 && b <= 31 )); then (( prefix >= 12 )); return; fi
    if (( a == 192 && b == 168 )); then (( prefix >= 16 )); return; fi
    if (( a == 169 && b == 254 )); then (( prefix >= 16 )); return; fi
    return 1
}

require() {
    local file=$1 key
    shift
    for key in "$@"; do
        [[ -n ${cfg[$key]:-} ]] || bad_config "$file: role ${cfg[role]} needs $key"
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
    # Errors about our own connections from anywhere; ping only from the configured networks.
    printf '\t\ticmp type { destination-unreachable, time-exceeded, parameter-problem } '
    printf 'limit rate 10/second accept\n'
    local key sources=""
    for key in "${SOURCE_KEYS[@]}"; do
        [[ -n ${cfg[$key]:-} ]] && sources+=" ${cfg[$key]}"
    done
    if [[ -n ${sources# } ]]; then
        printf '\t\tip saddr %s icmp type echo-request limit rate 10/second accept\n' \
            "$(set_of "${sources# }")"
    fi
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
        failed "nft refused the generated ruleset; nothing was applied"
    fi
}

apply() {
    local file before after
    file=$(mktemp)
    before=$(mktemp)
    after=$(mktemp)
    # shellcheck disable=SC2064  # expand now: the trap removes these files whatever happens
    trap "rm -f '$file' '$before' '$after'" EXIT
    check "$file"
    install -d -m 700 "$STATE_DIR"
    local had_table=1
    "$NFT" list table inet enclave > "$before" 2> /dev/null || had_table=0
    if ! "$NFT" -f "$file"; then  # one transaction: on failure nothing changed
        failed "nft failed to apply; the previous ruleset is still in force"
    fi
    # The new ruleset is in force from here: a failure to record it says so.
    record_state "$file" "$before" "$after" "$had_table" \
        || failed "the ${cfg[role]} ruleset is in force, but $STATE_DIR could not be updated:" \
            "current.nft and previous.nft may be stale (boot and rollback would use them)"
}

# record_state RULESET BEFORE AFTER HAD_TABLE: current.nft, and previous.nft unless the
# ruleset now in force is the one that was (each file replaced whole, by rename).
record_state() {
    local file=$1 before=$2 after=$3 had_table=$4
    "$NFT" list table inet enclave > "$after" || return 1
    if (( had_table )) && cmp -s "$before" "$after"; then
        cp "$file" "$STATE_DIR/current.nft.tmp" && mv "$STATE_DIR/current.nft.tmp" \
            "$STATE_DIR/current.nft" || return 1
        log "the ${cfg[role]} ruleset is already in force; nothing changed (previous.nft kept)"
        return 0
    fi
    if (( had_table )); then
        cp "$before" "$STATE_DIR/previous.nft.tmp" \
            && mv "$STATE_DIR/previous.nft.tmp" "$STATE_DIR/previous.nft" || return 1
    else
        rm -f "$STATE_DIR/previous.nft" || return 1  # no table before: rollback removes ours
    fi
    cp "$file" "$STATE_DIR/current.nft.tmp" \
        && mv "$STATE_DIR/current.nft.tmp" "$STATE_DIR/current.nft" || return 1
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
    "$NFT" -f "$file" || { rm -f "$file"; failed "rollback failed; nothing changed"; }
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
