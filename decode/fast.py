"""The GPU fast path: compact decoder passes over the Hugging Face weights, static KV caches indexed by
position, and one CUDA graph per input length.

    runner = make_runner(model)                          # FastRunner on CUDA where supported, else ModelRunner
    runner.start(prompt, max_new_tokens)                 # encoder once; cross-attention K/V into static buffers
    confidence, token = runner.step(tokens)              # one graph replay, one host read of (confidence, token)
    cut, argmax = runner.check(tokens, k, "ce", 3.0)     # the large model's pass over k pending tokens + 1
    runner.rewind(length)                                # a rollback moves the position; nothing is copied
    steps, tokens = runner.draft(tokens, k, budget, 0.4, eos)  # up to k greedy small steps, state on the device

Why: at batch size 1, eager PyTorch spends a decoding step launching kernels and running Python, so a
model 12x smaller by layers x width was only 2.7x cheaper per step (BENCHMARKS.md). Here, as in gpt-fast:
- The decoder pass is written out over the model's own modules (its linear layers, norms, MLPs,
  embeddings): no transformers cache objects, no mask helpers, nothing that syncs or allocates by value.
- Each layer's keys and values live in two preallocated buffers [1, H_kv, capacity, D]; `index_copy_`
  writes the new positions, and a mask built from the positions hides every slot past them (and outside
  a sliding window). Rolling back is moving the position.
- The start position lives in a device scalar that each pass advances itself; the small step writes its
  argmax into the input buffer, so the next step needs nothing from the host.
- Each (verb, number of tokens) is captured once as a CUDA graph on the first `start` and replayed;
  every tensor a graph reads is a static buffer of the runner. A longer input than the buffers hold
  grows them and captures again (never a wrong answer). Passes of more than MAX_GRAPH_TOKENS tokens
  (the prompt prefill, long drafts with no step cap) run the same code without a graph.
- The policy's arithmetic (confidence, argmax, the rollback cut) runs inside the graph with the same
  functions the eager runner uses (decode.cache.step_verdict / first_cut), and one small tensor comes back.
  So does sampling's (decode.sampling: the warpers, the draw, the rejection rule), from uniforms the host
  writes into a static buffer from the caller's generator before each replay.
- The draft loop's state can live on the device (`draft`): each row's budget, next position and next input
  stay there, and every small step after the first is one replay of the same graph, which decides each
  row's fallback (confidence at or under the threshold), its end (an EOS token, or its budget: the step cap
  or max_new_tokens) and its next input in the pass. Between steps the host writes nothing and reads only
  the rows' budgets, to stop the loop; the tokens come back once per draft. The decisions are the host
  loop's own.

Covered: BART and Marian, T5/mT5 (encoder-decoder); Llama, Qwen2 and Mistral (decoder-only, sliding
windows included). Anything else, or T5 in float16, runs on the eager path (`unsupported_reason` says why).
"""

from __future__ import annotations

import gc
import sys
import weakref

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from decode.cache import ModelRunner, first_cut, is_encoder_decoder, prefer_fast_attention, step_verdict
from decode.sampling import noise_size, sample_step, verify

MAX_GRAPH_TOKENS = 16  # passes of up to this many tokens are graphed: step cap 10 + 1, with room
MAX_DRAFT_STEPS = 16  # small steps one `draft` takes at most
NO_CAP = 1 << 40  # a draft's step cap when there is none
MAX_EOS_IDS = 8  # EOS ids the device draft loop compares with (more: the host loop)
_ALIGN = 64  # capacities are multiples of this (aligned attention masks, few reallocations)
_SRC_BUCKET = 16  # encoder inputs are padded to a multiple of this: one encoder graph per bucket


def _src_bucket(n: int) -> int:
    return -(-n // _SRC_BUCKET) * _SRC_BUCKET

_DECODER_ONLY = ("llama", "qwen2", "mistral")
_ENC_DEC = ("bart", "marian", "t5", "mt5")


def unsupported_reason(model: PreTrainedModel) -> str | None:
    """Why the fast path cannot run this model, or None when it can."""
    cfg = model.config
    kind = getattr(cfg, "model_type", "")
    if kind not in _DECODER_ONLY + _ENC_DEC:
        return f"no compact decoder for model type {kind!r} (fast path: {', '.join(_DECODER_ONLY + _ENC_DEC)})"
    if kind in ("t5", "mt5") and next(model.parameters()).dtype == torch.float16:
        return "T5 in float16 needs transformers' activation clamping; use bfloat16 or float32"
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) in ("dynamic", "longrope"):
        return f"rope type {rope.get('rope_type', rope.get('type'))!r} changes with the sequence length"
    return None


_SAID: set[str] = set()


def notice(message: str) -> None:
    """Prints a one-line notice once per process (which decoding path runs)."""
    if message not in _SAID:
        _SAID.add(message)
        print(f"[bild] {message}", file=sys.stderr)


def make_runner(model: PreTrainedModel, fast_path: bool | None = None):
    """The runner a decoder uses for `model`. fast_path None: the fast path on CUDA where supported;
    True: the fast path (without graphs off CUDA), an error where unsupported; False: the eager path."""
    reason = unsupported_reason(model)
    device = next(model.parameters()).device
    if fast_path is None:
        use = device.type == "cuda" and reason is None
    elif fast_path:
        if reason is not None:
            raise ValueError(f"fast_path=True but {type(model).__name__} cannot use it: {reason}")
        use = True
    else:
        use = False
    runner = FastRunner.for_model(model) if use else ModelRunner(model)
    why = "" if use or fast_path is False or device.type != "cuda" else f" ({reason})"
    notice(f"{type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M) decodes on the "
           f"{runner.path} path{why}")
    return runner


# --------------------------------------------------------------------------------------------------
# Static caches and attention


