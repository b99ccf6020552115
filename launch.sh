#!/usr/bin/env bash
# The whole pipeline on the embedded default (Multi30k De-En, a large and a small model trained here):
# shared tokenizer -> train large -> train small -> calibration outputs -> alignment -> threshold tuning on
# the validation split -> evaluation on test at the tuned points, threshold sweep.
#
#   ./launch.sh            full profile with a GPU, the reduced CPU profile without one
#   ./launch.sh cpu        the reduced profile (11-17 minutes on 2 cores, BENCHMARKS.md)
#   ./launch.sh smoke      miniature settings, every stage, about a minute on a CPU (the test suite runs it)
#   ./launch.sh full       the full profile (one GPU)
#
# Every stage is skipped when its output exists; interrupted training resumes from its last checkpoint. A run folder
# is only continued with the inputs it was made from (runs/<profile>/inputs.txt); other inputs are refused.
# Outputs go to runs/<profile>/; the last stage prints the report (runs/<profile>/eval/report.md).
# Environment: DATA_DIR (default ../shared/data; where it has no multi30k/, Multi30k is fetched from the Hub, into
# runs/data/multi30k or, with DATA_DIR set, into DATA_DIR/multi30k),
# RUNS (default runs), PARALLEL_TRAIN=1 trains the large and small models at the same time (one GPU has room),
# LARGE_EXTRA / EVAL_EXTRA: more key=value overrides for the large model's training / the main evaluation,
# STOP_AFTER=train|calibrate|align|tune|eval: stop after that stage (eval: the main evaluation, before the sweep).
set -euo pipefail
cd "$(dirname "$0")"

PROFILE=${1:-auto}
if [[ "$PROFILE" == auto ]]; then
  if python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then PROFILE=full; else PROFILE=cpu; fi
fi
R=${RUNS:-runs}/$PROFILE
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
[[ -t 2 ]] || export TQDM_MININTERVAL=${TQDM_MININTERVAL:-30}  # into a log: a bar's line every 30 s, not every step
case "$PROFILE" in full|cpu|smoke) ;; *) echo "usage: $0 [full|cpu|smoke]" >&2; exit 2 ;; esac
case "${STOP_AFTER:-}" in
  ""|train|calibrate|align|tune|eval) ;;
  *) echo "error: STOP_AFTER must be train, calibrate, align, tune or eval, got '$STOP_AFTER'" >&2; exit 2 ;;
esac
# The data: $DATA_DIR/multi30k; where it is absent, Multi30k from the Hub (into runs/data/ for the default DATA_DIR)
if [[ -n ${DATA_DIR:-} ]]; then M30K=$DATA_DIR/multi30k
elif [[ -f ../shared/data/multi30k/train.src ]]; then DATA_DIR=../shared/data; M30K=$DATA_DIR/multi30k
else DATA_DIR=${RUNS:-runs}/data; M30K=$DATA_DIR/multi30k; fi
if [[ ! -f $M30K/train.src ]]; then
  echo "no Multi30k data at $M30K: fetching it from the Hugging Face Hub (${MULTI30K_HUB:-bentrevett/multi30k})"
  HF_HUB_OFFLINE=0 python3 -m data.fetch --out "$M30K" || {
    echo "error: no Multi30k data at $M30K ({train,valid,test}.{src,tgt}) and none from the Hub; set DATA_DIR to a folder holding multi30k/" >&2
    exit 2; }
fi
# What this run was made from: a run folder is only ever continued with the same inputs
INPUTS="profile=$PROFILE data=$(cd "$M30K" && pwd) LARGE_EXTRA=${LARGE_EXTRA:-} EVAL_EXTRA=${EVAL_EXTRA:-}"
if [[ -f $R/inputs.txt && "$(cat "$R/inputs.txt")" != "$INPUTS" ]]; then
  echo "error: $R was made from other inputs:" >&2
  echo "  then: $(cat "$R/inputs.txt")" >&2
  echo "  now:  $INPUTS" >&2
  echo "remove $R, or set RUNS to another folder, to start a run with these" >&2
  exit 2
