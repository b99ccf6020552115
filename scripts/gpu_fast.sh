#!/usr/bin/env bash
# One device call for the fast path: the GPU tests (CUDA graphs against the eager path and greedy generate,
# float32) and the per-step benchmark of every model shape against the bytes floor (bf16).
#   bash scripts/gpu_fast.sh   (in the repo root on the device; logs go to $OUT)
set -uo pipefail
export PYTHONPATH=. HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
echo "== GPU tests (pytest -m gpu)"
timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
echo "== step benchmark"
timeout ${BENCH_TIMEOUT:-270} python3 scripts/bench_step.py ${SHAPES:+--shapes $SHAPES} 2>&1 | tee "$OUT/bench_step.log" | grep -v Warning
