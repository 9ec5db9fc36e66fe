#!/usr/bin/env bash
# Install the host baselines: sysctl, sshd, auditd rules, unattended security upgrades with the
# GPU stack held, the systemd units with their users, and the permissions of secrets.
#
#   install-baseline.sh [--dry-run] [--root DIR]
#
#   --dry-run   print what would be done
#   --root DIR  install under DIR instead of / (for images and tests; nothing is reloaded)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$here/lib/common.sh"

dry_run=0 root=""
while (( $# )); do
    case $1 in
        --dry-run) dry_run=1 ;;
        --root) root=${2:?--root needs a directory}; shift ;;
        *) sed -n '2,9s/^# \{0,1\}//p' "$0" >&2; exit 2 ;;
    esac
    shift
done

run() {
    if (( dry_run )); then printf '[dry-run] %s\n' "$*"; else "$@"; fi
}

# put SOURCE DEST MODE: one file in place, with its mode.
put() {
    run install -D -m "$3" "$here/$1" "$root$2"
}

put sysctl/99-enclave.conf /etc/sysctl.d/99-enclave.conf 644
put ssh/00-enclave.conf /etc/ssh/sshd_config.d/00-enclave.conf 600
put audit/enclave.rules /etc/audit/rules.d/50-enclave.rules 640
put patching/50enclave-unattended-upgrades /etc/apt/apt.conf.d/50enclave-unattended-upgrades 644
put patching/20auto-upgrades /etc/apt/apt.conf.d/20auto-upgrades 644
for unit in "$here"/systemd/*.service; do
    put "systemd/${unit##*/}" "/etc/systemd/system/${unit##*/}" 644
done
# state: the gateway's data (keys, pepper) readable by its user only
run install -d -m 700 "$root/var/lib/enclave"
run install -d -m 750 "$root/etc/enclave"
if [[ -f $root/var/lib/enclave/pepper ]]; then
    run chmod 600 "$root/var/lib/enclave/pepper"
fi

if [[ -n $root ]]; then
    exit 0  # an image or a test tree: users, holds and reloads happen on the host
fi
for user in enclave enclave-engine enclave-exporter; do
    id "$user" > /dev/null 2>&1 || run useradd --system --no-create-home --shell /usr/sbin/nologin "$user"
done
run chown enclave:enclave /var/lib/enclave
mapfile -t held < <(grep -v '^#' "$here/patching/held-packages")
mapfile -t installed < <(dpkg-query -W -f '${Package}\n' "${held[@]}" 2> /dev/null || true)
if (( ${#installed[@]} )); then
    run apt-mark hold "${installed[@]}"
fi
run sysctl --system
if command -v augenrules > /dev/null; then run augenrules --load; fi
if command -v sshd > /dev/null; then run sshd -t; run systemctl reload ssh; fi
run systemctl daemon-reload
run systemctl enable enclave-firewall.service  # reloads the last applied ruleset at boot
log "baseline installed"
