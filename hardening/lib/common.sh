# shellcheck shell=bash
# Helpers shared by the hardening scripts: messages, and strict checks of config values.

log() { printf '%s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 2; }

# is_ipv4 ADDR[/PREFIX]: an IPv4 address or CIDR with octets <= 255 and prefix <= 32.
is_ipv4() {
    local value=$1 addr prefix octet
    addr=${value%/*}
    if [[ $value == */* ]]; then
        prefix=${value#*/}
        [[ $prefix =~ ^[0-9]{1,2}$ ]] && (( prefix <= 32 )) || return 1
    fi
    [[ $addr =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]] || return 1
    IFS=. read -r -a octets <<< "$addr"
    for octet in "${octets[@]}"; do
        (( 10#$octet <= 255 )) || return 1
    done
}

is_port() {
    [[ $1 =~ ^[0-9]{1,5}$ ]] && (( 10#$1 >= 1 && 10#$1 <= 65535 ))
}
