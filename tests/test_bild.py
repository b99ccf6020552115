import math

import pytest
import torch
from tiny_models import (
    DECODER_ONLY,
    ENCODER_DECODER,
    EOS,
    PAD,
    ScriptedLM,
    hf_greedy,
    random_prompt,
    tiny_model,
    tiny_pair,
)

from decode import BiLD, BiLDConfig, Greedy
from decode.cache import ModelRunner

ARCHS = ENCODER_DECODER + DECODER_ONLY
SEEDS = range(6)


def bild(large, small, **kw):
    return BiLD(large, small, BiLDConfig(**kw))


# --- invariants on random tiny pairs -------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("seed", SEEDS)
def test_exact_rollback_equals_large_greedy(arch, seed):
    large, small = tiny_pair(arch, seed)
    ids = random_prompt(seed)
    ref = hf_greedy(large, ids, max_new_tokens=24)
    for fallback_threshold in (0.0, 0.4, 0.9):
        out = bild(large, small, rollback="exact", fallback_threshold=fallback_threshold).generate(ids, max_new_tokens=24)
        assert torch.equal(out.sequences, ref), (fallback_threshold, out.stats)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("seed", SEEDS)
def test_always_fall_back_equals_large_greedy(arch, seed):
    large, small = tiny_pair(arch, seed)
    ids = random_prompt(seed)
    out = bild(large, small, fallback_threshold=1.0, rollback_threshold=0.5).generate(ids, max_new_tokens=20)
    assert torch.equal(out.sequences, hf_greedy(large, ids, max_new_tokens=20))
    assert out.stats.small_tokens == 0 and out.stats.large_tokens == out.stats.new_tokens


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("seed", SEEDS)
def test_never_fall_back_never_roll_back_equals_small_greedy(arch, seed):
    large, small = tiny_pair(arch, seed)
    ids = random_prompt(seed)
    cfg = dict(fallback_threshold=0.0, rollback_threshold=math.inf, max_small_steps=None)
    out = bild(large, small, **cfg).generate(ids, max_new_tokens=20)
    assert torch.equal(out.sequences, hf_greedy(small, ids, max_new_tokens=20))
    assert out.stats.large_tokens == 0 and out.stats.rollbacks == 0


@pytest.mark.parametrize("arch", ("t5", "llama"))
def test_own_greedy_equals_generate(arch):
    model = tiny_model(arch, 3)
    ids = random_prompt(3)
    assert torch.equal(Greedy(model).generate(ids, max_new_tokens=20).sequences, hf_greedy(model, ids, max_new_tokens=20))


@pytest.mark.parametrize("arch", ARCHS)
def test_statistics_add_up(arch):
    large, small = tiny_pair(arch, 1)
    ids = random_prompt(11, batch=3)
    out = bild(large, small, fallback_threshold=0.3, rollback_threshold=2.0).generate(ids, max_new_tokens=20)
    s = out.stats
    assert s.rows == 3
    assert s.new_tokens == s.small_tokens + s.large_tokens
    assert s.small_steps >= s.small_tokens + s.rolled_back_tokens
    assert s.large_calls >= s.fallbacks + s.step_cap_fallbacks
    assert s.large_tokens <= s.large_calls
    assert s.tokens_per_large_call == pytest.approx(s.new_tokens / s.large_calls)


@pytest.mark.parametrize("arch", ("bart", "qwen2"))
def test_cached_runner_equals_full_forward(arch):
    """Feeding in chunks, then rewinding and re-feeding, gives the logits of one full pass."""
    model = tiny_model(arch, 5)
    ids = random_prompt(5, length=12)
    runner = ModelRunner(model)
    if runner.is_encoder_decoder:
        runner.start(ids[0].tolist())
        dec = random_prompt(6, length=10)[0].tolist()
        full = model(input_ids=ids, decoder_input_ids=torch.tensor([dec])).logits[0]
    else:
        runner.start(ids[0].tolist())
        dec = ids[0].tolist()
        full = model(input_ids=ids).logits[0]
    chunks = torch.cat([runner.forward(dec[:4]), runner.forward(dec[4:7]), runner.forward(dec[7:])])
    torch.testing.assert_close(chunks, full.float(), rtol=1e-5, atol=1e-5)
    runner.rewind(5)
    assert runner.length == 5 and runner.cache.get_seq_length() == 5
    torch.testing.assert_close(runner.forward(dec[5:]), full[5:].float(), rtol=1e-5, atol=1e-5)


