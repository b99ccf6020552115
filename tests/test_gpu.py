"""GPU checks (run with `pytest -m gpu` on a CUDA machine): the fast path's CUDA graphs against the eager path
and against greedy `generate`, in float32, on random tiny pairs of every covered architecture."""

import pytest
import torch
from test_fast import FAST_ARCHS, compact_vs_transformers, decode_all
from tiny_models import hf_greedy, random_prompt, tiny_model, tiny_pair

from decode import BiLD, BiLDConfig, Greedy, EarlyExitBiLD
from decode.families import decoder_layers
from decode.fast import FastRunner

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def cuda_pair(arch, seed):
    return [m.cuda() for m in tiny_pair(arch, seed)]


@pytest.mark.parametrize("arch", FAST_ARCHS)
def test_compact_forward_equals_transformers_on_cuda(arch):
    # relative to the largest logit: CUDA kernels sum in another order (seen: 1.1e-3 absolute on T5's large logits)
    assert compact_vs_transformers(tiny_model(arch, 0).cuda(), "cuda") < 1e-4


def check_exact_equals_greedy(arch, seed, compile):
    large, small = cuda_pair(arch, seed)
    ids = random_prompt(seed, length=4 + 2 * seed).cuda()
    ref = hf_greedy(large, ids, max_new_tokens=24).cpu()
    for cap in (None, 10, 4):
        bild = BiLD(large, small, BiLDConfig(rollback="exact", fallback_threshold=0.5, max_small_steps=cap, compile=compile))
        assert bild.path == "fast (static cache, CUDA graphs" + (", compiled)" if compile else ")")
        assert torch.equal(bild.generate(ids, max_new_tokens=24).sequences, ref), cap


@pytest.mark.parametrize("arch", FAST_ARCHS)
@pytest.mark.parametrize("seed", range(4))
def test_exact_rollback_equals_large_greedy_on_cuda_fp32(arch, seed):
    """The default path on CUDA (graphs) in exact mode is the large model's greedy generate."""
    check_exact_equals_greedy(arch, seed, None)


@pytest.mark.parametrize("arch", FAST_ARCHS)
def test_exact_rollback_on_the_compiled_passes_equals_large_greedy_fp32(arch):
    check_exact_equals_greedy(arch, 1, True)


@pytest.mark.parametrize("arch", FAST_ARCHS)
@pytest.mark.parametrize("seed", range(3))
def test_graphs_equal_eager_path_fp32(arch, seed):
    """BiLD (both rollback modes, with and without a step cap) and Greedy: CUDA graphs == eager, token for token."""
    large, small = cuda_pair(arch, seed)
    ids = random_prompt(seed, length=4 + 3 * seed).cuda()
    assert decode_all(large, small, ids, None) == decode_all(large, small, ids, False)


def test_rollbacks_at_first_second_and_last_draft_position_on_cuda():
    cuts, cap = set(), 4
    for seed in range(16):
        large, small = cuda_pair("llama", seed)
        ids = random_prompt(seed).cuda()
        bild = BiLD(large, small, BiLDConfig(rollback="exact", fallback_threshold=0.0, max_small_steps=cap))
        check = bild._large.check

        def recording(tokens, n_pending, *args):
            cut, argmax = check(tokens, n_pending, *args)
            cuts.add(cut) if cut < n_pending else None
            return cut, argmax

        bild._large.check = recording
        assert torch.equal(bild.generate(ids, max_new_tokens=24).sequences, hf_greedy(large, ids, max_new_tokens=24).cpu())
    assert {0, 1, cap - 1} <= cuts


def test_inputs_of_any_length_reuse_the_graphs_and_a_longer_one_grows_the_cache():
    large, small = cuda_pair("t5", 1)
    bild = BiLD(large, small, BiLDConfig(rollback="exact"))
    bild.generate(random_prompt(0, length=6).cuda(), max_new_tokens=16)  # captures
    runner = bild._large
    captures = runner.captures
    for length in (3, 11, 17, 30):
        ids = random_prompt(length, length=length).cuda()
        assert torch.equal(bild.generate(ids, max_new_tokens=16).sequences, hf_greedy(large, ids, max_new_tokens=16).cpu())
    assert runner.captures == captures  # nothing recaptured
    # Past the source buffer, and 150 new tokens past the cache: the buffers grow and the graphs are captured
    # again (holding no reference to the old graphs, so their memory pool is freed, as in decode.eval).
    for length, new in ((200, 150), (300, 200)):
        ids = random_prompt(length, length=length).cuda()
        out = bild.generate(ids, max_new_tokens=new).sequences
        assert torch.equal(out, hf_greedy(large, ids, max_new_tokens=new).cpu())
    assert runner.src_capacity >= 300 and runner.capacity >= 202 and runner.captures > captures


