"""The `enclave` command-line tool (control plane). Builds Settings and calls services."""
