#!/usr/bin/env bash
# Patch one GPU host without dropping a request: drain its engines on every gateway, wait
# until their in-flight requests reach zero, apply the security updates (NVIDIA driver, CUDA
# and container runtime are held: patching/held-packages), move the driver only when the pinned
# version changes, reboot if needed, verify, undrain.
#
#   patch-gpu-node.sh [--dry-run] --gateway URL [--gateway URL ...] --deployment NAME [...]
#                     [--timeout SECONDS] [--after-reboot] [--model NAME]
#
#   --dry-run       drain and undrain for real; print the package, driver and reboot steps
#   --after-reboot  skip to the checks and the undrain (run it once the host is back)
#
# Environment: ENCLAVE_ADMIN_KEY (a key with the admin scope, required), ENCLAVE_VERIFY_KEY
# (a client key allowed to call --model; without it the inference check is skipped, loudly),
# ENCLAVE_DRIVER_PIN (default /etc/enclave/nvidia-driver.version: the driver version to run).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$here/lib/common.sh"

dry_run=0 after_reboot=0 timeout=600 model=""
gateways=() deployments=()
pin_file=${ENCLAVE_DRIVER_PIN:-/etc/enclave/nvidia-driver.version}

usage() { sed -n '2,17s/^# \{0,1\}//p' "$0" >&2; exit 2; }

while (( $# )); do
    case $1 in
        --dry-run) dry_run=1 ;;
        --after-reboot) after_reboot=1 ;;
        --gateway) gateways+=("${2:?--gateway needs a URL}"); shift ;;
        --deployment) deployments+=("${2:?--deployment needs a name}"); shift ;;
        --timeout) timeout=${2:?}; shift ;;
        --model) model=${2:?}; shift ;;
        -h|--help) usage ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
    shift
