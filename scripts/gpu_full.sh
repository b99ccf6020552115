#!/usr/bin/env bash
# The full profile on one GPU, driven through the device tool in one or more calls:
#   bash scripts/gpu_full.sh start   # copies the repo to /tmp/bild, starts ./launch.sh full there detached,
#                                    # waits up to WAIT seconds (default 560)
#   bash scripts/gpu_full.sh wait    # a later call on the still-warm machine: waits again
# The job runs from a copy under /tmp: the device tool deletes ignored paths (runs/) of the working copy that
# a later call does not carry, which would kill it. Data comes from .gpu/data (a copy of
# ../shared/data/{multi30k,iwslt17_deen}); results are packed into $OUT as each call ends, and the report
# tables are printed last.
set -uo pipefail
source scripts/detached.sh
W=/tmp/bild; R=runs/full; JOB=runs/full_job.sh; LOG=$R/pipeline.log
if [[ ${1:-wait} == start ]]; then
  mkdir -p runs
  printf '%s\n' "PARALLEL_TRAIN=1 DATA_DIR=${DATA_DIR:-.gpu/data} ./launch.sh full && echo JOB DONE" > $JOB
  detached_start $W $JOB $LOG
fi
WAIT=${WAIT:-560} detached_wait $W $JOB $LOG; rc=$?
grep -v "it/s\]\|ex/s\]" $LOG | grep -E "===|after training|before training|wrote|done:|saved|Error|error" | tail -25
for f in $R/train_large.log $R/train_small.log; do [[ -f $f ]] && grep -E "after training" $f | tail -1; done
if [[ -n ${OUT:-} ]]; then
  tar czf $OUT/full_results.tgz $R/eval $R/sweep $R/eval_iwslt17 $R/*/final/metrics.json $R/*/final/train_config.yaml \
    $R/*/log.jsonl $R/*.log $R/calibration.*.provenance.json 2>/dev/null
  cp $R/sweep/frontier.png $OUT/ 2>/dev/null
fi
(( rc == 0 )) || exit 0
echo "FINISHED"
tail -45 $LOG
