"""Training pairs: (source ids, target ids) from a dataset's references or from calibration outputs, an epoch order
that does not depend on the number of processes, and the collator that pads a batch."""

from __future__ import annotations

from pathlib import Path

import torch

from align.config import TrainConfig
from align.losses import IGNORE_INDEX
from data.sources import load_examples


def _encode_target(tokenizer, cfg: TrainConfig, text: str | None = None, ids: list[int] | None = None,
                   finished: bool = True) -> list[int]:
    """Target ids end with EOS, so the model learns where to stop; an output the large model never finished
    (cut at max_new_tokens) gets no EOS, so the small model is not taught to stop where the large one did not."""
    if ids is None:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not finished:
        return list(ids[: cfg.max_target_length])
    return list(ids[: cfg.max_target_length - 1]) + [tokenizer.eos_token_id]


def repeats(ids: list[int], n: int) -> bool:
    """Whether a sequence of n tokens occurs twice in ids (overlaps count: "a a a" repeats "a a")."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return len(grams) != len(set(grams))


def build_pairs(cfg: TrainConfig, tokenizer, which: str) -> list[tuple[list[int], list[int]]]:
    """(source ids, target ids) for training (`which="train"`) or evaluation (`"eval"`)."""
    if cfg.objective == "references" or (cfg.objective == "early_exit" and not cfg.calibration):
        split = cfg.split if which == "train" else cfg.eval_split
        if split is None:
            return []
        examples = load_examples(cfg.dataset, split, cfg.limit if which == "train" else cfg.eval_limit,
                                 cfg.source_field, cfg.target_field)
        return [(cfg.encode(tokenizer, ex.source)[0], _encode_target(tokenizer, cfg, ex.target)) for ex in examples]

    from align.calibrate import read_records

    if which == "eval" and cfg.eval_calibration:
        records = list(read_records(Path(cfg.eval_calibration)).values())[: cfg.eval_limit]
    else:
        path = Path(cfg.calibration)
        if not path.is_file():
            raise FileNotFoundError(f"calibration file not found: {path} (run align.calibrate first)")
        records = [r for i, r in sorted(read_records(path).items())]
        if cfg.limit is not None and which == "train":
            records = records[: cfg.limit]
        if not cfg.eval_calibration:
            held_out = [r for r in records if r["index"] % 50 == 0]
            records = held_out[: cfg.eval_limit] if which == "eval" else [r for r in records if r["index"] % 50 != 0]
        if cfg.drop_loops and which == "train":
            kept = [r for r in records if r.get("finished", True) and not repeats(r["output_ids"], cfg.drop_loops)]
            print(f"train: {len(records) - len(kept)} of {len(records)} calibration outputs left out (a sequence of "
                  f"{cfg.drop_loops} tokens repeated, or never finished: drop_loops)")
            records = kept
    unfinished = sum(not r.get("finished", True) for r in records)
    if unfinished:
        print(f"{which}: {unfinished} of {len(records)} calibration outputs were cut at max_new_tokens; they get no EOS target")
    return [(cfg.encode(tokenizer, r["source"])[0], _encode_target(tokenizer, cfg, ids=r["output_ids"], finished=r.get("finished", True)))
            for r in records]


class EpochShuffle(torch.utils.data.Sampler):
    """One permutation per (seed, epoch), the same whatever the number of processes: a run on two GPUs sees
    the global batches that one GPU with two accumulation steps sees, and a resumed run the same order."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist())

    def __len__(self) -> int:
        return self.size


class Collator:
    """Pads a batch. Seq2seq: input_ids / labels. Decoder-only: prompt + target in one row, prompt labels -100."""

    def __init__(self, pad_id: int, is_seq2seq: bool, pad_to_multiple_of: int = 1):
        self.pad_id, self.is_seq2seq, self.multiple = pad_id, is_seq2seq, pad_to_multiple_of

    def __call__(self, pairs):
        if self.is_seq2seq:
            sources = [s for s, _ in pairs]
            targets = [t for _, t in pairs]
        else:
            sources = [s + t for s, t in pairs]
            targets = [[IGNORE_INDEX] * len(s) + t for s, t in pairs]
        # Rounding lengths up bounds the number of distinct shapes the device kernels see.
        s_len, t_len = (-(-max(map(len, seqs)) // self.multiple) * self.multiple for seqs in (sources, targets))
        input_ids = torch.full((len(pairs), s_len), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(pairs), s_len), dtype=torch.long)
        labels = torch.full((len(pairs), t_len), IGNORE_INDEX, dtype=torch.long)
        for i, (s, t) in enumerate(zip(sources, targets)):
            input_ids[i, : len(s)] = torch.tensor(s)
            attention_mask[i, : len(s)] = 1
            labels[i, : len(t)] = torch.tensor(t)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


