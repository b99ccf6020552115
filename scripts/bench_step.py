"""Per-step cost of decoding, per model shape, against the bytes floor: the numbers BiLD's speedup is made of.

    python scripts/bench_step.py [--shapes demo_large demo_small qwen2.5_0.5b qwen2.5_1.5b qwen2.5_7b ...]
                                 [--repeats 5] [--steps 64] [--uncompiled] [--eager] [--pairs] [--profile]
                                 [--attention math cudnn efficient] [--batches 4 16 64]
    python scripts/bench_step.py --compile-only qwen2.5_7b    # a fresh process's compile time (warm disk cache)

Each shape is built from a config with random weights (no download), in bf16 at batch 1, then timed with the device
synchronised, warm-up discarded, the median of --repeats runs (the spread is min-max over them):
- step: one token through decode.fast.FastRunner (compact passes compiled, one CUDA graph), host read each step, as
  the decoding loop does; `graph only`: the same graph replayed --steps times back to back, one read at the end;
  `device draft`: FastRunner.draft (the loop's state on the device), per step; with --uncompiled the same step on
  the uncompiled passes, with --eager through transformers' own forward (decode.cache.ModelRunner);
- check k: the large model's pass over k pending tokens + 1 (k = 10, and 1, 3, 5 with --pairs), as a graph;
- start: beginning a sequence of a 20-token input (--prompt-length: the input every step and check follows; the
  prompt prefill as a graph up to 1,024 tokens, or the encoder), and for
  decoder-only shapes a 512-token prompt, against its floor (max of bytes over bandwidth and FLOPs over the
  measured matrix rate);
- compile: the seconds the first start of a fresh compiled runner took (compiling and capturing its passes);
- twins: a shape named `<shape>:llama` is a plain Llama with the sizes of <shape> (Qwen3 and Gemma 3 shapes); given
  both, a table sets each family's step and check against its twin's;
- floor: bytes of the weights one decoder step reads (decoder layers and LM head, not the encoder or the
  input embedding table) over the copy bandwidth measured on this device.
--pairs adds, for a 0.5B and a 1.5B drafter with a 7B large model (Qwen2.5 shapes), what BiLD and lossless
speculative decoding reach at 2, 4 and 6 tokens per large call: arithmetic over the measured passes (t tokens per
large call: BiLD runs t small steps, one of them the fallback, speculative decoding t - 1, and one check over t
tokens), not a decoding run. --profile counts the kernels of one compiled step (without its graph) and lists the
costliest; --profile-checks does the same for a check of 2 and of 11 tokens. --attention times the compiled step and
check with each attention backend traced into the passes.
Prints the tables last (markdown).
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import yaml  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM  # noqa: E402

import decode.compact  # noqa: E402
import decode.kernels  # noqa: E402
import decode.passes  # noqa: E402
from decode.cache import ModelRunner  # noqa: E402
import decode.fast  # noqa: E402
from decode.fast import FastRunner  # noqa: E402
from decode.generation import device_sync  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
QWEN = dict(model_type="qwen2", rope_theta=1e6, max_position_embeddings=32768, rms_norm_eps=1e-6, hidden_act="silu")
SHAPES = {  # name: (config fields, vocabulary)
    "demo_large": ("configs/multi30k_large.yaml", 8000),
    "demo_small": ("configs/multi30k_small.yaml", 8000),
    "t5_small": (dict(model_type="t5", d_model=512, d_ff=2048, d_kv=64, num_heads=8, num_layers=6), 32128),
    "t5_large": (dict(model_type="t5", d_model=1024, d_ff=4096, d_kv=64, num_heads=16, num_layers=24), 32128),
    "qwen2.5_0.5b": (dict(QWEN, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                          num_key_value_heads=2, tie_word_embeddings=True), 151936),
    "qwen2.5_1.5b": (dict(QWEN, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                          num_key_value_heads=2, tie_word_embeddings=True), 151936),
    "qwen2.5_7b": (dict(QWEN, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                        num_key_value_heads=4, tie_word_embeddings=False), 152064),
}
QWEN3 = dict(model_type="qwen3", rope_theta=1e6, max_position_embeddings=40960, rms_norm_eps=1e-6, hidden_act="silu",
             head_dim=128)
LLAMA3 = dict(model_type="llama", max_position_embeddings=131072, rms_norm_eps=1e-5, hidden_act="silu", head_dim=64)
GEMMA3 = dict(model_type="gemma3_text", head_dim=256, query_pre_attn_scalar=256, rms_norm_eps=1e-6,
              hidden_activation="gelu_pytorch_tanh", max_position_embeddings=32768)


def llama3_rope(factor):
    return dict(rope_type="llama3", rope_theta=500000.0, factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=8192)


def gemma3_rope(factor):
    glob = dict(rope_type="linear", factor=factor, rope_theta=1e6) if factor else dict(rope_type="default", rope_theta=1e6)
    return {"sliding_attention": dict(rope_type="default", rope_theta=10000.0), "full_attention": glob}


SHAPES.update({  # the families users pick today, as their published configs give them
    "qwen3_0.6b": (dict(QWEN3, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                        num_key_value_heads=8, tie_word_embeddings=True), 151936),
    "qwen3_8b": (dict(QWEN3, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                      num_key_value_heads=8, tie_word_embeddings=False), 151936),
    "llama3.2_1b": (dict(LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, tie_word_embeddings=True, rope_parameters=llama3_rope(32.0)), 128256),
    "llama3.1_8b": (dict(LLAMA3, head_dim=128, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
                         rope_parameters=llama3_rope(8.0)), 128256),
    "gemma3_1b": (dict(GEMMA3, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
                       num_key_value_heads=1, sliding_window=512, tie_word_embeddings=True,
                       rope_parameters=gemma3_rope(None)), 262144),
    "gemma3_12b": (dict(GEMMA3, hidden_size=3840, intermediate_size=15360, num_hidden_layers=48, num_attention_heads=16,
                        num_key_value_heads=8, sliding_window=1024, tie_word_embeddings=True,
                        rope_parameters=gemma3_rope(8.0)), 262208),
})
TWIN_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "tie_word_embeddings")
for _name, (_spec, _vocab) in list(SHAPES.items()):
    if isinstance(_spec, dict) and _spec["model_type"] in ("qwen3", "gemma3_text"):
        # the same sizes as a plain Llama: what the family's own parts (norms, rotary tables, embeddings) cost beyond it
        SHAPES[f"{_name}:llama"] = (dict(model_type="llama", hidden_act="silu", **{f: _spec[f] for f in TWIN_FIELDS}), _vocab)
PAIRS = [("qwen2.5_0.5b", "qwen2.5_7b"), ("qwen2.5_1.5b", "qwen2.5_7b"), ("qwen3_0.6b", "qwen3_8b"),
         ("llama3.2_1b", "llama3.1_8b"), ("gemma3_1b", "gemma3_12b")]
VARIANTS = {  # name: settings of decode.compact that a variant of the compiled passes runs with (the default row
    # follows the model's width: TUNED_BELOW_WIDTH, MATMUL_ATTENTION_FROM_WIDTH)
    # the defaults, compiled anew in a variant's place: a runner made after another in the same process measured
    # slower host-read steps and checks than the first one (H100, 2026-12-06), so compare variants with this
    "default": {},
    "plain": dict(TUNE_ONE_TOKEN=False, ONE_TOKEN_ATTENTION="reduce"),  # neither of the two below
    # coordinate-descent tuning of the one-token pass (one-row products as Triton reductions)
    "tuned": dict(TUNE_ONE_TOKEN=True, ONE_TOKEN_ATTENTION="reduce"),
    # the one-token attention as two products instead of decode/kernels.py's kernel
    "matmul": dict(TUNE_ONE_TOKEN=False, ONE_TOKEN_ATTENTION="matmul", DECODE_KERNEL=False),
    "tuned+matmul": dict(TUNE_ONE_TOKEN=True, ONE_TOKEN_ATTENTION="matmul", DECODE_KERNEL=False),
    # the one-token attention as inductor compiles the passes' own arithmetic (cache writes, masked softmax over every
    # slot), instead of decode/kernels.py's Triton kernel
    "no-kernel": dict(DECODE_KERNEL=False),
    "rotary-apart": dict(KERNEL_ROTARY=False),  # the passes rotate q and k, the kernel does not
    # a tuned one-token pass's RMSNorms computed inside their products (NORM_IN_PRODUCT on)
    "norm-in-product": dict(NORM_IN_PRODUCT=True),
    # without inductor's combo kernels (independent kernels of a pass launched as one; on by default)
    "no-combo": dict(INDUCTOR_OPTIONS={one: dict(options, combo_kernels=False)
                                       for one, options in decode.compact.INDUCTOR_OPTIONS.items()}),
    # checks of fewer than 6 tokens run at their own width (decode/fast.py's MIN_CHECK_TOKENS)
    "unpadded": {"fast.MIN_CHECK_TOKENS": 1},
    # every check 16 wide: one check shape per model (whether the any-shape variant costs less at one width)
    "check16": {"fast.MIN_CHECK_TOKENS": 16},
    # a check's attention as SDPA's (math) instead of decode/kernels.py's kernel, query by query (CHECK_KERNEL off)
    "no-check-kernel": dict(CHECK_KERNEL=False),
    # decode/kernels.py's kernel over each token's whole live cache in one program (no split runs)
    "unsplit": {"kernels.SPLITS": 1},
    "splits8": {"kernels.SPLITS": 8},  # at most 8 runs per token (16 by default)
    "chunk128": {"kernels.MIN_CHUNK": 128},  # runs of at least 128 slots (256 by default)
    # a step's verdict (top probability and argmax over the vocabulary) eager, after the compiled head
    "eager-verdict": dict(COMPILED_VERDICT=False),
}
BACKENDS = {"sdpa-math": "MATH", "math": "MATH", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "flash": "FLASH_ATTENTION"}


def build(name, device, dtype):
    spec, vocab = SHAPES[name]
    if isinstance(spec, str):
        spec = dict(yaml.safe_load((ROOT / spec).read_text())["model_config"])
    spec = dict(spec)
    model_type = spec.pop("model_type")
    special = dict(pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if model_type in ("bart", "t5"):
        special.update(decoder_start_token_id=0 if model_type == "t5" else 1)
    if model_type == "bart":
        special["forced_eos_token_id"] = None
    cfg = AutoConfig.for_model(model_type, vocab_size=vocab, **special, **spec)
    auto = AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else AutoModelForCausalLM
    torch.manual_seed(0)
    with torch.device(device):  # random init on the device: seconds, not minutes, for 7B
        model = auto.from_config(cfg, dtype=dtype)
    return model.eval()


def step_bytes(model) -> int:
    """Bytes of the weights one decoder step reads: every decoder parameter but the input embedding table,
    plus the LM head (which is that table when the two are tied)."""
    decoder = model.get_decoder() if model.config.is_encoder_decoder else model.model
    embed = decoder.get_input_embeddings() if hasattr(decoder, "get_input_embeddings") else decoder.embed_tokens
    skip = {id(embed.weight)}
    total = sum(p.numel() * p.element_size() for p in decoder.parameters() if id(p) not in skip)
    head = model.get_output_embeddings().weight
    return total + head.numel() * head.element_size()


def copy_bandwidth(device) -> float:
    """Bytes per second of a 2 GiB device-to-device copy, counting bytes read and written."""
    src = torch.randn(2**29, device=device)  # 2 GiB of float32
    dst = torch.empty_like(src)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    del src, dst
    return 2 * 2**31 / statistics.median(times[2:])


def matmul_rate(device, dtype) -> float:
    """FLOP per second of an 8192^3 product on random data."""
    a, b = torch.randn(8192, 8192, device=device, dtype=dtype), torch.randn(8192, 8192, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - t)


def timed(fn, repeats, device, setup=None):
    """(median, min, max) seconds of fn() over `repeats` runs after a warm-up; setup(), where given, before each run
    and outside its time."""
    times = []
    for i in range(repeats + 1):
        if setup is not None:
            setup()
        device_sync(device)
        t = time.perf_counter()
        fn()
        device_sync(device)
        if i:  # the first run warms up
            times.append(time.perf_counter() - t)
    return statistics.median(times), min(times), max(times)


def per(result, n):
    """(median, min, max) seconds -> ms per unit."""
    return tuple(1000 * x / n for x in result)


def fmt(t):
    return f"{t[0]:.3f} ({t[1]:.3f}-{t[2]:.3f})"


def compiled_runner(model, prompt, keys, capacity):
    """A fresh compiled runner and the seconds its first start took (compiling and capturing `keys`)."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    runner = FastRunner(model, compile=True)
    runner.plan(keys)
    runner.start(prompt, capacity)
    torch.cuda.synchronize()
    return runner, time.perf_counter() - t


