#!/usr/bin/env bash
# One device call for the compiled passes (decode/compact.py): the per-step table of every shape against the bytes
# floor with the pair table and kernel counts, a second process's compile time on a warm on-disk cache, the
# attention backends, then the GPU tests. Logs and JSON go to $OUT.
#   bash scripts/gpu_passes.sh        (in the repo root on the device; SHAPES, ATTN_SHAPES, TESTS override)
set -uo pipefail
export PYTHONPATH=. HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
SHAPES=${SHAPES:-demo_large demo_small qwen2.5_0.5b qwen2.5_1.5b qwen2.5_7b}
echo "== step table (fresh compile cache)"
timeout ${BENCH_TIMEOUT:-330} python3 scripts/bench_step.py --shapes $SHAPES --pairs --profile --uncompiled \
  --json "$OUT/bench_step.json" ${BENCH_ARGS:-} > "$OUT/bench_step.log" 2>&1
grep -v -i "warn" "$OUT/bench_step.log" | tail -60
echo "== a second process, warm cache"
timeout 120 python3 scripts/bench_step.py --compile-only qwen2.5_7b 2>&1 | grep -v -i warn | tail -2
if [[ -n "${ATTN_SHAPES-qwen2.5_0.5b}" ]]; then
  echo "== attention backends"
  timeout 150 python3 scripts/bench_step.py --shapes ${ATTN_SHAPES:-qwen2.5_0.5b} --attention cudnn efficient --repeats 3 \
    > "$OUT/attention.log" 2>&1; grep -A4 "^attention" "$OUT/attention.log"; grep -i "error" "$OUT/attention.log" | tail -3
fi
echo "== GPU tests"
timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py ${TESTS:+-k "$TESTS"} \
  > "$OUT/gpu_tests.log" 2>&1; tail -15 "$OUT/gpu_tests.log"