@pytest.mark.parametrize("arch", ("bart", "qwen2"))
def test_bf16_runs_and_statistics_add_up(arch):
    large, small = tiny_pair(arch, 1)
    large, small = large.cuda().bfloat16(), small.cuda().bfloat16()
    ids = random_prompt(3, batch=4).cuda()
    out = BiLD(large, small, BiLDConfig(fallback_threshold=0.4, rollback_threshold=2.0)).generate(ids, max_new_tokens=20)
    s = out.stats
    assert s.rows == 4 and s.new_tokens == s.small_tokens + s.large_tokens and s.seconds > 0
    greedy = Greedy(large).generate(ids, max_new_tokens=20)
    assert greedy.sequences.shape[0] == 4 and isinstance(Greedy(large)._runner, FastRunner)


@pytest.mark.parametrize("arch", FAST_ARCHS)
def test_early_exit_graphs_equal_no_graphs_and_exact_equals_greedy_on_cuda(arch):
    """Early-exit BiLD on CUDA graphs == the same passes without graphs (every policy), and its exact mode is
    the model's greedy generate, float32."""
    from test_early_exit import POLICIES

    model = tiny_model(arch, 3, width=32, layers=4).cuda()
    for seed in range(2):
        ids = random_prompt(seed, length=4 + 5 * seed).cuda()
        ref = hf_greedy(model, ids, max_new_tokens=24).cpu()
        for k in (1, 3):
            for name, policy in POLICIES.items():
                graphed = EarlyExitBiLD(model, k, BiLDConfig(**policy))
                assert "CUDA graphs" in graphed.path
                a = graphed.generate(ids, max_new_tokens=24)
                b = EarlyExitBiLD(model, k, BiLDConfig(fast_path=False, **policy)).generate(ids, max_new_tokens=24)
                assert torch.equal(a.sequences, b.sequences), (k, name)
                sa, sb = a.stats.as_dict(), b.stats.as_dict()
                sa.pop("seconds"), sb.pop("seconds")
                assert sa == sb, (k, name)
                if policy.get("rollback") == "exact":
                    assert torch.equal(a.sequences, ref), (k, name)


@pytest.mark.parametrize("settings", [dict(temperature=1.0), dict(temperature=0.7, top_k=5, top_p=0.9)])
def test_sampling_on_cuda_graphs_equals_the_eager_path_with_the_same_generator(settings):
    """Speculative sampling and the large model's own sampling with the draw and the rejection rule inside the
    ("sample", n) / ("sample_check", n) CUDA graphs (warpers included) draw the same tokens as the eager path,
    seed for seed (float32); the exactness tests of tests/test_sampling.py run the same functions on the CPU."""

    large, small = cuda_pair("llama", 2)
    ids = random_prompt(3, length=6).cuda()
    outs = []
    for fast_path in (None, False):
        bild = BiLD(large, small, BiLDConfig(rollback="exact", fallback_threshold=0.3, fast_path=fast_path))
        greedy = Greedy(large, fast_path=fast_path)
        if fast_path is None:
            assert "CUDA graphs" in bild.path and "CUDA graphs" in greedy.path
        gen = torch.Generator("cuda").manual_seed(11)
        outs.append([d.generate(ids, max_new_tokens=24, do_sample=True, generator=gen, **settings).sequences
                     for d in (bild, bild, greedy, greedy)])
    assert all(torch.equal(a, b) for a, b in zip(*outs))


