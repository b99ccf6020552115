"""Compact decoder passes over a Hugging Face model's own weights: the settings, the pieces every family is made of,
compiling, and a runner's decoder state. The families are decode/decoder_only.py (Llama and kin) and
decode/seq2seq.py (BART, Marian, T5); decode/passes.py says which one a model runs.

    passes = model_passes(model, compile=True)    # decode/passes.py; once per model: fused weights, compiled functions
    decoder = passes.decoder()                    # per runner: static caches over those passes
    decoder.allocate(capacity, src_capacity, batch)
    logits = decoder.forward(ids, pos)            # writes the caches at pos; [B, n, V]

Every runner (decode/fast.py's batch-1 runner, decode/batch.py's batches, decode/early_exit.py's split model)
runs these passes; the model's own modules stay as they are for the eager path. What makes them fast at batch 1,
where a step is bound by the number of kernels and by reading the weights once:
- Projections that read the same input are fused once, when the passes are made: q, k and v (with their biases)
  into one matrix, and the MLP's gate and up. The model's own parameters become views into the fused matrix, so no
  weight is stored twice and the eager path reads the same numbers.
- Each layer is one pure function of tensors (norms, rotary, the cache write, attention, the MLP) that
  `torch.compile` turns into a few fused kernels. One compiled function serves every layer of a model (the weights
  are its arguments), so compiling costs seconds whatever the depth, in two variants: one token of one row (the
  decode step; for narrow models its matrix-vector products become Triton reductions tuned by coordinate descent,
  as gpt-fast does) and any batch and length (checks, prefill, batches; cuBLAS products, but for 2 to 16 tokens of
  one row on CUDA, decode/kernels.py's skinny_product: SKINNY_PRODUCT). The cache's capacity is a
  dynamic dimension, so growing the buffers compiles nothing. Which settings the one-token variant compiles with
  depends on the model's width, by measurement (TUNED_BELOW_WIDTH, MATMUL_ATTENTION_FROM_WIDTH).
- The KV cache is one buffer per layer, written by position; a mask built from the positions hides every slot past
  them (and outside a sliding window). Rolling back is moving the position.
- On CUDA a one-token pass attends with a Triton kernel (decode/kernels.py) that writes the token's key and value
  and reads only the slots its position sees, one kernel per attention (DECODE_KERNEL).

Covered: Llama (any static rope type), Qwen2, Mistral, Qwen3, Phi-3, Gemma 2, Gemma 3 text (decoder-only, sliding
windows included); BART, Marian, T5/mT5 (encoder-decoder). decode/families.py's `unsupported_reason` says why anything
else runs on the eager path.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import types
import weakref

import torch
import torch.fx.experimental._config as fx_config
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import PreTrainedModel

import decode.kernels as kernels
from decode.cache import step_verdict
from decode.families import output_logits, soft_cap


# Inductor settings for the compiled passes (keyed by whether the pass is the one-token one). No online softmax:
# inductor splits the long softmaxes here and says so. Combo kernels: independent kernels of a pass (the norms of q
# and k, the cache writes, ...) launched as one. Measured on an H100 (BENCHMARKS.md), step with the host read / graph
# only, without -> with: Qwen2.5-0.5B 1.132 / 1.005 -> 1.067 / 0.910 ms, Qwen2.5-7B 6.220 / 5.928 -> 6.031 / 5.823,
# the demo BART 0.254 / 0.218 -> 0.229 / 0.193; the demo's 2M model 0.084 / 0.059 -> 0.098 / 0.055 (0.082 -> 0.081 in
# an earlier run); 5-25 s more compiling.
INDUCTOR_OPTIONS = {one: {"online_softmax": False, "combo_kernels": True} for one in (True, False)}
# Coordinate-descent tuning of the one-token pass (gpt-fast's setting: one-row products become Triton reductions,
# fused with the norm before them) for models narrower than this. Measured on an H200 (BENCHMARKS.md): it shortened
# the step of the demo BART (width 512, graph 0.326 -> 0.232 ms) and of Qwen2.5-0.5B (896, 1.156 -> 1.060). At
# Qwen2.5-1.5B (1536), on an H100 twice, step with the host read / graph only: 2.335 / 2.014 -> 2.079 / 1.811 and
# 2.104 / 1.966 -> 1.825 / 1.708 (1.780 / 1.722 as a process's first runner), its check of 10 2.561 -> 2.636 (on an
# H200 before combo kernels, a check of 11 2.88 -> 3.70). TUNE_ONE_TOKEN = True or False overrides it.
TUNED_BELOW_WIDTH = 2048
TUNE_ONE_TOKEN: bool | None = None
# Whether a tuned one-token pass (above) computes an RMSNorm and the product after it as one reduction, the norm's sum of
# squares taken beside the product's sums and applied to its outputs (norm_linear), where otherwise the sum of squares
# is a kernel of its own before each normed product (two per layer, and the head's). On for models up to
# NORM_IN_PRODUCT_UP_TO_WIDTH wide. Measured on an H100 (BENCHMARKS.md), step with the host read: Qwen2.5-0.5B (width
# 896) 0.995 -> 0.950 ms, Qwen2.5-1.5B (1536) 1.877 -> 2.323. Inductor sums up to 1,024 inputs in one pass of a
# kernel and more in a loop, and looped the fused gate/up product took 1.9x the unfused. BILD_NORM_IN_PRODUCT=0 or 1
# in the environment turns it off or on at every width.
NORM_IN_PRODUCT_UP_TO_WIDTH = 1024


def _env_switch(name: str) -> bool | None:
    value = os.environ.get(name, "")
    if value not in ("", "0", "1"):
        raise ValueError(f"{name}={value!r}: set it to 0 (off), 1 (on) or leave it unset (the measured default)")
    return None if value == "" else value == "1"


def _env_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    value = os.environ.get(name, "")
    if value not in ("", *choices):
        raise ValueError(f"{name}={value!r}: set it to one of {', '.join(choices)} or leave it unset ({default})")
    return value or default


NORM_IN_PRODUCT: bool | None = _env_switch("BILD_NORM_IN_PRODUCT")  # None: by width (above)
# How a tuned one-token pass computes an MLP's activation (act(gate) * up, or act(fc1(x))), the input of the product
# after it. "inline": as inductor chooses, inside that product's reduction, computed again in each of its programs.
# "stored": as a buffer of its own (compact.stored), which the product reads; for a gated MLP, a kernel of its own.
# "epilogue": stored, and a gated MLP's gate and up computed as two products of one input (the two halves of its fused
# weight), which inductor sums in one kernel that ends with the activation. Measured on H100s (BENCHMARKS.md), each
# way in processes of its own, step with the host read, inline / stored / epilogue: Qwen2.5-0.5B 0.946-0.949 /
# 0.886-0.913 / 0.748-0.789 ms (the MLP's kernels a layer 20.2 / 17.0 / 13.5 us); Qwen2.5-1.5B 1.75-1.81 / 1.74-1.76 /
# 1.72-1.81 ms, no way apart beyond the spread between processes; the demo BART (ungated: stored is epilogue) 0.226
# against 0.229. BILD_MLP_ACTIVATION=inline, stored or epilogue in the environment sets it.
MLP_ACTIVATIONS = ("inline", "stored", "epilogue")
MLP_ACTIVATION: str = _env_choice("BILD_MLP_ACTIVATION", MLP_ACTIVATIONS, "epilogue")
# Whether a step's verdict (decode.cache.step_verdict: the top probability and argmax over the vocabulary) is a compiled
# pass, as the head is. Measured on an H100 (BENCHMARKS.md), kernel time of a step's verdict, Qwen2.5-0.5B / 1.5B: a
# softmax over the one row, then its max, eager (the verdict before): 38.3 + 8.4 / 38.6 + 7.7 us; compiled, the max
# with its index (one program: 21.0 / 23.3 us) and the sum: 24.4 / 26.7 us. It adds 4-8 s of compiling in a fresh
# process. The formula eager was not profiled inside a step. BILD_COMPILED_VERDICT=0 in the environment runs it eager.
COMPILED_VERDICT: bool = _env_switch("BILD_COMPILED_VERDICT") is not False
# Whether a compiled step's verdict finds its argmax as the max, then the first index that holds it (split_verdict): two
# reductions without an index, which inductor splits over many programs, where the max with its index runs in one.
# Measured on H100s (BENCHMARKS.md), the verdict's kernels in a Qwen2.5 step: 7-10 us split, 24-33 us with the index
# (0.5B and 1.5B); the whole step's difference was below the spread between processes. BILD_SPLIT_VERDICT=0 in the
# environment turns it off.
SPLIT_VERDICT: bool = _env_switch("BILD_SPLIT_VERDICT") is not False
# Whether a tuned one-token pass (decoder-only and BART layers) stores its q/k/v product, the bias added, as one buffer
# (compact.stored) before splitting it into q, k and v for the attention kernel. Otherwise inductor writes the product's
# float32 sums, then adds the bias in a kernel of its own that writes q, k and v as three buffers (a combo kernel, one a
# layer, 1.2-1.4 us). Measured on an H200 (BENCHMARKS.md), each a process's first runner, step with the host read:
# Qwen2.5-1.5B 1.547 ms stored against 1.592-1.679 in three processes without (210 kernels against 238); Qwen2.5-0.5B
# 0.714 against 0.718 (133 kernels against 157; the q/k/v products and that kernel 89.6 -> about 56 us a step, the
# other products' tuned times moving more between processes); on an H100, with TUNE_ALL_DIRECTIONS, 0.5B 0.733 ms
# and 1.5B 1.821. BART's (the demo large model, on an H100): 75 kernels and 170 us a step against 81 and 175, the graph
# 0.194 ms against 0.199. BILD_STORED_QKV=0 in the environment turns it off.
STORED_QKV: bool = _env_switch("BILD_STORED_QKV") is not False
# Whether a compiled decoder-only pass of several tokens (a check, a prompt, a batch's step) leaves each layer's MLP
# output (the down product: with a check's few tokens, its partial sums) to the next layer, which adds it to the
# residual in the kernel of its first norm, where otherwise that add is a kernel of its own, one a layer. Families
# whose down product has a bias or a norm after it (Gemma) add it in the layer. The numbers are the same, added in
# the same order; the first layer's graphs are compiled apart from the others'. Measured on an H100 (BENCHMARKS.md),
# Qwen2.5-0.5B, each a process's first runner: a check of 10 took 1.039 and 1.060 ms with it against 1.071 without (and
# 1.063 in an earlier process), 258 kernels against 281 in a check of 11, 948 us of kernel time against 963. (Before
# each layer's caches were tensors of their own, the layers after the first ran a pass first traced at a cache that
# started past offset 0, with the offset as a symbol, and it made a check slower: 1.142-1.175 ms.)
# BILD_DEFERRED_RESIDUAL=0 in the environment turns it off.
DEFERRED_RESIDUAL: bool = _env_switch("BILD_DEFERRED_RESIDUAL") is not False
# Whether the coordinate-descent tuning of a one-token pass (TUNED_BELOW_WIDTH) also tries changing two of a kernel's
# settings at once (inductor's coordinate_descent_check_all_directions), where by default it stops once no single
# change helps. Measured (BENCHMARKS.md), Qwen2.5-1.5B, each a process's first runner on an empty on-disk cache: on an
# H200, step with the host read 1.540 ms against 1.592-1.679 in three processes without, the gate/up product 459 us a
# step against 551-553; on an H100 (with STORED_QKV), 1.821 ms, its gate/up product 754 us, within the 658-792 of
# earlier processes without. On an empty cache it compiled for 73 s against 33-41 (H200) and 63 s (H100), in the
# one-token layer (15-32 s against 7-12) and the step's verdict (17-32 s against 3-9). Off;
# BILD_TUNE_ALL_DIRECTIONS=1 in the environment turns it on.
TUNE_ALL_DIRECTIONS: bool = _env_switch("BILD_TUNE_ALL_DIRECTIONS") is True
# The attention backends a compiled pass may trace on CUDA; the math one is decomposed into kernels that inductor
# fuses (masks, grouped heads and T5's position bias included). Measured choice: BENCHMARKS.md.
COMPILED_ATTENTION = [SDPBackend.MATH]
# Whether the compiled passes group query heads over their shared key/value head (grouped_attention) or hand every
# attention to SDPA as the uncompiled passes do (measured against each other: BENCHMARKS.md).
GROUPED_ATTENTION = True
# Where the attention kernel below does not apply (DECODE_KERNEL off, a head size it does not take, soft-capping):
# how the compiled one-token attention of a decoder-only model computes its scores and output, as float32 sums that
# inductor writes as reductions fused with the softmax (one program per query row), or, for models at least this
# wide, as two batched products in the model's dtype around a float32 softmax (transformers' eager arithmetic).
# Measured on an H200 (BENCHMARKS.md), graph-only step: Qwen2.5-7B (width 3584) 5.147 -> 4.675 ms with the products,
# 1.5B (1536) 1.934 -> 1.910, 0.5B (896) 1.156 -> 1.188, the demo BART 0.326 -> 0.376. ONE_TOKEN_ATTENTION = "reduce"
# or "matmul" overrides it.
MATMUL_ATTENTION_FROM_WIDTH = 2048
ONE_TOKEN_ATTENTION: str | None = None
# Whether a one-token pass on CUDA attends with decode/kernels.py's Triton kernel, which writes the cache and reads
# only the slots the token sees, in one kernel. Measured on an H200 against what inductor makes of the passes' own
# attention (BENCHMARKS.md), compiled graph-only step: Qwen2.5-0.5B 1.380 -> 0.944 ms, the demo BART 0.225 -> 0.187.
# At Qwen2.5-7B, against the batched products (MATMUL_ATTENTION_FROM_WIDTH), on an H100 with the rotary and checks in
# the kernel: step 6.080 -> 5.963 ms, check of 10 6.376 -> 6.031, and 5.747 / 5.820 as a process's first runner (on
# an H200 before them, 4.803 against 4.831). Every pass takes it where it applies (kernels.supports), compiled or
# not. Long contexts split each token's slots over several programs (kernels.SPLITS).
DECODE_KERNEL = True
# Whether that kernel also rotates q and k (Llama's rotary, partial or whole), where the passes' own rotary is two or
# three more kernels per layer (about ten uncompiled). Measured on an H100 (BENCHMARKS.md), uncompiled passes in
# graphs, step with the host read: Qwen2.5-0.5B 2.403 -> 1.870 ms, Qwen2.5-7B 7.315 -> 6.678; compiled, graph-only
# step: 0.5B 1.040 -> 0.968, 1.5B 2.039 -> 2.032.
KERNEL_ROTARY = True
# Whether a pass of 2 to kernels.MAX_QUERIES tokens on CUDA (a check) attends with the same kernel, query by query
# (kernels.attention_over_cache; where the step rotates q and k in the kernel, kernels.write_keys writes the check's
# keys rotated by the same code), where the one-token step takes it: the check's attention then rounds as the steps'
# does, and skips SDPA's mask over every slot of the cache. Measured on an H100 (BENCHMARKS.md), check of 10 pending
# tokens, off -> on: compiled, the demo BART 0.515 -> 0.378 ms, the demo's 2M model 0.120 -> 0.102, Qwen2.5-0.5B
# 1.611 -> 1.302; uncompiled, 0.5B 3.010 -> 1.989, 7B 8.473 -> 7.206. The lossless mode in bf16 against the large
# model's own Greedy (random tiny pairs, 20 per family, BART / T5 / Llama / Qwen2): 2 / 0 / 6 / 6 mismatches off,
# 0 / 0 / 1 / 2 on. BILD_CHECK_KERNEL=0 in the environment turns it off.
CHECK_KERNEL = os.environ.get("BILD_CHECK_KERNEL", "1") != "0"
# Whether a compiled pass of 2 to kernels.MAX_ROWS tokens of one row on CUDA (a check, a catch-up, a short prompt or
# source) multiplies by its weights with decode/kernels.py's skinny_product, which reads each weight once for all the
# tokens and spreads it over the whole GPU, its partial sums added inside the kernel that reads the product; otherwise
# those are cuBLAS calls. Measured on an H100 (BENCHMARKS.md): a compiled check of 10 at Qwen2.5-0.5B 1.285 -> 1.083 ms
# (the step 0.853 / 0.810, the same passes); a product of 11 rows, cuBLAS -> kernel, 0.5B q/k/v 4.5 -> 3.0 us, down
# 8.1 -> 5.8, 7B down 51.0 -> 50.1. BILD_SKINNY_PRODUCT=0 in the environment turns it off.
SKINNY_PRODUCT: bool = _env_switch("BILD_SKINNY_PRODUCT") is not False
# The backends the uncompiled passes may take on CUDA: all of them, whatever a process-wide switch says (the eager
# path turns cuDNN off for its changing shapes; a graphed pass has fixed shapes). Measured with these: BENCHMARKS.md.
UNCOMPILED_ATTENTION = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH]


_SAID: set[str] = set()


def notice(message: str) -> None:
    """Prints a one-line notice once per process (which decoding path runs, what was compiled)."""
    if message not in _SAID:
        _SAID.add(message)
        print(f"[bild] {message}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# The pieces every family is made of


def one_token(x: torch.Tensor) -> bool:
    """Whether x [B, n, ...] is one token of one row: the input of a pass's one-token variant (Pass), whose arithmetic
    the pieces below may write otherwise than the any-shape variant's."""
    return x.shape[0] == 1 and x.shape[1] == 1


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias. Compiled, the bias is added apart: inductor turns a one-row product without bias into a
    tuned reduction (and fuses the add into it), while a product with bias stays a cuBLAS call. A few tokens of one
    row, compiled on CUDA: kernels.skinny_product (SKINNY_PRODUCT), its partial sums added and rounded to x's dtype as
    cuBLAS rounds its float32 sums."""
    if _skinny(x, weight):
        out = settled(linear_parts(x, weight), x.dtype)
        return out if bias is None else out + bias
    if bias is None:
        return F.linear(x, weight)
    if torch.compiler.is_compiling():
        return F.linear(x, weight) + bias
    return F.linear(x, weight, bias)


def linear_parts(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T as terms whose sum over the first dimension is the product, rounded by `settled` as linear rounds
    it: a skinny product's float32 partial sums [S, *x.shape[:-1], N] where linear takes one, else linear's product
    [1, *x.shape[:-1], N]. A pass that adds the product to the residual (DEFERRED_RESIDUAL) leaves the sum to the
    kernel that reads it next."""
    if _skinny(x, weight):
        parts = kernels.skinny_product(x.reshape(-1, x.shape[-1]), weight)
        return parts.view(parts.shape[0], *x.shape[:-1], weight.shape[0])
    return linear(x, weight).unsqueeze(0)


