"""Batched decoding (decode/batch.py): a batch decoded together gives every row exactly what decoding it alone
gives, tokens and statistics, for every policy; exact mode is the large model's greedy generate row by row."""

import pytest
import torch
from test_fast import FAST_ARCHS
from tiny_models import PAD, VOCAB, hf_greedy, tiny_pair

from decode import BiLD, BiLDConfig, Greedy, EarlyExitBiLD
from decode.batch import _BATCH_RUNNERS, BatchRunner, batch_size_for
from decode.generation import DecodeStats
from decode.sampling import Sampling

POLICIES = {
    "exact": dict(rollback="exact", fallback_threshold=0.4),
    "exact_cap4": dict(rollback="exact", fallback_threshold=0.0, max_small_steps=4),
    "ce": dict(fallback_threshold=0.4, rollback_threshold=1.5),
    "ce_nocap": dict(fallback_threshold=0.2, rollback_threshold=3.0, max_small_steps=None),  # drafts past 16 tokens
}


def ragged_batch(seed: int, rows: int = 5, left_pad: bool = True):
    """Prompts of 3 to 12 tokens, padded to the longest (on the left for decoder-only models, as generate expects)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [3 + (7 * i + seed) % 10 for i in range(rows)]
    width = max(lengths)
    ids, mask = torch.full((rows, width), PAD), torch.zeros(rows, width, dtype=torch.long)
    for i, n in enumerate(lengths):
        cols = slice(width - n, width) if left_pad else slice(0, n)
        ids[i, cols] = torch.randint(3, VOCAB, (n,), generator=gen)
        mask[i, cols] = 1
    return ids, mask


def per_row_counts(stats: DecodeStats) -> dict:
    """The statistics that add up over rows (not the wall time, nor how many rows shared a pass)."""
    d = stats.as_dict()
    for key in ("seconds", "small_passes", "large_passes", "rows_per_large_pass", "compactions"):
        d.pop(key)
    return d


@pytest.mark.parametrize("arch", FAST_ARCHS)
def test_a_batch_decodes_every_row_as_alone(arch):
    """Ragged prompts, 5 rows (the runner holds 8: three rows sit out every pass), rows ending at different
    steps: each row's tokens and the summed statistics equal decoding the rows one by one, every policy."""
    large, small = tiny_pair(arch, 1)
    decoder_only = not large.config.is_encoder_decoder
    ids, mask = ragged_batch(1, left_pad=decoder_only)
    compactions = {}
    for name, policy in POLICIES.items():
        bild = BiLD(large, small, BiLDConfig(fast_path=True, **policy))
        alone, summed = [], DecodeStats()
        for i in range(len(ids)):
            out = bild.generate(ids[i : i + 1], mask[i : i + 1], max_new_tokens=24)
            alone.append(out)
            summed.add(out.stats)
        summed.rows = 5
        together = bild.generate(ids, mask, max_new_tokens=24)
        for i, out in enumerate(alone):
            width = out.sequences.shape[1]
            assert together.sequences[i, :width].tolist() == out.sequences[0].tolist(), (name, i)
            assert set(together.sequences[i, width:].tolist()) <= {PAD}, (name, i)  # right-padded after its end
            assert together.new_lengths[i] == out.new_lengths[0]
        assert per_row_counts(together.stats) == per_row_counts(summed), name
        s = together.stats  # passes shared by rows: never more passes than row steps, at least one row each
        assert 0 < s.small_passes <= s.small_steps and 0 < s.large_passes <= s.large_calls
        compactions[name] = s.compactions
        if name == "exact":
            assert summed.small_passes == summed.small_steps and summed.large_passes == summed.large_calls
        if name.startswith("exact"):  # lossless: the large model's greedy generate on each row alone, unpadded
            for i in range(len(ids)):
                prompt = ids[i : i + 1, mask[i].bool()]
                row = together.sequences[i, ids.shape[1] - prompt.shape[1] :] if decoder_only else together.sequences[i]
                reference = hf_greedy(large, prompt, max_new_tokens=24)[0]
                assert row[: reference.shape[0]].tolist() == reference.tolist(), (name, i)
    greedy = Greedy(large, fast_path=True)
    greedy_out = greedy.generate(ids, mask, max_new_tokens=24)
    assert greedy_out.sequences.tolist() == \
        BiLD(large, small, BiLDConfig(fast_path=True, rollback="exact")).generate(ids, mask, max_new_tokens=24).sequences.tolist()
    # Greedy's unfinished rows before its t-th pass are the rows longer than t: it moves from the runner of 8 rows to
    # that of the next power of two each time they fit one
    lengths = greedy_out.new_lengths
    sizes = {batch_size_for(sum(n > t for n in lengths)) for t in range(max(lengths))}
    assert greedy_out.stats.compactions == len(sizes) - 1
    assert compactions["exact"] >= len(sizes) - 1  # BiLD's rows also end at different passes when equally long


