#!/usr/bin/env bash
# Enclave host bootstrap: runs once, as root, from the user data, after the header that wrote
# /etc/enclave/{bootstrap.env,firewall.conf,<service>.env}. Everything comes from the internal
# mirror: the host has no other route. Any failure stops it (set -e) and the instance fails its
# health check, so the auto-scaling group replaces it.
#
#   ENCLAVE_BOOTSTRAP_DRY_RUN=1 bootstrap.sh   print each step instead of doing it (tests)
#   ENCLAVE_BOOTSTRAP_ROOT=DIR                 where /etc/enclave is (tests; default /)
set -euo pipefail
# What is installed (the virtualenvs, models, policies) must be readable by the services' own
# users; the files holding secrets get their modes explicitly.
umask 022

root=${ENCLAVE_BOOTSTRAP_ROOT:-}
dry_run=${ENCLAVE_BOOTSTRAP_DRY_RUN:-0}
conf=$root/etc/enclave
# shellcheck source=/dev/null
source "$conf/bootstrap.env"
: "${ROLE:?}" "${MIRROR_URL:?}" "${ENCLAVE_VERSION:?}" "${RELEASE_SHA256:?}"
: "${SECRET_FETCH_COMMAND=}" "${WEIGHTS_SYNC_COMMAND=}" "${SECRET_ENV=}" "${DATA_DISK_MODEL=}"

