"""Step costs of the CPU profile's models on this machine: one token, a check of 5 pending tokens and a 20-token
start, through transformers' forward (the eager path) and through the compact passes without graphs (the fast path
off CUDA), for the large model and the small one `./launch.sh cpu` makes from it. Random weights of the profile's
shapes (speed does not depend on training). Prints a table; ms, median of --repeats runs of --steps steps.

    python scripts/bench_cpu_steps.py [--threads 2] [--compiled]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from transformers import BartConfig, BartForConditionalGeneration

from decode.cache import ModelRunner
from decode.fast import FastRunner

# launch.sh's cpu profile: the large model, and the small one (its first decoder layer only); the small model the
# profile trained from scratch before, for comparison
SHAPES = {
    "large (d256, 2+3 layers)": dict(d_model=256, encoder_layers=2, decoder_layers=3, ffn=512),
    "small from large (d256, 2+1)": dict(d_model=256, encoder_layers=2, decoder_layers=1, ffn=512),
    "small from scratch (d128, 2+1)": dict(d_model=128, encoder_layers=2, decoder_layers=1, ffn=256),
}


def bart(d_model, encoder_layers, decoder_layers, ffn, vocab=4000):
    cfg = BartConfig(vocab_size=vocab, d_model=d_model, encoder_layers=encoder_layers, decoder_layers=decoder_layers,
                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn,
                     max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                     decoder_start_token_id=1, forced_eos_token_id=None)
    return BartForConditionalGeneration(cfg).eval()


def timed(fn, repeats):
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


@torch.inference_mode()
def measure(runner, steps, repeats):
    prompt = list(range(5, 25))

    def step():
        runner.start(prompt, steps + 16)
        token = 5
        for _ in range(steps):
            _, token = runner.step([token])

    def check():
        runner.start(prompt, steps + 16)
        runner.step([5])
        for _ in range(steps):
            runner.check([5] * 5, 4, "exact", 0.0)
            runner.rewind(runner.length - 5)

    def start():
        runner.start(prompt, steps + 16)

    s = timed(start, repeats)
    return {"step": (timed(step, repeats) - s) / steps * 1e3, "check5": (timed(check, repeats) - s) / steps * 1e3,
            "start": s * 1e3}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compiled", action="store_true", help="also the compact passes under torch.compile (C++ kernels)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for name, shape in SHAPES.items():
        model = bart(**shape)
        paths = [("eager", lambda: ModelRunner(model)), ("compact", lambda: FastRunner(model))]
        if args.compiled:
            paths.append(("compact, compiled", lambda: FastRunner(model, compile=True)))
        for path, make in paths:
            t = time.perf_counter()
            runner = make()
            with torch.inference_mode():  # the first start compiles (compiled path)
                runner.start(list(range(5, 25)), 64)
                runner.step([5])
                runner.check([5] * 5, 4, "exact", 0.0)
            first = time.perf_counter() - t
            rows.append((name, path, measure(runner, args.steps, args.repeats) | {"first_s": first}))
            print(f"{name} {path}: " + ", ".join(f"{k} {v:.2f}" for k, v in rows[-1][2].items()), flush=True)
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch "
          f"threads, torch {torch.__version__}; float32, batch 1; ms, median of {args.repeats} runs of {args.steps}")
    print("| model | path | step | check of 5 | start (20-token source) | first start, check (s) |\n|---|---|---|---|---|---|")
    for name, path, r in rows:
        print(f"| {name} | {path} | {r['step']:.2f} | {r['check5']:.2f} | {r['start']:.2f} | {r['first_s']:.1f} |")


if __name__ == "__main__":
    main()
