#!/usr/bin/env bash
# One device hold over decode/kernels.py's product kernel (decode.compact.PRODUCT_KERNEL), most wanted first: the
# kernel against cuBLAS at the real shapes' products; the lossless mode in bf16 on random pairs, compiled, with the
# kernel; the step and checks at the 0.5B and 7B shapes with it and without it (bench_step variants, with the kernels
# of a step and of checks); every GPU test (8 processes at once); the demo pair's sizes; the lossless mode without
# the kernel; last, the kernel's settings swept.
# The kernel is off by default; the step benchmarks run with BILD_PRODUCT_KERNEL=1, so their first runner, its
# profile and the "default" variant have it, the "no-product" variant not.
# Run detached from a copy under /tmp and waited for across calls:
#   bash scripts/gpu_product.sh start     # first call: starts the job, waits WAIT s (default 540)
#   bash scripts/gpu_product.sh wait      # later calls on the still-warm machine
# The logs come back as logs.tgz at every call.
set -uo pipefail
source scripts/detached.sh
W=/tmp/bild-p; SCRIPT=runs/product_job.sh; LOG=runs/product_job.log
if [[ ${1:-wait} == start ]]; then
  mkdir -p runs
  cat > $SCRIPT <<'JOB'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
t() { echo "== $(date +%H:%M:%S) $1"; }
source scripts/detached.sh
t "1 the product kernel against cuBLAS"
timeout 150 python3 scripts/bench_product.py --shapes qwen2.5_0.5b qwen2.5_1.5b qwen2.5_7b demo_large > runs/product.log 2>&1
tail -24 runs/product.log
t "2 the lossless mode in bf16 on random pairs, compiled"
LL=(python3 scripts/check_lossless.py --device cuda --dtype bfloat16 --reference greedy --compile)
BILD_PRODUCT_KERNEL=1 timeout 200 "${LL[@]}" --pair demo_large demo_small --pairs 60 > runs/lossless_demo.log 2>&1
tail -2 runs/lossless_demo.log
BILD_PRODUCT_KERNEL=1 timeout 240 "${LL[@]}" --pair qwen2.5_1.5b qwen2.5_0.5b --pairs 20 > runs/lossless_qwen.log 2>&1
tail -2 runs/lossless_qwen.log
t "3 the 0.5B and 7B shapes, with and without the kernel"
BILD_PRODUCT_KERNEL=1 timeout 420 python3 scripts/bench_step.py --shapes qwen2.5_0.5b qwen2.5_7b --pairs --profile \
  --profile-checks --repeats 3 --variants default no-product --json runs/step_real.json > runs/step_real.log 2>&1
grep "^| [a-z]" runs/step_real.log | grep -v "^| shape" | head -30
t "4 every GPU test, in 8 processes at once"
gpu_tests_alongside runs; wait; gpu_tests_verdict runs
t "5 the demo pair's sizes"
BILD_PRODUCT_KERNEL=1 timeout 240 python3 scripts/bench_step.py --shapes demo_large demo_small --repeats 3 \
  --variants default no-product --json runs/step_demo.json > runs/step_demo.log 2>&1
grep "^| [a-z]" runs/step_demo.log | grep -v "^| shape" | head -20
t "6 the lossless mode without the kernel"
BILD_PRODUCT_KERNEL=0 timeout 200 "${LL[@]}" --pair demo_large demo_small --pairs 60 > runs/lossless_demo_off.log 2>&1
tail -2 runs/lossless_demo_off.log
t "7 the kernel's settings swept"
timeout 300 python3 scripts/bench_product.py --shapes qwen2.5_0.5b qwen2.5_7b --sweep > runs/product_sweep.log 2>&1
tail -12 runs/product_sweep.log
echo JOB DONE
JOB
  detached_start $W $SCRIPT $LOG
fi
detached_wait $W $SCRIPT $LOG
detached_report $LOG runs/product.log runs/step_real.log
