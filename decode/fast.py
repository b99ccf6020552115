"""The GPU fast path: a runner over a model's compact passes (decode/compact.py), static KV caches indexed by
position, and one CUDA graph per pass shape.

    runner = make_runner(model)                          # FastRunner on CUDA where supported, else ModelRunner
    runner.start(prompt, max_new_tokens)                 # encoder (or prompt prefill) once, as a graph
    confidence, token = runner.step(tokens)              # one graph replay, one host read of (confidence, token)
    cut, argmax = runner.check(tokens, k, "ce", 3.0)     # the large model's pass over k pending tokens + 1
    runner.rewind(length)                                # a rollback moves the position; nothing is copied
    steps, tokens = runner.draft(tokens, k, budget, 0.4, eos)  # up to k greedy small steps, state on the device

Why: at batch size 1 a decoding step is bound by kernel launches and by reading the weights once, not by
arithmetic. Here, as in gpt-fast:
- The passes are the project's own (decode/compact.py: fused projections, one pure function per layer, compiled
  by torch.compile with `compile=True`): no transformers cache objects, no mask helpers, nothing that syncs or
  allocates by value.
- The start position lives in a device scalar that each pass advances itself; the small step writes its
  argmax into the input buffer, so the next step needs nothing from the host.
- Each (verb, number of tokens) is captured once as a CUDA graph on the first `start` and replayed;
  every tensor a graph reads is a static buffer of the runner. A longer input than the buffers hold
  grows them and captures again (never a wrong answer; the compiled passes take any capacity). A decoder-only
  prompt is padded to a length bucket (PREFILL_BUCKETS) and prefilled by that bucket's graph; passes of more
  tokens than a graph takes run the same code without one.
- The policy's arithmetic (confidence, argmax, the rollback cut) runs inside the graph with the same
  functions the eager runner uses (decode.cache.step_verdict, a compiled pass where the others are, and first_cut),
  and one small tensor comes back.
  So does sampling's (decode.sampling: the warpers, the draw, the rejection rule), from uniforms the host
  writes into a static buffer from the caller's generator before each replay.
- The draft loop's state can live on the device (`draft`, decode/draft_loop.py): every small step after the
  first is one replay of the same graph, which decides each row's fallback, end and next input; the tokens come
  back once per draft. The decisions are the host loop's own.

Covered: BART and Marian, T5/mT5 (encoder-decoder); Llama (any static rope type, Llama 3's included), Qwen2,
Mistral, Qwen3, Phi-3, Gemma 2 and Gemma 3's text model (decoder-only, sliding windows included). Anything else,
or T5 in float16, runs on the eager path (`unsupported_reason` says why).
"""

from __future__ import annotations

import os
import weakref

import torch
from transformers import PreTrainedModel

from decode.cache import ModelRunner, first_cut, is_encoder_decoder
from decode.compact import notice  # noqa: F401 - notice: re-exported
from decode.families import unsupported_reason
from decode.draft_loop import DeviceDraftLoop
from decode.graphs import PassGraphs
from decode.passes import model_passes
from decode.sampling import noise_size, sample_step, verify

MAX_GRAPH_TOKENS = 16  # passes of up to this many tokens are graphed: step cap 10 + 1, with room
_ALIGN = 64  # capacities are multiples of this (aligned attention masks, few reallocations)
_SRC_BUCKET = 16  # encoder inputs are padded to a multiple of this: one encoder graph per bucket
PREFILL_BUCKETS = (16, 32, 64, 128, 256, 512, 1024)  # decoder-only prompts padded to one of these run as a graph
# On CUDA a check of fewer tokens runs as a pass of this many, the rest junk written past the sequence (overwritten
# before any position sees it): on an H200 checks of 2 and 4 tokens measured slower than checks of 6 and 11, at
# Gemma-3-1B and Qwen3-8B shapes by 1.3-1.5 ms (BENCHMARKS.md). 1 turns the padding off.
MIN_CHECK_TOKENS = 6


