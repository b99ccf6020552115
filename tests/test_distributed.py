"""The loss is normalised by the target tokens of the whole accumulation window, across processes: with
dropout off, one batch of 32, two accumulated batches of 16, and two processes with 16 each (DDP over gloo
on the CPU) must end with the same weights."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForSeq2SeqLM

from align.train import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent
MODEL = {"model_type": "bart", "d_model": 16, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2,
         "decoder_attention_heads": 2, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32, "max_position_embeddings": 64,
         "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0}


def _cfg(toy_data, toy_models, out, **kw):
    base = dict(model_config=MODEL, tokenizer=toy_models["tokenizer"], objective="references", dataset=str(toy_data),
                eval_split=None, max_steps=3, warmup_steps=0, lr=3e-3, scheduler="constant_with_warmup",
                output_dir=str(out), log_every=1, save_every=1000)
    base.update(kw)
    return base


def _weights(folder):
    return {k: v.detach() for k, v in AutoModelForSeq2SeqLM.from_pretrained(folder).named_parameters()}


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_accumulation_and_processes_match_one_big_batch(toy_data, toy_models, tmp_path):
    from accelerate.state import AcceleratorState, GradientState

    big = train(TrainConfig(**_cfg(toy_data, toy_models, tmp_path / "big", batch_size=32)))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accum = train(TrainConfig(**_cfg(toy_data, toy_models, tmp_path / "accum", batch_size=16, gradient_accumulation_steps=2)))

    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(_cfg(toy_data, toy_models, tmp_path / "ddp", batch_size=16)))
    # torchrun with ACCELERATE_USE_CPU gives two real processes over gloo (`accelerate launch --cpu
    # --num_processes 2` quietly starts one).
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          str(ROOT / "align" / "train.py"), "--config", str(config)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 process(es)" in run.stdout

    reference = _weights(big)
    for other in (accum, tmp_path / "ddp" / "final"):
        weights = _weights(other)
        for k in reference:
            torch.testing.assert_close(weights[k], reference[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{other}: {k}: {m}")


def test_calibration_over_two_processes_equals_one(toy_data, toy_models, tmp_path):
    from align.calibrate import CalibrateConfig, calibrate

    args = dict(model=toy_models["large"], dataset=str(toy_data), split="train", limit=50, batch_size=8, max_new_tokens=16)
    one = calibrate(CalibrateConfig(**args, output=str(tmp_path / "one.jsonl")))
    config = tmp_path / "calib.yaml"
    config.write_text(yaml.safe_dump({**args, "output": str(tmp_path / "two.jsonl")}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "align.calibrate",
                          "--config", str(config)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "two.jsonl").read_text() == one.read_text()
    assert not list(tmp_path.glob("two.jsonl.part*"))
