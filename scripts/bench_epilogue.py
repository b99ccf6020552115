"""Would a check's layer be cheaper as one kernel per product, each with its norm and its epilogue inside? A measurement
before any pass changes.

Today, a compiled check of a Qwen2-style layer runs its products as decode/kernels.py's skinny_product (the weight's
columns split into runs, float32 partial sums) and around them inductor's kernels: the sum of the partial sums with the
epilogue (the bias, the residual add, silu(gate) * up) and the norms (RMSNorm's sum of squares, written out as the next
product's input): nine kernels a layer besides the attention. `skinny_fused` below is one kernel per product, four a
layer: each program multiplies a block of the weight's rows by every row of x over all its columns (no runs to add
up), where a norm comes first it takes the rows' sum of squares from x itself (each program reads all of x, which is
a few kB), and it ends with the epilogue. (An earlier form kept the runs and had the last one of each block to finish
add them up, as decode_attention combines its runs; on an H100 it was no faster than the two kernels: BENCHMARKS.md.)

    python scripts/bench_epilogue.py [--shapes qwen2.5_0.5b qwen2.5_1.5b qwen2.5_7b] [--rows 11] [--repeats 5]

First, per product of a layer (q/k/v with its norm and bias; o, then the residual add; gate/up with its norm, then
silu(gate) * up; down, then the residual add), skinny_fused over every block size and pipeline depth of SWEEP at
--rows' last count of rows, against skinny_product alone (the product without anything around it). Then the whole
layer's products (o reading q's part of q/k/v in place of the attention's output): compiled as a check's pass compiles
them today, against the four skinny_fused kernels at each product's fastest blocks, at each count of --rows, and the
share of the layer's outputs (q/k/v and the new residual) equal bit for bit. Random bf16 weights; each way timed as a
CUDA graph of launches over enough copies of the weights that none is in the L2 cache when read again (bench_skinny.py's
timing), the median of --repeats replays. Prints the tables last. On an H100 (BENCHMARKS.md, 2026-12-08) the four
kernels were slower than today's at every Qwen2.5 shape (a 0.5B layer's products 31.5 us against 29.9, 7B 180.8
against 178.4): without runs, a product over few columns has too few programs to read its weight at speed. The passes
do not use skinny_fused.
"""

import argparse
import itertools
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from decode import compact, kernels  # noqa: E402

EPS = 1e-6
SWEEP = dict(block_n=(16, 32, 64), block_k=(128, 256), warps_stages=((4, 3), (4, 5), (8, 4)))