def _src_bucket(n: int) -> int:
    return -(-n // _SRC_BUCKET) * _SRC_BUCKET


def _prefill_bucket(n: int) -> int | None:
    return next((b for b in PREFILL_BUCKETS if b >= n), None)


def make_runner(model: PreTrainedModel, fast_path: bool | None = None, compile: bool | None = None):
    """The runner a decoder uses for `model`. fast_path None: the fast path where supported (CUDA graphs on CUDA;
    off CUDA the compact passes alone, which measured faster than transformers' forward on a 2-core CPU: 2.4 against
    4.4 ms a step of the CPU profile's small model, BENCHMARKS.md); True: the fast path, an error where
    unsupported; False: the eager path.
    compile (the fast path's passes through torch.compile) None: on CUDA (off with BILD_COMPILE=0); True: on; False: off."""
    reason = unsupported_reason(model)
    if fast_path is None:
        use = reason is None
    elif fast_path:
        if reason is not None:
            raise ValueError(f"fast_path=True but {type(model).__name__} cannot use it: {reason}")
        use = True
    else:
        use = False
    runner = FastRunner.for_model(model, compile) if use else ModelRunner(model)
    why = "" if use or fast_path is False else f" ({reason})"
    notice(f"{type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M) decodes on the "
           f"{runner.path} path{why}")
    return runner


# compile=None (the default everywhere): compiled on CUDA, unless BILD_COMPILE=0 in the environment. Measured on the
# demo pair end to end (H100, BENCHMARKS.md) every system ran faster compiled (the large model alone 1.5x), at 53-62 s
# of compiling per model in a fresh process and 12-32 s on a warm on-disk cache; off CUDA compiling has not paid.
def compile_wanted(compile: bool | None, device: torch.device) -> bool:
    """Whether the fast path compiles its passes: `compile` as set, None meaning on CUDA unless BILD_COMPILE=0."""
    if compile is not None:
        return bool(compile)
    return device.type == "cuda" and os.environ.get("BILD_COMPILE", "1") != "0"


# --------------------------------------------------------------------------------------------------
# The runner: static buffers, capture, replay


_RUNNERS: "weakref.WeakKeyDictionary[PreTrainedModel, FastRunner]" = weakref.WeakKeyDictionary()


class FastRunner(DeviceDraftLoop):
    """One model on the fast path: `start`, `step`, `check`, `rewind`, as decode.cache.ModelRunner.

    One runner per model (`for_model`), shared by every decoder over it: its buffers and graphs are
    made once. Graphs are used on CUDA; elsewhere the same passes run without them. One sequence at a time
    (decode/batch.py's BatchRunner decodes B together).
    """

    batch = 1  # rows of the static buffers
    prefers_device_loop = False  # BiLDConfig.device_loop=None: one row's host loop is lean, the device loop measured slower

    def __init__(self, model: PreTrainedModel, compile: bool | None = None):
        device = next(model.parameters()).device
        self.compiled = compile_wanted(compile, device)
        self.passes = model_passes(model, self.compiled)  # shared by every runner over the model
        self.decoder = self.passes.decoder()  # this runner's buffers over them
        self._forward = self.decoder.forward
        self.device, self.dtype = self.decoder.device, self.decoder.dtype
        self.is_encoder_decoder = is_encoder_decoder(model)
        self.use_graphs = self.device.type == "cuda"
        self.path = ("fast (static cache, " + ("CUDA graphs" if self.use_graphs else "no graphs")
                     + (", compiled)" if self.compiled else ")"))
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
        self._prefill_ids = torch.zeros(PREFILL_BUCKETS[-1], dtype=torch.long, device=self.device)
        self._prefill_host = torch.zeros(PREFILL_BUCKETS[-1], dtype=torch.long, pin_memory=self.use_graphs)
        self._arange_prefill = torch.arange(PREFILL_BUCKETS[-1], device=self.device)
        # speculative sampling: uniforms written before each pass, the small model's draft distributions (row
        # _slot next), and the large model's copy of the drafts it checks
        vocab = model.get_output_embeddings().weight.shape[0]
        self._noise = torch.zeros(noise_size(self.max_draft, vocab), dtype=torch.float32, device=self.device)
        self._drafts = torch.zeros(MAX_GRAPH_TOKENS, vocab, dtype=torch.float32, device=self.device)
        self._slot = torch.zeros((), dtype=torch.long, device=self.device)
        self._q_in = torch.zeros(MAX_GRAPH_TOKENS, vocab, dtype=torch.float32, device=self.device)
        self._draft_buffers(self.batch)
        # what the device buffers hold, as far as the host knows (None: unknown)
        self._pos_on_device: int | None = None
        self._ids_on_device: tuple | None = None
        self.graphs = PassGraphs(self.device, self.use_graphs)
        self._wanted: set[tuple] = set()
        self._src_ids = self._src_len = self._src_host = None  # encoder inputs, sized with the buffers

    @property
    def captures(self) -> int:
        return self.graphs.captures

    @classmethod
    def for_model(cls, model: PreTrainedModel, compile: bool | None = None) -> "FastRunner":
        """The model's runner, made on first use (or anew when the model moved, its weights were replaced or
        `compile` differs; None: decode.fast.compile_wanted's default)."""
        runner = _RUNNERS.get(model)
        param = next(model.parameters())
        want = compile_wanted(compile, param.device)
        if (runner is None or (runner.device, runner.dtype) != (param.device, param.dtype) or runner.compiled != want
                or runner.passes.stale()):
            runner = _RUNNERS[model] = cls(model, want)
        return runner

    def plan(self, keys) -> None:
        """Graph keys a decoder will use, ("step", n) or ("check", n, rollback), captured at the next start."""
        self._wanted.update(k for k in keys if k[1] <= MAX_GRAPH_TOKENS)

    # -- the three verbs ----------------------------------------------------------------------------

    @torch.inference_mode()
    def start(self, prompt: list[int], max_new_tokens: int) -> None:
        """Begins a sequence. prompt: the encoder input, or the decoder-only prompt."""
        prefix = 1 if self.is_encoder_decoder else len(prompt)
        bucket = None
        if not self.is_encoder_decoder and len(prompt) > 1 and self.use_graphs:
            bucket = _prefill_bucket(len(prompt) - 1)
            if bucket is not None:
                self._wanted.add(("prefill", bucket))
        self._ensure_capacity(max(prefix + max_new_tokens + 1 + self._check_padding(1), bucket or 0),
                              len(prompt) if self.is_encoder_decoder else 0)
        if self.compiled and not self.passes.compile_seconds:
            notice(f"compiling the passes of {self.passes.name} (torch.compile, once per process; later processes "
                   "start from the on-disk cache)")
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
            self._prefill(prompt[:-1], bucket)
        self._say_compile_time()

    def _prefill(self, tokens: list[int], bucket: int | None) -> None:
        """Feeds a prompt's tokens from position 0: padded to `bucket` and replayed as that bucket's graph (the padding
        lands past the prompt, where the next pass writes before any query reads), else without a graph."""
        if ("prefill", bucket) not in self.graphs:
            self._eager_catch_up(tokens)
            return
        n = len(tokens)
        self._prefill_host[:n] = torch.tensor(tokens)
        self._prefill_host[n:bucket] = 0
        self._prefill_ids[:bucket].copy_(self._prefill_host[:bucket], non_blocking=True)
        self._pos0.fill_(self.length)
        self._run(("prefill", bucket))
        self.length += n
        self._forget_device_state()

    def _say_compile_time(self) -> None:
        """Says how long the passes compiled, once, and again for each new shape or variant that compiled later (for
        whichever runner over the model ran it first)."""
        p = self.passes
        spent = p.compile_seconds - p.compile_said
        if spent > 0.5:
            more = p.compile_said > 0
            notice(f"compiled {'more of ' if more else ''}the passes of {p.name}{' (a new shape)' if more else ''} in "
                   f"{spent:.1f} s")
            p.compile_said = p.compile_seconds

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
        self._left.fill_(budget)
        steps = self._draft_loop(n, k, [budget])[0]
        out = self._draft_out[0, : 1 + k].tolist()  # note: the draft's tokens come back once
        self.length += n + steps - 1
        self._forget_device_state()
        return steps, out[1 : 1 + out[0]]

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

    def _check_padding(self, n: int) -> int:
        """The junk tokens a check of n tokens runs with (MIN_CHECK_TOKENS; none off CUDA, where time is FLOPs)."""
        return max(MIN_CHECK_TOKENS - n, 0) if self.device.type == "cuda" else 0

    def _pass(self, key: tuple):
        """The function a graph captures: reads _ids, _pos0 (and _threshold), writes the outputs."""
        n = key[1]
        m = n + self._check_padding(n) if key[0] in ("check", "sample_check") else n  # a check's pass width

        def step():
            pos = self._pos0 + self._arange[:n]
            confidence, token = self.decoder.verdict(self._forward(self._ids[None, :n], pos[None], last_only=True))
            self._step_out[0] = confidence[0]
            self._step_out[1] = token[0]
            self._ids[0] = token[0]  # the next step's input stays on the device
            self._pos0 += n

        def encode():  # the encoder over the input padded to the bucket, then the cross-attention K/V
            self.decoder.encode(self._src_ids[:, :n], self._src_len)

        def prefill():  # key: ("prefill", bucket): a padded prompt through every layer; nothing read back
            pos = (self._pos0 + self._arange_prefill[:n])[None]
            self.decoder.feed(self._prefill_ids[None, :n], pos)

        def check():
            pos = self._pos0 + self._arange[:m]
            logits = self._forward(self._ids[None, :m], pos[None])[0, :n].float()  # [n, V]
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
            pos = self._pos0 + self._arange[:m]
            logits = self._forward(self._ids[None, :m], pos[None])[0, :n].float()  # [n, V]
            cut, token = verify(logits, self._q_in[: n - 1], self._ids[1:n], key[2], self._noise)
            self._check_out[0] = cut
            self._check_out[1] = token
            self._pos0 += n

        def draft():  # key: ("draft", n): the first step over the fed tokens; the budget is in _left
            pos = self._pos0 + self._arange[:n]
            self._draft_first(self._forward(self._ids[None, :n], pos[None], last_only=True), self._pos0 + n)

        if key[0] == "draft":
            return draft
        if key[0] == "draft_next":
            return self._draft_step
        return {"step": step, "check": check, "encode": encode, "prefill": prefill, "sample": sample,
                "sample_check": sample_check}[key[0]]

    def _run(self, key: tuple) -> None:
        self.graphs.run(key, self._pass)

    def _capture(self, key: tuple) -> None:
        """Captures one pass. Its warm-up runs write junk into the caches and the source mask, so this runs
        only at `start`, before the sequence's real data."""
        if self.is_encoder_decoder:
            # Junk, but finite junk: a fully masked attention row would give NaN, and NaN keys or values
            # poison even masked slots (0 * NaN). So every source position counts as real while capturing.
            self._src_len.fill_(self.src_capacity)
            self.decoder.see_whole_source()
        self.graphs.capture(key, self._pass(key), self._zero_positions)
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
            for key in sorted(wanted - self.graphs.keys(), key=str):
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
        self.graphs.clear()  # they read the old buffers
        self.decoder.allocate(self.capacity, self.src_capacity, self.batch)
        if self.is_encoder_decoder:
            self._src_ids = torch.zeros(self.batch, self.src_capacity, dtype=torch.long, device=self.device)
            self._src_len = torch.zeros(self.batch, dtype=torch.long, device=self.device)
            self._src_host = torch.zeros(self.batch, self.src_capacity, dtype=torch.long, pin_memory=self.use_graphs)

    def _eager_catch_up(self, tokens: list[int]) -> None:
        """Feeds `tokens` without a graph (any number of them) and reads nothing back."""
        ids = torch.tensor([tokens], device=self.device)
        self.decoder.feed(ids, self.length + torch.arange(len(tokens), device=self.device)[None])
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

