"""scripts/step_vs_check.py on the CPU: the check's states against the steps', layer by layer."""

import sys
from pathlib import Path

from tiny_models import tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from step_vs_check import compare  # noqa: E402


def test_a_check_agrees_with_the_steps_in_float32_and_the_counts_add_up():
    """float32 on the CPU: a check's products round apart from a step's in the last bits, never by more, and no
    argmax moves; a token first differs at one layer only, and from there on at every layer."""
    for arch in ("bart", "qwen2"):
        model = tiny_model(arch, 0)
        r = compare(model, prompts=3, length=6, tokens=8, compile=False)
        assert r["tokens"] == 24 and r["argmax_differ"] == 0
        assert sum(r["first"]) <= r["tokens"] and max(r["largest"]) < 1e-4
        assert r["differ"] == sorted(r["differ"])  # a token that differs at a layer differs at every later one


def test_a_check_that_computes_a_layer_otherwise_shows_at_that_layer(monkeypatch):
    """A check that computes layer 1 otherwise than the steps do (its output scaled by 1.01: a stand-in for a pass that
    rounds apart) shows there: layer 0 differs in the last bits at most (float32 on a CPU), layer 1 by far more, for
    every token, and every token's logits differ."""
    model = tiny_model("qwen2", 0)
    from decode.decoder_only import LlamaDecoder

    run = LlamaDecoder.run_layers

    def skewed(self, h, pos, start, stop):
        out = run(self, h, pos, start, stop)
        return out * 1.01 if start == 1 and h.shape[1] > 1 else out  # only the check (several tokens), layer 1

    monkeypatch.setattr(LlamaDecoder, "run_layers", skewed)
    r = compare(model, prompts=2, length=5, tokens=6, compile=False)
    assert r["tokens"] == 12 and r["differ"][1] == 12 and r["logits_differ"] == 12
    assert r["largest"][0] < 1e-4 and r["largest"][1] > 1e-3
