"""Hand-written Triton kernels for the passes on CUDA: attention over the live part of a KV cache (the one-token decode
step's, and a check's), and a check's products.

    out = decode_attention(q, k_cache, v_cache, last, scale, window, k, v)          # q [B, H, 1, D] -> [B, 1, H * D]
    out = attention_over_cache(q, k_cache, v_cache, last, scale, window)            # q [B, H, n, D] -> [B, n, H * D]
    parts = skinny_product(x, weight)                                               # x [M <= 16, K] -> fp32 [S, M, N]

One kernel rotates q and k by their position where given the rotary tables (decode.compact.KERNEL_ROTARY), writes
the token's key and value into the cache at its position (self-attention; cross-attention writes nothing) and
attends over the slots that position sees (every earlier one, or the last `window` of them), with an online softmax
in float32. It replaces what inductor makes of the same arithmetic: the cache writes, a score reduction, the
softmax's statistics and the weighted sum, up to five kernels over every slot of the cache, masked (BENCHMARKS.md
measures both). SPLITS programs per (row, query head, query token), each over its own run of the slots the token
sees, at least MIN_CHUNK of them (flash-decoding): up to MIN_CHUNK slots one program reads them all and writes the
output; past it, each writes its partial softmax sums and the last to finish (a counter per token, which it sets back
to 0) combines them in a fixed order. The runs are a function of the position alone, so a token's output does not
depend on which pass computes it. The query heads of a group read their key/value head where it lies: each of them in
a program of its own, or with GROUPED all of them in one program (_grouped_attention), which reads each block of the
cache once for the group.
`attention_over_cache` runs the same program for each of n query tokens (a check of several tokens), over a cache
that already holds their keys and values (`write_keys` wrote them, rotated by the same code as the one-token step
rotates its token's, in a kernel of its own). Each query's output is what the one-token step computes for it, bit for
bit, given the same inputs.

`skinny_product` multiplies a few rows (a check's tokens) by a weight, read once for all of them: each program takes
64 of the weight's rows over one run of its columns, times a 16-row block of x on the tensor cores, and stores its
float32 sums; the caller adds the runs (decode.compact.linear, inside the kernel that reads the product). A row's
sums do not depend on the other rows.

Without Triton (a CPU build of torch) `available()` is False and the passes keep their own arithmetic.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU build of torch ships without Triton
    triton = None

# Slots one loop iteration reads; the kernel's programs and warps.
BLOCK = 64
WARPS = 4
MAX_QUERIES = 16  # query tokens attention_over_cache takes (longer ones, prompts, take SDPA's tiled kernels)
# Programs per query token, each over a run of at least MIN_CHUNK slots (a multiple of BLOCK). One program over a
# head's whole cache left most of a GPU idle at long contexts. Measured on an H100 (BENCHMARKS.md) after a 4,000-token
# prompt, compiled graph-only step / check of 10, one program per token -> split: Qwen2.5-0.5B 3.981 / 4.063 ->
# 1.142 / 2.174 ms, 7B 11.215 / 11.210 -> 6.087 / 10.242 (batched products over the cache: 1.324 / 3.636 and
# 5.945 / 10.214). Under MIN_CHUNK slots nothing changes but the idle programs: the graph-only step the same at a
# 20-token prompt, a check of 10 3-5% slower (0.5B 1.158 -> 1.220, 7B 5.859 -> 6.049).
SPLITS = 16
MIN_CHUNK = 256
# Whether decode_attention and attention_over_cache run _grouped_attention: one program per key/value head (and query
# token and run) for all the query heads of its group, which read each block of the cache once, where _decode_attention
# runs one program per query head, each reading the cache of its group's head again (a check of 11 tokens at a group of
# 7 heads reads each slot 77 times). Not measured on a GPU yet; BILD_GROUPED_KERNEL=1 in the environment turns it on.
GROUPED = os.environ.get("BILD_GROUPED_KERNEL", "0") == "1"
_COUNTERS: dict[int, torch.Tensor] = {}  # per CUDA device: one counter per split token, 0 between kernels
# skinny_product: rows of x one program multiplies (a check's tokens), and programs per multiprocessor it aims for.
# skinny_config's choice is from the sweep (scripts/bench_skinny.py --sweep, 11 rows, on an H100, BENCHMARKS.md), its
# runs at most max_splits(): at every weight of the Qwen2.5 0.5B, 1.5B and 7B shapes its blocks (where its split was not
# swept, the nearest split that was) took at most 0.4 us (7%) more than the fastest swept, which split the 0.5B q/k/v,
# o and down into 14-16 runs.
MAX_ROWS = 16
SKINNY_PROGRAMS = 3
_MULTIPROCESSORS: dict[int, int] = {}  # per CUDA device (read where a pass is traced: set with its counters)


def available() -> bool:
    return triton is not None


def supports(head_dim: int, softcap: float | None) -> bool:
    """Whether the kernel computes this attention: head sizes that are powers of two (every covered family's but
    Phi-3-small's), no soft-capping (Gemma 2's eager attention keeps its own path)."""
    return available() and softcap is None and head_dim >= 16 and head_dim & (head_dim - 1) == 0


if triton is not None:

    @triton.jit
    def _rotated(ptr, d, cos_ptr, sin_ptr, pos, stride_r, mask, ROT: tl.constexpr):
        """The vector at ptr + d rotated over its first ROT dimensions by row `pos` of the rotary tables (x * cos +
        rotate_half(x) * sin, in float32, rounded to x's dtype as the passes' own rotary leaves it); as it is
        without them (ROT 0). Where `mask` is off, 0."""
        x = tl.load(ptr + d, mask=mask, other=0.0)
        if ROT > 0:
            half: tl.constexpr = ROT // 2
            turned = (d < ROT) & mask
            partner = tl.load(ptr + tl.where(d < half, d + half, d - half), mask=turned, other=0.0).to(tl.float32)
            cos = tl.load(cos_ptr + pos * stride_r + d, mask=turned, other=1.0).to(tl.float32)
            sin = tl.load(sin_ptr + pos * stride_r + d, mask=turned, other=0.0).to(tl.float32)
            x = (x.to(tl.float32) * cos + tl.where(d < half, -partner, partner) * sin).to(x.dtype)
        return x

    @triton.jit
    def _decode_attention(q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, out_ptr, pos_ptr, cos_ptr, sin_ptr, part_ptr,
                          stats_ptr, count_ptr, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                          stride_vb, stride_vh, stride_vn, stride_cb, stride_ch, stride_cs, stride_ob, stride_oh,
                          stride_on, stride_pb, stride_pn, stride_r, scale, window, min_chunk, GROUP: tl.constexpr,
                          D: tl.constexpr, BLOCK: tl.constexpr, HAS_WINDOW: tl.constexpr, WRITE: tl.constexpr,
                          ROT: tl.constexpr, ATTEND: tl.constexpr, SPLITS: tl.constexpr):
        row = tl.program_id(0)
        head = tl.program_id(1)
        query = tl.program_id(2) // SPLITS  # 0 for one token
        split = tl.program_id(2) % SPLITS
        kv_head = head // GROUP
        pos = tl.load(pos_ptr + row * stride_pb + query * stride_pn)
        d = tl.arange(0, D)
        cache = row * stride_cb + kv_head * stride_ch
        lo = 0
        if HAS_WINDOW:
            lo = tl.maximum(pos - window + 1, 0)
        # this program's run of the slots lo..pos: SPLITS runs of at least min_chunk slots, the last one shorter
        chunk = tl.maximum(min_chunk, tl.cdiv(tl.cdiv(pos + 1 - lo, SPLITS), BLOCK) * BLOCK)
        runs = tl.cdiv(pos + 1 - lo, chunk)
        first = lo + split * chunk
        whole = d < D  # (every dimension: the one-vector loads' mask)
        new_k = k_ptr + row * stride_kb + kv_head * stride_kh
        new_v = v_ptr + row * stride_vb + kv_head * stride_vh
        if WRITE and split == runs - 1:  # the run that reads the token's own slot writes it
            # the token's key and value into the cache (the group's programs write the same numbers), made visible
            # to every thread of this program before the loop reads them back
            k_new = _rotated(new_k + query * stride_kn, d, cos_ptr, sin_ptr, pos, stride_r, whole, ROT)
            v_new = tl.load(new_v + query * stride_vn + d)
            tl.store(kc_ptr + cache + pos * stride_cs + d, k_new)
            tl.store(vc_ptr + cache + pos * stride_cs + d, v_new)
            tl.debug_barrier()

        if ATTEND and split < runs:  # (ATTEND False: only the writes, of several tokens: write_keys)
            q = _rotated(q_ptr + row * stride_qb + head * stride_qh + query * stride_qn, d, cos_ptr, sin_ptr, pos,
                         stride_r, whole, ROT).to(tl.float32)
            m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), 0)
            total = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
            acc = tl.zeros([D], tl.float32)
            for start in range(first, tl.minimum(first + chunk, pos + 1), BLOCK):
                slots = start + tl.arange(0, BLOCK)
                live = slots <= pos
                offsets = cache + slots[:, None] * stride_cs + d[None, :]
                k = tl.load(kc_ptr + offsets, mask=live[:, None], other=0.0).to(tl.float32)
                v = tl.load(vc_ptr + offsets, mask=live[:, None], other=0.0).to(tl.float32)
                scores = (tl.sum(q[None, :] * k, 1) * scale).to(tl.float32)  # inductor passes the scale as fp64
                scores = tl.where(live, scores, float("-inf"))
                m_new = tl.maximum(m, tl.max(scores, 0))
                p = tl.exp(scores - m_new)
                alpha = tl.exp(m - m_new)
                total = total * alpha + tl.sum(p, 0)
                acc = acc * alpha + tl.sum(p[:, None] * v, 0)
                m = m_new
            out_at = out_ptr + row * stride_ob + head * stride_oh + query * stride_on + d
            if runs == 1:
                tl.store(out_at, (acc / total).to(out_ptr.dtype.element_ty))
            else:
                token = (row * tl.num_programs(1) + head) * (tl.num_programs(2) // SPLITS) + query
                tl.store(part_ptr + (token * SPLITS + split) * D + d, acc)
                tl.store(stats_ptr + (token * SPLITS + split) * 2, m)
                tl.store(stats_ptr + (token * SPLITS + split) * 2 + 1, total)
                tl.debug_barrier()  # every thread's stores before the counter (which releases them)
                if tl.atomic_add(count_ptr + token, 1) == runs - 1:  # the last run to finish combines
                    s = tl.arange(0, SPLITS)
                    done = s < runs
                    at = token * SPLITS + s
                    ms = tl.load(stats_ptr + at * 2, mask=done, other=float("-inf"), cache_modifier=".cg")
                    totals = tl.load(stats_ptr + at * 2 + 1, mask=done, other=0.0, cache_modifier=".cg")
                    parts = tl.load(part_ptr + at[:, None] * D + d[None, :], mask=done[:, None], other=0.0,
                                    cache_modifier=".cg")
                    weight = tl.exp(ms - tl.max(ms, 0))
                    out = tl.sum(parts * weight[:, None], 0) / tl.sum(totals * weight, 0)
                    tl.store(out_at, out.to(out_ptr.dtype.element_ty))
                    tl.store(count_ptr + token, 0)


    @triton.jit
    def _grouped_attention(q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, out_ptr, pos_ptr, cos_ptr, sin_ptr, part_ptr,
                           stats_ptr, count_ptr, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                           stride_vb, stride_vh, stride_vn, stride_cb, stride_ch, stride_cs, stride_ob, stride_oh,
                           stride_on, stride_pb, stride_pn, stride_r, scale, window, min_chunk, GROUP: tl.constexpr,
                           GP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, HAS_WINDOW: tl.constexpr,
                           WRITE: tl.constexpr, ROT: tl.constexpr, SPLITS: tl.constexpr):
        """_decode_attention's arithmetic for the GROUP query heads of key/value head program_id(1) at once (GP, a
        power of two, rows of them): each block of the cache is read once for the group. Runs, writes and the
        combining of runs as there, the runs' partial sums and statistics kept per query head."""
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        query = tl.program_id(2) // SPLITS  # 0 for one token
        split = tl.program_id(2) % SPLITS
        pos = tl.load(pos_ptr + row * stride_pb + query * stride_pn)
        d = tl.arange(0, D)
        g = tl.arange(0, GP)
        heads = kv_head * GROUP + g
        cache = row * stride_cb + kv_head * stride_ch
        lo = 0
        if HAS_WINDOW:
            lo = tl.maximum(pos - window + 1, 0)
        chunk = tl.maximum(min_chunk, tl.cdiv(tl.cdiv(pos + 1 - lo, SPLITS), BLOCK) * BLOCK)
        runs = tl.cdiv(pos + 1 - lo, chunk)
        first = lo + split * chunk
        if WRITE and split == runs - 1:  # the run that reads the token's own slot writes it (the group's one program)
            whole = d < D
            k_new = _rotated(k_ptr + row * stride_kb + kv_head * stride_kh + query * stride_kn, d, cos_ptr, sin_ptr,
                             pos, stride_r, whole, ROT)
            v_new = tl.load(v_ptr + row * stride_vb + kv_head * stride_vh + query * stride_vn + d)
            tl.store(kc_ptr + cache + pos * stride_cs + d, k_new)
            tl.store(vc_ptr + cache + pos * stride_cs + d, v_new)
            tl.debug_barrier()

        if split < runs:
            d2 = d[None, :] + 0 * g[:, None]  # [GP, D]: each row's dimensions
            rows = (g[:, None] < GROUP) & (d2 < D)
            q = _rotated(q_ptr + row * stride_qb + heads[:, None] * stride_qh + query * stride_qn, d2, cos_ptr,
                         sin_ptr, pos, stride_r, rows, ROT).to(tl.float32)
            m = tl.full([GP], float("-inf"), tl.float32)
            total = tl.zeros([GP], tl.float32)
            acc = tl.zeros([GP, D], tl.float32)
            for start in range(first, tl.minimum(first + chunk, pos + 1), BLOCK):
                slots = start + tl.arange(0, BLOCK)
                live = slots <= pos
                offsets = cache + slots[:, None] * stride_cs + d[None, :]
                k = tl.load(kc_ptr + offsets, mask=live[:, None], other=0.0).to(tl.float32)
                v = tl.load(vc_ptr + offsets, mask=live[:, None], other=0.0).to(tl.float32)
                scores = (tl.sum(q[:, None, :] * k[None, :, :], 2) * scale).to(tl.float32)  # [GP, BLOCK]
                scores = tl.where(live[None, :], scores, float("-inf"))
                m_new = tl.maximum(m, tl.max(scores, 1))
                p = tl.exp(scores - m_new[:, None])
                alpha = tl.exp(m - m_new)
                total = total * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], 1)
                m = m_new
            out_at = out_ptr + row * stride_ob + heads[:, None] * stride_oh + query * stride_on + d2
            if runs == 1:
                tl.store(out_at, (acc / total[:, None]).to(out_ptr.dtype.element_ty), mask=rows)
            else:
                token = (row * tl.num_programs(1) + kv_head) * (tl.num_programs(2) // SPLITS) + query
                at = (token * SPLITS + split) * GP + g
                tl.store(part_ptr + at[:, None] * D + d2, acc)
                tl.store(stats_ptr + at * 2, m)
                tl.store(stats_ptr + at * 2 + 1, total)
                tl.debug_barrier()  # every thread's stores before the counter (which releases them)
                if tl.atomic_add(count_ptr + token, 1) == runs - 1:  # the last run to finish combines, in order
                    top = tl.full([GP], float("-inf"), tl.float32)
                    for s in range(0, runs):
                        top = tl.maximum(top, tl.load(stats_ptr + ((token * SPLITS + s) * GP + g) * 2,
                                                      cache_modifier=".cg"))
                    num = tl.zeros([GP, D], tl.float32)
                    den = tl.zeros([GP], tl.float32)
                    for s in range(0, runs):
                        at = (token * SPLITS + s) * GP + g
                        weight = tl.exp(tl.load(stats_ptr + at * 2, cache_modifier=".cg") - top)
                        num += tl.load(part_ptr + at[:, None] * D + d2, cache_modifier=".cg") * weight[:, None]
                        den += tl.load(stats_ptr + at * 2 + 1, cache_modifier=".cg") * weight
                    tl.store(out_at, (num / den[:, None]).to(out_ptr.dtype.element_ty), mask=rows)
                    tl.store(count_ptr + token, 0)

    @triton.jit
    def _skinny_product(x_ptr, w_ptr, out_ptr, M, N, K, chunk, stride_xm, stride_wn, ROWS: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
        """Program (i, s): rows i * BLOCK_N onward of the weight over run s of `chunk` of its columns, times every row
        of x at once (up to ROWS: one block of a tensor-core product), the float32 sums stored at out[s]."""
        col = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        split = tl.program_id(1)
        m = tl.arange(0, ROWS)
        kk = tl.arange(0, BLOCK_K)
        acc = tl.zeros([ROWS, BLOCK_N], tl.float32)
        first = split * chunk
        for start in range(first, tl.minimum(first + chunk, K), BLOCK_K):
            at = start + kk
            xs = tl.load(x_ptr + m[:, None] * stride_xm + at[None, :], mask=(m[:, None] < M) & (at[None, :] < K),
                         other=0.0)
            ws = tl.load(w_ptr + col[:, None] * stride_wn + at[None, :], mask=(col[:, None] < N) & (at[None, :] < K),
                         other=0.0)
            if IEEE:  # float32 inputs: float32 products (tensor cores would round them to tf32)
                acc = tl.dot(xs, tl.trans(ws), acc, input_precision="ieee")
            else:
                acc = tl.dot(xs, tl.trans(ws), acc)
        tl.store(out_ptr + (split * M + m[:, None]) * N + col[None, :], acc, mask=(m[:, None] < M) & (col[None, :] < N))


def skinny_config(n: int, k: int, device: torch.device | None = None) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_K, splits, warps, stages) of skinny_product for a weight [n, k]: where its rows, 64 a program,
    make at most half of SKINNY_PROGRAMS programs per multiprocessor, its columns split into runs (splits) for
    SKINNY_PROGRAMS per multiprocessor, but into no more runs than inductor adds up inside the kernel that reads them
    (max_splits()), blocks of 64 rows by 64 columns (128 where a run is over 512), four in flight; else blocks of
    64 x 128, three in flight, one run."""
    index = 0 if device is None or device.index is None else device.index
    sms = _MULTIPROCESSORS.get(index, 132)  # (an H100's, off CUDA: the interpreter's tests)
    splits = min(triton.cdiv(k, 64), SKINNY_PROGRAMS * sms // triton.cdiv(n, 64), max_splits())
    if splits < 2:
        return 64, 128, 1, 4, 3
    block_k = 128 if k > 512 * splits else 64
    chunk = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    return 64, block_k, triton.cdiv(k, chunk), 4, 4


def max_splits() -> int:
    """The most runs skinny_product splits a weight's columns into: the longest sum inductor writes out inside the
    kernel that reads it (a check's partial sums: with the residual add and the next norm, the bias, the activation),
    one less than its unroll_reductions_threshold. A longer sum is a reduction kernel of its own: at Qwen2.5-0.5B's
    width, runs of 14 for q/k/v and o made two such kernels a layer (BENCHMARKS.md). BILD_SKINNY_MAX_SPLITS in the
    environment replaces it (to measure)."""
    from torch._inductor import config

    value = os.environ.get("BILD_SKINNY_MAX_SPLITS", "")
    if value and not (value.isdigit() and int(value) > 0):
        raise ValueError(f"BILD_SKINNY_MAX_SPLITS={value!r}: set it to a whole number of runs, 1 or more, or leave "
                         "it unset (inductor's unroll_reductions_threshold less one)")
    return int(value) if value else max(1, config.unroll_reductions_threshold - 1)


def skinny_product(x: torch.Tensor, weight: torch.Tensor, config: tuple | None = None,
                   kernel=None) -> torch.Tensor:
    """x [M, K] (M at most MAX_ROWS, rows contiguous) times weight [N, K] (rows contiguous), transposed: float32
    partial sums [S, M, N] over S runs of K, whose sum is the product (the caller sums them; in a compiled pass, inside
    the kernel that reads the product). The weight is read once for all of x's rows, and each row's sums do not depend
    on the others. `config` (skinny_config's tuple) replaces the measured one; `kernel` as in decode_attention."""
    m, k = x.shape
    n = weight.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"skinny_product takes up to {MAX_ROWS} rows, not {m}")
    block_n, block_k, splits, warps, stages = config or skinny_config(n, k, x.device)
    chunk = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    out = torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
    (kernel or _skinny_product)[(triton.cdiv(n, block_n), splits)](
        x, weight, out, m, n, k, chunk, x.stride(0), weight.stride(0), ROWS=MAX_ROWS, BLOCK_N=block_n, BLOCK_K=block_k,
        IEEE=x.dtype == torch.float32, num_warps=warps, num_stages=stages)
    return out


def decode_attention(q, k_cache, v_cache, last, scale: float, window: int | None = None, k=None, v=None,
                     cos=None, sin=None, kernel=None):
    """q: [B, H, 1, D]; k_cache, v_cache: [B, H_kv, capacity, D]; last: [B, 1], the last slot each row sees (its
    position; for cross-attention the source length - 1). k, v ([B, H_kv, 1, D]), where given, are written at `last`
    first. cos, sin ([capacity, D_rot]), where given, rotate q and k first by their row `last` (rotary positions over
    the first D_rot dimensions). Attends over slots last - window < j <= last; returns [B, 1, H * D] in q's dtype.
    `kernel` replaces the compiled kernel (the tests pass Triton's interpreter of it)."""
    b, h, _, d = q.shape
    write = k is not None
    q3, k3, v3 = (_rows(t[:, :, 0]) for t in (q, k, v)) if write else (_rows(q[:, :, 0]), k_cache[:, :, 0], v_cache[:, :, 0])
    cos, sin, rot, stride_r = _tables(cos, sin, q3)
    out = q.new_empty(b, 1, h * d)
    o3 = out.view(b, h, d)
    if GROUPED and kernel is None:
        _grouped(q, k_cache, 1, (q3, k3, v3, k_cache, v_cache, o3, last, cos, sin),
                 (q3.stride(0), q3.stride(1), 0, k3.stride(0), k3.stride(1), 0, v3.stride(0), v3.stride(1), 0,
                  k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), o3.stride(0), o3.stride(1), 0,
                  last.stride(0), 0, stride_r, scale, window or 0, MIN_CHUNK),
                 HAS_WINDOW=window is not None, WRITE=write, ROT=rot)
        return out
    (kernel or _decode_attention)[(b, h, SPLITS)](
        q3, k3, v3, k_cache, v_cache, o3, last, cos, sin, *_scratch(q, b * h),
        q3.stride(0), q3.stride(1), 0, k3.stride(0), k3.stride(1), 0, v3.stride(0), v3.stride(1), 0,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), o3.stride(0), o3.stride(1), 0, last.stride(0), 0,
        stride_r, scale, window or 0, MIN_CHUNK, GROUP=h // k_cache.shape[1], D=d, BLOCK=BLOCK,
        HAS_WINDOW=window is not None, WRITE=write, ROT=rot, ATTEND=True, SPLITS=SPLITS,
        num_warps=WARPS)
    return out


