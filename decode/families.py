"""Which model families the compact passes cover, and what a model is made of: its decoder layers, its final norm,
its output head (decode/compact.py, decode/early_exit.py and align/models.py read them). A leaf module."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

GEMMA = ("gemma2", "gemma3_text")
DECODER_ONLY = ("llama", "qwen2", "mistral", "qwen3", "phi3") + GEMMA
ENC_DEC = ("bart", "marian", "t5", "mt5")


def unsupported_reason(model: PreTrainedModel) -> str | None:
    """Why the compact passes cannot run this model, or None when they can."""
    cfg = model.config
    kind = getattr(cfg, "model_type", "")
    if kind == "gemma3":
        return "Gemma 3 with its vision tower: load the text model alone (Gemma3ForCausalLM) for the fast path"
    if kind not in DECODER_ONLY + ENC_DEC:
        return f"no compact decoder for model type {kind!r} (fast path: {', '.join(DECODER_ONLY + ENC_DEC)})"
    if kind in ("t5", "mt5") and next(model.parameters()).dtype == torch.float16:
        return "T5 in float16 needs transformers' activation clamping; use bfloat16 or float32"
    if any(rope_type(r) == "dynamic" for r in rope_settings(cfg)):
        return "rope type 'dynamic' changes with the sequence length"
    if getattr(cfg, "use_bidirectional_attention", False):
        return "bidirectional attention (use_bidirectional_attention) is not a causal decoder"
    return None


def rope_settings(cfg) -> list[dict]:
    """The config's rope settings: one mapping, or Gemma 3's one per layer type (none: an empty list)."""
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if not isinstance(rope, dict) or not rope:
        return []
    return list(rope.values()) if all(isinstance(v, dict) for v in rope.values()) else [rope]


def rope_type(rope: dict) -> str | None:
    return rope.get("rope_type", rope.get("type"))


def soft_cap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap), Gemma 2's soft-capping of attention scores and logits; x itself without a cap."""
    return x if cap is None else torch.tanh(x / cap) * cap


def decoder_layer_modules(model: PreTrainedModel) -> list:
    """The decoder's layers as the model holds them (T5's may differ in number from its encoder's)."""
    kind = model.config.model_type
    if kind in DECODER_ONLY:
        return list(model.model.layers)
    dec = model.get_decoder()
    return list(dec.block) if kind in ("t5", "mt5") else list(dec.layers)


def decoder_layers(model: PreTrainedModel) -> int:
    """The number of decoder layers, as the passes count them."""
    return len(decoder_layer_modules(model))


def final_norm_module(model: PreTrainedModel):
    """The decoder's final norm, or None (BART and Marian have none: each layer ends normalised)."""
    kind = model.config.model_type
    if kind in DECODER_ONLY:
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
    return logits + model.final_logits_bias if kind not in DECODER_ONLY else logits
