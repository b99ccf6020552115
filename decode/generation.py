"""What every decoder here shares: input checks, rows decoded together or one after another, and
`generate`'s output layout.

A batch of one row is decoded as the paper measures (batch size 1). A batch of several rows is decoded
together where the decoder and its path can (`_decode_batch`: BiLD and Greedy, greedy or sampling, on the fast
path; decode/batch.py), else row after row (said once). Either way each row's greedy tokens are those of
decoding it alone (sampled rows follow the same distribution, from other random numbers), and the result is
laid out as `model.generate` lays it out, so callers can swap decoders freely:
- decoder-only: each row's prompt as given (padding included), then its new tokens;
- encoder-decoder: the decoder start token, then the new tokens;
rows that finish early are right-padded with the pad token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields

import torch
from transformers import PreTrainedModel

from decode.cache import decoder_start_token_id, eos_token_ids, is_encoder_decoder, pad_token_id


@dataclass
class DecodeStats:
    """Counts over every decoded row. new_tokens == small_tokens + large_tokens always holds."""

    rows: int = 0
    new_tokens: int = 0
    small_steps: int = 0  # small-model forward passes, including the ones whose token was discarded
    small_tokens: int = 0  # small-model tokens kept in the output
    large_tokens: int = 0  # tokens written by the large model (fallback, rollback or its own greedy step)
    large_calls: int = 0  # large-model forward passes after the prompt
    fallbacks: int = 0  # large calls because the small model's confidence was at or under fallback_threshold
    step_cap_fallbacks: int = 0  # large calls because max_small_steps small tokens were pending
    rollbacks: int = 0
    rolled_back_tokens: int = 0  # small-model tokens discarded by rollbacks
    small_passes: int = 0  # small-model passes: one per small step row by row, one per batch step together
    large_passes: int = 0  # large-model passes after the prompt: one pass may check several rows of a batch
    compactions: int = 0  # a batch's unfinished rows moved into the runners of a smaller batch (decode/batch.py)
    seconds: float = 0.0  # wall time inside generate, device synchronised

    def add(self, other: "DecodeStats") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def tokens_per_large_call(self) -> float:
        return self.new_tokens / self.large_calls if self.large_calls else float("nan")

    @property
    def fallback_rate(self) -> float:
        """Policy fallbacks (confidence or step cap) per new token."""
        return (self.fallbacks + self.step_cap_fallbacks) / self.new_tokens if self.new_tokens else 0.0

    @property
    def rollback_rate(self) -> float:
        """Rollbacks per new token."""
        return self.rollbacks / self.new_tokens if self.new_tokens else 0.0

    @property
    def rows_per_large_pass(self) -> float:
        """Rows a large-model pass checks on average: 1 row by row, up to the batch size together."""
        return self.large_calls / self.large_passes if self.large_passes else float("nan")

    def as_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(
            rows_per_large_pass=self.rows_per_large_pass,
            tokens_per_large_call=self.tokens_per_large_call,
            fallback_rate=self.fallback_rate,
            rollback_rate=self.rollback_rate,
        )
        return d


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # [B, L], laid out as model.generate lays it out
    stats: DecodeStats = field(default_factory=DecodeStats)
    new_lengths: list[int] = field(default_factory=list)  # per row: its new tokens (the rest of the row is padding)


def device_sync(device: torch.device) -> None:
    """Waits for queued device work, so that a clock read after it means something."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@dataclass
class Row:
    """One sequence being decoded, and where the policy stands on it: its tokens (the prompt or the decoder start
    token, then the new ones) and the first position the large model has not checked (the pending tokens start
    there)."""

    seq: list[int]
    prefix_len: int = field(init=False)
    pending_start: int = field(init=False)

    def __post_init__(self):
        self.prefix_len = self.pending_start = len(self.seq)

    @property
    def n_pending(self) -> int:
        return len(self.seq) - self.pending_start

    @property
    def n_new(self) -> int:
        return len(self.seq) - self.prefix_len

    @property
    def new_tokens(self) -> list[int]:
        return self.seq[self.prefix_len :]


