#!/usr/bin/env bash
# Batched BiLD and batched speculative sampling on the demo pair: the throughput tables, on one GPU
# through the device tool:
#   bash scripts/gpu_batch.sh start   # copies the repo to /tmp/bild-b, starts the job detached, waits WAIT s
#   bash scripts/gpu_batch.sh wait    # a later call on the still-warm machine
# The job: pytest -m gpu alongside; `./launch.sh full` up to threshold tuning (tokenizer, the large and small
# models trained at the same time, calibration, seq_kd alignment, thresholds tuned on valid for both small
# models); then decode.eval --aligned on the whole Multi30k test set with the throughput table at batch 1, 4, 16
# and 64, REPEATS interleaved passes (default 3): greedy (large, BiLD and lossless BiLD at the tuned points) and
# sampling at temperature 1 (the large model sampling alone, BiLD speculative sampling at fallback SAMPLE_FB,
# default 0.3); then scripts/bench_step.py on the demo shapes (batch 1's per-step cost).
# AB=1 instead: after tuning, scripts/bench_step.py with the batched passes (--batches 1 4 16 64), then the greedy
# throughput table at batch 4, 16 and 64.
# LOOP=1 instead: after tuning, bench_step --batches; the greedy throughput table (large, BiLD) at 1/4/16/64 with the
# device draft loop; thresholds tuned again at batch size 16 (step cap 4 or 10 in the grid) on copies of both small
# models and the throughput table at 4/16/64 with them; the table at 4/16/64 with device_loop=false.
# B16=1 instead: after tuning, both small models copied and tuned again at batch 16 (step cap 4 or 10 in the grid,
# 3 interleaved passes per point) with a BLEU budget of BUDGET16 (default 0: no lower than the large model on valid);
# then the greedy table (large, BiLD, lossless BiLD; throughput of both BiLD rows at 1/4/16) at those points.
# Data: .gpu/data/multi30k (a copy of ../shared/data/multi30k). Results are packed into $OUT at every call.
set -uo pipefail
source scripts/detached.sh
W=/tmp/bild-b; R=runs/full; JOB=runs/batch_job.sh; LOG=runs/batch_job.log
if [[ ${1:-wait} == start ]]; then
  mkdir -p runs
  cat > $JOB <<JOB
set -x
source scripts/detached.sh; gpu_tests_alongside runs
demo_pair_up_to_tuning "\${DATA_DIR:-.gpu/data}" || exit 1
EV=("\${DEMO_EVAL[@]}" repeats=${REPEATS:-3} "throughput_batch_sizes=[1, 4, 16, 64]")
retune16() {  # the same small models copied to <model>_b16, thresholds tuned there for batches of 16 (step cap in the
  # grid); arguments: more decode.tune arguments
  for m in small small_aligned; do
    rm -rf $R/\${m}_b16 && cp -r $R/\$m/final $R/\${m}_b16 && rm -f $R/\${m}_b16/bild_thresholds.json
  done
  local tune=(python3 -m decode.tune --config configs/multi30k_eval.yaml large=$R/large/final small=$R/small_b16
              dataset=\${DATA_DIR:-.gpu/data}/multi30k batch_size=16 "sweep_max_small_steps=[4, 10]" "\$@")
  "\${tune[@]}"; "\${tune[@]}" --aligned $R/small_aligned_b16
}
if [[ -n "${LOOP:-}" ]]; then
  python3 scripts/bench_step.py --shapes demo_large demo_small --repeats 5 --batches 1 4 16 64 2>&1 | tee runs/bench_step.log
  "\${EV[@]}" "systems=[large,bild]" "throughput_systems=[bild]" out=$R/throughput_loop_true
  retune16
  "\${EV[@]}" "systems=[large,bild]" "throughput_systems=[bild]" "throughput_batch_sizes=[4, 16, 64]" \
    small=$R/small_b16 aligned=$R/small_aligned_b16 out=$R/throughput_tuned16
  "\${EV[@]}" "systems=[large,bild]" "throughput_systems=[bild]" "throughput_batch_sizes=[4, 16, 64]" device_loop=false \
    out=$R/throughput_loop_false
elif [[ -n "${B16:-}" ]]; then
  retune16 repeats=3 --budget ${BUDGET16:-0}  # no BLEU below the large model on valid by default
  "\${EV[@]}" "systems=[large,bild,bild_exact]" "throughput_systems=[bild,bild_exact]" "throughput_batch_sizes=[1, 4, 16]" \
    small=$R/small_b16 aligned=$R/small_aligned_b16 out=$R/throughput_b16_tuned
elif [[ -n "${AB:-}" ]]; then
  python3 scripts/bench_step.py --shapes demo_large demo_small --repeats 5 --batches 1 4 16 64 2>&1 | tee runs/bench_step.log
  "\${EV[@]}" "systems=[large,bild]" "throughput_systems=[bild]" "throughput_batch_sizes=[4, 16, 64]" out=$R/throughput
else
  "\${EV[@]}" "systems=[large,bild,bild_exact]" out=$R/throughput
  "\${EV[@]}" use_tuned=false do_sample=true temperature=1.0 fallback_threshold=${SAMPLE_FB:-0.3} "systems=[large,bild_exact]" \
    "throughput_systems=[bild_exact]" out=$R/throughput_sampling
  python3 scripts/bench_step.py --shapes demo_large demo_small --repeats 5 2>&1 | tee runs/bench_step.log
fi
wait
echo JOB DONE
JOB
  detached_start $W $JOB $LOG
fi
detached_wait $W $JOB $LOG; rc=$?
[[ -n ${OUT:-} ]] && tar czf $OUT/batch_results.tgz runs/*.log $R/throughput* $R/sampling_* $R/*/final/metrics.json \
  $R/*/final/bild_thresholds.json $R/*_b16/bild_thresholds.json $R/*.log 2>/dev/null
tail -3 runs/gpu_tests.log 2>/dev/null
grep -v "it/s\]\|ex/s\]" $LOG | grep -E "===|after training|wrote|done:|rollback_threshold=|Error|error" | tail -20
[[ -f runs/bench_step.log ]] && grep -E "^\| |^device|^batched" runs/bench_step.log
(( rc == 0 )) && { echo FINISHED; for d in $R/throughput* $R/sampling_*; do [[ -f $d/report.md ]] && { echo "== $d"; \
  grep -E "^\| |^## |^- device" $d/report.md | cut -c1-230; }; done; }
exit 0
