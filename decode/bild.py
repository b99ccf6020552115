"""Big Little Decoder (Kim et al., NeurIPS 2023): a small model writes, a large model steps in and corrects.

    from decode import BiLD, BiLDConfig
    bild = BiLD.from_pretrained("t5-large", "t5-small", BiLDConfig(fallback_threshold=0.5, rollback_threshold=3.0))
    out = bild.generate(input_ids, attention_mask, max_new_tokens=128)
    out.sequences, out.stats

One step of the loop:
1. The small model predicts the next token. If its confidence max_v p_S(v) is at or under
   `fallback_threshold`, or `max_small_steps` of its tokens are already pending, it falls back: its
   token is discarded and the large model runs once, non-autoregressively, over every position since
   it last ran.
2. In that pass each pending small token y_i is checked in order. `rollback="ce"`: the first i with
   -log p_L(y_i | y<i) > `rollback_threshold` is cut; `rollback="exact"`: the first i where y_i differs
   from the large model's argmax is cut (the output is then the large model's greedy output). A cut
   drops y_i and everything after it and writes the large model's argmax at i; with no cut every
   pending token stays and the large model's prediction for the next position is appended.
3. Before the sequence ends (EOS or max_new_tokens) pending tokens are always checked once more, so
   the large model has the last word.

Every position is checked: the original code's shortcut, which skipped the check when the first
over-threshold token equalled the large model's argmax, is not reproduced. With do_sample=True the small model
samples its draft, and step 2 is the rejection rule of speculative sampling instead (decode/sampling.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import AutoTokenizer, PreTrainedModel

from decode.batch import BatchRunner, should_compact
from decode.draft_loop import MAX_DRAFT_STEPS, MAX_EOS_IDS
from decode.fast import MAX_GRAPH_TOKENS, FastRunner, make_runner, notice
from decode.generation import DecodeStats, Row, RowDecoder
from decode.loading import check_pair, load_model, warn_on_processors
from decode.thresholds import THRESHOLDS_FILE, load_tuned

ROLLBACK_MODES = ("ce", "exact")

@dataclass
class BiLDConfig:
    """The BiLD policies. Names follow the paper: alpha_FB is fallback_threshold, alpha_RB rollback_threshold."""

    fallback_threshold: float = 0.5
    """Fall back when the small model's top probability is at or under this (0: never, 1: always)."""
    rollback_threshold: float = 5.0
    """rollback="ce": cut at the first pending token with -log p_L(token) above this (nats; inf: never)."""
    rollback: str = "ce"
    """"ce" (the paper's lossy rollback) or "exact" (cut at the first disagreement: lossless)."""
    max_small_steps: int | None = 10
    """Fall back after this many consecutive small-model tokens (the official code's N = 10); None: no cap."""
    device_loop: bool | None = None
    """Greedy decoding on the fast path: the small model's draft loop keeps its state on the device (FastRunner.draft):
    each row's fallback, step cap and end are decided inside the pass, the host reads only the rows' budgets between
    steps and the tokens once per draft. None: in batches decoded together (measured faster there, BENCHMARKS.md),
    not at batch size 1 (measured slower: its host loop is already lean); True: always; False: never. No effect on
    any token or count."""
    fast_path: bool | None = None
    """None: the fast path (decode/fast.py: compact passes and static caches, in CUDA graphs on CUDA) where the
    architecture is covered, else the eager path; True: the fast path (an error where not covered); False: the
    eager path."""
    compile: bool | None = None
    """The fast path's passes through torch.compile (decode/compact.py): True: compiled; None: compiled on CUDA
    (uncompiled elsewhere, or with BILD_COMPILE=0 in the environment); False: uncompiled. Compiling costs up to about
    a minute per model and process; the GPU figures with and without it are in BENCHMARKS.md."""

    def __post_init__(self):
        if self.fallback_threshold is None or not 0.0 <= float(self.fallback_threshold) <= 1.0:
            raise ValueError(f"fallback_threshold must be in [0, 1], got {self.fallback_threshold}")
        if self.rollback not in ROLLBACK_MODES:
            raise ValueError(f"rollback must be one of {ROLLBACK_MODES}, got {self.rollback!r}")
        if self.rollback_threshold is None or math.isnan(float(self.rollback_threshold)) or float(self.rollback_threshold) < 0:
            raise ValueError(f"rollback_threshold must be >= 0 (nats), got {self.rollback_threshold}")
        if self.max_small_steps is not None and int(self.max_small_steps) < 1:
            raise ValueError(f"max_small_steps must be at least 1 or None, got {self.max_small_steps}")
        if self.fast_path not in (None, True, False):
            raise ValueError(f"fast_path must be None (auto), True or False, got {self.fast_path!r}")
        if self.compile not in (None, True, False):
            raise ValueError(f"compile must be None (auto), True or False, got {self.compile!r}")
        self.fallback_threshold = float(self.fallback_threshold)
        self.rollback_threshold = float(self.rollback_threshold)


