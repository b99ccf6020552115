"""Compact decoder passes, one per model family, over a Hugging Face model's own weights.

    passes = model_passes(model, compile=True)    # once per model: fused weights, compiled functions
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
  as gpt-fast does) and any batch and length (checks, prefill, batches; cuBLAS products). The cache's capacity is a
  dynamic dimension, so growing the buffers compiles nothing. Which settings the one-token variant compiles with
  depends on the model's width, by measurement (TUNED_BELOW_WIDTH, MATMUL_ATTENTION_FROM_WIDTH).
- The KV cache is one buffer per layer, written by position; a mask built from the positions hides every slot past
  them (and outside a sliding window). Rolling back is moving the position.
- On CUDA a one-token pass attends with a Triton kernel (decode/kernels.py) that writes the token's key and value
  and reads only the slots its position sees, one kernel per attention (DECODE_KERNEL).

Covered: Llama (any static rope type), Qwen2, Mistral, Qwen3, Phi-3, Gemma 2, Gemma 3 text (decoder-only, sliding
windows included); BART, Marian, T5/mT5 (encoder-decoder).
`unsupported_reason` says why anything else runs on the eager path.
"""

from __future__ import annotations

import contextlib
import sys
import time
import types
import weakref

import torch
import torch.fx.experimental._config as fx_config
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import PreTrainedModel
from transformers.activations import ACT2FN

import decode.kernels as kernels

_GEMMA = ("gemma2", "gemma3_text")
_DECODER_ONLY = ("llama", "qwen2", "mistral", "qwen3", "phi3") + _GEMMA
_ENC_DEC = ("bart", "marian", "t5", "mt5")

# Inductor settings for the compiled passes. No online softmax: inductor splits the long softmaxes here and says so.
INDUCTOR_OPTIONS = {True: {"online_softmax": False}, False: {"online_softmax": False}}
# Coordinate-descent tuning of the one-token pass (gpt-fast's setting: one-row products become Triton reductions,
# fused with the norm before them) for models narrower than this. Measured on an H200 (BENCHMARKS.md): it shortened
# the step of the demo BART (width 512, graph 0.326 -> 0.232 ms) and of Qwen2.5-0.5B (896, 1.156 -> 1.060), and
# slowed Qwen2.5-1.5B (1536: 3.70 ms against 2.88 for an 11-token check). TUNE_ONE_TOKEN = True or False overrides it.
TUNED_BELOW_WIDTH = 1024
TUNE_ONE_TOKEN: bool | None = None
# The attention backends a compiled pass may trace on CUDA; the math one is decomposed into kernels that inductor
# fuses (masks, grouped heads and T5's position bias included). Measured choice: BENCHMARKS.md.
COMPILED_ATTENTION = [SDPBackend.MATH]
# Whether the compiled passes group query heads over their shared key/value head (grouped_attention) or hand every
# attention to SDPA as the uncompiled passes do (measured against each other: BENCHMARKS.md).
GROUPED_ATTENTION = True
# How the compiled one-token attention of a decoder-only model computes its scores and output: as float32 sums that
# inductor writes as reductions fused with the softmax (one program per query row), or, for models at least this
# wide, as two batched products in the model's dtype around a float32 softmax (transformers' eager arithmetic).
# Measured on an H200 (BENCHMARKS.md), graph-only step: Qwen2.5-7B (width 3584) 5.147 -> 4.675 ms with the products,
# 1.5B (1536) 1.934 -> 1.910, 0.5B (896) 1.156 -> 1.188, the demo BART 0.326 -> 0.376. ONE_TOKEN_ATTENTION = "reduce"
# or "matmul" overrides it.
MATMUL_ATTENTION_FROM_WIDTH = 2048
ONE_TOKEN_ATTENTION: str | None = None
# Whether a one-token pass on CUDA attends with decode/kernels.py's Triton kernel, which writes the cache and reads
# only the slots the token sees, in one kernel. Measured on an H200 against what inductor makes of the passes' own
# attention (BENCHMARKS.md), compiled graph-only step: Qwen2.5-0.5B 1.380 -> 0.944 ms, the demo BART 0.225 -> 0.187;
# Qwen2.5-7B 4.803 (products) against 4.831 (kernel), so compiled models from MATMUL_ATTENTION_FROM_WIDTH on keep
# their products. The uncompiled passes always take it where it applies (kernels.supports).
DECODE_KERNEL = True
# Whether that kernel also rotates q and k (Llama's rotary, partial or whole), where the passes' own rotary is two or
# three more kernels per layer (about ten uncompiled). Measured on an H100 (BENCHMARKS.md), uncompiled passes in
# graphs, step with the host read: Qwen2.5-0.5B 2.403 -> 1.870 ms, Qwen2.5-7B 7.315 -> 6.678; compiled, graph-only
# step: 0.5B 1.040 -> 0.968, 1.5B 2.039 -> 2.032 (compiled models from MATMUL_ATTENTION_FROM_WIDTH on keep their
# products and their own rotary).
KERNEL_ROTARY = True
# Whether a one-token pass on CUDA computes a SiLU-gated MLP's down product with decode/kernels.py's split-K kernel
# (the activation computed on the fly) instead of the passes' own arithmetic. A profile on an H100 (BENCHMARKS.md)
# measured inductor's down product at 29% of the copy bandwidth at Qwen2.5-0.5B; the kernel is tested in Triton's
# interpreter, not yet measured on a GPU: off until it is (`bench_step.py --variants down-kernel`).
DOWN_KERNEL = False
# The backends the uncompiled passes may take on CUDA: all of them, whatever a process-wide switch says (the eager
# path turns cuDNN off for its changing shapes; a graphed pass has fixed shapes). Measured with these: BENCHMARKS.md.
UNCOMPILED_ATTENTION = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH]