def settled(parts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The product that linear_parts's terms make: their float32 sum rounded to dtype (one term: itself)."""
    return parts.sum(0).to(dtype)


def _skinny(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether linear(x, weight) is a skinny_product: SKINNY_PRODUCT, a compiled pass on CUDA of x [1, n, d] with
    1 < n <= kernels.MAX_ROWS, the weight's rows contiguous and in x's dtype."""
    return (SKINNY_PRODUCT and x.is_cuda and torch.compiler.is_compiling() and kernels.available() and x.dim() == 3
            and x.shape[0] == 1 and 1 < x.shape[1] <= kernels.MAX_ROWS and x.stride(-1) == 1
            and weight.stride(-1) == 1 and weight.dtype == x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's and Qwen2's RMSNorm, in their order of casts (float32 inside, the input's dtype out)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def norm_linear(x: torch.Tensor, norm, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                bias: torch.Tensor | None = None, fused: bool = False) -> torch.Tensor:
    """linear(norm(x, norm_weight, eps), weight, bias). fused, for rms_norm in a compiled pass of one token of one row:
    as one reduction over the input's width, the product of weight with x * norm_weight and the sum of squares of x,
    the first scaled by the norm's factor from the second after the sums (the same value, rounded otherwise: the
    normed input is not rounded to x's dtype before the product). Inductor makes it one kernel, where the norm's sum
    of squares is otherwise a kernel of its own before the product (NORM_IN_PRODUCT). Other norms (Gemma's scales by
    1 + weight) always run apart."""
    if not (fused and norm is rms_norm and torch.compiler.is_compiling() and one_token(x)):
        return linear(norm(x, norm_weight, eps), weight, bias)
    h = x.float().unsqueeze(-2)  # [1, 1, 1, d]
    terms = (h * norm_weight.float()) * weight.float()  # [1, 1, N, d], never stored: summed where it is computed
    squares = (h * h).expand_as(terms)  # the same sum in every output's reduction, so that both are one kernel
    out = terms.sum(-1) * torch.rsqrt(squares.sum(-1) / x.shape[-1] + eps)
    out = out.to(x.dtype)
    return out if bias is None else out + bias


def stored(x: torch.Tensor) -> torch.Tensor:
    """x, stored as a buffer of its own where a pass is being compiled (inductor stores the input of an as_strided),
    and x itself eagerly. Inductor otherwise computes a pointwise x inside each kernel that reads it; read by a one-row
    product, that is once in each program of the product's reduction (MLP_ACTIVATION)."""
    return torch.as_strided(x, x.shape, x.stride()) if torch.compiler.is_compiling() else x


def _tuned_one_token(x: torch.Tensor, how: str) -> bool:
    """Whether a pass of x [B, n, d] is a one-token pass of one row being compiled, with MLP_ACTIVATION how other than
    "inline" (the passes set "inline" where the one-token pass is not tuned: products that are cuBLAS calls)."""
    return how != "inline" and torch.compiler.is_compiling() and one_token(x)


def activation(x: torch.Tensor, act, how: str = "inline") -> torch.Tensor:
    """An ungated MLP's activation act(x), x the first product's output (how: MLP_ACTIVATION; stored, it is that
    product's epilogue)."""
    out = act(x)
    return stored(out) if _tuned_one_token(x, how) else out


def gated_activation(x: torch.Tensor, norm, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                     bias: torch.Tensor | None, act, fused: bool = False, how: str = "inline") -> torch.Tensor:
    """A gated MLP's act(gate) * up, where [gate, up] = norm_linear(x, norm, norm_weight, eps, weight, bias, fused):
    weight's rows are gate's, then up's. how: MLP_ACTIVATION."""
    one = _tuned_one_token(x, how)
    if one and how == "epilogue":
        if not (fused and norm is rms_norm):
            x, fused = norm(x, norm_weight, eps), False
        biases = (None, None) if bias is None else bias.chunk(2)
        gate, up = (norm_linear(x, norm, norm_weight, eps, w, b, True) if fused else linear(x, w, b)
                    for w, b in zip(weight.chunk(2), biases))
    else:
        gate, up = norm_linear(x, norm, norm_weight, eps, weight, bias, fused).chunk(2, dim=-1)
    out = act(gate) * up
    return stored(out) if one else out


def t5_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """T5's layer norm (T5LayerNorm): scales only, its variance in float32, the product in the weight's dtype."""
    h = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        h = h.to(weight.dtype)
    return weight * h


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[B, n, H * D] -> [B, H, n, D]"""
    return x.view(x.shape[0], x.shape[1], n_heads, -1).transpose(1, 2)


def attend(q, k, v, mask, scale, gqa: bool = False, softcap: float | None = None, matmul: bool = False) -> torch.Tensor:
    """q: [B, H, n, D]; k, v: [B, H_kv, L, D] (gqa: H_kv < H); mask: bool or additive, [B, 1 or H, n, L]; softcap:
    scores become softcap * tanh(scores / softcap) before the mask (Gemma 2); matmul: a compiled one-token pass
    computes the attention as batched products (grouped_attention). Returns [B, n, H * D]."""
    if softcap is not None or (GROUPED_ATTENTION and torch.compiler.is_compiling()):
        out = grouped_attention(q, k, v, mask, scale, softcap, matmul)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def grouped_attention(q, k, v, mask, scale, softcap: float | None = None, matmul: bool = False) -> torch.Tensor:
    """The compiled passes' attention, [B, H, n, D] out. The G query heads that share a key/value head are read as
    one head of G * n queries, so the cache is read where it lies: SDPA's math path, which inductor traces, first
    expands the cache to every query head and copies it to float32 (half of a 0.5B model's attention time on an H200,
    BENCHMARKS.md). One token per row (the decode step) is written as two float32 reductions and a softmax that
    inductor fuses with the casts and the mask; longer queries (checks, prompts) take SDPA, unless the scores are
    soft-capped, which SDPA cannot do: then a float32 product, as for one token."""
    b, h, n, d = q.shape
    h_kv, slots = k.shape[1], k.shape[2]
    g = h // h_kv
    q = q.reshape(b, h_kv, g * n, d)
    if mask.shape[1] == 1:
        mask = mask[:, :, None].expand(b, 1, g, n, slots).reshape(b, 1, g * n, slots)
    else:
        mask = mask.reshape(b, h_kv, g * n, slots)
    if n == 1 or softcap is not None:
        matmul = n == 1 and matmul and torch.compiler.is_compiling()
        if matmul:
            scores = (q @ k.transpose(-1, -2)).float() * scale  # [B, H_kv, G, L]
        elif n == 1:
            scores = (q.float()[:, :, :, None, :] * k.float()[:, :, None]).sum(-1) * scale  # [B, H_kv, G, L]
        else:
            scores = q.float() @ k.float().transpose(-1, -2) * scale  # [B, H_kv, G * n, L]
        scores = soft_cap(scores, softcap)
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        probs = scores.softmax(-1)
        if matmul:
            out = probs.to(v.dtype) @ v
        else:
            out = ((probs[..., None] * v.float()[:, :, None]).sum(-2) if n == 1 else probs @ v.float()).to(q.dtype)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.reshape(b, h, n, d)


def causal_mask(pos: torch.Tensor, capacity: int, window: int | None = None) -> torch.Tensor:
    """pos [B, n] -> [B, 1, n, capacity]: slot j is visible from position p when j <= p (and p - j < window)."""
    slots = torch.arange(capacity, device=pos.device)
    visible = slots <= pos[..., None]
    if window is not None:
        visible &= slots > pos[..., None] - window  # transformers' sliding_window_overlay
    return visible[:, None]


def write_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """k_cache, v_cache: [B, H_kv, capacity, D], row b's tokens written at its own positions pos[b] ([B, n])."""
    if pos.shape[0] == 1:
        k_cache.index_copy_(2, pos[0], k)
        v_cache.index_copy_(2, pos[0], v)
    else:
        rows = torch.arange(pos.shape[0], device=pos.device)[:, None]
        k_cache[rows, :, pos] = k.transpose(1, 2)
        v_cache[rows, :, pos] = v.transpose(1, 2)


class StaticKV:
    """Keys and values of every layer, written by position: `layers[i]` is layer i's (keys, values) pair, each
    [B, H_kv, capacity, D] and a tensor of its own. Not views into one buffer of all layers: a view past the first
    starts at an offset, and a pass first compiled there takes the offset as a symbol, so the kernels it compiles
    cannot count on the caches' alignment (with such a pass a check's attention took 1.6x as long on an H100)."""

    def __init__(self, layers: int, heads: int, head_dim: int, capacity: int, dtype, device, batch: int = 1):
        # zeros, not empty: masked slots are multiplied by 0 in attention, and 0 * NaN would be NaN
        shape = (batch, heads, capacity, head_dim)
        self.layers = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                       for _ in range(layers)]
        for pair in self.layers:  # the compiled passes take any capacity without compiling again
            for t in pair:
                torch._dynamo.maybe_mark_dynamic(t, 2)
                _static(t, 1, 3)

    def buffers(self) -> list[tuple[torch.Tensor, int]]:
        """Every cache with its batch dimension."""
        return [(t, 0) for pair in self.layers for t in pair]


def fuse_linears(linears) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for linear layers that read the same input: their rows stacked, in order. Each layer's
    own parameters become views into it, so nothing is stored twice, the eager path reads the same numbers, and an
    in-place update of either shows in both. Done once per model: a later call finds the views and returns their
    matrix."""
    found = _FUSED.get(linears[0])
    weights = [m.weight for m in linears]
    if found is not None and found[0].data_ptr() == weights[0].data_ptr() and found[2] == [w.data_ptr() for w in weights]:
        return found[0], found[1]
    with torch.inference_mode(False), torch.no_grad():
        weight = torch.cat([w.detach() for w in weights])
        biases = [m.bias for m in linears]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b.detach() if b is not None else weight.new_zeros(w.shape[0]) for b, w in zip(biases, weights)])
        start = 0
        for m in linears:
            rows = m.weight.shape[0]
            m.weight.data = weight[start : start + rows]
            if m.bias is not None:
                m.bias.data = bias[start : start + rows]
            start += rows
    _FUSED[linears[0]] = (weight, bias, [m.weight.data_ptr() for m in linears])
    return _static(weight), _static(bias)


_FUSED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _static(t: torch.Tensor | None, *dims: int) -> torch.Tensor | None:
    """t with these dimensions (all, without any) marked as constants for the any-shape variants, which are compiled
    with every other size a symbol: weights, heads and head sizes, the model's width. With every size a symbol, the
    guards over them cost seconds to trace and to check on each start from the on-disk cache (BENCHMARKS.md)."""
    if t is not None:
        for d in dims or range(t.dim()):
            torch._dynamo.mark_static(t, d)
    return t


def _alias(t: torch.Tensor | None) -> torch.Tensor | None:
    """A plain tensor over a parameter's storage (what a compiled pass takes as an argument)."""
    return None if t is None else t.detach()


def gemma_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm: float32 throughout, scaled by 1 + weight, cast back at the end."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + weight.float())).to(x.dtype)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, n, D] rotated over its first cos.shape[-1] dimensions (all of them but for a partial rotary)."""
    d = cos.shape[-1]
    if d == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot = x[..., :d]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x[..., d:]), dim=-1)


