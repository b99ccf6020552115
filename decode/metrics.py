"""Quality metrics, each a thin wrapper over the library that defines it.

- translation: corpus BLEU and chrF with sacrebleu (default 13a tokenisation, as reported by the paper);
- summarization: ROUGE-1/2/L/Lsum F1 with rouge-score, stemming on (x100, mean over examples);
- language modelling: perplexity of each system's continuation under the large model (lower is better).
"""

from __future__ import annotations

import math

import torch

# task -> (primary metric, higher is better)
TASKS = {"translation": ("bleu", True), "summarization": ("rougeL", True), "lm": ("perplexity", False)}


def translation_scores(hypotheses: list[str], references: list[str]) -> dict:
    import sacrebleu

    return {
        "bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
        "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score,
    }


def bleu_difference(hypotheses: list[str], baseline: list[str], references: list[str], samples: int = 1000,
                    seed: int = 0) -> tuple[float, float, float]:
    """Corpus BLEU of `hypotheses` minus that of `baseline` (same references), and its 95% paired bootstrap interval
    (Koehn, 2004): the sentences resampled with replacement `samples` times, both systems scored on each resample.
    From sacrebleu's sentence statistics, as its own paired test (sacrebleu.significance) computes them."""
    import numpy as np
    from sacrebleu.metrics import BLEU

    bleu = BLEU()
    ours, theirs = (np.asarray(bleu._extract_corpus_statistics(h, [references]), dtype=np.int64)
                    for h in (hypotheses, baseline))

    def corpus(stats: np.ndarray) -> float:
        return bleu._compute_score_from_stats(stats.sum(axis=0).tolist()).score

    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(samples):
        pick = rng.integers(0, len(references), len(references))
        diffs.append(corpus(ours[pick]) - corpus(theirs[pick]))
    low, high = np.percentile(diffs, [2.5, 97.5])
    return corpus(ours) - corpus(theirs), float(low), float(high)


def summarization_scores(hypotheses: list[str], references: list[str]) -> dict:
    from rouge_score import rouge_scorer

    # the plain mean of per-example F1, as most papers report (no bootstrap resampling)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    totals = {k: 0.0 for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")}
    for hyp, ref in zip(hypotheses, references):
        scores = scorer.score(ref, hyp)  # rouge-score's order: (target, prediction)
        for k in totals:
            totals[k] += scores[k].fmeasure
    n = max(len(hypotheses), 1)
    return {k: 100.0 * v / n for k, v in totals.items()}


@torch.inference_mode()
def continuation_perplexity(model, prompts: list[list[int]], continuations: list[list[int]]) -> dict:
    """exp(mean NLL) of the continuation tokens given their prompts, under `model` (decoder-only)."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for prompt, cont in zip(prompts, continuations):
        if not cont:
            continue
        ids = torch.tensor([prompt + cont], device=device)
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()  # rows predicting the continuation
        nll += torch.nn.functional.cross_entropy(logits, ids[0, len(prompt) :], reduction="sum").item()
        count += len(cont)
    return {"perplexity": math.exp(nll / count) if count else float("nan")}


def score(task: str, hypotheses: list[str], references: list[str]) -> dict:
    if task == "translation":
        return translation_scores(hypotheses, references)
    if task == "summarization":
        return summarization_scores(hypotheses, references)
    raise ValueError(f"no text metric for task {task!r}; tasks: {', '.join(TASKS)}")
