"""Speculative sampling for BiLD (Leviathan et al., 2023; Chen et al., 2023): the small model drafts by
sampling, BiLD's fallback decides the draft length, and the large model accepts or resamples each drafted
token so that the output is distributed exactly as the large model's own sampling with the same settings.

For pending tokens x_1..x_k drafted from q_1..q_k, with the large model's p_1..p_{k+1} (both after the same
temperature / top-k / top-p): x_i is accepted with probability min(1, p_i(x_i) / q_i(x_i)); at the first
rejection a token is drawn from norm(max(0, p_i - q_i)) and the rest is dropped; when all are accepted a
token is drawn from p_{k+1}. Which tokens get drafted (the confidence fallback, the step cap) depends only
on the small model, so exactness holds for any draft length; a fallback's discarded small token is never
part of the draft. The lossy CE rollback has no sampling analogue here: sampling needs rollback="exact".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper


@dataclass
class Sampling:
    """generate(..., do_sample=True, temperature, top_k, top_p, generator): the settings of one call."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = None

    def __post_init__(self):
        if self.temperature is None or not float(self.temperature) > 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {self.temperature} (for greedy: do_sample=False)")
        if self.top_k is not None and (isinstance(self.top_k, bool) or int(self.top_k) < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {self.top_k}")
        if self.top_p is not None and not 0.0 < float(self.top_p) <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        warpers = []
        # transformers' own warpers, in generate's order: temperature, top-k, top-p
        if float(self.temperature) != 1.0:
            warpers.append(TemperatureLogitsWarper(float(self.temperature)))
        if self.top_k is not None:
            warpers.append(TopKLogitsWarper(int(self.top_k)))
        if self.top_p is not None and float(self.top_p) < 1.0:
            warpers.append(TopPLogitsWarper(float(self.top_p)))
        self._warpers = LogitsProcessorList(warpers)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [n, V] -> the sampling distribution at each row, float32."""
        return torch.softmax(self._warpers(None, logits.float()), dim=-1)

    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        """One token from each row of probs [n, V] -> [n]."""
        return torch.multinomial(probs, 1, generator=self._gen(probs.device)).squeeze(-1)

    def uniform(self, n: int, device) -> torch.Tensor:
        return torch.rand(n, generator=self._gen(device), device=device)

    def _gen(self, device):
        if self.generator is not None and self.generator.device.type != torch.device(device).type:
            raise ValueError(f"the generator is on {self.generator.device} but the models are on {device}")
        return self.generator


def verify(p: torch.Tensor, q: torch.Tensor, pending: torch.Tensor, sampling: Sampling, final: bool) -> tuple[int, int | None]:
    """The rejection rule. p: [k + 1, V] the large model's distributions (row i for pending token i, the last for
    the position after them); q: [k, V] the small model's; pending: [k].

    Returns (cut, token): cut = the first rejected position (k when all are accepted) and the token written
    there (None when all are accepted and `final`: the sequence ends without a bonus token).
    """
    k = pending.shape[0]
    if k:
        ratio = p[:k].gather(-1, pending[:, None]).squeeze(-1) / q.gather(-1, pending[:, None]).squeeze(-1)
        rejected = sampling.uniform(k, p.device) >= ratio  # accepted with probability min(1, ratio)
        cut = int(torch.where(rejected, torch.arange(k, device=p.device), k).min())  # note: sync point
    else:
        cut = 0
    if cut < k:
        residual = (p[cut] - q[cut]).clamp(min=0)
        total = residual.sum()
        # p == q on the support leaves nothing to correct, yet the token was rejected (probability 0): draw from p
        dist = residual / total if float(total) > 0 else p[cut]
        return cut, int(sampling.draw(dist[None])[0])
    if final:
        return k, None
    return k, int(sampling.draw(p[k : k + 1])[0])
