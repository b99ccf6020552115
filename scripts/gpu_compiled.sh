#!/usr/bin/env bash
# One device hold for the compiled passes, most wanted first: every GPU test (`pytest -m gpu`), 8 pytest processes at
# once (the compiled ones mostly compile on the CPU), then the compiled step's variants and the uncompiled path's, each
# against the defaults compiled anew in the same place ("default"): tuning and no combo kernels at 1.5B; checks
# through the attention kernel (CHECK_KERNEL), every check 16 wide, and compiled for that width alone
# (STATIC_CHECK_WIDTH); with profiles and the pair table.
# Between them, the lossless mode in bf16 on random pairs with the attention kernel, without it, and in checks too.
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
t "1 every GPU test (the compiled passes' and the kernels' among them), in 8 processes at once"
python3 -m pytest --collect-only -q -p no:cacheprovider -m gpu tests/test_gpu.py | grep "::" > runs/test_ids.txt
for i in 0 1 2 3 4 5 6 7; do
  awk -v i=$i 'NR % 8 == i' runs/test_ids.txt > runs/test_ids.$i
  timeout 600 python3 -m pytest -q -p no:cacheprovider -m gpu $(cat runs/test_ids.$i) > runs/tests_$i.log 2>&1 &
done
wait
for i in 0 1 2 3 4 5 6 7; do tail -1 runs/tests_$i.log; done
t "2 the demo shapes' checks: through the attention kernel, 16 wide, compiled for that width; kernels of a check"
timeout 300 python3 scripts/bench_step.py --shapes demo_large demo_small \
  --variants default check16 check16-static check-kernel --repeats 3 --json runs/variants_c.json > runs/variants_c.log 2>&1
tail -1 runs/variants_c.log
timeout 120 python3 scripts/bench_step.py --shapes demo_large --profile --profile-checks > runs/profile_c.log 2>&1
tail -1 runs/profile_c.log
t "3 the lossless mode in bf16 on random pairs, against the large model's own Greedy: with the attention kernel, without, in checks too"
for k in "" --no-kernel --check-kernel; do
  BILD_COMPILE=0 timeout 200 python3 scripts/check_lossless.py --pairs 20 --fast-path --device cuda --dtype bfloat16 \
    --reference greedy $k --archs bart t5 llama qwen2 2>/dev/null | tail -5
done
for shape in demo_large qwen2.5_0.5b; do  # a check against steps at their own widths and at one width, bit for bit
  BILD_COMPILE=0 timeout 120 python3 scripts/check_width_rounding.py --shape $shape --device cuda 2>&1 | tail -3
done
t "3b compile time, a fresh process then a warm one (on-disk cache)"
for shape in demo_large qwen2.5_7b; do
  timeout 300 python3 scripts/bench_compile.py --shape $shape --device cuda --dtype bfloat16 2>&1 | tail -5
done
t "4 the same variants at real shapes, with profiles and the pair table"
timeout 560 python3 scripts/bench_step.py --shapes qwen2.5_0.5b qwen2.5_7b --pairs --profile \
  --variants default check-kernel check16-static --repeats 3 --json runs/variants_a.json > runs/variants_a.log 2>&1
tail -1 runs/variants_a.log
t "5 uncompiled path"
timeout 260 python3 scripts/bench_default_path.py --shapes qwen2.5_0.5b qwen2.5_7b demo_large > runs/default.log 2>&1; grep "^|" runs/default.log
t "6 1.5B: tuning and combo kernels"
timeout 420 python3 scripts/bench_step.py --shapes qwen2.5_1.5b --profile --variants default tuned no-combo \
  --repeats 3 --json runs/variants_b.json > runs/variants_b.log 2>&1; tail -1 runs/variants_b.log
echo JOB DONE
JOB
  detached_start $W $SCRIPT $LOG
fi
detached_wait $W $SCRIPT $LOG
detached_report $LOG runs/variants_c.log runs/profile_c.log runs/variants_a.log runs/default.log runs/variants_b.log
exit 0