if kernels.triton is not None:
    import triton
    import triton.language as tl

    @triton.jit
    def _skinny_fused(x_ptr, w_ptr, out_ptr, bias_ptr, res_ptr, nw_ptr, M, N, K, eps, stride_xm, stride_wn,
                      stride_rm, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      NORM: tl.constexpr, BIAS: tl.constexpr, RESIDUAL: tl.constexpr, GATED: tl.constexpr,
                      IEEE: tl.constexpr):
        """Program i: output columns i * BLOCK_N onward, for every row of x (up to ROWS), summed over all K columns of
        the weight. NORM: x's rows RMSNormed first, as compact.rms_norm computes it (the factor from each row's sum of
        squares, the normed row rounded to x's dtype, then times the norm's weight nw, rounded again). The float32 sum
        rounded to out's dtype, then: BIAS, + bias[N]; RESIDUAL, res[M, N] +; GATED (the weight's rows gate's, then
        up's, N further on), silu(gate) * up, as inductor writes F.silu(gate) * up."""
        dtype = out_ptr.dtype.element_ty
        col = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m = tl.arange(0, ROWS)
        kk = tl.arange(0, BLOCK_K)
        rows = m[:, None] < M
        factor = tl.zeros([ROWS], tl.float32)
        if NORM:
            squares = tl.zeros([ROWS, BLOCK_K], tl.float32)
            for start in range(0, K, BLOCK_K):
                at = start + kk
                xs = tl.load(x_ptr + m[:, None] * stride_xm + at[None, :], mask=rows & (at[None, :] < K), other=0.0)
                xs = xs.to(tl.float32)
                squares += xs * xs
            factor = tl.rsqrt(tl.sum(squares, 1) / K + eps)
        acc = tl.zeros([ROWS, BLOCK_N], tl.float32)
        up = tl.zeros([ROWS, BLOCK_N], tl.float32)
        for start in range(0, K, BLOCK_K):
            at = start + kk
            xs = tl.load(x_ptr + m[:, None] * stride_xm + at[None, :], mask=rows & (at[None, :] < K), other=0.0)
            if NORM:
                normed = (xs.to(tl.float32) * factor[:, None]).to(dtype).to(tl.float32)
                nw = tl.load(nw_ptr + at, mask=at < K, other=0.0).to(tl.float32)
                xs = (nw[None, :] * normed).to(dtype)
            w_mask = (col[:, None] < N) & (at[None, :] < K)
            ws = tl.load(w_ptr + col[:, None] * stride_wn + at[None, :], mask=w_mask, other=0.0)
            if IEEE:  # float32 inputs: float32 products (tensor cores would round them to tf32)
                acc = tl.dot(xs, tl.trans(ws), acc, input_precision="ieee")
            else:
                acc = tl.dot(xs, tl.trans(ws), acc)
            if GATED:
                ws = tl.load(w_ptr + (N + col[:, None]) * stride_wn + at[None, :], mask=w_mask, other=0.0)
                if IEEE:
                    up = tl.dot(xs, tl.trans(ws), up, input_precision="ieee")
                else:
                    up = tl.dot(xs, tl.trans(ws), up)
        keep = rows & (col[None, :] < N)
        y = acc.to(dtype).to(tl.float32)
        if BIAS:
            y = y + tl.load(bias_ptr + col, mask=col < N, other=0.0).to(tl.float32)[None, :]
        if RESIDUAL:
            y = tl.load(res_ptr + m[:, None] * stride_rm + col[None, :], mask=keep, other=0.0).to(tl.float32) + y
        if GATED:
            y = y * tl.sigmoid(y) * up.to(dtype).to(tl.float32)
        tl.store(out_ptr + m[:, None] * N + col[None, :], y.to(dtype), mask=keep)


def skinny_fused(x: torch.Tensor, weight: torch.Tensor, config: tuple, norm: torch.Tensor | None = None,
                 eps: float = EPS, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                 gated: bool = False) -> torch.Tensor:
    """x [M, K] (rows with their last dimension contiguous) times weight [N', K] transposed, in one kernel: norm, the
    RMSNorm's weight [K], normalizes x's rows first; then + bias [N'], or residual [M, N'] +, or (gated: weight's rows
    gate's then up's, N' = 2N) silu(gate) * up. config: (BLOCK_N, BLOCK_K, warps, stages). Returns [M, N] in x's
    dtype."""
    m, k = x.shape
    n = weight.shape[0] // 2 if gated else weight.shape[0]
    if m > kernels.MAX_ROWS:
        raise ValueError(f"skinny_fused takes up to {kernels.MAX_ROWS} rows, not {m}")
    block_n, block_k, warps, stages = config
    out = x.new_empty(m, n)
    _skinny_fused[(triton.cdiv(n, block_n),)](
        x, weight, out, x if bias is None else bias, x if residual is None else residual, x if norm is None else norm,
        m, n, k, eps, x.stride(0), weight.stride(0), 0 if residual is None else residual.stride(0),
        ROWS=kernels.MAX_ROWS, BLOCK_N=block_n, BLOCK_K=block_k, NORM=norm is not None, BIAS=bias is not None,
        RESIDUAL=residual is not None, GATED=gated, IEEE=x.dtype == torch.float32, num_warps=warps, num_stages=stages)
    return out


# a layer's products, by their weights' names in bench_skinny.weights: what skinny_fused does around each
PRODUCTS = {"qkv": dict(norm=True, bias=True), "o": dict(residual=True), "gate_up": dict(norm=True, gated=True),
            "down": dict(residual=True)}


