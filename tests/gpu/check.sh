#!/usr/bin/env bash
# The GPU exporter against a real NVIDIA GPU, in one command, on a host with no network.
#
#   bash tests/gpu/check.sh --prepare   once, where PyPI is reachable: the exporter's own
#                                       dependencies into tests/gpu/.deps (a few MiB, pure Python)
#   bash tests/gpu/check.sh             on the GPU host: exporter vs nvidia-smi, a table, exit 1
#                                       on a mismatch, 2 when there is no GPU or no python
#
# It starts `python -m monitoring.exporter` on a free loopback port against the real NVML, holds
# some GPU memory with whatever CUDA program the host offers (PyTorch, else CuPy; else none, and
# it says so), and compares the exporter's readings with nvidia-smi's (tests/gpu/compare.py):
# utilisation, memory used and total, temperature, power, SM and memory clocks, ECC counts,
# retired pages and remapped rows where supported, DCGM names and labels, enclave_gpu_up, and
# the per-process memory attribution. No vLLM, no torch needed by the exporter itself.
#
# Environment: PYTHON (default python3: 3.11 or later), NVIDIA_SMI (default nvidia-smi).
# Tests only: ENCLAVE_GPU_CHECK_FAKE=N runs the exporter over its FAKE NVML with N GPUs (and
# NVIDIA_SMI must then name a fake that describes the same GPUs).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
deps=$here/.deps
PYTHON=${PYTHON:-python3}
NVIDIA_SMI=${NVIDIA_SMI:-nvidia-smi}
FAKE=${ENCLAVE_GPU_CHECK_FAKE:-}
# The versions pyproject.toml pins for the gateway's environment.
PINS=(click==8.5.1 prometheus-client==0.26.0 nvidia-ml-py==13.615.71)

if [[ ${1:-} == --prepare ]]; then
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-compile \
        --upgrade --target "$deps" "${PINS[@]}"
    echo "dependencies in $deps ($(du -sh "$deps" | cut -f1)); the GPU host needs only this tree"
    exit 0
fi
[[ $# -eq 0 ]] || { sed -n '2,21s/^# \{0,1\}//p' "$0" >&2; exit 64; }

command -v "$PYTHON" > /dev/null || { echo "no $PYTHON on this host" >&2; exit 2; }
if [[ -z $FAKE ]] && ! "$NVIDIA_SMI" -L > /dev/null 2>&1; then
    echo "no NVIDIA GPU here ($NVIDIA_SMI -L failed): nothing to check" >&2
    exit 2
fi
export PYTHONPATH="$repo${deps:+:$deps}${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c 'import click, prometheus_client, pynvml, monitoring.exporter' 2> /dev/null || {
    echo "the exporter cannot be imported with $PYTHON: run 'bash tests/gpu/check.sh" \
        "--prepare' where PyPI is reachable, then carry tests/gpu/.deps" >&2
    exit 2
}

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2> /dev/null || true; done; wait 2> /dev/null; }
trap cleanup EXIT
work=$(mktemp -d)
trap 'cleanup; rm -rf "$work"' EXIT

port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
args=(--host 127.0.0.1 --port "$port")
[[ -n $FAKE ]] && args+=(--fake-gpus "$FAKE")
ENCLAVE_EXPORTER_ENGINES_FILE=$work/engines.json \
    "$PYTHON" -m monitoring.exporter "${args[@]}" > "$work/exporter.log" 2>&1 &
exporter=$!
pids+=("$exporter")

holder=""
if [[ -n $FAKE ]]; then
    holder=$exporter  # the FAKE NVML's first GPU lists the exporter's own process
    export ENCLAVE_GPU_CHECK_HOLDER_PID=$holder
else
    # Whatever CUDA program this host offers, to check the per-process attribution.
    hold='
import sys, time
try:
    import torch
    x = torch.empty(256 << 20, dtype=torch.uint8, device="cuda"); torch.cuda.synchronize()
    what = "torch"
except Exception:
    import cupy
    x = cupy.zeros(256 << 20, dtype=cupy.uint8); cupy.cuda.Device().synchronize()
    what = "cupy"
print("holding 256 MiB with", what, flush=True)
time.sleep(600)
'
    # The host's own python (which may hold PyTorch), not our dependency path.
    env -u PYTHONPATH "${HOLDER_PYTHON:-python3}" -c "$hold" > "$work/holder.log" 2>&1 &
    holder=$!
    pids+=("$holder")
    for _ in $(seq 1 120); do
        grep -q holding "$work/holder.log" 2> /dev/null && break
        kill -0 "$holder" 2> /dev/null || break
        sleep 0.5
    done
    if grep -q holding "$work/holder.log" 2> /dev/null; then
        echo "$(cat "$work/holder.log") (pid $holder)"
        sleep 2  # NVML lists a context a moment after it is made
    else
        echo "no CUDA program available here (neither PyTorch nor CuPy could allocate):" \
            "the per-process attribution is not checked"
        holder=""
    fi
fi

for _ in $(seq 1 60); do
    "$PYTHON" -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1], timeout=2)" \
        "http://127.0.0.1:$port/metrics" 2> /dev/null && break
    kill -0 "$exporter" 2> /dev/null || { cat "$work/exporter.log" >&2; exit 1; }
    sleep 0.5
done
echo "exporter: $(grep -m1 -o 'GPU exporter on .*' "$work/exporter.log" || echo started)"
echo "nvidia-smi: $("$NVIDIA_SMI" --query-gpu=driver_version,name --format=csv,noheader | head -1)"

expect=$("$NVIDIA_SMI" -L | grep -c '^GPU ' || true)
"$PYTHON" "$here/compare.py" "http://127.0.0.1:$port/metrics" --nvidia-smi "$NVIDIA_SMI" \
    --expect-gpus "$expect" ${holder:+--holder-pid "$holder"}
