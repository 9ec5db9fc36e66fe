#!/usr/bin/env bash
# The test command: from a fresh clone, set up everything the suite needs and run it.
#   bash tests/run.sh                 # everything (lint, types, unit, real engines)
#   bash tests/run.sh tests/unit      # only what needs no engine (seconds)
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3.11}
if [[ ! -x .venv/bin/python ]]; then
    "$python" -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -e '.[dev]'

if [[ $# -eq 0 ]]; then
    .venv/bin/ruff check serving tests
    .venv/bin/mypy
fi
# The engine environment (vLLM in its own virtualenv) and the demo model: no-ops once done.
if [[ $# -eq 0 || "$*" == *integration* ]]; then
    .venv/bin/enclave engines setup
    .venv/bin/enclave models build-demo
fi
exec .venv/bin/pytest "$@"