@pytest.mark.parametrize("arch", FAST_ARCHS)
def test_batched_graphs_decode_every_row_as_alone_on_cuda(arch):
    """A ragged batch through the batch runner's CUDA graphs: every row as decoded alone (fp32), every policy;
    exact mode equals the large model's batched greedy."""
    from test_batch import POLICIES, ragged_batch

    from decode.batch import BatchRunner

    large, small = cuda_pair(arch, 1)
    ids, mask = (t.cuda() for t in ragged_batch(1, left_pad=not large.config.is_encoder_decoder))
    for name, policy in POLICIES.items():
        bild = BiLD(large, small, BiLDConfig(**policy))
        together = bild.generate(ids, mask, max_new_tokens=24).sequences
        for i in range(len(ids)):
            alone = bild.generate(ids[i : i + 1], mask[i : i + 1], max_new_tokens=24).sequences[0]
            assert together[i, : alone.shape[0]].tolist() == alone.tolist(), (name, i)
    assert BatchRunner.for_model(large, len(ids)).captures > 0 and BatchRunner.for_model(small, len(ids)).captures > 0
    exact = BiLD(large, small, BiLDConfig(rollback="exact", fallback_threshold=0.4))
    assert exact.generate(ids, mask, max_new_tokens=24).sequences.tolist() == \
        Greedy(large).generate(ids, mask, max_new_tokens=24).sequences.tolist()


@pytest.mark.parametrize("arch", FAST_ARCHS)
def test_compaction_moves_rows_between_graphed_runners_on_cuda(arch):
    """Rows moved into a smaller batch's runner (its graphs captured before the copy) decode on as before."""
    from test_batch import check_compaction

    check_compaction(cuda_pair(arch, 2)[0])


@pytest.mark.parametrize("arch", FAST_ARCHS)
def test_batched_sampling_through_graphs_with_top_k_1_is_greedy_on_cuda(arch):
    """Speculative sampling's per-row bookkeeping through the batch runners' graphs (fp32): with top_k=1 every
    row is the large model's greedy output (see tests/test_batch.py)."""
    from test_batch import check_sampling_top_k_1

    check_sampling_top_k_1(*cuda_pair(arch, 4))


def test_batched_sampling_through_graphs_is_distributed_as_the_large_models_sampling_on_cuda():
    """The chi-square test of tests/test_sampling.py on the GPU: rows decoded together (batches of 64) through the
    batch runners' sampling graphs."""
    from test_sampling import check_bild, noisy_pair

    check_bild([m.cuda() for m in noisy_pair()], "t1", dict(fallback_threshold=0.5, max_small_steps=4), fast_path=True,
               batch=64)


@pytest.mark.parametrize("arch", FAST_ARCHS)
def test_the_device_draft_loop_decides_as_the_host_loop_on_cuda(arch):
    """The device draft loop through CUDA graphs (fp32): the same tokens and statistics as the host loop, batches and
    rows alone (tests/test_batch.py), and its graphs were captured."""
    from test_batch import check_device_loop

    from decode.batch import BatchRunner

    large, small = cuda_pair(arch, 5)
    check_device_loop(large, small)
    for runner in (BatchRunner.for_model(small, 5), FastRunner.for_model(small)):
        assert {("draft", 1), ("draft_next", 1)} <= runner.graphs.keys()


