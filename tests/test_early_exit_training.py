"""Training an exit head (align/train.py objective=early_exit), frozen and joint, and decoding with it."""

import json

import pytest
import torch
from test_early_exit import truncated
from test_train import _params, calibration, fresh_accelerate_state  # noqa: F401 (fixtures)
from tiny_models import hf_greedy, random_prompt, tiny_model
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from align.models import ExitTraining
from align.train import TrainConfig, train
from decode import BiLDConfig, EarlyExitBiLD
from decode.early_exit import EXIT_HEAD_CONFIG, EXIT_HEAD_WEIGHTS


@pytest.mark.parametrize("arch", ("bart", "t5", "llama", "qwen2"))
def test_training_reads_the_exit_decoding_uses(arch):
    """The wrapper's untrained exit logits (layer k read by a hook, then ExitHead.logits) are the logits of the
    model cut after layer k: training and decoding see the same exit."""
    model = tiny_model(arch, 2, width=32, layers=3)
    ids = random_prompt(3, length=7, batch=2)
    mask = torch.ones_like(ids)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = random_prompt(4, length=5, batch=2)
    wrapper = ExitTraining(model, 2, "joint").eval()
    with torch.no_grad():
        full, exit_logits = wrapper(**inputs)
        assert torch.allclose(full, model(**inputs).logits, atol=1e-5)
        assert torch.allclose(exit_logits, truncated(model, 2)(**inputs).logits, atol=1e-5)


def _exit_cfg(toy_models, calibration, tmp_path, **kw):  # noqa: F811
    base = dict(model=toy_models["large"], objective="early_exit", exit_layer=1, calibration=calibration["train"],
                eval_calibration=calibration["valid"], lr=3e-3, warmup_steps=5, batch_size=16, max_steps=60,
                log_every=10, eval_every=1000, save_every=1000, output_dir=str(tmp_path / "exit"))
    base.update(kw)
    return TrainConfig(**base)


def test_frozen_exit_leaves_the_model_unchanged_and_raises_agreement(toy_data, toy_models, calibration, tmp_path):  # noqa: F811
    final = train(_exit_cfg(toy_models, calibration, tmp_path))
    assert (final / EXIT_HEAD_WEIGHTS).is_file()
    info = json.loads((final / EXIT_HEAD_CONFIG).read_text())
    assert info["exit_layer"] == 1 and info["mode"] == "frozen"
    before, after = _params(toy_models["large"]), _params(final)
    assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)
    metrics = json.loads((final / "metrics.json").read_text())
    print(f"exit agreement with the full model: {metrics['before']['eval_top1_agreement']:.3f} -> "
          f"{metrics['after']['eval_top1_agreement']:.3f}")
    assert metrics["after"]["eval_top1_agreement"] > metrics["before"]["eval_top1_agreement"] + 0.05
    assert metrics["after"]["eval_loss"] == pytest.approx(metrics["before"]["eval_loss"], rel=1e-5)

    # the head is found on the checkpoint's path; the lossless mode is still the original model's greedy output
    large = AutoModelForSeq2SeqLM.from_pretrained(toy_models["large"]).eval()
    tok = AutoTokenizer.from_pretrained(toy_models["large"])
    sources = (toy_data / "test.src").read_text().splitlines()[:12]
    shares = {}
    # exact rollback, drafts of 4 with no confidence fallback: the exit's share of the output is its agreement
    policy = BiLDConfig(rollback="exact", fallback_threshold=0.0, max_small_steps=4)
    for name, bild in (("untrained", EarlyExitBiLD(large, 1, policy)),
                       ("trained", EarlyExitBiLD(str(final), config=policy))):
        small = new = 0
        for s in sources:
            ids = torch.tensor([tok(s)["input_ids"]])
            out = bild.generate(ids, max_new_tokens=24)
            small, new = small + out.stats.small_tokens, new + out.stats.new_tokens
            assert out.sequences.tolist() == hf_greedy(large, ids, max_new_tokens=24).tolist()
        shares[name] = small / new
    print(f"exit share of early-exit BiLD tokens: {shares}")
    assert shares["trained"] > shares["untrained"]


def test_joint_training_changes_the_model_and_saves_both(toy_models, calibration, tmp_path):  # noqa: F811
    final = train(_exit_cfg(toy_models, calibration, tmp_path, exit_mode="joint", max_steps=3, exit_weight=0.5))
    before, after = _params(toy_models["large"]), _params(final)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert json.loads((final / EXIT_HEAD_CONFIG).read_text())["mode"] == "joint"
    metrics = json.loads((final / "metrics.json").read_text())
    assert {"eval_loss", "eval_top1_agreement"} <= set(metrics["after"])
    bild = EarlyExitBiLD(str(final), config=BiLDConfig(rollback="exact"))
    joint = AutoModelForSeq2SeqLM.from_pretrained(final).eval()
    ids = torch.tensor([[5, 9, 14, 22, 2]])
    assert bild.generate(ids, max_new_tokens=12).sequences.tolist() == hf_greedy(joint, ids, max_new_tokens=12).tolist()


@pytest.mark.parametrize("kw,match", [
    (dict(exit_layer=None), "needs `model`"),
    (dict(exit_mode="both"), "exit_mode"),
    (dict(lora=True), "lora"),
    (dict(exit_weight=0), "exit_weight"),
    (dict(calibration=None), "calibration"),
])
def test_bad_early_exit_config(kw, match):
    base = dict(model="m", objective="early_exit", exit_layer=1, calibration="c.jsonl")
    base.update(kw)
    with pytest.raises(ValueError, match=match):
        TrainConfig(**base)
