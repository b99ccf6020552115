"""`./launch.sh smoke` runs every stage on miniature settings, and a second run skips them all."""

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"


@pytest.mark.skipif(not (DATA / "multi30k").is_dir(), reason="needs ../shared/data/multi30k beside the checkout")
def test_launch_smoke_runs_every_stage_then_skips_them(tmp_path):
    env = {**os.environ, "RUNS": str(tmp_path), "DATA_DIR": str(DATA), "HF_HUB_OFFLINE": "1"}
    runs = tmp_path / "smoke"
    # STOP_AFTER: the pipeline up to a stage, then the rest picks up from there
    part = subprocess.run(["bash", "launch.sh", "smoke"], cwd=ROOT, env={**env, "STOP_AFTER": "train"},
                          capture_output=True, text=True, timeout=900)
    assert part.returncode == 0 and "stopping after train" in part.stdout, part.stderr[-2000:]
    assert (runs / "small/final/config.json").exists() and not (runs / "calibration.train.jsonl").exists()
    first = subprocess.run(["bash", "launch.sh", "smoke"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "done: " + str(runs / "large/final") in first.stdout
    for path in ("tokenizer/tokenizer.json", "large/final/config.json", "small/final/config.json",
                 "calibration.train.jsonl", "calibration.valid.jsonl", "small_aligned/final/config.json",
                 "eval/report.md", "sweep/report.md", "sweep/frontier.png"):
        assert (runs / path).exists(), path
    results = json.loads((runs / "eval" / "results.json").read_text())
    names = {r["system"] for r in results["rows"]}
    assert {"large", "small (aligned)", "BiLD (aligned)", "assisted generation (unaligned)"} <= names
    assert "| large |" in first.stdout  # the report is printed last
    # a new user's next command: no --config evaluates the run's own models on its data (runs/latest/eval.yaml)
    again = subprocess.run(["python3", "-m", "decode.eval", "--aligned", "systems=[large,bild]"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (runs / "eval_again" / "report.md").is_file() and (tmp_path / "latest").resolve() == runs.resolve()

    second = subprocess.run(["bash", "launch.sh", "smoke"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout.count("done:") >= 8


def test_launch_rejects_unknown_profile_and_stage():
    out = subprocess.run(["bash", "launch.sh", "huge"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "DATA_DIR": str(DATA)})
    assert out.returncode == 2 and "usage" in out.stderr
    out = subprocess.run(["bash", "launch.sh", "smoke"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "DATA_DIR": str(DATA), "STOP_AFTER": "sweep"})
    assert out.returncode == 2 and "STOP_AFTER must be" in out.stderr


@pytest.mark.slow
@pytest.mark.skipif(not (DATA / "multi30k").is_dir(), reason="needs ../shared/data/multi30k beside the checkout")
def test_objective_comparison_after_the_smoke_pipeline(tmp_path):
    """scripts/compare_objectives.sh after the pipeline's calibration: on-policy data, the four alignments at the
    same time (seq_kd included), each tuned and evaluated greedy and sampling, a table."""
    env = {**os.environ, "RUNS": str(tmp_path), "DATA_DIR": str(DATA), "HF_HUB_OFFLINE": "1"}
    part = subprocess.run(["bash", "launch.sh", "smoke"], cwd=ROOT, env={**env, "STOP_AFTER": "calibrate"},
                          capture_output=True, text=True, timeout=900)
    assert part.returncode == 0 and "stopping after calibrate" in part.stdout, part.stderr[-2000:]
    out = subprocess.run(["bash", "scripts/compare_objectives.sh", "smoke"], cwd=ROOT, env={**env, "PARALLEL_ALIGN": "1"},
                         capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    runs = tmp_path / "smoke"
    records = [json.loads(line) for line in (runs / "onpolicy.train.jsonl").read_text().splitlines()]
    provenance = json.loads((runs / "onpolicy.train.jsonl.provenance.json").read_text())
    assert len(records) == 300 and "small" in json.dumps(provenance)  # the small model's own outputs
    assert (runs / "small_aligned/final/config.json").is_file() and (runs / "align_seq_kd.log").is_file()
    for name in ("seq_kd", "token_kd_fkl", "token_kd_jsd", "onpolicy_jsd"):
        assert (runs / "objectives" / name / "results.json").is_file()
        sampled = json.loads((runs / "objectives" / f"{name}.sample" / "results.json").read_text())
        assert sampled["config"]["do_sample"] and {r["system"] for r in sampled["rows"]} == {"large", "BiLD lossless (exact rollback)"}
        assert f"| {name} |" in out.stdout and "not run" not in out.stdout