class StaticKV:
    """Keys and values of every layer: [layers, B, H_kv, capacity, D] each, written by position, each row at
    its own positions."""

    def __init__(self, layers: int, heads: int, head_dim: int, capacity: int, dtype, device, batch: int = 1):
        # zeros, not empty: masked slots are multiplied by 0 in attention, and 0 * NaN would be NaN
        self.k = torch.zeros(layers, batch, heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self._rows = torch.arange(batch, device=device)[:, None]

    def write(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """pos: [B, n]; k, v: [B, H_kv, n, D]. Returns the layer's whole buffers."""
        if pos.shape[0] == 1:
            self.k[layer].index_copy_(2, pos[0], k)
            self.v[layer].index_copy_(2, pos[0], v)
        else:  # row b's n tokens go to its own positions pos[b]
            self.k[layer][self._rows, :, pos] = k.transpose(1, 2)
            self.v[layer][self._rows, :, pos] = v.transpose(1, 2)
        return self.k[layer], self.v[layer]


def attend(q, k, v, mask, scale, gqa: bool = False):
    """q: [B, H, n, D]; k, v: [B, H_kv, L, D] (gqa: H_kv < H); mask: bool or additive, broadcastable to
    [B, H, n, L]. Returns [B, n, H * D]."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def causal_mask(pos: torch.Tensor, capacity: int, window: int | None = None) -> torch.Tensor:
    """pos [B, n] -> [B, 1, n, capacity]: slot j is visible from position p when j <= p (and p - j < window)."""
    slots = torch.arange(capacity, device=pos.device)
    visible = slots <= pos[..., None]
    if window is not None:
        visible &= slots > pos[..., None] - window  # transformers' sliding_window_overlay
    return visible[:, None]


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[B, n, H * D] -> [B, H, n, D]"""
    return x.view(x.shape[0], x.shape[1], -1, head_dim).transpose(1, 2)


# --------------------------------------------------------------------------------------------------
# Compact decoder passes, one class per family; each reads the model's own modules


class _Decoder:
    is_encoder_decoder = False

    def __init__(self, model: PreTrainedModel):
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device

    def allocate(self, capacity: int, src_capacity: int, batch: int = 1) -> None:
        self.kv = StaticKV(self.n_layers, self.n_kv_heads, self.head_dim, capacity, self.dtype, self.device, batch)
        self.capacity = capacity

    def row_buffers(self) -> list[tuple[torch.Tensor, int]]:
        """The per-row state the passes read, each with its batch dimension: what moving a row moves."""
        return [(self.kv.k, 1), (self.kv.v, 1)]

    def take_rows(self, other: "_Decoder", rows: list[int]) -> None:
        """Copies rows `rows` of `other`'s state (same model, buffers no larger than these) into this decoder's
        first len(rows) rows, in that order. The rest of the buffers keep what they held: slots past a row's
        position are masked, and so are the rows no pass reads."""
        index = torch.tensor(rows, device=self.device)
        for (mine, dim), (theirs, _) in zip(self.row_buffers(), other.row_buffers()):
            src = theirs.index_select(dim, index)
            mine[tuple(slice(0, n) for n in src.shape)].copy_(src)

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """ids, pos: [B, n]. Writes the caches at pos; returns logits [B, n, V] (or [B, 1, V] with last_only)."""
        h = self.run_layers(self.embed(ids, pos), pos, 0, self.n_layers)
        return self.head(h[:, -1:] if last_only else h)

    def embed(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """ids, pos: [B, n] -> the first layer's input [B, n, d]."""
        raise NotImplementedError

    def run_layers(self, h: torch.Tensor, pos: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Layers start .. stop - 1 over h [B, n, d] at positions pos [B, n], writing their caches there."""
        raise NotImplementedError

    def head(self, h: torch.Tensor, norm=None) -> torch.Tensor:
        """The output head over the last layer's states [B, n, d] -> logits [B, n, V]. `norm` replaces the final
        norm (an early exit's own copy); the LM head is always the model's."""
        raise NotImplementedError

    def final_norm_module(self):
        """The decoder's final norm, or None (BART and Marian have none: each layer ends normalised)."""
        raise NotImplementedError


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class _LlamaFamily(_Decoder):
    """Llama, Qwen2, Mistral: pre-norm, rotary positions, grouped-query attention, optional sliding window."""

    def __init__(self, model):
        super().__init__(model)
        cfg = model.config
        self.inner, self.lm_head = model.model, model.lm_head
        self.layers = list(self.inner.layers)
        self.n_layers = len(self.layers)
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = self.layers[0].self_attn.head_dim
        self.gqa = cfg.num_attention_heads != cfg.num_key_value_heads
        layer_types = getattr(cfg, "layer_types", None)
        window = getattr(cfg, "sliding_window", None)
        if layer_types is not None:
            self.windows = [window if t == "sliding_attention" else None for t in layer_types]
        else:  # Mistral: one window for every layer, or none
            self.windows = [window] * self.n_layers

    def allocate(self, capacity, src_capacity, batch=1):
        super().allocate(capacity, src_capacity, batch)
        # the model's own rotary module, once over every position: cos, sin [capacity, D]
        pos = torch.arange(capacity, device=self.device)[None]
        cos, sin = self.inner.rotary_emb(torch.zeros(1, dtype=self.dtype, device=self.device), pos)
        self.cos, self.sin = cos[0], sin[0]

    def embed(self, ids, pos):
        return self.inner.embed_tokens(ids)  # [B, n, d]

    def run_layers(self, h, pos, start, stop):
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # [B, 1, n, D]
        masks = {w: causal_mask(pos, self.capacity, w) for w in set(self.windows[start:stop])}
        for i in range(start, stop):
            layer = self.layers[i]
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q, k, v = (_heads(proj(x), self.head_dim) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            keys, values = self.kv.write(i, pos, k, v)
            h = h + attn.o_proj(attend(q, keys, values, masks[self.windows[i]], attn.scaling, self.gqa))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return h

    def head(self, h, norm=None):
        return self.lm_head((self.inner.norm if norm is None else norm)(h))

    def final_norm_module(self):
        return self.inner.norm


class _EncoderDecoder(_Decoder):
    """Shared by the encoder-decoder families: the encoder once, cross-attention K/V in static buffers."""

    is_encoder_decoder = True

    def allocate(self, capacity, src_capacity, batch=1):
        super().allocate(capacity, src_capacity, batch)
        self.cross = StaticKV(self.n_layers, self.n_heads, self.head_dim, src_capacity, self.dtype, self.device, batch)
        self.src_visible = torch.zeros(batch, 1, 1, src_capacity, dtype=torch.bool, device=self.device)
        self.src_capacity = src_capacity

    def row_buffers(self):
        return super().row_buffers() + [(self.cross.k, 1), (self.cross.v, 1), (self.src_visible, 0)]

    def take_rows(self, other, rows):
        # source slots past the other's buffers are hidden; every row keeps one visible slot, as a batch's rows
        # past the input do: a fully masked attention row would be NaN
        self.src_visible.zero_()
        self.src_visible[..., 0] = True
        super().take_rows(other, rows)

    def encode(self, src_ids: torch.Tensor, src_len: torch.Tensor) -> None:
        """src_ids: [B, S_b], the inputs right-padded to a bucket length; src_len: [B], their real lengths (on
        the device). Runs the encoder and writes every layer's cross-attention keys and values; positions past
        a row's src_len hold finite junk that `src_visible` hides."""
        bucket = src_ids.shape[1]
        key_visible = torch.arange(bucket, device=self.device) < src_len[:, None]  # [B, S_b]
        hidden = self.encoder_forward(src_ids, key_visible)  # [B, S_b, d]
        for i, (k_proj, v_proj) in enumerate(self.cross_projections()):
            self.cross.k[i][:, :, :bucket] = _heads(k_proj(hidden), self.head_dim)
            self.cross.v[i][:, :, :bucket] = _heads(v_proj(hidden), self.head_dim)
        slots = torch.arange(self.src_capacity, device=self.device)
        self.src_visible.copy_((slots < src_len[:, None])[:, None, None])


class _BartFamily(_EncoderDecoder):
    """BART and Marian: post-norm layers, learned (BART, offset 2) or sinusoidal (Marian) positions."""

    def __init__(self, model):
        super().__init__(model)
        self.encoder, dec = model.get_encoder(), model.get_decoder()
        self.dec, self.lm_head = dec, model.lm_head
        # a buffer, replaced (not moved in place) when the model moves: read it from the model each time
        self._model = weakref.ref(model)
        self.layers = list(dec.layers)
        self.n_layers = len(self.layers)
        attn = self.layers[0].self_attn
        self.n_heads = self.n_kv_heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.embed_scale = getattr(dec, "embed_scale", 1.0)  # Marian scales here, BART inside its embedding
        self.pos_offset = getattr(dec.embed_positions, "offset", 0)
        self.layernorm_embedding = getattr(dec, "layernorm_embedding", None)
        self.final_norm = getattr(dec, "layer_norm", None)

    @property
    def logits_bias(self):
        return self._model().final_logits_bias

    def cross_projections(self):
        return [(layer.encoder_attn.k_proj, layer.encoder_attn.v_proj) for layer in self.layers]

    def encoder_forward(self, ids, key_visible):
        """ids: [B, S]; key_visible: [B, S]. The encoder's layers written out (post-norm, as the decoder's)."""
        enc = self.encoder
        pos = torch.arange(ids.shape[1], device=ids.device)
        h = enc.embed_tokens(ids) * getattr(enc, "embed_scale", 1.0) + enc.embed_positions.weight[pos + self.pos_offset][None]
        if getattr(enc, "layernorm_embedding", None) is not None:
            h = enc.layernorm_embedding(h)
        mask = key_visible[:, None, None, :]
        for layer in enc.layers:
            attn = layer.self_attn
            q, k, v = (_heads(proj(h), self.head_dim) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
            h = layer.self_attn_layer_norm(h + attn.out_proj(attend(q, k, v, mask, attn.scaling)))
            h = layer.final_layer_norm(h + layer.fc2(layer.activation_fn(layer.fc1(h))))
        if getattr(enc, "layer_norm", None) is not None:
            h = enc.layer_norm(h)
        return h

    def embed(self, ids, pos):
        dec = self.dec
        table = dec.embed_positions.weight
        # clamped: a batch's padding tokens sit past their row's end and may run past the table (never read)
        h = dec.embed_tokens(ids) * self.embed_scale + table[(pos + self.pos_offset).clamp(max=table.shape[0] - 1)]
        if self.layernorm_embedding is not None:
            h = self.layernorm_embedding(h)
        return h

    def run_layers(self, h, pos, start, stop):
        mask = causal_mask(pos, self.capacity)
        for i in range(start, stop):
            layer = self.layers[i]
            attn = layer.self_attn
            q, k, v = (_heads(proj(h), self.head_dim) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
            keys, values = self.kv.write(i, pos, k, v)
            h = layer.self_attn_layer_norm(h + attn.out_proj(attend(q, keys, values, mask, attn.scaling)))
            cross = layer.encoder_attn
            q = _heads(cross.q_proj(h), self.head_dim)
            out = attend(q, self.cross.k[i], self.cross.v[i], self.src_visible, cross.scaling)
            h = layer.encoder_attn_layer_norm(h + cross.out_proj(out))
            h = layer.final_layer_norm(h + layer.fc2(layer.activation_fn(layer.fc1(h))))
        return h

    def head(self, h, norm=None):
        norm = self.final_norm if norm is None else norm
        if norm is not None:
            h = norm(h)
        return self.lm_head(h) + self.logits_bias

    def final_norm_module(self):
        return self.final_norm


class _T5Family(_EncoderDecoder):
    """T5 and mT5: pre-norm (RMS) layers, a relative position bias shared by every layer, no attention scaling."""

    def __init__(self, model):
        super().__init__(model)
        self.encoder, dec = model.get_encoder(), model.get_decoder()
        self.dec, self.lm_head = dec, model.lm_head
        self.blocks = list(dec.block)  # the decoder's depth, which may differ from the encoder's
        self.n_layers = len(self.blocks)
        self.rel = self.blocks[0].layer[0].SelfAttention
        self.n_heads = self.n_kv_heads = self.rel.n_heads
        self.head_dim = self.rel.key_value_proj_dim
        scale = getattr(model.config, "scale_decoder_outputs", model.config.tie_word_embeddings)
        self.output_scale = model.config.d_model**-0.5 if scale else None

    def cross_projections(self):
        return [(b.layer[1].EncDecAttention.k, b.layer[1].EncDecAttention.v) for b in self.blocks]

    def encoder_forward(self, ids, key_visible):
        """ids: [B, S]; key_visible: [B, S]. The encoder's blocks written out, with its bidirectional position bias."""
        enc = self.encoder
        rel = enc.block[0].layer[0].SelfAttention
        pos = torch.arange(ids.shape[1], device=ids.device)
        bucket = rel._relative_position_bucket(pos[None, :] - pos[:, None], bidirectional=True,
                                               num_buckets=rel.relative_attention_num_buckets,
                                               max_distance=rel.relative_attention_max_distance)
        bias = rel.relative_attention_bias(bucket).permute(2, 0, 1)[None]  # [1, H, S, S]
        bias = bias.masked_fill(~key_visible[:, None, None, :], torch.finfo(bias.dtype).min)  # [B, H, S, S]
        h = enc.embed_tokens(ids)
        for block in enc.block:
            sa, ff = block.layer[0], block.layer[-1]
            attn = sa.SelfAttention
            x = sa.layer_norm(h)
            q, k, v = (_heads(proj(x), self.head_dim) for proj in (attn.q, attn.k, attn.v))
            h = h + attn.o(attend(q, k, v, bias, 1.0))
            h = h + ff.DenseReluDense(ff.layer_norm(h))
        return enc.final_layer_norm(h)

    def self_bias(self, pos):
        """Relative position bias plus the causal mask, additive: pos [B, n] -> [B, H, n, capacity]."""
        slots = torch.arange(self.capacity, device=pos.device)
        bucket = self.rel._relative_position_bucket(
            slots - pos[..., None], bidirectional=False,
            num_buckets=self.rel.relative_attention_num_buckets, max_distance=self.rel.relative_attention_max_distance)
        bias = self.rel.relative_attention_bias(bucket).permute(0, 3, 1, 2)  # [B, H, n, L]
        return bias.masked_fill(~causal_mask(pos, self.capacity), torch.finfo(bias.dtype).min)

    def embed(self, ids, pos):
        return self.dec.embed_tokens(ids)

    def run_layers(self, h, pos, start, stop):
        bias = self.self_bias(pos)
        cross_bias = torch.zeros((), dtype=h.dtype, device=h.device).masked_fill(~self.src_visible, torch.finfo(h.dtype).min)
        for i in range(start, stop):
            block = self.blocks[i]
            sa, ca, ff = block.layer[0], block.layer[1], block.layer[-1]
            attn = sa.SelfAttention
            x = sa.layer_norm(h)
            q, k, v = (_heads(proj(x), self.head_dim) for proj in (attn.q, attn.k, attn.v))
            keys, values = self.kv.write(i, pos, k, v)
            h = h + attn.o(attend(q, keys, values, bias, 1.0))
            cross = ca.EncDecAttention
            q = _heads(cross.q(ca.layer_norm(h)), self.head_dim)
            h = h + cross.o(attend(q, self.cross.k[i], self.cross.v[i], cross_bias, 1.0))
            h = h + ff.DenseReluDense(ff.layer_norm(h))
        return h

    def head(self, h, norm=None):
        h = (self.dec.final_layer_norm if norm is None else norm)(h)
        if self.output_scale is not None:
            h = h * self.output_scale
        return self.lm_head(h)

    def final_norm_module(self):
        return self.dec.final_layer_norm


def _family(model) -> type[_Decoder]:
    kind = model.config.model_type
    if kind in _DECODER_ONLY:
        return _LlamaFamily
    return _T5Family if kind in ("t5", "mt5") else _BartFamily


# --------------------------------------------------------------------------------------------------
# The runner: static buffers, capture, replay


_RUNNERS: "weakref.WeakKeyDictionary[PreTrainedModel, FastRunner]" = weakref.WeakKeyDictionary()


# -- a draft step's bookkeeping (the device draft loop), fused into one kernel on CUDA on request ----------------

# True: the bookkeeping compiled into one kernel on CUDA (decode.eval fuse_bookkeeping=true). Off by default: compiling
# costs about 12 s once per process (scripts/bench_first_draft.py, H100), and it saved 6-15% of a draft step at batch
# 4-16 but nothing measurable end to end (BENCHMARKS.md)
FUSE_BOOKKEEPING = False


def draft_bookkeeping(conf, tok, fallback, eos, loop, nxt, out, advance) -> None:
    """Applies a draft step's verdicts [B] (top probability, argmax) to the loop's state: a running row (budget
    loop[0] over 0) keeps its argmax when its top probability is over the threshold, and stops at a fallback, an
    EOS token or its budget (loop[0] reaches 0). out[:, 0]: tokens kept; out[:, 1:]: the kept tokens, in order (a
    row that keeps nothing writes its token just past them). advance (a bool tensor, so that the first step and the
    later ones share one compiled kernel): a running row's next position moves on."""
    left, kept = loop[0], out[:, 0]
    run = left > 0
    nxt.add_(run & advance)
    keep = run & (conf > fallback)
    out[:, 1:].scatter_(1, kept[:, None], tok[:, None])
    kept.add_(keep)
    left.sub_(1).mul_(keep & (tok[:, None] != eos).all(dim=-1))


def lookahead_bookkeeping(conf, tok, fallback, eos, loop, nxt, out, cap, guessed, advance) -> None:
    """draft_bookkeeping's, looking ahead (BatchRunner.draft): a running row keeps every token; a fallback's (or the
    step cap's: loop[2] reaches 0) is a guess (`guessed`), which the large model's check must match; the row then
    looks ahead (loop[1] counts its guesses), and its step cap counts again from there."""
    left, ahead, seg, kept = loop[0], loop[1], loop[2], out[:, 0]
    run = left > 0
    nxt.add_(run & advance)
    guess = (conf <= fallback) | (seg == 0)
    guessed.scatter_(1, kept[:, None], guess[:, None])
    ahead.add_(run & guess)
    seg.copy_(torch.where(guess, cap, seg - 1))  # (masked_fill_ with a tensor value reads it on the host)
    out[:, 1:].scatter_(1, kept[:, None], tok[:, None])
    kept.add_(run)
    left.sub_(1).mul_(run & (tok[:, None] != eos).all(dim=-1))


class _CompiledOrEager:
    """fn through torch.compile; its eager self where compiling fails (say, no Triton), with a notice."""

    def __init__(self, fn):
        self.fn, self.compiled = fn, torch.compile(fn, fullgraph=True, dynamic=True)

    def __call__(self, *args):
        if self.compiled is not None:
            try:
                # one compiled variant per batch shape (one row, or any other) and kind of buffers (inference tensors
                # or not, as the runner was made): a long process with many runners may pass dynamo's default of 8
                with torch._dynamo.config.patch(recompile_limit=64):
                    return self.compiled(*args)
            except Exception as err:  # noqa: BLE001 - any compile failure: the eager function decides the same
                notice(f"the draft step's bookkeeping runs unfused: torch.compile failed ({type(err).__name__}: {err})")
                self.compiled = None
        return self.fn(*args)


_FUSED: dict = {}


def _bookkeeping(fn, device: torch.device):
    """fn, compiled into one kernel on CUDA (where the graphs replay it) when FUSE_BOOKKEEPING is on."""
    if device.type != "cuda" or not FUSE_BOOKKEEPING:
        return fn
    if fn not in _FUSED:
        _FUSED[fn] = _CompiledOrEager(fn)
    return _FUSED[fn]


class FastRunner:
    """One model on the fast path: `start`, `step`, `check`, `rewind`, as decode.cache.ModelRunner.

    One runner per model (`for_model`), shared by every decoder over it: its buffers and graphs are
    made once. Graphs are used on CUDA; elsewhere the same passes run without them. One sequence at a time
    (decode/batch.py's BatchRunner decodes B together).
    """

    batch = 1  # rows of the static buffers
    prefers_device_loop = False  # BiLDConfig.device_loop=None: one row's host loop is lean, the device loop measured slower

    def __init__(self, model: PreTrainedModel, compile: bool = False):
        prefer_fast_attention()
        self.decoder = _family(model)(model)
        # torch.compile fuses the many small kernels of a layer (norms, rotary, residuals); the graphs then
        # replay the fused kernels. Compiling costs time once per model and pass shape.
        self.compiled = bool(compile)
        self._forward = torch.compile(self.decoder.forward, fullgraph=True) if compile else self.decoder.forward
        self.device, self.dtype = self.decoder.device, self.decoder.dtype
        self.is_encoder_decoder = is_encoder_decoder(model)
        self.use_graphs = self.device.type == "cuda"
        self.path = ("fast (static cache, CUDA graphs" + (", compiled)" if compile else ")") if self.use_graphs
                     else "fast (static cache, no graphs)")
        self.capacity = self.src_capacity = 0
        self.length = 0
        # static inputs and outputs of every pass; the graphs read and write only these
        self._ids = torch.zeros(MAX_GRAPH_TOKENS, dtype=torch.long, device=self.device)
        self._pos0 = torch.zeros(1, dtype=torch.long, device=self.device)  # position of _ids[0]
        self._arange = torch.arange(MAX_GRAPH_TOKENS, device=self.device)
        self._threshold = torch.zeros((), dtype=torch.float32, device=self.device)
        self._threshold_value = 0.0  # what _threshold holds
        self._step_out = torch.zeros(2, dtype=torch.float32, device=self.device)  # confidence, token
        self._check_out = torch.zeros(MAX_GRAPH_TOKENS + 1, dtype=torch.long, device=self.device)  # cut, argmax...
        self._host_ids = torch.zeros(MAX_GRAPH_TOKENS, dtype=torch.long, pin_memory=self.use_graphs)
        # speculative sampling: uniforms written before each pass, the small model's draft distributions (row
        # _slot next), and the large model's copy of the drafts it checks
        vocab = model.get_output_embeddings().weight.shape[0]
        self._noise = torch.zeros(noise_size(self.max_draft, vocab), dtype=torch.float32, device=self.device)
        self._drafts = torch.zeros(MAX_GRAPH_TOKENS, vocab, dtype=torch.float32, device=self.device)
        self._slot = torch.zeros((), dtype=torch.long, device=self.device)
        self._q_in = torch.zeros(MAX_GRAPH_TOKENS, vocab, dtype=torch.float32, device=self.device)
        # the device draft loop (`draft`): per row its tokens still allowed (0: stopped), whether it looks ahead
        # (BatchRunner.draft) and its tokens until the step cap forces a guess, in one buffer the host reads whole;
        # next position and next input; its output, per row [tokens kept, the kept tokens...] and which of them are
        # guesses; the fallback threshold, the step cap (lookahead) and the EOS ids (padded with -1), as the host
        # last wrote them
        rows = self.batch
        self._loop = torch.zeros(3, rows, dtype=torch.long, device=self.device)
        self._left, self._ahead, self._seg = self._loop
        self._nxt = torch.zeros(rows, dtype=torch.long, device=self.device)
        self._tok = torch.zeros(rows, dtype=torch.long, device=self.device)
        self._conf = torch.zeros(rows, dtype=torch.float32, device=self.device)
        # (one spare column: a row that keeps nothing writes its step's token just past its kept ones)
        self._draft_out = torch.zeros(rows, 1 + MAX_DRAFT_STEPS + 1, dtype=torch.long, device=self.device)
        self._guessed = torch.zeros(rows, MAX_DRAFT_STEPS + 1, dtype=torch.bool, device=self.device)
        self._fallback = torch.zeros((), dtype=torch.float32, device=self.device)
        self._cap = torch.zeros((), dtype=torch.long, device=self.device)
        self._eos = torch.full((MAX_EOS_IDS,), -1, dtype=torch.long, device=self.device)
        self._no = torch.zeros((), dtype=torch.bool, device=self.device)  # the bookkeeping's `advance`
        self._yes = torch.ones((), dtype=torch.bool, device=self.device)
        self._draft_settings: tuple | None = None
        # what the device buffers hold, as far as the host knows (None: unknown)
        self._pos_on_device: int | None = None
        self._ids_on_device: tuple | None = None
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._wanted: set[tuple] = set()
        self._src_ids = self._src_len = self._src_host = None  # encoder inputs, sized with the buffers
        self.captures = 0  # graphs captured so far (a test checks that new inputs capture nothing)

    @classmethod
    def for_model(cls, model: PreTrainedModel, compile: bool | None = None) -> "FastRunner":
        """The model's runner, made on first use (or anew when the model moved or `compile` differs;
        None: whichever exists)."""
        runner = _RUNNERS.get(model)
        param = next(model.parameters())
        if (runner is None or (runner.device, runner.dtype) != (param.device, param.dtype)
                or (compile is not None and runner.compiled != compile)):
            runner = _RUNNERS[model] = cls(model, bool(compile))
        return runner

    def plan(self, keys) -> None:
        """Graph keys a decoder will use, ("step", n) or ("check", n, rollback), captured at the next start."""
        self._wanted.update(k for k in keys if k[1] <= MAX_GRAPH_TOKENS)

    # -- the three verbs ----------------------------------------------------------------------------

    @torch.inference_mode()
    def start(self, prompt: list[int], max_new_tokens: int) -> None:
        """Begins a sequence. prompt: the encoder input, or the decoder-only prompt."""
        prefix = 1 if self.is_encoder_decoder else len(prompt)
        self._ensure_capacity(prefix + max_new_tokens + 1, len(prompt) if self.is_encoder_decoder else 0)
        self._capture_wanted()
        self.length = 0
        self._forget_device_state()
        self.reset_drafts()
        if self.is_encoder_decoder:
            n = len(prompt)
            self._src_host[0, :n] = torch.tensor(prompt)
            self._src_ids[0, :n].copy_(self._src_host[0, :n], non_blocking=True)
            self._src_len.fill_(n)
            self._run(("encode", _src_bucket(n)))
        elif len(prompt) > 1:  # prefill all but the last prompt token, which the first step or check feeds
            self._eager_catch_up(prompt[:-1])

    @torch.inference_mode()
    def step(self, tokens: list[int]) -> tuple[float, int]:
        """Feeds `tokens` (the positions not yet seen); returns the top probability and argmax of the next."""
        return self._step(tokens, None)

    @torch.inference_mode()
    def check(self, tokens: list[int], n_pending: int, rollback: str, threshold: float) -> tuple[int, list[int]]:
        """Feeds `tokens`, whose last n_pending are the small model's; returns the first cut position (n_pending
        when nothing is cut) and the argmax at each of the n_pending + 1 positions."""
        tokens = self._check_feed(tokens, n_pending)
        n = len(tokens)
        if n > MAX_GRAPH_TOKENS:
            return self._eager_check(tokens, rollback, threshold)
        self._load(tokens)
        if rollback == "ce" and self._threshold_value != float(threshold):
            self._threshold.fill_(threshold)
            self._threshold_value = float(threshold)
        self._run(("check", n, rollback))
        values = self._check_out[: n + 1].tolist()  # note: the one host-device sync per large call
        self._checked(n)
        return values[0], values[1:]

    @torch.inference_mode()
    def draft(self, tokens: list[int], k: int, budget: int, threshold: float, eos: list[int]) -> tuple[int, list[int]]:
        """Up to k greedy small steps with the loop's state on the device: feeds `tokens`, then each kept token in
        turn. A step keeps its token when its top probability is over `threshold`; the draft stops at the first
        step that does not (a fallback), after an EOS token or after `budget` kept tokens. Returns (steps taken,
        kept tokens): a fallback when steps > len(tokens). Decides exactly as `step` called in a loop would."""
        n = len(tokens)
        if n > MAX_GRAPH_TOKENS:  # catch up without a graph, then draft from the last token
            self._eager_catch_up(tokens[:-1])
            tokens, n = tokens[-1:], 1
        self._load(tokens)
        self._set_draft(threshold, eos)
        self._left.fill_(budget)  # (_ahead stays 0 and _seg unread: one row never looks ahead)
        steps = self._draft_loop(n, k, [budget])[0]
        out = self._draft_out[0, : 1 + k].tolist()  # note: the draft's tokens come back once
        self.length += n + steps - 1
        self._forget_device_state()
        return steps, out[1 : 1 + out[0]]

    def _draft_loop(self, n: int, k: int, left: list[int], need: int = 1, ahead: bool = False) -> list[int]:
        """The first step (over n fed tokens), then one step at a time while at least `need` rows run that do not
        look ahead, and fewer than k steps were taken; each step the host reads the rows' budgets (0: stopped) and
        whether they look ahead, nothing else. ahead: the lookahead graphs (BatchRunner.draft). Returns each row's
        steps taken."""
        mode = ("ahead",) if ahead else ()
        steps = [0] * len(left)
        self._run(("draft", n, *mode))
        for j in range(k):
            steps = [s + (was > 0) for s, was in zip(steps, left)]  # the rows that ran this step
            left, ahead = self._loop[:2].tolist()  # note: one small read per step, to stop the loop
            if j + 1 == k or sum(x > 0 and not a for x, a in zip(left, ahead)) < need:
                break
            self._run(("draft_next", 1, *mode))
        return steps

    def _set_draft(self, threshold: float, eos: list[int], cap: int | None = None) -> None:
        """Writes the draft loop's threshold, EOS ids and step cap (lookahead's) where they changed."""
        if len(eos) > MAX_EOS_IDS:
            raise ValueError(f"the device draft loop compares with at most {MAX_EOS_IDS} EOS ids, got {len(eos)}")
        settings = (float(threshold), tuple(eos), cap)
        if settings != self._draft_settings:
            self._fallback.fill_(float(threshold))
            self._eos.copy_(torch.tensor(list(eos) + [-1] * (MAX_EOS_IDS - len(eos))))
            self._cap.fill_(NO_CAP if cap is None else int(cap))
            self._draft_settings = settings

    # -- speculative sampling (decode/sampling.py): the draw and the rejection rule inside the graphs ----------

    max_draft = MAX_GRAPH_TOKENS - 1  # pending tokens a sample_check takes (its drafts buffer's rows, one spare)

    @torch.inference_mode()
    def sample_step(self, tokens: list[int], sampling, draft: bool = True) -> tuple[float, int]:
        """Feeds `tokens`; draws the next token from the model's sampling distribution q and returns (q's top
        probability, the token). q goes to the next row of `drafts` (always; `draft` is the eager runner's)."""
        return self._step(tokens, sampling)

    def drafts(self, k: int) -> torch.Tensor:
        """The distributions of the first k draws since `reset_drafts`: [k, V], a view valid until the next step."""
        return self._drafts[:k]

    def reset_drafts(self) -> None:
        self._slot.zero_()

    @torch.inference_mode()
    def sample_check(self, tokens: list[int], n_pending: int, drafts: torch.Tensor, sampling) -> tuple[int, int]:
        """Feeds `tokens`, whose last n_pending were drawn from `drafts` [n_pending, V]; returns the rejection
        rule's (first rejected position or n_pending, the token drawn for that position)."""
        if n_pending > self.max_draft:
            raise ValueError(f"sample_check takes at most {self.max_draft} pending tokens, got {n_pending}")
        tokens = self._check_feed(tokens, n_pending)
        n = len(tokens)
        self._load(tokens)
        if n_pending:
            self._q_in[:n_pending].copy_(drafts)
        sampling.fill(self._noise)
        self._run(("sample_check", n, sampling.key))
        cut, token = self._check_out[:2].tolist()  # note: the one host-device sync per large call
        self._checked(n)
        return cut, token

    # -- the verbs' shared parts --------------------------------------------------------------------

    def _step(self, tokens: list[int], sampling) -> tuple[float, int]:
        """A greedy step (sampling None) or a sampling step: one graph replay, one host read."""
        n = len(tokens)
        if n > MAX_GRAPH_TOKENS:  # catch up without a graph, then step on the last token
            self._eager_catch_up(tokens[:-1])
            tokens, n = tokens[-1:], 1
        self._load(tokens)
        if sampling is None:
            self._run(("step", n))
        else:
            sampling.fill(self._noise)
            self._run(("sample", n, sampling.key))
        confidence, token = self._step_out.tolist()  # note: the one host-device sync per step
        token = int(token)
        self.length += n
        self._pos_on_device, self._ids_on_device = self.length, (token,)  # the pass wrote its token into _ids
        return confidence, token

    def _check_feed(self, tokens: list[int], n_pending: int) -> list[int]:
        """The tokens a check's pass takes: the last checked one and the pending ones (the rest caught up first)."""
        if len(tokens) > n_pending + 1:  # only possible without a start prefill; keep the pass shape fixed
            self._eager_catch_up(tokens[: len(tokens) - n_pending - 1])
            tokens = tokens[len(tokens) - n_pending - 1 :]
        return tokens

    def _checked(self, n: int) -> None:
        self.length += n
        self._pos_on_device = self.length

    def rewind(self, length: int) -> None:
        """Forgets every position from `length` on: the next pass writes there, the mask hides the rest."""
        self.length = min(self.length, length)

    # -- internals ----------------------------------------------------------------------------------

    def _load(self, tokens: list[int]) -> None:
        """Brings the static input buffers to (tokens, self.length), writing only what differs."""
        n = len(tokens)
        if self._pos_on_device != self.length:
            self._pos0.fill_(self.length)
        if self._ids_on_device is None or tuple(tokens) != self._ids_on_device[:n] or len(self._ids_on_device) < n:
            if n == 1:
                self._ids[:1].fill_(tokens[0])  # a scalar kernel argument: no copy from the host
            else:
                self._host_ids[:n] = torch.tensor(tokens)
                self._ids[:n].copy_(self._host_ids[:n], non_blocking=True)
            self._ids_on_device = tuple(tokens)

    def _pass(self, key: tuple):
        """The function a graph captures: reads _ids, _pos0 (and _threshold), writes the outputs."""
        n = key[1]

        def step():
            pos = self._pos0 + self._arange[:n]
            logits = self._forward(self._ids[None, :n], pos[None], last_only=True)[0, -1].float()  # [V]
            confidence, token = step_verdict(logits)
            self._step_out[0] = confidence
            self._step_out[1] = token
            self._ids[0] = token  # the next step's input stays on the device
            self._pos0 += n

        def encode():  # the encoder over the input padded to the bucket, then the cross-attention K/V
            self.decoder.encode(self._src_ids[:, :n], self._src_len)

        def check():
            pos = self._pos0 + self._arange[:n]
            logits = self._forward(self._ids[None, :n], pos[None])[0].float()  # [n, V]
            argmax = logits.argmax(dim=-1)
            cut = first_cut(logits[:-1], argmax[:-1], self._ids[1:n], key[2], self._threshold)
            self._check_out[0] = cut
            self._check_out[1 : n + 1] = argmax
            self._pos0 += n

        def sample():  # key: ("sample", n, sampling key)
            pos = self._pos0 + self._arange[:n]
            logits = self._forward(self._ids[None, :n], pos[None], last_only=True)[0, -1].float()  # [V]
            q, confidence, token = sample_step(logits, key[2], self._noise)
            self._drafts.index_copy_(0, self._slot[None], q[None])
            self._slot.copy_((self._slot + 1).clamp(max=MAX_GRAPH_TOKENS - 1))
            self._step_out[0] = confidence
            self._step_out[1] = token
            self._ids[0] = token
            self._pos0 += n

        def sample_check():  # key: ("sample_check", n, sampling key); the drafts are in _q_in
            pos = self._pos0 + self._arange[:n]
            logits = self._forward(self._ids[None, :n], pos[None])[0].float()  # [n, V]
            cut, token = verify(logits, self._q_in[: n - 1], self._ids[1:n], key[2], self._noise)
            self._check_out[0] = cut
            self._check_out[1] = token
            self._pos0 += n

        def draft():  # key: ("draft", n): the first step over the fed tokens; the budget is in _left
            pos = self._pos0 + self._arange[:n]
            logits = self._forward(self._ids[None, :n], pos[None], last_only=True)[:, -1].float()  # [1, V]
            self._draft_first(logits, self._pos0 + n)

        if key[0] == "draft":
            return draft
        if key[0] == "draft_next":
            return lambda: self._draft_step(key[2:] == ("ahead",))
        return {"step": step, "check": check, "encode": encode, "sample": sample, "sample_check": sample_check}[key[0]]

    # -- the device draft loop --------------------------------------------------------------------------

    def _draft_first(self, logits: torch.Tensor, nxt: torch.Tensor, ahead: bool = False) -> None:
        """A draft's first step, from its logits [B, V] and each row's next position after the fed tokens."""
        self._draft_out[:, 0].zero_()
        self._nxt.copy_(nxt)
        self._draft_record(logits, ahead, self._no)

    def _draft_step(self, ahead: bool = False) -> None:
        """A draft's next step (graph ("draft_next", 1)): every row feeds its last kept token at its next position. A
        row that stopped feeds junk there, which its next real pass writes over before any query reads it."""
        pos = self._nxt.clamp(max=self.capacity - 1)[:, None]
        logits = self._forward(self._tok[:, None], pos, last_only=True)[:, -1].float()  # [B, V]
        self._draft_record(logits, ahead, self._yes)

    def _draft_record(self, logits: torch.Tensor, ahead: bool, advance: torch.Tensor) -> None:
        """A step's verdict (decode.cache.step_verdict, eager: the host loop's own numbers), then its bookkeeping
        (draft_bookkeeping / lookahead_bookkeeping; one fused kernel on CUDA when FUSE_BOOKKEEPING is on)."""
        torch.max(torch.softmax(logits, dim=-1), dim=-1, out=(self._conf, self._tok))
        state = (self._conf, self._tok, self._fallback, self._eos, self._loop, self._nxt, self._draft_out)
        if ahead:
            _bookkeeping(lookahead_bookkeeping, self.device)(*state, self._cap, self._guessed, advance)
        else:
            _bookkeeping(draft_bookkeeping, self.device)(*state, advance)

    def _run(self, key: tuple) -> None:
        graph = self._graphs.get(key)
        if graph is not None:
            graph.replay()
        else:
            # Off CUDA; or a shape no decoder planned, which runs the same pass without a graph: capturing
            # mid-sequence would let the warm-up runs write over real cache slots and the source mask.
            self._pass(key)()

    def _capture(self, key: tuple) -> None:
        """Captures one pass. Its warm-up runs write junk into the caches and the source mask, so this runs
        only at `start`, before the sequence's real data."""
        fn = self._pass(key)
        if self.is_encoder_decoder:
            # Junk, but finite junk: a fully masked attention row would give NaN, and NaN keys or values
            # poison even masked slots (0 * NaN). So every source position counts as real while capturing.
            self._src_len.fill_(self.src_capacity)
            self.decoder.src_visible.fill_(True)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # kernels chosen and workspaces allocated outside the capture
                self._zero_positions()
                fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        self._zero_positions()
        # No garbage collection inside the capture: freeing another runner's graph there (a reference cycle
        # collected at a random moment) is a CUDA call the capture forbids, and it aborts the process.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                fn()
        finally:
            if gc_was_enabled:
                gc.enable()
        self._graphs[key] = graph
        self.captures += 1
        self._forget_device_state()

    def _zero_positions(self) -> None:
        self._pos0.zero_()

    def _forget_device_state(self) -> None:
        """The host no longer knows what the device's input buffers hold: the next pass loads them."""
        self._pos_on_device = self._ids_on_device = None

    def _capture_wanted(self) -> None:
        if self.use_graphs:
            wanted = set(self._wanted)
            if self.is_encoder_decoder:  # every source bucket the buffers hold
                wanted |= {("encode", b) for b in range(_SRC_BUCKET, self.src_capacity + 1, _SRC_BUCKET)}
            for key in sorted(wanted - self._graphs.keys(), key=str):
                self._capture(key)

    def _ensure_capacity(self, length: int, src_length: int) -> None:
        """Grows the static buffers (at least doubling) when a sequence needs more; the graphs go with them."""
        if length <= self.capacity and src_length <= self.src_capacity:
            return
        aligned = lambda n: -(-n // _ALIGN) * _ALIGN  # noqa: E731
        if length > self.capacity:
            self.capacity = aligned(max(length, 2 * self.capacity))
        if src_length > self.src_capacity:
            self.src_capacity = aligned(max(src_length, 2 * self.src_capacity))
        # The graphs read the old buffers. Their memory pool goes with them: capturing into the handle of a
        # pool whose graphs are all freed trips an allocator assert (torch 2.11), so take a new one.
        self._graphs.clear()
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.decoder.allocate(self.capacity, self.src_capacity, self.batch)
        if self.is_encoder_decoder:
            self._src_ids = torch.zeros(self.batch, self.src_capacity, dtype=torch.long, device=self.device)
            self._src_len = torch.zeros(self.batch, dtype=torch.long, device=self.device)
            self._src_host = torch.zeros(self.batch, self.src_capacity, dtype=torch.long, pin_memory=self.use_graphs)

    def _eager_catch_up(self, tokens: list[int]) -> None:
        """Feeds `tokens` without a graph (any number of them) and reads nothing back."""
        ids = torch.tensor([tokens], device=self.device)
        self.decoder.forward(ids, self.length + torch.arange(len(tokens), device=self.device)[None], last_only=True)
        self.length += len(tokens)
        self._forget_device_state()

    def _eager_check(self, tokens, rollback, threshold):
        ids = torch.tensor(tokens, device=self.device)
        pos = self.length + torch.arange(len(tokens), device=self.device)
        logits = self.decoder.forward(ids[None], pos[None])[0].float()
        argmax = logits.argmax(dim=-1)
        cut = first_cut(logits[:-1], argmax[:-1], ids[1:], rollback, threshold)
        values = torch.cat([cut.view(1), argmax]).tolist()  # note: sync point
        self.length += len(tokens)
        self._forget_device_state()
        return values[0], values[1:]

