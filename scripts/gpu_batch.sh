#!/usr/bin/env bash
# Batched BiLD on the demo pair (issue 12): the throughput table, on one GPU through the device tool:
#   bash scripts/gpu_batch.sh start   # copies the repo to /tmp/bild-b, starts the job detached, waits WAIT s
#   bash scripts/gpu_batch.sh wait    # a later call on the still-warm machine
# The job: pytest -m gpu alongside; `./launch.sh full` up to its main evaluation (tokenizer, the large and small
# models trained at the same time, calibration, seq_kd alignment, thresholds tuned on valid for both small
# models, then decode.eval on the whole Multi30k test set with the throughput table at batch 1, 4, 16 and 64).
# STOP_AFTER=tune BATCH_WAITS="0 0.5 1": stop the pipeline after tuning, then the throughput table at each batch_wait.
# Data: .gpu/data/multi30k (a copy of ../shared/data/multi30k). Results are packed into $OUT at every call.
set -uo pipefail
source scripts/detached.sh
W=/tmp/bild-b; R=runs/full; JOB=runs/batch_job.sh; LOG=runs/batch_job.log
if [[ ${1:-wait} == start ]]; then
  mkdir -p runs
  cat > $JOB <<JOB
set -x
source scripts/detached.sh; gpu_tests_alongside runs
PARALLEL_TRAIN=1 STOP_AFTER=\${STOP_AFTER:-eval} DATA_DIR=\${DATA_DIR:-.gpu/data} ./launch.sh full
for w in \${BATCH_WAITS:-}; do  # the throughput table again at each batch_wait (tuned thresholds, aligned and not)
  PYTHONPATH=. python3 -m decode.eval --config configs/multi30k_eval.yaml --aligned large=$R/large/final small=$R/small/final \
    aligned=$R/small_aligned/final dataset=\${DATA_DIR:-.gpu/data}/multi30k "systems=[large,bild,bild_exact]" \
    "throughput_batch_sizes=[1, 4, 16, 64]" batch_wait=\$w out=$R/batch_wait_\$w
done
wait
echo JOB DONE
JOB
  detached_start $W $JOB $LOG
fi
detached_wait $W $JOB $LOG; rc=$?
[[ -n ${OUT:-} ]] && tar czf $OUT/batch_results.tgz runs/*.log $R/eval $R/batch_wait_* $R/*/final/metrics.json $R/*/final/bild_thresholds.json \
  $R/*.log 2>/dev/null
tail -3 runs/gpu_tests.log 2>/dev/null
grep -v "it/s\]\|ex/s\]" $LOG | grep -E "===|after training|wrote|done:|rollback_threshold=|Error|error" | tail -20
(( rc == 0 )) && { echo FINISHED; for d in $R/eval $R/batch_wait_*; do [[ -f $d/report.md ]] && { echo "== $d"; \
  grep -E "^\| |^## " $d/report.md | cut -c1-200; }; done; }
exit 0