def stepped(runner, prompt, steps, capacity, repeats, device):
    """ms per step, the host reading each step's token as the decoding loop does; the sequence started before each
    run, outside its time (a 4,000-token start is 12 steps' time at 0.5B)."""
    def run():
        token = 5
        for _ in range(steps):
            _, token = runner.step([token])
    return per(timed(run, repeats, device, setup=lambda: runner.start(prompt, capacity)), steps)


def graph_only(runner, prompt, capacity, steps, repeats, device):
    """ms per step of the step's CUDA graph replayed alone, the host reading once at the end."""
    runner.start(prompt, capacity)
    runner.step([5])
    graph, base = runner.graphs[("step", 1)], runner.length

    def replays():
        runner._pos0.fill_(base)  # each replay advances the position on the device
        for _ in range(steps):
            graph.replay()
        runner._step_out.tolist()

    ms = per(timed(replays, repeats, device), steps)
    runner._forget_device_state()
    return ms


def checked(runner, prompt, capacity, pending, steps, repeats, device):
    """ms per check of `pending` tokens (and the one before them), rewound after each."""
    def check():
        for _ in range(steps):
            runner.check(list(range(5, 5 + pending + 1)), pending, "exact", 0.0)
            runner.rewind(runner.length - pending - 1)

    runner.start(prompt, capacity)
    runner.step([5])
    return per(timed(check, repeats, device), steps)