def unsupported_reason(model: PreTrainedModel) -> str | None:
    """Why the compact passes cannot run this model, or None when they can."""
    cfg = model.config
    kind = getattr(cfg, "model_type", "")
    if kind == "gemma3":
        return "Gemma 3 with its vision tower: load the text model alone (Gemma3ForCausalLM) for the fast path"
    if kind not in _DECODER_ONLY + _ENC_DEC:
        return f"no compact decoder for model type {kind!r} (fast path: {', '.join(_DECODER_ONLY + _ENC_DEC)})"
    if kind in ("t5", "mt5") and next(model.parameters()).dtype == torch.float16:
        return "T5 in float16 needs transformers' activation clamping; use bfloat16 or float32"
    if any(_rope_type(r) == "dynamic" for r in _ropes(cfg)):
        return "rope type 'dynamic' changes with the sequence length"
    if getattr(cfg, "use_bidirectional_attention", False):
        return "bidirectional attention (use_bidirectional_attention) is not a causal decoder"
    return None


def _ropes(cfg) -> list[dict]:
    """The config's rope settings: one mapping, or Gemma 3's one per layer type (none: an empty list)."""
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if not isinstance(rope, dict) or not rope:
        return []
    return list(rope.values()) if all(isinstance(v, dict) for v in rope.values()) else [rope]


def _rope_type(rope: dict) -> str | None:
    return rope.get("rope_type", rope.get("type"))


_SAID: set[str] = set()


