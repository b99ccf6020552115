"""Whether a check's logits equal the steps' bit for bit, as the lossless mode needs: the uncompiled compact passes of
a bench_step shape (random weights) over a 20-token prompt (and source, for an encoder-decoder), then 11 positions fed
one per pass (steps) and all in one pass (a check); once as the decoder runs them (steps 1 token wide, the check 11),
once with both padded to 16 tokens.

    python scripts/check_width_rounding.py --shape qwen2.5_0.5b --dtype bfloat16 [--device cuda]
"""
import argparse
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
import torch  # noqa: E402
from bench_step import build  # noqa: E402

from decode.passes import model_passes  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--shape", default="qwen2.5_0.5b")
p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
p.add_argument("--device", default="cpu")
args = p.parse_args()
torch.set_num_threads(2)
model = build(args.shape, args.device, getattr(torch, args.dtype))
passes = model_passes(model, False)
W = 16
g = torch.Generator().manual_seed(0)
seq = torch.randint(3, 1000, (40,), generator=g).to(args.device)
P = 20  # prompt length; positions P..P+10 compared


def prefilled():
    """A decoder over the passes with the prompt fed."""
    dec = passes.decoder()
    dec.allocate(128, 32 if passes.is_encoder_decoder else 0, 1)
    if passes.is_encoder_decoder:  # a 20-token source (the decoder's own prompt too)
        dec.encode(seq[None, :32], torch.tensor([P], device=args.device))
    dec.forward(seq[None, :P], torch.arange(P, device=args.device)[None])
    return dec


def fed(dec, start: int, n: int, width: int) -> torch.Tensor:
    """Logits [n, V] of seq[start : start + n] fed in one pass of `width` tokens (the rest junk, as a padded check)."""
    ids = torch.cat([seq[start : start + n], torch.zeros(width - n, dtype=torch.long, device=args.device)])
    return dec.forward(ids[None], torch.arange(start, start + width, device=args.device)[None])[0, :n].float()


def run(width_step, width_check):
    """Positions P..P+10 as steps (one token per pass, `width_step` wide) and as one check (`width_check` wide)."""
    with torch.inference_mode():
        dec = prefilled()
        steps = torch.cat([fed(dec, t, 1, width_step) for t in range(P, P + 11)])
        check = fed(prefilled(), P, 11, width_check)
    return torch.equal(steps, check), (steps - check).abs().max().item(), (steps.argmax(-1) == check.argmax(-1)).all().item()


print(f"{args.shape}, {args.dtype}, {args.device}: (logits equal, largest difference, same argmax everywhere)")
print("steps 1 token wide, the check 11:", run(1, 11))
print(f"both {W} wide:", run(W, W))
