#!/usr/bin/env bash
# GPU check on a machine with an NVIDIA GPU: sets up .venv with a CUDA build of torch, the
# project and its CUDA kernels (flash-linear-attention, causal-conv1d), then runs
# benchmarks/gpu_parity.py: bf16 logit parity against transformers on the tiny test checkpoints
# and forward+backward tokens/s of a Qwen3.5-35B-A3B-shaped layer stack.
#
#   benchmarks/gpu_check.sh [gpu_parity.py options, e.g. --tolerance 2e-2 --seq 4096]
#
# PYTHON picks the interpreter that creates .venv (default python3, 3.11 as the project pins).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check.sh needs an NVIDIA GPU and its driver (nvidia-smi); none found on $(hostname)." >&2
    exit 1
fi
nvidia-smi -L

PYTHON=${PYTHON:-python3}
VENV=.venv
PY=$VENV/bin/python
test -x "$PY" || "$PYTHON" -m venv "$VENV"
"$PY" -m pip install -q --upgrade pip

# A .venv made on a CPU machine holds the CPU wheel of torch; swap it for the CUDA build.
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; then
    "$PY" -m pip uninstall -q -y torch 2>/dev/null || true
    "$PY" -m pip install -q 'torch==2.13.0'
fi
"$PY" -m pip install -q -e '.[test]'
"$PY" -m pip install -q 'flash-linear-attention>=0.4'
# causal-conv1d fetches a prebuilt wheel matching torch, or compiles against it (needs nvcc).
"$PY" -m pip install -q packaging ninja wheel setuptools
if ! "$PY" -m pip install -q --no-build-isolation 'causal-conv1d>=1.5'; then
    echo "causal-conv1d did not install: with no prebuilt wheel for this torch it compiles, which" \
        "needs the CUDA toolkit (nvcc) of torch's CUDA version; set CUDA_HOME and rerun" >&2
    exit 1
fi

"$PY" - <<'PY'
import sys

import torch

if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} in .venv cannot use the GPU (torch.cuda.is_available() is False)")
import causal_conv1d
import fla

print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), fla {fla.__version__}, causal-conv1d {causal_conv1d.__version__}")
PY

TORCHDYNAMO_DISABLE=1 "$PY" -m benchmarks.gpu_parity "$@"