def notice(message: str) -> None:
    """Prints a one-line notice once per process (which decoding path runs, what was compiled)."""
    if message not in _SAID:
        _SAID.add(message)
        print(f"[bild] {message}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# The pieces every family is made of


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias. Compiled, the bias is added apart: inductor turns a one-row product without bias into a
    tuned reduction (and fuses the add into it), while a product with bias stays a cuBLAS call."""
    if bias is None:
        return F.linear(x, weight)
    if torch.compiler.is_compiling():
        return F.linear(x, weight) + bias
    return F.linear(x, weight, bias)


def soft_cap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap), Gemma 2's soft-capping of attention scores and logits; x itself without a cap."""
    return x if cap is None else torch.tanh(x / cap) * cap


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's and Qwen2's RMSNorm, in their order of casts (float32 inside, the input's dtype out)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


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
    """Keys and values of every layer: [layers, B, H_kv, capacity, D] each, written by position; `layers[i]` is layer
    i's (keys, values) pair of views."""

    def __init__(self, layers: int, heads: int, head_dim: int, capacity: int, dtype, device, batch: int = 1):
        # zeros, not empty: masked slots are multiplied by 0 in attention, and 0 * NaN would be NaN
        self.k = torch.zeros(layers, batch, heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.layers = [(self.k[i], self.v[i]) for i in range(layers)]
        for pair in self.layers:  # the compiled passes take any capacity without compiling again
            for t in pair:
                torch._dynamo.maybe_mark_dynamic(t, 2)


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
    return weight, bias


_FUSED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _alias(t: torch.Tensor | None) -> torch.Tensor | None:
    """A plain tensor over a parameter's storage (what a compiled pass takes as an argument)."""
    return None if t is None else t.detach()


# --------------------------------------------------------------------------------------------------
# Compiling


def _own_code(fn):
    """fn with a code object of its own: torch.compile keeps its compiled graphs, its recompile budget and its record
    of which sizes changed per code object, so each model's passes compile for that model's shapes alone."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class Pass:
    """One function of a model's passes: its eager self, or compiled in two variants, one for a single token of a
    single row (the decode step, its sizes all static but the cache's capacity) and one for any batch and length
    (dynamic sizes). A variant that fails to compile runs eagerly, with a notice. `x`, the first argument, says which
    variant runs ([B, n, ...])."""

    def __init__(self, fn, compile: bool, label: str, owner: "Passes"):
        self.fn, self.label, self._owner = fn, label, weakref.ref(owner)
        self.variants = {}
        if compile:
            for one, dynamic in ((True, None), (False, True)):
                options = dict(INDUCTOR_OPTIONS[one], coordinate_descent_tuning=one and owner.tune_one_token)
                self.variants[one] = torch.compile(_own_code(fn), fullgraph=True, dynamic=dynamic, options=options)
        self._first = {True, False}  # variants not yet run (their first call compiles)

    def __call__(self, x, *args):
        one = x.shape[0] == 1 and x.shape[1] == 1
        compiled = self.variants.get(one)
        if compiled is None:
            if x.device.type != "cuda":
                return self.fn(x, *args)
            with sdpa_kernel(UNCOMPILED_ATTENTION):
                return self.fn(x, *args)
        first = one in self._first
        start = time.perf_counter()
        try:
            # no duck sizing: sizes that happen to be equal (a head dimension and a source length of 16) are not tied
            # together, which would compile again once they differ
            with sdpa_kernel(COMPILED_ATTENTION) if x.device.type == "cuda" else contextlib.nullcontext(), \
                    fx_config.patch(use_duck_shape=False):
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
        self.name = f"{type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M)"
        self.model_ref = weakref.ref(model)
        self.compile_seconds = 0.0  # spent compiling so far (first calls of each compiled variant)
        self.compile_log: list[tuple[str, str, float]] = []  # (pass, variant, seconds) of each first call
        cfg = model.config
        width = getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", 0)
        self.tune_one_token = TUNE_ONE_TOKEN if TUNE_ONE_TOKEN is not None else width < TUNED_BELOW_WIDTH
        self.matmul_attention = (ONE_TOKEN_ATTENTION == "matmul" if ONE_TOKEN_ATTENTION is not None
                                 else width >= MATMUL_ATTENTION_FROM_WIDTH)
        self._params: list[tuple[torch.Tensor, torch.nn.Parameter]] = []  # (alias, parameter), to notice a reload

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
        alias = _alias(param)
        self._params.append((alias, param))
        return alias

    def stale(self) -> bool:
        """Whether a parameter no longer lives where the passes read it (the model was moved, cast or reloaded)."""
        return any(alias.data_ptr() != param.data_ptr() for alias, param in self._params)

    def decoder(self) -> "Decoder":
        raise NotImplementedError


_PASSES: "weakref.WeakKeyDictionary[PreTrainedModel, dict[bool, Passes]]" = weakref.WeakKeyDictionary()


def model_passes(model: PreTrainedModel, compile: bool = False) -> Passes:
    """The model's passes (compiled or not), made on first use and again when its weights moved."""
    per_model = _PASSES.setdefault(model, {})
    passes = per_model.get(bool(compile))
    param = next(model.parameters())
    if passes is None or (passes.device, passes.dtype) != (param.device, param.dtype) or passes.stale():
        kind = model.config.model_type
        family = LlamaPasses if kind in _DECODER_ONLY else T5Passes if kind in ("t5", "mt5") else BartPasses
        passes = per_model[bool(compile)] = family(model, compile)
    return passes


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
        return [(self.kv.k, 1), (self.kv.v, 1)]

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

    def head(self, h: torch.Tensor, norm=None) -> torch.Tensor:
        """The output head over the last layer's states [B, n, d] -> logits [B, n, V], in the model's dtype. `norm`
        (a module) replaces the final norm (an early exit's own copy); the LM head is always the model's."""
        if norm is None:
            return self.passes.head(h)
        return output_logits(self.passes.model_ref(), h, norm)


# --------------------------------------------------------------------------------------------------
# Decoder-only: Llama, Qwen2, Mistral, Qwen3, Phi-3, Gemma 2, Gemma 3


class LlamaPasses(Passes):
    """The decoder-only families: pre-norm layers, rotary positions, grouped-query attention, optional sliding windows.
    What differs between them is read off the model once, here, and handed to one layer function:
    - Llama (any static rope type: llama3, linear, yarn), Qwen2, Mistral: the plain layer.
    - Qwen3: an RMSNorm over each head of q and k before the rotary.
    - Phi-3: q/k/v and gate/up already fused in the checkpoint; rotary over part of each head.
    - Gemma 2 and Gemma 3 (text): norms that scale by 1 + weight, norms after attention and after the MLP as well as
      before, scaled embeddings, the query scaled by `query_pre_attn_scalar`, soft-capped attention scores and logits
      where configured, sliding and global layers interleaved; Gemma 3 has q/k norms and a rotary table per layer type.
    """

    def __init__(self, model, compile):
        super().__init__(model, compile)
        cfg = model.config
        inner = model.model
        self.rotary = inner.rotary_emb
        self.embed_tokens, self.final_norm = inner.embed_tokens, inner.norm
        layers = list(inner.layers)
        self.n_layers = len(layers)
        attn = layers[0].self_attn
        self.n_heads, self.n_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = attn.head_dim
        layer_types = getattr(cfg, "layer_types", None)
        window = getattr(cfg, "sliding_window", None)
        if layer_types is not None:
            self.windows = [window if t == "sliding_attention" else None for t in layer_types]
        else:  # Mistral: one window for every layer, or none
            self.windows = [window] * self.n_layers
        # Gemma 3's rotary module keeps one table per layer type (local and global bases); the others, one
        self.rope_keys = list(layer_types) if hasattr(self.rotary, "layer_types") else [None] * self.n_layers
        # longrope switches every position to its long factors once a sequence passes the original length
        longrope = [r for r in _ropes(cfg) if _rope_type(r) == "longrope"]
        self.rope_limit = (longrope[0].get("original_max_position_embeddings") or cfg.max_position_embeddings
                           if longrope else None)
        norm = gemma_norm if cfg.model_type in _GEMMA else rms_norm
        scale = getattr(self.embed_tokens, "embed_scale", None)
        # Gemma: sqrt(d) rounded to the weights' dtype first, as transformers does (a Python number: graph capture
        # allows no host-to-device copy)
        self.embed_scale = None if scale is None else float(torch.as_tensor(float(scale)).to(self.dtype))
        self.weights = []
        for layer in layers:
            a, m = layer.self_attn, layer.mlp
            if hasattr(a, "qkv_proj"):  # Phi-3
                qkv, qkv_bias = self._keep(a.qkv_proj.weight), self._keep(a.qkv_proj.bias)
            else:
                qkv, qkv_bias = fuse_linears([a.q_proj, a.k_proj, a.v_proj])
                self._params.append((qkv, a.q_proj.weight))
            if hasattr(m, "gate_up_proj"):
                gate_up, gate_up_bias = self._keep(m.gate_up_proj.weight), self._keep(getattr(m.gate_up_proj, "bias", None))
            else:
                gate_up, gate_up_bias = fuse_linears([m.gate_proj, m.up_proj])
                self._params.append((gate_up, m.gate_proj.weight))
            sandwich = hasattr(layer, "post_feedforward_layernorm")  # Gemma: pre_feedforward is the MLP's input norm
            mlp_norm = layer.pre_feedforward_layernorm if sandwich else layer.post_attention_layernorm
            q_norm, k_norm = getattr(a, "q_norm", None), getattr(a, "k_norm", None)
            self.weights.append((
                self._keep(layer.input_layernorm.weight), qkv, qkv_bias,
                self._keep(q_norm.weight if q_norm is not None else None),
                self._keep(k_norm.weight if k_norm is not None else None),
                self._keep(a.o_proj.weight), self._keep(a.o_proj.bias),
                self._keep(layer.post_attention_layernorm.weight if sandwich else None),
                self._keep(mlp_norm.weight), gate_up, gate_up_bias,
                self._keep(m.down_proj.weight), self._keep(m.down_proj.bias),
                self._keep(layer.post_feedforward_layernorm.weight if sandwich else None)))
        eps = _eps(layers[0].input_layernorm)
        final_eps = _eps(inner.norm)
        self.final_weight = self._keep(inner.norm.weight)
        act = ACT2FN[getattr(cfg, "hidden_activation", None) or cfg.hidden_act]
        softcap = getattr(cfg, "attn_logit_softcapping", None)
        if softcap is not None and getattr(cfg, "_attn_implementation", None) == "sdpa":
            # transformers' SDPA attention drops the soft-capping (Gemma 2 loads with it by default in transformers
            # before 5.2x): the passes compute what the model computes
            notice(f"{self.name}: its attention (sdpa) skips attn_logit_softcapping, and so do the fast passes; "
                   "load it with attn_implementation='eager' for Gemma 2's soft-capped attention")
            softcap = None
        # compiled, models as wide as MATMUL_ATTENTION_FROM_WIDTH keep their batched products (measured as fast)
        kernel = self._decode_kernel(softcap) and not (compile and self.matmul_attention)
        silu = (getattr(cfg, "hidden_activation", None) or cfg.hidden_act) in ("silu", "swish")
        down_programs = (kernels.DOWN_PROGRAMS_PER_SM * torch.cuda.get_device_properties(self.device).multi_processor_count
                         if DOWN_KERNEL and kernels.available() and self.device.type == "cuda" and silu
                         and all(w[12] is None for w in self.weights) else 0)
        self.layer = {w: self._pass(_llama_layer(self.n_heads, self.n_kv_heads, self.head_dim, eps, attn.scaling, act, w,
                                                 norm, softcap, self.matmul_attention, kernel, KERNEL_ROTARY,
                                                 down_programs),
                                    f"layer{' (sliding window)' if w is not None else ''}")
                      for w in set(self.windows)}
        self.head_weight = self._keep(model.lm_head.weight)
        head_weight = self.head_weight
        logit_cap = getattr(cfg, "final_logit_softcapping", None)

        def head(h, norm_weight):
            return soft_cap(linear(norm(h, norm_weight, final_eps), head_weight), logit_cap)

        self._head = self._pass(head, "head")

    def embed(self, ids, pos):
        weight = self.embed_tokens.weight
        h = F.embedding(ids, weight)  # [B, n, d]
        if self.embed_scale is not None:
            h = h * self.embed_scale
        return h

    def head(self, h):
        return self._head(h, self.final_weight)

    def rotary_tables(self, capacity: int, layer_type: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's own rotary module over every position: cos, sin [capacity, D_rot] (its scaling included; D_rot is
        the head dimension or, for Phi-3's partial rotary, less)."""
        if self.rope_limit is not None and capacity > self.rope_limit:
            raise ValueError(f"{self.name}: its longrope positions change past {self.rope_limit} tokens, and the fast "
                             f"path covers sequences up to there ({capacity} asked); decode with fast_path=False")
        pos = torch.arange(capacity, device=self.device)[None]
        x = torch.zeros(1, dtype=self.dtype, device=self.device)
        cos, sin = self.rotary(x, pos) if layer_type is None else self.rotary(x, pos, layer_type)
        return cos[0], sin[0]

    def decoder(self):
        return LlamaDecoder(self)


def _eps(norm) -> float:
    return norm.variance_epsilon if hasattr(norm, "variance_epsilon") else norm.eps


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
    writes and the attention (decode/kernels.py), and the rotary too with `kernel_rope`."""
    one = kernel and q.shape[2] == 1 and q.is_cuda
    if one and kernel_rope and rope is not None:
        return kernels.decode_attention(q, k_cache, v_cache, pos, scale, window, k, v, *rope)
    if rope is not None:
        c, s = rope[0][pos][:, None], rope[1][pos][:, None]  # [B, 1, n, D_rot]
        q, k = rotary(q, c, s), rotary(k, c, s)
    if one:
        return kernels.decode_attention(q, k_cache, v_cache, pos, scale, window, k, v)
    write_cache(k_cache, v_cache, pos, k, v)
    return attend(q, k_cache, v_cache, causal_mask(pos, k_cache.shape[2], window), scale, gqa, softcap, matmul)


def cross_attention(q, cross_k, cross_v, src_visible, src_last, scale, kernel=False) -> torch.Tensor:
    """Attends from q ([B, H, n, D]) over the source's keys and values; src_visible: [B, 1, 1, S] as a mask, or an
    additive mask of that shape; src_last: [B, 1], the last real slot. Returns [B, n, H * D]."""
    if kernel and q.shape[2] == 1 and q.is_cuda:
        return kernels.decode_attention(q, cross_k, cross_v, src_last, scale)
    return attend(q, cross_k, cross_v, src_visible, scale)


def _llama_layer(n_heads, n_kv_heads, head_dim, eps, scale, act, window, norm=rms_norm, softcap=None, matmul=False,
                 kernel=False, kernel_rope=False, down_programs=0):
    split = [n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim]
    gqa = n_heads != n_kv_heads

    def layer(h, pos, cos, sin, k_cache, v_cache, w):
        """One decoder-only layer over h [B, n, d] at pos [B, n]; cos, sin: [capacity, D_rot]; writes the caches.
        The weights a family lacks (q/k norms, the norms after attention and MLP, biases) are None."""
        ln1, qkv_w, qkv_b, q_ln, k_ln, o_w, o_b, attn_ln, ln2, gate_up_w, gate_up_b, down_w, down_b, mlp_ln = w
        q, k, v = linear(norm(h, ln1, eps), qkv_w, qkv_b).split(split, dim=-1)
        q, k, v = heads(q, n_heads), heads(k, n_kv_heads), heads(v, n_kv_heads)
        if q_ln is not None:
            q, k = norm(q, q_ln, eps), norm(k, k_ln, eps)
        out = self_attention(q, k, v, k_cache, v_cache, pos, scale, window, gqa, softcap, matmul, kernel, (cos, sin),
                             kernel_rope)
        out = linear(out, o_w, o_b)
        h = h + (out if attn_ln is None else norm(out, attn_ln, eps))
        gate_up = linear(norm(h, ln2, eps), gate_up_w, gate_up_b)
        if down_programs and gate_up.shape[1] == 1 and gate_up.is_cuda:  # one token: the split-K kernel
            out = kernels.gated_down(gate_up, down_w, down_programs)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            out = linear(act(gate) * up, down_w, down_b)
        return h + (out if mlp_ln is None else norm(out, mlp_ln, eps))

    return layer


class LlamaDecoder(Decoder):
    def allocate(self, capacity, src_capacity, batch=1):
        super().allocate(capacity, src_capacity, batch)
        self.tables = {key: self.passes.rotary_tables(capacity, key) for key in set(self.passes.rope_keys)}
        for t in (t for pair in self.tables.values() for t in pair):
            torch._dynamo.maybe_mark_dynamic(t, 0)

    def run_layers(self, h, pos, start, stop):
        p = self.passes
        for i in range(start, stop):
            k_cache, v_cache = self.kv.layers[i]
            cos, sin = self.tables[p.rope_keys[i]]
            h = p.layer[p.windows[i]](h, pos, cos, sin, k_cache, v_cache, p.weights[i])
        return h


# --------------------------------------------------------------------------------------------------
# Encoder-decoder families: the encoder once per input, cross-attention keys and values in static buffers


class EncoderDecoderDecoder(Decoder):
    """A runner's state for an encoder-decoder model: self-attention caches, cross-attention K/V, source mask."""

    def __init__(self, passes):
        super().__init__(passes)
        self.n_heads = passes.n_heads

    def allocate(self, capacity, src_capacity, batch=1):
        super().allocate(capacity, src_capacity, batch)
        self.cross = StaticKV(self.n_layers, self.n_heads, self.head_dim, src_capacity, self.dtype, self.device, batch)
        self.src_visible = torch.zeros(batch, 1, 1, src_capacity, dtype=torch.bool, device=self.device)
        torch._dynamo.maybe_mark_dynamic(self.src_visible, 3)
        self.src_last = torch.zeros(batch, 1, dtype=torch.long, device=self.device)  # the last real source slot
        self.src_capacity = src_capacity

    def row_buffers(self):
        return super().row_buffers() + [(self.cross.k, 1), (self.cross.v, 1), (self.src_visible, 0), (self.src_last, 0)]

    def take_rows(self, other, rows):
        # source slots past the other's buffers are hidden; every row keeps one visible slot, as a batch's rows
        # past the input do: a fully masked attention row would be NaN
        self.src_visible.zero_()
        self.src_visible[..., 0] = True
        self.src_last.zero_()
        super().take_rows(other, rows)

    def see_whole_source(self) -> None:
        """Every source slot counts as real (while a graph is captured over junk: a fully masked row would be NaN)."""
        self.src_visible.fill_(True)
        self.src_last.fill_(self.src_capacity - 1)

    def encode(self, src_ids: torch.Tensor, src_len: torch.Tensor) -> None:
        """src_ids: [B, S_b], the inputs right-padded to a bucket length; src_len: [B], their real lengths (on
        the device). Runs the encoder and writes every layer's cross-attention keys and values; positions past
        a row's src_len hold finite junk that `src_visible` hides."""
        bucket = src_ids.shape[1]
        key_visible = torch.arange(bucket, device=self.device) < src_len[:, None]  # [B, S_b]
        hidden = self.passes.encoder_forward(src_ids, key_visible)  # [B, S_b, d]
        p = self.passes
        for i in range(self.n_layers):
            k_cache, v_cache = self.cross.layers[i]
            p.cross_kv(hidden, k_cache, v_cache, p.cross_weights[i])
        slots = torch.arange(self.src_capacity, device=self.device)
        self.src_visible.copy_((slots < src_len[:, None])[:, None, None])
        self.src_last.copy_(src_len[:, None] - 1)


def _cross_kv(n_heads):
    def cross_kv(hidden, k_cache, v_cache, w):
        """The encoder's states [B, S, d] -> one layer's cross-attention keys and values, written at slots 0..S-1."""
        k, v = linear(hidden, w[0], w[1]).chunk(2, dim=-1)
        k_cache[:, :, : hidden.shape[1]] = heads(k, n_heads)
        v_cache[:, :, : hidden.shape[1]] = heads(v, n_heads)

    return cross_kv


class _EncoderDecoderPasses(Passes):
    is_encoder_decoder = True

    def __init__(self, model, compile):
        super().__init__(model, compile)
        self.encoder, self.dec = model.get_encoder(), model.get_decoder()


class BartPasses(_EncoderDecoderPasses):
    """BART and Marian: post-norm layers, learned (BART, offset 2) or sinusoidal (Marian) positions."""

    def __init__(self, model, compile):
        super().__init__(model, compile)
        cfg, dec = model.config, self.dec
        layers = list(dec.layers)
        self.n_layers = len(layers)
        attn = layers[0].self_attn
        self.n_heads = self.n_kv_heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.final_norm = getattr(dec, "layer_norm", None)
        act = ACT2FN[cfg.activation_function]
        eps = layers[0].self_attn_layer_norm.eps

        def ln(module):
            return self._keep(module.weight), self._keep(module.bias)

        self.weights, self.cross_weights = [], []
        for layer in layers:
            a, c = layer.self_attn, layer.encoder_attn
            qkv, qkv_b = fuse_linears([a.q_proj, a.k_proj, a.v_proj])
            self._params.append((qkv, a.q_proj.weight))
            self.weights.append((qkv, qkv_b, self._keep(a.out_proj.weight), self._keep(a.out_proj.bias),
                                 *ln(layer.self_attn_layer_norm), self._keep(c.q_proj.weight), self._keep(c.q_proj.bias),
                                 self._keep(c.out_proj.weight), self._keep(c.out_proj.bias), *ln(layer.encoder_attn_layer_norm),
                                 self._keep(layer.fc1.weight), self._keep(layer.fc1.bias), self._keep(layer.fc2.weight),
                                 self._keep(layer.fc2.bias), *ln(layer.final_layer_norm)))
            kv, kv_b = fuse_linears([c.k_proj, c.v_proj])
            self._params.append((kv, c.k_proj.weight))
            self.cross_weights.append((kv, kv_b))
        kernel = self._decode_kernel()
        self.layer = self._pass(_bart_layer(self.n_heads, eps, attn.scaling, act, kernel), "layer")
        self.cross_kv = self._pass(_cross_kv(self.n_heads), "cross-attention keys and values")
        self.enc_weights = []
        for layer in self.encoder.layers:
            a = layer.self_attn
            qkv, qkv_b = fuse_linears([a.q_proj, a.k_proj, a.v_proj])
            self._params.append((qkv, a.q_proj.weight))
            self.enc_weights.append((qkv, qkv_b, self._keep(a.out_proj.weight), self._keep(a.out_proj.bias),
                                     *ln(layer.self_attn_layer_norm), self._keep(layer.fc1.weight),
                                     self._keep(layer.fc1.bias), self._keep(layer.fc2.weight), self._keep(layer.fc2.bias),
                                     *ln(layer.final_layer_norm)))
        self.enc_layer = self._pass(_bart_encoder_layer(self.n_heads, eps, self.encoder.layers[0].self_attn.scaling, act),
                                    "encoder layer")
        # Marian scales here, BART inside its embedding module
        self.embed_scale = getattr(dec, "embed_scale", 1.0) * getattr(dec.embed_tokens, "embed_scale", 1.0)
        self.enc_embed_scale = getattr(self.encoder, "embed_scale", 1.0) * getattr(self.encoder.embed_tokens, "embed_scale", 1.0)
        self.pos_offset = getattr(dec.embed_positions, "offset", 0)
        self.embed_norm = ln(dec.layernorm_embedding) if getattr(dec, "layernorm_embedding", None) is not None else None
        enc_norm = getattr(self.encoder, "layernorm_embedding", None)
        self.enc_embed_norm = ln(enc_norm) if enc_norm is not None else None
        self.enc_final = ln(self.encoder.layer_norm) if getattr(self.encoder, "layer_norm", None) is not None else None
        self.final = ln(self.final_norm) if self.final_norm is not None else None
        self.final_eps = self.final_norm.eps if self.final_norm is not None else eps
        self.head_weight = self._keep(model.lm_head.weight)
        self.eps = eps
        self._embed = self._pass(_bart_embed(eps), "embedding")

    @property
    def logits_bias(self):  # a buffer, replaced (not moved in place) when the model moves: read from the model
        return self.model_ref().final_logits_bias

    def embed(self, ids, pos):
        dec = self.dec
        return self._embed(ids, pos, dec.embed_tokens.weight, dec.embed_positions.weight, self.embed_scale,
                           self.pos_offset, self.embed_norm)

    def encoder_forward(self, ids, key_visible):
        """ids: [B, S]; key_visible: [B, S]. The encoder's layers written out (post-norm, as the decoder's)."""
        enc = self.encoder
        pos = torch.arange(ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)
        h = self._embed(ids, pos, enc.embed_tokens.weight, enc.embed_positions.weight, self.enc_embed_scale,
                        self.pos_offset, self.enc_embed_norm)
        mask = key_visible[:, None, None, :]
        for w in self.enc_weights:
            h = self.enc_layer(h, mask, w)
        if self.enc_final is not None:
            h = F.layer_norm(h, h.shape[-1:], *self.enc_final, self.eps)
        return h

    def head(self, h):
        if self.final is not None:
            h = F.layer_norm(h, h.shape[-1:], *self.final, self.final_eps)
        return linear(h, self.head_weight) + self.logits_bias

    def decoder(self):
        return BartDecoder(self)


def _bart_embed(eps):
    def embed(ids, pos, table, positions, scale, offset, norm):
        """Token embeddings (scaled) plus learned or sinusoidal positions, then the embedding norm where there is one.
        Positions are clamped: a batch's padding tokens sit past their row's end and may run past the table."""
        h = F.embedding(ids, table) * scale + positions[(pos + offset).clamp(max=positions.shape[0] - 1)]
        return F.layer_norm(h, h.shape[-1:], *norm, eps) if norm is not None else h

    return embed


def _bart_layer(n_heads, eps, scale, act, kernel=False):
    def layer(h, pos, k_cache, v_cache, cross_k, cross_v, src_visible, src_last, w):
        """One BART decoder layer (post-norm) over h [B, n, d] at pos [B, n]; writes the self-attention caches."""
        (qkv_w, qkv_b, o_w, o_b, ln1_w, ln1_b, cq_w, cq_b, co_w, co_b, ln2_w, ln2_b,
         fc1_w, fc1_b, fc2_w, fc2_b, ln3_w, ln3_b) = w
        d = h.shape[-1:]
        q, k, v = (heads(x, n_heads) for x in linear(h, qkv_w, qkv_b).chunk(3, dim=-1))
        out = self_attention(q, k, v, k_cache, v_cache, pos, scale, kernel=kernel)
        h = F.layer_norm(h + linear(out, o_w, o_b), d, ln1_w, ln1_b, eps)
        out = cross_attention(heads(linear(h, cq_w, cq_b), n_heads), cross_k, cross_v, src_visible, src_last, scale, kernel)
        h = F.layer_norm(h + linear(out, co_w, co_b), d, ln2_w, ln2_b, eps)
        return F.layer_norm(h + linear(act(linear(h, fc1_w, fc1_b)), fc2_w, fc2_b), d, ln3_w, ln3_b, eps)

    return layer


def _bart_encoder_layer(n_heads, eps, scale, act):
    def layer(h, mask, w):
        """One BART encoder layer over h [B, S, d]; mask: [B, 1, 1, S] (the source positions that are real)."""
        qkv_w, qkv_b, o_w, o_b, ln1_w, ln1_b, fc1_w, fc1_b, fc2_w, fc2_b, ln2_w, ln2_b = w
        d = h.shape[-1:]
        q, k, v = (heads(x, n_heads) for x in linear(h, qkv_w, qkv_b).chunk(3, dim=-1))
        h = F.layer_norm(h + linear(attend(q, k, v, mask, scale), o_w, o_b), d, ln1_w, ln1_b, eps)
        return F.layer_norm(h + linear(act(linear(h, fc1_w, fc1_b)), fc2_w, fc2_b), d, ln2_w, ln2_b, eps)

    return layer


class BartDecoder(EncoderDecoderDecoder):
    def run_layers(self, h, pos, start, stop):
        p = self.passes
        for i in range(start, stop):
            k_cache, v_cache = self.kv.layers[i]
            cross_k, cross_v = self.cross.layers[i]
            h = p.layer(h, pos, k_cache, v_cache, cross_k, cross_v, self.src_visible, self.src_last, p.weights[i])
        return h


class T5Passes(_EncoderDecoderPasses):
    """T5 and mT5: pre-norm (RMS) layers, a relative position bias shared by every layer, no attention scaling."""

    def __init__(self, model, compile):
        super().__init__(model, compile)
        cfg, dec = model.config, self.dec
        blocks = list(dec.block)  # the decoder's depth, which may differ from the encoder's
        self.n_layers = len(blocks)
        self.rel = blocks[0].layer[0].SelfAttention
        self.n_heads = self.n_kv_heads = self.rel.n_heads
        self.head_dim = self.rel.key_value_proj_dim
        scale = getattr(cfg, "scale_decoder_outputs", cfg.tie_word_embeddings)
        self.output_scale = cfg.d_model**-0.5 if scale else None
        self.final_norm = dec.final_layer_norm
        eps = blocks[0].layer[0].layer_norm.variance_epsilon
        act = ACT2FN[cfg.dense_act_fn]
        self.weights, self.cross_weights, self.enc_weights = [], [], []
        for block in blocks:
            sa, ca, ff = block.layer[0], block.layer[1], block.layer[-1]
            a, c = sa.SelfAttention, ca.EncDecAttention
            qkv, _ = fuse_linears([a.q, a.k, a.v])
            kv, _ = fuse_linears([c.k, c.v])
            self._params += [(qkv, a.q.weight), (kv, c.k.weight)]
            self.weights.append((self._keep(sa.layer_norm.weight), qkv, self._keep(a.o.weight),
                                 self._keep(ca.layer_norm.weight), self._keep(c.q.weight), self._keep(c.o.weight),
                                 *self._mlp(ff)))
            self.cross_weights.append((kv, None))
        for block in self.encoder.block:
            sa, ff = block.layer[0], block.layer[-1]
            a = sa.SelfAttention
            qkv, _ = fuse_linears([a.q, a.k, a.v])
            self._params.append((qkv, a.q.weight))
            self.enc_weights.append((self._keep(sa.layer_norm.weight), qkv, self._keep(a.o.weight), *self._mlp(ff)))
        gated = bool(getattr(cfg, "is_gated_act", False))
        kernel = self._decode_kernel()
        self.layer = self._pass(_t5_layer(self.n_heads, eps, act, gated, kernel), "layer")
        self.enc_layer = self._pass(_t5_encoder_layer(self.n_heads, eps, act, gated), "encoder layer")
        self.cross_kv = self._pass(_cross_kv(self.n_heads), "cross-attention keys and values")
        self.final_weight = self._keep(dec.final_layer_norm.weight)
        self.enc_final_weight = self._keep(self.encoder.final_layer_norm.weight)
        self.final_eps = dec.final_layer_norm.variance_epsilon
        self.enc_final_eps = self.encoder.final_layer_norm.variance_epsilon
        self.head_weight = self._keep(model.lm_head.weight)
        self.embed_weight = self._keep(dec.embed_tokens.weight)
        self.enc_embed_weight = self._keep(self.encoder.embed_tokens.weight)
        self.bias_table = self._keep(self.rel.relative_attention_bias.weight)
        self.enc_rel = self.encoder.block[0].layer[0].SelfAttention
        self.enc_bias_table = self._keep(self.enc_rel.relative_attention_bias.weight)
        final_eps, output_scale, head_weight = self.final_eps, self.output_scale, self.head_weight

        def head(h, norm_weight):
            h = t5_norm(h, norm_weight, final_eps)
            if output_scale is not None:
                h = h * output_scale
            return linear(h, head_weight)

        self._head = self._pass(head, "head")
        rel = self.rel

        def self_bias(pos, table, k_cache):
            """Relative position bias plus the causal mask, additive: pos [B, n] -> [B, H, n, capacity]; the capacity is
            read off a layer's key cache [B, H, capacity, D], whose size the compiled pass takes as dynamic."""
            capacity = k_cache.shape[2]
            slots = torch.arange(capacity, device=pos.device)
            bucket = rel._relative_position_bucket(
                slots - pos[..., None], bidirectional=False, num_buckets=rel.relative_attention_num_buckets,
                max_distance=rel.relative_attention_max_distance)
            bias = F.embedding(bucket, table).permute(0, 3, 1, 2)  # [B, H, n, L]
            return bias.masked_fill(~causal_mask(pos, capacity), torch.finfo(bias.dtype).min)

        self._self_bias = self._pass(self_bias, "position bias")

    def _mlp(self, ff):
        """The feed-forward block's weights: (norm, wi or the fused wi_0/wi_1, wo)."""
        dense = ff.DenseReluDense
        if hasattr(dense, "wi_0"):
            wi, _ = fuse_linears([dense.wi_0, dense.wi_1])
            self._params.append((wi, dense.wi_0.weight))
        else:
            wi = self._keep(dense.wi.weight)
        return self._keep(ff.layer_norm.weight), wi, self._keep(dense.wo.weight)

    def self_bias(self, pos, k_cache):
        return self._self_bias(pos, self.bias_table, k_cache)

    def embed(self, ids, pos):
        return F.embedding(ids, self.embed_weight)

    def encoder_forward(self, ids, key_visible):
        """ids: [B, S]; key_visible: [B, S]. The encoder's blocks written out, with its bidirectional position bias."""
        rel = self.enc_rel
        pos = torch.arange(ids.shape[1], device=ids.device)
        bucket = rel._relative_position_bucket(pos[None, :] - pos[:, None], bidirectional=True,
                                               num_buckets=rel.relative_attention_num_buckets,
                                               max_distance=rel.relative_attention_max_distance)
        bias = F.embedding(bucket, self.enc_bias_table).permute(2, 0, 1)[None]  # [1, H, S, S]
        bias = bias.masked_fill(~key_visible[:, None, None, :], torch.finfo(bias.dtype).min)  # [B, H, S, S]
        h = F.embedding(ids, self.enc_embed_weight)
        for w in self.enc_weights:
            h = self.enc_layer(h, bias, w)
        return t5_norm(h, self.enc_final_weight, self.enc_final_eps)

    def head(self, h):
        return self._head(h, self.final_weight)

    def decoder(self):
        return T5Decoder(self)


def _t5_mlp(h, norm_w, wi, wo, eps, act, gated):
    x = t5_norm(h, norm_w, eps)
    if gated:
        gate, up = linear(x, wi).chunk(2, dim=-1)
        return h + linear(act(gate) * up, wo)
    return h + linear(act(linear(x, wi)), wo)


def _t5_layer(n_heads, eps, act, gated, kernel=False):
    def layer(h, pos, bias, cross_bias, src_last, k_cache, v_cache, cross_k, cross_v, w):
        """One T5 decoder block over h [B, n, d] at pos [B, n]; bias: [B, H, n, capacity] (position bias and causal
        mask), cross_bias: additive over the source slots; writes the self-attention caches."""
        ln0, qkv_w, o_w, ln1, cq_w, co_w, ln2, wi, wo = w
        q, k, v = (heads(x, n_heads) for x in linear(t5_norm(h, ln0, eps), qkv_w).chunk(3, dim=-1))
        write_cache(k_cache, v_cache, pos, k, v)
        h = h + linear(attend(q, k_cache, v_cache, bias, 1.0), o_w)
        q = heads(linear(t5_norm(h, ln1, eps), cq_w), n_heads)
        h = h + linear(cross_attention(q, cross_k, cross_v, cross_bias, src_last, 1.0, kernel), co_w)
        return _t5_mlp(h, ln2, wi, wo, eps, act, gated)

    return layer


def _t5_encoder_layer(n_heads, eps, act, gated):
    def layer(h, bias, w):
        """One T5 encoder block over h [B, S, d]; bias: [B, H, S, S] (position bias and source mask)."""
        ln0, qkv_w, o_w, ln2, wi, wo = w
        q, k, v = (heads(x, n_heads) for x in linear(t5_norm(h, ln0, eps), qkv_w).chunk(3, dim=-1))
        h = h + linear(attend(q, k, v, bias, 1.0), o_w)
        return _t5_mlp(h, ln2, wi, wo, eps, act, gated)

    return layer


class T5Decoder(EncoderDecoderDecoder):
    def run_layers(self, h, pos, start, stop):
        p = self.passes
        bias = p.self_bias(pos, self.kv.layers[0][0])
        cross_bias = torch.zeros((), dtype=h.dtype, device=h.device).masked_fill(~self.src_visible, torch.finfo(h.dtype).min)
        torch._dynamo.maybe_mark_dynamic(cross_bias, 3)  # the source capacity, as src_visible's
        for i in range(start, stop):
            k_cache, v_cache = self.kv.layers[i]
            cross_k, cross_v = self.cross.layers[i]
            h = p.layer(h, pos, bias, cross_bias, self.src_last, k_cache, v_cache, cross_k, cross_v, p.weights[i])
        return h


def decoder_layer_modules(model: PreTrainedModel) -> list:
    """The decoder's layers as the model holds them (T5's may differ in number from its encoder's)."""
    kind = model.config.model_type
    if kind in _DECODER_ONLY:
        return list(model.model.layers)
    dec = model.get_decoder()
    return list(dec.block) if kind in ("t5", "mt5") else list(dec.layers)


def decoder_layers(model: PreTrainedModel) -> int:
    """The number of decoder layers, as the passes count them."""
    return len(decoder_layer_modules(model))


def final_norm_module(model: PreTrainedModel):
    """The decoder's final norm, or None (BART and Marian have none: each layer ends normalised)."""
    kind = model.config.model_type
    if kind in _DECODER_ONLY:
        return model.model.norm
    dec = model.get_decoder()
    return dec.final_layer_norm if kind in ("t5", "mt5") else getattr(dec, "layer_norm", None)


def output_logits(model: PreTrainedModel, h: torch.Tensor, norm) -> torch.Tensor:
    """The model's own output head over decoder states h [B, n, d] after `norm` (a module, or None): what transformers
    computes after the last layer (BART's final_logits_bias, T5's output scaling with tied embeddings), through the
    model's modules, so that gradients reach them (early-exit training) and the eager path agrees."""
    if norm is not None:
        h = norm(h)
    kind = model.config.model_type
    if kind in ("t5", "mt5"):
        cfg = model.config
        if getattr(cfg, "scale_decoder_outputs", cfg.tie_word_embeddings):
            h = h * cfg.d_model**-0.5
        return model.lm_head(h)
    logits = soft_cap(model.lm_head(h), getattr(model.config, "final_logit_softcapping", None))  # Gemma 2
    return logits + model.final_logits_bias if kind not in _DECODER_ONLY else logits
