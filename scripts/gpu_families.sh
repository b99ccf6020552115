#!/usr/bin/env bash
# One device hold: the compiled passes' variants (decode/compact.py settings) at the Qwen2.5 and demo shapes with
# kernel profiles, the newer families' steps against Llama twins of the same sizes with the pair table, then the GPU
# tests (the newer families first). Run detached from a copy under /tmp and waited for across calls:
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
git log --oneline -1 2>/dev/null
echo "== variants"
timeout 330 python3 scripts/bench_step.py --shapes qwen2.5_0.5b demo_large --variants tuned matmul --profile --repeats 3 \
  --json runs/variants_a.json > runs/variants_a.log 2>&1
timeout 270 python3 scripts/bench_step.py --shapes qwen2.5_1.5b qwen2.5_7b --variants matmul --profile --repeats 3 \
  --json runs/variants_b.json > runs/variants_b.log 2>&1
echo "== families"
timeout 540 python3 scripts/bench_step.py --pairs --repeats 3 --json runs/families.json --shapes qwen3_0.6b qwen3_0.6b:llama \
  gemma3_1b gemma3_1b:llama llama3.2_1b qwen3_8b qwen3_8b:llama gemma3_12b gemma3_12b:llama llama3.1_8b > runs/families.log 2>&1
echo "== GPU tests"
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -k "not compile and ($NEW)" > runs/tests_new.log 2>&1
timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -k "compile and ($NEW)" > runs/tests_new_compiled.log 2>&1
timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -k "not compile and not ($NEW)" > runs/tests_old.log 2>&1
timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -k "recompiles or few_fused or compiled_early_exit or (compiled_passes_equal and (marian or llama) and not llama3)" > runs/tests_compiled_rest.log 2>&1
echo JOB DONE
JOB
  detached_start $W $SCRIPT $LOG
fi
detached_wait $W $SCRIPT $LOG; rc=$?
[[ -n ${OUT:-} ]] && cp runs/*.log runs/*.json "$OUT/" 2>/dev/null
cat $LOG
for f in runs/variants_a.log runs/variants_b.log runs/families.log; do
  [[ -f $f ]] && { echo "== $f"; grep -v -i "warn" $f | grep -E "^\||^device|^variants|^family|^per pair|kernels per|compiled in" | cut -c1-250; }
done
for f in runs/tests_*.log; do [[ -f $f ]] && { echo "== $f"; tail -4 $f; }; done
exit 0
