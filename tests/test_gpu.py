"""GPU checks (run with `pytest -m gpu` on a CUDA machine)."""

import pytest
import torch
from tiny_models import hf_greedy, random_prompt, tiny_pair

from decode import BiLD, BiLDConfig, Greedy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("arch", ("t5", "bart", "llama", "qwen2"))
@pytest.mark.parametrize("seed", range(5))
def test_exact_rollback_equals_large_greedy_on_cuda_fp32(arch, seed):
    large, small = tiny_pair(arch, seed)
    large, small = large.cuda(), small.cuda()
    ids = random_prompt(seed).cuda()
    ref = hf_greedy(large, ids, max_new_tokens=24).cpu()
    out = BiLD(large, small, BiLDConfig(rollback="exact", fallback_threshold=0.5)).generate(ids, max_new_tokens=24)
    assert torch.equal(out.sequences, ref)


@pytest.mark.parametrize("arch", ("bart", "qwen2"))
def test_bf16_runs_and_statistics_add_up(arch):
    large, small = tiny_pair(arch, 1)
    large, small = large.cuda().bfloat16(), small.cuda().bfloat16()
    ids = random_prompt(3, batch=4).cuda()
    out = BiLD(large, small, BiLDConfig(fallback_threshold=0.4, rollback_threshold=2.0)).generate(ids, max_new_tokens=20)
    s = out.stats
    assert s.rows == 4 and s.new_tokens == s.small_tokens + s.large_tokens and s.seconds > 0
    greedy = Greedy(large).generate(ids, max_new_tokens=20)
    assert greedy.sequences.shape[0] == 4
