#!/usr/bin/env bash
# Device call: where a training update's time goes, for attention backends and shape padding.
set -uo pipefail
export PYTHONPATH=. HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
R=/tmp/gpucheck; D=.gpu/data/multi30k
[[ -f $R/tok/tokenizer.json ]] || python3 -m data.tokenizer --dataset $D --split train --vocab-size 8000 --out $R/tok
for v in "--sdp default" "--sdp no_cudnn" "--sdp math_eager" "--sdp default --pad-multiple 16" "--sdp no_cudnn --pad-multiple 16"; do
  python3 scripts/profile_train_step.py --config configs/multi30k_large.yaml tokenizer=$R/tok dataset=$D batch_size=256 output_dir=large $v 2>&1 | tail -1
done
