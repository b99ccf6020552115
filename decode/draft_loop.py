"""The device draft loop of decode/fast.py's runners (`FastRunner.draft`, `BatchRunner.draft`): the small model's
steps with the loop's state on the device.

Each row's budget, next position and next input stay on the device, and every small step after the first is one
replay of the same graph, which decides each row's fallback (confidence at or under the threshold), its end (an EOS
token, or its budget: the step cap or max_new_tokens) and its next input in the pass. Between steps the host writes
nothing and reads only the rows' budgets, to stop the loop; the tokens come back once per draft. The decisions are
the host loop's own (tests/test_fast.py, tests/test_batch.py compare them).

`DeviceDraftLoop` is a part of FastRunner: its methods use the runner's forward (`_forward`), its graphs (`_run`)
and its buffers.
"""

from __future__ import annotations

import torch

from decode.compact import notice

MAX_DRAFT_STEPS = 16  # small steps one `draft` takes at most
MAX_EOS_IDS = 8  # EOS ids the device draft loop compares with (more: the host loop)


# -- a draft step's bookkeeping (the device draft loop), compiled into one kernel where the runner compiles -------

def draft_bookkeeping(conf, tok, fallback, eos, left, nxt, out, advance) -> None:
    """Applies a draft step's verdicts [B] (top probability, argmax) to the loop's state: a running row (budget
    left over 0) keeps its argmax when its top probability is over the threshold, and stops at a fallback, an
    EOS token or its budget (left reaches 0). out[:, 0]: tokens kept; out[:, 1:]: the kept tokens, in order (a
    row that keeps nothing writes its token just past them). advance (a bool tensor, so that the first step and the
    later ones share one compiled kernel): a running row's next position moves on."""
    kept = out[:, 0]
    run = left > 0
    nxt.add_(run & advance)
    keep = run & (conf > fallback)
    out[:, 1:].scatter_(1, kept[:, None], tok[:, None])
    kept.add_(keep)
    left.sub_(1).mul_(keep & (tok[:, None] != eos).all(dim=-1))


class _CompiledOrEager:
    """fn through torch.compile; its eager self where compiling fails (say, no Triton), with a notice."""

    def __init__(self, fn):
        self.fn, self.compiled = fn, torch.compile(fn, fullgraph=True, dynamic=True)

    def __call__(self, *args):
        if self.compiled is not None:
            try:
                # one compiled variant per batch shape (one row, or any other) and kind of buffers (inference tensors
                # or not, as the runner was made): a long process with many runners may pass dynamo's default of 8
                with torch._dynamo.config.patch(recompile_limit=64):
                    return self.compiled(*args)
            except Exception as err:  # noqa: BLE001 - any compile failure: the eager function decides the same
                notice(f"the draft step's bookkeeping runs unfused: torch.compile failed ({type(err).__name__}: {err})")
                self.compiled = None
        return self.fn(*args)


_FUSED: dict = {}


def _bookkeeping(fn, compiled: bool):
    """fn, compiled into one kernel (inside the graphs) when the runner's passes are compiled."""
    if not compiled:
        return fn
    if fn not in _FUSED:
        _FUSED[fn] = _CompiledOrEager(fn)
    return _FUSED[fn]


class DeviceDraftLoop:
    """The draft loop's buffers and steps, mixed into FastRunner (decode/fast.py)."""

    def _draft_buffers(self, rows: int) -> None:
        """The device draft loop (`draft`): per row its tokens still allowed (0: stopped), the buffer the host reads
        between steps; next position and next input; its output, per row [tokens kept, the kept tokens...]; the
        fallback threshold and the EOS ids (padded with -1), as the host last wrote them."""
        self._left = torch.zeros(rows, dtype=torch.long, device=self.device)
        self._nxt = torch.zeros(rows, dtype=torch.long, device=self.device)
        self._tok = torch.zeros(rows, dtype=torch.long, device=self.device)
        self._conf = torch.zeros(rows, dtype=torch.float32, device=self.device)
        # (one spare column: a row that keeps nothing writes its step's token just past its kept ones)
        self._draft_out = torch.zeros(rows, 1 + MAX_DRAFT_STEPS + 1, dtype=torch.long, device=self.device)
        self._fallback = torch.zeros((), dtype=torch.float32, device=self.device)
        self._eos = torch.full((MAX_EOS_IDS,), -1, dtype=torch.long, device=self.device)
        self._no = torch.zeros((), dtype=torch.bool, device=self.device)  # the bookkeeping's `advance`
        self._yes = torch.ones((), dtype=torch.bool, device=self.device)
        self._draft_settings: tuple | None = None

    def _draft_loop(self, n: int, k: int, left: list[int], need: int = 1) -> list[int]:
        """The first step (over n fed tokens), then one step at a time while at least `need` rows run and fewer than
        k steps were taken; each step the host reads the rows' budgets (0: stopped), nothing else. Returns each row's
        steps taken."""
        steps = [0] * len(left)
        self._run(("draft", n))
        for j in range(k):
            steps = [s + (was > 0) for s, was in zip(steps, left)]  # the rows that ran this step
            left = self._left.tolist()  # note: one small read per step, to stop the loop
            if j + 1 == k or sum(x > 0 for x in left) < need:
                break
            self._run(("draft_next", 1))
        return steps

    def _set_draft(self, threshold: float, eos: list[int]) -> None:
        """Writes the draft loop's threshold and EOS ids where they changed."""
        if len(eos) > MAX_EOS_IDS:
            raise ValueError(f"the device draft loop compares with at most {MAX_EOS_IDS} EOS ids, got {len(eos)}")
        settings = (float(threshold), tuple(eos))
        if settings != self._draft_settings:
            self._fallback.fill_(float(threshold))
            self._eos.copy_(torch.tensor(list(eos) + [-1] * (MAX_EOS_IDS - len(eos))))
            self._draft_settings = settings

    def _draft_first(self, logits: torch.Tensor, nxt: torch.Tensor) -> None:
        """A draft's first step, from its logits [B, 1, V] and each row's next position after the fed tokens."""
        self._draft_out[:, 0].zero_()
        self._nxt.copy_(nxt)
        self._draft_record(logits, self._no)

    def _draft_step(self) -> None:
        """A draft's next step (graph ("draft_next", 1)): every row feeds its last kept token at its next position. A
        row that stopped feeds junk there, which its next real pass writes over before any query reads it."""
        pos = self._nxt.clamp(max=self.capacity - 1)[:, None]
        self._draft_record(self._forward(self._tok[:, None], pos, last_only=True), self._yes)

    def _draft_record(self, logits: torch.Tensor, advance: torch.Tensor) -> None:
        """A step's verdict from the head's logits [B, 1, V] (the decoder's, as the host loop's steps take it), then
        its bookkeeping (draft_bookkeeping; one fused kernel where a batch runner compiles: one row's host loop is the
        default at batch size 1, and compiling it there would cost seconds for a rare setting)."""
        confidence, token = self.decoder.verdict(logits)
        self._conf.copy_(confidence)
        self._tok.copy_(token)
        _bookkeeping(draft_bookkeeping, self.compiled and self.batch > 1)(
            self._conf, self._tok, self._fallback, self._eos, self._left, self._nxt, self._draft_out, advance)

