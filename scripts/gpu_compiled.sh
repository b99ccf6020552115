#!/usr/bin/env bash
# One device hold for the checks through the attention kernel (decode.compact.CHECK_KERNEL, off by default), most
# wanted first: every GPU test with it on (BILD_CHECK_KERNEL=1), 8 pytest processes at once; the lossless mode in
# bf16 on random pairs against the large model's own Greedy, checks with the kernel and without, uncompiled and
# compiled; compile times cold and warm; then what the last hold did not reach: the compiled variants at real shapes
# with profiles and the pair table, the uncompiled path, 1.5B.
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
t "1 every GPU test with the checks through the kernel, in 8 processes at once"
python3 -m pytest --collect-only -q -p no:cacheprovider -m gpu tests/test_gpu.py | grep "::" > runs/test_ids.txt
for i in 0 1 2 3 4 5 6 7; do
  awk -v i=$i 'NR % 8 == i' runs/test_ids.txt > runs/test_ids.$i
  BILD_CHECK_KERNEL=1 timeout 600 python3 -m pytest -q -p no:cacheprovider -m gpu $(cat runs/test_ids.$i) \
    > runs/tests_$i.log 2>&1 &
done
wait
for i in 0 1 2 3 4 5 6 7; do tail -1 runs/tests_$i.log; done
t "2 the lossless mode in bf16 on random pairs, against the large model's own Greedy: checks without the kernel, with it (keys rotated by it), neither"
for k in "" --check-kernel --no-kernel; do
  BILD_COMPILE=0 timeout 200 python3 scripts/check_lossless.py --pairs 20 --fast-path --device cuda --dtype bfloat16 \
    --reference greedy $k --archs bart t5 llama qwen2 2>/dev/null | tail -5
done
for k in 0 1; do  # a check's logits against the steps', bit for bit, at 0.5B: checks without the kernel, with it
  BILD_CHECK_KERNEL=$k BILD_COMPILE=0 timeout 120 python3 scripts/check_width_rounding.py --shape qwen2.5_0.5b \
    --device cuda 2>&1 | tail -3
done
for k in "" --check-kernel; do  # compiled, at the demo pair's size
  timeout 300 python3 scripts/check_lossless.py --pair demo_large demo_small --compile --pairs 20 --fast-path \
    --device cuda --dtype bfloat16 --reference greedy $k 2>/dev/null | tail -3
done
t "2b compile time, a fresh process then a warm one (on-disk cache)"
for shape in demo_large qwen2.5_7b; do
  timeout 300 python3 scripts/bench_compile.py --shape $shape --device cuda --dtype bfloat16 2>&1 | tail -5
done
t "3 the compiled variants at real shapes, with profiles and the pair table"
timeout 560 python3 scripts/bench_step.py --shapes qwen2.5_0.5b qwen2.5_7b --pairs --profile \
  --variants default check-kernel check16-static check-kernel+static --repeats 3 --json runs/variants_a.json > runs/variants_a.log 2>&1
tail -1 runs/variants_a.log
t "4 uncompiled path"
timeout 260 python3 scripts/bench_default_path.py --shapes qwen2.5_0.5b qwen2.5_7b demo_large > runs/default.log 2>&1; grep "^|" runs/default.log
t "5 1.5B: tuning and combo kernels"
timeout 420 python3 scripts/bench_step.py --shapes qwen2.5_1.5b --profile --variants default tuned no-combo \
  --repeats 3 --json runs/variants_b.json > runs/variants_b.log 2>&1; tail -1 runs/variants_b.log
echo JOB DONE
JOB
  detached_start $W $SCRIPT $LOG
fi
detached_wait $W $SCRIPT $LOG
detached_report $LOG runs/variants_a.log runs/default.log runs/variants_b.log
exit 0