@dataclass
class _Batch:
    """What `BiLD._decode_batch` keeps between its rounds: the two runners (replaced when they compact), each
    sequence's row and which runner row holds it (`order`), the sequences waiting for the large model (-> whether the
    check is their last), and the settings of this call."""

    large: BatchRunner
    small: BatchRunner
    rows: list[Row]
    order: list[int]
    waiting: dict[int, bool]
    stats: DecodeStats
    sampling: object
    max_new_tokens: int
    on_device: bool


class BiLD(RowDecoder):
    """BiLD decoding over a large and a small model that share a vocabulary: greedy, or with
    `generate(..., do_sample=True)` speculative sampling (decode/sampling.py; rollback="exact" only).

    A batch is decoded together on the fast path (`_decode_batch`), else row after row (batch size 1 per row,
    as in the paper); either way laid out as `large.generate` lays it out.
    """

    def __init__(self, large: PreTrainedModel, small: PreTrainedModel, config: BiLDConfig | None = None):
        check_pair(large, small)
        super().__init__(large)
        warn_on_processors(large)
        self.large, self.small = large.eval(), small.eval()
        self.config = config if config is not None else BiLDConfig()
        self._large = make_runner(self.large, self.config.fast_path, self.config.compile)
        self._small = make_runner(self.small, self.config.fast_path, self.config.compile)
        self._plan()
        self.path = self._large.path if self._large.path == self._small.path else \
            f"large {self._large.path}, small {self._small.path}"

    def _plan(self, small=None, large=None) -> None:
        """The pass shapes the loop uses (on this decoder's runners, or the given ones): small steps of 1 token (2
        after a step-cap fallback), and large checks of k pending tokens + 1."""
        small = small or self._small
        small.plan([("step", 1), ("step", 2)])
        if self._drafts_on_device(small):
            small.plan([("draft", 1), ("draft", 2), ("draft_next", 1)])
        (large or self._large).plan([("check", k + 1, self.config.rollback) for k in range(self._most_pending() + 1)])

    def _drafts_on_device(self, small) -> bool:
        """Whether the small model drafts greedily on the device (BiLDConfig.device_loop) with this runner."""
        return device_loop_on(self.config.device_loop, small, self.eos_token_ids)

    def _most_pending(self) -> int:
        """The most pending tokens a row holds before its check: the step cap (15 without one: more are checked
        without a graph)."""
        cap = self.config.max_small_steps
        return MAX_GRAPH_TOKENS - 1 if cap is None else cap

    def _budget(self, row: Row, max_new_tokens: int) -> int:
        """Tokens a row may still draft before the loop would stop it: max_new_tokens, and the step cap."""
        budget = max_new_tokens - row.n_new
        cap = self.config.max_small_steps
        return min(budget, cap - row.n_pending) if cap is not None else budget

    def _needs_large(self, row: Row, max_new_tokens: int, cap: int | None) -> str | None:
        """What the policy asks of a row before its next small step: "done" (it ended and nothing is pending),
        "final" (it ended: its pending tokens get their last check), "cap" (the step cap: a check), or None (it
        drafts on)."""
        if self._finished(row, max_new_tokens):
            return "done" if row.n_pending == 0 else "final"
        if cap is not None and row.n_pending >= cap:
            return "cap"
        return None

    def _plan_sampling(self, small, large) -> int | None:
        """Plans the sampling passes on the two runners; returns the step cap they allow (the drafts' buffers
        hold max_draft pending tokens)."""
        key = self._sampling.key
        limits = [x for x in (self.config.max_small_steps, small.max_draft, large.max_draft) if x is not None]
        cap = min(limits) if limits else None
        small.plan([("sample", 1, key), ("sample", 2, key)])
        large.plan([("sample_check", k + 1, key) for k in range((cap if cap is not None else 15) + 1)])
        return cap

    @classmethod
    def from_pretrained(
        cls,
        large: str,
        small: str,
        config: BiLDConfig | None = None,
        *,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        check_tokenizers: bool = True,
        **load_kwargs,
    ) -> "BiLD":
        """Loads both models from Hub names or local folders. The large model's tokenizer is kept as `.tokenizer`.
        With no `config`, the thresholds tuned for this pair (decode.tune, beside the small model) or the defaults."""
        large_model = load_model(large, dtype=dtype, device=device, **load_kwargs)
        small_model = load_model(small, dtype=dtype, device=device, **load_kwargs)
        if config is None:
            config = tuned_config(small)
        bild = cls(large_model, small_model, config)
        bild.tokenizer = None
        try:
            bild.tokenizer = AutoTokenizer.from_pretrained(large)
            if check_tokenizers:
                small_tok = AutoTokenizer.from_pretrained(small)
                if bild.tokenizer.get_vocab() != small_tok.get_vocab():
                    raise ValueError(f"the tokenizers of {large} and {small} map tokens to different ids")
        except (OSError, TypeError, KeyError):
            pass  # a folder with weights only: the caller tokenizes
        return bild

    def _check_sampling(self) -> None:
        if self.config.rollback != "exact":
            raise ValueError("sampling verifies the small model's draft by the rejection rule, which is exact in "
                             "distribution; the CE rollback is greedy-only: use BiLDConfig(rollback='exact')")

    def _decode_row(self, prompt: list[int], max_new_tokens: int, stats: DecodeStats) -> list[int]:
        cfg, sampling = self.config, self._sampling
        large, small = self._large, self._small
        cap = cfg.max_small_steps
        if sampling is not None:  # the draw and the rejection rule run inside the passes (decode/sampling.py)
            cap = self._plan_sampling(small, large)
        draft_on_device = sampling is None and self._drafts_on_device(small)
        self._start_row(prompt, max_new_tokens)
        row = self._row(prompt)
        while True:
            need = self._needs_large(row, max_new_tokens, cap)
            if need == "done":
                break
            if need is not None:
                stats.step_cap_fallbacks += need == "cap"
                self._large_step(row, stats, final=need == "final")
                continue
            feed = row.seq[small.length :]
            if draft_on_device:  # the loop's state on the device (FastRunner.draft): the host loop's decisions
                steps, kept = small.draft(feed, MAX_DRAFT_STEPS, self._budget(row, max_new_tokens),
                                          cfg.fallback_threshold, self.eos_token_ids)
            else:  # the loop's control flow lives on the host: one step
                if sampling is None:
                    confidence, token = small.step(feed)
                else:  # drawn from q whatever the verdict: a fallback depends on q alone, so discarding it biases nothing
                    confidence, token = small.sample_step(feed, sampling)
                steps, kept = _one_step(confidence, token, cfg.fallback_threshold)
            stats.small_steps += steps
            row.seq.extend(kept)
            if steps > len(kept):  # the last step fell back
                stats.fallbacks += 1
                self._large_step(row, stats, final=False)
        return row.new_tokens

    def _start_row(self, prompt: list[int], max_new_tokens: int) -> None:
        self._large.start(prompt, max_new_tokens)
        self._small.start(prompt, max_new_tokens)

    def _large_step(self, row: Row, stats: DecodeStats, final: bool) -> None:
        """One large-model pass over every position it has not seen; checks and settles the row.

        Greedy: the rollback rule (first_cut), and the large model's argmax is written. Sampling: the rejection
        rule (decode.sampling.verify) over the small model's drafts, and a drawn token is written. With final=True
        and nothing cut, no token is appended.
        """
        large, small = self._large, self._small
        n_pending, feed = row.n_pending, row.seq[large.length :]
        if self._sampling is None:
            cut, argmax = large.check(feed, n_pending, self.config.rollback, self.config.rollback_threshold)
            token = _token_after(cut, argmax, n_pending, final)
        else:
            cut, token = large.sample_check(feed, n_pending, small.drafts(n_pending), self._sampling)
            token = _drawn_token_after(cut, token, n_pending, final)
            small.reset_drafts()
        if _settle(row, cut, token, stats):
            # Both caches keep only positions whose token survived; the last token is fed on the next pass.
            large.rewind(len(row.seq) - 1)
            small.rewind(len(row.seq) - 1)

    # -- batches --------------------------------------------------------------------------------------

    def _batch_blocker(self) -> str | None:
        if not (type(self._large) is FastRunner and type(self._small) is FastRunner):
            return f"batches are decoded together on the fast path only (this pair runs on {self.path})"
        return None

    def _decode_batch(self, prompts: list[list[int]], max_new_tokens: int, stats: DecodeStats) -> list[list[int]]:
        """Every row follows `_decode_row`'s loop with its own pending tokens, positions and decisions. A row that
        needs the large model (a fallback, the step cap, its end) waits; the others keep drafting, one small-model
        pass for all of them per token, until every unfinished row waits; then one large-model pass checks them
        all (a large pass sooner, once a fraction of the rows waits, measured no faster: BENCHMARKS.md). Rows that
        need nothing sit out a pass; once the unfinished rows fit half the runners' batch, both runners compact
        (decode/batch.py). Sampling: the small model draws, the large model's pass applies the rejection rule per
        row."""
        cfg, sampling = self.config, self._sampling
        large = BatchRunner.for_model(self.large, len(prompts), self.config.compile)
        small = BatchRunner.for_model(self.small, len(prompts), self.config.compile)
        cap = cfg.max_small_steps
        if sampling is None:
            self._plan(small, large)
        else:
            cap = self._plan_sampling(small, large)
        b = _Batch(large, small, rows=[self._row(p) for p in prompts], order=list(range(len(prompts))), waiting={},
                   stats=stats, sampling=sampling, max_new_tokens=max_new_tokens,
                   on_device=sampling is None and self._drafts_on_device(small))
        large.start(prompts, max_new_tokens)
        small.start(prompts, max_new_tokens)
        done = [False] * len(prompts)
        while True:
            drafting = set()
            for i in b.order:
                if done[i] or i in b.waiting:
                    continue
                need = self._needs_large(b.rows[i], max_new_tokens, cap)
                if need == "done":
                    done[i] = True
                elif need is not None:
                    stats.step_cap_fallbacks += need == "cap"
                    b.waiting[i] = need == "final"
                else:
                    drafting.add(i)
            live = [r for r, i in enumerate(b.order) if not done[i]]
            if not live:
                break
            if should_compact(len(live), b.large):
                b.large, b.small = b.large.compact(live), b.small.compact(live)
                b.order = [b.order[r] for r in live]
                stats.compactions += 1
            if drafting:
                self._draft_rows(b, drafting)
            else:
                self._check_waiting(b)
        return [row.new_tokens for row in b.rows]

    def _check_waiting(self, b: _Batch) -> None:
        """One large-model pass over every waiting row, each row then settled by its verdict (a rollback rewinds both
        runners' rows)."""
        cfg, rows, order, waiting, stats = self.config, b.rows, b.order, b.waiting, b.stats
        feeds = [rows[i].seq[b.large.lengths[r]:] if i in waiting else [] for r, i in enumerate(order)]
        if b.sampling is None:
            results = b.large.check(feeds, cfg.rollback, cfg.rollback_threshold)
        else:
            results = b.large.sample_check(feeds, b.small.drafts(), b.sampling)
        stats.large_passes += 1
        for r, i in enumerate(order):
            if i not in waiting:
                continue
            row, final = rows[i], waiting[i]
            if b.sampling is None:
                cut, argmax = results[r]
                token = _token_after(cut, argmax, row.n_pending, final)
            else:
                cut, token = results[r]
                token = _drawn_token_after(cut, token, row.n_pending, final)
            if _settle(row, cut, token, stats):
                b.large.rewind(r, len(row.seq) - 1)
                b.small.rewind(r, len(row.seq) - 1)
        waiting.clear()

    def _draft_rows(self, b: _Batch, drafting: set[int]) -> None:
        """One small-model pass (the host loop) or one draft (the device loop: steps while any row drafts) for the
        drafting rows; a fallback makes a row wait."""
        cfg, rows, order, waiting, stats = self.config, b.rows, b.order, b.waiting, b.stats
        feeds = [rows[i].seq[b.small.lengths[r]:] if i in drafting else [] for r, i in enumerate(order)]
        if b.on_device:  # the host loop's decisions, on the device
            budgets = [self._budget(rows[i], b.max_new_tokens) if i in drafting else 0 for i in order]
            drafted = b.small.draft(feeds, MAX_DRAFT_STEPS, budgets, cfg.fallback_threshold, self.eos_token_ids)
            stats.small_passes += max(d[0] for d in drafted if d is not None)
        else:
            verdicts = b.small.step(feeds) if b.sampling is None else b.small.sample_step(feeds, b.sampling)
            drafted = [v and _one_step(*v, cfg.fallback_threshold) for v in verdicts]
            stats.small_passes += 1
        for r, i in enumerate(order):
            if drafted[r] is not None:
                row, (steps, kept) = rows[i], drafted[r]
                stats.small_steps += steps
                row.seq.extend(kept)
                if steps > len(kept):  # the last step fell back
                    stats.fallbacks += 1
                    waiting[i] = False


