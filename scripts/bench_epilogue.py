"""Would a check's products be cheaper with their epilogues inside the product kernel? A measurement before any pass
changes. Two kernels: decode/kernels.py's skinny_product, then the compiled epilogue a pass runs on its partial sums
(their sum rounded to bf16, then the bias, the residual add or the gated activation; inductor's kernel after the
product, compiled here for the one shape, where a check's pass takes any length). One kernel: `skinny_settled` below,
where each program stores its run's partial sums and the last run of a block of columns to finish adds them in order
and applies the epilogue, as decode_attention combines its runs.

    python scripts/bench_epilogue.py [--shapes qwen2.5_0.5b qwen2.5_1.5b] [--rows 2 11]

For each weight of a Qwen2.5 layer a check multiplies by: q/k/v (+ bias), o (residual +), gate/up (act(gate) * up) and
down (residual +). Random bf16 weights; each way timed as a CUDA graph of launches over enough copies of the weight
that none is in the L2 cache when read again (bench_skinny.py's timing), the median of --repeats replays. The column
"equal" is the share of the fused kernel's outputs equal, bit for bit, to the two kernels'. Prints the table last.
The passes do not use skinny_settled: this script says whether they should.

In a compiled check the kernel after the o product also does the next norm (the sum, the residual add and the norm in
one), so fusing o's epilogue would save no kernel unless the norm moved too; after q/k/v, gate/up and down the kernel
does nothing else, so their fused forms would each save one. The last line adds up those three.
"""

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from decode import compact, kernels  # noqa: E402

EPILOGUES = {"bias": 0, "residual": 1, "gated": 2}

if kernels.triton is not None:
    import triton
    import triton.language as tl

    @triton.jit
    def _settle(acc, up, extra_ptr, out_ptr, here, keep, col, N, EPILOGUE: tl.constexpr):
        """The float32 product (and, gated, the up half's) rounded to out's dtype, then its epilogue, stored at here
        (offsets into out [M, N]) where keep."""
        dtype = out_ptr.dtype.element_ty
        y = acc.to(dtype).to(tl.float32)
        if EPILOGUE == 0:  # + bias [N]
            y = y + tl.load(extra_ptr + col, mask=col < N, other=0.0).to(tl.float32)[None, :]
        elif EPILOGUE == 1:  # residual [M, N] +
            y = tl.load(extra_ptr + here, mask=keep, other=0.0).to(tl.float32) + y
        else:  # silu(gate) * up, as inductor writes F.silu(gate) * up
            y = y * tl.sigmoid(y) * up.to(dtype).to(tl.float32)
        tl.store(out_ptr + here, y.to(dtype), mask=keep)

    @triton.jit
    def _skinny_settled(x_ptr, w_ptr, part_ptr, count_ptr, extra_ptr, out_ptr, M, N, K, chunk, runs, stride_xm,
                        stride_wn, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        EPILOGUE: tl.constexpr, IEEE: tl.constexpr):
        """Program (i, s): skinny_product's, over columns i * BLOCK_N onward of the output (gated: of gate's rows and of
        up's, N further on), then the last run of block i to finish sums the runs' partial sums in order (run 0 first)
        and settles them (_settle); with one run, the program itself."""
        block = tl.program_id(0)
        col = block * BLOCK_N + tl.arange(0, BLOCK_N)
        split = tl.program_id(1)
        m = tl.arange(0, ROWS)
        kk = tl.arange(0, BLOCK_K)
        acc = tl.zeros([ROWS, BLOCK_N], tl.float32)
        up = tl.zeros([ROWS, BLOCK_N], tl.float32)
        first = split * chunk
        for start in range(first, tl.minimum(first + chunk, K), BLOCK_K):
            at = start + kk
            xs = tl.load(x_ptr + m[:, None] * stride_xm + at[None, :], mask=(m[:, None] < M) & (at[None, :] < K),
                         other=0.0)
            w_mask = (col[:, None] < N) & (at[None, :] < K)
            ws = tl.load(w_ptr + col[:, None] * stride_wn + at[None, :], mask=w_mask, other=0.0)
            if IEEE:
                acc = tl.dot(xs, tl.trans(ws), acc, input_precision="ieee")
            else:
                acc = tl.dot(xs, tl.trans(ws), acc)
            if EPILOGUE == 2:
                ws = tl.load(w_ptr + (N + col[:, None]) * stride_wn + at[None, :], mask=w_mask, other=0.0)
                if IEEE:
                    up = tl.dot(xs, tl.trans(ws), up, input_precision="ieee")
                else:
                    up = tl.dot(xs, tl.trans(ws), up)
        keep = (m[:, None] < M) & (col[None, :] < N)
        here = m[:, None] * N + col[None, :]
        if runs == 1:
            _settle(acc, up, extra_ptr, out_ptr, here, keep, col, N, EPILOGUE)
        else:
            tl.store(part_ptr + split * M * N + here, acc, mask=keep)
            if EPILOGUE == 2:
                tl.store(part_ptr + (runs + split) * M * N + here, up, mask=keep)
            tl.debug_barrier()  # every thread's stores before the counter (which releases them)
            if tl.atomic_add(count_ptr + block, 1) == runs - 1:  # the last run to finish settles the block
                acc = tl.zeros([ROWS, BLOCK_N], tl.float32)
                up = tl.zeros([ROWS, BLOCK_N], tl.float32)
                for s in range(0, runs):
                    acc += tl.load(part_ptr + s * M * N + here, mask=keep, other=0.0, cache_modifier=".cg")
                    if EPILOGUE == 2:
                        up += tl.load(part_ptr + (runs + s) * M * N + here, mask=keep, other=0.0,
                                      cache_modifier=".cg")
                _settle(acc, up, extra_ptr, out_ptr, here, keep, col, N, EPILOGUE)
                tl.store(count_ptr + block, 0)


