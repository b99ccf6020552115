"""data.fetch: Multi30k from the Hub in the pipeline's layout, here from a stand-in folder (no network)."""

import json

import pytest

from data.fetch import main
from data.sources import load_examples


def standin(tmp_path, n=(5, 2, 3)):
    hub = tmp_path / "hub"
    hub.mkdir()
    for split, count in zip(("train", "validation", "test"), n):
        rows = [{"en": f"a dog number {i} runs .", "de": f"ein  hund nummer {i} rennt ."} for i in range(count)]
        (hub / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return hub


def test_fetch_writes_the_pipeline_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "multi30k"
    assert main(["--out", str(out), "--hub", str(standin(tmp_path))]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["SOURCE.md", "test.src", "test.tgt", "train.src", "train.tgt",
                                                     "valid.src", "valid.tgt"]
    valid = load_examples(str(out), "valid")
    assert [(e.source, e.target) for e in valid] == [("ein hund nummer 0 rennt .", "a dog number 0 runs ."),
                                                     ("ein hund nummer 1 rennt .", "a dog number 1 runs .")]
    assert len(load_examples(str(out), "train")) == 5 and "non-commercial" in (out / "SOURCE.md").read_text()


def test_fetch_failure_is_one_line_and_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "multi30k"
    assert main(["--out", str(out), "--hub", str(tmp_path / "no_such_folder")]) == 2
    assert "could not fetch Multi30k" in capsys.readouterr().err
    assert not out.exists()
