#!/usr/bin/env bats
# hardening/install-baseline.sh into a scratch root.

setup() {
    HARDENING="$BATS_TEST_DIRNAME/../../hardening"
}

@test "files land with their modes; secrets directory is private" {
    root="$BATS_TEST_TMPDIR/root"
    run bash "$HARDENING/install-baseline.sh" --root "$root"
    [ "$status" -eq 0 ]
    [ "$(stat -c %a "$root/etc/ssh/sshd_config.d/00-enclave.conf")" = 600 ]
    [ "$(stat -c %a "$root/etc/sysctl.d/99-enclave.conf")" = 644 ]
    [ "$(stat -c %a "$root/var/lib/enclave")" = 700 ]
    grep -q '"nvidia-";' "$root/etc/apt/apt.conf.d/50enclave-unattended-upgrades"
    [ -f "$root/etc/systemd/system/enclave-gateway.service" ]
}

@test "a dry run changes nothing and says what it would do" {
    root="$BATS_TEST_TMPDIR/dry"
    run bash "$HARDENING/install-baseline.sh" --dry-run --root "$root"
    [ "$status" -eq 0 ]
    [[ "$output" == *"[dry-run] install -D -m 644"*"99-enclave.conf"* ]]
    [ ! -e "$root" ]
}

@test "every unit is sandboxed: systemd-analyze exposure at most 3.0" {
    for unit in "$HARDENING"/systemd/*.service; do
        score=$(systemd-analyze security --offline=true "$unit" 2>/dev/null \
                | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
        [ -n "$score" ]
        awk -v s="$score" 'BEGIN { exit !(s <= 3.0) }'
    done
}
