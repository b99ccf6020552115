import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from align.calibrate import CalibrateConfig, calibrate
from align.publish import model_card, push
from align.train import TrainConfig, train
from data.config import ConfigError, load_config
from decode import BiLD, BiLDConfig


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def calibration(toy_data, toy_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("calib")
    files = {}
    for split, limit in (("train", 400), ("valid", 60)):
        cfg = CalibrateConfig(model=toy_models["large"], dataset=str(toy_data), split=split, limit=limit,
                              batch_size=64, max_new_tokens=24, output=str(out / f"{split}.jsonl"))
        files[split] = str(calibrate(cfg))
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    return files


def _train_cfg(toy_models, calibration, tmp_path, **kw):
    base = dict(model=toy_models["small"], calibration=calibration["train"], eval_calibration=calibration["valid"],
                objective="seq_kd", lr=1e-3, warmup_steps=0, batch_size=8, max_steps=2, log_every=1,
                eval_every=1000, save_every=1000, output_dir=str(tmp_path / "run"))
    base.update(kw)
    return TrainConfig(**base)


def _params(path):
    """Trainable parameters by name (buffers such as BART's final_logits_bias are not trained)."""
    return {k: v.detach().clone() for k, v in AutoModelForSeq2SeqLM.from_pretrained(path).named_parameters()}


def test_two_step_run_changes_every_parameter_and_reloads(toy_models, calibration, tmp_path):
    final = train(_train_cfg(toy_models, calibration, tmp_path))
    metrics = json.loads((final / "metrics.json").read_text())
    losses = [row["loss"] for row in metrics["history"] if "loss" in row]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    before, after = _params(toy_models["small"]), _params(final)
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, unchanged
    # reloads with plain from_pretrained, with its tokenizer, and decodes
    model = AutoModelForSeq2SeqLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    ids = torch.tensor([tok("red dog runs")["input_ids"]])
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[0] == 1 and out.shape[1] >= 2
    assert (final / "train_config.yaml").is_file() and (final / "calibration.provenance.json").is_file()
    assert (final / "generation_config.json").is_file()


def test_lora_checkpoint_is_merged_and_loadable(toy_models, calibration, tmp_path):
    final = train(_train_cfg(toy_models, calibration, tmp_path, lora=True, lora_r=4, lr=1e-2))
    files = {p.name for p in final.iterdir()}
    assert "adapter_config.json" not in files  # merged into plain weights
    before, after = _params(toy_models["small"]), _params(final)
    assert set(before) == set(after)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all("proj" in k or "fc" in k for k in changed)


@pytest.mark.parametrize("objective,divergence", [("token_kd", "forward_kl"), ("token_kd", "reverse_kl"),
                                                  ("token_kd", "jsd"), ("token_kd", "tvd"),
                                                  ("seq_kd+token_kd", "jsd")])
def test_token_level_objectives(toy_models, calibration, tmp_path, objective, divergence):
    """Each divergence trains: the small model's argmax moves towards the large model's outputs."""
    final = train(_train_cfg(toy_models, calibration, tmp_path, objective=objective, divergence=divergence,
                             teacher=toy_models["large"], max_steps=40, lr=3e-3, batch_size=16, warmup_steps=5))
    metrics = json.loads((final / "metrics.json").read_text())
    assert all(math.isfinite(row["loss"]) for row in metrics["history"] if "loss" in row)
    assert metrics["after"]["eval_top1_agreement"] > metrics["before"]["eval_top1_agreement"] + 0.05


def test_references_from_scratch(toy_data, toy_models, tmp_path):
    cfg = TrainConfig(model_config={"model_type": "bart", "d_model": 16, "encoder_layers": 1, "decoder_layers": 1,
                                    "encoder_attention_heads": 2, "decoder_attention_heads": 2,
                                    "encoder_ffn_dim": 32, "decoder_ffn_dim": 32, "max_position_embeddings": 64},
                      tokenizer=toy_models["tokenizer"], objective="references", dataset=str(toy_data),
                      max_steps=2, batch_size=8, warmup_steps=0, output_dir=str(tmp_path / "scratch"))
    final = train(cfg)
    model = AutoModelForSeq2SeqLM.from_pretrained(final)
    assert model.config.d_model == 16
    assert model.generation_config.forced_eos_token_id is None


def test_resume_gives_the_same_weights(toy_models, calibration, tmp_path):
    straight = train(_train_cfg(toy_models, calibration, tmp_path / "a", max_steps=4))
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    # Same run, stopped after a checkpoint at update 2, then resumed.
    cfg = _train_cfg(toy_models, calibration, tmp_path / "b", max_steps=4, save_every=2)
    train(cfg)
    ckpts = sorted((tmp_path / "b" / "run" / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["step_2"]
    import shutil

    shutil.rmtree(tmp_path / "b" / "run" / "final")
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    resumed = train(cfg, resume=True)
    a, b = _params(straight), _params(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_resume_inside_a_later_epoch_gives_the_same_weights(toy_models, calibration, tmp_path):
    """Resuming in epoch 1 must see epoch 1's data order, not replay epoch 0's (Accelerate's loader keeps
    its own epoch counter, which starts at 0 in a new process)."""
    from accelerate.state import AcceleratorState, GradientState

    kw = dict(limit=40, max_steps=8)  # 40 pairs, batch 8: 5 updates per epoch; stop at update 7, in epoch 1
    straight = train(_train_cfg(toy_models, calibration, tmp_path / "a", **kw))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    cfg = _train_cfg(toy_models, calibration, tmp_path / "b", save_every=7, **kw)
    train(cfg)
    import shutil

    shutil.rmtree(tmp_path / "b" / "run" / "final")
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    resumed = train(cfg, resume=True)
    state = json.loads((tmp_path / "b" / "run" / "checkpoints" / "step_7" / "trainer_state.json").read_text())
    assert state["epoch"] == 1 and state["windows_in_epoch"] == 2
    a, b = _params(straight), _params(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    rates = [row["tokens_per_s"] for row in json.loads((resumed / "metrics.json").read_text())["history"] if "loss" in row]
    assert all(r > 0 for r in rates)


def test_deepspeed_settings_come_from_the_training_config(toy_models, calibration, tmp_path):
    from types import SimpleNamespace

    from align.checkpoints import check_deepspeed

    cfg = _train_cfg(toy_models, calibration, tmp_path, gradient_accumulation_steps=2, max_grad_norm=0.5)
    plugin = SimpleNamespace(deepspeed_config={"gradient_accumulation_steps": "auto"})
    check_deepspeed(plugin, cfg)
    assert plugin.deepspeed_config == {"gradient_accumulation_steps": 2, "gradient_clipping": 0.5}
    for key, value in (("gradient_accumulation_steps", 1), ("gradient_clipping", 1.0)):
        with pytest.raises(ValueError, match=key):
            check_deepspeed(SimpleNamespace(deepspeed_config={key: value}), cfg)
    check_deepspeed(None, cfg)  # no DeepSpeed: nothing to check
    for name in ("zero2", "zero3"):  # the shipped files leave both to the training config
        text = (Path(__file__).resolve().parent.parent / "configs" / "accelerate" / f"{name}.yaml").read_text()
        assert "gradient_accumulation_steps:" not in text.replace("# gradient_accumulation_steps", "")
        assert "\n  gradient_clipping:" not in text


def test_alignment_raises_agreement_with_the_large_model(toy_data, toy_models, calibration, tmp_path):
    """The point of alignment: after seq_kd the small model's argmax matches the large model's tokens more
    often on held-out inputs, and BiLD with it hands more tokens to the small model."""
    final = train(_train_cfg(toy_models, calibration, tmp_path, max_steps=120, lr=3e-3, batch_size=16, warmup_steps=10))
    metrics = json.loads((final / "metrics.json").read_text())
    before, after = metrics["before"]["eval_top1_agreement"], metrics["after"]["eval_top1_agreement"]
    print(f"top-1 agreement before {before:.3f} after {after:.3f}")
    assert after > before + 0.2

    large = AutoModelForSeq2SeqLM.from_pretrained(toy_models["large"]).eval()
    tok = AutoTokenizer.from_pretrained(toy_models["large"])
    sources = (toy_data / "test.src").read_text().splitlines()[:20]
    cfg = BiLDConfig(fallback_threshold=0.3, rollback="exact")
    shares = {}
    for name, path in (("unaligned", toy_models["small"]), ("aligned", final)):
        small = AutoModelForSeq2SeqLM.from_pretrained(path).eval()
        stats = None
        for s in sources:
            out = BiLD(large, small, cfg).generate(torch.tensor([tok(s)["input_ids"]]), max_new_tokens=24)
            if stats is None:
                stats = out.stats
            else:
                stats.add(out.stats)
        shares[name] = stats.small_tokens / stats.new_tokens
    print(f"small-model share of BiLD tokens: {shares}")
    assert shares["aligned"] > shares["unaligned"]


def test_model_card_and_dry_run_publish(toy_models, calibration, tmp_path):
    final = train(_train_cfg(toy_models, calibration, tmp_path, recommended_thresholds={"fallback_threshold": 0.4,
                                                                                       "rollback_threshold": 3.0}))
    card = model_card(final, "me/aligned")
    assert "me/aligned" in card and "fallback_threshold=0.4" in card and "eval_top1_agreement" in card
    assert toy_models["large"] in card  # the teacher, from the calibration provenance

    class FakeApi:
        calls = []

        def create_repo(self, repo_id, private, exist_ok):
            self.calls.append(("create", repo_id, private))

        def upload_folder(self, folder_path, repo_id, commit_message):
            self.calls.append(("upload", folder_path, repo_id))

    api = FakeApi()
    push(final, "me/aligned", private=True, api=api)
    assert api.calls == [("create", "me/aligned", True), ("upload", str(final), "me/aligned")]
    assert (final / "README.md").read_text() == card
    with pytest.raises(FileNotFoundError):
        push(tmp_path, "me/x", dry_run=True)


def test_drop_loops_leaves_out_looping_and_unfinished_training_outputs(toy_models, tmp_path):
    """drop_loops=n: calibration outputs that repeat an n-token sequence, or were cut at max_new_tokens, leave the
    training pairs; the held-out pairs keep them all."""
    from align.pairs import build_pairs, repeats

    assert repeats([5, 6, 7, 5, 6], 2) and not repeats([5, 6, 7, 5, 6], 3) and repeats([4, 4, 4], 2)
    outputs = {0: ([5, 6, 7, 8], True), 1: ([5, 6, 5, 6, 9], True), 2: ([9, 8, 7], False), 3: ([1, 2, 1, 3], True)}
    path = tmp_path / "calib.jsonl"
    path.write_text("".join(json.dumps({"index": i, "source": "ein Hund", "output_ids": ids, "finished": done}) + "\n"
                            for i, (ids, done) in outputs.items()))
    tokenizer = AutoTokenizer.from_pretrained(toy_models["small"])
    eos = tokenizer.eos_token_id

    def targets(which, **kw):
        cfg = TrainConfig(model=toy_models["small"], calibration=str(path), eval_calibration=str(path), **kw)
        return [t for _, t in build_pairs(cfg, tokenizer, which)]

    assert targets("train", drop_loops=2) == [[5, 6, 7, 8, eos], [1, 2, 1, 3, eos]]
    assert targets("train", drop_loops=1) == [[5, 6, 7, 8, eos]]
    assert len(targets("train")) == len(targets("eval", drop_loops=2)) == 4


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(objective="magic"), "objective"),
        (dict(divergence="hellinger"), "divergence"),
        (dict(objective="token_kd"), "teacher"),
        (dict(calibration=None), "calibration"),
        (dict(model=None), "model_config"),
        (dict(lr=0.0), "lr"),
        (dict(push_to_hub=True), "hub_repo_id"),
        (dict(drop_loops=0), "drop_loops"),
    ],
)
def test_bad_train_config(kw, match):
    base = dict(model="m", calibration="c.jsonl")
    base.update(kw)
    with pytest.raises(ValueError, match=match):
        TrainConfig(**base)


def test_config_file_overrides_and_unknown_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: m\ncalibration: c.jsonl\nlr: 1e-3\nmodel_config: null\n")
    cfg = load_config(TrainConfig, path, ["batch_size=4", "lr=2e-4", "recommended_thresholds.fallback_threshold=0.5"])
    assert cfg.lr == 2e-4 and cfg.batch_size == 4 and cfg.recommended_thresholds == {"fallback_threshold": 0.5}
    with pytest.raises(ConfigError, match="learning_rate.*Valid keys"):
        load_config(TrainConfig, path, ["learning_rate=1"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(TrainConfig, tmp_path / "missing.yaml")


def test_cli_reports_a_bad_config_without_a_traceback(tmp_path, capsys):
    from align.train import main

    path = tmp_path / "c.yaml"
    path.write_text("model: m\ncalibration: c.jsonl\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(path), "learning_rate=1"])
    assert exit_info.value.code == 2
    assert "unknown config key" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ("bart", "t5", "qwen2"))
def test_keep_decoder_layers_makes_a_smaller_model_of_the_same_family(arch, tmp_path):
    """A small model made from a large one (shrink and fine-tune): the kept layers' weights, a config that says how
    many, and a saved checkpoint that loads and decodes as transformers does (the compact passes agree with it)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_fast import compact_vs_transformers
    from tiny_models import tiny_model

    from align.models import keep_decoder_layers
    from decode.loading import load_model
    from decode.families import decoder_layer_modules

    model = tiny_model(arch, 0, layers=3)
    last = {k: v.clone() for k, v in decoder_layer_modules(model)[2].state_dict().items()}
    keep_decoder_layers(model, [0, 2])
    model.save_pretrained(tmp_path)
    small = load_model(str(tmp_path))
    layers = decoder_layer_modules(small)
    assert len(layers) == 2 and all(torch.equal(v, last[k]) for k, v in layers[1].state_dict().items())
    assert compact_vs_transformers(small) < 1e-5
    with pytest.raises(ValueError, match="decoder layers"):
        keep_decoder_layers(tiny_model(arch, 0, layers=3), [0, 5])
