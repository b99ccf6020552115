#!/usr/bin/env bash
# The paper's tables (RQ3, ablations, sampling) on the demo pair, on one GPU through the device tool, in two jobs (each
# fits one machine hold; each trains the pair anew: a hold's models cannot travel to the next):
#   JOB=main bash scripts/gpu_tables.sh start         # copies the repo to /tmp/bild-t, starts the job detached,
#   JOB=objectives bash scripts/gpu_tables.sh start   # waits WAIT s (default 540)
#   bash scripts/gpu_tables.sh wait                   # a later call on the still-warm machine
# main: pytest -m gpu alongside; `./launch.sh full` up to threshold tuning; then on the whole Multi30k test set,
#   3 interleaved timed passes per row: RQ3 and the ablations at the tuned points (large, small, BiLD, lossless,
#   fallback only, rollback only; unaligned and aligned), and sampling at temperature 1 (the large model sampling
#   alone, the small models, BiLD speculative sampling at fallback 0.3 and 0.5, unaligned and aligned).
# objectives: `./launch.sh full` up to the calibration outputs, then scripts/compare_objectives.sh (the four
#   objectives aligned at the same time, each tuned on valid and evaluated on test at its tuned point, greedy and
#   sampling at temperature 1), then scripts/bench_step.py on the demo shapes (greedy and sampling passes).
# Data: .gpu/data/multi30k (a copy of ../shared/data/multi30k). Results are packed into $OUT at every call.
set -uo pipefail
source scripts/detached.sh
W=/tmp/bild-t; R=runs/full; SCRIPT=runs/tables_job.sh; LOG=runs/tables_job.log
if [[ ${1:-wait} == start ]]; then
  mkdir -p runs
  case ${JOB:?JOB=main or JOB=objectives} in
    main) cat > $SCRIPT <<JOB
set -x
source scripts/detached.sh; gpu_tests_alongside runs
demo_pair_up_to_tuning || exit 1
EV=("\${DEMO_EVAL[@]}" repeats=3)
"\${EV[@]}" "systems=[large,small,bild,bild_exact,bild_fallback_only,bild_rollback_only]" out=$R/rq3
for fb in 0.3 0.5; do
  "\${EV[@]}" use_tuned=false do_sample=true temperature=1.0 "systems=[large,small,bild_exact]" fallback_threshold=\$fb \
    out=$R/sample_fb\$fb
done
wait
echo JOB DONE
JOB
    ;;
    objectives) cat > $SCRIPT <<JOB
set -x
PARALLEL_TRAIN=1 STOP_AFTER=calibrate DATA_DIR=.gpu/data ./launch.sh full || exit 1
PARALLEL_ALIGN=1 DATA_DIR=.gpu/data bash scripts/compare_objectives.sh full 2>&1 | tee runs/objectives.log
python3 scripts/bench_step.py --shapes demo_large demo_small --repeats 5 2>&1 | tee runs/bench_step.log
echo JOB DONE
JOB
    ;;
    *) echo "JOB must be main or objectives" >&2; exit 2 ;;
  esac
  detached_start $W $SCRIPT $LOG
fi
detached_wait $W $SCRIPT $LOG; rc=$?
[[ -n ${OUT:-} ]] && tar czf $OUT/tables_results.tgz runs/*.log $R/rq3 $R/sample_* $R/objectives $R/eval $R/*/final/metrics.json \
  $R/*/final/bild_thresholds.json $R/*.log $R/*/log.jsonl 2>/dev/null
tail -3 runs/gpu_tests.log 2>/dev/null
grep -v "it/s\]\|ex/s\]" $LOG | grep -E "===|after training|wrote|done:|rollback_threshold=|Error|error|objectives\]" | tail -20
[[ -f runs/objectives.log ]] && grep -E "^\| |objectives\]" runs/objectives.log | tail -16
[[ -f runs/bench_step.log ]] && tail -5 runs/bench_step.log
(( rc == 0 )) && { echo FINISHED; for d in $R/rq3 $R/sample_*; do [[ -f $d/report.md ]] && { echo "== $d"; \
  grep -E "^\| |^- device" $d/report.md | cut -c1-260; }; done; tail -8 $LOG; }
exit 0
