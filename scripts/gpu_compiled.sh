#!/usr/bin/env bash
# One device hold over today's defaults (the attention kernel's split runs), most wanted first: every GPU test
# (TESTS, a -k expression, narrows them), 8 pytest processes at once, recompiles logged (TORCH_LOGS); then each shape
# as the first runner of its own process, the step timed without the sequence's start: 0.5B and 7B with the pair
# table and the kernels of a step and of checks, 1.5B with a step's, the demo pair's two sizes; then 0.5B and 7B
# after a 1,000-token prompt.
# Run detached from a copy under /tmp and waited for across calls:
#   bash scripts/gpu_compiled.sh start     # first call: starts the job, waits WAIT s (default 540)
#   bash scripts/gpu_compiled.sh wait      # later calls on the still-warm machine
# The logs come back as logs.tgz at every call.
set -uo pipefail
source scripts/detached.sh
W=/tmp/bild-c; SCRIPT=runs/compiled_job.sh; LOG=runs/compiled_job.log
if [[ ${1:-wait} == start ]]; then
  mkdir -p runs
  echo "TESTS='${TESTS-}'" > $SCRIPT
  cat >> $SCRIPT <<'JOB'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
t() { echo "== $(date +%H:%M:%S) $1"; }
t "1 every GPU test (or those TESTS names, a -k expression), in 8 processes at once"
source scripts/detached.sh; gpu_tests_alongside runs; wait; gpu_tests_verdict runs
t "2 each shape the first runner of its process"
for shapes in "qwen2.5_0.5b qwen2.5_7b --pairs --profile --profile-checks" "qwen2.5_1.5b --profile" "demo_large" \
    "demo_small"; do
  name=$(echo $shapes | cut -d' ' -f1)
  timeout 300 python3 scripts/bench_step.py --shapes $shapes --repeats 3 --json runs/step_$name.json \
    > runs/step_$name.log 2>&1
  grep "^| [a-z]" runs/step_$name.log | grep -v "^| shape"
done
t "3 after a 1,000-token prompt"
timeout 300 python3 scripts/bench_step.py --shapes qwen2.5_0.5b qwen2.5_7b --prompt-length 1000 --repeats 3 \
  --json runs/step_long.json > runs/step_long.log 2>&1
tail -3 runs/step_long.log
echo JOB DONE
JOB
  detached_start $W $SCRIPT $LOG
fi
detached_wait $W $SCRIPT $LOG
detached_report $LOG runs/step_qwen2.5_0.5b.log runs/step_long.log
exit 0