def self_attention(q, k, v, k_cache, v_cache, pos, scale, window=None, gqa=False, softcap=None, matmul=False,
                   kernel=False, rope=None, kernel_rope=False) -> torch.Tensor:
    """Rotates q ([B, H, n, D]) and k by their positions pos ([B, n]) where rope = (cos, sin) tables ([capacity,
    D_rot]) are given, writes the keys and values k, v ([B, H_kv, n, D]) into the caches at pos and attends from q over
    the slots each position sees; returns [B, n, H * D]. One token on CUDA with `kernel`: the Triton kernel does the
    writes and the attention (decode/kernels.py), and the rotary too with `kernel_rope`; a few tokens (a check) with
    `kernel` and CHECK_KERNEL: the same kernel for each token, rotating as the step does, the tokens' keys and values
    written first, apart (kernels.write_keys where the kernel rotates). Measured: the writes inside the attention
    kernel, its queries reading the check's own keys where they came from, cost more than that kernel apart at Qwen2.5
    0.5B and 1.5B (H100, BENCHMARKS.md), and were removed."""
    one = kernel and q.shape[2] == 1 and q.is_cuda
    if one and kernel_rope and rope is not None:
        return kernels.decode_attention(q, k_cache, v_cache, pos, scale, window, k, v, *rope)
    few = _few_queries(q, kernel)
    if few and kernel_rope and rope is not None:
        kernels.write_keys(k, v, k_cache, v_cache, pos, *rope)
        return kernels.attention_over_cache(q, k_cache, v_cache, pos, scale, window, *rope)
    if rope is not None:
        c, s = rope[0][pos][:, None], rope[1][pos][:, None]  # [B, 1, n, D_rot]
        q, k = rotary(q, c, s), rotary(k, c, s)
    if one:
        return kernels.decode_attention(q, k_cache, v_cache, pos, scale, window, k, v)
    write_cache(k_cache, v_cache, pos, k, v)
    if few:
        return kernels.attention_over_cache(q, k_cache, v_cache, pos, scale, window)
    return attend(q, k_cache, v_cache, causal_mask(pos, k_cache.shape[2], window), scale, gqa, softcap, matmul)


