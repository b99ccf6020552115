#!/usr/bin/env bash
# One device call: the test suite on the GPU image's libraries, the GPU tests, the per-step microbenchmark,
# one-epoch training throughput of the demo pair, and DeepSpeed ZeRO-2/3 smoke runs with saving.
#   bash scripts/gpu_check.sh   (in the repo root, with .whl and .gpu/data carried; see BENCHMARKS.md)
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site .whl/* >/tmp/pip.log 2>&1 || tail -5 /tmp/pip.log
export PYTHONPATH=.:/tmp/site HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
echo "== default test suite (CPU tests, GPU image libraries)"
timeout 300 python3 -m pytest -q -p no:cacheprovider -x 2>&1 | tail -4
echo "== GPU tests"
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tail -3
echo "== step microbenchmark"
timeout 120 python3 scripts/bench_step.py 2>&1 | tail -4
echo "== one epoch of each model (Multi30k, batch 128, bf16)"
R=/tmp/gpucheck; D=.gpu/data/multi30k
python3 -m data.tokenizer --dataset $D --split train --vocab-size 8000 --out $R/tok
for m in large small; do
  timeout 150 accelerate launch --config_file configs/accelerate/single_gpu.yaml align/train.py --config configs/multi30k_$m.yaml \
    tokenizer=$R/tok dataset=$D epochs=1 eval_limit=300 output_dir=$R/$m 2>&1 | grep -E "after training|Error|error" | tail -3
  python3 -c "import json;m=json.load(open('$R/$m/final/metrics.json'));print('$m', 'updates', m['updates'], 'seconds', round(m['train_seconds'],1))"
done
echo "== DeepSpeed ZeRO-2 and ZeRO-3 (1 process), 20 updates each, then reload the saved folder"
for z in zero2 zero3; do
  timeout 150 accelerate launch --config_file configs/accelerate/$z.yaml --num_processes 1 align/train.py --config configs/multi30k_small.yaml \
    tokenizer=$R/tok dataset=$D max_steps=20 eval_limit=100 output_dir=$R/$z 2>&1 | grep -E "after training|Error|error|saved" | tail -3
  python3 -c "
from transformers import AutoModelForSeq2SeqLM; m=AutoModelForSeq2SeqLM.from_pretrained('$R/$z/final'); print('$z reloads:', sum(p.numel() for p in m.parameters()), 'parameters')" 2>&1 | tail -1
done