def skinny_settled(x: torch.Tensor, weight: torch.Tensor, epilogue: str, extra: torch.Tensor, config=None,
                   count: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] times weight [N', K] transposed, its float32 sum rounded to x's dtype, then: "bias", + extra [N];
    "residual", extra [M, N] +; "gated", weight's rows gate's then up's (N' = 2N), silu(gate) * up. The blocks and
    runs are skinny_product's for this weight (`config` replaces them; gated: half its block of rows from each half).
    `count`: the blocks' counters, zeros, left at 0 (default: the device's shared ones, decode.kernels.counters)."""
    m, k = x.shape
    rows = weight.shape[0]
    gated = epilogue == "gated"
    n = rows // 2 if gated else rows
    block_n, block_k, splits, warps, stages = config or kernels.skinny_config(rows, k, x.device)
    if gated:
        block_n //= 2
    chunk = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    runs = triton.cdiv(k, chunk)
    grid = (triton.cdiv(n, block_n), runs)
    parts = torch.empty((2 if gated else 1) * runs, m, n, dtype=torch.float32, device=x.device)
    if count is None:  # (shared: no kernel to clear them in a timed launch)
        count = kernels.counters(x.device)
    out = x.new_empty(m, n)
    _skinny_settled[grid](
        x, weight, parts, count, extra, out, m, n, k, chunk, runs, x.stride(0), weight.stride(0), ROWS=kernels.MAX_ROWS,
        BLOCK_N=block_n, BLOCK_K=block_k, EPILOGUE=EPILOGUES[epilogue], IEEE=x.dtype == torch.float32, num_warps=warps,
        num_stages=stages)
    return out


def settled_apart(parts: torch.Tensor, epilogue: str, extra: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What a pass computes from skinny_product's partial sums (decode.compact.linear, the layer's residual add and
    gated_activation), in a kernel of inductor's after the product when compiled."""
    y = parts.sum(0).to(dtype)
    if epilogue == "bias":
        return y + extra
    if epilogue == "residual":
        return extra + y
    gate, up = y.chunk(2, dim=-1)
    return F.silu(gate) * up


def products(shape: str) -> dict[str, tuple[int, int, str]]:
    """A layer's products a check runs: name -> (weight rows, columns, epilogue)."""
    from bench_skinny import weights

    w = weights(shape)
    return {"qkv": (*w["qkv"], "bias"), "o": (*w["o"], "residual"), "gate_up": (*w["gate_up"], "gated"),
            "down": (*w["down"], "residual")}


def extra_for(epilogue: str, m: int, n: int, dtype, device) -> torch.Tensor:
    n_out = n // 2 if epilogue == "gated" else n
    return torch.randn(n_out if epilogue == "bias" else (m, n_out), dtype=dtype, device=device)


def main():
    from bench_skinny import per_launch_us
    from bench_step import copy_bandwidth

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="*", default=["qwen2.5_0.5b", "qwen2.5_1.5b"])
    p.add_argument("--rows", nargs="*", type=int, default=[2, 11])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    kernels.counters(torch.device("cuda"))  # (reads the device's multiprocessors for skinny_config)
    bandwidth = copy_bandwidth(torch.device("cuda"))
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)

    def compiled_apart():  # as a check's pass compiles (a code object of its own per product: no recompile limit)
        return torch.compile(compact._own_code(lambda x, w, extra, epilogue: settled_apart(
            kernels.skinny_product(x, w), epilogue, extra, x.dtype)), dynamic=False,
            options=compact.inductor_options(False, False))

    table, totals = [], {}
    for shape in args.shapes:
        for name, (n, k, epilogue) in products(shape).items():
            size = n * k * 2
            copies = max(4, math.ceil(3 * l2 / size))
            ws = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") / k ** 0.5 for _ in range(copies)]
            cells = []
            for m in args.rows:
                apart = compiled_apart()
                x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
                extra = extra_for(epilogue, m, n, torch.bfloat16, "cuda")
                two = per_launch_us(lambda i: apart(x, ws[i], extra, epilogue), copies, args.repeats)
                one = per_launch_us(lambda i: skinny_settled(x, ws[i], epilogue, extra), copies, args.repeats)
                equal = (apart(x, ws[0], extra, epilogue) == skinny_settled(x, ws[0], epilogue, extra)).float().mean()
                cells.append(f"{two:.1f} / {one:.1f} ({equal.item():.3f})")
                if name != "o":
                    before = totals.get((shape, m), (0.0, 0.0))
                    totals[shape, m] = (before[0] + two, before[1] + one)
            table.append(f"| {shape} | {name} ({epilogue}) | {n}x{k} | {size / bandwidth * 1e6:.1f} | "
                         + " | ".join(cells) + " |")
            print(table[-1], flush=True)
            ws = None
            torch.cuda.empty_cache()
    print(f"\nus per product and its epilogue, two kernels / one (the share of outputs equal), by rows of x "
          f"({torch.cuda.get_device_name()}, bf16):\n")
    print("| shape | weight | n x k | floor us | " + " | ".join(f"{m} rows" for m in args.rows) + " |")
    print("|---|---|---|---|" + "---|" * len(args.rows))
    print("\n".join(table))
    print("\na layer's q/k/v, gate/up and down products, two kernels / one, us: "
          + "; ".join(f"{s} at {m} rows {a:.1f} / {b:.1f}" for (s, m), (a, b) in totals.items()))


if __name__ == "__main__":
    main()
