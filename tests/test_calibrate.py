import json

import pytest
import torch
from transformers import AutoTokenizer

import decode.loading as loading
from align.calibrate import CalibrateConfig, bucket, calibrate, read_records
from decode import Greedy
from decode.loading import load_model


def _cfg(toy_data, toy_models, out, **kw):
    base = dict(model=toy_models["large"], dataset=str(toy_data), split="train", limit=30, batch_size=8,
                max_new_tokens=20, output=str(out))
    base.update(kw)
    return CalibrateConfig(**base)


def test_calibration_equals_large_greedy(toy_data, toy_models, tmp_path):
    out = calibrate(_cfg(toy_data, toy_models, tmp_path / "calib.jsonl"))
    records = read_records(out)
    assert sorted(records) == list(range(30))
    large = load_model(toy_models["large"])
    tok = AutoTokenizer.from_pretrained(toy_models["large"])
    greedy = Greedy(large)
    for i in (0, 7, 29):
        ids = torch.tensor([tok(records[i]["source"])["input_ids"]])
        new = greedy.generate(ids, max_new_tokens=20).sequences[0, 1:].tolist()
        new = [t for t in new if t != tok.pad_token_id]
        if new and new[-1] == tok.eos_token_id:
            new = new[:-1]
        assert records[i]["output_ids"] == new
    prov = json.loads((tmp_path / "calib.jsonl.provenance.json").read_text())
    assert prov["model_fingerprint"].startswith("sha256:")
    assert prov["decoding"]["num_beams"] == 1 and prov["split"] == "train" and prov["examples"] == 30


def test_interrupted_run_resumes_to_the_same_file(toy_data, toy_models, tmp_path, monkeypatch):
    whole = calibrate(_cfg(toy_data, toy_models, tmp_path / "whole.jsonl")).read_text()

    # Interrupt after two batches, as a crash or Ctrl-C would.

    original = loading.load_model

    def crashing_load(*args, **kwargs):
        model = original(*args, **kwargs)
        real_generate, calls = model.generate, {"n": 0}

        def generate(*a, **k):
            calls["n"] += 1
            if calls["n"] > 2:
                raise KeyboardInterrupt
            return real_generate(*a, **k)

        model.generate = generate
        return model

    monkeypatch.setattr(loading, "load_model", crashing_load)
    out = tmp_path / "resumed.jsonl"
    with pytest.raises(KeyboardInterrupt):
        calibrate(_cfg(toy_data, toy_models, out))
    part = tmp_path / "resumed.jsonl.part0"
    assert len(read_records(part)) == 16  # two batches of 8 survived
    with part.open("a") as f:
        f.write('{"index": 99, "source": "torn')  # a line cut off mid-write
    monkeypatch.setattr(loading, "load_model", original)
    calibrate(_cfg(toy_data, toy_models, out))
    assert out.read_text() == whole
    assert not part.exists()


def test_changed_settings_refuse_to_resume(toy_data, toy_models, tmp_path):
    calibrate(_cfg(toy_data, toy_models, tmp_path / "c.jsonl", limit=5))
    with pytest.raises(SystemExit, match="max_new_tokens|decoding"):
        calibrate(_cfg(toy_data, toy_models, tmp_path / "c.jsonl", limit=5, max_new_tokens=7))


def test_bucketing_groups_similar_lengths():
    batches = bucket({0: 3, 1: 10, 2: 4, 3: 9, 4: 1}, 2)
    assert batches == [[1, 3], [2, 0], [4]]


@pytest.mark.parametrize("kw", [dict(model=""), dict(dataset=""), dict(batch_size=0), dict(limit=0)])
def test_bad_calibration_config(kw):
    base = dict(model="m", dataset="d")
    base.update(kw)
    with pytest.raises(ValueError):
        CalibrateConfig(**base)


def test_outputs_cut_at_max_new_tokens_are_marked_and_get_no_eos(toy_data, toy_models, tmp_path):
    """An output the large model did not finish within max_new_tokens must not teach the small model to stop
    there: it is marked, counted in the provenance, and its training target has no EOS."""
    from align.config import TrainConfig
    from align.pairs import build_pairs

    cfg = _cfg(toy_data, toy_models, tmp_path / "short.jsonl")
    cfg.max_new_tokens = 2
    out = calibrate(cfg)
    records = read_records(out)
    unfinished = [r for r in records.values() if not r["finished"]]
    assert unfinished and all(len(r["output_ids"]) == 2 for r in unfinished)
    prov = json.loads((tmp_path / "short.jsonl.provenance.json").read_text())
    assert prov["unfinished_outputs"] == len(unfinished)
    calibrate(cfg)  # the count in the provenance does not block a rerun with the same settings
    tok = AutoTokenizer.from_pretrained(toy_models["large"])
    train_cfg = TrainConfig(model=toy_models["small"], calibration=str(out), objective="seq_kd", output_dir=str(tmp_path))
    targets = {tuple(t) for _, t in build_pairs(train_cfg, tok, "train")}
    for r in records.values():
        if r["index"] % 50:  # every 50th pair is held out for evaluation
            assert tuple(r["output_ids"] + ([tok.eos_token_id] if r["finished"] else [])) in targets