def device_loop_on(setting: bool | None, runner, eos_token_ids) -> bool:
    """Whether greedy steps on `runner` keep the loop's state on the device (BiLDConfig.device_loop: None means on
    the runners of batches decoded together, decode/batch.py, only)."""
    wanted = setting if setting is not None else getattr(runner, "prefers_device_loop", False)
    return bool(wanted) and hasattr(runner, "draft") and len(eos_token_ids) <= MAX_EOS_IDS


def _one_step(confidence: float, token: int, fallback_threshold: float) -> tuple[int, list[int]]:
    """A host-loop step as a draft: (1 step, [token]), or (1, []) for a fallback (confidence at or under the threshold)."""
    return 1, ([token] if confidence > fallback_threshold else [])


def _token_after(cut: int, argmax: list[int], n_pending: int, none_after: bool) -> int | None:
    """The large model's token after a greedy check: its argmax at the cut, or after the pending tokens (none there
    with none_after: the end of the sequence)."""
    return argmax[cut] if cut < n_pending else (None if none_after else argmax[n_pending])


def _drawn_token_after(cut: int, token: int, n_pending: int, final: bool) -> int | None:
    """The token after a sampling check: the one drawn at the cut, or after the pending tokens (none at the end of
    the sequence when nothing was rejected)."""
    return None if final and cut == n_pending else token