fi

case "$PROFILE" in
  full)
    VOCAB=8000
    LARGE=(); SMALL=(); ALIGN=(); CALIB=()
    EVAL=("throughput_batch_sizes=[1, 4, 16, 64]")  # tokens/s by batch size, large alone and BiLD
    SWEEP=()  # the whole test set: every sweep point runs on the fast path
    OOD=(--limit 200)
    EVAL_YAML=("warmup: 5" "max_new_tokens: 96")
    TUNE=()
    ;;
  cpu)
    VOCAB=4000
    SHAPE_L=(model_config.d_model=256 model_config.encoder_layers=2 model_config.decoder_layers=3
             model_config.encoder_attention_heads=4 model_config.decoder_attention_heads=4
             model_config.encoder_ffn_dim=512 model_config.decoder_ffn_dim=512)
    LARGE=("${SHAPE_L[@]}" limit=8000 epochs=3 batch_size=64 warmup_steps=100 lr=1e-3 mixed_precision=no eval_limit=200)
    # The small model: the large one with its first decoder layer only, fine-tuned (shrink and fine-tune). Trained
    # from scratch in the minutes a CPU has, a small model learned to ignore its input (the same sentence for every
    # source) and alignment then taught it the large model's repetitions. A one-layer decoder step costs 43% of the
    # large model's three-layer step on the compact passes here (BENCHMARKS.md).
    SMALL_FROM_LARGE=1
    SMALL=(model="$R/large/final" model_config=null "keep_decoder_layers=[0]" limit=8000 epochs=1 batch_size=64
           warmup_steps=20 lr=5e-4 mixed_precision=no eval_limit=200)
    CALIB=(limit=3000 batch_size=64 max_new_tokens=48)
    # forward-KL token distillation, not seq_kd: this large model's greedy outputs loop ("orange orange orange ..."),
    # and a small model trained on them as targets loops too (10.71 -> 5.94 BLEU alone; token_kd: 9.10). Its looping
    # outputs (half of them repeat three tokens) are left out (drop_loops), and the rest read four times, about the
    # same number of updates: the aligned small model 9.10 -> 12.27 BLEU, aligned BiLD 11.70 -> 13.10 (BENCHMARKS.md)
    ALIGN_OBJECTIVE=token_kd
    ALIGN=(objective=token_kd drop_loops=3 epochs=4 batch_size=64 mixed_precision=no eval_limit=200 limit=3000
           warmup_steps=20 lr=5e-4)
    # decoding on the compact passes (no CUDA graphs): on 2 cores a step of the small model took 2.4 ms there
    # against 4.4 ms through transformers' forward (BENCHMARKS.md)
    # three interleaved timed passes: speedups on 2 cores moved by up to 0.3x between single-pass runs of the same
    # models (BENCHMARKS.md); the report shows each row's median and range
    EVAL=(--limit 100 warmup=2 max_new_tokens=48 fast_path=true repeats=3)
    SWEEP=(--limit 100 sweep_limit=30 "sweep_fallback=[0.3, 0.6, 0.9]" "sweep_rollback=[1.0, 3.0]" warmup=2 max_new_tokens=48 fast_path=true)
    OOD=()
    EVAL_YAML=("limit: 100" "warmup: 2" "max_new_tokens: 48" "fast_path: true" "repeats: 3")
    # the points within the budget timed three times each (decode.tune's repeats): timed once, tuning picked
    # rollback 2, 4 or 8 and fallback 0.2 or 0.6 for the same aligned model in different runs (BENCHMARKS.md)
    TUNE=(--limit 60 warmup=2 max_new_tokens=48 fast_path=true repeats=3)
    ;;
  smoke)
    VOCAB=400
    SHAPE_L=(model_config.d_model=64 model_config.encoder_layers=2 model_config.decoder_layers=2
             model_config.encoder_attention_heads=2 model_config.decoder_attention_heads=2
             model_config.encoder_ffn_dim=128 model_config.decoder_ffn_dim=128)
    SHAPE_S=(model_config.d_model=32 model_config.encoder_layers=1 model_config.decoder_layers=1
             model_config.encoder_attention_heads=2 model_config.decoder_attention_heads=2
             model_config.encoder_ffn_dim=64 model_config.decoder_ffn_dim=64)
    LARGE=("${SHAPE_L[@]}" limit=600 max_steps=30 batch_size=32 warmup_steps=5 mixed_precision=no eval_limit=40 save_every=20)
    SMALL=("${SHAPE_S[@]}" limit=600 max_steps=20 batch_size=32 warmup_steps=5 mixed_precision=no eval_limit=40 save_every=20)
    CALIB=(limit=300 batch_size=64 max_new_tokens=24)
    ALIGN=(max_steps=15 batch_size=32 warmup_steps=2 mixed_precision=no eval_limit=40 save_every=10)
    EVAL=(--limit 12 warmup=1 max_new_tokens=24)
    SWEEP=(--limit 12 sweep_limit=6 "sweep_fallback=[0.3, 0.9]" "sweep_rollback=[1.0, 5.0]" warmup=1 max_new_tokens=24)
    OOD=()
    EVAL_YAML=("limit: 12" "warmup: 1" "max_new_tokens: 24")
    TUNE=(--limit 12 warmup=1 max_new_tokens=24 "sweep_fallback=[0.3, 0.9]" "sweep_rollback=[1.0, 5.0]")
    ;;
