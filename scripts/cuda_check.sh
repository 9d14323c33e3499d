#!/usr/bin/env bash
# A short check of the engine and the trainer on a CUDA GPU (docs/results/gpu.md "On a GPU"): the
# lossless and online-loop tests with tiny models on the GPU, then day 0 on the bundled model in
# float32 and bfloat16 (target-only against online learning, the trainer process on the same GPU).
#   bash scripts/cuda_check.sh MODEL OUT_DIR [REQUESTS_PER_DOMAIN]
# MODEL: a bundled name (smollm2-135m) or a .gguf path; the traffic comes from $AURORA_TRAFFIC or
# ../shared/data/traffic. Each stage runs under its own time limit and the script goes on to the
# next whatever happens, so one run reports everything it can; CHECK_TESTS_S and CHECK_BENCH_S
# (default 300) bound the test stage and each bench.
set -uo pipefail
cd "$(dirname "$0")/.."
model=$1 out=$2 requests=${3:-10}
py=${PYTHON:-python3}
device=${AURORA_CHECK_DEVICE:-cuda}  # cpu: rehearse this script on a machine without a GPU
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$out"

stage() { echo; echo "=== $* ($(date -u +%T))"; }

stage environment
nvidia-smi -L 2>&1 | head -2
$py -c 'import torch, transformers; print("torch", torch.__version__, "transformers",
transformers.__version__, "cuda", torch.cuda.is_available() and torch.cuda.get_device_name())'

stage "tests with tiny models on the GPU (pytest -k cuda)"
timeout "${CHECK_TESTS_S:-300}" $py -m pytest -q -p no:cacheprovider -k cuda tests/unit/test_engine_lossless.py \
    tests/unit/test_flywheel_online.py tests/unit/test_flywheel_losses.py tests/unit/test_eagle3.py \
    2>&1 | tail -15

for dtype in float32 bfloat16; do
    stage "day 0, $dtype: aurora bench --arms none,online, $requests requests per domain"
    timeout "${CHECK_BENCH_S:-300}" $py -m aurora_spec.cli -v bench --device "$device" --dtype "$dtype" \
        --model "$model" --arms none,online --domains chat,code,math --requests "$requests" \
        --max-tokens 64 --no-progress --no-plot --out "$out/day0-$dtype" 2>&1 \
        | grep -v "^INFO:httpx" | tail -25
done
stage done
