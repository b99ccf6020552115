"""What `python -m decode.eval` evaluates: its config (EvalConfig, read from YAML with key=value overrides) and the
systems it knows (rows of the report)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from data.sources import PromptConfig
from decode.bild import BiLDConfig
from decode.metrics import TASKS

SYSTEMS = ("large", "hf_generate", "small", "bild", "bild_exact", "assisted", "bild_fallback_only", "bild_rollback_only",
           "early_exit", "early_exit_exact", "hf_early_exit")
DEFAULT_SYSTEMS = SYSTEMS[:6]
# BiLD rows, each a BiLDConfig override at the row's thresholds: the paper's ablations switch one policy off
BILD_ROWS = {"bild": {}, "bild_exact": {"rollback": "exact"},
         "bild_fallback_only": {"rollback_threshold": math.inf},  # never roll back
         "bild_rollback_only": {"fallback_threshold": 0.0}}  # never fall back on confidence (step cap only)
EXIT_ROWS = {"early_exit": {}, "early_exit_exact": {"rollback": "exact"}}  # early-exit rows, the same overrides


@dataclass
class EvalConfig(PromptConfig):
    task: str = "translation"
    """translation (BLEU, chrF), summarization (ROUGE) or lm (perplexity of continuations)."""
    large: str = ""
    small: str = ""
    aligned: str | None = None
    """The aligned small model, used with --aligned."""
    tokenizer: str | None = None
    dataset: str = ""
    split: str = "test"
    limit: int | None = None
    lm_prompt_tokens: int = 32
    """lm task: tokens of each line given as the prompt."""
    max_new_tokens: int = 128
    fallback_threshold: float = 0.5
    rollback_threshold: float = 3.0
    max_small_steps: int | None = 10
    aligned_fallback_threshold: float | None = None
    """Thresholds for BiLD with the aligned model; default: the same as unaligned."""
    aligned_rollback_threshold: float | None = None
    use_tuned: bool = True
    """Where a small model's folder holds bild_thresholds.json (python -m decode.tune), its BiLD rows use that
    point instead of the thresholds above."""
    systems: list = field(default_factory=lambda: list(DEFAULT_SYSTEMS))
    """Rows to run; also bild_fallback_only and bild_rollback_only (the paper's ablations), early_exit,
    early_exit_exact and hf_early_exit."""
    exit_layers: list = field(default_factory=lambda: [1, 2, 3])
    """Early-exit rows: the large model exiting after each of these decoder layers, with its own head."""
    exit_checkpoints: list = field(default_factory=list)
    """Early-exit rows: folders with a trained exit head (align/train.py objective=early_exit) and its model."""
    exit_fallback_threshold: float | None = None
    """Thresholds of the early-exit rows; default: fallback_threshold / rollback_threshold."""
    exit_rollback_threshold: float | None = None
    sweep_fallback: list = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    sweep_rollback: list = field(default_factory=lambda: [1.0, 2.0, 3.0, 5.0, 8.0])
    sweep_max_small_steps: list | None = None
    """decode.tune's grid of step caps (max_small_steps; None in the list: no cap); default: max_small_steps alone."""
    sweep_models: list | None = None
    """What --sweep sweeps: "small", "aligned", "exit<k>" (the untrained exit after layer k), "exit_ckpt<i>" (the
    i-th of exit_checkpoints). Default: small, aligned with --aligned, and every early exit of the early_exit rows."""
    sweep_limit: int | None = None
    """Examples for each sweep point (default: all)."""
    do_sample: bool = False
    """Sample instead of decoding greedily (every row; BiLD rows need rollback exact: systems=[large, bild_exact])."""
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    """Sampling: example i of a row draws from a generator seeded with seed + i (a call of several rows: seeded by
    its first example's, so the samples depend on the batch size; their distribution does not)."""
    batch_size: int = 1
    """Rows per generate call in the main table and the sweep (BiLD and the large/small rows decode a batch
    together on the fast path; the others row after row). 1: the paper's setting."""
    throughput_batch_sizes: list = field(default_factory=list)
    """A throughput table: for each of these batch sizes, the large model alone and every BiLD row of
    `throughput_systems` decode the same examples in calls of that many rows (e.g. [1, 4, 16, 64])."""
    throughput_systems: list = field(default_factory=lambda: ["bild", "bild_exact"])
    """BiLD rows of the throughput table (with --aligned, both the unaligned and the aligned variant)."""
    throughput_limit: int | None = None
    """Examples for the throughput table (default: all)."""
    device_loop: bool | None = None
    """The greedy loop's state on the device (BiLDConfig.device_loop), for BiLD's small model and the large/small rows
    alike: null (in batches only), true, or false (the host loop everywhere, to measure what it saves)."""
    fast_path: bool | None = None
    """The fast path for BiLD and the large/small rows (None: where the architecture is covered; CUDA graphs on CUDA)."""
    compile: bool | None = None
    """The fast path's passes through torch.compile for BiLD and the large/small rows (BiLDConfig.compile): true,
    false, or null (compiled on CUDA unless BILD_COMPILE=0)."""
    dtype: str = "auto"
    device: str = "auto"
    warmup: int = 3
    """Untimed examples each system decodes first (in batches, one batch), then the longest input too (0: none)."""
    repeats: int = 1
    """Timed passes of every main-table row over the examples, interleaved (every row once, then again): a row's
    time is the median of its passes' totals, its speedup the median of the per-pass speedups (pass i against the
    large model's pass i), reported with their range; per-example latencies are medians over the passes."""
    out: str = "runs/eval"

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; tasks: {', '.join(TASKS)}")
        if not self.large or not self.small:
            raise ValueError("the config must name `large` and `small` models")
        if not self.dataset:
            raise ValueError("the config must name a `dataset`")
        unknown = [s for s in self.systems if s not in SYSTEMS]
        if unknown:
            raise ValueError(f"unknown system(s) {unknown}; systems: {', '.join(SYSTEMS)}")
        if "large" not in self.systems:
            self.systems = ["large", *self.systems]  # every speedup is measured against it
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        for fb in [self.fallback_threshold, self.aligned_fallback_threshold, *self.sweep_fallback]:
            for rb in [self.rollback_threshold, self.aligned_rollback_threshold, *self.sweep_rollback]:
                if fb is not None and rb is not None:
                    BiLDConfig(fallback_threshold=fb, rollback_threshold=rb, max_small_steps=self.max_small_steps)
        if self.warmup < 0:
            raise ValueError("warmup must be >= 0")
        if isinstance(self.repeats, bool) or not isinstance(self.repeats, int) or self.repeats < 1:
            raise ValueError(f"repeats must be a positive integer, got {self.repeats!r}")
        for b in [self.batch_size, *self.throughput_batch_sizes]:
            if isinstance(b, bool) or not isinstance(b, int) or b < 1:
                raise ValueError(f"batch sizes must be positive integers, got {b!r}")
        bad = [s for s in self.throughput_systems if s not in BILD_ROWS]
        if bad:
            raise ValueError(f"throughput_systems must be BiLD rows ({', '.join(BILD_ROWS)}), got {bad}")
        if self.do_sample and self.throughput_batch_sizes and self.throughput_systems != ["bild_exact"]:
            raise ValueError("sampling verifies drafts by the rejection rule (rollback exact): with do_sample, "
                             "use throughput_systems=[bild_exact]")
        if any(s in self.systems for s in ("early_exit", "early_exit_exact", "hf_early_exit")):
            if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.exit_layers):
                raise ValueError(f"exit_layers must be positive integers, got {self.exit_layers}")
            if not self.exit_layers and not self.exit_checkpoints:
                raise ValueError("early-exit rows need `exit_layers` or `exit_checkpoints`")
