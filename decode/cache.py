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

from decode.sampling import sample_step, verify


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


def step_verdict(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What a small step decides from: logits [..., V] float32 -> (top probability, argmax) [...], on the device.

    The top probability is the softmax's at the argmax, 1 / sum(exp(logits - top logit)): one max and one sum over the
    vocabulary, where a softmax, then its max, writes and reads every probability (ties: the first index, as argmax)."""
    top, token = logits.max(dim=-1)
    return 1.0 / torch.exp(logits - top[..., None]).sum(dim=-1), token


def first_cut(logits: torch.Tensor, argmax: torch.Tensor, pending: torch.Tensor, rollback: str, threshold) -> torch.Tensor:
    """The rollback rule, on the device. logits: [k, V] float32, row i the large model's distribution for
    pending token i; argmax: [k]; pending: [k]. Returns the first position to cut (0-d long), k when none.

    rollback "exact": the first disagreement with the large model's argmax (lossless);
    "ce": the first token with -log p_L(token) > threshold (the paper's rule; every position checked).
    """
    return first_cuts(logits[None], argmax[None], pending[None], None, rollback, threshold)[0]


def first_cuts(logits, argmax, pending, n_pending, rollback: str, threshold) -> torch.Tensor:
    """`first_cut` for B rows at once, each with its own number of pending tokens. logits: [B, m, V];
    argmax, pending: [B, m]; n_pending: [B] (row b's pending tokens are its first n_pending[b]; None: all m).
    Returns [B] long, n_pending[b] where row b has nothing to cut."""
    m = pending.shape[1]
    if m == 0:
        return torch.zeros(pending.shape[0], dtype=torch.long, device=logits.device)
    positions = torch.arange(m, device=logits.device)
    if rollback == "exact":
        cut_mask = argmax != pending
    else:
        nll = -torch.log_softmax(logits, dim=-1).gather(-1, pending[..., None]).squeeze(-1)  # [B, m]
        cut_mask = nll > threshold
    if n_pending is None:
        return torch.where(cut_mask, positions, m).min(dim=1).values
    cut_mask &= positions < n_pending[:, None]
    return torch.where(cut_mask, positions, n_pending[:, None]).min(dim=1).values


class ModelRunner:
    """Feeds one sequence (batch size 1) through a model's own forward, keeping its KV cache across calls.

    The eager path: any architecture, any device. decode.fast.FastRunner has the same verbs.
    """

    path = "eager (transformers forward, DynamicCache)"

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.is_encoder_decoder = is_encoder_decoder(model)
        prefer_fast_attention()
        # Decoder-only heads can skip the LM head on prompt positions whose logits nobody reads.
        self._has_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        # transformers 5.24 renamed the forward's `past_key_values` to `cache` (the old name still works, with a
        # deprecation warning on every call); earlier 5.x releases take only the old name
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.device = next(model.parameters()).device
        self.cache = None
        self.length = 0
        self._drafts: list[torch.Tensor] = []

    def plan(self, keys) -> None:
        """Nothing to prepare on the eager path (decode.fast.FastRunner captures graphs here)."""

    @torch.inference_mode()
    def start(self, prompt: list[int], max_new_tokens: int | None = None) -> None:
        """Begins a new sequence. prompt: the encoder input for an encoder-decoder model, else unused here."""
        self.length = 0
        self._drafts = []
        if self.is_encoder_decoder:
            input_ids = torch.tensor([prompt], device=self.device)
            # No attention mask: the row has no padding, and an all-ones mask makes the attention code
            # check it with a device sync on every decoder step.
            hidden = self.model.get_encoder()(input_ids=input_ids)
            self.encoder_outputs = BaseModelOutput(last_hidden_state=hidden.last_hidden_state)
            # No config passed: layers are created lazily, so the cache always has the decoder's layer
            # count, also for T5 configs whose decoder depth differs from the encoder's.
            self.cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        else:
            # No config passed: full-length layers also for sliding-window models (Mistral, some Qwen2).
            # A sliding layer drops keys past the window and cannot be rewound there; a full layer keeps
            # them, and the model's mask (built from its config) still hides what lies outside the window.
            self.cache = DynamicCache()

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
                decoder_input_ids=ids,
                use_cache=True,
                **{self._cache_arg: self.cache},
                **kwargs,
            )
        else:
            out = self.model(input_ids=ids, use_cache=True, **{self._cache_arg: self.cache}, **kwargs)
        self.cache = getattr(out, self._cache_arg)
        self.length += len(tokens)
        logits = out.logits[0]  # [n or k, V]
        if logits_to_keep is not None:
            logits = logits[-logits_to_keep:]
        return logits.float()

    def step(self, tokens: list[int]) -> tuple[float, int]:
        """Feeds `tokens`; returns the top probability and the argmax for the next position."""
        confidence, token = step_verdict(self.forward(tokens, logits_to_keep=1)[-1])
        confidence, token = torch.stack([confidence, token.float()]).tolist()  # note: a CPU-GPU sync point
        return confidence, int(token)

    def check(self, tokens: list[int], n_pending: int, rollback: str, threshold: float) -> tuple[int, list[int]]:
        """Feeds `tokens`, whose last n_pending are pending small-model tokens. Returns the first cut position
        (n_pending when nothing is cut) and the large model's argmax at each of the n_pending + 1 positions."""
        # Row r predicts pending token r (the last row: the position after them). The large model has seen
        # everything before the first row, so only the prompt prefill has rows nobody reads.
        logits = self.forward(tokens, logits_to_keep=n_pending + 1)  # [k+1, V]
        argmax = logits.argmax(dim=-1)
        pending = torch.tensor(tokens[len(tokens) - n_pending :], dtype=torch.long, device=logits.device)
        cut = first_cut(logits[:-1], argmax[:-1], pending, rollback, threshold)
        values = torch.cat([cut.view(1), argmax]).tolist()  # note: a CPU-GPU sync point
        return values[0], values[1:]

    # speculative sampling (decode/sampling.py): the same verbs as decode.fast.FastRunner's

    max_draft = None  # pending tokens a sample_check can take (no limit here)

    def sample_step(self, tokens: list[int], sampling, draft: bool = True) -> tuple[float, int]:
        """Feeds `tokens`; draws the next token from the model's sampling distribution q and returns (q's top
        probability, the token). With `draft`, q is kept for `drafts` until `reset_drafts`."""
        logits = self.forward(tokens, logits_to_keep=1)[-1]
        q, confidence, token = sample_step(logits, sampling.key, sampling.noise(0, logits.shape[-1], logits.device))
        if draft:
            self._drafts.append(q)
        confidence, token = torch.stack([confidence, token.float()]).tolist()  # note: a CPU-GPU sync point
        return confidence, int(token)

    def drafts(self, k: int) -> torch.Tensor:
        """The distributions of the first k draws since `reset_drafts`: [k, V]."""
        return torch.stack(self._drafts[:k]) if k else torch.zeros(0, device=self.device)

    def reset_drafts(self) -> None:
        self._drafts = []

    def sample_check(self, tokens: list[int], n_pending: int, drafts: torch.Tensor, sampling) -> tuple[int, int]:
        """Feeds `tokens`, whose last n_pending were drawn from `drafts` [n_pending, V]; returns the rejection
        rule's (first rejected position or n_pending, the token drawn for that position)."""
        logits = self.forward(tokens, logits_to_keep=n_pending + 1)  # [k+1, V]
        pending = torch.tensor(tokens[len(tokens) - n_pending :], dtype=torch.long, device=logits.device)
        cut, token = verify(logits, drafts, pending, sampling.key, sampling.noise(n_pending, logits.shape[-1], logits.device))
        cut, token = torch.stack([cut, token]).tolist()  # note: a CPU-GPU sync point
        return cut, token

    def rewind(self, length: int) -> None:
        """Forgets every position from `length` on; the next forward writes there."""
        if length < self.length:
            # A negative argument removes that many tokens in every transformers 5.x release
            # (5.23 accepts nothing else; earlier ones read a positive value as the length to keep).
            self.cache.crop(length - self.length)
            self.length = length
