"""Whether a check's logits equal the steps' bit for bit, as the lossless mode needs: the uncompiled compact passes of
a bench_step shape (random weights) over a 20-token prompt, then 11 positions fed one per pass (steps) and all in one
pass (a check); once as the decoder runs them (steps 1 token wide, the check 11), once with both padded to 16 tokens.

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


def run(width_step, width_check):
    dec = passes.decoder()
    dec.allocate(128, 0, 1)
    with torch.inference_mode():
        # prompt
        dec.forward(seq[None, :P], torch.arange(P, device=args.device)[None])
        # steps: one token per pass at P..P+10 (padded with junk to width_step)
        steps = []
        for t in range(P, P + 11):
            ids = torch.cat([seq[t:t+1], torch.zeros(width_step - 1, dtype=torch.long, device=args.device)])
            logits = dec.forward(ids[None], torch.arange(t, t + width_step, device=args.device)[None])[0, 0].float()
            steps.append(logits)
        dec2 = passes.decoder()
        dec2.allocate(128, 0, 1)
        dec2.forward(seq[None, :P], torch.arange(P, device=args.device)[None])
        n = 11
        ids = torch.cat([seq[P:P+n], torch.zeros(width_check - n, dtype=torch.long, device=args.device)])
        check = dec2.forward(ids[None], torch.arange(P, P + width_check, device=args.device)[None])[0, :n].float()
    steps = torch.stack(steps)
    return torch.equal(steps, check), (steps - check).abs().max().item(), (steps.argmax(-1) == check.argmax(-1)).all().item()

print(f"{args.shape}, {args.dtype}, {args.device}: (logits equal, largest difference, same argmax everywhere)")
print("steps 1 token wide, the check 11:", run(1, 11))
print(f"both {W} wide:", run(W, W))
