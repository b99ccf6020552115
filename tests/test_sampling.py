"""Speculative sampling is exact in distribution: BiLD's samples of the first two new tokens follow the large
model's own sampling distribution, computed exactly, on tiny models with a vocabulary of 8 (CPU).

The test: Pearson's chi-square over the 2-token continuations (cells with an expected count under 5 merged),
20,000 samples, rejected above the chi-square quantile at p = 1e-4 (Wilson-Hilferty approximation). Its power
is shown by the small model's own samples, which it must reject.
"""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from decode import BiLD, BiLDConfig, Greedy, EarlyExitBiLD
from decode.loading import make_plain_greedy
from decode.generation import DecodeStats
from decode.sampling import Sampling

VOCAB, EOS, PAD = 8, 1, 0
N = 20_000
PROMPT = [3, 5, 2, 6]
SETTINGS = {"t1": dict(temperature=1.0), "warped": dict(temperature=0.7, top_k=5, top_p=0.9)}


def tiny_llama(seed: int, width: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, initializer_range=0.5,
                      pad_token_id=PAD, eos_token_id=EOS, bos_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    make_plain_greedy(model.generation_config)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = EOS, PAD
    return model


@pytest.fixture(scope="module")
def pair():
    return noisy_pair()


def noisy_pair():
    """The large model and a noisy copy of it: they agree often enough for long drafts, and differ enough for
    rejections (about 60% of draft tokens accepted)."""
    large, small = tiny_llama(0, 16), tiny_llama(0, 16)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in small.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3 * p.std().clamp(min=1e-3))
    return large, small


@torch.no_grad()
def exact_two_token_distribution(model, settings) -> dict:
    """P(a, b) of the model's own sampling; a continuation that ends with EOS first is (EOS, None)."""
    s = Sampling(**settings)
    p1 = s.probs(model(torch.tensor([PROMPT], device=model.device)).logits[0, -1:])[0]
    dist = {}
    for a in range(VOCAB):
        if a == EOS:
            dist[(a, None)] = float(p1[a])
            continue
        p2 = s.probs(model(torch.tensor([PROMPT + [a]], device=model.device)).logits[0, -1:])[0]
        for b in range(VOCAB):
            dist[(a, b)] = float(p1[a] * p2[b])
    return dist


def sample_counts(decoder, settings, seed=0, batch=N) -> dict:
    """N samples, in generate calls of `batch` rows (decoded together on the fast path, else row after row)."""
    gen = torch.Generator(decoder.device).manual_seed(seed)
    counts: dict = {}
    stats = DecodeStats()
    for start in range(0, N, batch):
        rows = min(batch, N - start)
        out = decoder.generate(torch.tensor([PROMPT] * rows), max_new_tokens=2, do_sample=True, generator=gen, **settings)
        stats.add(out.stats)
        for row in out.sequences[:, len(PROMPT) : len(PROMPT) + 2].tolist():  # one column when all end at once
            key = (row[0], None) if row[0] == EOS else (row[0], row[1])
            counts[key] = counts.get(key, 0) + 1
    return counts, stats


def chi_square_rejects(counts: dict, exact: dict) -> tuple[bool, float, float]:
    cells, rest_o, rest_e = [], 0, 0.0
    for key, p in exact.items():
        e, o = N * p, counts.get(key, 0)
        if e >= 5:
            cells.append((o, e))
        else:
            rest_o, rest_e = rest_o + o, rest_e + e
    assert sum(counts.get(k, 0) for k in counts if k not in exact) == 0, "a continuation of probability 0"
    if rest_e > 0:
        cells.append((rest_o, rest_e))
    stat = sum((o - e) ** 2 / e for o, e in cells)
    df = len(cells) - 1
    z = 3.719  # upper 1e-4 quantile of the standard normal
    quantile = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return stat > quantile, stat, quantile


