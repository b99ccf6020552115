#!/usr/bin/env bash
# Early exit on the demo large model (issue 10), on one GPU through the device tool:
#   bash scripts/gpu_early_exit.sh start   # copies the repo to /tmp/bild, starts the job detached, waits WAIT s
#   bash scripts/gpu_early_exit.sh wait    # a later call on the still-warm machine
# The job: GPU tests (pytest -m gpu, alongside) -> tokenizer -> large model (LARGE_EPOCHS, default 20) ->
# calibration outputs -> exit heads (frozen after layers 1, 2, 3; joint after JOINT_LAYER) trained at the same
# time -> decode.eval on the whole Multi30k test set: the large model, untrained and trained exits (lossy and
# lossless), transformers' assistant_early_exit, and a threshold sweep of the exits.
# Data from $DATA_DIR/multi30k (default .gpu/m30k/multi30k, a copy of ../shared/data/multi30k); results go to $OUT as each call ends.
set -uo pipefail
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error PYTHONPATH=.
W=/tmp/bild; R=runs/exit; LOG=$W/$R/job.log
if [[ ${1:-wait} == start ]]; then
  mkdir -p $W && cp -r . $W/ && mkdir -p $W/$R
  cat > $W/$R/job.sh <<JOB
set -x
D=\${DATA_DIR:-.gpu/m30k}/multi30k
TRAIN="accelerate launch --config_file configs/accelerate/single_gpu.yaml align/train.py"
(timeout 600 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py > $R/gpu_tests.log 2>&1; echo "gpu tests rc \$?" >> $R/gpu_tests.log) &
[[ -f $R/tokenizer/tokenizer.json ]] || python3 -m data.tokenizer --dataset \$D --split train --vocab-size 8000 --out $R/tokenizer
[[ -f $R/large/final/config.json ]] || \$TRAIN --config configs/multi30k_large.yaml --resume tokenizer=$R/tokenizer dataset=\$D output_dir=$R/large epochs=${LARGE_EPOCHS:-20} > $R/train_large.log 2>&1
for split in train valid; do
  [[ -f $R/calibration.\$split.jsonl ]] || accelerate launch --config_file configs/accelerate/single_gpu.yaml -m align.calibrate --config configs/multi30k_calibrate.yaml model=$R/large/final dataset=\$D split=\$split output=$R/calibration.\$split.jsonl batch_size=256
done
EXIT=(--config configs/multi30k_exit.yaml --resume model=$R/large/final calibration=$R/calibration.train.jsonl eval_calibration=$R/calibration.valid.jsonl)
for k in 1 2 3; do
  [[ -f $R/exit\${k}_frozen/final/exit_head.json ]] || \$TRAIN "\${EXIT[@]}" exit_layer=\$k output_dir=$R/exit\${k}_frozen > $R/train_exit\${k}_frozen.log 2>&1 &
done
J=${JOINT_LAYER:-2}
[[ -f $R/exit\${J}_joint/final/exit_head.json ]] || \$TRAIN "\${EXIT[@]}" exit_layer=\$J exit_mode=joint lr=1e-4 output_dir=$R/exit\${J}_joint > $R/train_exit\${J}_joint.log 2>&1 &
wait
grep -h "after training" $R/train_*.log
CK="[$R/exit1_frozen/final, $R/exit2_frozen/final, $R/exit3_frozen/final, $R/exit\${J}_joint/final]"
python3 -m decode.eval --config configs/multi30k_eval.yaml --sweep large=$R/large/final small=$R/large/final dataset=\$D \
  "systems=[large,early_exit,early_exit_exact,hf_early_exit]" "exit_layers=[1,2,3]" "exit_checkpoints=\$CK" \
  "sweep_models=[exit2,exit_ckpt0,exit_ckpt1,exit_ckpt2,exit_ckpt3]" "sweep_fallback=[0.2,0.4,0.6,0.8]" \
  "sweep_rollback=[2.0,4.0,8.0]" out=$R/eval
echo JOB DONE
JOB
  (cd $W && setsid nohup bash $R/job.sh > $LOG 2>&1 < /dev/null &)
  sleep 5
fi
cd $W
deadline=$((SECONDS + ${WAIT:-560}))
while (( SECONDS < deadline )) && ! grep -q "JOB DONE" $LOG && pgrep -f "$R/job.sh" > /dev/null; do sleep 10; done
pack() {
  [[ -n ${OUT:-} ]] || return 0
  tar czf $OUT/exit_results.tgz $R/eval $R/*/final/metrics.json $R/*/final/exit_head.json $R/*/log.jsonl $R/*.log 2>/dev/null
  cp $R/eval/frontier.png $OUT/ 2>/dev/null
}
pack
grep -v "it/s\]\|ex/s\]" $LOG | grep -E "^\+ |after training|Error|error|rc " | grep -v "^+ \[\[" | tail -25
tail -5 $R/gpu_tests.log 2>/dev/null
if ! grep -q "JOB DONE" $LOG; then echo "STILL RUNNING ($(date +%H:%M:%S))"; exit 0; fi
echo FINISHED
cat $R/eval/report.md
