"""Checks the lossless invariant on many random tiny model pairs: BiLD with rollback="exact" equals the
large model's greedy `generate` token for token, for every architecture and several fallback thresholds.

    python scripts/check_lossless.py --pairs 200 [--fast-path [--batch N] | --early-exit]

--early-exit checks early-exit BiLD instead: one random 4-layer model per seed, exiting after layer 1, 2 or 3
(the seed picks), against that model's greedy `generate`. --fast-path checks decode/fast.py's compact passes instead of the eager path (without CUDA graphs on a CPU;
with them on CUDA, where --device cuda also moves the models there). GPT-2 has no fast path and is skipped then.
--batch N (with --fast-path): every pair decodes N ragged prompts together (decode/batch.py), and every row must
equal the large model's greedy `generate` on that prompt alone; rows are counted.
--device-loop on|off|auto: BiLDConfig.device_loop (the draft loop's state on the device; auto: in batches only).
--dtype bfloat16 (with --device cuda): the models in bf16; --reference greedy then compares with the large model
decoded by this project's own Greedy on the same path (the "identical to large" of decode.eval's report), since
transformers' generate rounds differently in bf16; --no-kernel keeps decode/kernels.py's attention kernel out of the
one-token step, --no-check-kernel keeps it out of the checks only (whether the kernel is what makes a check round
differently from the steps).
--pair LARGE SMALL (shapes of scripts/bench_step.py, e.g. demo_large demo_small): one pair of that size with random
weights instead of the tiny ones, --pairs prompts through it, --compile on the compiled passes (a stress test: random
weights make near-ties of most tokens).

Prints one row per architecture: pairs checked, mismatches, and how much of the output the small model wrote.
"""

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent.parent / "tests")]

import torch  # noqa: E402
from tiny_models import DECODER_ONLY, ENCODER_DECODER, MORE_DECODER_ONLY, hf_greedy, random_prompt, tiny_model, tiny_pair  # noqa: E402
from tqdm import tqdm  # noqa: E402

import decode.compact  # noqa: E402
from decode import BiLD, BiLDConfig, EarlyExitBiLD, Greedy  # noqa: E402


def pad(prompts: list[torch.Tensor], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A padded batch and its attention mask (left padding for decoder-only models, as generate expects)."""
    width = max(len(p) for p in prompts)
    ids, mask = torch.zeros(len(prompts), width, dtype=torch.long), torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        cols = slice(width - len(p), width) if left else slice(0, len(p))
        ids[i, cols], mask[i, cols] = p, 1
    return ids, mask


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--archs", nargs="*", default=list(ENCODER_DECODER + DECODER_ONLY + MORE_DECODER_ONLY))
    parser.add_argument("--fast-path", action="store_true", help="check the fast path (decode/fast.py)")
    parser.add_argument("--early-exit", action="store_true", help="check early-exit BiLD (decode/early_exit.py)")
    parser.add_argument("--batch", type=int, default=1, help="with --fast-path: rows decoded together per pair")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--device-loop", choices=("auto", "on", "off"), default="auto",
                        help="BiLDConfig.device_loop: auto (in batches only), on, off")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--reference", choices=("generate", "greedy"), default="generate",
                        help="the large model's greedy output from transformers' generate, or from decode.Greedy")
    parser.add_argument("--no-kernel", action="store_true", help="the one-token step without the attention kernel")
    parser.add_argument("--no-check-kernel", action="store_true",
                        help="checks attend without the kernel (decode.compact.CHECK_KERNEL off; on by default)")
    parser.add_argument("--pair", nargs=2, metavar=("LARGE", "SMALL"), help="one random pair of bench_step shapes")
    parser.add_argument("--compile", action="store_true",
                        help="the compiled passes (without it, uncompiled on CUDA too); slow on tiny pairs, meant for --pair")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    decode.compact.DECODE_KERNEL = not args.no_kernel
    decode.compact.CHECK_KERNEL = not args.no_check_kernel
    if args.batch > 1 and not args.fast_path:
        parser.error("--batch needs --fast-path (batches are decoded together on the fast path only)")
    if args.fast_path or args.early_exit:
        args.archs = [a for a in args.archs if a != "gpt2"]
    torch.set_num_threads(1)
    rows = []
    if args.pair:
        from bench_step import build

        args.archs, args.fast_path = ["+".join(args.pair)], True
        pair = tuple(build(name, args.device, dtype) for name in args.pair)
    for arch in args.archs:
        bad, small_share, checked = 0, [], 0
        for seed in tqdm(range(args.pairs), desc=arch):
            if args.pair:
                large, small = pair
            elif args.early_exit:
                large = tiny_model(arch, 1000 + seed, width=32, layers=4).to(args.device, dtype)
            else:
                large, small = (m.to(args.device, dtype) for m in tiny_pair(arch, 1000 + seed))
            threshold = (0.0, 0.3, 0.6, 0.9)[seed % 4]
            cap = (None, 10, 4)[seed % 3]
            cfg = BiLDConfig(rollback="exact", fallback_threshold=threshold, max_small_steps=cap,
                             fast_path=True if args.fast_path else False, compile=args.compile,
                             device_loop={"auto": None, "on": True, "off": False}[args.device_loop])
            bild = EarlyExitBiLD(large, 1 + seed % 3, cfg) if args.early_exit else BiLD(large, small, cfg)
            if args.reference == "greedy":
                greedy = Greedy(large, fast_path=cfg.fast_path, compile=args.compile)

                def reference(prompt):  # one row: laid out as generate's, no padding
                    return greedy.generate(prompt, max_new_tokens=args.max_new_tokens).sequences
            else:
                def reference(prompt):
                    return hf_greedy(large, prompt, max_new_tokens=args.max_new_tokens)
            if args.batch > 1:
                prompts = [random_prompt(1000 + seed * args.batch + i, length=3 + (seed + 3 * i) % 8)[0]
                           for i in range(args.batch)]
                ids, mask = pad(prompts, left=not large.config.is_encoder_decoder)
                out = bild.generate(ids.to(args.device), mask.to(args.device), max_new_tokens=args.max_new_tokens)
                for i, prompt in enumerate(prompts):
                    ref = reference(prompt[None].to(args.device))[0].cpu()
                    row = out.sequences[i] if large.config.is_encoder_decoder else out.sequences[i, ids.shape[1] - len(prompt) :]
                    checked += 1
                    bad += int(row[: len(ref)].tolist() != ref.tolist() or bool((row[len(ref) :] != bild.pad_token_id).any()))
            else:
                ids = random_prompt(1000 + seed, length=3 + seed % 8).to(args.device)
                ref = reference(ids)
                out = bild.generate(ids, max_new_tokens=args.max_new_tokens)
                checked += 1
                bad += int(not torch.equal(out.sequences, ref.cpu()))
            small_share.append(out.stats.small_tokens / max(out.stats.new_tokens, 1))
        rows.append((arch, checked, bad, sum(small_share) / len(small_share)))
    print(f"\n{'arch':8} {'rows' if args.batch > 1 else 'pairs':>6} {'mismatches':>11} {'small-model share':>18}")
    for arch, checked, bad, share in rows:
        print(f"{arch:8} {checked:6d} {bad:11d} {share:18.2f}")
    sys.exit(1 if any(r[2] for r in rows) else 0)


if __name__ == "__main__":
    main()
