"""Per-step cost of decoding, per model shape, against the bytes floor: the numbers BiLD's speedup is made of.

    python scripts/bench_step.py [--shapes demo_large demo_small t5_small t5_large qwen2.5_0.5b qwen2.5_1.5b qwen2.5_7b]
                                 [--dtype bfloat16] [--steps 64] [--repeats 5]

Each shape is built from a config with random weights (no download), in bf16 at batch 1, then timed with the
device synchronised, warm-up discarded, the median of --repeats runs (the spread is min-max over them):
- eager step: one token through decode.cache.ModelRunner (transformers forward, DynamicCache), host read each step;
- fast step: one token through decode.fast.FastRunner (static cache, one CUDA graph), host read each step;
- graph only: the same step graph replayed --steps times back to back (each replay feeds the token the last one
  wrote on the device), one host read at the end: the GPU's own time per step, without the host round trip;
- device draft: FastRunner.draft (decode/fast.py), the loop's state on the device, one small host read per step
  and the tokens once per 16 steps; per step;
- fast check k=10: the large model's pass over 10 pending tokens + 1, as a CUDA graph;
- fast sample step / sample check k=10: the same passes for speculative sampling at temperature 1 (the draw, or
  the rejection rule over 10 drafts, inside the graph; uniforms written before each replay);
- generate/token: transformers `generate` greedy, per new token;
- start: beginning a sequence of a 20-token input (encoder and cross-attention keys and values, or the
  prompt prefill), eager and fast;
- with --batches B...: a second table, per batch size, of the batched passes (decode/batch.py) with every row
  feeding: a step (host inputs written and verdicts read back, as the batched loop does), the same step graph
  replayed without the host, the device draft loop's cost per step (16 per draft), plain and looking
  ahead, with its bookkeeping fused into one kernel (decode.fast.FUSE_BOOKKEEPING) and unfused (the default), and a check of 4 pending tokens + 1 per row; ms per pass and per row;
- floor: bytes of the weights one decoder step reads (decoder layers and LM head, not the encoder or the
  input embedding table) over the copy bandwidth measured on this device.
Prints one table last (markdown).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import yaml  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM  # noqa: E402

from decode.cache import ModelRunner  # noqa: E402
from decode.fast import FastRunner  # noqa: E402
from decode.generation import device_sync  # noqa: E402
from decode.sampling import Sampling  # noqa: E402

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


def timed(fn, repeats, device):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        device_sync(device)
        t = time.perf_counter()
        fn()
        device_sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times), max(times)


def measure(name, args, device, dtype, bandwidth):
    model = build(name, device, dtype)
    enc_dec = model.config.is_encoder_decoder
    prompt = torch.randint(3, 1000, (20,)).tolist()
    steps, k = args.steps, 10
    row = {"shape": name, "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
           "floor_ms": 1000 * step_bytes(model) / bandwidth}

    def decode(runner):
        def run():
            runner.start(prompt, steps + k + 2)
            token = 5
            for _ in range(steps):
                _, token = runner.step([token])  # host read per step, as in the decoding loop
        return run

    eager, fast = ModelRunner(model), FastRunner(model)
    runners = [("eager", eager), ("fast", fast)]
    if args.compile:
        compiled = FastRunner(model, compile=True)
        runners.append(("compiled", compiled))
        t = time.perf_counter()
        compiled.plan([("step", 1), ("check", k + 1, "exact")])
        compiled.start(prompt, steps + k + 2)
        row["compile_s"] = time.perf_counter() - t
    fast.plan([("step", 1), ("check", k + 1, "exact")])
    for label, runner in runners:
        med, lo, hi = timed(decode(runner), args.repeats, device)
        row[f"{label}_ms"], row[f"{label}_spread"] = 1000 * med / steps, (1000 * lo / steps, 1000 * hi / steps)
        # a sequence's start: the encoder and cross-attention K/V (encoder-decoder), or the prompt prefill
        med, lo, hi = timed(lambda: [runner.start(prompt, steps + k + 2) for _ in range(steps)], args.repeats, device)
        row[f"{label}_start_ms"] = 1000 * med / steps

    fast.start(prompt, steps + k + 2)
    fast.step([5])
    graph, base = fast._graphs[("step", 1)], fast.length

    def replays():
        fast._pos0.fill_(base)  # each replay advances the position on the device
        for _ in range(steps):
            graph.replay()
        fast._step_out.tolist()

    med, lo, hi = timed(replays, args.repeats, device)
    row["graph_ms"], row["graph_spread"] = 1000 * med / steps, (1000 * lo / steps, 1000 * hi / steps)
    fast._forget_device_state()

    # the device draft loop: the state on the device, one small read per step (a threshold nothing falls under)
    fast.plan([("draft", 1), ("draft_next", 1)])

    def drafted():
        fast.start(prompt, steps + k + 2)
        token = 5
        for _ in range(steps // 16):
            _, kept = fast.draft([token], 16, 16, -1.0, [-1])
            token = kept[-1]

    med, lo, hi = timed(drafted, args.repeats, device)
    row["draft_ms"], row["draft_spread"] = 1000 * med / steps, (1000 * lo / steps, 1000 * hi / steps)

    def check():
        for _ in range(steps):
            fast.check(list(range(5, 5 + k + 1)), k, "exact", 0.0)
            fast.rewind(fast.length - k - 1)

    if args.compile:
        fast = compiled
    fast.start(prompt, steps + k + 2)
    fast.step([5])
    med, lo, hi = timed(check, args.repeats, device)
    row["check_ms"], row["check_spread"] = 1000 * med / steps, (1000 * lo / steps, 1000 * hi / steps)

    # speculative sampling's passes (temperature 1): the draw, and the rejection rule over k drafts, in the graphs
    sampling = Sampling(1.0, generator=torch.Generator(device).manual_seed(0))
    fast.plan([("sample", 1, sampling.key), ("sample_check", k + 1, sampling.key)])
    fast.start(prompt, steps + k + 2)

    def sample():
        fast.start(prompt, steps + k + 2)
        token = 5
        for _ in range(steps):
            _, token = fast.sample_step([token], sampling, draft=False)

    med, lo, hi = timed(sample, args.repeats, device)
    row["sample_ms"], row["sample_spread"] = 1000 * med / steps, (1000 * lo / steps, 1000 * hi / steps)
    fast.step([5])
    drafts = torch.softmax(torch.randn(k, fast._drafts.shape[-1], device=device), dim=-1)

    def sample_check():
        for _ in range(steps):
            fast.sample_check(list(range(5, 5 + k + 1)), k, drafts, sampling)
            fast.rewind(fast.length - k - 1)

    med, lo, hi = timed(sample_check, args.repeats, device)
    row["sample_check_ms"], row["sample_check_spread"] = 1000 * med / steps, (1000 * lo / steps, 1000 * hi / steps)

    ids = torch.tensor([prompt], device=device)
    gen_kwargs = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, num_beams=1, eos_token_id=1, pad_token_id=0)
    med, lo, hi = timed(lambda: model.generate(ids, **gen_kwargs), max(3, args.repeats // 2), device)
    row["generate_ms"], row["generate_spread"] = 1000 * med / steps, (1000 * lo / steps, 1000 * hi / steps)
    del model, eager, fast
    torch.cuda.empty_cache()
    return row


@torch.inference_mode()
def measure_batches(name, args, device, dtype) -> list[dict]:
    """Batched passes by batch size: what a row costs in a pass of B rows, and the host's share of a step."""
    import decode.fast
    from decode.batch import BatchRunner

    model = build(name, device, dtype)
    steps, out = args.steps, []
    for batch in args.batches:
        runner = BatchRunner(model, batch)
        runner.plan([("step", 1), ("check", 5, "exact")])
        prompts = [torch.randint(3, 1000, (20,)).tolist() for _ in range(batch)]

        def stepped():
            runner.start(prompts, steps + 8)
            for _ in range(steps):
                runner.step([[5]] * batch)  # inputs written, verdicts read back: one host round trip per pass

        def replays():
            for _ in range(steps):
                runner._run(("step", 1))  # the graph, replayed on the last step's inputs
            runner._verdicts.tolist()

        def checked():
            runner.start(prompts, steps + 8)
            for _ in range(steps):
                runner.check([[5, 6, 7, 8, 9]] * batch, "exact", 0.0)
                for b in range(batch):
                    runner.rewind(b, runner.lengths[b] - 5)

        def drafted(runner, lookahead=None):  # 16 steps per draft, every row running throughout
            def run():
                runner.start(prompts, steps + 8)
                for _ in range(steps // 16):
                    runner.draft([[5]] * batch, 16, [16] * batch, -1.0, [-1], lookahead=lookahead)
            return run

        # the draft loop's steps, plain and looking ahead (its own graphs; nothing is guessed here, which costs the
        # same kernels), with the bookkeeping fused and, in a second runner, unfused
        draft_keys = [("draft", 1), ("draft_next", 1), ("draft", 1, "ahead"), ("draft_next", 1, "ahead")]
        ahead = (None, [False] * batch, [None] * batch)
        runner.plan(draft_keys)
        unfused = BatchRunner(model, batch)
        unfused.plan(draft_keys)
        row = {"shape": name, "batch": batch}
        default = decode.fast.FUSE_BOOKKEEPING
        decode.fast.FUSE_BOOKKEEPING = True  # read when a graph is captured, at the runner's first start
        timings = [("step", stepped), ("graph", replays), ("check", checked), ("draft", drafted(runner)),
                   ("draft_ahead", drafted(runner, ahead))]
        for key, fn in timings:
            med, lo, hi = timed(fn, args.repeats, device)
            row[key] = (1000 * med / steps, 1000 * lo / steps, 1000 * hi / steps)
        decode.fast.FUSE_BOOKKEEPING = False
        for key, fn in (("draft_unfused", drafted(unfused)), ("draft_ahead_unfused", drafted(unfused, ahead))):
            med, lo, hi = timed(fn, args.repeats, device)
            row[key] = (1000 * med / steps, 1000 * lo / steps, 1000 * hi / steps)
        decode.fast.FUSE_BOOKKEEPING = default
        out.append(row)
        print(f"{name} batch {batch}: step {row['step'][0]:.3f} graph only {row['graph'][0]:.3f} "
              f"check k=4 {row['check'][0]:.3f} ms per pass", flush=True)
        del runner, unfused
    del model
    torch.cuda.empty_cache()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also time the fast path with torch.compile (its check then)")
    p.add_argument("--batches", nargs="*", type=int, default=[], help="also time the batched passes at these batch sizes")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_step.py measures CUDA graphs: it needs a CUDA device")
    device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    bandwidth = copy_bandwidth(device)
    rows = []
    for name in args.shapes:
        rows.append(measure(name, args, device, dtype, bandwidth))
        r = rows[-1]
        print(f"{name}: start eager {r['eager_start_ms']:.3f} fast {r['fast_start_ms']:.3f}; "
              f"eager {r['eager_ms']:.3f} fast {r['fast_ms']:.3f} graph only {r['graph_ms']:.3f} check {r['check_ms']:.3f} "
              + (f"compiled {r['compiled_ms']:.3f} (compile {r['compile_s']:.0f} s) " if args.compile else "") +
              f"sample step {r['sample_ms']:.3f} sample check {r['sample_check_ms']:.3f} "
              f"generate {r['generate_ms']:.3f} floor {r['floor_ms']:.3f} ms", flush=True)
    spread = lambda r, key: f"{r[key + '_ms']:.3f} ({r[key + '_spread'][0]:.3f}-{r[key + '_spread'][1]:.3f})"  # noqa: E731
    print(f"\ndevice: {torch.cuda.get_device_name()}; {args.dtype}; batch 1; copy bandwidth {bandwidth / 1e12:.2f} TB/s; "
          f"ms per token, median of {args.repeats} runs of {args.steps} steps (min-max)")
    best = "compiled" if args.compile else "fast"
    print("| shape | params (M) | floor | eager step | fast step | graph only | device draft, per step | "
          + ("compiled step | " if args.compile else "")
          + f"{best} / floor | {best} check k=10 | fast sample step | fast sample check k=10 | generate / token | "
          "start eager / fast |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if args.compile else ""))
    for r in rows:
        print(f"| {r['shape']} | {r['params_M']:.0f} | {r['floor_ms']:.3f} | {spread(r, 'eager')} | {spread(r, 'fast')} | "
              f"{spread(r, 'graph')} | "
              + f"{spread(r, 'draft')} | "
              + (f"{spread(r, 'compiled')} | " if args.compile else "")
              + f"{r[best + '_ms'] / r['floor_ms']:.2f}x | {spread(r, 'check')} | {spread(r, 'sample')} | "
              f"{spread(r, 'sample_check')} | {spread(r, 'generate')} | "
              f"{r['eager_start_ms']:.3f} / {r['fast_start_ms']:.3f} |")
    if args.batches:
        batched = [r for name in args.shapes for r in measure_batches(name, args, device, dtype)]
        print(f"\nbatched passes (decode/batch.py), every row feeding; ms per pass, median of {args.repeats} runs of "
              f"{args.steps} passes (min-max); per row: ms per pass / batch")
        print("| shape | batch | step (host in/out) | step graph only | host share | device draft, per step | "
              "device draft, unfused bookkeeping | lookahead draft | lookahead draft, unfused | check k=4 | "
              "step per row | check per row |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in batched:
            step, graph, check = r["step"], r["graph"], r["check"]
            drafts = " | ".join(f"{r[k][0]:.3f} ({r[k][1]:.3f}-{r[k][2]:.3f})"
                                for k in ("draft", "draft_unfused", "draft_ahead", "draft_ahead_unfused"))
            print(f"| {r['shape']} | {r['batch']} | {step[0]:.3f} ({step[1]:.3f}-{step[2]:.3f}) | {graph[0]:.3f} | "
                  f"{1 - graph[0] / step[0]:.0%} | {drafts} | {check[0]:.3f} ({check[1]:.3f}-{check[2]:.3f}) | "
                  f"{step[0] / r['batch']:.4f} | {check[0] / r['batch']:.4f} |")


if __name__ == "__main__":
    main()
