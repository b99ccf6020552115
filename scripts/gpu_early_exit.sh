#!/usr/bin/env bash
# Early exit on the demo large model, on one GPU through the device tool:
#   bash scripts/gpu_early_exit.sh start   # copies the repo to /tmp/bild, starts the job detached, waits WAIT s
#   bash scripts/gpu_early_exit.sh wait    # a later call on the still-warm machine
# The job: GPU tests (pytest -m gpu, alongside) -> `./launch.sh full` up to alignment (tokenizer, the large model
# for LARGE_EPOCHS, default 20, and the small model at the same time, calibration outputs, seq_kd alignment of the
# small model) -> exit heads (frozen after layers 1, 2, 3; joint after 1 and 2), all at the same time ->
# decode.eval on the whole Multi30k test set: the large model, two-model BiLD (unaligned, aligned), untrained and
# trained exits (lossy and lossless), transformers' assistant_early_exit, and a threshold sweep of aligned BiLD
# and three trained exits. Data from $DATA_DIR/multi30k (default .gpu/data, a copy of ../shared/data); results
# go to $OUT as each call ends.
set -uo pipefail
source scripts/detached.sh
W=/tmp/bild; R=runs/exit/full; JOB=runs/exit_job.sh; LOG=runs/exit_job.log
if [[ ${1:-wait} == start ]]; then
  mkdir -p runs
  cat > $JOB <<JOB
set -x
D=\${DATA_DIR:-.gpu/data}/multi30k
TRAIN="accelerate launch --config_file configs/accelerate/single_gpu.yaml align/train.py"
source scripts/detached.sh; gpu_tests_alongside $R
RUNS=runs/exit PARALLEL_TRAIN=1 STOP_AFTER=align DATA_DIR=\${DATA_DIR:-.gpu/data} LARGE_EXTRA="epochs=${LARGE_EPOCHS:-20}" ./launch.sh full
EXIT=(--config configs/multi30k_exit.yaml --resume model=$R/large/final calibration=$R/calibration.train.jsonl eval_calibration=$R/calibration.valid.jsonl)
for k in 1 2 3; do
  [[ -f $R/exit\${k}_frozen/final/exit_head.json ]] || \$TRAIN "\${EXIT[@]}" exit_layer=\$k epochs=8 output_dir=$R/exit\${k}_frozen > $R/train_exit\${k}_frozen.log 2>&1 &
done
for k in 1 2; do
  [[ -f $R/exit\${k}_joint/final/exit_head.json ]] || \$TRAIN "\${EXIT[@]}" exit_layer=\$k exit_mode=joint lr=1e-4 output_dir=$R/exit\${k}_joint > $R/train_exit\${k}_joint.log 2>&1 &
done
wait
for f in $R/train_*.log; do echo "\$f: \$(grep -h 'after training' \$f)"; done
CK="[$R/exit1_frozen/final, $R/exit2_frozen/final, $R/exit3_frozen/final, $R/exit1_joint/final, $R/exit2_joint/final]"
python3 -m decode.eval --config configs/multi30k_eval.yaml --sweep --aligned large=$R/large/final small=$R/small/final \
  aligned=$R/small_aligned/final dataset=\$D "systems=[large,bild,early_exit,early_exit_exact,hf_early_exit]" \
  "exit_layers=[1,2,3]" "exit_checkpoints=\$CK" "sweep_models=[aligned,exit_ckpt2,exit_ckpt3,exit_ckpt4]" out=$R/eval
echo JOB DONE
JOB
  detached_start $W $JOB $LOG
fi
WAIT=${WAIT:-560} detached_wait $W $JOB $LOG; rc=$?
pack() {
  [[ -n ${OUT:-} ]] || return 0
  tar czf $OUT/exit_results.tgz $R/eval $R/*/final/metrics.json $R/*/final/bild_thresholds.json $R/*/final/exit_head.json $R/*/log.jsonl $R/*.log 2>/dev/null
  cp $R/eval/frontier.png $OUT/ 2>/dev/null
}
pack
grep -v "it/s\]\|ex/s\]" $LOG | grep -E "^\+ |after training|Error|error|rc " | grep -v "^+ \[\[" | tail -25
tail -5 $R/gpu_tests.log 2>/dev/null
(( rc == 0 )) || exit 0
echo FINISHED
cat $R/eval/report.md