@pytest.mark.parametrize("arch", ("bart", "t5", "mistral"))
def test_compact_moves_rows_into_the_runner_of_a_smaller_batch(arch):
    """Rows moved mid-sequence (caches, source masks, positions) decode on as they would have where they were,
    into a runner whose buffers are larger than the source's and into one whose buffers must grow first."""
    check_compaction(tiny_pair(arch, 2)[0])


def check_compaction(large):
    """The compaction test's body, on the model's device (test_gpu runs it through CUDA graphs)."""
    ids, mask = ragged_batch(4, rows=4, left_pad=not large.config.is_encoder_decoder)
    prompts = [ids[i][mask[i].bool()].tolist() for i in range(4)]
    _BATCH_RUNNERS.pop(large, None)
    BatchRunner.for_model(large, 2).start([[5] * 40] * 2, 200)  # buffers larger than the source's
    source = BatchRunner.for_model(large, 4)
    source.plan([("step", 1), ("check", 3, "exact")])  # graphed on CUDA; the targets capture the same shapes
    source.start(prompts, 12)
    first = [[p[-1]] if not large.config.is_encoder_decoder else [0] for p in prompts]

    def run(runner, rows, feeds, steps):
        """`steps` greedy steps then a check of 3 drafted tokens and a rollback, on `rows` of `runner`; returns
        what came back per row, and the next feeds."""
        seen = []
        for _ in range(steps):
            out = runner.step([feeds[rows.index(r)] if r in rows else [] for r in range(runner.batch)][: runner.batch])
            seen.append([out[r] for r in rows])
            feeds = [[out[r][1]] for r in rows]
        drafts = [f + [7, 8] for f in feeds]
        out = runner.check([drafts[rows.index(r)] if r in rows else [] for r in range(runner.batch)], "exact", 0.0)
        seen.append([out[r] for r in rows])
        for r in rows:
            runner.rewind(r, runner.lengths[r] - 2)
        return seen, [[out[r][1][0]] for r in rows]

    _, feeds = run(source, [0, 1, 2, 3], first, 3)
    two = source.compact([3, 1])
    assert two is BatchRunner.for_model(large, 2) and two.capacity > source.capacity
    assert two.lengths == [source.lengths[3], source.lengths[1]]
    expected, _ = run(source, [3, 1], [feeds[3], feeds[1]], 4)
    got, feeds_two = run(two, [0, 1], [feeds[3], feeds[1]], 4)
    assert _same(got, expected)

    _BATCH_RUNNERS[large].pop(1, None)
    one = two.compact([1])  # a fresh runner: its buffers grow to the source's, its graphs are captured, then the copy
    assert one.batch == 1 and one.capacity >= two.capacity and one.lengths == [two.lengths[1]]
    expected, _ = run(two, [1], [feeds_two[1]], 3)
    got, _ = run(one, [0], [feeds_two[1]], 3)
    assert _same(got, expected)


def _same(got, expected) -> bool:
    """Equal tokens and cuts, confidences within float32 rounding (the batch size may change the kernels)."""
    for g_pass, e_pass in zip(got, expected, strict=True):
        for g, e in zip(g_pass, e_pass, strict=True):
            if isinstance(g[1], list):
                if list(g) != list(e):
                    return False
            elif g[1] != e[1] or abs(g[0] - e[0]) > 1e-5:
                return False
    return True


@pytest.mark.parametrize("arch", FAST_ARCHS)
def test_batched_sampling_with_top_k_1_is_greedy(arch):
    """Speculative sampling's bookkeeping in a batch, made deterministic: with top_k=1 the small model's draft
    distributions and the large model's are one-hot at their argmax, so the rejection rule keeps exactly the
    drafts the large model agrees with and writes its argmax: every row must be the large model's greedy output.
    Ragged prompts, 40 new tokens (the drafts' 16 slots wrap), rows ending apart (the batch compacts with drafts
    pending)."""
    check_sampling_top_k_1(*tiny_pair(arch, 4))


