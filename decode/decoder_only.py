"""The decoder-only families' passes: Llama (any static rope type), Qwen2, Mistral, Qwen3, Phi-3, Gemma 2 and
Gemma 3's text model. One layer function serves them all; what differs is read off the model once (LlamaPasses).
The settings they read (decode.compact's KERNEL_ROTARY, ...) are read from that module when the passes
are made, so that changing them there takes effect."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

import decode.compact as compact
from decode.compact import (Decoder, Passes, fuse_linears, gated_activation, gemma_norm, heads, linear, linear_parts,
                            norm_linear, notice, one_token, rms_norm, self_attention, settled, stored)
from decode.families import GEMMA, rope_settings, rope_type, soft_cap


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
        longrope = [r for r in rope_settings(cfg) if rope_type(r) == "longrope"]
        self.rope_limit = (longrope[0].get("original_max_position_embeddings") or cfg.max_position_embeddings
                           if longrope else None)
        norm = gemma_norm if cfg.model_type in GEMMA else rms_norm
        scale = getattr(self.embed_tokens, "embed_scale", None)
        # Gemma: sqrt(d) rounded to the weights' dtype first, as transformers does (a Python number: graph capture
        # allows no host-to-device copy)
        self.embed_scale = None if scale is None else float(torch.as_tensor(float(scale)).to(self.dtype))
        self.weights = [self._layer_weights(layer) for layer in layers]
        eps = _eps(layers[0].input_layernorm)
        final_eps = _eps(inner.norm)
        self.final_weight = self._keep(inner.norm.weight)
        act_name = getattr(cfg, "hidden_activation", None) or cfg.hidden_act
        act = ACT2FN[act_name]
        softcap = getattr(cfg, "attn_logit_softcapping", None)
        if softcap is not None and getattr(cfg, "_attn_implementation", None) == "sdpa":
            # transformers' SDPA attention drops the soft-capping (Gemma 2 loads with it by default in transformers
            # before 5.2x): the passes compute what the model computes
            notice(f"{self.name}: its attention (sdpa) skips attn_logit_softcapping, and so do the fast passes; "
                   "load it with attn_implementation='eager' for Gemma 2's soft-capped attention")
            softcap = None
        kernel = self._decode_kernel(softcap)  # at every width (measured: compact.DECODE_KERNEL)
        layers = {w: _llama_layer(self.n_heads, self.n_kv_heads, self.head_dim, eps, attn.scaling, act, w, norm,
                                  softcap, self.matmul_attention, kernel, compact.KERNEL_ROTARY, self.norm_in_product,
                                  self.mlp_activation, self.stored_qkv, compact.DEFERRED_RESIDUAL)
                  for w in set(self.windows)}
        label = {w: f"layer{' (sliding window)' if w is not None else ''}" for w in layers}
        self.layer = {w: self._pass(fn, label[w]) for w, fn in layers.items()}
        # the same layers after one that left its MLP's output pending (a pass of its own: the first layer's graphs
        # take no pending output, the others' take one)
        self.layer_after = {w: self._pass(fn, f"{label[w]} after a pending one") for w, fn in layers.items()}
        self.settle = self._pass(lambda h, pending: h + settled(pending, h.dtype), "last layer's pending output")
        self.head_weight = self._keep(model.lm_head.weight)
        head_weight = self.head_weight
        logit_cap = getattr(cfg, "final_logit_softcapping", None)
        fused = self.norm_in_product

        def head(h, norm_weight):
            return soft_cap(norm_linear(h, norm, norm_weight, final_eps, head_weight, fused=fused), logit_cap)

        self._head = self._pass(head, "head")

    def _layer_weights(self, layer) -> tuple:
        """One layer's weights as the layer function reads them (q/k/v and gate/up fused; None where the family lacks
        one)."""
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
        return (
            self._keep(layer.input_layernorm.weight), qkv, qkv_bias,
            self._keep(q_norm.weight if q_norm is not None else None),
            self._keep(k_norm.weight if k_norm is not None else None),
            self._keep(a.o_proj.weight), self._keep(a.o_proj.bias),
            self._keep(layer.post_attention_layernorm.weight if sandwich else None),
            self._keep(mlp_norm.weight), gate_up, gate_up_bias,
            self._keep(m.down_proj.weight), self._keep(m.down_proj.bias),
            self._keep(layer.post_feedforward_layernorm.weight if sandwich else None))

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


def _llama_layer(n_heads, n_kv_heads, head_dim, eps, scale, act, window, norm=rms_norm, softcap=None, matmul=False,
                 kernel=False, kernel_rope=False, fused_norm=False, mlp_activation="inline", stored_qkv=False,
                 deferred=False):
    split = [n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim]
    gqa = n_heads != n_kv_heads

    def layer(h, pending, pos, cos, sin, k_cache, v_cache, w):
        """One decoder-only layer over h [B, n, d] at pos [B, n]; cos, sin: [capacity, D_rot]; writes the caches.
        pending: None, or the previous layer's MLP output (linear_parts's terms), to be added to h first. Returns the
        layer's output and None, or (deferred: compact.DEFERRED_RESIDUAL) its output without the MLP's and that
        MLP's output pending, in a compiled pass of several tokens where the down product has neither a bias nor a
        norm after it: the next layer adds it in the kernel of its first norm. The weights a family lacks (q/k norms,
        the norms after attention and MLP, biases) are None."""
        ln1, qkv_w, qkv_b, q_ln, k_ln, o_w, o_b, attn_ln, ln2, gate_up_w, gate_up_b, down_w, down_b, mlp_ln = w
        if pending is not None:
            h = h + settled(pending, h.dtype)
        qkv = norm_linear(h, norm, ln1, eps, qkv_w, qkv_b, fused_norm)
        if stored_qkv and one_token(h):  # (compact.STORED_QKV)
            qkv = stored(qkv)
        q, k, v = qkv.split(split, dim=-1)
        q, k, v = heads(q, n_heads), heads(k, n_kv_heads), heads(v, n_kv_heads)
        if q_ln is not None:
            q, k = norm(q, q_ln, eps), norm(k, k_ln, eps)
        out = self_attention(q, k, v, k_cache, v_cache, pos, scale, window, gqa, softcap, matmul, kernel, (cos, sin),
                             kernel_rope)
        out = linear(out, o_w, o_b)
        h = h + (out if attn_ln is None else norm(out, attn_ln, eps))
        x = gated_activation(h, norm, ln2, eps, gate_up_w, gate_up_b, act, fused_norm, mlp_activation)
        if deferred and down_b is None and mlp_ln is None and torch.compiler.is_compiling() and not one_token(h):
            return h, linear_parts(x, down_w)
        out = linear(x, down_w, down_b)
        return h + (out if mlp_ln is None else norm(out, mlp_ln, eps)), None

    return layer


class LlamaDecoder(Decoder):
    def allocate(self, capacity, src_capacity, batch=1):
        super().allocate(capacity, src_capacity, batch)
        self.tables = {key: self.passes.rotary_tables(capacity, key) for key in set(self.passes.rope_keys)}
        for t in (t for pair in self.tables.values() for t in pair):
            torch._dynamo.maybe_mark_dynamic(t, 0)
            compact._static(t, 1)

    def run_layers(self, h, pos, start, stop):
        p = self.passes
        pending = None  # the previous layer's MLP output, where it left it to this one
        for i in range(start, stop):
            k_cache, v_cache = self.kv.layers[i]
            cos, sin = self.tables[p.rope_keys[i]]
            layer = (p.layer if pending is None else p.layer_after)[p.windows[i]]
            h, pending = layer(h, compact._static(pending, 0, 3), pos, cos, sin, k_cache, v_cache, p.weights[i])
        return h if pending is None else p.settle(h, compact._static(pending, 0, 3))


