#!/usr/bin/env bash
# One device hold: the step table at each shape's default settings (decode/compact.py chooses them by width) with the
# pairs and kernel profiles; checks of 2 and 11 tokens profiled where short checks measured slower (Gemma-3-1B,
# Qwen3-8B); then the GPU tests not yet run on the current code: Gemma 2, the compiled passes of the newer families,
# and the remaining compiled-path tests. Run detached from a copy under /tmp and waited for across calls:
#   bash scripts/gpu_families.sh start     # first call: starts the job, waits WAIT s (default 540)
#   bash scripts/gpu_families.sh wait      # later calls on the still-warm machine
# Logs go to $OUT at every call.
set -uo pipefail
source scripts/detached.sh
W=/tmp/bild-f; SCRIPT=runs/families_job.sh; LOG=runs/families_job.log
NEW="qwen3 or phi3 or gemma2 or gemma3 or llama3"
if [[ ${1:-wait} == start ]]; then
  mkdir -p runs
  cat > $SCRIPT <<JOB
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
echo "== the step table at each shape's default settings (by width), with the pairs and profiles"
timeout 420 python3 scripts/bench_step.py --shapes qwen2.5_0.5b qwen2.5_1.5b qwen2.5_7b demo_large demo_small --pairs \
  --profile --repeats 3 --json runs/defaults.json > runs/defaults.log 2>&1
echo "== checks of 2 and 11 tokens profiled, and the families' steps at their defaults"
timeout 360 python3 scripts/bench_step.py --shapes gemma3_1b gemma3_1b:llama qwen3_8b --pairs --profile-checks \
  --repeats 3 --json runs/checks.json > runs/checks.log 2>&1
echo "== GPU tests"
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -k "not compile and gemma2" > runs/tests_gemma2.log 2>&1
timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -k "compile and ($NEW)" > runs/tests_new_compiled.log 2>&1
timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -k "recompiles or few_fused or compiled_early_exit or (compiled_passes_equal and (marian or llama) and not llama3)" > runs/tests_compiled_rest.log 2>&1
echo JOB DONE
JOB
  detached_start $W $SCRIPT $LOG
fi
detached_wait $W $SCRIPT $LOG
detached_report $LOG runs/defaults.log runs/checks.log
exit 0
