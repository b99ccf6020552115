#!/usr/bin/env bash
# One device hold: the Triton decode-attention kernel and the padded checks, measured and tested.
#   1. the kernel's GPU tests (its arithmetic, and that each step runs it, compiled or not)
#   2. the step table at the Qwen2.5 and demo shapes with pairs and profiles, against the passes without the kernel
#   3. every uncompiled GPU test (the kernel runs on the default path too)
#   4. checks of 2 tokens profiled unpadded where they measured slower than 11 (Gemma-3-1B, Qwen3-8B)
#   5. compiled-pass tests; 6. the remaining shapes
# Run detached from a copy under /tmp and waited for across calls:
#   bash scripts/gpu_kernels.sh start     # first call: starts the job, waits WAIT s (default 540)
#   bash scripts/gpu_kernels.sh wait      # later calls on the still-warm machine
# Logs go to $OUT at every call.
set -uo pipefail
source scripts/detached.sh
W=/tmp/bild-k; SCRIPT=runs/kernels_job.sh; LOG=runs/kernels_job.log
if [[ ${1:-wait} == start ]]; then
  mkdir -p runs
  cat > $SCRIPT <<'JOB'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
git log -1 --format='commit %h' 2>/dev/null
t() { echo "== $(date +%H:%M:%S) $1"; }
t "1 kernel tests"
timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -k "decode_kernel" > runs/tests_kernel.log 2>&1; tail -2 runs/tests_kernel.log
t "2 step table, kernel against none"
timeout 330 python3 scripts/bench_step.py --shapes qwen2.5_0.5b qwen2.5_7b demo_large --pairs --profile --variants no-kernel \
  --repeats 3 --json runs/steps.json > runs/steps.log 2>&1; tail -1 runs/steps.log
t "3 uncompiled GPU tests"
timeout 330 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -k "not compile and not decode_kernel" > runs/tests_default.log 2>&1; tail -2 runs/tests_default.log
t "4 short checks"
timeout 300 python3 scripts/bench_step.py --shapes gemma3_1b gemma3_1b:llama qwen3_8b --pairs --profile-checks --variants unpadded \
  --repeats 3 --json runs/checks.json > runs/checks.log 2>&1; tail -1 runs/checks.log
t "5 compiled tests"
timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -k "compile and not decode_kernel and (qwen2 or bart or t5 or gemma2 or gemma3 or compiles_again or few_fused or early_exit)" > runs/tests_compiled.log 2>&1; tail -2 runs/tests_compiled.log
t "6 other shapes"
timeout 240 python3 scripts/bench_step.py --shapes qwen2.5_1.5b demo_small qwen3_0.6b --pairs --repeats 3 --json runs/steps2.json > runs/steps2.log 2>&1; tail -1 runs/steps2.log
echo JOB DONE
JOB
  detached_start $W $SCRIPT $LOG
fi
detached_wait $W $SCRIPT $LOG
detached_report $LOG runs/steps.log runs/checks.log runs/steps2.log
exit 0
