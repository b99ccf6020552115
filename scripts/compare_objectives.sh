#!/usr/bin/env bash
# Alignment objectives compared on one pair: seq_kd (the paper; ./launch.sh's own), token-level KD
# (forward KL, JSD) on the large model's outputs, and on-policy alignment as in DistillSpec (the small model's own
# outputs on the calibration inputs, scored by the large model's distributions, JSD). Each aligned model gets its
# thresholds tuned on the validation split, then decode.eval on test at that point (greedy: BiLD and its lossless
# mode), and speculative sampling at temperature 1 (fallback 0.3); a table comes last.
#
#   ./launch.sh full && bash scripts/compare_objectives.sh full       (smoke | cpu | full: the run's profile)
#   STOP_AFTER=calibrate ./launch.sh full && PARALLEL_ALIGN=1 bash scripts/compare_objectives.sh full
#
# PARALLEL_ALIGN=1 aligns with every objective at the same time (one GPU has room for these small models; nothing
# is timed then; logs in runs/<profile>/align_*.log), seq_kd too where ./launch.sh has not yet. EVAL_REPEATS
# (default 3 on the full profile) and SAMPLE_REPEATS (default 2) are decode.eval's timed passes per row.
# It reuses the run's models and calibration outputs (runs/<profile>/); finished stages are skipped. The
# on-policy data is align.calibrate run with the small model: resumable, spread over processes the same way.
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${1:?usage: $0 smoke|cpu|full}
R=${RUNS:-runs}/$PROFILE
DATA_DIR=${DATA_DIR:-../shared/data}; M30K=$DATA_DIR/multi30k
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
[[ -f $R/calibration.valid.jsonl && -f $R/small/final/config.json ]] || \
  { echo "error: no ./launch.sh $PROFILE run in $R up to its calibration outputs (STOP_AFTER=calibrate)" >&2; exit 2; }
case "$PROFILE" in
  full)  CALIB=(); ALIGN=(); TUNE=(); EVAL=(repeats=${EVAL_REPEATS:-3}); SAMPLE=(repeats=${SAMPLE_REPEATS:-2}) ;;
  cpu)   CALIB=(limit=4000 batch_size=64 max_new_tokens=48)
         ALIGN=(epochs=2 batch_size=64 mixed_precision=no eval_limit=200 limit=4000)
         TUNE=(--limit 100 warmup=2 max_new_tokens=48); EVAL=(--limit 100 warmup=2 max_new_tokens=48); SAMPLE=("${EVAL[@]}") ;;
  smoke) CALIB=(limit=300 batch_size=64 max_new_tokens=24)
         ALIGN=(max_steps=15 batch_size=32 warmup_steps=2 mixed_precision=no eval_limit=40 save_every=10)
         TUNE=(--limit 12 warmup=1 max_new_tokens=24 "sweep_fallback=[0.3, 0.9]" "sweep_rollback=[1.0, 5.0]")
         EVAL=(--limit 12 warmup=1 max_new_tokens=24); SAMPLE=("${EVAL[@]}") ;;
  *) echo "usage: $0 smoke|cpu|full" >&2; exit 2 ;;
esac
source scripts/launchers.sh  # TRAIN, CALIBRATE
stage() { echo; echo "=== [objectives] $* ($(date +%H:%M:%S))"; }

stage "on-policy data: the small model's own greedy outputs on the calibration inputs"
for split in train valid; do
  out=$R/onpolicy.$split.jsonl
  if [[ -f $out && ! -e $out.part0 ]]; then echo "done: $out"; continue; fi
  extra=("${CALIB[@]}"); [[ $split == valid ]] && extra=(batch_size=256 "${CALIB[@]:0:1}")
  "${CALIBRATE[@]}" --config configs/multi30k_calibrate.yaml model="$R/small/final" dataset="$M30K" split=$split output="$out" "${extra[@]}"
done

