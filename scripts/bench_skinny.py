"""A check's products, one weight at a time: decode/kernels.py's skinny_product against cuBLAS (torch's F.linear), for
each weight of a model shape (q/k/v fused, o, gate/up fused, down, the LM head), against the bytes floor.

    python scripts/bench_skinny.py [--shapes qwen2.5_0.5b qwen2.5_1.5b qwen2.5_7b] [--rows 1 4 11 16] [--sweep]

Random bf16 weights, x of --rows rows (11: a check of 10 pending tokens). Each product is timed as a CUDA graph of
launches over enough copies of the weight that none is still in the L2 cache when it is read again (as in a pass,
where every layer reads its own weights), the median of --repeats replays per launch. The floor: the weight's bytes
over the copy bandwidth measured here. skinny: kernels.skinny_config's blocks (what the passes run); --sweep also
times every block size, split and pipeline depth of SWEEP at 11 rows and reports the fastest of at most
kernels.max_splits() runs (the data skinny_config's choice is made from), and the fastest of any. skinny_product leaves
float32 partial sums that the passes add inside the kernel that reads the product (not timed here): with more runs
than max_splits() that sum is a kernel of its own in a pass, which a product timed alone does not show (BENCHMARKS.md).
Prints the table last (markdown).
"""

import argparse
import itertools
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench_step import SHAPES, copy_bandwidth  # noqa: E402
from decode import kernels  # noqa: E402

SWEEP = dict(block_n=(16, 32, 64, 128), block_k=(64, 128, 256), splits=(1, 2, 3, 4, 6, 8, 12, 16, 24),
             warps_stages=((4, 3), (4, 4), (8, 3)))


def weights(name: str) -> dict[str, tuple[int, int]]:
    spec, vocab = SHAPES[name]
    d, f, h = spec["hidden_size"], spec["intermediate_size"], spec["num_attention_heads"]
    kv = spec.get("num_key_value_heads", h)
    hd = spec.get("head_dim") or d // h
    return {"qkv": ((h + 2 * kv) * hd, d), "o": (d, h * hd), "gate_up": (2 * f, d), "down": (d, f), "head": (vocab, d)}


def per_launch_us(launch, copies: int, repeats: int) -> float:
    """Median microseconds per launch of a CUDA graph of `copies` launches (launch(i) reads copy i)."""
    for i in range(copies):  # compiles, and warms the allocator
        launch(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            launch(i)
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / copies)
    return statistics.median(times)


def configs(n: int, k: int):
    seen = set()
    for block_n, block_k, splits, (warps, stages) in itertools.product(*SWEEP.values()):
        chunk = math.ceil(math.ceil(k / splits) / block_k) * block_k
        real = math.ceil(k / chunk)
        if (block_n, block_k, real, warps, stages) in seen or block_n * block_k * stages * 2 > 160_000:
            continue
        seen.add((block_n, block_k, real, warps, stages))
        yield block_n, block_k, real, warps, stages


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    decoder_only = [name for name, (spec, _) in SHAPES.items() if isinstance(spec, dict) and "intermediate_size" in spec]
    p.add_argument("--shapes", nargs="*", default=["qwen2.5_0.5b", "qwen2.5_1.5b", "qwen2.5_7b"], choices=decoder_only)
    p.add_argument("--rows", nargs="*", type=int, default=[1, 4, 11, 16])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sweep", action="store_true", help="time every configuration of SWEEP at 11 rows")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    torch.manual_seed(0)
    kernels.counters(torch.device("cuda"))  # (reads the device's multiprocessors for skinny_config)
    bandwidth = copy_bandwidth(torch.device("cuda"))  # (bench_step's: the floor as it measures it)
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e12:.2f} TB/s, L2 {l2 >> 20} MiB", flush=True)
    rows, table = [], []
    for shape in args.shapes:
        for name, (n, k) in weights(shape).items():
            size = n * k * 2
            copies = max(4, math.ceil(3 * l2 / size))
            ws = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") / k ** 0.5 for _ in range(copies)]
            floor = size / bandwidth * 1e6
            row = dict(shape=shape, weight=name, n=n, k=k, mib=size / 2**20, floor_us=floor,
                       config=kernels.skinny_config(n, k), rows={})
            for m in args.rows:
                x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
                cublas = per_launch_us(lambda i: F.linear(x, ws[i]), copies, args.repeats)
                skinny = per_launch_us(lambda i: kernels.skinny_product(x, ws[i]), copies, args.repeats)
                row["rows"][m] = dict(cublas_us=cublas, skinny_us=skinny)
            if args.sweep:
                x = torch.randn(11, k, dtype=torch.bfloat16, device="cuda")
                timed = []
                for config in configs(n, k):
                    try:
                        timed.append((per_launch_us(lambda i: kernels.skinny_product(x, ws[i], config), copies,
                                                    args.repeats), config))
                    except Exception as err:  # noqa: BLE001 - a configuration past the shared memory: skipped
                        print(f"  {config}: {type(err).__name__}", flush=True)
                timed.sort()
                row["sweep"] = timed
            rows.append(row)
            if args.sweep:
                kept = [(t, c) for t, c in row["sweep"] if c[2] <= kernels.max_splits()]
                best = f"{kept[0][0]:.1f} {kept[0][1]} (any runs: {row['sweep'][0][0]:.1f} {row['sweep'][0][1]})"
            else:
                best = ""
            table.append(f"| {shape} | {name} | {n}x{k} | {row['mib']:.1f} | {floor:.1f} | "
                         + " | ".join(f"{r['cublas_us']:.1f} / {r['skinny_us']:.1f}" for r in row["rows"].values())
                         + f" | {row['config']} | {best} |")
            print(table[-1], flush=True)
            if args.sweep:
                listed = ", ".join(f"{t:.1f} {c}" for t, c in kept[:6])
                print(f"  fastest of at most {kernels.max_splits()} runs: {listed}", flush=True)
            ws = None  # (freed before the next weight's copies)
            torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), bandwidth=bandwidth,
                                                   rows=rows), indent=1))
    print(f"\nus per product, cuBLAS / skinny_product, by rows of x ({torch.cuda.get_device_name()}, bf16):\n")
    print("| shape | weight | n x k | MiB | floor us | " + " | ".join(f"{m} rows" for m in args.rows)
          + f" | skinny config | fastest of sweep, at most {kernels.max_splits()} runs (11 rows) |")
    print("|---|---|---|---|---|" + "---|" * len(args.rows) + "---|---|")
    print("\n".join(table))


if __name__ == "__main__":
    main()
