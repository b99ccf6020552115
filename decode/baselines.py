"""Baselines behind BiLD's calling convention: `generate(input_ids, attention_mask, max_new_tokens)`.

- `Greedy(model)`: one model alone, greedy, through the same cache machinery as BiLD (the fair
  reference for speedup: same loop, same caches, same precision).
- `HFGenerate(model)`: `model.generate` greedy, row by row: speed against transformers itself.
- `AssistedGeneration(large, small)`: transformers assisted generation, `large.generate(...,
  assistant_model=small)`, row by row (it supports batch size 1 only). Lossless draft-and-verify
  with exact-match verification.
- `HFEarlyExit(model, k)`: transformers' self-speculative decoding, `model.generate(..., assistant_early_exit=k)`
  (LayerSkip's drafting with the first k layers), where the architecture supports it.
"""

from __future__ import annotations

import inspect

import torch
from transformers import PreTrainedModel

from decode.bild import device_loop_on
from decode.loading import check_pair, greedy_generation_config
from decode.batch import BatchRunner, rows_to_stay, should_compact
from decode.draft_loop import MAX_DRAFT_STEPS
from decode.fast import FastRunner, make_runner
from decode.generation import DecodeStats, RowDecoder


class Greedy(RowDecoder):
    """A single model decoding greedily with the same runner BiLD uses."""

    def __init__(self, model: PreTrainedModel, fast_path: bool | None = None, device_loop: bool | None = None,
                 compile: bool | None = None):
        super().__init__(model)
        self.model = model.eval()
        self.compile = compile
        self._runner = make_runner(self.model, fast_path, compile)  # the same path BiLD takes: speedups compare like with like
        # the loop's state on the device, as BiLD's draft loop (BiLDConfig.device_loop, the same setting): a draft that
        # never falls back
        self.device_loop = device_loop
        self._runner.plan([("step", 1)] + ([("draft", 1), ("draft_next", 1)] if self._on_device(self._runner) else []))
        self.path = self._runner.path

    def _on_device(self, runner) -> bool:
        return device_loop_on(self.device_loop, runner, self.eos_token_ids)

    def _steps(self, runner, feeds, budgets, *need):
        """Greedy steps, each row until EOS or its budget, the state on the device: a draft that never falls back."""
        return runner.draft(feeds, MAX_DRAFT_STEPS, budgets, -1.0, self.eos_token_ids, *need)

    def _decode_row(self, prompt: list[int], max_new_tokens: int, stats: DecodeStats) -> list[int]:
        runner = self._runner
        sampling = self._sampling
        if sampling is not None:
            runner.plan([("sample", 1, sampling.key)])
        runner.start(prompt, max_new_tokens)
        row = self._row(prompt)
        while not self._finished(row, max_new_tokens):
            feed = row.seq[runner.length :]
            if sampling is None and self._on_device(runner):
                _, kept = self._steps(runner, feed, max_new_tokens - row.n_new)
            elif sampling is None:
                kept = [runner.step(feed)[1]]  # note: sync point
            else:
                kept = [runner.sample_step(feed, sampling, draft=False)[1]]  # note: sync point
            row.seq.extend(kept)
            stats.large_calls += len(kept)
            stats.large_tokens += len(kept)
        return row.new_tokens

    def _batch_blocker(self) -> str | None:
        if type(self._runner) is not FastRunner:
            return f"batches are decoded together on the fast path only (this model runs on {self.path})"
        return None

    def _decode_batch(self, prompts: list[list[int]], max_new_tokens: int, stats: DecodeStats) -> list[list[int]]:
        """One pass per token for every unfinished row; finished rows sit out, and the runner compacts as BiLD's
        do (decode/batch.py), so batched speedups compare like with like."""
        runner = BatchRunner.for_model(self.model, len(prompts), self.compile)
        sampling = self._sampling
        if sampling is not None:
            runner.plan([("sample", 1, sampling.key)])
        else:
            runner.plan([("step", 1)] + ([("draft", 1), ("draft_next", 1)] if self._on_device(runner) else []))
        runner.start(prompts, max_new_tokens)
        rows = [self._row(p) for p in prompts]
        order = list(range(len(prompts)))  # the sequence in each runner row
        while True:
            live = [r for r, b in enumerate(order) if not self._finished(rows[b], max_new_tokens)]
            if not live:
                break
            if should_compact(len(live), runner):
                runner = runner.compact(live)
                order = [order[r] for r in live]
                live = list(range(len(live)))
                stats.compactions += 1
            feeds = [[] for _ in order]
            for r in live:
                feeds[r] = rows[order[r]].seq[runner.lengths[r] :]
            if sampling is None and self._on_device(runner):
                budgets = [max_new_tokens - rows[order[r]].n_new if f else 0 for r, f in enumerate(feeds)]
                # stop where the host loop would compact: once the running rows fit a batch half the size
                drafted = self._steps(runner, feeds, budgets, rows_to_stay(runner))
                stats.large_passes += max(d[0] for d in drafted if d is not None)
            else:
                verdicts = runner.step(feeds) if sampling is None else runner.sample_step(feeds, sampling)
                drafted = [v and (1, [v[1]]) for v in verdicts]
                stats.large_passes += 1
            for r, d in enumerate(drafted):
                if d is not None:
                    rows[order[r]].seq.extend(d[1])
                    stats.large_calls += len(d[1])
                    stats.large_tokens += len(d[1])
        return [row.new_tokens for row in rows]


