#!/usr/bin/env bash
# One device hold over the attention kernel's split runs (decode/kernels.py: SPLITS programs per token past
# MIN_CHUNK slots), most wanted first: the GPU tests of the kernel and of compiling, 8 pytest processes at once,
# recompiles logged (TORCH_LOGS);
# then the compiled step at 0.5B and 7B after a 4,000-token prompt, split against one program per token (`unsplit`)
# and against batched products over the cache (`matmul`); then the same at the default 20-token prompt, where no
# token splits, for what the idle programs cost.
# Run detached from a copy under /tmp and waited for across calls:
#   bash scripts/gpu_compiled.sh start     # first call: starts the job, waits WAIT s (default 540)
#   bash scripts/gpu_compiled.sh wait      # later calls on the still-warm machine
# The logs come back as logs.tgz at every call.
set -uo pipefail
source scripts/detached.sh
W=/tmp/bild-c; SCRIPT=runs/compiled_job.sh; LOG=runs/compiled_job.log
if [[ ${1:-wait} == start ]]; then
  mkdir -p runs
  echo "TESTS='${TESTS-kernel or long_context or compiles_again or compiled_passes or graphs}'" > $SCRIPT
  cat >> $SCRIPT <<'JOB'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
t() { echo "== $(date +%H:%M:%S) $1"; }
t "1 the GPU tests of the kernel and of compiling (TESTS, a -k expression; all of them where empty), in 8 processes"
python3 -m pytest --collect-only -q -p no:cacheprovider -m gpu tests/test_gpu.py ${TESTS:+-k "$TESTS"} | grep "::" \
  > runs/test_ids.txt
for i in 0 1 2 3 4 5 6 7; do
  awk -v i=$i 'NR % 8 == i' runs/test_ids.txt > runs/test_ids.$i
  TORCH_LOGS=recompiles timeout 330 python3 -m pytest -q -p no:cacheprovider -m gpu $(cat runs/test_ids.$i) \
    > runs/tests_$i.log 2>&1 &
done
wait
for i in 0 1 2 3 4 5 6 7; do tail -1 runs/tests_$i.log; done
grep -h -B2 -A30 "^____\|Error\b" runs/tests_*.log | cut -c1-300 | head -60
grep -h -A4 "Recompiling" runs/tests_*.log | cut -c1-300 | head -20
t "2 after a 4,000-token prompt: split runs, one program per token, batched products"
timeout 330 python3 scripts/bench_step.py --shapes qwen2.5_0.5b qwen2.5_7b --prompt-length 4000 \
  --variants unsplit matmul --repeats 3 --json runs/variants_a.json > runs/variants_a.log 2>&1
tail -4 runs/variants_a.log
t "3 at the default 20-token prompt: split runs against one program per token"
timeout 300 python3 scripts/bench_step.py --shapes qwen2.5_0.5b qwen2.5_7b --variants unsplit --repeats 3 \
  --json runs/variants_b.json > runs/variants_b.log 2>&1
tail -4 runs/variants_b.log
echo JOB DONE
JOB
  detached_start $W $SCRIPT $LOG
fi
detached_wait $W $SCRIPT $LOG
detached_report $LOG runs/variants_a.log runs/variants_b.log
exit 0
