#!/usr/bin/env bash
# The one prepared GPU check (issue 6), done within 580 s (BUDGET) of a lent NVIDIA machine:
#   1. the Triton kernel tests, the kernel-dispatch model test and the NCCL test, on the GPU;
#   2. greedy correctness: distgen on the GPU (float32; CUDA graphs, eager, chunked prefill, prefix
#      cache, async scheduling) against transformers on the CPU, tiny models (benchmarks/gpu_greedy.py);
#   3. benchmarks/attention_kernels.py: the paged-attention kernels alone (decode vs prefill kernel);
#   4. benchmarks/gpu.py: the Llama-3.2-1B-shaped bf16 benchmark (distgen with and without async
#      scheduling) against HF generate (eager, static);
#   5. benchmarks/decode_anatomy.py: a batch-1 decode step of that model kernel by kernel (what the
#      step costs beside the weight floor), with whatever time the 580 s budget has left;
# then a summary table, printed last. Logs and gpu.json go to $OUT (or /tmp/gpu_check).
#
# The GPU image has torch, triton, transformers, safetensors, pytest(-timeout), tqdm, numpy, jinja2,
# but not msgspec or pyzmq: carry them as wheels in wheels/ (git-ignored). Make them here, once:
#
#   .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d wheels msgspec==0.22.0 pyzmq==27.3.0
#
# and run, through the device tool:  run(command="bash benchmarks/gpu_check.sh", carry=["wheels"],
# timeout_s=600). Record the numbers in benchmarks/GPU_NOTES.md with the card named.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}

if [ "${SKIP_WHEELS:-0}" != 1 ] && ls wheels/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    wheels/*.whl || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  echo "no wheels/ installed (none carried, or SKIP_WHEELS=1): msgspec and pyzmq must be importable"
  export PYTHONPATH=$PWD
fi

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader || true
$PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"

declare -a SUMMARY=()
stage() {  # stage NAME SECONDS LOG COMMAND...: run with a time limit, record status and duration
  local name=$1 limit=$2 log=$3
  shift 3
  echo "=== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout --signal=TERM --kill-after=15 "$limit" "$@" 2>&1 | tee "$OUT/$log"
  local rc=${PIPESTATUS[0]}
  local status=pass
  if [ "$rc" = 124 ]; then status="TIMEOUT"; elif [ "$rc" != 0 ]; then status="FAIL (rc $rc)"; fi
  SUMMARY+=("| $name | $status | $((SECONDS - t0)) |")
}

# SMOKE=1 runs the script's own plumbing on any machine in a minute or two (tiny sizes, fewer checks).
# GPU_BENCH_ARGS adds flags to gpu.py (e.g. --skip-hf-static when time is short).
GREEDY_ARGS=() BENCH_ARGS=(${GPU_BENCH_ARGS:-})
if [ "${SMOKE:-0}" = 1 ]; then GREEDY_ARGS=(--archs llama --scenarios graphs); BENCH_ARGS+=(--tiny); fi

stage "kernel + dispatch + NCCL tests" 120 tests.log \
  $PY -m pytest -q --timeout 60 -p no:cacheprovider tests/kernels tests/layers/test_kernel_dispatch.py tests/distributed
stage "greedy GPU vs CPU reference" 90 greedy.log $PY benchmarks/gpu_greedy.py "${GREEDY_ARGS[@]}"
stage "attention kernels alone" 40 attention.log $PY benchmarks/attention_kernels.py
stage "benchmarks/gpu.py" 250 gpu.log $PY benchmarks/gpu.py --json "$OUT/gpu.json" "${BENCH_ARGS[@]}"
# Last and optional: it gets what is left of BUDGET (under the device tool's 600 s), 60 s at most.
LEFT=$(( ${BUDGET:-580} - SECONDS ))
ANATOMY_ARGS=()
if [ "${SMOKE:-0}" = 1 ]; then ANATOMY_ARGS=(--tiny); fi
if [ "$LEFT" -ge 25 ]; then
  stage "decode step anatomy" $(( LEFT < 60 ? LEFT : 60 )) anatomy.log \
    $PY benchmarks/decode_anatomy.py "${ANATOMY_ARGS[@]}"
else
  SUMMARY+=("| decode step anatomy | skipped (${LEFT}s left) | 0 |")
fi

echo
echo "| stage | status | s |"
echo "|---|---|---|"
printf '%s\n' "${SUMMARY[@]}"
echo "greedy scenarios passing: $(grep -c '| pass |' "$OUT/greedy.log")," \
  "failing: $(grep -c '| FAIL' "$OUT/greedy.log")"
echo
grep '^| ' "$OUT/attention.log" || true
echo
sed -n '/^| decode step, batch 1/,$p' "$OUT/anatomy.log" 2>/dev/null || true
echo
sed -n '/^| engine/,$p' "$OUT/gpu.log"
