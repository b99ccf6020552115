import math

import pytest
import torch
import torch.nn.functional as F

from align.losses import (
    DIVERGENCES,
    IGNORE_INDEX,
    cross_entropy_sum,
    divergence_sum,
    shift_for_causal_lm,
    token_divergence,
    top1_agreement,
)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_identical_distributions_give_zero(kind):
    logits = torch.randn(4, 7, 11)
    assert token_divergence(logits, logits.clone(), kind).abs().max() < 1e-5
    uniform = torch.zeros(3, 11)
    assert token_divergence(uniform, uniform, kind).abs().max() < 1e-6


def test_forward_kl_equals_kl_div():
    s, t = torch.randn(5, 9), torch.randn(5, 9)
    ref = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="none", log_target=True).sum(-1)
    torch.testing.assert_close(token_divergence(s, t, "forward_kl"), ref, rtol=1e-5, atol=1e-6)


def test_reverse_kl_is_forward_kl_swapped():
    s, t = torch.randn(5, 9), torch.randn(5, 9)
    torch.testing.assert_close(token_divergence(s, t, "reverse_kl"), token_divergence(t, s, "forward_kl"))


def test_jsd_and_tvd_closed_forms():
    # two-point distributions: p_T = (1, 0), p_S = (0, 1) (nearly): JSD(0.5) = log 2, TVD = 1
    t = torch.tensor([[30.0, -30.0]])
    s = torch.tensor([[-30.0, 30.0]])
    assert token_divergence(s, t, "jsd").item() == pytest.approx(math.log(2), abs=1e-4)
    assert token_divergence(s, t, "tvd").item() == pytest.approx(1.0, abs=1e-4)
    # JSD is symmetric at beta = 0.5 and bounded by log 2
    a, b = torch.randn(6, 5), torch.randn(6, 5)
    torch.testing.assert_close(token_divergence(a, b, "jsd"), token_divergence(b, a, "jsd"), rtol=1e-5, atol=1e-6)
    assert (token_divergence(a, b, "jsd") <= math.log(2) + 1e-6).all()


def test_masked_positions_contribute_nothing():
    s, t = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    labels = torch.tensor([[1, 2, IGNORE_INDEX, IGNORE_INDEX], [3, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    full = token_divergence(s, t, "forward_kl")
    assert divergence_sum(s, t, labels, "forward_kl").item() == pytest.approx((full[0, :2].sum() + full[1, 0]).item(), rel=1e-5)
    s2 = s.clone()
    s2[labels == IGNORE_INDEX] = 100.0  # garbage under the mask changes nothing
    assert divergence_sum(s2, t, labels, "forward_kl").item() == pytest.approx(divergence_sum(s, t, labels, "forward_kl").item(), rel=1e-6)
    ce = cross_entropy_sum(s, labels)
    ref = F.cross_entropy(s.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    assert ce.item() == pytest.approx(ref.item(), rel=1e-6)


def test_causal_shift_and_agreement():
    logits = torch.zeros(1, 4, 5)
    logits[0, 0, 2] = logits[0, 1, 3] = logits[0, 2, 0] = 1.0  # predicts 2, 3, 0 for positions 1..3
    labels = torch.tensor([[IGNORE_INDEX, 2, 3, 4]])
    s_logits, s_labels = shift_for_causal_lm(logits, labels)
    assert s_labels.tolist() == [[2, 3, 4]]
    matches, count = top1_agreement(s_logits, s_labels)
    assert (matches.item(), count.item()) == (2, 3)


def test_unknown_divergence():
    with pytest.raises(ValueError, match="unknown divergence"):
        token_divergence(torch.zeros(1, 2), torch.zeros(1, 2), "hellinger")