def _grouped(q, k_cache, n: int, before: tuple, after: tuple, **meta) -> None:
    """Launches _grouped_attention (GROUPED) for n query tokens of q [B, H, n, D] over k_cache [B, H_kv, capacity, D]:
    decode_attention's or attention_over_cache's arguments before the scratch buffers and after them, one program per
    row, key/value head, token and run."""
    b, h, d = q.shape[0], q.shape[1], q.shape[-1]
    h_kv = k_cache.shape[1]
    rows = triton.next_power_of_2(h // h_kv)
    _grouped_attention[(b, h_kv, n * SPLITS)](
        *before, *_scratch(q, b * h_kv * n, rows), *after, GROUP=h // h_kv, GP=rows, D=d, BLOCK=grouped_block(rows, d),
        SPLITS=SPLITS, num_warps=WARPS, **meta)


def grouped_block(rows: int, d: int) -> int:
    """The slots _grouped_attention reads per loop iteration for `rows` query heads of size d: its scores and weighted
    values are [rows, slots, d] products summed over one axis, held in registers (at most 8,192 terms, as BLOCK's 64
    slots of a 128-wide head), and its runs are multiples of it (MIN_CHUNK is)."""
    return max(8, min(BLOCK, 8192 // (rows * d)))


def write_keys(k, v, k_cache, v_cache, pos, cos, sin, kernel=None) -> None:
    """Writes n tokens' keys and values (k, v: [B, H_kv, n, D]) into the caches at their positions pos ([B, n]), the
    keys rotated by their positions as decode_attention rotates the one token's (cos, sin: [capacity, D_rot]): the
    same code, so a check's keys are the steps' bit for bit. `kernel` as in decode_attention."""
    b, h_kv, n, d = k.shape
    k, v = _rows(k), _rows(v)
    (kernel or _decode_attention)[(b, h_kv, n)](
        k, k, v, k_cache, v_cache, k_cache, pos, cos, sin, k, k, pos,  # (the query, output, scratch: untouched)
        0, 0, 0, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), 0, 0, 0, pos.stride(0), pos.stride(1),
        cos.stride(0), 1.0, 0, MIN_CHUNK, GROUP=1, D=d, BLOCK=BLOCK, HAS_WINDOW=False, WRITE=True,
        ROT=cos.shape[-1], ATTEND=False, SPLITS=1, num_warps=WARPS)


def attention_over_cache(q, k_cache, v_cache, last, scale: float, window: int | None = None, cos=None, sin=None,
                         kernel=None):
    """q: [B, H, n, D], n at most MAX_QUERIES; last: [B, n], the last slot each query sees (its position), or [B, 1]
    for every query alike (cross-attention: the source length - 1). Attends over slots last - window < j <= last of
    k_cache, v_cache ([B, H_kv, capacity, D]), each query as decode_attention attends for one token, q rotated first
    where given cos, sin (by last, its position); returns [B, n, H * D] in q's dtype. The caches already hold the
    queries' own keys and values (write_keys). `kernel` as in decode_attention."""
    b, h, n, d = q.shape
    q = _rows(q)
    out = q.new_empty(b, n, h * d)
    o4 = out.view(b, n, h, d)
    cos, sin, rot, stride_r = _tables(cos, sin, q)
    if GROUPED and kernel is None:
        _grouped(q, k_cache, n, (q, q, q, k_cache, v_cache, o4, last, cos, sin),  # (q for the new keys: unread)
                 (*(q.stride()[:3] * 3), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), o4.stride(0),
                  o4.stride(2), o4.stride(1), last.stride(0), last.stride(1) if last.shape[1] > 1 else 0, stride_r,
                  scale, window or 0, MIN_CHUNK),
                 HAS_WINDOW=window is not None, WRITE=False, ROT=rot)
        return out
    (kernel or _decode_attention)[(b, h, n * SPLITS)](
        q, q, q, k_cache, v_cache, o4, last, cos, sin, *_scratch(q, b * h * n),  # (q in place of the new keys: unread)
        *(q.stride()[:3] * 3), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        o4.stride(0), o4.stride(2), o4.stride(1), last.stride(0), last.stride(1) if last.shape[1] > 1 else 0,
        stride_r, scale, window or 0, MIN_CHUNK, GROUP=h // k_cache.shape[1], D=d, BLOCK=BLOCK,
        HAS_WINDOW=window is not None, WRITE=False, ROT=rot, ATTEND=True, SPLITS=SPLITS, num_warps=WARPS)
    return out


def counters(device: torch.device) -> torch.Tensor:
    """The split tokens' counters on a CUDA device, zeros, made once (a pass's runner makes them before compiling, so
    that a compiled pass reads a tensor that is already there). Every kernel leaves them at 0, and kernels of one
    device run one after another on its stream, so all share them."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _COUNTERS:
        _COUNTERS[index] = torch.zeros(1 << 18, dtype=torch.int32, device=device)
        _MULTIPROCESSORS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _COUNTERS[index]


def _scratch(q: torch.Tensor, tokens: int, heads: int = 1) -> tuple:
    """Where the runs of `tokens` query tokens (each of `heads` query heads) leave their partial sums (float32
    [tokens * SPLITS * heads, D]) and softmax statistics (the running maximum and total), and the tokens' counters."""
    count = counters(q.device) if q.is_cuda else torch.zeros(tokens, dtype=torch.int32, device=q.device)
    if tokens > count.numel():
        raise ValueError(f"{tokens} query tokens in one attention, past the kernel's {count.numel()} counters")
    parts = torch.empty(tokens * SPLITS * heads, q.shape[-1], dtype=torch.float32, device=q.device)
    stats = torch.empty(tokens * SPLITS * heads, 2, dtype=torch.float32, device=q.device)
    return parts, stats, count


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x with its last dimension contiguous, as the kernel reads it."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _tables(cos, sin, unread: torch.Tensor) -> tuple:
    """The rotary tables as the kernel takes them: (cos, sin, the rotated width, their row stride); without tables,
    `unread` in their place (the kernel reads no table at rotated width 0)."""
    if cos is None:
        return unread, unread, 0, 0
    return cos, sin, cos.shape[-1], cos.stride(0)