class RowDecoder:
    """Base class: checks the inputs, decodes each row with `_decode_row`, assembles the output."""

    def __init__(self, model: PreTrainedModel):
        # `model` sets the output layout: its kind, special tokens and device.
        self.layout_model = model
        self.is_encoder_decoder = is_encoder_decoder(model)
        self.eos_token_ids = eos_token_ids(model)
        self.pad_token_id = pad_token_id(model)
        self.decoder_start_token_id = decoder_start_token_id(model) if self.is_encoder_decoder else None
        self.device = next(model.parameters()).device
        self._sampling = None  # set by each generate call

    def _decode_row(self, prompt: list[int], max_new_tokens: int, stats: DecodeStats) -> list[int]:
        """Returns only the new tokens for one row. prompt: the encoder input, or the decoder-only prompt."""
        raise NotImplementedError

    def _decode_batch(self, prompts: list[list[int]], max_new_tokens: int, stats: DecodeStats) -> list[list[int]]:
        """Decodes the rows together; returns each row's new tokens, equal to `_decode_row`'s for that row."""
        raise NotImplementedError

    def _batch_blocker(self) -> str | None:
        """Why this decoder decodes a batch row after row with its current settings; None: it decodes it together."""
        return "this decoder decodes one row at a time"

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> GenerateOutput:
        """input_ids: [B, S] (or [S]); attention_mask: [B, S], 0 on padding (either side).

        do_sample: sample with `temperature`, `top_k`, `top_p` (transformers' warpers, in generate's order),
        drawing from `generator` (on the models' device); otherwise greedy, and those settings are unused."""
        from decode.fast import notice
        from decode.sampling import Sampling

        self._sampling = Sampling(temperature, top_k, top_p, generator) if do_sample else None
        if do_sample:
            self._check_sampling()
        if max_new_tokens is None or int(max_new_tokens) < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if attention_mask is not None and attention_mask.dim() == 1:
            attention_mask = attention_mask.unsqueeze(0)
        if input_ids.dim() != 2 or input_ids.numel() == 0:
            raise ValueError(f"input_ids must be a non-empty [batch, length] tensor, got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}")

        ids_cpu, mask_cpu = input_ids.cpu(), attention_mask.cpu().bool()
        prompts = [ids_cpu[i][mask_cpu[i]].tolist() for i in range(ids_cpu.shape[0])]
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"row {i} of the input is empty (its attention_mask is all zeros)")

        stats = DecodeStats()
        device_sync(self.device)
        start = time.perf_counter()
        blocker = self._batch_blocker() if len(prompts) > 1 else "one row"
        if blocker is None:
            new_rows = self._decode_batch(prompts, int(max_new_tokens), stats)
            stats.rows += len(prompts)
        else:
            if len(prompts) > 1:
                notice(f"{type(self).__name__} decodes a batch row after row: {blocker}")
            new_rows = []
            for prompt in prompts:
                new_rows.append(self._decode_row(prompt, int(max_new_tokens), stats))
                stats.rows += 1
            stats.small_passes, stats.large_passes = stats.small_steps, stats.large_calls
        device_sync(self.device)
        stats.seconds = time.perf_counter() - start
        stats.new_tokens = sum(len(r) for r in new_rows)
        return GenerateOutput(sequences=self._assemble(ids_cpu, new_rows), stats=stats,
                              new_lengths=[len(r) for r in new_rows])

    def _check_sampling(self) -> None:
        """Raises where this decoder cannot sample with its settings."""

    def _assemble(self, input_ids: torch.Tensor, new_rows: list[list[int]]) -> torch.Tensor:
        width = max(len(r) for r in new_rows)
        new = torch.full((len(new_rows), width), self.pad_token_id, dtype=torch.long)
        for i, row in enumerate(new_rows):
            new[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        if self.is_encoder_decoder:
            start = torch.full((len(new_rows), 1), self.decoder_start_token_id, dtype=torch.long)
            return torch.cat([start, new], dim=1)
        return torch.cat([input_ids, new], dim=1)

    def _row(self, prompt: list[int]) -> Row:
        """A row starting from the tokens the decoder starts from: the prompt, or the decoder start token."""
        return Row([self.decoder_start_token_id] if self.is_encoder_decoder else list(prompt))

    def _finished(self, row: Row, max_new_tokens: int) -> bool:
        """Whether the row has its max_new_tokens or ended with EOS (its pending tokens may still need a check)."""
        return row.n_new >= max_new_tokens or (row.n_new > 0 and row.seq[-1] in self.eos_token_ids)