def check_sampling_top_k_1(large, small):
    """That test's body, on the models' device (test_gpu runs it through CUDA graphs)."""
    ids, mask = (t.to(large.device) for t in ragged_batch(6, left_pad=not large.config.is_encoder_decoder))
    gen = torch.Generator(large.device).manual_seed(0)
    reference = Greedy(large, fast_path=True).generate(ids, mask, max_new_tokens=40)
    for policy in (POLICIES["exact"], POLICIES["exact_cap4"], dict(rollback="exact", fallback_threshold=0.0)):
        bild = BiLD(large, small, BiLDConfig(fast_path=True, **policy))
        out = bild.generate(ids, mask, max_new_tokens=40, do_sample=True, top_k=1, generator=gen)
        assert out.sequences.tolist() == reference.sequences.tolist(), policy
        assert out.stats.small_tokens > 0 and out.stats.large_passes < out.stats.large_calls  # rows shared passes
    greedy = Greedy(large, fast_path=True).generate(ids, mask, max_new_tokens=40, do_sample=True, top_k=1)
    assert greedy.sequences.tolist() == reference.sequences.tolist()


@pytest.mark.parametrize("arch", ("bart", "llama"))
def test_batched_output_is_laid_out_as_generate(arch):
    """The whole padded batch, as transformers' greedy generate returns it for the same padded input."""
    large, small = tiny_pair(arch, 0)
    decoder_only = not large.config.is_encoder_decoder
    ids, mask = ragged_batch(3, rows=4, left_pad=decoder_only)
    ours = BiLD(large, small, BiLDConfig(fast_path=True, rollback="exact", fallback_threshold=0.5))
    reference = hf_greedy(large, ids, mask, max_new_tokens=20)
    assert ours.generate(ids, mask, max_new_tokens=20).sequences.tolist() == reference.tolist()
    assert Greedy(large, fast_path=True).generate(ids, mask, max_new_tokens=20).sequences.tolist() == reference.tolist()


def test_runners_per_batch_size_and_what_stays_row_by_row(capsys, monkeypatch):
    import decode.compact

    monkeypatch.setattr(decode.compact, "_SAID", set())  # notices are said once per process: an earlier test may have said this one
    large, small = tiny_pair("bart", 1)
    ids, mask = ragged_batch(2, rows=3, left_pad=False)
    assert [batch_size_for(r) for r in (1, 2, 3, 4, 5, 16, 17, 64)] == [1, 2, 4, 4, 8, 16, 32, 64]
    assert BatchRunner.for_model(large, 5) is BatchRunner.for_model(large, 7)  # a short batch reuses 8 rows' graphs
    _BATCH_RUNNERS.pop(large, None)
    bild = BiLD(large, small, BiLDConfig(fast_path=True, rollback="exact"))
    one = bild.generate(ids[:1], mask[:1], max_new_tokens=12)  # one row: the batch-1 path, no batch runner
    assert large not in _BATCH_RUNNERS
    assert bild.generate(ids, mask, max_new_tokens=12).sequences[0, : one.sequences.shape[1]].tolist() == one.sequences[0].tolist()
    assert large in _BATCH_RUNNERS

    # the eager path and speculative sampling decode row after row, and say so once
    eager = BiLD(large, small, BiLDConfig(fast_path=False, rollback="exact"))
    assert eager._batch_blocker() is not None
    assert eager.generate(ids, mask, max_new_tokens=12).sequences.tolist() == \
        bild.generate(ids, mask, max_new_tokens=12).sequences.tolist()
    assert "decodes a batch row after row" in capsys.readouterr().err
    bild._sampling = Sampling()  # sampling decodes a batch together too
    assert bild._batch_blocker() is None
    early = EarlyExitBiLD(large, 1, BiLDConfig(fast_path=True, rollback="exact"))
    assert early._batch_blocker() is not None
    assert early.generate(ids, mask, max_new_tokens=12).sequences.tolist() == \
        Greedy(large, fast_path=True).generate(ids, mask, max_new_tokens=12).sequences.tolist()
    with pytest.raises(ValueError, match="1 to 4 rows"):
        BatchRunner.for_model(large, 3).start([[5]] * 5, 4)


