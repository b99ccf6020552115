#!/usr/bin/env bash
# The demo pair end to end on one GPU, compiled passes against uncompiled ones: `./launch.sh full` up to threshold
# tuning (both models trained at once), then on the whole Multi30k test set, 3 interleaved timed passes per row, the
# large model, BiLD and lossless BiLD at the tuned points, unaligned and aligned: once with `compile=false` (the
# default) and once with `compile=true`. The two evaluations run in separate processes (a runner compiled after
# another in one process measured slower: BENCHMARKS.md), uncompiled first.
# B16=1: then, compiled, BiLD's throughput at batch 16 (throughput_systems=[bild]).
# BILD_CHECK_KERNEL=0 / BILD_STATIC_CHECK_WIDTH=16 in the environment: the whole run with those check settings
# (decode/compact.py).
#   bash scripts/gpu_end_to_end.sh start    # copies the repo to /tmp/bild-e, starts the job detached, waits WAIT s
#   bash scripts/gpu_end_to_end.sh wait     # a later call on the still-warm machine
# Data: .gpu/data/multi30k (a copy of ../shared/data/multi30k), named in the device call's carry. Results are packed
# into $OUT at every call.
set -uo pipefail
source scripts/detached.sh
W=/tmp/bild-e; R=runs/full; SCRIPT=runs/end_to_end_job.sh; LOG=runs/end_to_end_job.log
if [[ ${1:-wait} == start ]]; then
  mkdir -p runs
  cat > $SCRIPT <<JOB
set -x
source scripts/detached.sh; demo_pair_up_to_tuning || exit 1
EV=("\${DEMO_EVAL[@]}" repeats=3 "systems=[large,bild,bild_exact]")
"\${EV[@]}" compile=false out=$R/uncompiled
"\${EV[@]}" compile=true out=$R/compiled
if [[ ${B16:-0} == 1 ]]; then
  "\${EV[@]}" compile=true "systems=[large,bild]" "throughput_batch_sizes=[16]" "throughput_systems=[bild]" out=$R/b16
fi
echo JOB DONE
JOB
  detached_start $W $SCRIPT $LOG
fi
detached_wait $W $SCRIPT $LOG; rc=$?
[[ -n ${OUT:-} ]] && tar czf $OUT/end_to_end.tgz runs/*.log $R/uncompiled $R/compiled $R/b16* $R/*/final/bild_thresholds.json \
  $R/*.log 2>/dev/null
grep -v "it/s\]\|ex/s\]" $LOG | grep -E "===|after training|wrote|done:|rollback_threshold=|compiled|Error|error" | tail -20
(( rc == 0 )) && { echo FINISHED; for d in $R/uncompiled $R/compiled $R/b16*; do [[ -f $d/report.md ]] && { echo "== $d"; \
  grep -E "^\| |^- device" $d/report.md | cut -c1-260; }; done; }
exit 0