def test_asymmetric_t5_decoder_deeper_than_encoder():
    """T5 configs whose decoder has more layers than the encoder (a generate() bug in transformers 5.23)."""
    large = tiny_model("t5", 7, layers=3, enc_layers=1)
    small = tiny_model("t5", 8, width=16, layers=1, enc_layers=2)
    ids = random_prompt(7)
    out = bild(large, small, rollback="exact", fallback_threshold=0.5).generate(ids, max_new_tokens=16)
    ref = Greedy(large).generate(ids, max_new_tokens=16)
    assert torch.equal(out.sequences, ref.sequences)


# --- batches, EOS and max_new_tokens --------------------------------------------------------------


@pytest.mark.parametrize("arch", ("t5", "gpt2"))
def test_batch_matches_rows_and_generate_layout(arch):
    large, small = tiny_pair(arch, 2)
    ids = random_prompt(21, length=7, batch=3)
    mask = torch.ones_like(ids)
    if arch == "gpt2":  # left padding, as for decoder-only batched generate
        ids[0, :3], mask[0, :3] = PAD, 0
    else:  # right padding
        ids[0, -3:], mask[0, -3:] = PAD, 0
    dec = bild(large, small, rollback="exact", fallback_threshold=0.4)
    out = dec.generate(ids, mask, max_new_tokens=12).sequences
    for i in range(3):
        row_ids = ids[i][mask[i].bool()][None]
        ref = hf_greedy(large, row_ids, max_new_tokens=12)[0]
        row = out[i]
        if arch == "gpt2":
            assert torch.equal(row[: ids.shape[1]], ids[i])
            new = row[ids.shape[1] :]
            ref_new = ref[row_ids.shape[1] :]
        else:
            new, ref_new = row, ref
        assert torch.equal(new[: len(ref_new)], ref_new)
        assert (new[len(ref_new) :] == PAD).all()


def _scripted_pair(small_tokens, large_tokens, small_prob=0.9, large_prob=0.9, prompt_len=2, **large_overrides):
    small = ScriptedLM({prompt_len + i: (t, small_prob) for i, t in enumerate(small_tokens)})
    script = {prompt_len + i: (t, large_prob) for i, t in enumerate(large_tokens)}
    script.update(large_overrides.get("overrides", {}))
    return ScriptedLM(script), small


PROMPT = torch.tensor([[5, 6]])


def test_max_new_tokens_is_exact():
    large, small = _scripted_pair([10] * 20, [10] * 20)
    for n in (1, 3, 10, 11, 17):
        out = bild(large, small, rollback="exact", fallback_threshold=0.5).generate(PROMPT, max_new_tokens=n)
        assert out.sequences.tolist() == [[5, 6] + [10] * n]
        assert out.stats.new_tokens == n


def test_eos_stops_and_is_checked():
    # The small model wants to stop at new token 3; the large model disagrees there and stops at 5.
    large, small = _scripted_pair([10, 11, 12, EOS, 13, 14], [10, 11, 12, 20, 21, EOS])
    out = bild(large, small, rollback="exact", fallback_threshold=0.5).generate(PROMPT, max_new_tokens=30)
    assert out.sequences.tolist() == [[5, 6, 10, 11, 12, 20, 21, EOS]]
    # Agreeing on EOS: stops there, the large model's check accepts it.
    large, small = _scripted_pair([10, EOS], [10, EOS])
    out = bild(large, small, rollback="exact", fallback_threshold=0.5).generate(PROMPT, max_new_tokens=30)
    assert out.sequences.tolist() == [[5, 6, 10, EOS]]
    assert out.stats.large_calls == 1 and out.stats.small_tokens == 2


