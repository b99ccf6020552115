"""decode/kernels.py's product kernel at the real shapes' products, against cuBLAS (F.linear) and the bytes floor,
over a sweep of its settings; and whether each row of a 10-row product has the bits of that row alone.

    python scripts/bench_product.py [--shapes qwen2.5_0.5b qwen2.5_1.5b qwen2.5_7b demo_large] [--sweep]

One CUDA device, bf16, random weights; each time is the median of 5 replays of a CUDA graph of 20 launches (ms per
product). floor = the weight's bytes over the copy bandwidth measured here. Prints a markdown table last.
"""

import argparse
import itertools
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from decode import kernels  # noqa: E402

# (d, intermediate, q/k/v outputs, vocab) per shape; the products a decoder layer runs and the head
SHAPES = {"qwen2.5_0.5b": (896, 4864, 1152, 151936), "qwen2.5_1.5b": (1536, 8960, 2048, 151936),
          "qwen2.5_7b": (3584, 18944, 4608, 152064), "demo_large": (512, 2048, 1536, 10000)}


def products(shape):
    d, inter, qkv, vocab = SHAPES[shape]
    return [("qkv+norm", qkv, d, dict(norm=True, bias=True)), ("o+residual", d, d, dict(residual=True)),
            ("gate_up+norm", 2 * inter, d, dict(norm=True)), ("down+silu+residual", d, inter, dict(gated=True, residual=True)),
            ("head+norm", vocab, d, dict(norm=True))]


def timed(fn, reps=20, repeats=5):
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def copy_bandwidth():
    a = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = timed(lambda: b.copy_(a), reps=5)
    return 2 * a.numel() / (ms / 1e3)


def run(args):
    bw = copy_bandwidth()
    rows = []
    for shape in args.shapes:
        for name, n, k, flags in products(shape):
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
            width = 2 * k if flags.get("gated") else k
            x = torch.randn(1, 10, width, device="cuda", dtype=torch.bfloat16)
            nw = torch.randn(k, device="cuda", dtype=torch.bfloat16) if flags.get("norm") else None
            b = torch.randn(n, device="cuda", dtype=torch.bfloat16) if flags.get("bias") else None
            r = torch.randn(1, 10, n, device="cuda", dtype=torch.bfloat16) if flags.get("residual") else None

            def prod(m):
                return kernels.product(x[:, :m], w, b, nw, 1e-6, flags.get("gated", False),
                                       None if r is None else r[:, :m])

            whole = prod(10)
            alone = all(torch.equal(whole[:, i : i + 1], prod(1)[:, :1] if i == 0 else
                                    kernels.product(x[:, i : i + 1], w, b, nw, 1e-6, flags.get("gated", False),
                                                    None if r is None else r[:, i : i + 1])) for i in range(10))
            xin = x[..., :k]
            row = dict(shape=shape, product=name, n=n, k=k, floor=n * k * 2 / bw * 1e3, alone=alone,
                       cublas1=timed(lambda: F.linear(xin[:, :1], w)), cublas10=timed(lambda: F.linear(xin, w)),
                       kernel1=timed(lambda: prod(1)), kernel10=timed(lambda: prod(10)))
            if args.sweep:
                best = None
                saved = (kernels.PRODUCT_BLOCK_N, kernels.PRODUCT_BLOCK_K, kernels.PRODUCT_PROGRAMS_PER_SM,
                         kernels.PRODUCT_STAGES)
                for bn, bk, per_sm, stages in itertools.product((16, 32, 64), (64, 128, 256), (1, 2, 4), (3, 4)):
                    (kernels.PRODUCT_BLOCK_N, kernels.PRODUCT_BLOCK_K, kernels.PRODUCT_PROGRAMS_PER_SM,
                     kernels.PRODUCT_STAGES) = bn, bk, per_sm, stages
                    try:
                        t = timed(lambda: prod(1), repeats=3)
                    except Exception as err:  # noqa: BLE001 - a setting Triton cannot compile: skipped
                        print(f"  {shape} {name} {bn}/{bk}/{per_sm}/{stages}: {type(err).__name__}", flush=True)
                        continue
                    if best is None or t < best[0]:
                        best = (t, f"{bn}/{bk}/{per_sm}/{stages}")
                (kernels.PRODUCT_BLOCK_N, kernels.PRODUCT_BLOCK_K, kernels.PRODUCT_PROGRAMS_PER_SM,
                 kernels.PRODUCT_STAGES) = saved
                row["best"], row["best_config"] = best
            rows.append(row)
            print(row, flush=True)
    print(f"\ncopy bandwidth {bw / 1e12:.2f} TB/s; ms per product, 1 and 10 rows; settings block_n/block_k/"
          "programs per SM/stages\n")
    print("| shape | product | N x K | floor | cuBLAS 1 | cuBLAS 10 | kernel 1 | kernel 10 | rows alone = rows in 10 |"
          + (" best 1-row (settings) |" if args.sweep else ""))
    print("|---" * (9 + bool(args.sweep)) + "|")
    for r in rows:
        print(f"| {r['shape']} | {r['product']} | {r['n']} x {r['k']} | {r['floor']:.4f} | {r['cublas1']:.4f} | "
              f"{r['cublas10']:.4f} | {r['kernel1']:.4f} | {r['kernel10']:.4f} | {r['alone']} |"
              + (f" {r['best']:.4f} ({r['best_config']}) |" if args.sweep else ""))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--sweep", action="store_true", help="time the 1-row product over a sweep of the kernel's settings")
    run(p.parse_args())
