"""Prediction alignment: fine-tune the small model on the large model's outputs (or train any model on references).

    accelerate launch align/train.py --config configs/multi30k_align.yaml [--resume] [key=value ...]
    accelerate launch --config_file configs/accelerate/zero2.yaml align/train.py --config ... (DeepSpeed ZeRO-2)

Objectives (`objective`):
- seq_kd: cross-entropy on the large model's greedy outputs (the paper's prediction alignment);
- token_kd: a divergence between the large model's and the small model's next-token distributions on
  those outputs (`divergence`: forward_kl, reverse_kl, jsd, tvd; DistillSpec);
- seq_kd+token_kd: (1 - kd_weight) * seq_kd + kd_weight * token_kd;
- references: cross-entropy on the dataset's own targets, which also trains a model from a config
  (`model_config`) from scratch;
- early_exit: trains an exit head after decoder layer `exit_layer` of `model` (the large model) for early-exit
  BiLD (decode/early_exit.py), on its calibration outputs (`calibration`) or on references (`dataset`). The
  exit's distribution is distilled towards the full model's (`divergence`). `exit_mode=frozen`: only the head
  trains and the model is unchanged, so its lossless output is the original's; `exit_mode=joint`: the whole
  model trains on cross-entropy over the targets plus `exit_weight` x the exit loss (the paper's joint
  training; the full model's quality changes, and is reported). The head is saved with the model
  (exit_head.safetensors, exit_head.json), where `decode.EarlyExitBiLD(<final folder>)` finds it. Held-out
  metrics: eval_loss is the full model's cross-entropy, eval_top1_agreement the exit's argmax agreeing
  with the full model's.

An explicit loop: the loss is summed over target tokens and divided by the number of target tokens in
the whole accumulation window, gathered across processes. Evaluation on held-out pairs reports loss and
top-1 agreement (how often the small model's argmax is the large model's token, what BiLD's speed
depends on). Checkpoints every `save_every` updates; `--resume` continues from the latest. The final
model is a standard Hugging Face folder (`<output_dir>/final`), with the resolved config and metrics.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

if __package__ in (None, ""):  # run as a script: `accelerate launch align/train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch.utils.data import DataLoader

from align.losses import (
    DIVERGENCES,
    IGNORE_INDEX,
    cross_entropy_sum,
    divergence_sum,
    shift_for_causal_lm,
    top1_agreement,
)
from data.config import config_from_cli, save_config
from data.sources import PromptConfig, load_examples

OBJECTIVES = ("seq_kd", "token_kd", "seq_kd+token_kd", "references", "early_exit")
EXIT_MODES = ("frozen", "joint")


@dataclass
class TrainConfig(PromptConfig):
    # --- models
    model: str | None = None
    """Small model to fine-tune: Hub name or local folder. Leave empty and set model_config to train from scratch."""
    model_config: dict | None = None
    """A transformers config as a mapping with `model_type` (e.g. bart), for training from scratch."""
    keep_decoder_layers: list[int] | None = None
    """With `model`: keep only these decoder layers (0-based, in order) before training, the embeddings, the encoder
    and the head as they are: a small model made from the large one (DistilBART's shrink and fine-tune), which
    starts out reading the source as the large model does."""
    tokenizer: str | None = None
    """Tokenizer folder or name; defaults to `model`."""
    teacher: str | None = None
    """The large model; needed for token_kd and seq_kd+token_kd."""
    # --- data
    objective: str = "seq_kd"
    calibration: str | None = None
    """Calibration JSONL from align.calibrate (targets for seq_kd / token_kd)."""
    eval_calibration: str | None = None
    """Held-out calibration JSONL for evaluation; without it every 50th calibration pair is held out."""
    dataset: str | None = None
    """Dataset for `references` (see data/sources.py)."""
    split: str = "train"
    eval_split: str | None = "valid"
    limit: int | None = None
    eval_limit: int | None = 1000
    max_source_length: int = 256
    max_target_length: int = 256
    # --- loss
    divergence: str = "forward_kl"
    jsd_beta: float = 0.5
    kd_weight: float = 0.5
    """Weight of the token-level term in seq_kd+token_kd."""
    label_smoothing: float = 0.0
    # --- early exit (objective early_exit)
    exit_layer: int | None = None
    """The decoder layer after which the exit head reads (1 .. layers - 1)."""
    exit_mode: str = "frozen"
    """frozen: only the exit head trains (the model's output is unchanged); joint: the whole model trains."""
    exit_weight: float = 1.0
    """joint: weight of the exit loss next to the full model's cross-entropy."""
    # --- optimisation
    lr: float = 3e-4
    weight_decay: float = 0.01
    adam_beta2: float = 0.98
    scheduler: str = "linear"
    """Any transformers scheduler name: linear, cosine, inverse_sqrt, constant_with_warmup."""
    warmup_steps: int = 100
    max_grad_norm: float = 1.0
    batch_size: int = 32
    """Examples per process per micro-batch."""
    gradient_accumulation_steps: int = 1
    epochs: float = 1.0
    max_steps: int | None = None
    """Optimizer updates; overrides epochs when set."""
    mixed_precision: str = "no"
    """no, bf16 or fp16 (an accelerate config file's setting wins when launched with one)."""
    seed: int = 0
    num_workers: int = 0
    pad_to_multiple_of: int = 16
    """Batch lengths are rounded up to this, bounding the distinct shapes kernels see."""
    # --- LoRA (peft), merged into the saved checkpoint
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list | str | None = "all-linear"
    # --- outputs
    output_dir: str = "runs/align"
    log_every: int = 50
    eval_every: int = 500
    save_every: int = 1000
    keep_checkpoints: int = 2
    push_to_hub: bool = False
    hub_repo_id: str | None = None
    hub_private: bool = False
    recommended_thresholds: dict | None = None
    """Recommended BiLD thresholds for the model card, e.g. {fallback_threshold: 0.5, rollback_threshold: 3}."""

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
        if (self.model is None) == (self.model_config is None):
            raise ValueError("set exactly one of `model` (fine-tune) and `model_config` (train from scratch)")
        if self.keep_decoder_layers is not None:
            keep = self.keep_decoder_layers
            if self.model is None or not keep or sorted(set(keep)) != list(keep) or min(keep) < 0:
                raise ValueError("keep_decoder_layers needs `model` and distinct layer indices in increasing order, "
                                 f"got {keep!r}")
        if self.model_config is not None and "model_type" not in self.model_config:
            raise ValueError("model_config needs a `model_type`, e.g. bart or t5")
        if self.model is None and self.tokenizer is None:
            raise ValueError("training from a config needs `tokenizer`")
        if self.objective == "references" and not self.dataset:
            raise ValueError("objective references needs `dataset`")
        if self.objective == "early_exit":
            if self.model is None or self.exit_layer is None:
                raise ValueError("objective early_exit needs `model` (the model to exit early from) and `exit_layer`")
            if self.exit_mode not in EXIT_MODES:
                raise ValueError(f"exit_mode must be one of {EXIT_MODES}, got {self.exit_mode!r}")
            if not (self.calibration or self.dataset):
                raise ValueError("objective early_exit needs `calibration` (the model's own outputs) or `dataset`")
            if self.lora:
                raise ValueError("objective early_exit trains an exit head (and in joint mode the whole model); lora is not supported")
            if self.exit_weight <= 0:
                raise ValueError(f"exit_weight must be positive, got {self.exit_weight}")
        elif self.objective != "references" and not self.calibration:
            raise ValueError(f"objective {self.objective} needs `calibration` (from align.calibrate)")
        if "token_kd" in self.objective and not self.teacher:
            raise ValueError(f"objective {self.objective} needs `teacher` (the large model)")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise ValueError(f"kd_weight must be in [0, 1], got {self.kd_weight}")
        if self.lr <= 0 or self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("lr must be positive; batch_size and gradient_accumulation_steps at least 1")
        if self.max_steps is None and self.epochs <= 0:
            raise ValueError("set epochs > 0 or max_steps")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.push_to_hub and not self.hub_repo_id:
            raise ValueError("push_to_hub needs hub_repo_id")


# --------------------------------------------------------------------------------------------------
# Data


def _encode_target(tokenizer, cfg: TrainConfig, text: str | None = None, ids: list[int] | None = None,
                   finished: bool = True) -> list[int]:
    """Target ids end with EOS, so the model learns where to stop; an output the large model never finished
    (cut at max_new_tokens) gets no EOS, so the small model is not taught to stop where the large one did not."""
    if ids is None:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not finished:
        return list(ids[: cfg.max_target_length])
    return list(ids[: cfg.max_target_length - 1]) + [tokenizer.eos_token_id]


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


# --------------------------------------------------------------------------------------------------
# Models


def _bar_label(cfg) -> str:
    """The progress bar's name: what this run trains (the output folder's name, as launch.sh names its stages)."""
    what = {"references": "train", "early_exit": "exit head"}.get(cfg.objective, f"align ({cfg.objective})")
    folder = Path(cfg.output_dir).name if cfg.output_dir else ""
    return f"{what} {folder}".strip()


def _neutral_generation_config(model, tokenizer) -> None:
    """Plain greedy defaults with the tokenizer's special tokens (BART configs force EOS by default)."""
    from decode.bild import make_plain_greedy

    gen = model.generation_config
    make_plain_greedy(gen)
    gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    if model.config.is_encoder_decoder:
        gen.decoder_start_token_id = model.config.decoder_start_token_id


def build_model(cfg: TrainConfig, tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    if cfg.model is not None:
        from decode.bild import load_model

        model = load_model(cfg.model).train()
        if cfg.keep_decoder_layers is not None:
            keep_decoder_layers(model, cfg.keep_decoder_layers)
        return model
    spec = dict(cfg.model_config)
    model_type = spec.pop("model_type")
    start = tokenizer.pad_token_id if model_type == "t5" else tokenizer.eos_token_id
    spec.setdefault("vocab_size", len(tokenizer))
    spec.setdefault("pad_token_id", tokenizer.pad_token_id)
    spec.setdefault("eos_token_id", tokenizer.eos_token_id)
    spec.setdefault("bos_token_id", tokenizer.bos_token_id)
    spec.setdefault("decoder_start_token_id", start)
    spec.setdefault("forced_eos_token_id", None)
    config = AutoConfig.for_model(model_type, **spec)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = auto.from_config(config)
    _neutral_generation_config(model, tokenizer)
    return model


def keep_decoder_layers(model, keep: list[int]) -> None:
    """Drops every decoder layer of `model` but those in `keep`, in place, and sets the config's layer count and each
    attention's cache index to match."""
    from decode.compact import decoder_layer_modules

    layers = decoder_layer_modules(model)
    if max(keep) >= len(layers):
        raise ValueError(f"keep_decoder_layers {keep} but the model has {len(layers)} decoder layers")
    kind = model.config.model_type
    if kind in ("t5", "mt5") and keep[0] != 0:
        raise ValueError("T5 keeps its relative position bias in decoder layer 0: keep_decoder_layers must start at 0")
    name = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and list(m) == layers)
    parent, attribute = model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
    kept = [layers[i] for i in keep]
    for new_index, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    setattr(parent, attribute, torch.nn.ModuleList(kept))
    field = {"t5": "num_decoder_layers", "mt5": "num_decoder_layers"}.get(
        kind, "decoder_layers" if model.config.is_encoder_decoder else "num_hidden_layers")
    setattr(model.config, field, len(kept))
    if getattr(model.config, "layer_types", None) is not None:
        model.config.layer_types = [model.config.layer_types[i] for i in keep]


class ExitTraining(torch.nn.Module):
    """A model and the exit head after its decoder layer `exit_layer`, as one module for Accelerate / DeepSpeed.

    forward returns (the full model's logits, the exit's logits). Layer k's states are read with a forward
    hook on the layer itself, and the exit logits come from the same function early-exit decoding uses
    (ExitHead.logits over the model's own head, decode.compact.output_logits), so training and decoding cannot drift
    apart.
    """

    def __init__(self, model, exit_layer: int, mode: str):
        from decode.compact import decoder_layer_modules
        from decode.early_exit import ExitHead

        super().__init__()
        self.model, self.mode = model, mode
        self.exit_head = ExitHead(model, exit_layer)
        self.exit_layer = exit_layer
        self._layer = [decoder_layer_modules(model)[exit_layer - 1]]  # a list: not a registered submodule
        if mode == "frozen":
            model.requires_grad_(False)

    @property
    def config(self):
        return self.model.config

    def train(self, mode: bool = True):
        super().train(mode)
        if self.mode == "frozen":
            self.model.eval()  # the reference the exit learns from: no dropout
        return self

    def forward(self, **inputs):
        captured = []

        def keep(module, args, output):
            captured.append(output[0] if isinstance(output, tuple) else output)

        handle = self._layer[0].register_forward_hook(keep)
        try:
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.mode == "joint"):
                logits = self.model(**inputs).logits
        finally:
            handle.remove()
        return logits, self.exit_head.logits(self.model, captured[-1])


def _lora_config(cfg: TrainConfig, model):
    from peft import LoraConfig, TaskType

    task = TaskType.SEQ_2_SEQ_LM if model.config.is_encoder_decoder else TaskType.CAUSAL_LM
    return LoraConfig(task_type=task, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_target_modules)


# --------------------------------------------------------------------------------------------------
# Loss


def compute_loss(model, batch, cfg: TrainConfig, teacher=None):
    """Returns (summed loss over target tokens, summed CE, agreement matches, target count).

    Without a teacher (evaluation, or seq_kd / references) the loss is the cross-entropy on the targets.
    """
    labels = batch["labels"]
    if cfg.objective == "early_exit":
        return exit_loss(model, batch, cfg)
    if model_is_seq2seq(model):
        decoder_input_ids = _shift_right(model, labels)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=decoder_input_ids).logits  # [B, T, V]
        teacher_logits = None
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                         decoder_input_ids=decoder_input_ids).logits
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        teacher_logits = None
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # logits at t predict t + 1
        if teacher_logits is not None:
            logits, labels, teacher_logits = shift_for_causal_lm(logits, labels, teacher_logits)
        else:
            logits, labels = shift_for_causal_lm(logits, labels)

    ce = cross_entropy_sum(logits, labels, cfg.label_smoothing)
    if teacher_logits is None or cfg.objective in ("seq_kd", "references"):
        loss = ce
    else:
        kd = divergence_sum(logits, teacher_logits, labels, cfg.divergence, cfg.jsd_beta)
        loss = kd if cfg.objective == "token_kd" else (1 - cfg.kd_weight) * ce + cfg.kd_weight * kd
    matches, count = top1_agreement(logits, labels)
    return loss, ce.detach(), matches, count