@torch.inference_mode()
def measure(name, args, device, dtype, bandwidth, rate):
    model = build(name, device, dtype)
    enc_dec = model.config.is_encoder_decoder
    prompt = torch.randint(3, 1000, (args.prompt_length,)).tolist()
    steps, k = args.steps, 10
    capacity = steps + 2 * k + 2
    params = sum(p.numel() for p in model.parameters())
    row = {"shape": name, "params_M": params / 1e6, "floor_ms": 1000 * step_bytes(model) / bandwidth}
    checks = [10] + ([1, 3, 5] if args.pairs else [])
    keys = [("step", 1), ("draft", 1), ("draft_next", 1)] + [("check", c + 1, "exact") for c in checks]
    fast, row["compile_s"] = compiled_runner(model, prompt, keys, capacity)
    row["compile_log"] = fast.passes.compile_log
    print(f"{name}: compiled in {row['compile_s']:.1f} s: " + ", ".join(f"{p} ({v}) {s:.1f}" for p, v, s in fast.passes.compile_log),
          flush=True)
    row["step"] = stepped(fast, prompt, steps, capacity, args.repeats, device)

    row["graph"] = graph_only(fast, prompt, capacity, steps, args.repeats, device)

    def drafted():
        token = 5
        for _ in range(steps // 16):
            _, kept = fast.draft([token], 16, 16, -1.0, [-1])
            token = kept[-1]

    row["draft"] = per(timed(drafted, args.repeats, device, setup=lambda: fast.start(prompt, capacity)), steps)

    for c in checks:
        row[f"check{c}"] = checked(fast, prompt, capacity, c, steps, args.repeats, device)

    row["start"] = per(timed(lambda: [fast.start(prompt, capacity) for _ in range(steps)], args.repeats, device), steps)
    if not enc_dec:  # a long prompt: its prefill graph, against max(bytes, FLOPs) over the measured rates
        long_prompt = torch.randint(3, 1000, (512,)).tolist()
        fast.start(long_prompt, 8)  # captures the 512 bucket
        row["start512"] = per(timed(lambda: [fast.start(long_prompt, 8) for _ in range(8)], args.repeats, device), 8)
        flops = 2 * (params - model.get_input_embeddings().weight.numel()) * 511
        row["start512_floor"] = 1000 * max(step_bytes(model) / bandwidth, flops / rate)

    if args.uncompiled:
        plain = FastRunner(model, compile=False)
        plain.plan([("step", 1)])
        row["uncompiled"] = stepped(plain, prompt, steps, capacity, args.repeats, device)
        del plain
    if args.eager:
        row["eager"] = stepped(ModelRunner(model), prompt, steps, capacity, max(3, args.repeats // 2), device)

    if args.profile:
        row["profile"] = profile_step(fast)
    if args.profile_checks:  # why a check of 2 tokens cost more than one of 11 (Gemma-3-1B, Qwen3-8B): unpadded
        row["profile_checks"] = {}
        saved, decode.fast.MIN_CHECK_TOKENS = decode.fast.MIN_CHECK_TOKENS, 1
        try:
            for pending in (1, 10):
                fast.start(prompt, capacity)
                fast.step([5])
                fast.check(list(range(5, 5 + pending + 1)), pending, "exact", 0.0)  # leaves the inputs of this shape
                fast.rewind(fast.length - pending - 1)
                row["profile_checks"][pending + 1] = profile_step(fast, ("check", pending + 1, "exact"))
        finally:
            decode.fast.MIN_CHECK_TOKENS = saved

    def fresh():  # a runner over passes compiled anew, and its compile seconds
        return compiled_runner(model, prompt, [("step", 1), ("check", k + 1, "exact"), ("check", 2, "exact")], capacity)

    def graph_check(runner):
        return (graph_only(runner, prompt, capacity, steps, args.repeats, device),
                checked(runner, prompt, capacity, k, steps, args.repeats, device))

    def step_graph_check(runner):  # and a check of one pending token
        return (stepped(runner, prompt, steps, capacity, args.repeats, device), *graph_check(runner),
                checked(runner, prompt, capacity, 1, steps, args.repeats, device))

    for variant in args.variants:
        row[f"variant_{variant}"] = with_settings(model, VARIANTS[variant], fresh, step_graph_check)
    for backend in args.attention:  # sdpa-math: SDPA's math path for every pass
        settings = dict(COMPILED_ATTENTION=[getattr(torch.nn.attention.SDPBackend, BACKENDS[backend])],
                        GROUPED_ATTENTION=backend != "sdpa-math")
        row[f"attn_{backend}"] = with_settings(model, settings, fresh, graph_check)
    del model, fast
    torch.cuda.empty_cache()
    return row


def with_settings(model, settings: dict, make, measure):
    """measure(runner) of a runner from make() (a compiled runner and the seconds it took), its passes compiled anew
    with these settings of decode.compact: measure's values, then the compile seconds. Settings that cannot compile
    give the error's first line instead, for the table. decode.compact's own settings come back after."""
    def where(name):  # "NAME" in decode.compact, "fast.NAME" in decode.fast, "kernels.NAME" in decode.kernels
        module, _, attr = name.rpartition(".")
        return {"": decode.compact, "fast": decode.fast, "kernels": decode.kernels}[module], attr

    saved = {name: getattr(*where(name)) for name in settings}
    for name, value in settings.items():
        setattr(*where(name), value)
    decode.passes._PASSES.pop(model, None)  # passes traced anew with these settings
    try:
        runner, secs = make()
        return (*measure(runner), secs)
    except Exception as err:  # noqa: BLE001 - settings that cannot trace these shapes: say so in the table
        return f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"
    finally:
        for name, value in saved.items():
            setattr(*where(name), value)
        decode.passes._PASSES.pop(model, None)
        torch.cuda.empty_cache()


def profile_step(runner, key=("step", 1)) -> dict:
    """Kernels of one compiled pass (the step, or a check: key ("check", n, "exact")) run without its graph: how
    many, and the costliest by total device time with their launch shapes (grid and block, from the profiler's trace:
    where two processes' kernels of one name take different times, whether the tuning gave them other blocks). The
    pass reads the runner's static inputs as its last call left them."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    step = runner._pass(key)
    for _ in range(3):
        runner._pos0.fill_(30)
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            runner._pos0.fill_(30)
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    us = lambda e: e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total  # noqa: E731
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name, []).append(us(e))
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:12]
    first = sorted(kernels, key=lambda e: e.time_range.start)[: len(kernels) // 5]  # one step, in order
    with tempfile.NamedTemporaryFile(suffix=".json") as trace:
        prof.export_chrome_trace(trace.name)
        shapes = launch_shapes(json.loads(Path(trace.name).read_text()))
    return {"kernels_per_step": len(kernels) / 5, "device_us_per_step": sum(sum(v) for v in by_name.values()) / 5,
            "top": [(name[:90], len(v) / 5, sum(v) / 5, shapes.get(name, "")) for name, v in top],
            "order": [(e.name[:90], us(e)) for e in first[:40]]}


def launch_shapes(trace: dict) -> dict[str, str]:
    """Each kernel's launch shapes in a profiler's Chrome trace: name -> "grid AxBxC block N" (several, by how often,
    where launches of one name differ)."""
    seen: dict[str, dict[str, int]] = {}
    for event in trace.get("traceEvents", []):
        args = event.get("args") or {}
        if event.get("cat") != "kernel" or "grid" not in args or "block" not in args:
            continue
        shape = f"grid {'x'.join(map(str, args['grid']))} block {args['block'][0]}"
        counts = seen.setdefault(event["name"], {})
        counts[shape] = counts.get(shape, 0) + 1
    return {name: ", ".join(sorted(counts, key=lambda k: -counts[k])) for name, counts in seen.items()}


@torch.inference_mode()
def measure_batches(name, args, device, dtype) -> list[dict]:
    """Batched passes by batch size: what a row costs in a pass of B rows, and the host's share of a step."""
    from decode.batch import BatchRunner

    model = build(name, device, dtype)
    steps, out = args.steps, []
    for batch in args.batches:
        runner = BatchRunner(model, batch, compile=True)
        runner.plan([("step", 1), ("check", 5, "exact"), ("draft", 1), ("draft_next", 1)])
        prompts = [torch.randint(3, 1000, (20,)).tolist() for _ in range(batch)]

        def started():  # before each timed run, outside its time
            runner.start(prompts, steps + 8)

        def stepped():
            for _ in range(steps):
                runner.step([[5]] * batch)  # inputs written, verdicts read back: one host round trip per pass

        def replays():
            for _ in range(steps):
                runner._run(("step", 1))  # the graph, replayed on the last step's inputs
            runner._verdicts.tolist()

        def checked():
            for _ in range(steps):
                runner.check([[5, 6, 7, 8, 9]] * batch, "exact", 0.0)
                for b in range(batch):
                    runner.rewind(b, runner.lengths[b] - 5)

        def drafted():  # 16 steps per draft, every row running throughout
            for _ in range(steps // 16):
                runner.draft([[5]] * batch, 16, [16] * batch, -1.0, [-1])

        row = {"shape": name, "batch": batch}
        for key, fn in (("step", stepped), ("graph", replays), ("check", checked), ("draft", drafted)):
            row[key] = per(timed(fn, args.repeats, device, setup=started), steps)
        out.append(row)
        print(f"{name} batch {batch}: step {row['step'][0]:.3f} graph only {row['graph'][0]:.3f} "
              f"check k=4 {row['check'][0]:.3f} ms per pass", flush=True)
        del runner
    del model
    torch.cuda.empty_cache()
    return out


def pair_table(rows: dict) -> list[str]:
    lines = ["| small -> large | small step | large step | check t=2 / 4 / 6 (k=1 / 3 / 5) | BiLD at 2 / 4 / 6 tokens "
             "per large call | speculative decoding at 2 / 4 / 6 |", "|---|---|---|---|---|---|"]
    for small, large in PAIRS:
        if small not in rows or large not in rows or "check1" not in rows[large]:
            continue
        s = min(rows[small]["step"][0], rows[small]["draft"][0])  # the cheaper of the host and the device loop
        big = rows[large]["step"][0]
        check = {2: rows[large]["check1"][0], 4: rows[large]["check3"][0], 6: rows[large]["check5"][0]}
        bild = [t * big / (t * s + check[t]) for t in (2, 4, 6)]
        spec = [t * big / ((t - 1) * s + check[t]) for t in (2, 4, 6)]
        lines.append(f"| {small} -> {large} | {s:.3f} | {big:.3f} | " + " / ".join(f"{check[t]:.3f}" for t in (2, 4, 6))
                     + " | " + " / ".join(f"{x:.2f}x" for x in bild) + " | " + " / ".join(f"{x:.2f}x" for x in spec) + " |")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="*", default=["demo_large", "demo_small", "qwen2.5_0.5b", "qwen2.5_1.5b", "qwen2.5_7b"],
                   choices=list(SHAPES))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--prompt-length", type=int, default=20,
                   help="the input every step and check follows (a long one: the attention over a long cache)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--uncompiled", action="store_true", help="also time the step on the uncompiled passes")
    p.add_argument("--eager", action="store_true", help="also time transformers' own forward (ModelRunner)")
    p.add_argument("--pairs", action="store_true", help="checks of 1, 3, 5 pending tokens and the pair table")
    p.add_argument("--profile", action="store_true", help="count the kernels of one compiled step")
    p.add_argument("--profile-checks", action="store_true", help="the kernels of a check of 2 and of 11 tokens")
    p.add_argument("--attention", nargs="*", default=[], choices=list(BACKENDS), help="time these attention backends")
    p.add_argument("--variants", nargs="*", default=[], choices=list(VARIANTS),
                   help="also time the compiled step with these settings of decode/compact.py")
    p.add_argument("--batches", nargs="*", type=int, default=[], help="also time the batched passes at these batch sizes")
    p.add_argument("--compile-only", metavar="SHAPE", help="only time a fresh compiled runner's first start")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_step.py measures CUDA graphs: it needs a CUDA device")
    device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    if args.compile_only:
        model = build(args.compile_only, device, dtype)
        prompt = torch.randint(3, 1000, (20,)).tolist()
        with torch.inference_mode():
            runner, secs = compiled_runner(model, prompt, [("step", 1), ("draft", 1), ("draft_next", 1), ("check", 11, "exact")], 100)
        print(f"{args.compile_only}: a fresh runner's first start (compile and capture) took {secs:.1f} s "
              f"(cache dir {os.environ.get('TORCHINDUCTOR_CACHE_DIR', 'default')}): "
              + ", ".join(f"{p} ({v}) {s:.1f}" for p, v, s in runner.passes.compile_log))
        from torch._dynamo.utils import counters, compile_times
        print("on-disk caches:", {f"{k}.{n}": c for k, d in counters.items() for n, c in d.items() if "cache" in n})
        print(compile_times(repr="str", aggregate=True))
        return
    bandwidth, rate = copy_bandwidth(device), matmul_rate(device, dtype)
    rows = {}
    for name in args.shapes:
        rows[name] = r = measure(name, args, device, dtype, bandwidth, rate)
        print(f"{name}: step {r['step'][0]:.3f} graph only {r['graph'][0]:.3f} draft {r['draft'][0]:.3f} check k=10 "
              f"{r['check10'][0]:.3f} start {r['start'][0]:.3f} floor {r['floor_ms']:.3f} ms", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"\ndevice: {torch.cuda.get_device_name()}; torch {torch.__version__}; {args.dtype}; batch 1; copy bandwidth "
          f"{bandwidth / 1e12:.2f} TB/s; matrix rate {rate / 1e12:.0f} TFLOP/s; ms, median of {args.repeats} runs of "
          f"{args.steps} steps (min-max)")
    extra = (["uncompiled step"] if args.uncompiled else []) + (["transformers forward"] if args.eager else [])
    print("| shape | params (M) | floor | step (compiled, host read) | step / floor | graph only | device draft, per step "
          f"| check k=10 | check / step | start ({args.prompt_length} tokens) | start 512 (floor) | compile (s) | " + " | ".join(extra)
          + (" |" if extra else ""))
    print("|---" * (12 + len(extra)) + "|")
    for r in rows.values():
        s512 = f"{r['start512'][0]:.2f} ({r['start512_floor']:.2f})" if "start512" in r else "-"
        cells = [fmt(r["uncompiled"])] if args.uncompiled else []
        cells += [fmt(r["eager"])] if args.eager else []
        print(f"| {r['shape']} | {r['params_M']:.0f} | {r['floor_ms']:.3f} | {fmt(r['step'])} | "
              f"{r['step'][0] / r['floor_ms']:.2f}x | {fmt(r['graph'])} | {fmt(r['draft'])} | {fmt(r['check10'])} | "
              f"{r['check10'][0] / r['step'][0]:.2f} | {fmt(r['start'])} | {s512} | {r['compile_s']:.0f} | "
              + " | ".join(cells) + (" |" if cells else ""))
    if args.attention:
        print("\nattention backend traced into the compiled passes: graph-only step / check k=10 ms (compile s)")
        for r in rows.values():
            cells = []
            for b in args.attention:
                v = r[f"attn_{b}"]
                cells.append(v if isinstance(v, str) else f"{v[0][0]:.3f} / {v[1][0]:.3f} ({v[2]:.0f} s)")
            print(f"| {r['shape']} | " + " | ".join(f"{b}: {c}" for b, c in zip(args.attention, cells)) + " |")
    if args.variants:
        print("\nvariants of the compiled passes: step (host read) / graph-only step / check k=10 / check k=1, ms "
              "(compile s); the default is the step table's")
        print("| shape | default | " + " | ".join(args.variants) + " |")
        print("|---" * (2 + len(args.variants)) + "|")
        for r in rows.values():
            k1 = f" / {r['check1'][0]:.3f}" if "check1" in r else ""
            cells = [f"{r['step'][0]:.3f} / {r['graph'][0]:.3f} / {r['check10'][0]:.3f}{k1}"]
            for v in args.variants:
                x = r[f"variant_{v}"]
                cells.append(x if isinstance(x, str) else
                             f"{x[0][0]:.3f} / {x[1][0]:.3f} / {x[2][0]:.3f} / {x[3][0]:.3f} ({x[4]:.0f} s)")
            print(f"| {r['shape']} | " + " | ".join(cells) + " |")
    if args.profile:
        for r in rows.values():
            pr = r["profile"]
            print(f"\n{r['shape']}: {pr['kernels_per_step']:.0f} kernels per compiled step, {pr['device_us_per_step']:.0f} us "
                  "of kernel time (no graph)")
            for name, count, us, launch in pr["top"]:
                print(f"  {us:8.1f} us  x{count:4.0f}  {name}  [{launch}]")
            print("  the step's first kernels, in order (the embedding, then layer 0 and on):")
            for name, us in pr["order"]:
                print(f"  {us:8.1f} us  {name}")
    twins = [(r, rows[f"{r['shape']}:llama"]) for r in rows.values() if f"{r['shape']}:llama" in rows]
    if twins:
        print("\nfamily against a Llama of the same sizes (layers, width, heads, vocabulary): compiled step, host read, ms")
        print("| shape | step | Llama twin | ratio | check k=10 | twin | ratio |")
        print("|---|---|---|---|---|---|---|")
        for r, t in twins:
            print(f"| {r['shape']} | {fmt(r['step'])} | {fmt(t['step'])} | {r['step'][0] / t['step'][0]:.2f} | "
                  f"{fmt(r['check10'])} | {fmt(t['check10'])} | {r['check10'][0] / t['check10'][0]:.2f} |")
    if args.profile_checks:
        for r in rows.values():
            for n, pr in r["profile_checks"].items():
                print(f"\n{r['shape']}: a check of {n} tokens, {pr['kernels_per_step']:.0f} kernels, "
                      f"{pr['device_us_per_step']:.0f} us of kernel time (no graph)")
                for name, count, us, launch in pr["top"]:
                    print(f"  {us:8.1f} us  x{count:4.0f}  {name}  [{launch}]")
    if args.pairs:
        print("\nper pair, ms from the rows above; arithmetic over the measured passes, not a decoding run")
        print("\n".join(pair_table(rows)))
    if args.batches:
        batched = [r for name in args.shapes for r in measure_batches(name, args, device, dtype)]
        print(f"\nbatched passes (decode/batch.py, compiled), every row feeding; ms per pass, median of {args.repeats} "
              f"runs (min-max)")
        print("| shape | batch | step (host in/out) | step graph only | device draft, per step | check k=4 | step per row |")
        print("|---|---|---|---|---|---|---|")
        for r in batched:
            print(f"| {r['shape']} | {r['batch']} | {fmt(r['step'])} | {fmt(r['graph'])} | {fmt(r['draft'])} | "
                  f"{fmt(r['check'])} | {r['step'][0] / r['batch']:.4f} |")


if __name__ == "__main__":
    main()
