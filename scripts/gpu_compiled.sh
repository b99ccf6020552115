#!/usr/bin/env bash
# One device hold for the checks through the attention kernel (decode.compact.CHECK_KERNEL, on by default), most wanted
# first: the recompile test (the whole GPU suite passed with BILD_CHECK_KERNEL=1 but for it, whose warm-up has changed
# since), each family in its own process, recompiles logged (TORCH_LOGS); beside it, the lossless mode in
# bf16 on random pairs against the large model's own Greedy, uncompiled; then the compiled passes at 7B with the
# attention kernel at any width (kernel-rotary+reduce: 7B keeps its batched products by default) and with checks
# without the kernel.
# Run detached from a copy under /tmp and waited for across calls:
#   bash scripts/gpu_compiled.sh start     # first call: starts the job, waits WAIT s (default 540)
#   bash scripts/gpu_compiled.sh wait      # later calls on the still-warm machine
# The logs come back as logs.tgz at every call.
set -uo pipefail
source scripts/detached.sh
W=/tmp/bild-c; SCRIPT=runs/compiled_job.sh; LOG=runs/compiled_job.log
if [[ ${1:-wait} == start ]]; then
  mkdir -p runs
cat > $SCRIPT <<'JOB'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
t() { echo "== $(date +%H:%M:%S) $1"; }
t "1 the recompile test, each family in its own process, recompiles logged; beside it the lossless mode in bf16"
for arch in qwen2 bart t5; do
  TORCH_LOGS=recompiles timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu \
    "tests/test_gpu.py::test_nothing_compiles_again_while_decoding[$arch]" > runs/tests_$arch.log 2>&1 &
done
BILD_COMPILE=0 timeout 300 python3 scripts/check_lossless.py --pairs 20 --fast-path --device cuda --dtype bfloat16 \
  --reference greedy --archs bart t5 llama qwen2 > runs/lossless.log 2>&1
wait
for arch in qwen2 bart t5; do tail -1 runs/tests_$arch.log; done
grep -h -A4 "Recompiling" runs/tests_*.log | cut -c1-300 | head -40
tail -6 runs/lossless.log
t "2 the compiled passes at 7B: the kernel at any width, checks without it"
timeout 240 python3 scripts/bench_step.py --shapes qwen2.5_7b \
  --variants kernel-rotary+reduce no-check-kernel --repeats 3 --json runs/variants_a.json > runs/variants_a.log 2>&1
tail -1 runs/variants_a.log
echo JOB DONE
JOB
  detached_start $W $SCRIPT $LOG
fi
detached_wait $W $SCRIPT $LOG
detached_report $LOG runs/variants_a.log
exit 0