def _settle(row: Row, cut: int, token: int | None, stats: DecodeStats) -> bool:
    """Applies a large-model check to a row: drops its pending tokens from `cut` on, appends `token` (if any), counts,
    and starts its pending tokens after them. Returns whether a token was appended."""
    seq, pending_start, n_pending = row.seq, row.pending_start, row.n_pending
    stats.large_calls += 1
    if cut < n_pending:
        stats.rollbacks += 1
        stats.rolled_back_tokens += n_pending - cut
    stats.small_tokens += cut
    del seq[pending_start + cut :]
    row.pending_start = len(seq)
    if token is None:
        return False
    seq.append(token)
    stats.large_tokens += 1
    row.pending_start = len(seq)
    return True


def tuned_config(small: str) -> BiLDConfig:
    """The thresholds `python -m decode.tune` wrote beside a local small model, else the defaults (said once)."""
    tuned = load_tuned(small)
    if tuned is None:
        notice(f"{small} has no {THRESHOLDS_FILE} (python -m decode.tune): BiLD uses the default thresholds")
        return BiLDConfig()
    notice(f"BiLD thresholds from {small}/{THRESHOLDS_FILE}: fallback {tuned['fallback_threshold']:g}, rollback "
           f"{tuned['rollback_threshold']:g}, max small steps {tuned.get('max_small_steps', 10)} (tuned on "
           f"{tuned['split']} at batch size {tuned.get('batch_size', 1)}, budget {tuned['budget']:g} {tuned['metric']})")
    return BiLDConfig(fallback_threshold=tuned["fallback_threshold"], rollback_threshold=tuned["rollback_threshold"],
                      max_small_steps=tuned.get("max_small_steps", 10))