def check_bild(pair, setting, policy, fast_path=False, batch=N):
    large, small = pair
    settings = SETTINGS[setting]
    bild = BiLD(large, small, BiLDConfig(rollback="exact", fast_path=fast_path, **policy))
    counts, stats = sample_counts(bild, settings, batch=batch)
    rejects, stat, quantile = chi_square_rejects(counts, exact_two_token_distribution(large, settings))
    print(f"{setting} {policy}: chi-square {stat:.1f} (reject above {quantile:.1f}); small tokens {stats.small_tokens}, "
          f"rollbacks {stats.rollbacks}, fallbacks {stats.fallbacks}, large calls {stats.large_calls}")
    assert not rejects
    # drafts were accepted, and rejected (resampled from the residual); the fallback cut some short
    assert stats.small_tokens > N // 5 and stats.rollbacks > N // 5
    assert stats.fallbacks > N // 50 or policy["fallback_threshold"] == 0


def test_bild_sampling_is_distributed_as_the_large_models_sampling(pair):
    """About two minutes on two CPU cores; fallbacks, accepted and rejected drafts all occur."""
    check_bild(pair, "t1", dict(fallback_threshold=0.5, max_small_steps=4))


def test_batched_bild_sampling_is_distributed_as_the_large_models_sampling(pair):
    """Rows decoded together on the fast path (batches of 48: runners of 64 rows that compact as rows end), each
    row with its own uniforms, drafts and rejection rule."""
    check_bild(pair, "warped", dict(fallback_threshold=0.7, max_small_steps=4), fast_path=True, batch=48)


@pytest.mark.slow
@pytest.mark.parametrize("setting,policy,fast_path,batch", [
    ("warped", dict(fallback_threshold=0.7, max_small_steps=4), False, N),  # the eager path: row after row anyway
    ("t1", dict(fallback_threshold=0.0, max_small_steps=None), False, N),
    ("warped", dict(fallback_threshold=0.7, max_small_steps=3), True, 1),
    ("t1", dict(fallback_threshold=0.0, max_small_steps=None), True, 7),
])
def test_bild_sampling_exact_in_more_settings(pair, setting, policy, fast_path, batch):
    check_bild(pair, setting, policy, fast_path, batch)


@pytest.mark.parametrize("batch", [pytest.param(1, marks=pytest.mark.slow), 32])
def test_greedy_baseline_samples_exactly(pair, batch):
    large, _ = pair
    settings = SETTINGS["warped"]
    rejects, stat, quantile = chi_square_rejects(sample_counts(Greedy(large, fast_path=True), settings, 1, batch)[0],
                                                 exact_two_token_distribution(large, settings))
    assert not rejects, (stat, quantile)


@pytest.mark.parametrize("setting", SETTINGS)
def test_the_test_has_power(pair, setting):
    """N draws from the small model's exact distribution are rejected as samples of the large model's; N draws
    from the large model's own are not."""
    large, small = pair
    target = exact_two_token_distribution(large, SETTINGS[setting])
    for model, should_reject in ((small, True), (large, False)):
        dist = exact_two_token_distribution(model, SETTINGS[setting])
        keys = list(dist)
        draws = torch.multinomial(torch.tensor([dist[k] for k in keys]), N, replacement=True,
                                  generator=torch.Generator().manual_seed(3))
        counts: dict = {}
        for i in draws.tolist():
            counts[keys[i]] = counts.get(keys[i], 0) + 1
        counts = {k: v for k, v in counts.items() if target.get(k, 0) > 0 or should_reject}
        rejects, stat, quantile = chi_square_rejects({k: v for k, v in counts.items() if k in target}, target)
        assert rejects == should_reject, (setting, should_reject, stat, quantile)