@pytest.mark.parametrize("arch", ("t5", "qwen2"))
def test_edge_batches_one_token_prompts_one_new_token_and_growing_buffers(arch):
    """One-token prompts (nothing to prefill), max_new_tokens=1, and a later batch longer than the buffers
    (they grow, the graphs go with them): every row as decoded alone."""
    large, small = tiny_pair(arch, 3)
    left = not large.config.is_encoder_decoder
    bild = BiLD(large, small, BiLDConfig(fast_path=True, rollback="exact", fallback_threshold=0.5, max_small_steps=3))

    def check(ids, mask, max_new_tokens):
        together = bild.generate(ids, mask, max_new_tokens=max_new_tokens)
        for i in range(len(ids)):
            alone = bild.generate(ids[i : i + 1], mask[i : i + 1], max_new_tokens=max_new_tokens).sequences[0]
            assert together.sequences[i, : alone.shape[0]].tolist() == alone.tolist(), (max_new_tokens, i)

    ids, mask = ragged_batch(5, rows=3, left_pad=left)
    check(ids, mask, 1)
    one = torch.tensor([[7], [9], [11]])
    check(one, torch.ones_like(one), 8)
    runner = BatchRunner.for_model(large, 3)
    capacity = runner.capacity
    long_ids = torch.randint(3, VOCAB, (3, 2 * capacity), generator=torch.Generator().manual_seed(0))
    long_mask = torch.ones_like(long_ids)
    long_mask[0, : capacity] = 0  # ragged: one row half as long
    if left:
        check(long_ids, long_mask, 2 * capacity)
    else:
        check(long_ids, long_mask.flip(1), 2 * capacity)
    assert runner.capacity > capacity


@pytest.mark.parametrize("arch", ("bart", "t5", "llama", "mistral"))
def test_the_device_draft_loop_decides_as_the_host_loop(arch):
    """BiLDConfig.device_loop (the draft loop's state on the device: each row's fallback, step cap and end decided in
    the pass, the host reading only the budgets between steps) against the host loop: the same tokens and the same
    statistics, passes and compactions included, for every policy, a batch and a row alone; Greedy's steps on the
    device likewise."""
    check_device_loop(*tiny_pair(arch, 5))


def check_device_loop(large, small):
    """The device-loop test's body, on the models' device (test_gpu runs it through CUDA graphs)."""
    ids, mask = (t.to(large.device) for t in ragged_batch(5, left_pad=not large.config.is_encoder_decoder))
    for name, policy in POLICIES.items():
        runs = []
        for loop in (True, False):
            bild = BiLD(large, small, BiLDConfig(fast_path=True, device_loop=loop, **policy))
            together = bild.generate(ids, mask, max_new_tokens=24)
            alone = bild.generate(ids[2:3], mask[2:3], max_new_tokens=24)
            runs.append([(o.sequences.tolist(), per_row_counts(o.stats) | {
                k: getattr(o.stats, k) for k in ("small_passes", "large_passes", "compactions")})
                for o in (together, alone)])
        assert runs[0] == runs[1], name
        assert runs[0][0][1]["small_steps"] > runs[0][0][1]["small_passes"] > 0  # rows drafted together
    assert {("draft", 1), ("draft_next", 1)} <= BatchRunner.for_model(small, len(ids))._wanted
    greedy = [Greedy(large, fast_path=True, device_loop=loop) for loop in (True, False)]
    for rows, rows_mask in ((ids, mask), (ids[1:2], mask[1:2])):
        outs = [g.generate(rows, rows_mask, max_new_tokens=24) for g in greedy]
        assert outs[0].sequences.tolist() == outs[1].sequences.tolist()
        assert outs[0].stats.large_calls == outs[1].stats.large_calls == sum(outs[0].new_lengths)
        assert outs[0].stats.large_passes == outs[1].stats.large_passes


def test_the_device_loop_by_default_runs_in_batches_only():
    """BiLDConfig.device_loop=None (and Greedy's): the draft passes are planned on the batch runners, not on the
    one-row runner, whose host loop measured faster (BENCHMARKS.md)."""
    from decode.fast import FastRunner

    large, small = tiny_pair("bart", 6)
    ids, mask = ragged_batch(6, rows=3, left_pad=False)
    bild, greedy = BiLD(large, small, BiLDConfig(fast_path=True)), Greedy(large, fast_path=True)
    for decoder in (bild, greedy):
        decoder.generate(ids, mask, max_new_tokens=8)
        decoder.generate(ids[:1], mask[:1], max_new_tokens=8)
    for model in (small, large):
        assert ("draft_next", 1) in BatchRunner.for_model(model, 3)._wanted
        assert not any(k[0] == "draft_next" for k in FastRunner.for_model(model)._wanted)