prefix=/opt/enclave
service=enclave-gateway
[[ $ROLE == engine ]] && service=enclave-engines
env_file=$conf/${service#enclave-}.env

log() { printf 'enclave-bootstrap: %s\n' "$*" >&2; }
run() {
    if [[ $dry_run == 1 ]]; then printf 'run: %s\n' "$*"; else "$@"; fi
}
# fetch PATH DEST: one file from the mirror, over TLS only, never following a redirect elsewhere
fetch() {
    run curl --fail --silent --show-error --proto '=https' --tlsv1.2 --retry 5 \
        --retry-connrefused --output "$2" "$MIRROR_URL/$1"
}

log "1/8 packages from the mirror only"
if [[ $dry_run != 1 ]]; then
    install -d -m 0755 /etc/apt/disabled-sources
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*; do
        if [[ -f $f ]]; then mv "$f" /etc/apt/disabled-sources/; fi
    done
fi
fetch apt/enclave-mirror.gpg /usr/share/keyrings/enclave-mirror.gpg
fetch apt/enclave.sources /etc/apt/sources.list.d/enclave.sources
if [[ $dry_run != 1 ]]; then
    printf '[global]\nindex-url = %s/pypi/simple\n' "$MIRROR_URL" > /etc/pip.conf
    chmod 0644 /etc/pip.conf /usr/share/keyrings/enclave-mirror.gpg \
        /etc/apt/sources.list.d/enclave.sources
fi

log "2/8 the release, checked against its pinned SHA-256"
tarball=/var/tmp/enclave-$ENCLAVE_VERSION.tar.gz
fetch "enclave/enclave-$ENCLAVE_VERSION.tar.gz" "$tarball"
if [[ $dry_run == 1 ]]; then
    printf 'run: sha256sum --check (%s)\n' "$RELEASE_SHA256"
else
    printf '%s  %s\n' "$RELEASE_SHA256" "$tarball" | sha256sum --check --quiet \
        || { log "the release does not match its SHA-256; stopping"; exit 1; }
fi
run install -d -m 0755 "$prefix/src"
run tar -xzf "$tarball" -C "$prefix/src" --strip-components 1 --no-same-owner

log "3/8 system packages"
run env DEBIAN_FRONTEND=noninteractive apt-get update -qq
run env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    python3.11 python3.11-venv nftables auditd unattended-upgrades

log "4/8 Enclave into $prefix/.venv"
run python3.11 -m venv "$prefix/.venv"
run "$prefix/.venv/bin/pip" install --quiet --no-cache-dir --disable-pip-version-check \
    "$prefix/src"
run "$prefix/src/hardening/install-baseline.sh"
run install -d -m 0755 "$conf/models"
run cp -r "$prefix/src/models/." "$conf/models/"
if [[ $ROLE == gateway && ! -f $conf/policies.yaml ]]; then
    run install -m 0644 "$prefix/src/config/policies.yaml" "$conf/policies.yaml"
fi

log "5/8 secrets (fetched here, never in the user data; the env file is root's only)"
pepper_dir=/var/lib/enclave
for pair in $SECRET_ENV; do
    name=${pair%%=*} id=${pair#*=}
    [[ -n $SECRET_FETCH_COMMAND ]] || { log "secret $name given but no secret_fetch_command"; exit 1; }
    read -r -a fetch_secret <<< "$SECRET_FETCH_COMMAND"
    if [[ $dry_run == 1 ]]; then
        printf 'run: %s <secret %s> -> %s\n' "$SECRET_FETCH_COMMAND" "$name" "$env_file"
        continue
    fi
    value=$(umask 077; "${fetch_secret[@]}" "$id")
    [[ -n $value ]] || { log "secret $name is empty; put its value first (see the README)"; exit 1; }
    if [[ $name == ENCLAVE_PEPPER ]]; then
        (umask 077; printf '%s\n' "$value" > "$pepper_dir/pepper")
        chown enclave:enclave "$pepper_dir/pepper"
        printf 'ENCLAVE_PEPPER_FILE=%s/pepper\n' "$pepper_dir" >> "$env_file"
    else
        printf '%s=%s\n' "$name" "$value" >> "$env_file"
    fi
    unset value
done
if [[ $ROLE == engine ]]; then
    # The engines listen on this host's private address, where the engine load balancer and
    # the gateways reach them (the host firewall admits the gateways' subnets only).
    address=$(hostname -I | awk '{print $1}')
    run sh -c "printf 'ENCLAVE_ENGINE_HOST=%s\n' '$address' >> '$env_file'"
fi
# systemd reads environment files as root before it drops privileges: root only.
run chown root:root "$env_file"
run chmod 0600 "$env_file"

log "6/8 engines: the data volume, the weights and the engine environment"
if [[ $ROLE == engine ]]; then
    # The data volume: the one whole disk with no partition and no filesystem yet. It holds
    # the weights, the engine virtualenv and caches (/var/cache/enclave, so not noexec);
    # without one they stay on the root volume.
    data_disk=""
    while read -r disk; do
        model=$(lsblk -dno MODEL "$disk" | sed 's/[[:space:]]*$//')
        if [[ -n $DATA_DISK_MODEL && $model != "$DATA_DISK_MODEL" ]]; then continue; fi
        if [[ $(lsblk -nro NAME "$disk" | wc -l) -eq 1 && -z $(blkid -o value -s TYPE "$disk" || true) ]]; then
            data_disk=$disk
            break
        fi
    done < <(lsblk -dpnro NAME,TYPE | awk '$2 == "disk" {print $1}')
    run install -d -m 0755 /var/cache/enclave
    if [[ -n $data_disk ]]; then
        run mkfs.ext4 -q -L enclave-data "$data_disk"
        run sh -c "echo 'LABEL=enclave-data /var/cache/enclave ext4 defaults,nofail,nodev,nosuid 0 2' >> /etc/fstab"
        run mount /var/cache/enclave
    fi
    # the engines' user builds its virtualenv and keeps the weights here
    run chown enclave-engine:enclave-engine /var/cache/enclave
    run chmod 0750 /var/cache/enclave
    if [[ -n $WEIGHTS_SYNC_COMMAND ]]; then
        read -r -a sync <<< "$WEIGHTS_SYNC_COMMAND"
        run install -d -o enclave-engine -g enclave-engine -m 0750 /var/cache/enclave/weights
        run "${sync[@]}" /var/cache/enclave/weights
        run chown -R enclave-engine:enclave-engine /var/cache/enclave/weights
    fi
    run runuser -u enclave-engine -- env HOME=/var/lib/enclave-engines \
        ENCLAVE_CACHE_DIR=/var/cache/enclave "$prefix/.venv/bin/enclave" engines setup
fi

# Applied last, once the weights are in: the object store is reached at boot only. The saved
# ruleset is loaded again at every boot (enclave-firewall.service), before the network.
log "7/8 the host firewall"
run "$prefix/src/hardening/firewall/nft-policy.sh" apply "$conf/firewall.conf"

log "8/8 services"
if [[ $ROLE == engine ]]; then
    run systemctl enable --now enclave-firewall.service enclave-engines.service \
        enclave-exporter.service
else
    run systemctl enable --now enclave-firewall.service enclave-gateway.service
fi
log "done: $service is running"