NAMES=(seq_kd token_kd_fkl token_kd_jsd onpolicy_jsd)
declare -A OBJ=(
  [seq_kd]="objective=seq_kd calibration=$R/calibration.train.jsonl eval_calibration=$R/calibration.valid.jsonl"
  [token_kd_fkl]="objective=token_kd divergence=forward_kl calibration=$R/calibration.train.jsonl eval_calibration=$R/calibration.valid.jsonl"
  [token_kd_jsd]="objective=token_kd divergence=jsd calibration=$R/calibration.train.jsonl eval_calibration=$R/calibration.valid.jsonl"
  [onpolicy_jsd]="objective=token_kd divergence=jsd calibration=$R/onpolicy.train.jsonl eval_calibration=$R/calibration.valid.jsonl"
)
folder() { if [[ $1 == seq_kd ]]; then echo "$R/small_aligned"; else echo "$R/aligned_$1"; fi; }  # as ./launch.sh names it
align() {  # name
  local name=$1 settings
  read -ra settings <<< "${OBJ[$name]}"
  "${TRAIN[@]}" --config configs/multi30k_align.yaml --resume model="$R/small/final" teacher="$R/large/final" \
    output_dir="$(folder "$name")" "${settings[@]}" "${ALIGN[@]}"
}
pids=()
for name in "${NAMES[@]}"; do
  stage "align: $name"
  if [[ -f $(folder "$name")/final/config.json ]]; then echo "done: $(folder "$name")/final"; continue; fi
  if [[ ${PARALLEL_ALIGN:-0} == 1 ]]; then
    align "$name" > "$R/align_$name.log" 2>&1 & pids+=($!)
  else
    align "$name"
  fi
done
for pid in "${pids[@]}"; do wait "$pid" || { tail -20 "$R"/align_*.log; exit 1; }; done

MODELS=(large="$R/large/final" dataset="$M30K")
for name in "${NAMES[@]}"; do
  model=$(folder "$name")/final
  stage "tune on valid, then evaluate on test: $name"
  if [[ ! -f $model/bild_thresholds.json ]]; then
    rc=0; python3 -m decode.tune --config configs/multi30k_eval.yaml small="$model" "${MODELS[@]}" "${TUNE[@]}" || rc=$?
    [[ $rc == 0 || $rc == 3 ]] || exit $rc
  fi
  out=$R/objectives/$name
  [[ -f $out/report.md ]] || python3 -m decode.eval --config configs/multi30k_eval.yaml small="$model" --out "$out" \
    "${MODELS[@]}" "systems=[large,bild,bild_exact]" "${EVAL[@]}"
done
for name in "${NAMES[@]}"; do
  stage "speculative sampling at temperature 1 on test: $name"
  out=$R/objectives/$name.sample
  [[ -f $out/report.md ]] || python3 -m decode.eval --config configs/multi30k_eval.yaml small="$(folder "$name")/final" \
    --out "$out" "${MODELS[@]}" "systems=[large,bild_exact]" do_sample=true temperature=1.0 fallback_threshold=0.3 \
    use_tuned=false "${SAMPLE[@]}"
done

python3 - "$R" "${NAMES[@]}" <<'PY'
import json, sys
from pathlib import Path
root, names = Path(sys.argv[1]), sys.argv[2:]

def rows(name):
    path = root / "objectives" / name / "results.json"
    return {r["system"]: r for r in json.loads(path.read_text())["rows"]} if path.is_file() else None

def spread(r):
    s = r.get("speedup_passes") or []
    return f" ({min(s):.2f}-{max(s):.2f})" if len(s) > 1 else ""

print("\n| objective | tuned point (fallback, rollback) | BLEU (large) | speedup vs large | tokens / large call | fallback rate | "
      "rollback rate | lossless: speedup, tokens / large call | sampling T=1, fallback 0.3: speedup, tokens / large call |")
print("|---|---|---|---|---|---|---|---|---|")
for name in names:
    greedy, sample = rows(name), rows(name + ".sample")
    if greedy is None:
        print(f"| {name} | not run |" + " |" * 7)
        continue
    b, e, large = greedy["BiLD"], greedy["BiLD lossless (exact rollback)"], greedy["large"]
    point = f"{b['fallback_threshold']:g}, {b['rollback_threshold']:g}" + (" (tuned)" if b.get("thresholds_tuned_on") else " (config)")
    s = sample["BiLD lossless (exact rollback)"] if sample else None
    sampled = f"{s['speedup_vs_large']:.2f}x{spread(s)}, {s['tokens_per_large_call']:.2f}" if s else "not run"
    print(f"| {name} | {point} | {b['bleu']:.2f} ({large['bleu']:.2f}) | {b['speedup_vs_large']:.2f}x{spread(b)} | "
          f"{b['tokens_per_large_call']:.2f} | {b['fallback_rate']:.3f} | {b['rollback_rate']:.3f} | "
          f"{e['speedup_vs_large']:.2f}x{spread(e)}, {e['tokens_per_large_call']:.2f} | {sampled} |")
PY
