"""The fast path (decode/fast.py) against transformers and against the eager path, on the CPU (no graphs).

tests/test_gpu.py runs the same checks on CUDA, where the passes are CUDA graphs.
"""

import pytest
import torch
from tiny_models import DECODER_ONLY, ENCODER_DECODER, MORE_DECODER_ONLY, hf_greedy, random_prompt, tiny_model, tiny_pair

from decode import BiLD, BiLDConfig, Greedy
from decode.families import unsupported_reason
from decode.fast import FastRunner, compile_wanted, make_runner
from decode.graphs import PassGraphs

FAST_ARCHS = tuple(a for a in ENCODER_DECODER + DECODER_ONLY if a != "gpt2") + MORE_DECODER_ONLY


def to(device, *models):
    return [m.to(device) for m in models]


@torch.inference_mode()
def compact_vs_transformers(model, device="cpu", runner=None):
    """Largest |logit difference| between the compact pass (prefill, then 3 chunks, the second of one token) and the
    model's own forward, relative to the largest |logit|."""
    ids = random_prompt(1, length=12).to(device)
    runner = runner or FastRunner(model)
    prompt = ids[0].tolist()
    runner.start(prompt, 40)
    if model.config.is_encoder_decoder:
        dec = [model.config.decoder_start_token_id] + [5, 7, 9, 11] * 6
        ref = model(input_ids=ids, decoder_input_ids=torch.tensor([dec], device=device)).logits[0]
    else:
        dec = prompt[-1:] + [5, 7, 9, 11] * 6
        ref = model(input_ids=torch.tensor([prompt[:-1] + dec], device=device)).logits[0, -len(dec) :]
    start, chunks = runner.length, []
    for lo, hi in ((0, 4), (4, 5), (5, len(dec))):
        pos = start + torch.arange(lo, hi, device=device)
        chunks.append(runner.decoder.forward(torch.tensor([dec[lo:hi]], device=device), pos[None])[0])
    return ((torch.cat(chunks).float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.mark.parametrize("arch", FAST_ARCHS)
def test_compact_forward_equals_transformers(arch):
    """Embeddings, positions (learned, sinusoidal, rotary, T5 buckets), sliding windows, caches written by position."""
    assert unsupported_reason(tiny_model(arch, 0)) is None
    assert compact_vs_transformers(tiny_model(arch, 0)) < 1e-5


def test_step_verdict_is_the_top_softmax_probability_and_the_first_argmax():
    """decode.cache.step_verdict, 1 / sum(exp(logits - top)) and max's index: the softmax's top probability (to float32
    rounding) and argmax's token, the first of tied ones, for one row or several."""
    from decode.cache import step_verdict

    logits = torch.randn(6, 5000, generator=torch.Generator().manual_seed(0)) * torch.tensor([3.0, 0.05, 1, 8, 3, 3])[:, None]
    logits[4, [7, 4000]] = logits[4].max() + 1  # a tie: the first index
    confidence, token = step_verdict(logits)
    torch.testing.assert_close(confidence, torch.softmax(logits, dim=-1).max(dim=-1).values, rtol=1e-5, atol=0)
    assert torch.equal(token, logits.argmax(dim=-1)) and token[4] == 7
    one = step_verdict(logits[3])
    assert one[0].shape == () and one[1] == token[3]
    torch.testing.assert_close(one[0], confidence[3])


def test_compact_forward_asymmetric_t5():
    assert compact_vs_transformers(tiny_model("t5", 7, layers=3, enc_layers=1)) < 1e-5


def test_a_rope_that_changes_with_the_length_is_refused():
    """Dynamic rope rescales every position as the sequence grows: refused, also as one of Gemma 3's per-type ropes."""
    llama, gemma = tiny_model("llama", 0), tiny_model("gemma3", 0)
    assert unsupported_reason(llama) is None and unsupported_reason(gemma) is None
    llama.config.rope_parameters = dict(rope_type="dynamic", factor=2.0, rope_theta=1e4)
    gemma.config.rope_parameters["full_attention"] = dict(rope_type="dynamic", factor=2.0, rope_theta=1e6)
    assert "dynamic" in unsupported_reason(llama) and "dynamic" in unsupported_reason(gemma)


def test_gemma2_attention_as_loaded():
    """Gemma 2's attention soft-capping where the model's attention implementation computes it (eager), and not
    where it drops it (SDPA, Gemma 2's default before transformers 5.2x): the fast path decodes what the model does."""
    model = tiny_model("gemma2", 0)
    assert model.config._attn_implementation == "eager" and compact_vs_transformers(model) < 1e-5
    model = tiny_model("gemma2", 0)
    model.config._attn_implementation = "sdpa"  # what transformers 5.17 loads it with; its SDPA drops the softcap,
    for layer in model.model.layers:  # where newer releases refuse it: drop it here as 5.17 does
        layer.self_attn.attn_logit_softcapping = None
    assert compact_vs_transformers(model) < 1e-5


def test_longrope_within_its_original_length():
    """Phi-3's longrope: short factors while the sequence stays within its original length, as transformers does;
    a capacity past it is refused with a message (transformers would switch every position to the long factors)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    rope = dict(rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.5, short_factor=[1.0, 1.5, 2.0, 3.0],
                long_factor=[2.0, 4.0, 8.0, 16.0])
    cfg = Phi3Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, max_position_embeddings=512, original_max_position_embeddings=128,
                     rope_parameters=rope, initializer_range=0.3, tie_word_embeddings=False, pad_token_id=0,
                     eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    model = Phi3ForCausalLM(cfg).eval()
    assert unsupported_reason(model) is None
    assert compact_vs_transformers(model) < 1e-5
    with pytest.raises(ValueError, match="longrope"):
        FastRunner(model).start([5, 6, 7], 200)


def decode_all(large, small, ids, fast_path, max_new_tokens=24):
    """Every decoder the fast path serves, on one input: sequences and statistics."""
    results = {}
    for name, cfg in {
        "exact": dict(rollback="exact", fallback_threshold=0.4),
        "exact_cap4": dict(rollback="exact", fallback_threshold=0.0, max_small_steps=4),
        "ce": dict(fallback_threshold=0.4, rollback_threshold=1.5),
        "ce_nocap": dict(fallback_threshold=0.2, rollback_threshold=3.0, max_small_steps=None),
    }.items():
        out = BiLD(large, small, BiLDConfig(fast_path=fast_path, **cfg)).generate(ids, max_new_tokens=max_new_tokens)
        stats = out.stats.as_dict()
        stats.pop("seconds")
        results[name] = (out.sequences.tolist(), stats)
    results["greedy"] = Greedy(large, fast_path=fast_path).generate(ids, max_new_tokens=max_new_tokens).sequences.tolist()
    return results


@pytest.mark.parametrize("arch", FAST_ARCHS)
@pytest.mark.parametrize("seed", range(3))
def test_fast_path_equals_eager_path(arch, seed):
    large, small = tiny_pair(arch, seed)
    ids = random_prompt(seed, length=4 + 3 * seed)
    fast, eager = decode_all(large, small, ids, True), decode_all(large, small, ids, False)
    assert fast == eager
    assert fast["exact"][0] == hf_greedy(large, ids, max_new_tokens=24).tolist()


@pytest.mark.parametrize("arch", ("llama", "gemma3", "bart", "t5"))
def test_checks_padded_with_junk_positions_decode_the_same(arch, monkeypatch):
    """On CUDA a short check runs wider (MIN_CHECK_TOKENS), writing junk past the sequence; forced here on the CPU, the
    tokens and counts are those of unpadded checks, and exact mode is still the large model's greedy output."""
    large, small = tiny_pair(arch, 5)
    ids = random_prompt(5, length=6)
    plain = decode_all(large, small, ids, True)
    monkeypatch.setattr(FastRunner, "_check_padding", lambda self, n: max(8 - n, 0))
    assert decode_all(large, small, ids, True) == plain
    assert plain["exact"][0] == hf_greedy(large, ids, max_new_tokens=24).tolist()


def test_rollbacks_at_first_second_and_last_draft_position():
    """Exact mode on the fast path equals greedy generate where the cut falls at 0, 1 and the step cap."""
    cuts, cap = set(), 4
    for seed in range(8):
        large, small = tiny_pair("llama", seed)
        ids = random_prompt(seed)
        bild = BiLD(large, small, BiLDConfig(rollback="exact", fallback_threshold=0.0, max_small_steps=cap, fast_path=True))
        check = bild._large.check

        def recording(tokens, n_pending, *args):
            cut, argmax = check(tokens, n_pending, *args)
            if cut < n_pending:
                cuts.add(cut)
            return cut, argmax

        bild._large.check = recording
        out = bild.generate(ids, max_new_tokens=24)
        assert torch.equal(out.sequences, hf_greedy(large, ids, max_new_tokens=24))
    assert {0, 1, cap - 1} <= cuts


def test_inputs_of_any_length_and_a_longer_one_than_the_cache():
    """The buffers grow when an input needs more; the answer stays the eager path's."""
    large, small = tiny_pair("bart", 1)
    bild = BiLD(large, small, BiLDConfig(rollback="exact", fast_path=True))
    runner = bild._large
    for length, new in ((3, 8), (9, 20), (40, 10), (5, 100)):
        ids = random_prompt(length, length=length)
        ref = hf_greedy(large, ids, max_new_tokens=new)
        assert torch.equal(bild.generate(ids, max_new_tokens=new).sequences, ref), (length, new)
    assert runner.capacity >= 101 and runner.src_capacity >= 40


def test_path_choice_and_errors():
    gpt2 = tiny_model("gpt2", 0)
    assert unsupported_reason(gpt2) is not None
    assert make_runner(gpt2).path.startswith("eager")  # auto: eager where not covered
    with pytest.raises(ValueError, match="cannot use it"):
        make_runner(gpt2, fast_path=True)
    llama = tiny_model("llama", 0)
    assert make_runner(llama).path == "fast (static cache, no graphs)"  # auto on a CPU: the compact passes
    assert make_runner(llama, fast_path=False).path.startswith("eager")
    assert make_runner(llama, fast_path=True).path.startswith("fast")
    assert make_runner(llama, fast_path=True) is make_runner(llama, fast_path=True)  # one runner per model
    with pytest.raises(ValueError, match="fast_path"):
        BiLDConfig(fast_path="yes")


def test_passes_compile_by_default_on_cuda_only(monkeypatch):
    """compile=None: compiled on CUDA unless BILD_COMPILE=0, never elsewhere; True and False as set."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv("BILD_COMPILE", raising=False)
    assert compile_wanted(None, cuda) and not compile_wanted(None, cpu)
    monkeypatch.setenv("BILD_COMPILE", "0")
    assert not compile_wanted(None, cuda)
    assert compile_wanted(True, cpu) and compile_wanted(True, cuda) and not compile_wanted(False, cuda)
    monkeypatch.setenv("BILD_COMPILE", "1")
    assert compile_wanted(None, cuda) and not compile_wanted(None, cpu)


@pytest.mark.parametrize("n", (1, 3))
@pytest.mark.parametrize("groups", (1, 4))
def test_grouped_attention_equals_sdpa(n, groups):
    """The compiled passes' attention (query heads grouped over their key/value head, one token written as
    reductions) equals SDPA with grouped heads: boolean masks of live slots, and T5's additive per-head bias."""
    import torch.nn.functional as F

    from unittest import mock

    from decode.compact import causal_mask, grouped_attention

    g = torch.Generator().manual_seed(n * 10 + groups)
    b, h_kv, slots, d = 2, 2, 9, 8
    q = torch.randn(b, h_kv * groups, n, d, generator=g)
    k, v = torch.randn(b, h_kv, slots, d, generator=g), torch.randn(b, h_kv, slots, d, generator=g)
    pos = torch.tensor([[4 + i for i in range(n)], [1 + i for i in range(n)]])
    masks = [causal_mask(pos, slots), torch.randn(b, h_kv * groups, n, slots, generator=g)]
    for mask in masks:
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=groups > 1)
        torch.testing.assert_close(grouped_attention(q, k, v, mask, 0.3), ref, rtol=1e-5, atol=1e-6)
        with mock.patch.object(torch.compiler, "is_compiling", lambda: True):  # the compiled pass's alternative
            torch.testing.assert_close(grouped_attention(q, k, v, mask, 0.3, matmul=True), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias", (False, True))
def test_a_norm_computed_inside_its_product_equals_the_norm_then_the_product(bias):
    """compact.norm_linear's one-kernel form (a one-token pass: the sum of squares beside the product's sums, the
    norm's factor applied after them) against the norm, then the product; the any-shape form is the latter itself."""
    from unittest import mock

    from decode.compact import linear, norm_linear, rms_norm

    gen = torch.Generator().manual_seed(0)
    x, norm_w = torch.randn(1, 1, 48, generator=gen) * 3, torch.rand(48, generator=gen) + 0.5
    w, b = torch.randn(20, 48, generator=gen), torch.randn(20, generator=gen) if bias else None
    ref = linear(rms_norm(x, norm_w, 1e-6), w, b)
    with mock.patch.object(torch.compiler, "is_compiling", lambda: True):
        fused = norm_linear(x, rms_norm, norm_w, 1e-6, w, b, fused=True)
        three = torch.cat([x, x * 2, -x], dim=1)  # not one token: the norm, then the product
        assert torch.equal(norm_linear(three, rms_norm, norm_w, 1e-6, w, b, fused=True),
                           linear(rms_norm(three, norm_w, 1e-6), w, b))
    assert fused.shape == ref.shape
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("split", (False, True))
def test_a_split_verdict_is_the_steps_verdict(split, monkeypatch):
    """compact.split_verdict (SPLIT_VERDICT: the argmax as the max, then the first index holding it) against
    decode.cache.step_verdict: the same tokens (ties: the first; NaN: the first NaN; all -inf: the first) and top
    probabilities, through the verdict pass as it is compiled either way (the eager pass is step_verdict)."""
    from unittest import mock

    import decode.compact as compact
    from decode.cache import step_verdict

    logits = torch.randn(6, 5000, generator=torch.Generator().manual_seed(0)) * 3
    logits[1, [7, 4000]] = logits[1].max() + 1
    logits[2, [10, 20]] = float("nan")
    logits[3] = float("-inf")
    logits[4] = 0.0
    confidence, token = compact.split_verdict(logits)
    ref_confidence, ref_token = step_verdict(logits)
    assert torch.equal(token, ref_token) and token.tolist()[1:5] == [7, 10, 0, 0]
    torch.testing.assert_close(confidence, ref_confidence, rtol=1e-6, atol=0, equal_nan=True)
    monkeypatch.setattr(compact, "SPLIT_VERDICT", split)
    passes = compact.Passes(tiny_model("qwen2", 0), compile=False)
    with mock.patch.object(compact, "split_verdict", wraps=compact.split_verdict) as split_calls:
        with mock.patch.object(torch.compiler, "is_compiling", lambda: True):
            pass_confidence, pass_token = passes.verdict(logits[:, None].bfloat16())
        assert split_calls.call_count == int(split)
        assert torch.equal(pass_token[:, 0], step_verdict(logits.bfloat16().float())[1])
        passes.verdict(logits[:, None].bfloat16())  # eagerly: never the split form
        assert split_calls.call_count == int(split)


@pytest.mark.parametrize("how", ("stored", "epilogue"))
@pytest.mark.parametrize("norm, fused, bias", (("rms", True, False), ("rms", True, True), ("rms", False, True),
                                               ("gemma", True, False), ("t5", False, False)))
def test_a_gated_activation_computed_any_way_equals_act_gate_times_up(how, norm, fused, bias):
    """compact.gated_activation as a one-token pass computes it (MLP_ACTIVATION: stored; or gate and up as two products
    of the halves of the fused weight) against act(gate) * up from the fused product; an ungated activation
    (compact.activation) stored; several tokens, the fused product's halves as before."""
    from unittest import mock

    from decode.compact import activation, gated_activation, gemma_norm, linear, rms_norm, t5_norm

    norm = {"rms": rms_norm, "gemma": gemma_norm, "t5": t5_norm}[norm]
    gen = torch.Generator().manual_seed(0)
    x, norm_w = torch.randn(1, 1, 48, generator=gen) * 3, torch.rand(48, generator=gen) + 0.5
    w, b = torch.randn(40, 48, generator=gen), torch.randn(40, generator=gen) if bias else None
    act = torch.nn.functional.silu

    def reference(x):
        gate, up = linear(norm(x, norm_w, 1e-6), w, b).chunk(2, dim=-1)
        return act(gate) * up

    three = torch.cat([x, x * 2, -x], dim=1)
    with mock.patch.object(torch.compiler, "is_compiling", lambda: True):
        out = gated_activation(x, norm, norm_w, 1e-6, w, b, act, fused, how)
        assert torch.equal(gated_activation(three, norm, norm_w, 1e-6, w, b, act, fused, how),
                           gated_activation(three, norm, norm_w, 1e-6, w, b, act, fused, "inline"))
        assert torch.equal(activation(x, act, how), act(x))
    assert out.shape == (1, 1, 20)
    torch.testing.assert_close(out, reference(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(gated_activation(x, norm, norm_w, 1e-6, w, b, act, fused, how), reference(x))  # eagerly


def _gated_t5():
    """A tiny T5 with a gated MLP (mT5's and T5 v1.1's wi_0 / wi_1)."""
    from transformers import T5ForConditionalGeneration

    config = tiny_model("t5", 0).config
    config.feed_forward_proj, config.is_gated_act, config.dense_act_fn = "gated-gelu", True, "gelu_new"
    config.initializer_factor = 1.0  # (4.0, the tiny T5's, leaves it 1.1e-5 off transformers uncompiled in float32)
    torch.manual_seed(0)
    return T5ForConditionalGeneration(config).eval()


def _compile_eagerly(monkeypatch):
    """The passes' torch.compile with dynamo's eager backend: each pass traced as a whole graph (fullgraph) and run
    eagerly, with the variant's dynamic setting, without generating code."""
    import decode.compact as compact

    compile_ = torch.compile
    monkeypatch.setattr(compact.torch, "compile", lambda fn, **kw: compile_(fn, backend="eager", fullgraph=True,
                                                                           dynamic=kw.get("dynamic")))


@pytest.mark.parametrize("how", ("stored", "epilogue"))
@pytest.mark.parametrize("arch", ("qwen2", "phi3", "gemma3", "bart", "t5", "t5-gated"))
def test_passes_with_the_mlp_activation_stored_equal_transformers(arch, how, monkeypatch):
    """MLP_ACTIVATION's wiring in every family's layer (gated and ungated MLPs, fused norms or not), traced by dynamo
    and run eagerly (the eager backend: the one-token pass's arithmetic without generating code)."""
    import decode.compact as compact

    _compile_eagerly(monkeypatch)
    monkeypatch.setattr(compact, "MLP_ACTIVATION", how)
    model = _gated_t5() if arch == "t5-gated" else tiny_model(arch, 0)
    runner = FastRunner(model, compile=True)
    assert runner.passes.mlp_activation == how
    assert compact_vs_transformers(model, runner=runner) < 1e-5
    layers = runner.passes.layer
    assert all(True not in layer._first for layer in (layers.values() if isinstance(layers, dict) else [layers]))


@pytest.mark.parametrize("arch", ("qwen2", "phi3", "gemma3", "bart"))
def test_passes_with_the_qkv_product_stored_equal_transformers(arch, monkeypatch):
    """STORED_QKV's wiring in the decoder-only layer (q/k/v fused by the passes, or in the checkpoint: Phi-3) and
    BART's, traced by dynamo and run eagerly, as above."""
    import decode.compact as compact
    import decode.decoder_only as decoder_only
    import decode.seq2seq as seq2seq

    _compile_eagerly(monkeypatch)
    stores = []

    def counted(x):  # (a plain function, which dynamo traces; its count replayed with the pass)
        stores.append(x.shape)
        return compact.stored(x)

    monkeypatch.setattr(compact, "STORED_QKV", True)
    for module in (decoder_only, seq2seq):
        monkeypatch.setattr(module, "stored", counted)
    model = tiny_model(arch, 0)
    runner = FastRunner(model, compile=True)
    assert runner.passes.stored_qkv
    assert compact_vs_transformers(model, runner=runner) < 1e-5
    layers = runner.passes.layer
    assert all(True not in layer._first for layer in (layers.values() if isinstance(layers, dict) else [layers]))
    assert stores and all(shape[:2] == (1, 1) for shape in stores)  # one-token passes only


@pytest.mark.parametrize("arch", ("qwen2", "phi3", "gemma3"))
def test_a_layer_leaves_its_mlp_output_to_the_next_in_passes_of_several_tokens(arch, monkeypatch):
    """DEFERRED_RESIDUAL's wiring, traced by dynamo and run eagerly: in a compiled pass of several tokens each layer's
    MLP output is added by the next layer (the last one's by a pass of its own), the same numbers as added in the
    layer; Gemma's, with a norm after the MLP, in the layer."""
    import decode.compact as compact

    _compile_eagerly(monkeypatch)
    logits = {}
    for deferred in (True, False):
        monkeypatch.setattr(compact, "DEFERRED_RESIDUAL", deferred)
        model = tiny_model(arch, 0)
        runner = FastRunner(model, compile=True)
        assert compact_vs_transformers(model, runner=runner) < 1e-5
        with torch.inference_mode():
            runner.start(random_prompt(2, length=7)[0].tolist(), 40)
            pos = runner.length + torch.arange(5)[None]
            logits[deferred] = runner.decoder.forward(torch.tensor([[5, 6, 7, 8, 9]]), pos)
        # which any-shape variants ran: the pass that adds the last layer's, and the layers after a pending one
        pending = deferred and arch != "gemma3"
        assert (False not in runner.passes.settle._first) == pending
        assert all((False not in p._first) == pending for p in runner.passes.layer_after.values())
    assert torch.equal(logits[True], logits[False])


@pytest.mark.parametrize("compile_, tuned, on", ((True, None, True), (False, None, False), (True, False, False)))
def test_activation_and_qkv_are_stored_where_one_token_products_are_reductions(compile_, tuned, on, monkeypatch):
    """MLP_ACTIVATION and STORED_QKV hold in compiled passes whose one-token products inductor writes as reductions
    (tuned: models narrower than TUNED_BELOW_WIDTH, or TUNE_ONE_TOKEN); elsewhere the activation is left as it is
    ("inline") and the q/k/v product unstored."""
    import decode.compact as compact

    monkeypatch.setattr(compact, "TUNE_ONE_TOKEN", tuned)
    passes = compact.Passes(tiny_model("qwen2", 0), compile=compile_)
    assert passes.mlp_activation == (compact.MLP_ACTIVATION if on else "inline")
    assert passes.stored_qkv == (compact.STORED_QKV and on)  # the q/k/v product too


@pytest.mark.parametrize("all_directions", (True, False))
@pytest.mark.parametrize("tuned", (None, False))
def test_only_a_tuned_one_token_pass_searches_all_directions(tuned, all_directions, monkeypatch):
    """TUNE_ALL_DIRECTIONS: inductor's coordinate_descent_check_all_directions goes with coordinate-descent tuning, which
    only the one-token variant of a model narrower than TUNED_BELOW_WIDTH (or TUNE_ONE_TOKEN) takes."""
    import decode.compact as compact
    from decode.decoder_only import LlamaPasses

    options = []
    monkeypatch.setattr(compact.torch, "compile", lambda fn, **kw: options.append((kw["dynamic"], kw["options"])) or fn)
    monkeypatch.setattr(compact, "TUNE_ONE_TOKEN", tuned)
    monkeypatch.setattr(compact, "TUNE_ALL_DIRECTIONS", all_directions)
    LlamaPasses(tiny_model("qwen2", 0), compile=True)
    assert options
    for dynamic, o in options:
        one_token = dynamic is None
        assert o["coordinate_descent_tuning"] == (one_token and tuned is None)
        assert o["coordinate_descent_check_all_directions"] == (one_token and tuned is None and all_directions)


def test_a_choice_in_the_environment_is_one_of_its_values_or_unset(monkeypatch):
    import decode.compact as compact

    for value, chosen in (("", "b"), ("a", "a"), ("c", "c")):
        monkeypatch.setenv("BILD_CHOICE", value)
        assert compact._env_choice("BILD_CHOICE", ("a", "b", "c"), "b") == chosen
    monkeypatch.setenv("BILD_CHOICE", "d")
    with pytest.raises(ValueError, match="BILD_CHOICE='d': set it to one of a, b, c or leave it unset"):
        compact._env_choice("BILD_CHOICE", ("a", "b", "c"), "b")


@pytest.mark.parametrize("arch", ("qwen2", "llama", "phi3", "gemma3"))
def test_passes_with_the_norm_inside_the_product_equal_transformers(arch, monkeypatch):
    """NORM_IN_PRODUCT's wiring, traced by dynamo and run eagerly (the eager backend: the arithmetic the compiled
    one-token pass runs, without generating code): the layers' q/k/v and gate/up and the head (Gemma's norm keeps
    its own form)."""
    import decode.compact as compact

    _compile_eagerly(monkeypatch)
    monkeypatch.setattr(compact, "NORM_IN_PRODUCT", True)
    model = tiny_model(arch, 0)
    runner = FastRunner(model, compile=True)
    assert runner.passes.norm_in_product
    assert compact_vs_transformers(model, runner=runner) < 1e-5
    assert all(True not in layer._first for layer in runner.passes.layer.values())  # the one-token variant traced


@pytest.mark.parametrize("width, switch, on", ((64, None, True), (1024, None, True), (1088, None, False),
                                               (1088, True, True), (64, False, False)))
def test_the_norm_goes_inside_the_product_up_to_its_width_unless_switched(width, switch, on, monkeypatch):
    """NORM_IN_PRODUCT unset: compiled models up to NORM_IN_PRODUCT_UP_TO_WIDTH wide compute their norms inside the
    products (measured faster there, slower above); set, it holds at every width. Uncompiled passes never do."""
    import decode.compact as compact

    monkeypatch.setattr(compact, "NORM_IN_PRODUCT", switch)
    model = tiny_model("qwen2", 0, width=width, layers=1)
    assert compact.Passes(model, compile=True).norm_in_product is on
    assert compact.Passes(model, compile=False).norm_in_product is False


@pytest.mark.parametrize("switch", (True, False))
def test_a_steps_verdict_compiles_with_the_passes_unless_switched_off(switch, monkeypatch):
    """COMPILED_VERDICT (BILD_COMPILED_VERDICT): a step's verdict is a compiled pass where the passes compile, unless
    switched off; uncompiled passes never compile it."""
    import decode.compact as compact

    monkeypatch.setattr(compact, "COMPILED_VERDICT", switch)
    model = tiny_model("qwen2", 0)
    assert bool(compact.Passes(model, compile=True).verdict.variants) is switch
    assert not compact.Passes(model, compile=False).verdict.variants


@pytest.mark.parametrize("value, switch", (("", None), ("0", False), ("1", True)))
def test_a_switch_in_the_environment_is_0_1_or_unset(value, switch, monkeypatch):
    import decode.compact as compact

    monkeypatch.setenv("BILD_SWITCH", value)
    assert compact._env_switch("BILD_SWITCH") is switch
    monkeypatch.setenv("BILD_SWITCH", "yes")
    with pytest.raises(ValueError, match="BILD_SWITCH='yes'"):
        compact._env_switch("BILD_SWITCH")


@pytest.mark.parametrize("arch, deferred", [("qwen2", False), ("qwen2", True), ("bart", False)])
def test_the_any_shape_passes_trace_only_batch_length_and_capacity_as_symbols(arch, deferred, monkeypatch):
    """The compiled any-shape variants see the weights' sizes, head counts, the q/k/v split and the model's width as
    constants: traced as symbols they made guards that took seconds to check on every warm start (BENCHMARKS.md).
    Nor do they see where a cache starts as a symbol, even in a pass first traced past layer 0 (deferred: a layer
    after one that left it its MLP output): kernels compiled so cannot count on the caches' alignment.
    Dynamo traces them here with the eager backend (what creates the symbols; no code generated)."""
    import logging
    import re

    import decode.compact as compact

    _compile_eagerly(monkeypatch)
    monkeypatch.setattr(compact, "DEFERRED_RESIDUAL", deferred)
    symbols = []

    class Record(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("create_symbol"):
                symbols.append(re.search(r" for (\S+)", record.getMessage()).group(1))

    log = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    handler = Record()
    log.addHandler(handler)
    torch._logging.set_logs(dynamic=logging.INFO)
    try:
        model = tiny_model(arch, 0)  # (the runner holds it weakly)
        runner = FastRunner(model, compile=True)
        with torch.inference_mode():
            runner.start(random_prompt(0, length=9)[0].tolist(), 40)
            runner.check([5, 6, 7, 8], 3, "exact", 0.0)
    finally:
        torch._logging.set_logs()
        log.removeHandler(handler)
    assert symbols, "no symbol traced: the any-shape variants did not compile"
    # allowed: a pass input's batch and length, the caches' and rotary tables' capacity, the source's length
    constant = [s for s in symbols if "['w']" in s or (".size()" not in s and ".stride()" not in s)  # weights, ints
                or re.search(r"\['(h|hidden)'\]\.size\(\)\[2\]|_cache'\]\.size\(\)\[[13]\]|\['(cos|sin)'\]\.size\(\)\[1\]", s)]
    assert not constant, constant


def test_the_compile_notice_says_each_compile_once_per_model(monkeypatch, capsys):
    """The runners over one model say how long its passes compiled once, then what a new shape compiled since, not
    each runner again (decode.tune and decode.eval make several runners per model)."""
    import decode.compact as compact

    monkeypatch.setattr(compact, "_SAID", set())
    model = tiny_model("qwen2", 0)
    first, second = FastRunner(model), FastRunner(model)
    assert first.passes is second.passes
    first.passes.compile_seconds = 12.0
    first._say_compile_time()
    second._say_compile_time()
    first.passes.compile_seconds = 15.5
    second._say_compile_time()
    first._say_compile_time()
    name = first.passes.name
    assert capsys.readouterr().err.splitlines() == [f"[bild] compiled the passes of {name} in 12.0 s",
                                                    f"[bild] compiled more of the passes of {name} (a new shape) in 3.5 s"]


def test_pass_graphs_off_cuda_run_each_pass_itself():
    """decode.graphs.PassGraphs without CUDA: nothing captured, each run makes its pass and runs it (the GPU tests
    capture and replay)."""
    graphs, ran = PassGraphs(torch.device("cpu"), enabled=False), []
    graphs.run(("step", 1), lambda key: lambda: ran.append(key))
    graphs.run(("check", 3, "ce"), lambda key: lambda: ran.append(key))
    assert ran == [("step", 1), ("check", 3, "ce")]
    assert ("step", 1) not in graphs and not list(graphs.keys()) and graphs.captures == 0
    graphs.clear()
    assert graphs.captures == 0 and graphs._pool is None