def product_extras(how: dict, m: int, rows: int, k: int, dtype, device) -> dict:
    """Random inputs of what is around a product (PRODUCTS' `how`) of x [m, k] by a weight of `rows` rows, as
    skinny_fused and product_apart take them: the norm's weight, the bias, the residual, whether it is gated."""
    gated = how.get("gated", False)
    return dict(norm=1 + 0.1 * torch.randn(k, dtype=dtype, device=device) if how.get("norm") else None,
                bias=torch.randn(rows, dtype=dtype, device=device) if how.get("bias") else None,
                residual=(torch.randn(m, rows // 2 if gated else rows, dtype=dtype, device=device)
                          if how.get("residual") else None),
                gated=gated)


def product_apart(x, weight, norm=None, bias=None, residual=None, gated=False, eps=EPS):
    """What a pass computes for one product and what is around it (compact.rms_norm, compact.linear, the residual
    add, compact.gated_activation's silu(gate) * up), x [M, K]."""
    if norm is not None:
        x = compact.rms_norm(x, norm, eps)
    y = compact.linear(x[None], weight)[0]
    if bias is not None:
        y = y + bias
    if residual is not None:
        y = residual + y
    if gated:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    return y


def layer_weights(shape: str, dtype, device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of one Qwen2-style layer of a bench_step shape: the norms', q/k/v's (with its bias), o's,
    gate/up's and down's."""
    from bench_skinny import weights

    w = weights(shape)
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*size, scale=1.0):
        return (torch.randn(*size, generator=g) * scale).to(dtype=dtype, device=device)

    d = w["o"][0]
    return dict(ln1=1 + rand(d, scale=0.1), qkv=rand(*w["qkv"], scale=w["qkv"][1] ** -0.5),
                qkv_b=rand(w["qkv"][0], scale=0.1), o=rand(*w["o"], scale=w["o"][1] ** -0.5),
                ln2=1 + rand(d, scale=0.1), gate_up=rand(*w["gate_up"], scale=w["gate_up"][1] ** -0.5),
                down=rand(*w["down"], scale=w["down"][1] ** -0.5))


def layer_apart(h, w):
    """A check layer's products as a pass writes them (o reads q's part of q/k/v in place of the attention's output;
    h [1, n, d]): compiled, what this script measures as today's."""
    d = h.shape[-1]
    qkv = compact.norm_linear(h, compact.rms_norm, w["ln1"], EPS, w["qkv"], w["qkv_b"])
    h = h + compact.linear(qkv[..., :d], w["o"])
    x = compact.gated_activation(h, compact.rms_norm, w["ln2"], EPS, w["gate_up"], None, F.silu)
    h = h + compact.linear(x, w["down"])
    return qkv, h


def layer_fused(h, w, configs):
    """The same as four skinny_fused kernels (h [n, d]); configs: each product's blocks."""
    d = h.shape[-1]
    qkv = skinny_fused(h, w["qkv"], configs["qkv"], norm=w["ln1"], bias=w["qkv_b"])
    h = skinny_fused(qkv[:, :d], w["o"], configs["o"], residual=h)
    x = skinny_fused(h, w["gate_up"], configs["gate_up"], norm=w["ln2"], gated=True)
    h = skinny_fused(x, w["down"], configs["down"], residual=h)
    return qkv, h


def sweep_configs(gated: bool):
    """SWEEP's blocks that fit in shared memory (the pipelined tiles of x and of the weight, twice for gated)."""
    for block_n, block_k, (warps, stages) in itertools.product(*SWEEP.values()):
        if ((2 if gated else 1) * block_n + kernels.MAX_ROWS) * block_k * 2 * stages <= 200_000:
            yield block_n, block_k, warps, stages


def main():
    from bench_skinny import per_launch_us, weights
    from bench_step import copy_bandwidth

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="*", default=["qwen2.5_0.5b", "qwen2.5_1.5b", "qwen2.5_7b"])
    p.add_argument("--rows", nargs="*", type=int, default=[11])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    device = torch.device("cuda")
    kernels.counters(device)  # (reads the device's multiprocessors for skinny_config)
    bandwidth = copy_bandwidth(device)
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    name = torch.cuda.get_device_name()
    print(f"{name}: copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    bf16 = torch.bfloat16
    m = args.rows[-1]
    per_product, per_layer = [], []
    for shape in args.shapes:
        best = {}
        for product, how in PRODUCTS.items():
            n, k = weights(shape)[product]
            copies = max(4, math.ceil(3 * l2 / (n * k * 2)))
            ws = [torch.randn(n, k, dtype=bf16, device=device) / k ** 0.5 for _ in range(copies)]
            x = torch.randn(m, k, dtype=bf16, device=device)
            extra = product_extras(how, m, n, k, bf16, device)
            alone = per_launch_us(lambda i: kernels.skinny_product(x, ws[i]), copies, args.repeats)
            timed = {}
            for config in sweep_configs(extra["gated"]):
                try:
                    timed[config] = per_launch_us(lambda i: skinny_fused(x, ws[i], config, **extra), copies,
                                                  args.repeats)
                except Exception as e:  # (a block too large for this device: its compiler says so)
                    print(f"{shape} {product} {config}: {type(e).__name__}: {str(e)[:120]}", flush=True)
            best[product] = min(timed, key=timed.get)
            row = (f"| {shape} | {product} | {n}x{k} | {n * k * 2 / bandwidth * 1e6:.1f} | {alone:.1f} | "
                   f"{timed[best[product]]:.1f} {best[product]} | {max(timed.values()):.1f} |")
            per_product.append(row)
            print(row, flush=True)
            ws = None
            torch.cuda.empty_cache()
        w0 = layer_weights(shape, bf16, device)
        size = sum(t.numel() * t.element_size() for t in w0.values())
        copies = max(4, math.ceil(3 * l2 / size))
        layers = [w0] + [layer_weights(shape, bf16, device, seed) for seed in range(1, copies)]
        for rows in args.rows:
            h = torch.randn(1, rows, w0["o"].shape[0], dtype=bf16, device=device)
            apart = torch.compile(compact._own_code(layer_apart), dynamic=False,
                                  options=compact.inductor_options(False, False))
            today = per_launch_us(lambda i: apart(h, layers[i]), copies, args.repeats)
            fused = per_launch_us(lambda i: layer_fused(h[0], layers[i], best), copies, args.repeats)
            (q1, h1), (q2, h2) = apart(h, w0), layer_fused(h[0], w0, best)
            equal = torch.cat([(q1[0] == q2).flatten(), (h1[0] == h2).flatten()]).float().mean().item()
            err = max(((a[0].float() - b.float()).abs() / (1 + a[0].float().abs())).max().item()
                      for a, b in ((q1, q2), (h1, h2)))
            row = (f"| {shape} | {rows} | {size / bandwidth * 1e6:.1f} | {today:.1f} | {fused:.1f} | {equal:.3f} | "
                   f"{err:.1e} |")
            per_layer.append(row)
            print(row, flush=True)
        layers = None
        torch.cuda.empty_cache()
    print(f"\neach product at {m} rows, us ({name}, bf16): skinny_product alone; skinny_fused with its norm and "
          "epilogue, at its fastest blocks (BLOCK_N, BLOCK_K, warps, stages), and at its slowest:\n")
    print("| shape | product | n x k | floor us | skinny_product | skinny_fused (fastest) | skinny_fused (slowest) |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(per_product))
    print(f"\na layer's products with their norms and epilogues, us ({name}, bf16): compiled as a check's pass "
          "compiles them today, against four skinny_fused kernels; the share of outputs equal bit for bit, and the "
          "largest difference relative to 1 + |output|:\n")
    print("| shape | rows | floor us | today | skinny_fused | equal | largest difference |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(per_layer))


if __name__ == "__main__":
    main()
