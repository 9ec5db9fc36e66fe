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
    [ "$status" -eq 65 ]
    [[ "$output" == *"bad.conf:2: expected key=value"* ]]
    printf 'role=engine\ngateway_addrs=10.1.1.1/33\nengine_ports=8101\nadmin_cidrs=none\n' > "$bad"
    run bash "$POLICY" print "$bad"
    [ "$status" -eq 65 ]
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
    [ "$status" -eq 65 ]
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
    [ "$status" -eq 1 ]
    [[ "$output" == *"nft refused the generated ruleset"* ]]
    [[ "$output" != *"ok"* ]]
}

@test "no command, or a wrong one, prints the usage and exits 64" {
    for args in "" "apply" "print a b" "frobnicate x" "rollback extra"; do
        # shellcheck disable=SC2086  # split on purpose
        run bash "$POLICY" $args
        [ "$status" -eq 64 ]
        [[ "$output" == *"nft-policy.sh apply CONFIG"* ]]
        [[ "$output" == *"Exit status"* ]]
    done
}

engine_conf() {  # an engine config with one line replaced or added
    printf 'role=engine\ngateway_addrs=10.0.1.10\nengine_ports=8101\nadmin_cidrs=none\n%s\n' "$1"
}

@test "numbers with leading zeros are refused: nft would read them as octal" {
    conf="$BATS_TEST_TMPDIR/zeros.conf"
    for line in "gateway_addrs=010.0.1.010" "gateway_addrs=10.0.1.10/08" "engine_ports=0443" \
                "monitoring_cidrs=10.0.09.0/24" "services=10.0.0.5:05432" "ssh_port=022"; do
        engine_conf "$line" > "$conf"
        run bash "$POLICY" print "$conf"
        [ "$status" -eq 65 ]
        [[ "$output" == *"has a leading zero (nft would read it as octal)"* ]]
        [[ "$output" != *"table inet enclave"* ]]
    done
}

@test "every address must be private unless allow_public_cidrs=yes" {
    conf="$BATS_TEST_TMPDIR/public.conf"
    for line in "monitoring_cidrs=8.8.8.0/24" "dns=1.1.1.1" "mirrors=151.101.0.0/16" \
                "services=52.1.2.3:5432" "gateway_addrs=172.0.0.0/8" "ntp=172.32.0.1" \
                "admin_cidrs=192.169.0.0/16"; do
        engine_conf "$line" > "$conf"
        run bash "$POLICY" print "$conf"
        [ "$status" -eq 65 ]
        [[ "$output" == *"is not a private network (RFC 1918); set allow_public_cidrs=yes"* ]]
    done
    engine_conf "monitoring_cidrs=8.8.8.0/24" > "$conf"
    printf 'allow_public_cidrs=yes\n' >> "$conf"
    run bash "$POLICY" print "$conf"
    [ "$status" -eq 0 ]
    [[ "$output" == *"ip saddr { 8.8.8.0/24 } tcp dport"* ]]
    for line in "monitoring_cidrs=10.0.0.0/8" "dns=127.0.0.53" "ntp=172.31.255.1" \
                "mirrors=192.168.0.0/16" "ntp=169.254.169.123"; do
        engine_conf "$line" > "$conf"
        run bash "$POLICY" print "$conf"
        [ "$status" -eq 0 ]
    done
}

@test "0.0.0.0/0 (or any /0) is refused, even with allow_public_cidrs=yes" {
    conf="$BATS_TEST_TMPDIR/all.conf"
    printf 'role=gateway\nclient_cidrs=0.0.0.0/0\nengine_addrs=10.0.5.20\nengine_ports=8101\n' > "$conf"
    printf 'admin_cidrs=none\nallow_public_cidrs=yes\n' >> "$conf"
    run bash "$POLICY" print "$conf"
    [ "$status" -eq 65 ]
    [[ "$output" == *"client_cidrs: '0.0.0.0/0' is every address"* ]]
    engine_conf "monitoring_cidrs=10.0.0.0/0" > "$conf"
    run bash "$POLICY" print "$conf"
    [ "$status" -eq 65 ]
    [[ "$output" == *"is every address"* ]]
    engine_conf "monitoring_cidrs=0.0.0.0/1 128.0.0.0/1" > "$conf"
    printf 'allow_public_cidrs=yes\n' >> "$conf"
    run bash "$POLICY" print "$conf"
    [ "$status" -eq 65 ]
    [[ "$output" == *"'0.0.0.0/1' is wider than a /8"* ]]
    engine_conf "allow_public_cidrs=maybe" > "$conf"
    run bash "$POLICY" print "$conf"
    [ "$status" -eq 65 ]
}

@test "ping is answered only from the configured networks" {
    run bash "$POLICY" print "$EXAMPLES/engine.conf"
    [ "$status" -eq 0 ]
    [[ "$output" == *"ip saddr { 10.0.1.10, 10.0.1.11, 10.0.9.0/24, 10.0.8.0/24 } icmp type echo-request limit rate 10/second accept"* ]]
    [ -z "$(grep -E 'icmp type \{[^}]*echo-request' <<< "$output")" ]  # not from anywhere
    [[ "$output" == *"icmp type { destination-unreachable, time-exceeded, parameter-problem }"* ]]
}
