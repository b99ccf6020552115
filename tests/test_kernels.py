"""decode/kernels.py's Triton kernels against the passes' own arithmetic (the attention; a check's products), on the
CPU through Triton's interpreter (tests/test_gpu.py runs them compiled on CUDA). Skipped where Triton is not
installed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]

def kernel_cases(device: str) -> list[dict]:
    """The kernel and the passes' own attention (compact.self_attention / cross_attention without the kernel) on
    random caches: float32 and bfloat16; grouped heads and not, a sliding window, loops past one block, the last slot;
    the rotary in the kernel, whole and partial (the reference rotates in float32 and rounds once, as the kernel)."""
    import torch

    from decode import compact, kernels

    torch.manual_seed(0)
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        for b, h, h_kv, d, cap, window, rot in [
                (1, 14, 2, 64, 100, None, 0), (3, 8, 8, 32, 70, None, 0), (2, 8, 2, 128, 200, 16, 0),
                (1, 4, 1, 256, 130, None, 0), (2, 4, 2, 16, 9, 4, 0),
                (1, 14, 2, 64, 100, None, 64), (2, 8, 2, 128, 200, 16, 64), (3, 4, 1, 256, 70, None, 256)]:
            k_cache = torch.randn(b, h_kv, cap, d, dtype=dtype, device=device)
            v_cache = torch.randn_like(k_cache)
            q = torch.randn(b, h, 1, d, dtype=dtype, device=device)
            k, v = (torch.randn(b, h_kv, 1, d, dtype=dtype, device=device) for _ in range(2))
            pos = torch.randint(0, cap, (b, 1), device=device)
            pos[0, 0] = cap - 1
            k_ref, v_ref = k_cache.clone(), v_cache.clone()
            rope, terms = None, torch.zeros(())
            if rot:
                rope = tuple(torch.randn(cap, rot, dtype=dtype, device=device) for _ in range(2))
                out = kernels.decode_attention(q, k_cache, v_cache, pos, 0.3, window, k, v, *rope)
                c, s = (t[pos][:, None].float() for t in rope)
                # the size of the products a rotated key sums, k * cos and its other half * sin: where they cancel, a
                # fused multiply-add (a GPU's, not the reference's) moves the sum by more than a unit of itself
                kf = k.float()
                terms = torch.cat((kf[..., :rot].abs() * c.abs() + compact.rotate_half(kf[..., :rot]).abs() * s.abs(),
                                   kf[..., rot:].abs()), dim=-1)
                terms = torch.zeros_like(k_cache, dtype=torch.float32).scatter(
                    2, pos[:, None, :, None].expand(-1, h_kv, -1, d), terms)
                q, k = (compact.rotary(x.float(), c, s).to(dtype) for x in (q, k))
            else:
                out = kernels.decode_attention(q, k_cache, v_cache, pos, 0.3, window, k, v)
            ref = compact.self_attention(q, k, v, k_ref, v_ref, pos, 0.3, window, gqa=h != h_kv)  # writes k_ref, v_ref
            # cross-attention: nothing written; the slots up to each row's last real one
            last = torch.randint(0, cap, (b, 1), device=device)
            visible = (torch.arange(cap, device=device) <= last)[:, None, None]
            cross = kernels.decode_attention(q, k_ref, v_ref, last, 0.3)
            cross_ref = compact.cross_attention(q.float(), k_ref.float().repeat_interleave(h // h_kv, 1),
                                                v_ref.float().repeat_interleave(h // h_kv, 1), visible, last, 0.3)
            results.append(dict(case=[str(dtype), b, h, h_kv, d, cap, window, rot],
                                self_err=(out.float() - ref.float()).abs().max().item(),
                                cross_err=(cross.float() - cross_ref).abs().max().item(),
                                scale=ref.float().abs().max().item(),
                                # rotated keys: equal up to the last unit of their dtype (Triton's interpreter
                                # rounds toward zero) and a few float32 units of the products they sum (a GPU
                                # fuses the multiply-add); anything else, equal
                                cache_equal=torch.equal(v_cache, v_ref) and (
                                    torch.equal(k_cache, k_ref) if not rot else bool(
                                        ((k_cache.float() - k_ref.float()).abs()
                                         <= torch.finfo(dtype).eps * k_ref.float().abs()
                                         + 4 * torch.finfo(torch.float32).eps * terms.to(device)).all())),
                                dtype_kept=out.dtype == dtype and tuple(out.shape) == (b, 1, h * d)))
    return results


def many_query_cases(device: str) -> list[dict]:
    """attention_over_cache (n query tokens over caches that already hold their keys and values: a check) against
    the passes' own attention with the causal mask, and query by query against the one-token kernel, which must give
    the same bits; self-attention at consecutive positions (a sliding window, grouped heads) and cross-attention (one
    last slot per row)."""
    import torch

    from decode import compact, kernels

    torch.manual_seed(1)
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        for b, h, h_kv, d, cap, window, n in [(1, 14, 2, 64, 100, None, 11), (2, 8, 8, 32, 70, None, 2),
                                              (2, 8, 2, 128, 200, 16, 16), (3, 4, 1, 16, 40, 4, 6)]:
            k_cache = torch.randn(b, h_kv, cap, d, dtype=dtype, device=device)
            v_cache = torch.randn_like(k_cache)
            q = compact.heads(torch.randn(b, n, h * d, dtype=dtype, device=device), h)  # a pass's layout
            pos = torch.randint(0, cap - n + 1, (b, 1), device=device) + torch.arange(n, device=device)
            pos[0] = torch.arange(cap - n, cap)
            out = kernels.attention_over_cache(q, k_cache, v_cache, pos, 0.3, window)
            ref = compact.attend(q, k_cache, v_cache, compact.causal_mask(pos, cap, window), 0.3, gqa=h != h_kv)
            steps = torch.cat([kernels.decode_attention(q[:, :, i : i + 1], k_cache, v_cache, pos[:, i : i + 1], 0.3,
                                                        window) for i in range(n)], dim=1)
            last = torch.randint(0, cap, (b, 1), device=device)
            cross = kernels.attention_over_cache(q, k_cache, v_cache, last, 0.3)
            cross_steps = torch.cat([kernels.decode_attention(q[:, :, i : i + 1], k_cache, v_cache, last, 0.3)
                                     for i in range(n)], dim=1)
            visible = (torch.arange(cap, device=device) <= last)[:, None, None]
            cross_ref = compact.attend(q, k_cache, v_cache, visible, 0.3, gqa=h != h_kv)
            results.append(dict(case=[str(dtype), b, h, h_kv, d, cap, window, n],
                                err=max((out.float() - ref.float()).abs().max().item(),
                                        (cross.float() - cross_ref.float()).abs().max().item()),
                                scale=ref.float().abs().max().item(),
                                as_steps=torch.equal(out, steps) and torch.equal(cross, cross_steps),
                                dtype_kept=out.dtype == dtype and tuple(out.shape) == (b, n, h * d)))
    return results


def rotated_check_cases(device: str) -> list[dict]:
    """A check's tokens through the kernel, their keys and values written first as the passes write them, against the
    one-token kernel run token by token, which writes and attends: the same outputs and caches, bit for bit; with the
    rotary in the kernel (whole and partial: write_keys rotates the keys) and without it (no rotary: BART's, T5's,
    the keys written by compact.write_cache); grouped heads, a sliding window."""
    import torch

    from decode import compact, kernels

    torch.manual_seed(2)
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        for b, h, h_kv, d, cap, window, n, rot in [(1, 14, 2, 64, 100, None, 11, 64), (2, 8, 2, 128, 90, 16, 5, 64),
                                                   (2, 4, 4, 32, 150, None, 16, 0)]:
            q = compact.heads(torch.randn(b, n, h * d, dtype=dtype, device=device), h)  # a pass's layout
            k, v = (compact.heads(torch.randn(b, n, h_kv * d, dtype=dtype, device=device), h_kv) for _ in range(2))
            rope = tuple(torch.randn(cap, rot, dtype=dtype, device=device) for _ in range(2)) if rot else ()
            pos = torch.randint(0, cap - n + 1, (b, 1), device=device) + torch.arange(n, device=device)
            pos[-1] = torch.arange(cap - n, cap)  # (up to the last slot)
            caches = [torch.randn(b, h_kv, cap, d, dtype=dtype, device=device) for _ in range(2)]
            k_steps, v_steps = (c.clone() for c in caches)
            steps = torch.cat([kernels.decode_attention(q[:, :, i : i + 1], k_steps, v_steps, pos[:, i : i + 1], 0.3,
                                                        window, k[:, :, i : i + 1], v[:, :, i : i + 1], *rope)
                               for i in range(n)], dim=1)
            if rot:
                kernels.write_keys(k, v, *caches, pos, *rope)
            else:
                compact.write_cache(*caches, pos, k, v)
            out = kernels.attention_over_cache(q, *caches, pos, 0.3, window, *rope)
            results.append(dict(case=[str(dtype), b, h, h_kv, d, cap, window, n, rot], as_steps=torch.equal(out, steps),
                                caches_as_steps=torch.equal(caches[0], k_steps) and torch.equal(caches[1], v_steps)))
    return results


def skinny_cases(device: str, configs=None, bf16: bool = True) -> list[dict]:
    """skinny_product against a float64 product: one row and a check's rows, weights whose rows and columns are not
    multiples of the blocks, one run of the columns and several (where a run's end passes the columns, the runs after
    it sum nothing); each row of x alone gives the bits it gives among the others. configs: skinny_config's tuples
    (None: the measured one for each shape). bf16: bfloat16 cases too (Triton 3.6's interpreter multiplies bfloat16
    blocks wrongly: the GPU runs them)."""
    import torch

    from decode import kernels

    torch.manual_seed(4)
    results = []
    for dtype in (torch.float32, torch.bfloat16) if bf16 else (torch.float32,):
        for m, n, k in [(1, 40, 72), (11, 96, 300), (16, 33, 130), (5, 64, 1000)]:
            for config in configs or [None]:
                x = torch.randn(m, k, dtype=dtype, device=device)
                w = torch.randn(n, k, dtype=dtype, device=device)
                parts = kernels.skinny_product(x, w, config)
                out = parts.sum(0)
                ref = x.double() @ w.double().T
                alone = torch.cat([kernels.skinny_product(x[i : i + 1], w, config).sum(0) for i in range(m)])
                results.append(dict(case=[str(dtype), m, n, k, config], splits=parts.shape[0],
                                    err=((out.double() - ref).abs() / (x.double().abs() @ w.double().abs().T))
                                    .max().item(),
                                    rows_alone=torch.equal(out, alone),
                                    kept=parts.dtype == torch.float32 and tuple(parts.shape[1:]) == (m, n)))
    return results


def fused_cases(device: str, configs) -> list[dict]:
    """scripts/bench_epilogue.py's skinny_fused (a product with its norm and epilogue in one kernel, measured there
    before any pass uses it) against what a pass computes for it (bench_epilogue.product_apart: compact.rms_norm,
    compact.linear, the bias, the residual add, silu(gate) * up), float32."""
    import torch

    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_epilogue import PRODUCTS, product_apart, product_extras, skinny_fused

    torch.manual_seed(5)
    results = []
    for product, how in PRODUCTS.items():
        for m, n, k in [(3, 48, 200), (11, 80, 300)]:
            rows = 2 * n if how.get("gated") else n
            for config in configs:
                x = torch.randn(m, k, device=device)
                w = torch.randn(rows, k, device=device) / k ** 0.5
                extra = product_extras(how, m, rows, k, torch.float32, device)
                out = skinny_fused(x, w, config, **extra)
                ref = product_apart(x, w, **extra)
                results.append(dict(case=[product, m, n, k, config], shape=list(out.shape),
                                    err=((out - ref).abs() / (1 + ref.abs())).max().item()))
    return results


def check_skinny_cases(results: list[dict], cases: int) -> None:
    assert len(results) == cases
    assert any(r["splits"] > 1 for r in results) and any(r["splits"] == 1 for r in results)
    for r in results:
        # float32 sums of exact products (bfloat16 inputs; float32 ones multiplied in float32): float32 roundings, a
        # few units of the sum of the products' sizes (err's unit)
        assert r["err"] <= 1e-6 and r["rows_alone"] and r["kept"], r


def check_rotated_check_cases(results: list[dict]) -> None:
    assert len(results) == 6
    for r in results:
        assert r["as_steps"] and r["caches_as_steps"], r


def check_many_query_cases(results: list[dict]) -> None:
    assert len(results) == 8
    for r in results:
        tol = 1e-5 if "float32" in r["case"][0] else 1.6e-2 * max(1.0, r["scale"])
        assert r["err"] <= tol and r["as_steps"] and r["dtype_kept"], r


def check_kernel_cases(results: list[dict]) -> None:
    assert len(results) == 16
    for r in results:
        # float32: rounding of another summation order; bfloat16: the last unit of the output, and with the rotary
        # in the kernel that of the rotated q and k too (the interpreter rounds them toward zero, the reference to
        # nearest: a few per cent); a wrong rotation or mask is off by the whole scale
        bf16_tol = 4e-2 if r["case"][-1] else 1.6e-2
        tol = 1e-5 if "float32" in r["case"][0] else bf16_tol * max(1.0, r["scale"])
        assert r["self_err"] <= tol and r["cross_err"] <= tol, r
        assert r["cache_equal"] and r["dtype_kept"], r


# Runs in a subprocess: Triton chooses its interpreter when the kernel is defined, from TRITON_INTERPRET.
SCRIPT = r'''
import json, sys
import triton.runtime.interpreter as interp
# Triton 3.6's interpreter converts its one-element scalars with int(array), which numpy 2.4 refuses
_patch = interp._patch_lang_tensor
def _patched(tensor, scope):
    _patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
interp._patch_lang_tensor = _patched
sys.path.insert(0, "tests")
from decode import kernels
# fewer programs per token than on a GPU (the interpreter runs each in turn), over runs of one block: the cases' caches
# of over 64 slots split, the shorter ones not
kernels.SPLITS, kernels.MIN_CHUNK = 2, kernels.BLOCK
from test_kernels import (FUSED_CONFIGS, SKINNY_CONFIGS, fused_cases, kernel_cases, many_query_cases,
                          rotated_check_cases, skinny_cases)
results = {"attention": kernel_cases("cpu"), "many": many_query_cases("cpu"), "rotated": rotated_check_cases("cpu"),
           "skinny": skinny_cases("cpu", SKINNY_CONFIGS, bf16=False), "fused": fused_cases("cpu", FUSED_CONFIGS)}
kernels.GROUPED = True  # the same cases through _grouped_attention
results["grouped"] = {"attention": kernel_cases("cpu"), "many": many_query_cases("cpu"),
                      "rotated": rotated_check_cases("cpu")}
print(json.dumps(results))
'''


@pytest.fixture(scope="module")
def interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# kernels.GROUPED off (the default: a program per query head) and on (a program per key/value head)
KERNELS = [pytest.param(False, id="per_head"), pytest.param(True, id="grouped")]


def _cases(interpreted, grouped: bool, name: str) -> list[dict]:
    return (interpreted["grouped"] if grouped else interpreted)[name]


@pytest.mark.parametrize("grouped", KERNELS)
def test_decode_attention_equals_the_passes_attention(interpreted, grouped):
    check_kernel_cases(_cases(interpreted, grouped, "attention"))


@pytest.mark.parametrize("grouped", KERNELS)
def test_attention_over_cache_is_the_one_token_kernel_per_query(interpreted, grouped):
    check_many_query_cases(_cases(interpreted, grouped, "many"))


@pytest.mark.parametrize("grouped", KERNELS)
def test_a_checks_rotary_in_the_kernel_is_the_steps(interpreted, grouped):
    check_rotated_check_cases(_cases(interpreted, grouped, "rotated"))


# small blocks, for the interpreter: one run of the columns, and runs of 64 (2 to 16 of them); and skinny_config's
# blocks for one run (its blocks for several are the measured config's at these shapes)
SKINNY_CONFIGS = [(16, 32, 1, 4, 2), (32, 64, 16, 4, 2), (64, 128, 1, 4, 3)]


def test_the_skinny_product_is_the_product_row_by_row(interpreted):
    """(float32; tests/test_gpu.py runs bfloat16 too)"""
    check_skinny_cases(interpreted["skinny"], 4 * len(SKINNY_CONFIGS))


# blocks of 16 and 32 rows of the weight over 32 and 64 of its columns, so that the last block of rows is partly past
# the weight and the last block of columns partly past x's
FUSED_CONFIGS = [(16, 32, 4, 2), (32, 64, 4, 2)]


def test_a_product_with_its_norm_and_epilogue_in_one_kernel_computes_what_a_pass_does(interpreted):
    """scripts/bench_epilogue.py's fused kernel (float32 in the interpreter; the script compares bfloat16 on a GPU)."""
    results = interpreted["fused"]
    assert len(results) == 4 * 2 * len(FUSED_CONFIGS)
    for r in results:
        rows, n = r["case"][1:3]
        assert r["shape"] == [rows, n], r
        assert r["err"] <= 1e-5, r