# --- scripted models force each branch ----------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 4, 9])
def test_exact_rollback_at_chosen_position(k):
    small_tokens = [10 + i for i in range(12)]
    large_tokens = list(small_tokens)
    large_tokens[k] = 40  # the large model disagrees at new-token position k only
    large, small = _scripted_pair(small_tokens, large_tokens)
    out = bild(large, small, rollback="exact", fallback_threshold=0.5, max_small_steps=10).generate(
        PROMPT, max_new_tokens=12
    )
    assert out.sequences.tolist() == [[5, 6] + large_tokens]
    s = out.stats
    assert s.rollbacks == 1
    assert s.rolled_back_tokens == 10 - k  # ten pending tokens at the first check (step cap)
    assert s.new_tokens == s.small_tokens + s.large_tokens == 12


def test_ce_rollback_cuts_first_position_over_threshold():
    # Large agrees on argmax everywhere except at new positions 2 and 5, where it gives the small tokens
    # low probability (vocabulary 64): position 2 nll 5.35, position 5 nll 7.14.
    small_tokens = [10, 11, 12, 13, 14, 15, 16, 17]
    large = ScriptedLM({2 + i: (t, 0.9) for i, t in enumerate(small_tokens)})
    large.script[2 + 2] = (30, 0.7)  # p(12) = 0.3/63 -> nll 5.35
    large.script[2 + 5] = (31, 0.95)  # p(15) = 0.05/63 -> nll 7.14
    small = ScriptedLM({2 + i: (t, 0.9) for i, t in enumerate(small_tokens)})

    # Threshold 6: position 2 (5.35) passes, position 5 (7.14) is cut.
    out = bild(large, small, rollback_threshold=6.0, fallback_threshold=0.5, max_small_steps=8).generate(
        PROMPT, max_new_tokens=8
    )
    assert out.sequences.tolist()[0][2:] == [10, 11, 12, 13, 14, 31, 16, 17]
    assert out.stats.rollbacks == 1 and out.stats.rolled_back_tokens == 3

    # Threshold 5: position 2 is cut first.
    out = bild(large, small, rollback_threshold=5.0, fallback_threshold=0.5, max_small_steps=8).generate(
        PROMPT, max_new_tokens=3
    )
    assert out.sequences.tolist()[0][2:] == [10, 11, 30]


def test_later_disagreement_is_checked_after_an_agreeing_cut():
    """The original code skipped the whole check when the first over-threshold token equalled the large
    model's argmax; a later disagreement then passed. Here the first over-threshold token (position 1)
    is the large model's argmax but with low probability; position 3 disagrees. Threshold near 0 must give
    the large model's output."""
    small_tokens = [10, 11, 12, 13, 14]
    large_tokens = [10, 11, 12, 40, 14]
    large = ScriptedLM({2 + i: (t, 0.5) for i, t in enumerate(large_tokens)})
    small = ScriptedLM({2 + i: (t, 0.9) for i, t in enumerate(small_tokens)})
    out = bild(large, small, rollback_threshold=1e-6, fallback_threshold=0.1, max_small_steps=5).generate(
        PROMPT, max_new_tokens=5
    )
    # nll of an agreeing token is log 2 > 1e-6, so the ce rule cuts at the first position and the large
    # model's argmax is written there: every position ends up the large model's.
    assert out.sequences.tolist()[0][2:] == large_tokens


def test_low_confidence_falls_back_and_discards_small_token():
    # The small model is unsure (p=0.3) at new position 2; its token (29) must never appear.
    small = ScriptedLM({2: (10, 0.9), 3: (11, 0.9), 4: (29, 0.3), 5: (13, 0.9)})
    large = ScriptedLM({2: (10, 0.9), 3: (11, 0.9), 4: (12, 0.9), 5: (13, 0.9)})
    out = bild(large, small, fallback_threshold=0.5, rollback_threshold=3.0).generate(PROMPT, max_new_tokens=4)
    assert out.sequences.tolist()[0][2:] == [10, 11, 12, 13]
    s = out.stats
    assert s.fallbacks == 1 and s.rollbacks == 0
    # one fallback pass (checks 10, 11, writes 12) and one final check of 13
    assert s.large_calls == 2 and s.large_tokens == 1 and s.small_tokens == 3
    # the large model's fallback pass saw the prompt and both pending tokens at once
    assert large.calls[0] == [5, 6, 10, 11]


