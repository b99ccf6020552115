"""Decoder-only alignment end to end on tiny models: calibration with a chat template, seq_kd training,
and decode.eval, with a Qwen2 pair saved and loaded through from_pretrained like Hub names."""

import json

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from align.calibrate import CalibrateConfig, calibrate, read_records
from align.train import TrainConfig, train
from decode import BiLD, BiLDConfig
from decode.eval import main
from test_train import fresh_accelerate_state  # noqa: F401  (autouse: each training run starts from a clean Accelerate state)

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def qwen_pair(toy_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    tok = AutoTokenizer.from_pretrained(toy_models["tokenizer"])
    tok.chat_template = CHAT
    paths = {}
    for name, width, layers, seed in (("large", 48, 2, 0), ("small", 24, 1, 1)):
        torch.manual_seed(seed)
        cfg = AutoConfig.for_model("qwen2", vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width,
                                   num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.2,
                                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
        model = AutoModelForCausalLM.from_config(cfg)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


def test_decoder_only_pipeline_with_a_chat_template(toy_data, qwen_pair, tmp_path):
    # 1. calibration: the large model's greedy outputs after the chat-wrapped prompt (left padding)
    out = calibrate(CalibrateConfig(model=qwen_pair["large"], dataset=str(toy_data), split="train", limit=64,
                                    batch_size=16, max_new_tokens=12, chat_template=True,
                                    output=str(tmp_path / "calib.jsonl")))
    records = read_records(out)
    assert len(records) == 64
    large = AutoModelForCausalLM.from_pretrained(qwen_pair["large"])
    small = AutoModelForCausalLM.from_pretrained(qwen_pair["small"])
    tok = AutoTokenizer.from_pretrained(qwen_pair["large"])
    prompt = tok.apply_chat_template([{"role": "user", "content": records[3]["source"]}], add_generation_prompt=True,
                                     tokenize=False)
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    greedy = BiLD(large, small, BiLDConfig(rollback="exact")).generate(ids, max_new_tokens=12).sequences[0, ids.shape[1] :]
    expected = [t for t in greedy.tolist() if t != tok.pad_token_id]
    expected = expected[: expected.index(tok.eos_token_id)] if tok.eos_token_id in expected else expected
    assert records[3]["output_ids"] == expected

    # 2. seq_kd on those outputs: the small model moves towards the large one
    final = train(TrainConfig(model=qwen_pair["small"], calibration=str(out), objective="seq_kd", chat_template=True,
                              lr=3e-3, warmup_steps=5, batch_size=16, max_steps=40, log_every=10, eval_every=1000,
                              save_every=1000, output_dir=str(tmp_path / "aligned")))
    metrics = json.loads((final / "metrics.json").read_text())
    assert metrics["after"]["eval_top1_agreement"] > metrics["before"]["eval_top1_agreement"]

    # 3. the comparison, with the aligned model, on the chat-wrapped test prompts
    cfg = {"task": "translation", "large": qwen_pair["large"], "small": qwen_pair["small"], "aligned": str(final),
           "dataset": str(toy_data), "split": "test", "chat_template": True, "max_new_tokens": 12, "warmup": 1,
           "systems": ["large", "bild", "bild_exact"]}
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(path), "--aligned", "--limit", "5", "--out", str(tmp_path / "eval")]) == 0
    rows = {r["system"]: r for r in json.loads((tmp_path / "eval" / "results.json").read_text())["rows"]}
    assert rows["BiLD lossless (exact rollback) (aligned)"]["identical_to_large"] == 1.0
    assert rows["BiLD lossless (exact rollback) (unaligned)"]["identical_to_large"] == 1.0
