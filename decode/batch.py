"""Batched decoding on the fast path: B sequences of one model in every pass, each at its own position.

    runner = BatchRunner.for_model(model, rows=16)
    runner.start(prompts, max_new_tokens)              # the encoder once for the batch, or the prompt prefills
    verdicts = runner.step(feeds)                      # feeds[b]: the tokens row b has not fed yet; [] sits out
    results = runner.check(feeds, "exact", 0.0)        # per row: (first cut, argmax at each fed position)
    runner.rewind(b, length)                           # a rollback in row b moves row b's position

Each row feeds its own tokens at its own positions (`lengths[b]` on); rows that feed fewer tokens than the
longest are right-padded. A padding token is written past its row's end, and nothing there is ever read: a
position p is read only by queries at p or later, and the pass that feeds the row's real token at p writes it
before its own queries read it. So a row that sits out a pass is all padding, and rollbacks, ragged drafts and
ragged prompts need no copies, as with one row. Positions are clamped to the buffers, so padding near the end of
a long row lands in the last slot, which no real position reaches.

    drafted = runner.draft(feeds, k, budgets, 0.4, eos)  # per row (steps, kept tokens): the loop's state on the device
    runner = runner.compact(rows)                      # the live rows, moved into the runner of a smaller batch
    verdicts = runner.sample_step(feeds, sampling)     # speculative sampling: per row (q's top probability, a draw)
    results = large.sample_check(feeds, runner.drafts(), sampling)  # per row: (first rejection, the token there)

The inputs of a pass (every row's start position, token count and tokens) go to the device in one copy and
its outputs come back in one read. Passes of up to MAX_GRAPH_TOKENS tokens replay CUDA graphs, captured per
runner. The runner's batch is the number of rows rounded up to a power of two, so a short last batch reuses the
graphs of a full one; rows past the input sit out every pass. Finished rows sit out too, but a pass still
computes their padding rows, so the decoders compact: once the unfinished rows fit a batch half the size or
less, `compact` copies their state (caches, cross-attention keys and values, source masks, positions) into that
batch's runner, whose graphs are captured before the copy, and decoding goes on there. A finished row then
costs at most what padding to the next power of two costs.

Speculative sampling (decode/sampling.py) runs per row in the same passes: one block of uniforms per row, written
before each pass; the small model's draft distribution for the token at position p goes to its row's slot p mod
16 of `drafts()`, where the large model's pass finds the pending tokens' (a row never has 16 pending), so
nothing needs resetting between checks and the drafts move with their rows when a batch compacts.
"""

from __future__ import annotations

import weakref

import torch
from transformers import PreTrainedModel

from decode.cache import first_cuts
from decode.fast import MAX_GRAPH_TOKENS, FastRunner, _src_bucket, compile_wanted
from decode.sampling import noise_size, sample_steps, verify_rows

_BATCH_RUNNERS: "weakref.WeakKeyDictionary[PreTrainedModel, dict[int, BatchRunner]]" = weakref.WeakKeyDictionary()


def batch_size_for(rows: int) -> int:
    """The runner batch that serves `rows` rows: the next power of two."""
    return 1 << (int(rows) - 1).bit_length()


def rows_to_stay(runner: "BatchRunner") -> int:
    """The fewest live rows that keep `runner`'s batch (fewer fit a batch half the size)."""
    return runner.batch // 2 + 1


def should_compact(live: int, runner: "BatchRunner") -> bool:
    """Whether `live` unfinished rows fit the runner of a smaller batch."""
    return batch_size_for(live) < runner.batch