def test_step_cap_triggers_large_call():
    large, small = _scripted_pair([10] * 12, [10] * 12)
    out = bild(large, small, fallback_threshold=0.0, max_small_steps=3).generate(PROMPT, max_new_tokens=12)
    assert out.sequences.tolist()[0][2:] == [10] * 12
    # every 3 small tokens the large model checks them and appends one of its own: 3+1 per call
    assert out.stats.step_cap_fallbacks == 3
    assert out.stats.tokens_per_large_call == pytest.approx(12 / out.stats.large_calls)


# --- bad input ---------------------------------------------------------------------------------


def test_vocabularies_that_differ_name_both_sizes():
    large = ScriptedLM({}, vocab=32)
    small = ScriptedLM({}, vocab=40)
    with pytest.raises(ValueError, match="32.*40"):
        BiLD(large, small)


def test_pair_of_different_kinds():
    with pytest.raises(ValueError, match="same kind"):
        BiLD(tiny_model("t5", 0), tiny_model("gpt2", 0))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(fallback_threshold=-0.1),
        dict(fallback_threshold=1.5),
        dict(rollback_threshold=-1.0),
        dict(rollback_threshold=float("nan")),
        dict(rollback="sometimes"),
        dict(max_small_steps=0),
    ],
)
def test_bad_config(kwargs):
    with pytest.raises(ValueError):
        BiLDConfig(**kwargs)


def test_zero_thresholds_are_kept():
    cfg = BiLDConfig(fallback_threshold=0.0, rollback_threshold=0.0)
    assert cfg.fallback_threshold == 0.0 and cfg.rollback_threshold == 0.0


