"""Early-exit BiLD (decode/early_exit.py) on random tiny models of both kinds, on the CPU (no graphs).

tests/test_gpu.py runs it on CUDA, where its passes are CUDA graphs.
"""

import copy

import pytest
import torch
from tiny_models import DECODER_ONLY, ENCODER_DECODER, MORE_DECODER_ONLY, hf_greedy, random_prompt, tiny_model

from decode import BiLD, BiLDConfig, EarlyExitBiLD
from decode.early_exit import EXIT_HEAD_CONFIG, ExitHead

ARCHS = tuple(a for a in ENCODER_DECODER + DECODER_ONLY if a != "gpt2") + MORE_DECODER_ONLY
LAYERS = 4
POLICIES = {
    "exact": dict(rollback="exact", fallback_threshold=0.3),
    "exact_no_fallback": dict(rollback="exact", fallback_threshold=0.0, max_small_steps=4),  # step cap only
    "exact_no_cap": dict(rollback="exact", fallback_threshold=0.1, max_small_steps=None),
    "ce": dict(fallback_threshold=0.3, rollback_threshold=2.0),
    "ce_no_cap": dict(fallback_threshold=0.1, rollback_threshold=4.0, max_small_steps=None),
}


def _model(arch, seed=3):
    return tiny_model(arch, seed, width=32, layers=LAYERS)


def truncated(model, k: int):
    """The model's first k decoder layers and its own final norm and head, as a separate model: the small model
    that untrained early exit stands for."""
    small = copy.deepcopy(model)
    kind = model.config.model_type
    if kind in ("t5", "mt5"):
        small.decoder.block = small.decoder.block[:k]
        small.config.num_decoder_layers = k
    elif kind in ("bart", "marian"):
        small.model.decoder.layers = small.model.decoder.layers[:k]
        small.config.decoder_layers = k
    else:
        small.model.layers = small.model.layers[:k]
        small.config.num_hidden_layers = k
        if getattr(small.config, "layer_types", None):
            small.config.layer_types = small.config.layer_types[:k]
    return small


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("exit_layer", (1, LAYERS - 1))
def test_exact_mode_equals_greedy_generate(arch, exit_layer):
    model = _model(arch)
    for seed in range(3):
        ids = random_prompt(seed, length=4 + 3 * seed)
        reference = hf_greedy(model, ids, max_new_tokens=20).tolist()
        for name in ("exact", "exact_no_fallback", "exact_no_cap"):
            out = EarlyExitBiLD(model, exit_layer, BiLDConfig(**POLICIES[name])).generate(ids, max_new_tokens=20)
            assert out.sequences.tolist() == reference, (name, seed)
            s = out.stats
            assert s.new_tokens == s.small_tokens + s.large_tokens


@pytest.mark.parametrize("arch", ("bart", "t5", "llama", "qwen2", "mistral"))
def test_same_tokens_and_decisions_as_two_model_bild_with_the_truncated_model(arch):
    """Untrained early exit is BiLD with a small model made of the first k layers and the model's own head:
    every policy gives the same tokens and the same statistics, computing far less."""
    model = _model(arch)
    k = 2
    small = truncated(model, k)
    for name, policy in POLICIES.items():
        for seed in range(2):
            ids = random_prompt(seed + 5, length=5)
            ee = EarlyExitBiLD(model, k, BiLDConfig(**policy)).generate(ids, max_new_tokens=20)
            two = BiLD(model, small, BiLDConfig(fast_path=False, **policy)).generate(ids, max_new_tokens=20)
            assert ee.sequences.tolist() == two.sequences.tolist(), (name, seed)
            a, b = ee.stats.as_dict(), two.stats.as_dict()
            a.pop("seconds"), b.pop("seconds")
            assert a == b, (name, seed)


