"""Where a training update's time goes (collate, forward, backward, optimizer), device synchronised.

    python scripts/profile_train_step.py --config configs/multi30k_large.yaml tokenizer=... dataset=...
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from align.config import TrainConfig  # noqa: E402
from align.models import build_model  # noqa: E402
from align.pairs import Collator, build_pairs  # noqa: E402
from align.train import compute_loss  # noqa: E402
from data.config import load_config  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--sdp", default="default", choices=["default", "no_cudnn", "math_eager"])
    p.add_argument("--pad-multiple", type=int, default=1)
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args()
    cfg: TrainConfig = load_config(TrainConfig, args.config, args.overrides)
    tok = AutoTokenizer.from_pretrained(cfg.tokenizer)
    if args.sdp == "no_cudnn":
        torch.backends.cuda.enable_cudnn_sdp(False)
    model = build_model(cfg, tok)
    if args.sdp == "math_eager":
        model.config._attn_implementation = "eager"
        model.set_attn_implementation("eager")
    model = model.cuda().train()
    pairs = build_pairs(cfg, tok, "train")[: cfg.batch_size * (args.iters + 2)]
    collate = Collator(tok.pad_token_id, True, args.pad_multiple)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    t = {"collate": [], "to_device": [], "forward": [], "backward": [], "optimizer": []}
    for i in range(args.iters + 2):
        s = time.perf_counter()
        batch = collate(pairs[i * cfg.batch_size : (i + 1) * cfg.batch_size])
        t1 = time.perf_counter()
        batch = {k: v.cuda() for k, v in batch.items()}
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, *_ = compute_loss(model, batch, cfg)
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        loss.backward()
        torch.cuda.synchronize()
        t4 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        torch.cuda.synchronize()
        t5 = time.perf_counter()
        if i >= 2:
            for k, a, b in (("collate", s, t1), ("to_device", t1, t2), ("forward", t2, t3), ("backward", t3, t4), ("optimizer", t4, t5)):
                t[k].append(1000 * (b - a))
    print(f"{cfg.output_dir}: batch {cfg.batch_size} sdp {args.sdp} pad {args.pad_multiple}, median ms: " + ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in t.items()))


if __name__ == "__main__":
    main()
