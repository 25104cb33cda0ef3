#!/usr/bin/env bash
# The GPU figures of issue 16 and the GPU tests, in one pass on a CUDA machine (about 8 minutes on an H200):
# sampling images/s at batch 1, 16 and 64 (float32 and bf16, eager and with compiled blocks), the bf16
# training step's MFU at the d16 shape (eager, compiled, compiled with CUDA graphs), the fast samplers'
# speed-ups, each control injector's sampling time against the VAR's (the demo's shapes), and
# tests/test_gpu.py. Each step has a time limit and the pass a deadline (DEADLINE seconds,
# default 540): a step that would not fit is skipped and said so. Output goes to stdout and $OUT/log.txt.
#
#   OUT=/tmp/out bash tools/gpu_checks.sh
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
start=$(date +%s)
deadline=${DEADLINE:-540}
PY=${PYTHON:-python3}

step() {  # step SECONDS command...: run it unless the pass's deadline would pass first
    local limit=$1
    shift
    local left=$((deadline - ($(date +%s) - start)))
    if ((left < limit / 2)); then
        echo "== skipped (${left}s left): $*" | tee -a "$LOG"
        return
    fi
    ((limit > left)) && limit=$left
    echo "== $* (limit ${limit}s, at $(($(date +%s) - start))s)" | tee -a "$LOG"
    timeout "$limit" "$@" 2>&1 | grep -v -E "Warning|warn\(|^\s*$" | tee -a "$LOG"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee -a "$LOG"
$PY -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)" | tee -a "$LOG"
step 120 $PY tools/bench_sample.py --device cuda --batch-sizes 1 16 64 --bf16 --repeats 3
step 120 $PY tools/bench_train.py --device cuda --bf16 --batch-size 32 --repeats 5 --one-masked-call
step 90 $PY tools/bench_fast_sampling.py speed --device cuda --batch-sizes 1 16 64 --repeats 3
step 60 $PY tools/bench_control_sampling.py --device cuda --batch-size 16 --repeats 5
step 150 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py
step 150 $PY tools/bench_train.py --device cuda --bf16 --batch-size 32 --repeats 5 --compile default
step 150 $PY tools/bench_sample.py --device cuda --batch-sizes 1 16 64 --bf16 --repeats 3 --compile default
step 150 $PY tools/bench_train.py --device cuda --bf16 --batch-size 32 --repeats 5 --compile reduce-overhead
echo "== done in $(($(date +%s) - start))s" | tee -a "$LOG"
