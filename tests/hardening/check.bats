#!/usr/bin/env bats
# hardening/check.sh, in a network namespace of its own (the host's firewall is not touched).

setup() {
    HARDENING="$BATS_TEST_DIRNAME/../../hardening"
    NS="enc-check-$$"
    ip netns add "$NS"
}

teardown() {
    ip netns del "$NS"
}

@test "without the firewall it fails, in text and in JSON, and exits 1" {
    run ip netns exec "$NS" bash "$HARDENING/check.sh"
    [ "$status" -eq 1 ]
    [[ "$output" == *"FAIL firewall"* ]]
    run ip netns exec "$NS" bash "$HARDENING/check.sh" --json
    [ "$status" -eq 1 ]
    echo "$output" | python3 -c '
import json, sys
report = json.load(sys.stdin)
assert report["passed"] is False
controls = {c["name"]: c["status"] for c in report["controls"]}
assert controls["firewall"] == "fail", controls
assert set(controls) == {"firewall", "sysctl", "sshd", "auditd", "secrets", "upgrades",
                         "held", "units"}, controls'
}

@test "after applying the policy the firewall control passes" {
    ENCLAVE_FIREWALL_STATE_DIR="$BATS_TEST_TMPDIR/fw" \
        ip netns exec "$NS" bash "$HARDENING/firewall/nft-policy.sh" apply \
        "$HARDENING/firewall/examples/all-in-one.conf"
    run ip netns exec "$NS" bash "$HARDENING/check.sh"
    [[ "$output" == *"PASS firewall"* ]]
}

@test "an installed baseline passes the file controls; a readable pepper fails" {
    root="$BATS_TEST_TMPDIR/root"
    bash "$HARDENING/install-baseline.sh" --root "$root"
    run bash "$HARDENING/check.sh" --root "$root"
    [[ "$output" == *"PASS upgrades"* ]]
    [[ "$output" == *"PASS units"* ]]
    [[ "$output" == *"PASS secrets"* ]]
    echo secret > "$root/var/lib/enclave/pepper"
    chmod 644 "$root/var/lib/enclave/pepper"
    run bash "$HARDENING/check.sh" --root "$root"
    [ "$status" -eq 1 ]
    [[ "$output" == *"FAIL secrets"*"pepper is 644"* ]]
}
