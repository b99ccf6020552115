"""Speculative sampling for BiLD (Leviathan et al., 2023; Chen et al., 2023): the small model drafts by
sampling, BiLD's fallback decides the draft length, and the large model accepts or resamples each drafted
token so that the output is distributed exactly as the large model's own sampling with the same settings.

For pending tokens x_1..x_k drafted from q_1..q_k, with the large model's p_1..p_{k+1} (both after the same
temperature / top-k / top-p): x_i is accepted with probability min(1, p_i(x_i) / q_i(x_i)); at the first
rejection a token is drawn from norm(max(0, p_i - q_i)) and the rest is dropped; when all are accepted a
token is drawn from p_{k+1}. Which tokens get drafted (the confidence fallback, the step cap) depends only
on the small model, so exactness holds for any draft length; a fallback's discarded small token is never
part of the draft. The lossy CE rollback has no sampling analogue here: sampling needs rollback="exact".

Everything here runs on the device without reading anything back, so the fast path captures it inside its
CUDA graphs (decode/fast.py) and one small tensor comes back per pass, as in greedy decoding. The random
numbers come from the caller's generator as a block of uniforms written before each pass (`Sampling.fill`):
the first ones decide acceptances, the last `vocab` ones drive one draw by the Gumbel-max trick
(argmax_i log w_i + G_i, G_i = -log(-log u_i), picks i with probability w_i / sum w; w need not be normalised).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

ACCEPT_SLOTS = 16  # uniforms for acceptances at the front of every noise block (more when more tokens are pending)


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
        # The warper settings, hashable: part of a CUDA graph's key (the warpers are captured with the pass).
        top_p = None if self.top_p is None or float(self.top_p) >= 1.0 else float(self.top_p)
        self.key = (float(self.temperature), None if self.top_k is None else int(self.top_k), top_p)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return warped_probs(logits, self.key)

    def noise(self, n_pending: int, vocab: int, device) -> torch.Tensor:
        """A fresh block of uniforms for a pass with n_pending drafted tokens (`fill` writes the same numbers into a
        static buffer of the size for up to ACCEPT_SLOTS pending tokens)."""
        return self.fill(torch.empty(noise_size(n_pending, vocab), device=device))

    def fill(self, buffer: torch.Tensor) -> torch.Tensor:
        if self.generator is not None and self.generator.device.type != buffer.device.type:
            raise ValueError(f"the generator is on {self.generator.device} but the models are on {buffer.device}")
        return buffer.uniform_(generator=self.generator)


def noise_size(n_pending: int, vocab: int) -> int:
    return max(n_pending, ACCEPT_SLOTS) + vocab


@functools.lru_cache(maxsize=None)
def _warpers(key: tuple) -> LogitsProcessorList:
    temperature, top_k, top_p = key
    warpers = []  # transformers' own warpers, in generate's order: temperature, top-k, top-p
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k is not None:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None:
        warpers.append(TopPLogitsWarper(top_p))
    return LogitsProcessorList(warpers)


def warped_probs(logits: torch.Tensor, key: tuple) -> torch.Tensor:
    """logits [n, V] -> the sampling distribution of each row after the warpers of `key`, float32."""
    return torch.softmax(_warpers(key)(None, logits.float()), dim=-1)


def draw(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One index per row of weights [..., V] (non-negative, not all zero, need not sum to 1) with probability
    proportional to its weight, from uniforms [..., V] in [0, 1): the Gumbel-max trick. A zero weight is never
    drawn (log 0 = -inf), and u = 0 gives G = -inf: no NaN can arise."""
    return (weights.log() - (-uniforms.log()).log()).argmax(dim=-1)


def sample_step(logits: torch.Tensor, key: tuple, noise: torch.Tensor):
    """The small model's draft step: logits [V] -> (q [V] its sampling distribution, q's top probability for the
    fallback test, a token drawn from q), all on the device."""
    q = warped_probs(logits[None], key)[0]
    return q, q.max(), draw(q, noise[-q.shape[-1] :])


