#!/usr/bin/env bats
# hardening/patch-gpu-node.sh: refusals before anything happens. Its drain, wait and undrain
# against a real gateway and real engines: tests/integration/test_drain.py.

setup() {
    PATCH="$BATS_TEST_DIRNAME/../../hardening/patch-gpu-node.sh"
}

@test "without gateways or deployments it prints the usage" {
    run bash "$PATCH" --dry-run
    [ "$status" -eq 2 ]
    [[ "$output" == *"--gateway URL"* ]]
}

@test "without an admin key it refuses" {
    run env -u ENCLAVE_ADMIN_KEY bash "$PATCH" --gateway http://127.0.0.1:9 --deployment d
    [ "$status" -eq 2 ]
    [[ "$output" == *"ENCLAVE_ADMIN_KEY"* ]]
}

@test "an unreachable gateway stops it at the drain, before any package step" {
    ENCLAVE_ADMIN_KEY=k run bash "$PATCH" --dry-run --gateway http://127.0.0.1:9 \
        --deployment demo-chat-v1
    [ "$status" -ne 0 ]
    [[ "$output" == *"drain of demo-chat-v1 failed on http://127.0.0.1:9"* ]]
    [[ "$output" != *"apt-get"* ]]
}

@test "a bad timeout is refused" {
    ENCLAVE_ADMIN_KEY=k run bash "$PATCH" --gateway http://x --deployment d --timeout soon
    [ "$status" -eq 2 ]
}