class HFGenerate(RowDecoder):
    """`model.generate` greedy, one row at a time."""

    path = "transformers generate"

    def __init__(self, model: PreTrainedModel):
        super().__init__(model)
        self.model = model.eval()

    def _generate_kwargs(self) -> dict:
        """Extra `generate` arguments (assisted generation adds its assistant)."""
        return {}

    def _generation_settings(self) -> dict:
        """Extra generation-config fields (transformers warns when they come as `generate` arguments beside a config)."""
        return {}

    def _decode_row(self, prompt: list[int], max_new_tokens: int, stats: DecodeStats) -> list[int]:
        ids = torch.tensor([prompt], device=self.device)
        settings = {"max_new_tokens": max_new_tokens, **self._generation_settings()}
        if self._sampling is not None:
            s = self._sampling
            if s.generator is not None:
                raise ValueError("transformers generate draws from the global RNG: seed it (torch.manual_seed) "
                                 "instead of passing a generator")
            settings.update(do_sample=True, temperature=s.temperature, top_k=s.top_k or 0, top_p=s.top_p or 1.0)
        out = self.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            generation_config=greedy_generation_config(self.model, **settings),
            **self._generate_kwargs(),
        )
        seq = out[0].tolist()
        new = seq[1:] if self.is_encoder_decoder else seq[len(prompt) :]
        # generate pads nothing for a single row, but trims defensively at the first EOS
        for i, tok in enumerate(new):
            if tok in self.eos_token_ids:
                new = new[: i + 1]
                break
        stats.large_tokens += len(new)
        return new


class AssistedGeneration(HFGenerate):
    """transformers assisted generation with `small` as the assistant; exact-match verification."""

    def __init__(self, large: PreTrainedModel, small: PreTrainedModel, num_assistant_tokens: int = 20,
                 assistant_confidence_threshold: float = 0.4):
        check_pair(large, small)
        super().__init__(large)
        self.small = small.eval()
        self.num_assistant_tokens = num_assistant_tokens
        self.assistant_confidence_threshold = assistant_confidence_threshold

    def _generate_kwargs(self) -> dict:
        return {"assistant_model": self.small}

    def _generation_settings(self) -> dict:
        return {"num_assistant_tokens": self.num_assistant_tokens,
                "assistant_confidence_threshold": self.assistant_confidence_threshold}


def hf_early_exit_unsupported(model: PreTrainedModel) -> str | None:
    """Why transformers' `assistant_early_exit` would not exit early on this model, or None.

    transformers drafts by lowering `config.num_hidden_layers` on the base model for the draft; only models
    whose forward loops over `layers[: config.num_hidden_layers]` (the Llama family) then run fewer layers.
    Elsewhere (BART, T5: the decoder runs every layer) the "draft" would be the whole model.
    """
    base = getattr(model, model.base_model_prefix, model)
    try:
        source = inspect.getsource(type(base).forward)
    except (OSError, TypeError):
        source = ""
    if "num_hidden_layers]" not in source:
        return (f"transformers' assistant_early_exit drafts by lowering config.num_hidden_layers, which "
                f"{type(base).__name__} does not read (its decoder runs every layer)")
    return None


class HFEarlyExit(HFGenerate):
    """transformers' early-exit self-speculation: `model.generate(..., assistant_early_exit=k)`."""

    def __init__(self, model: PreTrainedModel, exit_layer: int):
        why = hf_early_exit_unsupported(model)
        if why is not None:
            raise ValueError(why)
        super().__init__(model)
        self.exit_layer = exit_layer
        self.path = f"transformers generate, assistant_early_exit={exit_layer}"

    def _generate_kwargs(self) -> dict:
        return {"assistant_early_exit": self.exit_layer}