def exit_loss(model, batch, cfg: TrainConfig):
    """objective early_exit: (loss, the full model's CE, exit argmax == full argmax count, target count)."""
    labels = batch["labels"]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if model_is_seq2seq(model):
        inputs["decoder_input_ids"] = _shift_right(model, labels)
    logits, exit_logits = model(**inputs)
    if not model_is_seq2seq(model):
        logits, labels, exit_logits = shift_for_causal_lm(logits, labels, exit_logits)
    ce = cross_entropy_sum(logits, labels, cfg.label_smoothing)
    kd = divergence_sum(exit_logits, logits.detach(), labels, cfg.divergence, cfg.jsd_beta)
    base = getattr(model, "module", model)
    loss = kd if base.mode == "frozen" else ce + cfg.exit_weight * kd
    mask = labels != IGNORE_INDEX
    matches = ((exit_logits.argmax(-1) == logits.argmax(-1)) & mask).sum()
    return loss, ce.detach(), matches, mask.sum()


def model_is_seq2seq(model) -> bool:
    base = getattr(model, "module", model)  # DDP / DeepSpeed wrappers
    return bool(getattr(base.config, "is_encoder_decoder", False))


def _shift_right(model, labels: torch.Tensor) -> torch.Tensor:
    """decoder_input_ids: the decoder start token, then the labels shifted right; -100 becomes padding."""
    base = getattr(model, "module", model)
    cfg = base.config
    start = cfg.decoder_start_token_id
    shifted = labels.new_full(labels.shape, cfg.pad_token_id)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = start
    return shifted.masked_fill(shifted == IGNORE_INDEX, cfg.pad_token_id)


