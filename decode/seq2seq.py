"""The encoder-decoder families' passes: BART and Marian (post- or pre-norm, learned or sinusoidal positions), and
T5/mT5 (relative position bias, RMS norms, gated or plain MLPs). The encoder runs once per input and writes every
layer's cross-attention keys and values into static buffers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from decode.compact import (Decoder, Passes, StaticKV, activation, attend, causal_mask, cross_attention, fuse_linears,
                            gated_activation, heads, linear, one_token, self_attention, stored, t5_norm,
                            write_cache)




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
        return super().row_buffers() + self.cross.buffers() + [(self.src_visible, 0), (self.src_last, 0)]

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
        self.layer = self._pass(_bart_layer(self.n_heads, eps, attn.scaling, act, kernel, self.mlp_activation,
                                            self.stored_qkv), "layer")
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
        final, final_eps, head_weight = self.final, self.final_eps, self.head_weight

        def head(h, logits_bias):
            if final is not None:
                h = F.layer_norm(h, h.shape[-1:], *final, final_eps)
            return linear(h, head_weight) + logits_bias

        self._head = self._pass(head, "head")

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
        return self._head(h, self.logits_bias)

    def decoder(self):
        return BartDecoder(self)


def _bart_embed(eps):
    def embed(ids, pos, table, positions, scale, offset, norm):
        """Token embeddings (scaled) plus learned or sinusoidal positions, then the embedding norm where there is one.
        Positions are clamped: a batch's padding tokens sit past their row's end and may run past the table."""
        h = F.embedding(ids, table) * scale + positions[(pos + offset).clamp(max=positions.shape[0] - 1)]
        return F.layer_norm(h, h.shape[-1:], *norm, eps) if norm is not None else h

    return embed


def _bart_layer(n_heads, eps, scale, act, kernel=False, mlp_activation="inline", stored_qkv=False):
    def layer(h, pos, k_cache, v_cache, cross_k, cross_v, src_visible, src_last, w):
        """One BART decoder layer (post-norm) over h [B, n, d] at pos [B, n]; writes the self-attention caches."""
        (qkv_w, qkv_b, o_w, o_b, ln1_w, ln1_b, cq_w, cq_b, co_w, co_b, ln2_w, ln2_b,
         fc1_w, fc1_b, fc2_w, fc2_b, ln3_w, ln3_b) = w
        d = h.shape[-1:]
        qkv = linear(h, qkv_w, qkv_b)
        if stored_qkv and one_token(h):  # (compact.STORED_QKV)
            qkv = stored(qkv)
        q, k, v = (heads(x, n_heads) for x in qkv.chunk(3, dim=-1))
        out = self_attention(q, k, v, k_cache, v_cache, pos, scale, kernel=kernel)
        h = F.layer_norm(h + linear(out, o_w, o_b), d, ln1_w, ln1_b, eps)
        out = cross_attention(heads(linear(h, cq_w, cq_b), n_heads), cross_k, cross_v, src_visible, src_last, scale, kernel)
        h = F.layer_norm(h + linear(out, co_w, co_b), d, ln2_w, ln2_b, eps)
        out = linear(activation(linear(h, fc1_w, fc1_b), act, mlp_activation), fc2_w, fc2_b)
        return F.layer_norm(h + out, d, ln3_w, ln3_b, eps)

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
        self.layer = self._pass(_t5_layer(self.n_heads, eps, act, gated, kernel, self.mlp_activation), "layer")
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


def _t5_mlp(h, norm_w, wi, wo, eps, act, gated, how="inline"):
    if gated:
        return h + linear(gated_activation(h, t5_norm, norm_w, eps, wi, None, act, how=how), wo)
    return h + linear(activation(linear(t5_norm(h, norm_w, eps), wi), act, how), wo)


def _t5_layer(n_heads, eps, act, gated, kernel=False, mlp_activation="inline"):
    def layer(h, pos, bias, cross_bias, src_last, k_cache, v_cache, cross_k, cross_v, w):
        """One T5 decoder block over h [B, n, d] at pos [B, n]; bias: [B, H, n, capacity] (position bias and causal
        mask), cross_bias: additive over the source slots; writes the self-attention caches."""
        ln0, qkv_w, o_w, ln1, cq_w, co_w, ln2, wi, wo = w
        q, k, v = (heads(x, n_heads) for x in linear(t5_norm(h, ln0, eps), qkv_w).chunk(3, dim=-1))
        write_cache(k_cache, v_cache, pos, k, v)
        h = h + linear(attend(q, k_cache, v_cache, bias, 1.0), o_w)
        q = heads(linear(t5_norm(h, ln1, eps), cq_w), n_heads)
        h = h + linear(cross_attention(q, cross_k, cross_v, cross_bias, src_last, 1.0, kernel), co_w)
        return _t5_mlp(h, ln2, wi, wo, eps, act, gated, mlp_activation)

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


