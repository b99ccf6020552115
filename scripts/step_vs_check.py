"""Where a check's rows stop having the steps' bits: a model's decoder states, layer by layer, for n tokens fed one at a
time (the decode step) against the same n tokens fed at the same positions as one pass (a check). In bf16 the
lossless mode equals the large model's own greedy output only where the two agree wherever it matters; this says at
which layer they first part and whether it reaches an argmax.

    python scripts/step_vs_check.py --model runs/full/large/final --device cuda --dtype bfloat16 [--compile]
    python scripts/step_vs_check.py --shape demo_large --device cuda --dtype bfloat16 --compile   # random weights

For each of --prompts random inputs (a source for encoder-decoder models, a prompt for decoder-only ones, --length
tokens): the steps decode --tokens tokens greedily from the decoder's start (or the prompt's last token), recording
each layer's output; then the same tokens go through as one pass at the same positions. Runs the project's compact
passes (decode/passes.py), compiled with --compile, without CUDA graphs (a graph replays the same kernels). Prints a
table per layer: the tokens whose states differ from the steps' there, the tokens whose states first differ there,
the largest difference; then the logits and argmaxes that differ.
"""

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
from decode.passes import model_passes  # noqa: E402


def layers_of(dec, ids, pos):
    """Feeds ids at pos ([1, n]) through the decoder: each layer's output [1, n, d] in order, then the logits."""
    h = dec.embed(ids, pos)
    states = []
    for i in range(dec.n_layers):
        h = dec.run_layers(h, pos, i, i + 1)
        states.append(h.clone())
    return states, dec.head(h).clone()


@torch.inference_mode()
def compare(model, prompts: int, length: int, tokens: int, compile: bool, seed: int = 0) -> dict:
    device = next(model.parameters()).device
    passes = model_passes(model, compile=compile)
    enc_dec = model.config.is_encoder_decoder
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    n_layers = passes.n_layers
    differ, first, largest = [0] * n_layers, [0] * n_layers, [0.0] * n_layers
    logits_differ = argmax_differ = total = 0
    for _ in range(prompts):
        prompt = torch.randint(3, vocab, (1, length), generator=gen).to(device)
        dec = passes.decoder()
        dec.allocate(length + tokens + 2, length if enc_dec else 0)
        if enc_dec:
            dec.encode(prompt, torch.tensor([length], device=device))
            token, start = model.config.decoder_start_token_id, 0
        else:
            dec.feed(prompt[:, :-1], torch.arange(length - 1, device=device)[None])
            token, start = int(prompt[0, -1]), length - 1
        fed, step_states, step_logits = [], [], []
        for i in range(tokens):  # the steps, greedy from their own logits
            fed.append(token)
            states, logits = layers_of(dec, torch.tensor([[token]], device=device),
                                       torch.tensor([[start + i]], device=device))
            step_states.append(states)
            step_logits.append(logits)
            token = int(logits[0, -1].argmax())
        ids = torch.tensor([fed], device=device)
        pos = torch.arange(start, start + tokens, device=device)[None]
        states, logits = layers_of(dec, ids, pos)  # the check over the same tokens and positions
        for t in range(tokens):
            total += 1
            seen = False
            for i in range(n_layers):
                a, b = step_states[t][i][0, -1], states[i][0, t]
                if not torch.equal(a, b):
                    differ[i] += 1
                    largest[i] = max(largest[i], (a.float() - b.float()).abs().max().item())
                    if not seen:
                        first[i] += 1
                        seen = True
            a, b = step_logits[t][0, -1], logits[0, t]
            logits_differ += not torch.equal(a, b)
            argmax_differ += int(a.argmax()) != int(b.argmax())
    return dict(tokens=total, differ=differ, first=first, largest=largest, logits_differ=logits_differ,
                argmax_differ=argmax_differ)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a model folder or Hub name")
    src.add_argument("--shape", help="a shape of scripts/bench_step.py, random weights")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="bfloat16")
    p.add_argument("--compile", action="store_true", help="the compiled passes")
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--length", type=int, default=12, help="tokens of each random source or prompt")
    p.add_argument("--tokens", type=int, default=10, help="tokens stepped, then checked as one pass")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.model:
        from decode.loading import load_model

        model = load_model(args.model, device=args.device, dtype=dtype)
    else:
        from bench_step import build

        model = build(args.shape, args.device, dtype)
    r = compare(model, args.prompts, args.length, args.tokens, args.compile)
    print(f"\n{args.model or args.shape}, {args.dtype} on {args.device}{', compiled' if args.compile else ''}: "
          f"{r['tokens']} tokens ({args.prompts} prompts x {args.tokens}), a check's states against the steps'\n")
    print("| layer | tokens whose output differs | tokens that first differ here | largest difference |")
    print("|---|---|---|---|")
    for i in range(len(r["differ"])):
        print(f"| {i} | {r['differ'][i]} | {r['first'][i]} | {r['largest'][i]:.3g} |")
    print(f"\nlogits differ for {r['logits_differ']} of {r['tokens']} tokens; the argmax for {r['argmax_differ']}")


if __name__ == "__main__":
    main()