@torch.no_grad()
def evaluate(model, dataloader, cfg, accelerator) -> dict:
    """Loss and top-1 agreement on the held-out pairs; empty when there are none (eval_split: null)."""
    if dataloader is None:
        return {}
    model.eval()
    totals = torch.zeros(3, device=accelerator.device, dtype=torch.float64)  # ce, matches, tokens
    for batch in dataloader:
        _, ce, matches, count = compute_loss(model, batch, cfg)
        totals += torch.stack([ce.double(), matches.double(), count.double()])
    totals = accelerator.reduce(totals, reduction="sum")
    model.train()
    ce, matches, tokens = totals.tolist()
    return {"eval_loss": ce / max(tokens, 1), "eval_top1_agreement": matches / max(tokens, 1), "eval_tokens": int(tokens)}


# --------------------------------------------------------------------------------------------------
# Checkpoints


def _checkpoints(output_dir: Path) -> list[Path]:
    found = [p for p in (output_dir / "checkpoints").glob("step_*") if (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def save_checkpoint(accelerator, output_dir: Path, state: dict, keep: int) -> None:
    path = output_dir / "checkpoints" / f"step_{state['step']}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        # written last: a checkpoint without it is incomplete and ignored by --resume
        (path / "trainer_state.json").write_text(json.dumps(state, indent=2))
        for old in _checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def check_deepspeed(plugin, cfg: TrainConfig) -> None:
    """The training config is the one source of accumulation and clipping. DeepSpeed's own values (from an
    Accelerate config file) would win silently: Accelerate only warns, and then steps the optimizer on its
    schedule and clips at its norm. Unset values are filled in; different ones are an error."""
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    for key, ours in (("gradient_accumulation_steps", cfg.gradient_accumulation_steps),
                      ("gradient_clipping", cfg.max_grad_norm or 0.0)):
        theirs = ds.get(key, "auto")
        if theirs in (None, "auto"):
            ds[key] = ours
        elif float(theirs) != float(ours):
            raise ValueError(f"the DeepSpeed config sets {key}={theirs} but the training config wants {ours}: "
                             f"remove it from the Accelerate config file (the training config is the one source)")


def save_final(accelerator, model, tokenizer, cfg: TrainConfig, metrics: dict, base_model_fn) -> Path:
    """A standard Hugging Face folder: weights, config, generation config, tokenizer, resolved config, metrics."""
    final = Path(cfg.output_dir) / "final"
    state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 shards; every process must call it
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        final.mkdir(parents=True, exist_ok=True)
        if cfg.lora:
            # Rebuild the base model and the adapter on the CPU, load the trained weights, merge, save plain.
            from peft import get_peft_model

            base = base_model_fn()
            peft_model = get_peft_model(base, _lora_config(cfg, base))
            result = peft_model.load_state_dict({k: v.cpu() for k, v in state_dict.items()}, strict=False)
            # strict=False only because buffers may be absent from a gathered state dict; a missing or
            # unexpected parameter means the merge would save untrained weights
            params = dict(peft_model.named_parameters())
            missing = [k for k in result.missing_keys if k in params]
            if missing or result.unexpected_keys:
                raise RuntimeError(f"LoRA merge: trained state does not match the rebuilt model (missing "
                                   f"{missing[:5]}, unexpected {result.unexpected_keys[:5]})")
            merged = peft_model.merge_and_unload()
            merged.generation_config = unwrapped.generation_config
            merged.save_pretrained(final)
        elif cfg.objective == "early_exit":  # the model (unchanged when frozen) and its exit head, side by side
            part = lambda prefix: {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}  # noqa: E731
            unwrapped.model.save_pretrained(final, state_dict=part("model."), is_main_process=True,
                                            save_function=accelerator.save)
            unwrapped.exit_head.save(final, part("exit_head."), mode=cfg.exit_mode, base_model=cfg.model,
                                     divergence=cfg.divergence, data=cfg.calibration or cfg.dataset,
                                     eval_top1_agreement=metrics.get("after", {}).get("eval_top1_agreement"))
        else:
            unwrapped.save_pretrained(final, state_dict=state_dict, is_main_process=True, save_function=accelerator.save)
        tokenizer.save_pretrained(final)
        save_config(cfg, final / "train_config.yaml")
        (final / "metrics.json").write_text(json.dumps(metrics, indent=2))
        if cfg.calibration:
            prov = Path(cfg.calibration + ".provenance.json")
            if prov.is_file():
                shutil.copy(prov, final / "calibration.provenance.json")
    accelerator.wait_for_everyone()
    return final


# --------------------------------------------------------------------------------------------------
# Training


# --------------------------------------------------------------------------------------------------
# The loop, in its stages: setup, data, optimizer, resume, one update, periodic work, finishing


@dataclass
class Run:
    """What one training run holds between its stages."""

    cfg: TrainConfig
    accelerator: object
    tokenizer: object
    model: torch.nn.Module
    teacher: torch.nn.Module | None
    output_dir: Path
    state: dict  # step, epoch, windows_in_epoch, tokens: what a checkpoint saves beside the weights
    metrics: dict  # before, history, after


def setup(cfg: TrainConfig) -> Run:
    """The accelerator, the tokenizer, the model to train (LoRA-wrapped or with an exit head where asked), the
    teacher for token distillation, and the output folder with the resolved config in it."""
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, set_seed
    from transformers import AutoTokenizer

    from decode.bild import check_model_location, load_model
    from decode.cache import prefer_fast_attention

    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision if os.environ.get("ACCELERATE_MIXED_PRECISION") is None else None,
        # Windows are always complete (see run_epochs), so the sync point is every N micro-batches.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.gradient_accumulation_steps, sync_with_dataloader=False
        ),
    )
    prefer_fast_attention()
    set_seed(cfg.seed)  # before the model is built: from-scratch weights are reproducible
    output_dir = Path(cfg.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "train_config.yaml")
    accelerator.print(f"{accelerator.num_processes} process(es), {accelerator.distributed_type}, "
                      f"mixed precision {accelerator.mixed_precision}")
    check_model_location(cfg.tokenizer or cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = build_model(cfg, tokenizer)
    if cfg.lora:
        from peft import get_peft_model

        model = get_peft_model(model, _lora_config(cfg, model))
    if cfg.objective == "early_exit":
        model = ExitTraining(model, cfg.exit_layer, cfg.exit_mode)
        accelerator.print(f"early exit after decoder layer {cfg.exit_layer}, {cfg.exit_mode}: "
                          f"{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M parameters train")
    teacher = None
    if "token_kd" in cfg.objective:
        teacher = load_model(cfg.teacher, device=accelerator.device).eval()
        teacher.requires_grad_(False)
    state = {"step": 0, "epoch": 0, "windows_in_epoch": 0, "tokens": 0}
    return Run(cfg, accelerator, tokenizer, model, teacher, output_dir, state, {"history": []})


def dataloaders(run: Run) -> tuple[DataLoader, DataLoader | None]:
    """Training batches in an order fixed by the seed and the epoch (a resumed run sees the same ones), and the
    evaluation batches (None without evaluation pairs)."""
    cfg, tokenizer = run.cfg, run.tokenizer
    with run.accelerator.main_process_first():
        train_pairs = build_pairs(cfg, tokenizer, "train")
        eval_pairs = build_pairs(cfg, tokenizer, "eval")
    if not train_pairs:
        raise ValueError("no training pairs")
    collate = Collator(tokenizer.pad_token_id, run.model.config.is_encoder_decoder, cfg.pad_to_multiple_of)
    # Its own generator: starting an iterator then leaves the global RNG (dropout) alone, so a resumed run
    # draws the same dropout masks as an uninterrupted one.
    train_dl = DataLoader(train_pairs, batch_size=cfg.batch_size, sampler=EpochShuffle(len(train_pairs), cfg.seed),
                          collate_fn=collate, num_workers=cfg.num_workers, generator=torch.Generator().manual_seed(cfg.seed))
    eval_dl = DataLoader(eval_pairs, batch_size=cfg.batch_size * 2, shuffle=False, collate_fn=collate) if eval_pairs else None
    return train_dl, eval_dl


def optimizer_and_schedule(run: Run, updates: int):
    """AdamW (no weight decay on biases and norms) and the learning-rate schedule over `updates` updates."""
    from transformers import get_scheduler

    cfg, accelerator = run.cfg, run.accelerator
    decay, no_decay = [], []
    for p in run.model.parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 else decay).append(p)  # biases and norms: no weight decay
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    ds = accelerator.state.deepspeed_plugin
    check_deepspeed(ds, cfg)
    if ds is not None and ds.zero_stage == 3:
        # ZeRO-3 regroups parameters, and the scheduler then sees fewer groups than it was built for
        # (a zip() error in its first step, seen with DeepSpeed 0.19.8): one group, decayed throughout.
        # Known difference from DDP and ZeRO-2 (norms and biases decayed too); not yet fixed.
        groups = [{"params": decay + no_decay, "weight_decay": cfg.weight_decay}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.adam_beta2))
    # The prepared scheduler steps once per process per update.
    scheduler = get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=cfg.warmup_steps * accelerator.num_processes,
                              num_training_steps=updates * accelerator.num_processes)
    return optimizer, scheduler