def test_bad_generate_arguments():
    large, small = _scripted_pair([10], [10])
    dec = BiLD(large, small)
    with pytest.raises(ValueError, match="max_new_tokens"):
        dec.generate(PROMPT, max_new_tokens=0)
    with pytest.raises(ValueError, match="non-empty"):
        dec.generate(torch.zeros((1, 0), dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        dec.generate(PROMPT, torch.zeros_like(PROMPT))


# --- loading by name or folder ----------------------------------------------------------------------


def test_from_pretrained_local_folders(toy_models):
    dec = BiLD.from_pretrained(toy_models["large"], toy_models["small"], BiLDConfig(rollback="exact"))
    enc = dec.tokenizer(["red dog runs under the tree"], return_tensors="pt")
    out = dec.generate(enc.input_ids, enc.attention_mask, max_new_tokens=10)
    ref = Greedy(dec.large).generate(enc.input_ids, max_new_tokens=10)
    assert torch.equal(out.sequences, ref.sequences)


def test_from_pretrained_refuses_tokenizers_that_differ(toy_models, tmp_path):
    import shutil

    from data.tokenizer import train_tokenizer

    other = tmp_path / "small_other_tokenizer"
    shutil.copytree(toy_models["small"], other)
    text = ["zebra quartz violin " * 3, "the quick brown fox jumps over the lazy dog"] * 20
    tok = train_tokenizer(text, 320, tmp_path / "tok")
    tok.save_pretrained(other)
    with pytest.raises(ValueError, match="tokenizers"):
        BiLD.from_pretrained(toy_models["large"], str(other))


# --- results that cannot be silently wrong ------------------------------------------------


def test_generate_baselines_are_plain_greedy_whatever_the_generation_config():
    """A checkpoint whose generation_config sets no_repeat_ngram_size (BART and Marian on the Hub do) must not
    leak it into the `generate` and assisted rows: they are greedy, as Greedy is."""
    from decode import AssistedGeneration, HFGenerate

    large, small = tiny_pair("bart", 3)
    large.generation_config.no_repeat_ngram_size = 1
    large.generation_config.repetition_penalty = 1.5
    ids = random_prompt(3)
    with pytest.warns(UserWarning, match="no_repeat_ngram_size"):
        BiLD(large, small)
    greedy = Greedy(large).generate(ids, max_new_tokens=20).sequences
    assert torch.equal(HFGenerate(large).generate(ids, max_new_tokens=20).sequences, greedy)
    assert torch.equal(AssistedGeneration(large, small).generate(ids, max_new_tokens=20).sequences, greedy)
    # the model's own config is left as the user set it
    assert large.generation_config.no_repeat_ngram_size == 1


def test_ce_rollback_cuts_where_an_independent_computation_says():
    """The cut of one large-model check, against -log p_L(token) computed from one plain forward pass."""
    from decode.fast import FastRunner

    large = tiny_model("qwen2", 4)
    prompt = random_prompt(4, length=7)[0].tolist()
    pending = random_prompt(5, length=8)[0].tolist()
    with torch.no_grad():
        logits = large(input_ids=torch.tensor([prompt + pending])).logits[0].float()
    # row P-1+i predicts pending token i
    nll = -torch.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + len(pending)], -1)
    nll = nll[torch.arange(len(pending)), torch.tensor(pending)]
    values = sorted(nll.tolist())
    # thresholds between the values (a threshold equal to one would hang on the last float bit)
    for threshold in [values[0] - 1] + [(a + b) / 2 for a, b in zip(values, values[1:])] + [values[-1] + 1]:
        over = [i for i, v in enumerate(nll.tolist()) if v > threshold]
        expected = over[0] if over else len(pending)
        for runner in (ModelRunner(large), FastRunner(large)):
            runner.start(prompt, 20)
            cut, argmax = runner.check((prompt + pending)[runner.length :], len(pending), "ce", threshold)
            assert cut == expected, (type(runner).__name__, threshold)
            assert argmax == logits[len(prompt) - 1 :].argmax(-1).tolist()


@pytest.mark.parametrize("arch", ("bart", "llama"))
@pytest.mark.parametrize("fast_path", (False, True))
def test_no_prefix_is_recomputed(arch, fast_path):
    """Tokens fed to the large model, counted where they enter its decoder: the decoder prefix once, then
    per large call the last accepted token plus the pending tokens, each pending token exactly once."""
    large, small = tiny_pair(arch, 4)  # a noisy copy: drafts, some kept and some rolled back
    ids = random_prompt(2, length=9)
    bild = BiLD(large, small, BiLDConfig(fallback_threshold=0.1, rollback_threshold=2.0, fast_path=fast_path))
    fed = []
    if fast_path:  # the runner's passes (graphed on CUDA) and its prompt prefill, where they enter the layers
        runner = bild._large

        def counting(forward):
            return lambda ids_, pos, **kw: fed.append(ids_.shape[-1]) or forward(ids_, pos, **kw)

        runner.decoder.feed = counting(runner.decoder.feed)  # every pass (step, check, prefill) enters the layers here
    else:
        def hook(module, args, kwargs):
            fed.append((kwargs.get("decoder_input_ids") if large.config.is_encoder_decoder else kwargs["input_ids"]).shape[1])
        large.register_forward_pre_hook(hook, with_kwargs=True)
    out = bild.generate(ids, max_new_tokens=30)
    s = out.stats
    assert s.rollbacks > 0 and s.small_tokens > 0
    prefix = 1 if large.config.is_encoder_decoder else ids.shape[1]
    assert sum(fed) == prefix + s.small_tokens + s.rolled_back_tokens + s.large_calls - 1


def test_encoder_runs_once_without_a_mask():
    """No all-ones encoder mask (the attention code would check it with a device sync every step)."""
    model = tiny_model("t5", 2)
    seen = []
    model.get_encoder().register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True)
    Greedy(model, fast_path=False).generate(random_prompt(2), max_new_tokens=12)
    assert seen == [None]
