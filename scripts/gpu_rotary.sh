#!/usr/bin/env bash
# One device hold: the decode kernel rotating q and k (decode.compact.KERNEL_ROTARY, off by default until this
# measures it), inductor's combo kernels, and the compiled-path GPU tests not yet run on the kernel's code.
#   1. the kernel's GPU tests, its rotary in whole decoding included (exact mode against greedy `generate`)
#   2. the default path (uncompiled, graphs): kernel, kernel + rotary, none
#   3. the compiled step at the Qwen2.5 and demo shapes: default, kernel-rotary, kernel-rotary+reduce, combo
#   4. every compiled-path GPU test
# Run detached from a copy under /tmp and waited for across calls:
#   bash scripts/gpu_rotary.sh start     # first call: starts the job, waits WAIT s (default 540)
#   bash scripts/gpu_rotary.sh wait      # later calls on the still-warm machine
# Logs go to $OUT at every call.
set -uo pipefail
source scripts/detached.sh
W=/tmp/bild-r; SCRIPT=runs/rotary_job.sh; LOG=runs/rotary_job.log
if [[ ${1:-wait} == start ]]; then
  mkdir -p runs
  cat > $SCRIPT <<'JOB'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
t() { echo "== $(date +%H:%M:%S) $1"; }
t "1 kernel tests"
timeout 420 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -k "decode_kernel or kernels_rotary" > runs/tests_kernel.log 2>&1; tail -2 runs/tests_kernel.log
t "2 default path"
timeout 200 python3 scripts/bench_default_path.py --shapes qwen2.5_0.5b demo_large qwen2.5_7b > runs/default.log 2>&1; grep "^|" runs/default.log
t "3 compiled step variants"
timeout 600 python3 scripts/bench_step.py --shapes qwen2.5_0.5b qwen2.5_1.5b qwen2.5_7b demo_large --profile \
  --variants kernel-rotary kernel-rotary+reduce combo --repeats 3 --json runs/variants.json > runs/variants.log 2>&1; tail -1 runs/variants.log
t "4 compiled tests"
timeout 900 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -k "compile and not decode_kernel and not kernels_rotary" > runs/tests_compiled.log 2>&1; tail -2 runs/tests_compiled.log
echo JOB DONE
JOB
  detached_start $W $SCRIPT $LOG
fi
detached_wait $W $SCRIPT $LOG
detached_report $LOG runs/default.log runs/variants.log
exit 0