@pytest.mark.parametrize("arch", ARCHS)
def test_no_position_recomputed_beyond_rollbacks(arch, monkeypatch):
    """Layer 1 sees each position once plus what rollbacks re-feed; the first upper layer likewise; the encoder
    runs once per input."""
    model = _model(arch)
    k = 2
    seen = {"low": 0, "high": 0, "encoder": 0}
    runner = EarlyExitBiLD(model, k, BiLDConfig(**POLICIES["ce"])).runner
    decoder_type, passes_type = type(runner.decoder), type(runner.passes)
    run_layers, encoder_forward = decoder_type.run_layers, passes_type.__dict__.get("encoder_forward")

    def counting_layers(self, h, pos, start, stop):  # the positions a pass takes through layer 1 and layer k + 1
        seen["low"] += pos.shape[-1] if start == 0 else 0
        seen["high"] += pos.shape[-1] if start <= k < stop else 0
        return run_layers(self, h, pos, start, stop)

    def counting_encoder(self, *args):
        seen["encoder"] += 1
        return encoder_forward(self, *args)

    monkeypatch.setattr(decoder_type, "run_layers", counting_layers)
    if encoder_forward is not None:
        monkeypatch.setattr(passes_type, "encoder_forward", counting_encoder)
    for policy in ("ce", "exact_no_fallback", "ce_no_cap"):
        bild = EarlyExitBiLD(model, k, BiLDConfig(**POLICIES[policy]))
        for key in seen:
            seen[key] = 0
        ids = random_prompt(11, length=7)
        out = bild.generate(ids, max_new_tokens=24)
        runner, stats = bild.runner, out.stats
        assert stats.large_calls > 0 and stats.small_steps > 0
        assert seen["low"] == runner.length + stats.rolled_back_tokens, policy
        assert seen["high"] == runner.high_length + stats.rolled_back_tokens, policy
        # every position the decoder holds was fed once: the prefix and the kept tokens (the last one at most
        # not yet fed)
        prefix = 1 if model.config.is_encoder_decoder else ids.shape[1]
        assert prefix + out.stats.new_tokens - 1 <= runner.length <= prefix + out.stats.new_tokens
        if model.config.is_encoder_decoder:
            assert seen["encoder"] == 1


@pytest.mark.parametrize("bad", (0, LAYERS, LAYERS + 1, -1, 1.5, True, "2"))
def test_exit_layer_out_of_range_is_a_clear_error(bad):
    model = _model("llama")
    with pytest.raises(ValueError, match=f"exit_layer must be an integer from 1 to {LAYERS - 1}"):
        EarlyExitBiLD(model, bad)


def test_unsupported_architecture_and_missing_exit_layer():
    with pytest.raises(ValueError, match="compact decoder"):
        EarlyExitBiLD(tiny_model("gpt2", 0), 1)
    with pytest.raises(ValueError, match="exit_layer is needed"):
        EarlyExitBiLD(_model("bart"))


@pytest.mark.parametrize("arch", ("bart", "t5", "qwen2"))
def test_exit_head_saved_with_the_checkpoint_and_loaded_on_the_same_path(arch, tmp_path):
    model = _model(arch)
    ids = random_prompt(4, length=6)
    policy = BiLDConfig(**POLICIES["ce"])
    untrained = EarlyExitBiLD(model, 2, policy).generate(ids, max_new_tokens=16)
    # a fresh head (zero adapter, copy of the final norm) is the model's own head
    head = ExitHead(model, 2)
    fresh = EarlyExitBiLD(model, 2, policy, exit_head=head).generate(ids, max_new_tokens=16)
    assert fresh.sequences.tolist() == untrained.sequences.tolist()
    # a head that differs changes the small model's decisions, not the exact output
    with torch.no_grad():
        head.adapter[-1].weight.normal_(0, 0.5)
    model.save_pretrained(tmp_path)
    head.save(tmp_path, mode="frozen")
    bild = EarlyExitBiLD(str(tmp_path), config=policy)
    assert bild.exit_layer == 2 and bild.exit_head is not None
    assert torch.equal(bild.exit_head.adapter[-1].weight, head.adapter[-1].weight)
    trained = bild.generate(ids, max_new_tokens=16)
    assert trained.stats.as_dict() != untrained.stats.as_dict()
    exact = EarlyExitBiLD(str(tmp_path), config=BiLDConfig(rollback="exact")).generate(ids, max_new_tokens=16)
    assert exact.sequences.tolist() == hf_greedy(model, ids, max_new_tokens=16).tolist()
    with pytest.raises(ValueError, match="trained for exit_layer 2"):
        EarlyExitBiLD(str(tmp_path), 3)
    assert EarlyExitBiLD(str(tmp_path), 3, exit_head=None).exit_head is None
    (tmp_path / EXIT_HEAD_CONFIG).unlink()
    with pytest.raises(FileNotFoundError):
        EarlyExitBiLD(model, 2, exit_head=tmp_path)
