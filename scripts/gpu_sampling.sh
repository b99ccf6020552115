#!/usr/bin/env bash
# Speculative sampling on the demo pair (issue 12), on one GPU through the device tool:
#   bash scripts/gpu_sampling.sh start   # copies the repo to /tmp/bild-s, starts the job detached, waits WAIT s
#   bash scripts/gpu_sampling.sh wait    # a later call on the still-warm machine
# The job: pytest -m gpu alongside; tokenizer; the large (20 epochs) and small models at the same time; then
# decode.eval on the whole Multi30k test set at temperature 1 (the large model sampling alone, the small model,
# BiLD speculative sampling at fallback 0.3 and 0.5), and greedy for reference. Data: .gpu/m30k/multi30k.
set -uo pipefail
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error PYTHONPATH=.
W=/tmp/bild-s; R=runs/sample; LOG=$W/$R/job.log
if [[ ${1:-wait} == start ]]; then
  mkdir -p $W && cp -r . $W/ && mkdir -p $W/$R
  cat > $W/$R/job.sh <<JOB
set -x
D=\${DATA_DIR:-.gpu/m30k}/multi30k
TRAIN="accelerate launch --config_file configs/accelerate/single_gpu.yaml align/train.py"
(timeout 600 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py > $R/gpu_tests.log 2>&1; echo "gpu tests rc \$?" >> $R/gpu_tests.log) &
[[ -f $R/tokenizer/tokenizer.json ]] || python3 -m data.tokenizer --dataset \$D --split train --vocab-size 8000 --out $R/tokenizer
[[ -f $R/small/final/config.json ]] || \$TRAIN --config configs/multi30k_small.yaml --resume tokenizer=$R/tokenizer dataset=\$D output_dir=$R/small > $R/train_small.log 2>&1 &
[[ -f $R/large/final/config.json ]] || \$TRAIN --config configs/multi30k_large.yaml --resume tokenizer=$R/tokenizer dataset=\$D output_dir=$R/large epochs=${LARGE_EPOCHS:-20} > $R/train_large.log 2>&1
wait
EV=(python3 -m decode.eval --config configs/multi30k_eval.yaml large=$R/large/final small=$R/small/final dataset=\$D use_tuned=false)
"\${EV[@]}" do_sample=true temperature=1.0 "systems=[large,small,bild_exact]" fallback_threshold=0.3 out=$R/eval_t1_fb03
"\${EV[@]}" do_sample=true temperature=1.0 "systems=[large,bild_exact]" fallback_threshold=0.5 out=$R/eval_t1_fb05
"\${EV[@]}" "systems=[large,bild_exact]" fallback_threshold=0.3 out=$R/eval_greedy_fb03
echo JOB DONE
JOB
  (cd $W && setsid nohup bash $R/job.sh > $LOG 2>&1 < /dev/null &)
  sleep 5
fi
cd $W
deadline=$((SECONDS + ${WAIT:-540}))
while (( SECONDS < deadline )) && ! grep -q "JOB DONE" $LOG && pgrep -f "$R/job.sh" > /dev/null; do sleep 10; done
[[ -n ${OUT:-} ]] && tar czf $OUT/sample_results.tgz $R/eval_* $R/*/final/metrics.json $R/*.log 2>/dev/null
tail -3 $R/gpu_tests.log 2>/dev/null
if ! grep -q "JOB DONE" $LOG; then echo "STILL RUNNING ($(date +%H:%M:%S))"; tail -c 300 $LOG; exit 0; fi
echo FINISHED
for d in $R/eval_*; do echo "== $d"; grep -E "^- decoding|^\| " $d/report.md; done