def resume_from_checkpoint(run: Run) -> None:
    """Loads the latest checkpoint's weights, optimizer, schedule, RNG and loop state into `run` (after prepare)."""
    found = _checkpoints(run.output_dir)
    if not found:
        run.accelerator.print(f"--resume: no checkpoint in {run.output_dir / 'checkpoints'}, starting fresh")
        return
    run.accelerator.load_state(str(found[-1]))
    run.state = json.loads((found[-1] / "trainer_state.json").read_text())
    run.metrics = run.state.pop("metrics", run.metrics)
    run.accelerator.print(f"resumed from {found[-1]} (update {run.state['step']})")


def update(run: Run, window: list[dict], optimizer, scheduler) -> torch.Tensor:
    """One optimizer update over a window of `gradient_accumulation_steps` batches, the loss normalised by the
    target tokens of the whole window on every process. Returns [loss sum, tokens] of this process's batches."""
    accelerator, model, cfg = run.accelerator, run.model, run.cfg
    accum = len(window)
    n_tokens = sum((b["labels"] != IGNORE_INDEX).sum() for b in window)
    n_tokens = accelerator.gather(n_tokens.reshape(1)).sum().item()  # note: sync point
    totals = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    for batch in window:
        with accelerator.accumulate(model):
            loss_sum, _, _, count = compute_loss(model, batch, cfg, run.teacher)
            # accelerate divides by `accum` in backward and DDP averages over processes: undo both
            loss = loss_sum * accum * accelerator.num_processes / max(n_tokens, 1)
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        totals += torch.stack([loss_sum.detach().double(), count.double()])
    run.state["step"] += 1
    run.state["windows_in_epoch"] += 1
    run.state["tokens"] += int(n_tokens)
    return totals


