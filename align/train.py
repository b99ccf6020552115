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

This file holds the losses and the loop; the config is align/config.py, the pairs and batches align/pairs.py, the
model align/models.py, checkpoints and the final folder align/checkpoints.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

if __package__ in (None, ""):  # run as a script: `accelerate launch align/train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch.utils.data import DataLoader

from align.checkpoints import check_deepspeed, list_checkpoints, save_checkpoint, save_final
from align.config import TrainConfig
from align.losses import (
    IGNORE_INDEX,
    cross_entropy_sum,
    divergence_sum,
    shift_for_causal_lm,
    top1_agreement,
)
from align.models import ExitTraining, build_model, lora_config
from align.pairs import Collator, EpochShuffle, build_pairs
from data.config import config_from_cli, save_config

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
# The loop, in its stages: setup, data, optimizer, resume, one update, periodic work, finishing


def _bar_label(cfg) -> str:
    """The progress bar's name: what this run trains (the output folder's name, as launch.sh names its stages)."""
    what = {"references": "train", "early_exit": "exit head"}.get(cfg.objective, f"align ({cfg.objective})")
    folder = Path(cfg.output_dir).name if cfg.output_dir else ""
    return f"{what} {folder}".strip()



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

    from decode.loading import check_model_location, load_model
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

        model = get_peft_model(model, lora_config(cfg, model))
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
    found = list_checkpoints(run.output_dir)
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
