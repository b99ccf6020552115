"""One model and its KV cache, fed a few tokens at a time and rewound on rollback.

The cache length is the single source of truth for position: `ModelRunner.length` counts the tokens
whose keys and values the cache holds; `rewind(n)` drops everything from position n on, so the next
`forward` overwrites it. The accepted prefix is never recomputed, and an encoder runs once per input.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache, EncoderDecoderCache, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput


def prefer_fast_attention() -> None:
    """Turns off PyTorch's cuDNN attention backend, which plans anew for every new shape.

    Measured on an H200 (torch 2.11, 2026-11-22, scripts/profile_train_step.py): a BART training step
    on Multi30k batches, whose lengths change every step, spent 112 ms in forward with it and 15 ms
    without. Decoding sees a new key length every step, so it pays the same toll. The flash and
    memory-efficient backends remain.
    """
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)


def is_encoder_decoder(model: PreTrainedModel) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def vocab_size(model: PreTrainedModel) -> int:
    """Width of the model's logits, which is what two models must share to decode together."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.get_text_config(decoder=True).vocab_size)


def eos_token_ids(model: PreTrainedModel) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def pad_token_id(model: PreTrainedModel) -> int:
    for source in (model.generation_config, model.config):
        pad = getattr(source, "pad_token_id", None)
        if pad is not None:
            return int(pad)
    eos = sorted(eos_token_ids(model))
    return eos[0] if eos else 0


def decoder_start_token_id(model: PreTrainedModel) -> int:
    for source in (model.generation_config, model.config):
        start = getattr(source, "decoder_start_token_id", None)
        if start is not None:
            return int(start)
    raise ValueError(f"{type(model).__name__} is an encoder-decoder model but names no decoder_start_token_id")


class ModelRunner:
    """Feeds one sequence (batch size 1) through a model, keeping its KV cache across calls."""

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.is_encoder_decoder = is_encoder_decoder(model)
        prefer_fast_attention()
        # Decoder-only heads can skip the LM head on prompt positions whose logits nobody reads.
        self._has_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.device = next(model.parameters()).device
        self.cache = None
        self.length = 0

    @torch.inference_mode()
    def start(self, input_ids: torch.Tensor | None = None) -> None:
        """Begins a new sequence. input_ids: [1, S], the encoder input for an encoder-decoder model."""
        self.length = 0
        if self.is_encoder_decoder:
            input_ids = input_ids.to(self.device)
            self.encoder_mask = torch.ones_like(input_ids)
            hidden = self.model.get_encoder()(input_ids=input_ids, attention_mask=self.encoder_mask)
            self.encoder_outputs = BaseModelOutput(last_hidden_state=hidden.last_hidden_state)
            # No config passed: layers are created lazily, so the cache always has the decoder's layer
            # count, also for T5 configs whose decoder depth differs from the encoder's.
            self.cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        else:
            self.cache = DynamicCache(config=self.model.config)

    @torch.inference_mode()
    def forward(self, tokens: list[int], logits_to_keep: int | None = None) -> torch.Tensor:
        """Feeds `tokens` at positions length..length+n-1 and returns float32 logits [k, V].

        k is n, or the last `logits_to_keep` positions where the model can skip the rest.
        """
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)  # [1, n]
        kwargs = {}
        if logits_to_keep is not None and self._has_logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        if self.is_encoder_decoder:
            out = self.model(
                encoder_outputs=self.encoder_outputs,
                attention_mask=self.encoder_mask,
                decoder_input_ids=ids,
                past_key_values=self.cache,
                use_cache=True,
                **kwargs,
            )
        else:
            out = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True, **kwargs)
        self.cache = out.past_key_values
        self.length += len(tokens)
        logits = out.logits[0]  # [n or k, V]
        if logits_to_keep is not None:
            logits = logits[-logits_to_keep:]
        return logits.float()

    def rewind(self, length: int) -> None:
        """Forgets every position from `length` on; the next forward writes there."""
        if length < self.length:
            # A negative argument removes that many tokens in every transformers 5.x release
            # (5.23 accepts nothing else; earlier ones read a positive value as the length to keep).
            self.cache.crop(length - self.length)
            self.length = length
