"""The attention kernel per query head (decode/kernels.py's default) against one program per key/value head for its
group's query heads (kernels.GROUPED), one layer's attention at a Qwen2.5 shape's heads, after prompts of --contexts
tokens: a one-token step (which writes its key and value) and a check of --check tokens (whose keys are in the cache).

    python scripts/bench_attention.py [--shapes qwen2.5_0.5b qwen2.5_7b] [--contexts 300 4000] [--check 11]

Random bf16 caches and queries, the rotary in the kernel. Each call timed as a CUDA graph of launches over enough copies
of the cache that none is in the L2 cache when read again (bench_skinny.py's timing), the median of --repeats replays.
Before timing, each way's outputs are compared: the grouped kernel against the per-head one (the largest difference
relative to the largest output), and each way's check against its steps token by token (equal bit for bit). Prints the
table last.
"""

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from decode import compact, kernels  # noqa: E402


def heads_of(shape: str) -> tuple[int, int, int]:
    """(query heads, key/value heads, head size) of a bench_step shape."""
    from bench_step import SHAPES

    spec = SHAPES[shape][0]
    h = spec["num_attention_heads"]
    return h, spec.get("num_key_value_heads", h), spec.get("head_dim") or spec["hidden_size"] // h


def main():
    from bench_skinny import per_launch_us

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="*", default=["qwen2.5_0.5b", "qwen2.5_7b"])
    p.add_argument("--contexts", nargs="*", type=int, default=[300, 4000])
    p.add_argument("--check", type=int, default=11)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    kernels.counters(dev)
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    name = torch.cuda.get_device_name()
    bf16, n = torch.bfloat16, args.check
    table = []
    for shape in args.shapes:
        h, h_kv, d = heads_of(shape)
        scale = d ** -0.5
        for ctx in args.contexts:
            cap = ctx + n + 1
            size = 2 * h_kv * cap * d * 2
            copies = max(4, math.ceil(3 * l2 / size))
            caches = [tuple(torch.randn(1, h_kv, cap, d, dtype=bf16, device=dev) for _ in range(2))
                      for _ in range(copies)]
            cos, sin = (torch.randn(cap, d, dtype=bf16, device=dev) for _ in range(2))
            q1 = torch.randn(1, h, 1, d, dtype=bf16, device=dev)
            k1, v1 = (torch.randn(1, h_kv, 1, d, dtype=bf16, device=dev) for _ in range(2))
            pos1 = torch.tensor([[ctx]], device=dev)
            qn = compact.heads(torch.randn(1, n, h * d, dtype=bf16, device=dev), h)
            posn = ctx + torch.arange(n, device=dev)[None]
            cells, outs = [], {}
            first = tuple(t.clone() for t in caches[0])  # (the timed steps write their key and value into the copies)
            for grouped in (False, True):
                kernels.GROUPED = grouped
                kc, vc = (t.clone() for t in first)
                check = kernels.attention_over_cache(qn, kc, vc, posn, scale, None, cos, sin)
                steps = torch.cat([kernels.decode_attention(qn[:, :, i : i + 1], kc, vc, posn[:, i : i + 1], scale,
                                                            None, None, None, cos, sin) for i in range(n)], dim=1)
                outs[grouped] = check
                step_us = per_launch_us(lambda i: kernels.decode_attention(
                    q1, *caches[i], pos1, scale, None, k1, v1, cos, sin), copies, args.repeats)
                check_us = per_launch_us(lambda i: kernels.attention_over_cache(
                    qn, *caches[i], posn, scale, None, cos, sin), copies, args.repeats)
                cells += [f"{step_us:.1f}", f"{check_us:.1f}", str(torch.equal(check, steps))]
            diff = ((outs[True].float() - outs[False].float()).abs().max() / outs[False].float().abs().max()).item()
            row = f"| {shape} | {h}/{h_kv}x{d} | {ctx} | " + " | ".join(cells) + f" | {diff:.1e} |"
            table.append(row)
            print(row, flush=True)
            caches = None
            torch.cuda.empty_cache()
    kernels.GROUPED = False
    print(f"\none layer's attention, us ({name}, bf16, rotary in the kernel): a one-token step and a check of {n} "
          "tokens, per query head / grouped; whether each way's check equals its steps bit for bit; the largest "
          "difference between the two ways' checks relative to the largest output:\n")
    print("| shape | heads / kv x size | context | step, per head | check | check = steps | step, grouped | check | "
          "check = steps | difference |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(table))


if __name__ == "__main__":
    main()