def sample_steps(logits: torch.Tensor, key: tuple, noise: torch.Tensor):
    """`sample_step` for B rows (decode/batch.py; batch 1 keeps its own kernels, tests check that both draw alike):
    logits [B, V], noise [B, noise_size] -> q [B, V], confidences [B], tokens [B]."""
    q = warped_probs(logits, key)
    return q, q.max(dim=-1).values, draw(q, noise[:, -q.shape[-1] :])


def verify(logits: torch.Tensor, q: torch.Tensor, pending: torch.Tensor, key: tuple, noise: torch.Tensor):
    """The rejection rule, on the device. logits: [k + 1, V] the large model's (row i for pending token i, the last
    for the position after them); q: [k, V] the small model's distributions the pending tokens were drawn from;
    pending: [k]; noise: a block of noise_size(k, V) uniforms.

    Returns 0-d tensors (cut, token): cut = the first rejected position (k when all are accepted) and the token
    for that position: drawn from the residual max(0, p - q) at a rejection, from p after the pending tokens when
    all are accepted (the caller drops it where the sequence ends there).
    """
    p = warped_probs(logits, key)
    k, vocab = pending.shape[0], p.shape[-1]
    positions = torch.arange(k + 1, device=p.device)
    if k:
        ratio = p[:k].gather(-1, pending[:, None])[:, 0] / q.gather(-1, pending[:, None])[:, 0]
        rejected = noise[:k] >= ratio  # accepted with probability min(1, ratio)
        cut = torch.where(rejected, positions[:k], k).min()
        q_cut = torch.cat([q, q.new_zeros(1, vocab)]).index_select(0, cut[None])[0]  # zeros past the last pending
    else:
        cut, q_cut = positions[0], torch.zeros_like(p[0])
    p_cut = p.index_select(0, cut[None])[0]
    residual = (p_cut - q_cut).clamp(min=0)
    # p == q on the support leaves nothing to correct, yet the token was rejected (probability 0): draw from p
    weights = torch.where(residual.sum() > 0, residual, p_cut)
    return cut, draw(weights, noise[-vocab:])


def verify_rows(logits, q, pending, n_pending, key: tuple, noise):
    """`verify` for B rows, each with its own number of pending tokens (decode/batch.py; tests check that both
    decide alike). logits: [B, m + 1, V]; q: [B, m, V];
    pending: [B, m]; n_pending: [B] (row b's pending tokens are its first n_pending[b]); noise:
    [B, noise_size(m, V)]. Returns cut [B], token [B]; past a row's pending tokens its q and logits are unread."""
    p = warped_probs(logits.flatten(0, 1), key).view(logits.shape)
    m, vocab = pending.shape[1], p.shape[-1]
    if m:
        positions = torch.arange(m, device=p.device)
        ratio = p[:, :m].gather(-1, pending[..., None])[..., 0] / q.gather(-1, pending[..., None])[..., 0]
        # accepted with probability min(1, ratio); nothing past a row's pending tokens is rejected
        rejected = (noise[:, :m] >= ratio) & (positions < n_pending[:, None])
        cut = torch.where(rejected, positions, n_pending[:, None]).min(dim=1).values
        q_cut = q.gather(1, cut.clamp(max=m - 1)[:, None, None].expand(-1, 1, vocab))[:, 0]
        q_cut = torch.where((cut < n_pending)[:, None], q_cut, 0.0)  # nothing drafted past the pending tokens
    else:
        cut, q_cut = n_pending, torch.zeros_like(p[:, 0])
    p_cut = p.gather(1, cut[:, None, None].expand(-1, 1, vocab))[:, 0]
    residual = (p_cut - q_cut).clamp(min=0)
    # p == q on the support leaves nothing to correct, yet the token was rejected (probability 0): draw from p
    weights = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p_cut)
    return cut, draw(weights, noise[:, -vocab:])
