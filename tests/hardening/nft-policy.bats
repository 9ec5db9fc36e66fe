#!/usr/bin/env bats
# hardening/firewall/nft-policy.sh: generation, validation, dry run.

setup() {
    POLICY="$BATS_TEST_DIRNAME/../../hardening/firewall/nft-policy.sh"
    EXAMPLES="$BATS_TEST_DIRNAME/../../hardening/firewall/examples"
}

@test "print generates a default-drop table for each role" {
    for role in gateway engine all-in-one; do
        run bash "$POLICY" print "$EXAMPLES/$role.conf"
        [ "$status" -eq 0 ]
        [[ "$output" == *"hook input priority filter; policy drop;"* ]]
        [[ "$output" == *"hook output priority filter; policy drop;"* ]]
        [[ "$output" == *"hook forward priority filter; policy drop;"* ]]
        [[ "$output" == *'log prefix "enclave drop in: "'* ]]
    done
}

@test "the engine role opens engine ports to the gateways only" {
    run bash "$POLICY" print "$EXAMPLES/engine.conf"
    [ "$status" -eq 0 ]
    [[ "$output" == *"ip saddr { 10.0.1.10, 10.0.1.11 } tcp dport { 8101, 8102 } accept"* ]]
    [ -z "$(grep 'ip saddr .*dport { 8000 }' <<< "$output")" ]  # no gateway port to open
}

@test "the gateway role reaches the engines and opens its port to clients" {
    run bash "$POLICY" print "$EXAMPLES/gateway.conf"
    [[ "$output" == *"ip saddr { 10.0.2.0/24, 10.0.3.0/24 } tcp dport { 8000 } accept"* ]]
    [[ "$output" == *"ip daddr { 10.0.5.20, 10.0.5.21 } tcp dport { 8101, 8102 } accept"* ]]
}

@test "a bad config is refused with the line or key that is wrong" {
    bad="$BATS_TEST_TMPDIR/bad.conf"
    printf 'role=engine\nthis is not a setting\n' > "$bad"
    run bash "$POLICY" print "$bad"
    [ "$status" -eq 2 ]
    [[ "$output" == *"bad.conf:2: expected key=value"* ]]
    printf 'role=engine\ngateway_addrs=10.1.1.1/33\nengine_ports=8101\nadmin_cidrs=none\n' > "$bad"
    run bash "$POLICY" print "$bad"
    [ "$status" -eq 2 ]
    [[ "$output" == *"'10.1.1.1/33' is not an IPv4 address or CIDR"* ]]
}

@test "check validates the ruleset with nft -c and applies nothing" {
    run bash "$POLICY" check "$EXAMPLES/engine.conf"
    [ "$status" -eq 0 ]
    run nft list table inet enclave
    [ "$status" -ne 0 ] || [[ "$output" != *"10.0.1.10"* ]]
}

@test "ssh must be said: admin_cidrs, or admin_cidrs=none" {
    bad="$BATS_TEST_TMPDIR/nossh.conf"
    printf 'role=engine\ngateway_addrs=10.1.1.1\nengine_ports=8101\n' > "$bad"
    run bash "$POLICY" print "$bad"
    [ "$status" -eq 2 ]
    [[ "$output" == *"needs admin_cidrs"* ]]
    printf 'admin_cidrs=none\n' >> "$bad"
    run bash "$POLICY" print "$bad"
    [ "$status" -eq 0 ]
    [[ "$output" != *"dport { 22 }"* ]]
}

@test "monitoring scrapes the gateway and engine ports; other services are explicit" {
    run bash "$POLICY" print "$EXAMPLES/gateway.conf"
    [[ "$output" == *"ip saddr { 10.0.9.0/24 } tcp dport { 8000, 9100 } accept"* ]]
    [[ "$output" == *"ip saddr { 10.0.5.20, 10.0.5.21 } tcp dport { 8000 } accept"* ]]
    [[ "$output" == *"ip daddr 10.0.0.5 tcp dport 5432 accept"* ]]
    run bash "$POLICY" print "$EXAMPLES/engine.conf"
    [[ "$output" == *"ip saddr { 10.0.9.0/24 } tcp dport { 8101, 8102, 9400, 9100 } accept"* ]]
    [[ "$output" == *"ip daddr { 10.0.1.10, 10.0.1.11 } tcp dport { 8000 } accept"* ]]
}

@test "check fails when nft refuses the ruleset" {
    NFT=false run bash "$POLICY" check "$EXAMPLES/engine.conf"
    [ "$status" -eq 2 ]
    [[ "$output" == *"nft refused the generated ruleset"* ]]
    [[ "$output" != *"ok"* ]]
}

@test "no command prints the usage" {
    run bash "$POLICY"
    [ "$status" -eq 2 ]
    [[ "$output" == *"nft-policy.sh apply CONFIG"* ]]
}