esac

source scripts/launchers.sh  # TRAIN, CALIBRATE
STAGES=7; [[ $PROFILE == full && -d $DATA_DIR/iwslt17_deen ]] && STAGES=8
STAGE=0
stage() { STAGE=$((STAGE + 1)); echo; echo "=== [$PROFILE] $STAGE/$STAGES $* ($(date +%H:%M:%S))"; }
stop_after() { if [[ ${STOP_AFTER:-} == "$1" ]]; then echo "stopping after $1 (STOP_AFTER=$1)"; exit 0; fi; }
mkdir -p "$R"

read -ra extra <<< "${LARGE_EXTRA:-}"; LARGE+=("${extra[@]}")
read -ra extra <<< "${EVAL_EXTRA:-}"; EVAL+=("${extra[@]}")
stage "shared tokenizer"
if [[ -f $R/tokenizer/tokenizer.json ]]; then echo "done: $R/tokenizer"
else python3 -m data.tokenizer --dataset "$M30K" --split train --vocab-size $VOCAB --out "$R/tokenizer"; fi
echo "$INPUTS" > "$R/inputs.txt"
ln -sfn "$PROFILE" "${RUNS:-runs}/latest"  # the configs' commands (runs/latest/...) work after any profile's first stage

train_model() {  # name config overrides...
  local name=$1 config=$2; shift 2
  if [[ -f $R/$name/final/config.json ]]; then echo "done: $R/$name/final"; return; fi
  "${TRAIN[@]}" --config "$config" --resume tokenizer="$R/tokenizer" dataset="$M30K" output_dir="$R/$name" "$@"
}
stage "train the large and the small model (on references)"
if [[ ${PARALLEL_TRAIN:-0} == 1 && ${SMALL_FROM_LARGE:-0} != 1 ]]; then
  train_model large configs/multi30k_large.yaml "${LARGE[@]}" > "$R/train_large.log" 2>&1 &
  pid=$!
  train_model small configs/multi30k_small.yaml "${SMALL[@]}" > "$R/train_small.log" 2>&1 || { tail -20 "$R/train_small.log"; exit 1; }
  wait $pid || { tail -20 "$R/train_large.log"; exit 1; }
  grep -h "after training\|done:" "$R/train_large.log" "$R/train_small.log" || true
else
  train_model large configs/multi30k_large.yaml "${LARGE[@]}"
  train_model small configs/multi30k_small.yaml "${SMALL[@]}"
fi

stop_after train