def test_seeded_generator_reproduces_and_greedy_is_unchanged(pair):
    large, small = pair
    bild = BiLD(large, small, BiLDConfig(rollback="exact", fallback_threshold=0.3, fast_path=False))
    ids = torch.tensor([PROMPT] * 3)
    runs = [bild.generate(ids, max_new_tokens=12, do_sample=True, generator=torch.Generator().manual_seed(7)).sequences
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    greedy = bild.generate(ids, max_new_tokens=12).sequences
    assert torch.equal(greedy, large.generate(ids, do_sample=False, max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD))


def test_sampling_errors(pair):
    large, small = pair
    ids = torch.tensor([PROMPT])
    with pytest.raises(ValueError, match="rollback='exact'"):
        BiLD(large, small, BiLDConfig(rollback="ce")).generate(ids, do_sample=True)
    with pytest.raises(ValueError, match="temperature"):
        BiLD(large, small, BiLDConfig(rollback="exact")).generate(ids, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        Greedy(large).generate(ids, do_sample=True, top_p=1.5)
    with pytest.raises(ValueError, match="greedy only"):
        EarlyExitBiLD(tiny_llama(2, 16).__class__(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                                                num_hidden_layers=2, num_attention_heads=2,
                                                                num_key_value_heads=1)), 1).generate(ids, do_sample=True)


def test_fast_path_draws_what_the_eager_path_draws(pair):
    """The fast path runs the draw and the rejection rule inside its passes (CUDA graphs on a GPU); from the same
    generator it draws the same tokens as the eager path, for BiLD and for the large model's own sampling, with
    every warper. (tests/test_gpu.py checks the same through the graphs.) One row per call: rows decoded together
    take their uniforms in another order (the tests above check their distribution)."""
    large, small = pair
    ids = torch.tensor([PROMPT[:2] + [4, 4]])
    for settings in SETTINGS.values():
        outs = []
        for fast_path in (True, False):
            decoders = (BiLD(large, small, BiLDConfig(rollback="exact", fallback_threshold=0.4, max_small_steps=3,
                                                      fast_path=fast_path)), Greedy(large, fast_path=fast_path))
            gen = torch.Generator().manual_seed(9)
            outs.append([d.generate(ids, max_new_tokens=16, do_sample=True, generator=gen, **settings)
                         for d in decoders for _ in range(3)])
        for a, b in zip(*outs):
            assert torch.equal(a.sequences, b.sequences)
            assert a.stats.rollbacks == b.stats.rollbacks and a.stats.small_tokens == b.stats.small_tokens
        assert any(o.stats.rollbacks for o in outs[0]) and any(o.stats.small_tokens for o in outs[0])


def test_batched_rule_decides_as_the_one_row_rule():
    """decode.sampling's batch functions (sample_steps, verify_rows: rows with their own number of pending tokens)
    against the one-row ones the batch-1 path runs, row by row, on random distributions and uniforms, warped and not,
    with drafts that are likely, unlikely and impossible under p."""
    from decode.sampling import noise_size, sample_step, sample_steps, verify, verify_rows

    gen = torch.Generator().manual_seed(0)
    vocab, rows, m = 11, 64, 6
    for key in (Sampling().key, Sampling(**SETTINGS["warped"]).key):
        logits = torch.randn(rows, m + 1, vocab, generator=gen) * 2
        q = Sampling().probs((logits[:, :m] + torch.randn(rows, m, vocab, generator=gen) * 0.3).flatten(0, 1))
        q = q.view(rows, m, vocab)  # near p: long accepted prefixes as well as rejections
        q[::3, :, :5] = 0  # drafts q gives no mass to, where p may
        q = q / q.sum(-1, keepdim=True)
        pending = torch.multinomial(q.flatten(0, 1), 1, generator=gen).view(rows, m)
        n_pending = torch.randint(0, m + 1, (rows,), generator=gen)
        noise = torch.rand(rows, noise_size(m, vocab), generator=gen)
        cut, token = verify_rows(logits, q, pending, n_pending, key, noise)
        for b in range(rows):
            k = int(n_pending[b])
            one = verify(logits[b, : k + 1], q[b, :k], pending[b, :k], key, torch.cat([noise[b, :k], noise[b, k:]]))
            assert (int(one[0]), int(one[1])) == (int(cut[b]), int(token[b])), (key, b)
        assert len(set(cut.tolist())) > 2  # rejections at several positions, and full acceptances
        q1, c1, t1 = sample_steps(logits[:, 0], key, noise)
        for b in range(rows):
            qb, cb, tb = sample_step(logits[b, 0], key, noise[b])
            assert torch.allclose(qb, q1[b]) and float(cb) == pytest.approx(float(c1[b])) and int(tb) == int(t1[b])