done
(( ${#gateways[@]} && ${#deployments[@]} )) || usage
[[ $timeout =~ ^[0-9]+$ ]] || die "--timeout takes seconds"
[[ -n ${ENCLAVE_ADMIN_KEY:-} ]] || die "set ENCLAVE_ADMIN_KEY to a key with the admin scope"

# Keys go to curl in header files, never on its command line (ps shows arguments).
headers=$(mktemp -d)
chmod 700 "$headers"
printf 'Authorization: Bearer %s\n' "$ENCLAVE_ADMIN_KEY" > "$headers/admin"
if [[ -n ${ENCLAVE_VERIFY_KEY:-} ]]; then
    printf 'Authorization: Bearer %s\n' "$ENCLAVE_VERIFY_KEY" > "$headers/verify"
fi
drained=0  # 1 while engines are drained: the exit trap then says so, or undrains

step() { printf '==> %s\n' "$*"; }

# run CMD...: a host-changing step; printed only in a dry run.
run() {
    if (( dry_run )); then
        printf '[dry-run] %s\n' "$*"
    else
        "$@"
    fi
}

admin() {  # admin METHOD URL
    curl -fsS -X "$1" -H "@$headers/admin" --max-time 10 "$2"
}

on_exit() {
    local code=$?
    rm -rf "$headers"
    if (( drained && code != 0 )); then
        log "FAILED with the engines still drained on: ${gateways[*]}"
        log "fix the host, then: $0 --after-reboot ... (checks, then undrains)"
    fi
}
trap on_exit EXIT
trap 'log "interrupted"; exit 130' INT TERM

# engine_rows GATEWAY: one line per replica of ours on that gateway (a --deployment names a
# deployment, every replica of it, or one replica):
#   deployment-or-replica in_flight healthy(0/1) model version
engine_rows() {
    admin GET "$1/admin/v1/engines" | python3 -c '
import json, sys
for e in json.load(sys.stdin)["data"]:
    for name in (e["deployment"], e["replica"]):
        if name in sys.argv[1:]:
            print(name, e["in_flight"], int(e["healthy"]), e["model"], e["version"])
' "${deployments[@]}"
}

in_flight() {  # in_flight GATEWAY: the sum over our deployments
    engine_rows "$1" | awk '{ n += $2 } END { print n + 0 }'
}

set_drain() {  # set_drain drain|undrain
    local gw dep
    for gw in "${gateways[@]}"; do
        for dep in "${deployments[@]}"; do
            if ! admin POST "$gw/admin/v1/engines/$dep/$1" > /dev/null; then
                [[ $1 == drain ]] && drained=1  # some may be drained already
                die "$1 of $dep failed on $gw"
            fi
            printf '%sed %s on %s\n' "$1" "$dep" "$gw"
        done
    done
}

drain() {
    step "drain"
    set_drain drain
    drained=1
    local deadline=$((SECONDS + timeout)) gw n
    for gw in "${gateways[@]}"; do
        while true; do
            n=$(in_flight "$gw") || die "cannot read the engines' in-flight count on $gw"
            (( n == 0 )) && break
            if (( SECONDS >= deadline )); then
                set_drain undrain
                drained=0
                die "still $n requests in flight on $gw after ${timeout}s; undrained, nothing changed"
            fi
            printf 'waiting: %s in flight on %s\n' "$n" "$gw"
            sleep 1
        done
        printf 'in flight on %s: 0\n' "$gw"
    done
}

update() {
    step "security updates (held: $(tr '\n' ' ' < "$here/patching/held-packages"))"
    run apt-get update -q
    run unattended-upgrade -v
}

driver() {
    step "NVIDIA driver"
    local pinned installed
    pinned=$(tr -d '[:space:]' 2> /dev/null < "$pin_file" || true)
    installed=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2> /dev/null \
                | head -n1 || true)
    if [[ -z $pinned ]]; then
        printf 'no pinned version (%s): the driver stays %s\n' "$pin_file" "${installed:-as is}"
    elif [[ $pinned == "$installed" ]]; then
        printf 'driver %s is the pinned version\n' "$installed"
    else
        printf 'driver %s -> pinned %s\n' "${installed:-none}" "$pinned"
        local -a held
        mapfile -t held < <(grep -v '^#' "$here/patching/held-packages")
        # the whole held set moves together (driver, its libraries, the kernel module)
        run apt-mark unhold "${held[@]}"
        if ! run apt-get install -y "nvidia-driver=$pinned*"; then
            run apt-mark hold "${held[@]}"
            die "the driver $pinned did not install; the GPU stack is held again"
        fi
        run apt-mark hold "${held[@]}"
        run touch /var/run/reboot-required
    fi
}

maybe_reboot() {
    step "reboot"
    if [[ -e /var/run/reboot-required ]]; then
        run systemctl reboot
        (( dry_run )) || { log "rebooting: run again with --after-reboot"; exit 0; }
    else
        printf 'no reboot required\n'
    fi
}

verify() {
    step "verify"
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=index,name,driver_version,temperature.gpu --format=csv
    elif (( dry_run )); then
        printf '[dry-run] nvidia-smi (not on this host)\n'
    else
        die "nvidia-smi is missing: the driver is not working"
    fi
    # engines load their weights after a reboot: wait for them (up to --timeout)
    local gw="${gateways[0]}" deadline=$((SECONDS + timeout)) unhealthy
    while true; do
        unhealthy=$(engine_rows "$gw" | awk '$3 == 0 { printf "%s ", $1 }') \
            || die "cannot read the engines on $gw"
        [[ -z $unhealthy ]] && break
        (( SECONDS < deadline )) || die "engines not healthy after ${timeout}s: $unhealthy"
        printf 'waiting for healthy engines: %s\n' "$unhealthy"
        sleep 2
    done
    printf 'engines healthy: %s\n' "${deployments[*]}"
}

undrain_and_check() {
    step "undrain"
    set_drain undrain
    drained=0
    if [[ -z ${ENCLAVE_VERIFY_KEY:-} ]]; then
        log "warning: ENCLAVE_VERIFY_KEY not set: no inference check"
        return
    fi
    local gw="${gateways[0]}" name=${model:-}
    if [[ -z $name ]]; then  # model@version: this very engine, not another version
        name=$(engine_rows "$gw" | awk -v d="${deployments[0]}" '$1 == d { print $4 "@" $5 }')
    fi
    step "one inference through $gw ($name)"
    if ! curl -fsS --max-time 120 "$gw/v1/chat/completions" \
            -H "@$headers/verify" -H "Content-Type: application/json" \
            -d "{\"model\": \"$name\", \"max_tokens\": 4,
                 \"messages\": [{\"role\": \"user\", \"content\": \"patch check\"}]}" \
            > /dev/null; then
        set_drain drain
        drained=1
        die "the inference check failed: drained again, look at the engine before undraining"
    fi
    printf 'inference ok\n'
}

if (( ! after_reboot )); then
    drain
    update
    driver
    maybe_reboot
fi
verify
undrain_and_check
step "done"
