#!/usr/bin/env bats
bats_require_minimum_version 1.5.0
# hardening/lib/common.sh: the value checks every script relies on.

setup() {
    # shellcheck source=../../hardening/lib/common.sh
    source "$BATS_TEST_DIRNAME/../../hardening/lib/common.sh"
}

@test "IPv4 addresses and CIDRs" {
    is_ipv4 10.0.0.1
    is_ipv4 10.0.0.0/8
    is_ipv4 255.255.255.255/32
    run ! is_ipv4 10.0.0.256
    run ! is_ipv4 10.0.0.1/33
    run ! is_ipv4 10.0.0
    run ! is_ipv4 "10.0.0.1; rm -rf /"
    run ! is_ipv4 fe80::1
}

@test "ports" {
    is_port 1
    is_port 65535
    run ! is_port 0
    run ! is_port 65536
    run ! is_port 80a
}