def _few_queries(q: torch.Tensor, kernel: bool) -> bool:
    """Whether a pass of several tokens attends with the kernel (CHECK_KERNEL: a check's few tokens, on CUDA)."""
    return CHECK_KERNEL and kernel and q.is_cuda and 1 < q.shape[2] <= kernels.MAX_QUERIES


def cross_attention(q, cross_k, cross_v, src_visible, src_last, scale, kernel=False) -> torch.Tensor:
    """Attends from q ([B, H, n, D]) over the source's keys and values; src_visible: [B, 1, 1, S] as a mask, or an
    additive mask of that shape; src_last: [B, 1], the last real slot. Returns [B, n, H * D]."""
    if kernel and q.shape[2] == 1 and q.is_cuda:
        return kernels.decode_attention(q, cross_k, cross_v, src_last, scale)
    if _few_queries(q, kernel):
        return kernels.attention_over_cache(q, cross_k, cross_v, src_last, scale)
    return attend(q, cross_k, cross_v, src_visible, scale)


def split_verdict(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """decode.cache.step_verdict(logits) (float32, [..., V]) with its argmax as two reductions without an index: the
    max, then the first index that holds it (or holds a NaN, which argmax takes for the max)."""
    top = logits.amax(dim=-1, keepdim=True)
    index = torch.arange(logits.shape[-1], device=logits.device)
    token = torch.where((logits == top) | logits.isnan(), index, logits.shape[-1]).amin(dim=-1)
    return 1.0 / torch.exp(logits - top).sum(dim=-1), token


def _logits_verdict(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The verdict pass: split_verdict where it is being compiled (SPLIT_VERDICT), step_verdict eagerly (where the
    split form is only more kernels)."""
    split = SPLIT_VERDICT and torch.compiler.is_compiling()
    return (split_verdict if split else step_verdict)(logits.float())


# --------------------------------------------------------------------------------------------------
# Compiling


def inductor_options(one: bool, tuned: bool) -> dict:
    """The inductor options a pass's variant compiles with (one: the one-token variant; tuned: with coordinate-descent
    tuning, TUNED_BELOW_WIDTH, and TUNE_ALL_DIRECTIONS's wider search where that is on)."""
    return dict(INDUCTOR_OPTIONS[one], coordinate_descent_tuning=tuned,
                coordinate_descent_check_all_directions=tuned and TUNE_ALL_DIRECTIONS)


def _own_code(fn):
    """fn with a code object of its own: torch.compile keeps its compiled graphs, its recompile budget and its record
    of which sizes changed per code object, so each model's passes compile for that model's shapes alone."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class Pass:
    """One function of a model's passes: its eager self, or compiled in two variants, one for a single token of a
    single row (the decode step, its sizes all static but the cache's capacity) and one for any batch and length
    (dynamic sizes). A variant that fails to compile runs eagerly, with a notice. `x`, the first argument, says which
    variant runs ([B, n, ...]). (A third variant for checks padded to one width measured 5% off a check at
    Qwen2.5-0.5B and 4% onto one at 7B on an H100, BENCHMARKS.md: not kept.)"""

    def __init__(self, fn, compile: bool, label: str, owner: "Passes"):
        self.fn, self.label, self._owner = fn, label, weakref.ref(owner)
        self.variants = {}
        if compile:
            for one, dynamic in ((True, None), (False, True)):
                options = inductor_options(one, one and owner.tune_one_token)
                self.variants[one] = torch.compile(_own_code(fn), fullgraph=True, dynamic=dynamic, options=options)
        self._first = set(self.variants)  # variants not yet run (their first call compiles)

    def __call__(self, x, *args):
        one = one_token(x)  # the variant: one token of one row, or any shape
        compiled = self.variants.get(one)
        if compiled is None:
            if x.device.type != "cuda":
                return self.fn(x, *args)
            with sdpa_kernel(UNCOMPILED_ATTENTION):
                return self.fn(x, *args)
        first = one in self._first
        if not one and x.dim() == 3:  # (each call: a recompile, for a new batch size, traces this x)
            torch._dynamo.mark_static(x, 2)  # the model's width (see _static)
        start = time.perf_counter()
        try:
            # no duck sizing: sizes that happen to be equal (a head dimension and a source length of 16) are not tied
            # together, which would compile again once they differ. Python floats (a model's embedding scale) and ints
            # (head counts, the q/k/v split) as constants, and the weights' sizes too (_static): traced as symbols,
            # floats made dynamo trace the any-shape variants twice, and dozens of symbols made guards that took
            # seconds to check on every start from the on-disk cache (on a 2-core CPU, warm: the demo BART 12.3 ->
            # 8.9 -> 4.6 s, Qwen2.5-0.5B 9.9 -> 4.1 s: scripts/bench_compile.py, BENCHMARKS.md)
            with sdpa_kernel(COMPILED_ATTENTION) if x.device.type == "cuda" else contextlib.nullcontext(), \
                    fx_config.patch(use_duck_shape=False), \
                    torch._dynamo.config.patch(specialize_float=True, specialize_int=True):
                out = compiled(x, *args)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as err:  # noqa: BLE001 - any compile failure: the eager function computes the same
            notice(f"{self._owner().name}: the {self.label} pass runs uncompiled: torch.compile failed "
                   f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")
            self.variants[one] = None
            return self.fn(x, *args)
        if first:
            self._first.discard(one)
            owner, spent = self._owner(), time.perf_counter() - start
            owner.compile_seconds += spent
            owner.compile_log.append((self.label, "one token" if one else "any shape", spent))
        return out


class Passes:
    """A model's passes: its weights as the passes read them (fused where that saves kernels) and the functions over
    them (`Pass`), shared by every runner over the model. `decoder()` makes a runner's state over them."""

    is_encoder_decoder = False

    def __init__(self, model: PreTrainedModel, compile: bool):
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.compiled = bool(compile)
        if self.device.type == "cuda" and kernels.available():
            kernels.counters(self.device)  # before any pass compiles (they read these)
        self.name = f"{type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M)"
        self.model_ref = weakref.ref(model)
        self.compile_seconds = 0.0  # spent compiling so far (first calls of each compiled variant)
        self.compile_said = 0.0  # of which the runners have told the user (decode.fast)
        self.compile_log: list[tuple[str, str, float]] = []  # (pass, variant, seconds) of each first call
        cfg = model.config
        width = getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", 0)
        self.tune_one_token = TUNE_ONE_TOKEN if TUNE_ONE_TOKEN is not None else width < TUNED_BELOW_WIDTH
        self.norm_in_product = self.compiled and self.tune_one_token and (
            NORM_IN_PRODUCT if NORM_IN_PRODUCT is not None else width <= NORM_IN_PRODUCT_UP_TO_WIDTH)
        # products that inductor writes as reductions (tuned) read a stored activation; cuBLAS calls read their inputs
        # from memory anyway
        self.mlp_activation = MLP_ACTIVATION if self.compiled and self.tune_one_token else "inline"
        self.stored_qkv = self.compiled and self.tune_one_token and STORED_QKV
        self.matmul_attention = (ONE_TOKEN_ATTENTION == "matmul" if ONE_TOKEN_ATTENTION is not None
                                 else width >= MATMUL_ATTENTION_FROM_WIDTH)
        self._params: list[tuple[torch.Tensor, torch.nn.Parameter]] = []  # (alias, parameter), to notice a reload
        self.verdict = Pass(_logits_verdict, self.compiled and COMPILED_VERDICT, "verdict", self)

    def _pass(self, fn, label: str) -> Pass:
        return Pass(fn, self.compiled, label, self)

    def _decode_kernel(self, softcap: float | None = None) -> bool:
        """Whether the one-token attention takes decode/kernels.py's kernel: on CUDA, where it computes this
        attention (head size, soft-capping) and DECODE_KERNEL is on."""
        return DECODE_KERNEL and self.device.type == "cuda" and kernels.supports(self.head_dim, softcap)

    def _keep(self, param) -> torch.Tensor | None:
        """The alias of a parameter that the passes read (watched by `stale`)."""
        if param is None:
            return None
        alias = _static(_alias(param))
        self._params.append((alias, param))
        return alias

    def stale(self) -> bool:
        """Whether a parameter no longer lives where the passes read it (the model was moved, cast or reloaded)."""
        return any(alias.data_ptr() != param.data_ptr() for alias, param in self._params)

    def decoder(self) -> "Decoder":
        raise NotImplementedError


# --------------------------------------------------------------------------------------------------
# A runner's decoder: its static buffers over the model's passes


class Decoder:
    """One runner's state over a model's passes: the KV caches (and, encoder-decoder, the cross-attention keys and
    values and the source mask) for `batch` rows of `capacity` positions."""

    def __init__(self, passes: Passes):
        self.passes = passes
        self.dtype, self.device = passes.dtype, passes.device
        self.is_encoder_decoder = passes.is_encoder_decoder
        self.n_layers, self.n_kv_heads, self.head_dim = passes.n_layers, passes.n_kv_heads, passes.head_dim
        self.capacity = 0

    def allocate(self, capacity: int, src_capacity: int, batch: int = 1) -> None:
        self.kv = StaticKV(self.n_layers, self.n_kv_heads, self.head_dim, capacity, self.dtype, self.device, batch)
        self.capacity = capacity

    def row_buffers(self) -> list[tuple[torch.Tensor, int]]:
        """The per-row state the passes read, each with its batch dimension: what moving a row moves."""
        return self.kv.buffers()

    def take_rows(self, other: "Decoder", rows: list[int]) -> None:
        """Copies rows `rows` of `other`'s state (same model, buffers no larger than these) into this decoder's
        first len(rows) rows, in that order. The rest of the buffers keep what they held: slots past a row's
        position are masked, and so are the rows no pass reads."""
        index = torch.tensor(rows, device=self.device)
        for (mine, dim), (theirs, _) in zip(self.row_buffers(), other.row_buffers()):
            src = theirs.index_select(dim, index)
            mine[tuple(slice(0, n) for n in src.shape)].copy_(src)

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """ids, pos: [B, n]. Writes the caches at pos; returns logits [B, n, V] (or [B, 1, V] with last_only)."""
        h = self.feed(ids, pos)
        return self.head(h[:, -1:] if last_only else h)

    def feed(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """ids, pos: [B, n]. Writes the caches at pos (a prompt, a catch-up) and computes no logits; returns the last
        layer's states [B, n, d]."""
        return self.run_layers(self.embed(ids, pos), pos, 0, self.n_layers)

    def embed(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """ids, pos: [B, n] -> the first layer's input [B, n, d]."""
        return self.passes.embed(ids, pos)

    def run_layers(self, h: torch.Tensor, pos: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Layers start .. stop - 1 over h [B, n, d] at positions pos [B, n], writing their caches there."""
        raise NotImplementedError

    def verdict(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A step's verdict from the head's logits [B, 1, V] (the model's dtype): each row's top probability (float32)
        and argmax, [B] each (decode.cache.step_verdict, in float32)."""
        confidence, token = self.passes.verdict(logits)
        return confidence[:, 0], token[:, 0]

    def head(self, h: torch.Tensor, norm=None) -> torch.Tensor:
        """The output head over the last layer's states [B, n, d] -> logits [B, n, V], in the model's dtype. `norm`
        (a module) replaces the final norm (an early exit's own copy); the LM head is always the model's."""
        if norm is None:
            return self.passes.head(h)
        return output_logits(self.passes.model_ref(), h, norm)