stage "calibration outputs of the large model (train inputs, and valid for held-out evaluation)"
for split in train valid; do
  out=$R/calibration.$split.jsonl
  if [[ -f $out && ! -e $out.part0 ]]; then echo "done: $out"; continue; fi
  extra=("${CALIB[@]}")
  if [[ $split == valid ]]; then extra=(batch_size=256); fi
  if [[ $split == valid && $PROFILE == smoke ]]; then extra+=(limit=40 max_new_tokens=24); fi
  "${CALIBRATE[@]}" --config configs/multi30k_calibrate.yaml model="$R/large/final" dataset="$M30K" split=$split output="$out" "${extra[@]}"
done

stop_after calibrate

stage "prediction alignment of the small model (${ALIGN_OBJECTIVE:-seq_kd})"
if [[ -f $R/small_aligned/final/config.json ]]; then echo "done: $R/small_aligned/final"
else
  "${TRAIN[@]}" --config configs/multi30k_align.yaml --resume model="$R/small/final" teacher="$R/large/final" \
    calibration="$R/calibration.train.jsonl" eval_calibration="$R/calibration.valid.jsonl" output_dir="$R/small_aligned" "${ALIGN[@]}"
fi

stop_after align

stage "threshold tuning on the validation split (the fastest point within 0.1 BLEU of the large model)"
tune() {  # model-folder tune-args...
  local folder=$1; shift
  if [[ -f $folder/bild_thresholds.json ]]; then echo "done: $folder/bild_thresholds.json"; return; fi
  local rc=0
  python3 -m decode.tune --config configs/multi30k_eval.yaml large="$R/large/final" small="$R/small/final" \
    aligned="$R/small_aligned/final" dataset="$M30K" "${TUNE[@]}" "$@" || rc=$?
  if [[ $rc == 3 ]]; then echo "no tuned thresholds for $folder: its BiLD rows use the config's"
  elif [[ $rc != 0 ]]; then exit $rc; fi
}
tune "$R/small/final"
tune "$R/small_aligned/final" --aligned
stop_after tune

MODELS=(large="$R/large/final" small="$R/small/final" aligned="$R/small_aligned/final")
# `python -m decode.eval --aligned` with no --config evaluates this run's models on its data: runs/latest/eval.yaml
{ echo "# Written by ./launch.sh $PROFILE: this run's models and data. Run: python -m decode.eval --aligned"
  grep -Ev "^(#|large:|small:|aligned:|dataset:|out:|limit:|warmup:|max_new_tokens:)" configs/multi30k_eval.yaml
  printf '%s\n' "large: $R/large/final" "small: $R/small/final" "aligned: $R/small_aligned/final" \
    "dataset: $M30K" "out: $R/eval_again" "${EVAL_YAML[@]}"; } > "$R/eval.yaml"
evaluate() {  # out config args...
  local out=$1 config=$2; shift 2
  if [[ -f $out/report.md ]]; then echo "done: $out"; return; fi
  python3 -m decode.eval --config "$config" --aligned --out "$out" "${MODELS[@]}" "$@"
}
stage "evaluation on Multi30k test: large, small, BiLD unaligned and aligned, assisted generation"
evaluate "$R/eval" configs/multi30k_eval.yaml dataset="$M30K" "${EVAL[@]}"
[[ ${STOP_AFTER:-} == eval ]] && cat "$R/eval/report.md"
stop_after eval
stage "threshold sweep: speed-quality frontier and the paper's operating points"
evaluate "$R/sweep" configs/multi30k_eval.yaml --sweep "systems=[large]" dataset="$M30K" "${SWEEP[@]}"
if [[ $PROFILE == full && -d $DATA_DIR/iwslt17_deen ]]; then
  stage "out of domain: IWSLT2017 tst2010"
  evaluate "$R/eval_iwslt17" configs/iwslt17_eval.yaml dataset="$DATA_DIR/iwslt17_deen" "${OOD[@]}"
fi

echo; cat "$R/eval/report.md"; echo; sed -n '/## Threshold sweep/,$p' "$R/sweep/report.md"
