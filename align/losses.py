"""Distillation losses: sequence-level cross-entropy and token-level divergences (DistillSpec's choices).

Every function returns a SUM over valid target tokens, not a mean: the training loop divides by the
number of target tokens in the whole accumulation window, gathered across processes, so that long
and short batches weigh by their tokens. Softmaxes run in float32.

Shapes: logits [B, T, V]; labels [B, T] with -100 on positions that are not targets (padding, prompt).
For decoder-only models the logits at t predict the token at t + 1: call `shift_for_causal_lm` first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")


def shift_for_causal_lm(logits: torch.Tensor, labels: torch.Tensor, *more: torch.Tensor):
    """Aligns causal-LM logits with their targets: logits [B, T, V] at position t score labels[t + 1]."""
    shifted = [logits[:, :-1], labels[:, 1:]]
    shifted += [m[:, :-1] for m in more]  # e.g. the teacher's logits, shifted like the student's
    return tuple(shifted)


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Summed token cross-entropy; -100 labels contribute nothing."""
    return F.cross_entropy(
        logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum",
        label_smoothing=label_smoothing,
    )


def token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str, beta: float = 0.5) -> torch.Tensor:
    """Per-position divergence between the teacher's and the student's next-token distributions.

    student_logits, teacher_logits: [..., V] -> [...]
    - forward_kl: KL(p_T || p_S), mode-covering (standard KD)
    - reverse_kl: KL(p_S || p_T), mode-seeking
    - jsd: generalized Jensen-Shannon with mixture m = beta * p_T + (1 - beta) * p_S:
      beta * KL(p_T || m) + (1 - beta) * KL(p_S || m)
    - tvd: total variation, 0.5 * sum |p_T - p_S|
    """
    log_s = torch.log_softmax(student_logits.float(), dim=-1)
    log_t = torch.log_softmax(teacher_logits.float(), dim=-1)
    if kind == "forward_kl":
        return (log_t.exp() * (log_t - log_s)).sum(-1)
    if kind == "reverse_kl":
        return (log_s.exp() * (log_s - log_t)).sum(-1)
    if kind == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError(f"jsd needs 0 < beta < 1, got {beta}")
        log_m = torch.logsumexp(torch.stack([log_t + torch.log(torch.tensor(beta)), log_s + torch.log(torch.tensor(1 - beta))]), dim=0)
        kl_t = (log_t.exp() * (log_t - log_m)).sum(-1)
        kl_s = (log_s.exp() * (log_s - log_m)).sum(-1)
        return beta * kl_t + (1 - beta) * kl_s
    if kind == "tvd":
        return 0.5 * (log_t.exp() - log_s.exp()).abs().sum(-1)
    raise ValueError(f"unknown divergence {kind!r}; choose from {DIVERGENCES}")


def divergence_sum(student_logits, teacher_logits, labels, kind: str, beta: float = 0.5) -> torch.Tensor:
    """Summed divergence over target positions (labels != -100); masked positions contribute nothing."""
    mask = labels != IGNORE_INDEX  # [B, T]
    return token_divergence(student_logits[mask], teacher_logits[mask], kind, beta).sum()


def top1_agreement(student_logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(matches, count): target positions where the student's argmax equals the label (the large model's token)."""
    mask = labels != IGNORE_INDEX
    matches = (student_logits.argmax(-1) == labels) & mask
    return matches.sum(), mask.sum()