def log(run: Run, row: dict) -> None:
    run.metrics["history"].append(row)
    if run.accelerator.is_main_process:
        with (run.output_dir / "log.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")


def save(run: Run) -> None:
    save_checkpoint(run.accelerator, run.output_dir, {**run.state, "metrics": run.metrics}, run.cfg.keep_checkpoints)


def run_epochs(run: Run, train_dl, eval_dl, optimizer, scheduler, total_updates: int) -> float:
    """Updates until `total_updates`, epoch after epoch, logging, evaluating and saving checkpoints on schedule; a
    Ctrl-C saves a checkpoint first. Returns the seconds spent."""
    from tqdm.auto import tqdm

    cfg, accelerator, state = run.cfg, run.accelerator, run.state
    progress = tqdm(total=total_updates, initial=state["step"], desc=_bar_label(cfg), disable=not accelerator.is_main_process)
    accum = cfg.gradient_accumulation_steps
    run.model.train()
    running = torch.zeros(2, device=accelerator.device, dtype=torch.float64)  # loss sum, tokens
    t0, tokens_at_start = time.perf_counter(), state["tokens"]  # throughput counts this process's tokens only
    try:
        while state["step"] < total_updates:
            # The prepared loader sets its sampler's epoch from its own counter, which starts at 0 in a
            # resumed process (and does not advance when a partial window leaves batches unread): set it here.
            train_dl.set_epoch(state["epoch"])
            skip = state["windows_in_epoch"] * accum
            batches = iter(accelerator.skip_first_batches(train_dl, skip) if skip else train_dl)
            while state["step"] < total_updates:
                window = list(islice(batches, accum))
                if len(window) < accum:
                    break  # a partial window at the end of an epoch is dropped: every update sees `accum` batches
                running += update(run, window, optimizer, scheduler)
                progress.update(1)
                step = state["step"]
                if step % cfg.log_every == 0 or step == total_updates:
                    totals = accelerator.reduce(running, reduction="sum").tolist()
                    row = {"step": step, "epoch": state["epoch"], "loss": totals[0] / max(totals[1], 1),
                           "lr": scheduler.get_last_lr()[0], "tokens_per_s": (state["tokens"] - tokens_at_start) / (time.perf_counter() - t0)}
                    progress.set_postfix(loss=f"{row['loss']:.3f}")
                    log(run, row)
                    running.zero_()
                if step % cfg.eval_every == 0 and step != total_updates:
                    row = {"step": step, **evaluate(run.model, eval_dl, cfg, accelerator)}
                    accelerator.print(json.dumps(row))
                    log(run, row)
                if step % cfg.save_every == 0 and step != total_updates:
                    save(run)
            state["epoch"] += 1
            state["windows_in_epoch"] = 0
    except KeyboardInterrupt:
        accelerator.print("interrupted: saving a checkpoint, continue with --resume")
        save(run)
        raise
    progress.close()
    return time.perf_counter() - t0