@pytest.mark.parametrize("rows", (1, 4, 16))
def test_compiled_bookkeeping_equals_the_eager_ops_on_cuda(rows):
    """A draft step's bookkeeping compiled into one kernel (decode.draft_loop._bookkeeping, as a compiled runner uses it)
    writes every buffer of the loop's state as the eager ops do, first step and later ones; and it did compile (no
    silent fallback to the eager ops)."""
    import decode.draft_loop as loop

    g = torch.Generator().manual_seed(rows)
    for trial in range(6):
        conf = torch.rand(rows, generator=g)
        conf[: rows // 2] = 0.4  # exactly at the threshold: a fallback
        state = [conf, torch.randint(0, 9, (rows,), generator=g), torch.tensor(0.4), torch.tensor([3, 7, -1, -1]),
                 torch.randint(0, 3, (rows,), generator=g), torch.randint(0, 30, (rows,), generator=g),
                 torch.randint(0, 9, (rows, 18), generator=g)]
        state[6][:, 0] = torch.randint(0, 16, (rows,), generator=g)
        advance = torch.tensor(trial % 2 == 0).cuda()
        fn = loop.draft_bookkeeping
        eager = [t.cuda() for t in state]
        fused = [t.clone() for t in eager]
        with torch.inference_mode():
            fn(*eager, advance)
            loop._bookkeeping(fn, True)(*fused, advance)
        assert all(torch.equal(a, b) for a, b in zip(eager, fused)), trial
        assert loop._FUSED[fn].compiled is not None


def decode_compiled_and_not(large, small, ids, mask=None):
    """BiLD in both rollback modes, with and without a step cap, and Greedy, on the compiled passes and on the same
    passes uncompiled (both as CUDA graphs): sequences and statistics."""
    results = []
    for compile in (True, False):
        out = {}
        for name, cfg in {"exact": dict(rollback="exact", fallback_threshold=0.4),
                          "ce": dict(fallback_threshold=0.4, rollback_threshold=1.5),
                          "ce_nocap": dict(fallback_threshold=0.2, rollback_threshold=3.0, max_small_steps=None)}.items():
            bild = BiLD(large, small, BiLDConfig(compile=compile, **cfg))
            assert ("compiled" in bild.path) == compile
            o = bild.generate(ids, mask, max_new_tokens=24)
            stats = o.stats.as_dict()
            stats.pop("seconds")
            out[name] = (o.sequences.tolist(), stats)
        out["greedy"] = Greedy(large, compile=compile).generate(ids, mask, max_new_tokens=24).sequences.tolist()
        results.append(out)
    return results


@pytest.mark.parametrize("arch", FAST_ARCHS)
def test_compiled_passes_equal_the_uncompiled_ones_fp32(arch):
    """torch.compile changes no token and no count (float32): one row, and a ragged batch decoded together."""
    from test_batch import ragged_batch

    large, small = cuda_pair(arch, 6)
    compiled, plain = decode_compiled_and_not(large, small, random_prompt(6, length=9).cuda())
    assert compiled == plain
    ids, mask = (t.cuda() for t in ragged_batch(2, left_pad=not large.config.is_encoder_decoder))
    compiled, plain = decode_compiled_and_not(large, small, ids, mask)
    assert compiled == plain


@pytest.mark.parametrize("arch", ("qwen2", "bart", "t5"))
def test_nothing_compiles_again_while_decoding(arch):
    """After a first short and a first long input, inputs of other lengths, prompts past the first prefill buckets and
    a cache that grows compile nothing (dynamo's graph count stays), for BiLD one row at a time and in batches. (The
    any-shape pass traces one graph per attention path it takes, once each: several rows' one-token step, a check or a
    prompt of up to kernels.MAX_QUERIES tokens through the kernel, a longer prompt through SDPA; decode.eval's warm-up
    decodes the longest input too for this.)"""
    from torch._dynamo.utils import counters

    large, small = cuda_pair(arch, 7)
    bild = BiLD(large, small, BiLDConfig(fallback_threshold=0.4, rollback_threshold=1.5, compile=True))
    for seed, length in ((0, 5), (1, 20)):
        bild.generate(random_prompt(seed, length=length).cuda(), max_new_tokens=16)
        bild.generate(random_prompt(seed, batch=3, length=length + 1).cuda(), max_new_tokens=16)
    graphs = counters["stats"]["unique_graphs"]
    for length, new in ((3, 10), (30, 16), (70, 200)):
        bild.generate(random_prompt(length, length=length).cuda(), max_new_tokens=new)
        bild.generate(random_prompt(length, batch=3, length=length).cuda(), max_new_tokens=new)
    assert counters["stats"]["unique_graphs"] == graphs


def step_kernels(model, compile, key=("step", 1)) -> list[str]:
    """The CUDA kernels one step of a fresh runner launches (its pass run without the graph), in order; `key`: another
    of the runner's passes, ("check", n, rollback) for a check of n tokens."""
    from torch.profiler import ProfilerActivity, profile

    runner = FastRunner(model, compile=compile)
    runner.plan([key])
    with torch.inference_mode():
        runner.start(random_prompt(0, length=6)[0].tolist(), 20)
        step = runner._pass(key)
        step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
    return [e.name for e in sorted(prof.events(), key=lambda e: e.time_range.start)
            if e.device_type == torch.autograd.DeviceType.CUDA]


def test_a_compiled_step_is_a_few_fused_kernels_per_layer():
    """Compiling fuses a layer's norms, cache write, attention and residuals: one step of a 4-layer Qwen2 (without its
    graph) launches at most 12 kernels per layer plus the head's (measured on an H100: 50 without combo kernels, where
    the uncompiled passes, the rotary in the attention kernel, launched 99)."""
    model = tiny_model("qwen2", 0, width=64, layers=4).cuda()
    counts = {compile: len(step_kernels(model, compile)) for compile in (True, False)}
    assert counts[True] <= 12 * 4 + 8, counts
    assert counts[True] < 0.6 * counts[False], counts


def test_a_compiled_step_takes_its_verdict_in_compiled_kernels():
    """The step's verdict over the vocabulary (decode.cache.step_verdict) is a compiled pass: the compiled step launches
    no eager reduction (an eager softmax of one row runs in one block of threads, 38 us of a Qwen2.5-0.5B step)."""
    names = step_kernels(tiny_model("qwen2", 0).cuda(), True)
    assert not any("reduce_kernel" in n or "SoftMax" in n for n in names), names


def test_the_norm_inside_the_product_saves_a_kernel_per_norm(monkeypatch):
    """compact.NORM_IN_PRODUCT: inductor writes each RMSNorm of a tuned one-token step and the product after it as one
    kernel, so a 4-layer Qwen2 step launches fewer kernels (one fewer per norm, two a layer and the head's, where
    nothing else merges them) than with the norm's sum of squares apart; the tokens are those of the uncompiled passes
    in float32."""
    import decode.compact as compact
    import decode.passes

    model = tiny_model("qwen2", 0, width=64, layers=4).cuda()
    counts = {}
    for fused in (True, False):
        monkeypatch.setattr(compact, "NORM_IN_PRODUCT", fused)
        decode.passes._PASSES.pop(model, None)
        counts[fused] = len(step_kernels(model, True))
    assert counts[True] <= counts[False] - 4, counts
    monkeypatch.setattr(compact, "NORM_IN_PRODUCT", True)
    decode.passes._PASSES.pop(model, None)
    prompt = random_prompt(3, length=9).cuda()
    tokens = {c: Greedy(model, compile=c).generate(prompt, max_new_tokens=24).sequences for c in (True, False)}
    assert torch.equal(tokens[True], tokens[False])


def step_kernel_counts(arch, setting, values, monkeypatch, key=("step", 1)) -> dict:
    """The kernels one compiled step (or the runner's pass `key`, as in step_kernels) of a 4-layer `arch` model (width
    64) launches with decode.compact's `setting` at each of `values`, by value; under each, the compiled passes' greedy
    tokens equal the uncompiled ones' (float32)."""
    import decode.compact as compact
    import decode.passes

    model = tiny_model(arch, 0, width=64, layers=4).cuda()
    prompt = random_prompt(3, length=9).cuda()
    reference = Greedy(model, compile=False).generate(prompt, max_new_tokens=24).sequences
    counts = {}
    for value in values:
        monkeypatch.setattr(compact, setting, value)
        decode.passes._PASSES.pop(model, None)
        counts[value] = len(step_kernels(model, True, key))
        tokens = Greedy(model, compile=True).generate(prompt, max_new_tokens=24).sequences
        assert torch.equal(tokens, reference), (setting, value)
    return counts


@pytest.mark.parametrize("arch", ("qwen2", "bart"))
def test_the_mlp_activation_stored_as_the_products_epilogue_adds_no_kernel(arch, monkeypatch):
    """compact.MLP_ACTIVATION: stored as the epilogue of the product before it ("epilogue": for Qwen2's gated MLP, gate
    and up summed in one kernel that ends with the activation; BART's act(fc1) at the end of fc1's), a 4-layer step
    launches no more kernels than with the activation computed inside the product after it ("inline"); "stored" at
    most one more a layer. In each way the tokens are those of the uncompiled passes in float32."""
    import decode.compact as compact

    counts = step_kernel_counts(arch, "MLP_ACTIVATION", compact.MLP_ACTIVATIONS, monkeypatch)
    assert counts["epilogue"] <= counts["inline"], counts
    assert counts["stored"] <= counts["inline"] + 4, counts


@pytest.mark.parametrize("arch", ("qwen2", "bart"))
def test_the_stored_qkv_product_saves_a_kernel_per_layer(arch, monkeypatch):
    """compact.STORED_QKV: a tuned one-token step that stores its q/k/v product (the bias added) as one buffer launches
    at least one kernel a layer fewer than one that lets inductor write q, k and v apart (a kernel of its own after
    the product); the tokens are those of the uncompiled passes in float32 either way."""
    counts = step_kernel_counts(arch, "STORED_QKV", (True, False), monkeypatch)
    assert counts[True] <= counts[False] - 4, counts


@pytest.mark.parametrize("arch", ("qwen2", "phi3"))
def test_a_check_whose_layers_leave_their_mlp_output_to_the_next_saves_a_kernel_per_layer(arch, monkeypatch):
    """compact.DEFERRED_RESIDUAL: a compiled check of 8 tokens whose layers leave their MLP output (the down product's
    partial sums) to the next layer, which adds it in the kernel of its first norm, launches a kernel a layer fewer,
    less the one that adds the last layer's; the tokens are those of the uncompiled passes in float32 either way."""
    counts = step_kernel_counts(arch, "DEFERRED_RESIDUAL", (True, False), monkeypatch, ("check", 8, "exact"))
    assert counts[True] <= counts[False] - 3, counts


@pytest.mark.parametrize("arch", ("qwen2", "phi3", "bart", "t5"))
def test_a_compiled_check_multiplies_with_the_skinny_product(arch):
    """compact.SKINNY_PRODUCT: each product of a compiled check of 8 tokens (the decoder's and the head's, BART's
    compiled too) is one kernels.skinny_product, and no cuBLAS product runs (but T5's self-attention, whose position
    bias keeps the passes' own attention, batched products)."""
    model = tiny_model(arch, 0, width=64, layers=3).cuda()
    names = step_kernels(model, True, ("check", 8, "exact"))
    per_layer = {"qwen2": 4, "phi3": 4, "bart": 6, "t5": 6}[arch]  # (qkv, o, gate/up or fc1, down or fc2; cross q, o)
    assert sum("_skinny_product" in n for n in names) == per_layer * decoder_layers(model) + 1, names
    if arch != "t5":
        assert not any("gemm" in n.lower() or "cutlass" in n.lower() for n in names), names


def test_a_compiled_checks_partial_sums_add_up_where_they_are_read():
    """skinny_product splits a weight's columns into no more runs than inductor adds up inside the kernel that reads
    the partial sums (kernels.max_splits): a check of a 2-layer Qwen2 of width 512, whose products the GPU's
    multiprocessors would split into 8 to 16 runs, launches no kernel that only adds them up (at Qwen2.5-0.5B's width,
    runs of 14 made two such kernels a layer)."""
    import re

    from decode import kernels

    model = tiny_model("qwen2", 0, width=512, layers=2).cuda()
    assert 1 < kernels.skinny_config(512, 512, torch.device("cuda"))[2] <= kernels.max_splits() < 8
    names = step_kernels(model, True, ("check", 8, "exact"))
    assert sum("_skinny_product" in n for n in names) == 4 * 2 + 1, names
    assert not [n for n in names if re.fullmatch(r"triton_(per|red)_fused_sum_\d+", n)], names


@pytest.mark.parametrize("arch", ("bart", "t5", "qwen2", "gemma3", "phi3"))
def test_checks_with_the_skinny_product_decode_as_without_fp32(arch, monkeypatch):
    """SKINNY_PRODUCT (compiled checks' products; fused and separate q/k/v, biases, gated and ungated MLPs)."""
    decodes_as_without("SKINNY_PRODUCT", arch, True, monkeypatch)


# The kernel's cases at its own run length (the cases' caches of up to 200 slots in one run) and at runs of one block
# (split over up to 4 of its programs per token, combined).
SPLIT_RUNS = pytest.mark.parametrize("min_chunk", (None, 64))


# kernels.GROUPED off (a program per query head, the default) and on (a program per key/value head)
GROUPED = pytest.mark.parametrize("grouped", (False, True), ids=("per_head", "grouped"))


def _runs(monkeypatch, min_chunk, grouped=False):
    from decode import kernels

    if min_chunk:
        monkeypatch.setattr(kernels, "MIN_CHUNK", min_chunk)
    monkeypatch.setattr(kernels, "GROUPED", grouped)


@GROUPED
@SPLIT_RUNS
def test_the_decode_kernel_equals_the_passes_attention_on_cuda(monkeypatch, min_chunk, grouped):
    """decode/kernels.py compiled for CUDA (tests/test_kernels.py runs the same cases in Triton's interpreter)."""
    from test_kernels import check_kernel_cases, kernel_cases

    _runs(monkeypatch, min_chunk, grouped)
    check_kernel_cases(kernel_cases("cuda"))


@GROUPED
@SPLIT_RUNS
def test_the_many_query_kernel_is_the_one_token_kernel_per_query_on_cuda(monkeypatch, min_chunk, grouped):
    """kernels.attention_over_cache compiled for CUDA: the passes' attention, and the one-token kernel's bits per query
    (tests/test_kernels.py runs the same cases in Triton's interpreter)."""
    from test_kernels import check_many_query_cases, many_query_cases

    _runs(monkeypatch, min_chunk, grouped)
    check_many_query_cases(many_query_cases("cuda"))


@GROUPED
@SPLIT_RUNS
def test_a_checks_rotary_in_the_kernel_is_the_steps_on_cuda(monkeypatch, min_chunk, grouped):
    """A check through the kernel compiled for CUDA, its keys written first (rotated by write_keys, or by the passes
    where there is no rotary in the kernel): the one-token kernel's bits, token by token, and its caches
    (tests/test_kernels.py runs the same cases in Triton's interpreter)."""
    from test_kernels import check_rotated_check_cases, rotated_check_cases

    _runs(monkeypatch, min_chunk, grouped)
    check_rotated_check_cases(rotated_check_cases("cuda"))


def test_the_skinny_product_is_the_product_row_by_row_on_cuda():
    """kernels.skinny_product compiled for CUDA, float32 and bfloat16, with the measured blocks for each shape and with
    the interpreter's (tests/test_kernels.py runs float32 in Triton's interpreter)."""
    from test_kernels import SKINNY_CONFIGS, check_skinny_cases, skinny_cases

    configs = [None, *SKINNY_CONFIGS]
    check_skinny_cases(skinny_cases("cuda", configs), 2 * 4 * len(configs))


@GROUPED
def test_a_long_context_splits_and_leaves_the_counters_at_zero(monkeypatch, grouped):
    """After 3,000 cached slots the kernel splits each token's slots over its programs and combines them: the passes'
    own attention within bf16 rounding, the check's tokens the steps' bits, the shared counters back at 0."""
    import torch

    from decode import compact, kernels

    monkeypatch.setattr(kernels, "GROUPED", grouped)
    torch.manual_seed(3)
    b, h, h_kv, d, cap, n = 2, 14, 2, 64, 3100, 10
    k_cache, v_cache = (torch.randn(b, h_kv, cap, d, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    q = compact.heads(torch.randn(b, n, h * d, dtype=torch.bfloat16, device="cuda"), h)
    pos = torch.tensor([[3000], [2500]], device="cuda") + torch.arange(n, device="cuda")
    out = kernels.attention_over_cache(q, k_cache, v_cache, pos, 0.125)
    steps = torch.cat([kernels.decode_attention(q[:, :, i : i + 1], k_cache, v_cache, pos[:, i : i + 1], 0.125)
                       for i in range(n)], dim=1)
    ref = compact.attend(q.float(), k_cache.float().repeat_interleave(h // h_kv, 1),
                         v_cache.float().repeat_interleave(h // h_kv, 1), compact.causal_mask(pos, cap, None), 0.125)
    assert torch.equal(out, steps)
    assert (out.float() - ref).abs().max().item() <= 1.6e-2 * max(1.0, ref.abs().max().item())
    assert int(kernels.counters(q.device).abs().sum()) == 0


@pytest.mark.parametrize("arch", ("bart", "t5", "qwen2", "gemma3", "mistral"))
@pytest.mark.parametrize("compile", (False, True))
def test_checks_that_attend_with_the_kernel_decode_as_without_fp32(arch, compile, monkeypatch):
    """CHECK_KERNEL (a check's few tokens attend with the kernel, self- and cross-attention; a sliding window)."""
    decodes_as_without("CHECK_KERNEL", arch, compile, monkeypatch)


@pytest.mark.parametrize("arch", ("qwen2", "gemma3", "mistral", "bart"))
@pytest.mark.parametrize("compile", (False, True))
def test_the_grouped_attention_kernel_decodes_as_the_per_head_one_fp32(arch, compile, monkeypatch):
    """kernels.GROUPED (a program per key/value head for its group's query heads; steps and checks, a sliding
    window, self- and cross-attention of BART's one query head a group)."""
    from decode import kernels

    decodes_as_without("GROUPED", arch, compile, monkeypatch, kernels)


@pytest.mark.parametrize("arch", ("qwen2", "mistral", "bart"))
@pytest.mark.parametrize("compile", (False, True))
def test_steps_whose_qkv_product_is_stored_decode_as_without_fp32(arch, compile, monkeypatch):
    """STORED_QKV (a one-token pass's q/k/v product stored as one buffer before its split)."""
    decodes_as_without("STORED_QKV", arch, compile, monkeypatch)


def decodes_as_without(setting, arch, compile, monkeypatch, module=None):
    """With `setting` of `module` (default decode.compact) on, exact mode equals greedy `generate`, and uncompiled
    BiLD's tokens and counts equal those with it off (float32)."""
    import decode.batch
    import decode.compact
    import decode.fast
    import decode.passes

    def made_anew(on):
        monkeypatch.setattr(module or decode.compact, setting, on)
        for made in (decode.passes._PASSES, decode.fast._RUNNERS, decode.batch._BATCH_RUNNERS):
            for model in (large, small):
                made.pop(model, None)

    large, small = cuda_pair(arch, 3)
    ids = random_prompt(3, length=7).cuda()
    made_anew(False)
    plain = decode_all(large, small, ids, None)
    made_anew(True)
    bild = BiLD(large, small, BiLDConfig(rollback="exact", fallback_threshold=0.5, compile=compile))
    assert torch.equal(bild.generate(ids, max_new_tokens=24).sequences.cpu(),
                       hf_greedy(large, ids, max_new_tokens=24).cpu())
    if not compile:
        assert decode_all(large, small, ids, None) == plain


@pytest.mark.parametrize("arch", ("qwen2", "qwen3", "phi3", "gemma3", "llama3"))
@pytest.mark.parametrize("compile", (False, True))
def test_the_kernels_rotary_decodes_as_the_passes_own_fp32(arch, compile, monkeypatch):
    """KERNEL_ROTARY (the kernel rotates q and k; partial rotary, q/k norms before it, per-layer-type tables)."""
    decodes_as_without("KERNEL_ROTARY", arch, compile, monkeypatch)


@pytest.mark.parametrize("arch", ("qwen2", "gemma3", "bart", "t5"))
@pytest.mark.parametrize("compile", (False, True))
def test_a_one_token_step_attends_with_the_decode_kernel(arch, compile):
    """The step's attention is the Triton kernel, compiled passes or not (self- and cross-attention; T5's
    self-attention, with its position bias, keeps the passes' own)."""
    model = tiny_model(arch, 0).cuda()
    names = step_kernels(model, compile)
    per_layer = 2 if arch == "bart" else 1  # self- and cross-attention; T5's cross-attention alone
    assert sum("_decode_attention" in n for n in names) == per_layer * decoder_layers(model), names


@pytest.mark.parametrize("arch", ("bart", "t5", "qwen2"))
def test_compiled_early_exit_and_sampling_equal_the_uncompiled_ones_fp32(arch):
    """Early exit (every policy) and speculative sampling (the same generator) on the compiled passes: the tokens and
    counts of the uncompiled ones, float32."""
    from test_early_exit import POLICIES

    model = tiny_model(arch, 3, width=32, layers=4).cuda()
    ids = random_prompt(4, length=7).cuda()
    for name, policy in POLICIES.items():
        outs = []
        for compile in (True, False):
            o = EarlyExitBiLD(model, 2, BiLDConfig(compile=compile, **policy)).generate(ids, max_new_tokens=24)
            stats = o.stats.as_dict()
            stats.pop("seconds")
            outs.append((o.sequences.tolist(), stats))
        assert outs[0] == outs[1], name
    large, small = cuda_pair(arch, 2)
    sampled = []
    for compile in (True, False):
        gen = torch.Generator("cuda").manual_seed(5)
        bild = BiLD(large, small, BiLDConfig(rollback="exact", fallback_threshold=0.3, compile=compile))
        sampled.append([bild.generate(ids, max_new_tokens=24, do_sample=True, generator=gen, temperature=0.8).sequences
                        for _ in range(3)])
    assert all(torch.equal(a, b) for a, b in zip(*sampled))
