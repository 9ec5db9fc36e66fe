"""The benchmark (`enclave bench`): the gateway against a bare proxy and the bare upstream, in one
run, so that only ratios are compared. Not part of the test suite."""
