#!/usr/bin/env bash
# Speculative sampling on the demo pair (issue 12), on one GPU through the device tool:
#   bash scripts/gpu_sampling.sh start   # copies the repo to /tmp/bild-s, starts the job detached, waits WAIT s
#   bash scripts/gpu_sampling.sh wait    # a later call on the still-warm machine
# The job: pytest -m gpu alongside; `./launch.sh full` up to training (tokenizer, the large model for
# LARGE_EPOCHS, default 20, and the small model at the same time); then decode.eval on the whole Multi30k test set
# at temperature 1 (the large model sampling alone, the small model, BiLD speculative sampling at fallback 0.3
# and 0.5), and greedy for reference. Data: $DATA_DIR/multi30k (default .gpu/data, a copy of ../shared/data).
set -uo pipefail
source scripts/detached.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error PYTHONPATH=.
W=/tmp/bild-s; R=runs/sample/full; JOB=runs/sample_job.sh; LOG=runs/sample_job.log
if [[ ${1:-wait} == start ]]; then
  mkdir -p runs
  cat > $JOB <<JOB
set -x
D=\${DATA_DIR:-.gpu/data}/multi30k
source scripts/detached.sh; gpu_tests_alongside $R
RUNS=runs/sample PARALLEL_TRAIN=1 STOP_AFTER=train DATA_DIR=\${DATA_DIR:-.gpu/data} LARGE_EXTRA="epochs=${LARGE_EPOCHS:-20}" ./launch.sh full
wait
EV=(python3 -m decode.eval --config configs/multi30k_eval.yaml large=$R/large/final small=$R/small/final dataset=\$D use_tuned=false)
"\${EV[@]}" do_sample=true temperature=1.0 "systems=[large,small,bild_exact]" fallback_threshold=0.3 out=$R/eval_t1_fb03
"\${EV[@]}" do_sample=true temperature=1.0 "systems=[large,bild_exact]" fallback_threshold=0.5 out=$R/eval_t1_fb05
"\${EV[@]}" "systems=[large,bild_exact]" fallback_threshold=0.3 out=$R/eval_greedy_fb03
echo JOB DONE
JOB
  detached_start $W $JOB $LOG
fi
detached_wait $W $JOB $LOG; rc=$?
[[ -n ${OUT:-} ]] && tar czf $OUT/sample_results.tgz $R/eval_* $R/*/final/metrics.json $R/*.log 2>/dev/null
tail -3 $R/gpu_tests.log 2>/dev/null
(( rc == 0 )) || exit 0
echo FINISHED
for d in $R/eval_*; do echo "== $d"; grep -E "^- decoding|^\| " $d/report.md; done