def finish(run: Run, eval_dl, seconds: float) -> Path:
    """The last evaluation, the final Hugging Face folder (merged LoRA, the exit head alone), the Hub on request."""
    from accelerate.utils import set_seed

    cfg, accelerator, metrics = run.cfg, run.accelerator, run.metrics
    metrics["after"] = evaluate(run.model, eval_dl, cfg, accelerator)
    metrics["updates"] = run.state["step"]
    metrics["train_seconds"] = seconds
    accelerator.print(f"after training: {json.dumps(metrics['after'])}")

    def base_model_fn():
        set_seed(cfg.seed)
        return build_model(cfg, run.tokenizer)

    final = save_final(accelerator, run.model, run.tokenizer, cfg, metrics, base_model_fn)
    accelerator.print(f"saved {final}")
    if cfg.push_to_hub and accelerator.is_main_process:
        from align.publish import push

        push(final, cfg.hub_repo_id, private=cfg.hub_private)
    accelerator.end_training()
    return final


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """The whole run: setup, data, optimizer, resume, the updates, the final folder. Returns that folder."""
    run = setup(cfg)
    train_dl, eval_dl = dataloaders(run)
    accelerator = run.accelerator
    windows_per_epoch = max(len(train_dl) // max(accelerator.num_processes, 1) // cfg.gradient_accumulation_steps, 1)
    total_updates = cfg.max_steps or math.ceil(cfg.epochs * windows_per_epoch)
    optimizer, scheduler = optimizer_and_schedule(run, total_updates)
    run.model, optimizer, train_dl, scheduler = accelerator.prepare(run.model, optimizer, train_dl, scheduler)
    if eval_dl is not None:
        eval_dl = accelerator.prepare(eval_dl)
    if resume:
        resume_from_checkpoint(run)
    if "before" not in run.metrics:
        run.metrics["before"] = evaluate(run.model, eval_dl, cfg, accelerator)
        accelerator.print(f"before training: {json.dumps(run.metrics['before'])}")
    seconds = run_epochs(run, train_dl, eval_dl, optimizer, scheduler, total_updates)
    return finish(run, eval_dl, seconds)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Align a small model to a large one (or train on references).")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    args, cfg = config_from_cli(TrainConfig, parser, argv)
    return train(cfg, resume=args.resume)


if __name__ == "__main__":
    main()
