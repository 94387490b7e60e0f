#!/usr/bin/env bash
# Every check and benchmark that needs an NVIDIA GPU, as one run (a borrowed machine is held by the minute):
#   1. the machine and the library versions;
#   2. the cuDNN attention kernel against the reference (tests/test_attention.py, values and gradients);
#   3. the train step in bf16 for the 125m and 1b presets, against the same model in PyTorch (eager and
#      torch.compile, bf16 autocast), tokens/s, MFU against the card's catalog peak, peak device memory.
# Usage: OUT=/some/dir benchmarks/gpu_session.sh   (each part's output lands in $OUT, so a part that fails or runs
# out of time leaves the others' results). It runs from the source tree with the machine's own jax, flax and torch.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/chipwise-gpu}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda
# JAX would take 75% of the card at start-up and leave PyTorch, timed in the same process afterwards, too little.
export XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv
    python3 -c 'import sys, jax, flax, optax, torch; print("python", sys.version.split()[0], "jax", jax.__version__,
"flax", flax.__version__, "optax", optax.__version__, "torch", torch.__version__); print(jax.devices())'
    lscpu | grep -E "Model name|^CPU\(s\)"
} 2>&1 | tee "$OUT/env.txt"

timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_attention.py -k cudnn 2>&1 | tee "$OUT/kernels.txt"

bench() {  # name, timeout, then train_step.py arguments
    local name=$1 limit=$2
    shift 2
    timeout "$limit" python3 benchmarks/train_step.py --dtype bfloat16 --compare-torch --markdown "$@" 2>&1 \
        | tee "$OUT/train_$name.txt"
}
bench 125m 200 --preset 125m --batch-size 32 --seq-len 2048 --steps 20 --warmup 3
bench 1b 260 --preset 1b --batch-size 8 --seq-len 2048 --steps 10 --warmup 2
