#!/usr/bin/env bash
# The GPU check, for a machine with one NVIDIA GPU and no package registry: Python 3.12 with a
# CUDA build of torch, transformers, peft, lightning, safetensors and pyarrow installed. What that
# machine lacks travels as wheels in .whl/ (`make gpu-wheels` on a machine with a registry) and is
# installed with `pip install --no-index --target`; nothing else is installed, and causal-conv1d,
# which has no wheel, is left out (the model then runs the torch conv path).
#
# Within about 8 minutes it runs, each step with its own time limit and log:
#   (a) `python train.py` for 2 steps on tiny_dense and on tiny_moe (1 GPU, EP=1, bf16, no logger)
#       with the save at step 2: training state, PEFT adapter, merged checkpoint, export check;
#   (b) each CUDA kernel's forward and backward against the project's torch path (packed inputs);
#   (c) our bf16 logits against transformers fp32 at 4,096 tokens, rows and packed;
#   (d) a LoRA training step of a Qwen3.5-35B-A3B-width 4-layer stack: tokens/s, peak memory.
# The last thing it prints is one table of every result; full logs go to $OUT (default
# outputs/gpu_check): install.log, one log per step, results.jsonl and table.txt.
#
#   make gpu-wheels            # where a registry is reachable
#   bash benchmarks/gpu_check.sh
#
# PYTHON picks the interpreter (default python3); GPU_CHECK_BUDGET_S the total time (default 480).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$REPO/outputs/gpu_check}
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
SITE=$WORK/site
mkdir -p "$OUT"
RESULTS=$OUT/results.jsonl
: >"$RESULTS"
START=$(date +%s)

fail() {
    echo "gpu_check.sh: $*" >&2
    exit 1
}

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    fail "needs an NVIDIA GPU and its driver (nvidia-smi); none found on $(hostname)"
fi
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    fail "$PYTHON has no torch that can use the GPU (torch.cuda.is_available() is False)"
fi
if ! ls .whl/*.whl >/dev/null 2>&1; then
    fail "no wheels in .whl/: run 'make gpu-wheels' where a package registry is reachable and carry .whl/"
fi

{
    nvidia-smi -L
    "$PYTHON" -m pip install --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
} >"$OUT/install.log" 2>&1 || fail "installing .whl/*.whl failed: see $OUT/install.log"
export PYTHONPATH=$SITE:$REPO
export TORCHDYNAMO_DISABLE=1 PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$WORK/triton WANDB_MODE=disabled
"$PYTHON" - >>"$OUT/install.log" 2>&1 <<'PY' || fail "the installed packages do not import: see $OUT/install.log"
import importlib.metadata as metadata
import importlib.util

import torch

print(f"{torch.cuda.get_device_name()}, torch {torch.__version__} (CUDA {torch.version.cuda})")
for name in ("megatron-core", "hydra-core", "omegaconf", "transformers", "peft", "lightning", "flash-linear-attention", "fla-core"):
    print(f"{name} {metadata.version(name)}")
for module in ("fla", "causal_conv1d", "flash_attn"):
    print(f"{module}: {'importable' if importlib.util.find_spec(module) else 'absent'}")
import fla.ops.gated_delta_rule  # noqa: F401
import hydra  # noqa: F401
import megatron.core  # noqa: F401
PY
tail -n 12 "$OUT/install.log"

record() {
    "$PYTHON" -c 'import json, sys; print(json.dumps(dict(zip(("check", "result", "status"), sys.argv[1:]))))' "$@" >>"$RESULTS"
}

# run_step NAME LIMIT_S COMMAND...: the command under min(LIMIT_S, what is left of the budget),
# its output in $OUT/NAME.log; a non-zero exit adds a FAIL row naming the log.
run_step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET_S - ($(date +%s) - START)))
    ((left < limit)) && limit=$left
    if ((limit < 20)); then
        record "$name" "not run: the ${BUDGET_S}s budget is spent" "skip"
        return
    fi
    echo "== $name (limit ${limit}s)"
    local began=$(date +%s) rc=0
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
    local took=$(($(date +%s) - began))
    if ((rc == 124 || rc == 137)); then
        record "$name" "timed out after ${took}s: see $name.log" "FAIL"
    elif ((rc != 0)); then
        record "$name" "exit $rc after ${took}s: $(tail -n 1 "$OUT/$name.log" | cut -c1-150) (see $name.log)" "FAIL"
    fi
    echo "   ${took}s, exit $rc"
}

train_step() {
    local model=$1 run=$WORK/train_$1
    "$PYTHON" train.py "model=$model" model.dtype=bfloat16 trainer.devices=1 parallel.ep=1 logger=none trainer.max_steps=2 \
        checkpoint.every_n_steps=2 export.check=true export.background=false "output_dir=$run" || return
    "$PYTHON" - "$run" "$model" >>"$RESULTS" <<'PY'
import json
import sys
from pathlib import Path

run, model = Path(sys.argv[1]), sys.argv[2]
steps = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
save = run / "checkpoints" / "step-2"
manifest = json.loads((save / "export_manifest.json").read_text())
files = all((save / part).is_dir() for part in ("training_state", "hf_adapter", "hf_merged"))
loss = [step["train/loss"] for step in steps if "train/loss" in step]
finite = all(value == value and abs(value) < 1e4 for value in loss)
ok = files and manifest["check"]["passed"] and finite and len(loss) == 2
result = (f"2 steps bf16, loss {loss[0]:.3f} -> {loss[-1]:.3f}, {steps[-1]['train/tokens_per_s']:.0f} tokens/s; "
          f"save: state+adapter+merged {'written' if files else 'MISSING'}, export check "
          f"{'passed' if manifest['check']['passed'] else 'FAILED: ' + manifest['check']['message']}")
print(json.dumps({"check": f"train.py {model}", "result": result, "status": "ok" if ok else "FAIL"}))
PY
}

export PYTHON WORK RESULTS
export -f train_step
run_step train_tiny_dense 110 bash -c 'train_step "$1"' _ tiny_dense
run_step train_tiny_moe 110 bash -c 'train_step "$1"' _ tiny_moe
run_step kernels 80 "$PYTHON" -m benchmarks.gpu_check kernels --results "$RESULTS"
run_step logits 80 "$PYTHON" -m benchmarks.gpu_check logits --results "$RESULTS" --seq 4096
run_step stack 150 "$PYTHON" -m benchmarks.gpu_check stack --results "$RESULTS" --seq 4096

echo
echo "GPU check, $(($(date +%s) - START))s; logs in $OUT"
"$PYTHON" -m benchmarks.gpu_check table "$RESULTS" | tee "$OUT/table.txt"
! grep -q '"status": "FAIL"' "$RESULTS"