class BatchRunner(FastRunner):
    """One model on the fast path with `batch` rows in every pass; the verbs of FastRunner, per row."""

    prefers_device_loop = True  # BiLDConfig.device_loop=None: per-step host work grows with the rows (BENCHMARKS.md)

    def __init__(self, model: PreTrainedModel, batch: int, compile: bool | None = None):
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        self.batch = batch
        super().__init__(model, compile)
        self.path = self.path.replace("fast (", f"fast batched, {batch} rows (")
        # every pass reads _in: per row [start position, token count, tokens..., then in the last column a draft's
        # budget]
        self._in = torch.zeros(batch, MAX_GRAPH_TOKENS + 3, dtype=torch.long, device=self.device)
        self._verdicts = torch.zeros(batch, 2, dtype=torch.float32, device=self.device)  # confidence, token
        self._checks = torch.zeros(batch, MAX_GRAPH_TOKENS + 1, dtype=torch.long, device=self.device)  # cut, argmax
        self.lengths = [0] * batch  # per row: the positions its caches hold
        self._model = weakref.ref(model)  # for `compact`, which looks up the model's smaller runners
        self._rows = torch.arange(batch, device=self.device)
        # speculative sampling's buffers, made when a sampling pass is first planned or run (batch x 16 x vocab)
        self._vocab = self._drafts.shape[-1]
        self._noise = self._drafts = self._q_in = None

    @classmethod
    def for_model(cls, model: PreTrainedModel, rows: int, compile: bool | None = None) -> "BatchRunner":
        """The model's runner for `rows` rows, made on first use (or anew when the model moved, its weights were
        replaced or `compile` differs; None: decode.fast.compile_wanted's default)."""
        batch = batch_size_for(rows)
        runners = _BATCH_RUNNERS.setdefault(model, {})
        runner = runners.get(batch)
        param = next(model.parameters())
        if (runner is None or (runner.device, runner.dtype) != (param.device, param.dtype)
                or runner.compiled != compile_wanted(compile, param.device) or runner.passes.stale()):
            runner = runners[batch] = cls(model, batch, compile)
        return runner

    # -- the verbs ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def start(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        """Begins len(prompts) sequences: the encoder over every input at once, or every prompt's prefill."""
        if not 1 <= len(prompts) <= self.batch:
            raise ValueError(f"this runner decodes 1 to {self.batch} rows, got {len(prompts)}")
        longest = max(len(p) for p in prompts)
        prefix = 1 if self.is_encoder_decoder else longest
        # room for the padding of the longest graphed pass past the longest row
        self._ensure_capacity(prefix + max_new_tokens + MAX_GRAPH_TOKENS + 1, longest if self.is_encoder_decoder else 0)
        self._capture_wanted()
        self.lengths = [0] * self.batch
        if self.is_encoder_decoder:
            bucket = _src_bucket(longest)
            src = torch.zeros(self.batch, bucket, dtype=torch.long)
            lens = torch.ones(self.batch, dtype=torch.long)  # rows past the input: one token, never an empty row
            for b, prompt in enumerate(prompts):
                src[b, : len(prompt)] = torch.tensor(prompt)
                lens[b] = len(prompt)
            self._src_ids[:, :bucket].copy_(src)
            self._src_len.copy_(lens)
            self._run(("encode", bucket))
        else:  # every prompt but its last token, which the first step or check feeds
            self.feed([p[:-1] for p in prompts])

    @torch.inference_mode()
    def feed(self, feeds: list[list[int]]) -> None:
        """Feeds each row its tokens and reads nothing back (the prompt prefill; never graphed)."""
        n = max(len(f) for f in feeds)
        if n:
            inp = self._inputs(feeds, n, static=False)
            ids, pos = self._ids_pos(inp, n)
            self.decoder.feed(ids, pos)
            self._advance(feeds)

    @torch.inference_mode()
    def step(self, feeds: list[list[int]]) -> list[tuple[float, int] | None]:
        """Feeds each row its tokens; per row the top probability and argmax of the next token (None for a row
        that fed nothing)."""
        n = max(len(f) for f in feeds)
        if n <= MAX_GRAPH_TOKENS:
            self._inputs(feeds, n, static=True)
            self._run(("step", n))
            out = self._verdicts.tolist()  # note: the one host-device sync per step
        else:
            confidence, token = self._step_core(self._inputs(feeds, n, static=False), n)
            out = torch.stack([confidence, token.float()], dim=1).tolist()  # note: sync point
        self._advance(feeds)
        return [(out[b][0], int(out[b][1])) if f else None for b, f in enumerate(feeds)]

    @torch.inference_mode()
    def check(self, feeds: list[list[int]], rollback: str, threshold: float) -> list[tuple[int, list[int]] | None]:
        """Feeds each row its last checked token and its pending ones; per row the first cut (its number of
        pending tokens when none) and the argmax at each fed position (None for a row that fed nothing)."""
        n = max(len(f) for f in feeds)
        if rollback == "ce" and self._threshold_value != float(threshold):
            self._threshold.fill_(threshold)
            self._threshold_value = float(threshold)
        if n <= MAX_GRAPH_TOKENS:
            self._inputs(feeds, n, static=True)
            self._run(("check", n, rollback))
            out = self._checks[:, : n + 1].tolist()  # note: the one host-device sync per large call
        else:
            cut, argmax = self._check_core(self._inputs(feeds, n, static=False), n, rollback, self._threshold)
            out = torch.cat([cut[:, None], argmax], dim=1).tolist()  # note: sync point
        self._advance(feeds)
        return [(out[b][0], out[b][1 : len(f) + 1]) if f else None for b, f in enumerate(feeds)]

    @torch.inference_mode()
    def sample_step(self, feeds: list[list[int]], sampling) -> list[tuple[float, int] | None]:
        """Feeds each row its tokens; per row a token drawn from its sampling distribution q and q's top
        probability (None for a row that fed nothing). q goes to the row's slot of `drafts()`."""
        if max(len(f) for f in feeds) > MAX_GRAPH_TOKENS:  # catch up without a graph, then draw on the last token
            self.feed([f[:-1] for f in feeds])
            feeds = [f[-1:] for f in feeds]
        n = max(len(f) for f in feeds)
        self._inputs(feeds, n, static=True)
        self._sampling_buffers()
        sampling.fill(self._noise)
        self._run(("sample", n, sampling.key))
        out = self._verdicts.tolist()  # note: the one host-device sync per step
        self._advance(feeds)
        return [(out[b][0], int(out[b][1])) if f else None for b, f in enumerate(feeds)]

    @torch.inference_mode()
    def draft(self, feeds: list[list[int]], k: int, budgets: list[int], threshold: float, eos: list[int],
              need: int = 1) -> list[tuple[int, list[int]] | None]:
        """Up to k greedy small steps for every row, the loop's state on the device (FastRunner.draft, per row): row
        b feeds its tokens, then each token it keeps, until a fallback, an EOS token or budgets[b] kept tokens (rows
        that feed nothing sit out; their budget must be 0). The loop stops once fewer than `need` rows still run. Per
        row (steps taken, kept tokens), None for a row that fed nothing."""
        if max(len(f) for f in feeds) > MAX_GRAPH_TOKENS:  # catch up without a graph, then draft from the last token
            self.feed([f[:-1] for f in feeds])
            feeds = [f[-1:] for f in feeds]
        n = max(len(f) for f in feeds)
        rows = range(self.batch)
        budgets = [budgets[b] if b < len(feeds) else 0 for b in rows]
        self._inputs(feeds, n, static=True, tail=[[budgets[b]] for b in rows])
        self._set_draft(threshold, eos)
        steps = self._draft_loop(n, k, budgets, need)
        out = self._draft_out[:, : 1 + k].tolist()  # note: the draft's tokens come back once
        results = []
        for b, f in enumerate(feeds):
            if f:
                self.lengths[b] += len(f) + steps[b] - 1
                results.append((steps[b], out[b][1 : 1 + out[b][0]]))
            else:
                results.append(None)
        return results

    def drafts(self) -> torch.Tensor:
        """[batch, 16, V]: row b's draft distribution for the token at position p is at [b, p % 16]."""
        return self._sampling_buffers()

    @torch.inference_mode()
    def sample_check(self, feeds: list[list[int]], drafts: torch.Tensor, sampling) -> list[tuple[int, int] | None]:
        """Feeds each row its last checked token and its pending ones, drawn from the distributions in `drafts`
        (the small model's runner's `drafts()`); per row the rejection rule's (first rejected position, or its
        number of pending tokens, and the token drawn for that position); None for a row that fed nothing."""
        n = max(len(f) for f in feeds)
        if n - 1 > self.max_draft:
            raise ValueError(f"sample_check takes at most {self.max_draft} pending tokens per row, got {n - 1}")
        self._inputs(feeds, n, static=True)
        self._sampling_buffers(check=True)
        self._q_in.copy_(drafts)
        sampling.fill(self._noise)
        self._run(("sample_check", n, sampling.key))
        out = self._checks[:, :2].tolist()  # note: the one host-device sync per large call
        self._advance(feeds)
        return [(out[b][0], out[b][1]) if f else None for b, f in enumerate(feeds)]

    def rewind(self, row: int, length: int) -> None:
        """Forgets row `row`'s positions from `length` on."""
        self.lengths[row] = min(self.lengths[row], length)

    @torch.inference_mode()
    def compact(self, rows: list[int]) -> "BatchRunner":
        """The model's runner for len(rows) rows with rows `rows` of this one moved into its first rows, in that
        order; self when that runner is this one. The target's graphs (this runner's shapes) are captured first,
        since a capture writes junk into the caches. This runner is left as it was."""
        target = BatchRunner.for_model(self._model(), len(rows), self.compiled)
        if target is self:
            return self
        target._wanted |= self._wanted
        target._ensure_capacity(self.capacity, self.src_capacity)
        target._capture_wanted()
        target.decoder.take_rows(self.decoder, rows)
        target.lengths = [self.lengths[r] for r in rows] + [0] * (target.batch - len(rows))
        if self._drafts is not None:  # the pending tokens' draft distributions go with their rows
            target._sampling_buffers()[: len(rows)] = self._drafts[torch.tensor(rows, device=self.device)]
        return target

    # -- the passes -----------------------------------------------------------------------------------

    def _inputs(self, feeds: list[list[int]], n: int, static: bool, tail: list[list[int]] | None = None) -> torch.Tensor:
        """[batch, n + 2]: per row its start position, its token count and its tokens, right-padded. tail[b] (a
        draft's or a check's per-row values) goes into row b's last columns, in the same copy."""
        rows = [[self.lengths[b], len(f), *f] + [0] * (n - len(f)) for b, f in enumerate(feeds)]
        rows += [[self.lengths[b], 0] + [0] * n for b in range(len(feeds), self.batch)]
        if tail is not None:
            pad = [0] * ((self._in.shape[1] if static else n + 2 + len(tail[0])) - n - 2 - len(tail[0]))
            rows = [r + pad + tail[b] for b, r in enumerate(rows)]
        inp = torch.tensor(rows, dtype=torch.long)
        if not static:
            return inp.to(self.device)
        self._in[:, : inp.shape[1]].copy_(inp)
        return self._in[:, : n + 2]

    def _ids_pos(self, inp: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        pos = (inp[:, :1] + torch.arange(n, device=inp.device)).clamp(max=self.capacity - 1)
        return inp[:, 2 : n + 2], pos

    def _step_core(self, inp: torch.Tensor, n: int):
        return self.decoder.verdict(self._next_logits(inp, n))  # [B], [B]

    def _next_logits(self, inp: torch.Tensor, n: int) -> torch.Tensor:
        """[B, 1, V], the model's dtype: each row's logits after its last fed token."""
        ids, pos = self._ids_pos(inp, n)
        dec = self.decoder
        h = dec.run_layers(dec.embed(ids, pos), pos, 0, dec.n_layers)  # [B, n, d]
        last = (inp[:, 1] - 1).clamp(min=0)  # each row's last real token
        h = h.gather(1, last[:, None, None].expand(-1, 1, h.shape[-1]))
        return dec.head(h)

    def _check_core(self, inp: torch.Tensor, n: int, rollback: str, threshold):
        ids, pos = self._ids_pos(inp, n)
        logits = self.decoder.forward(ids, pos).float()  # [B, n, V]
        argmax = logits.argmax(dim=-1)
        n_pending = (inp[:, 1] - 1).clamp(min=0)
        cut = first_cuts(logits[:, :-1], argmax[:, :-1], ids[:, 1:], n_pending, rollback, threshold)
        return cut, argmax

    def _pass(self, key: tuple):
        if key[0] == "encode":
            return super()._pass(key)
        n = key[1]
        inp = self._in[:, : n + 2]

        def step():
            confidence, token = self._step_core(inp, n)
            self._verdicts[:, 0] = confidence
            self._verdicts[:, 1] = token

        def check():
            cut, argmax = self._check_core(inp, n, key[2], self._threshold)
            self._checks[:, 0] = cut
            self._checks[:, 1 : n + 1] = argmax

        def sample():  # key: ("sample", n, sampling key)
            q, confidence, token = sample_steps(self._next_logits(inp, n)[:, 0].float(), key[2], self._noise)
            slot = (inp[:, 0] + inp[:, 1]) % MAX_GRAPH_TOKENS  # the position the token is drawn for
            fed = (inp[:, 1] > 0)[:, None]  # a row that sits out keeps its slot: it may hold a pending draft
            self._drafts[self._rows, slot] = torch.where(fed, q, self._drafts[self._rows, slot])
            self._verdicts[:, 0] = confidence
            self._verdicts[:, 1] = token

        def sample_check():  # key: ("sample_check", n, sampling key); the drafts are in _q_in
            ids, pos = self._ids_pos(inp, n)
            logits = self.decoder.forward(ids, pos).float()  # [B, n, V]
            slots = (pos[:, 1:] % MAX_GRAPH_TOKENS)[..., None].expand(-1, -1, logits.shape[-1])
            q = self._q_in.gather(1, slots)  # [B, n - 1, V]: the pending tokens' draft distributions
            n_pending = (inp[:, 1] - 1).clamp(min=0)
            cut, token = verify_rows(logits, q, ids[:, 1:], n_pending, key[2], self._noise)
            self._checks[:, 0] = cut
            self._checks[:, 1] = token

        def draft():  # key: ("draft", n): the first step over each row's fed tokens, with their budgets
            self._left.copy_(self._in[:, -1])
            self._draft_first(self._next_logits(inp, n), inp[:, 0] + inp[:, 1])

        if key[0].startswith("sample"):
            self._sampling_buffers(check=key[0] == "sample_check")
        if key[0] == "draft_next":
            return self._draft_step
        return {"step": step, "check": check, "sample": sample, "sample_check": sample_check, "draft": draft}[key[0]]

    def _sampling_buffers(self, check: bool = False) -> torch.Tensor:
        """Makes the sampling buffers on first use (before any graph reads them): the uniforms and the drafts, and
        for a runner that checks drafts (the large model's) their copy; returns the drafts."""
        shape = (self.batch, MAX_GRAPH_TOKENS, self._vocab)
        if self._drafts is None:
            self._drafts = torch.zeros(shape, dtype=torch.float32, device=self.device)
            self._noise = torch.zeros(self.batch, noise_size(self.max_draft, self._vocab), device=self.device)
        if check and self._q_in is None:
            self._q_in = torch.zeros(shape, dtype=torch.float32, device=self.device)
        return self._drafts

    def _advance(self, feeds: list[list[int]]) -> None:
        for b, f in enumerate(feeds):
            self.lengths[b] += len(f)

    def _zero_positions(self) -> None:
        self._in.zero_()
