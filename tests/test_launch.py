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
    labels = [line.split()[2] for line in (part.stdout + first.stdout).splitlines() if line.startswith("=== [smoke]")]
    assert labels == [f"{i}/7" for i in range(1, 3)] + [f"{i}/7" for i in range(1, 8)], labels
    # a new user's next command: no --config evaluates the run's own models on its data (runs/latest/eval.yaml)
    again = subprocess.run(["python3", "-m", "decode.eval", "--aligned", "systems=[large,bild]"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (runs / "eval_again" / "report.md").is_file() and (tmp_path / "latest").resolve() == runs.resolve()

    # the README's Decoding example, as written, from a folder whose runs/ is this run's
    example = (ROOT / "README.md").read_text().split("## Decoding")[1].split("```python\n")[1].split("```")[0]
    (tmp_path / "here").mkdir()
    (tmp_path / "here" / "runs").symlink_to(tmp_path)
    shown = subprocess.run(["python3", "-c", example], cwd=tmp_path / "here", env={**env, "PYTHONPATH": str(ROOT)},
                           capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr[-2000:]
    tuned, lossless = shown.stdout.splitlines()
    assert tuned.startswith("['") and lossless.startswith("['")
    # the lossless line is the large model's own greedy translation
    from transformers import AutoTokenizer

    from decode import Greedy
    from decode.loading import load_model

    tok = AutoTokenizer.from_pretrained(runs / "large" / "final")
    enc = tok(["Ein Mann fährt Fahrrad."], return_tensors="pt")
    greedy = Greedy(load_model(str(runs / "large" / "final"))).generate(enc.input_ids, enc.attention_mask, max_new_tokens=64)
    assert lossless.startswith(repr(tok.batch_decode(greedy.sequences, skip_special_tokens=True))), lossless

    second = subprocess.run(["bash", "launch.sh", "smoke"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout.count("done:") >= 8

    # the same run folder with other data is refused, not skipped over, and runs/latest stays where it was
    other = tmp_path / "other_data"
    (other / "multi30k").mkdir(parents=True)
    for f in (DATA / "multi30k").glob("*.s*"):
        (other / "multi30k" / f.name).write_bytes(f.read_bytes())
    (tmp_path / "latest").unlink()
    changed = subprocess.run(["bash", "launch.sh", "smoke"], cwd=ROOT, env={**env, "DATA_DIR": str(other)},
                             capture_output=True, text=True, timeout=120)
    assert changed.returncode == 2 and "was made from other inputs" in changed.stderr, changed.stderr[-2000:]
    assert not (tmp_path / "latest").exists()


def test_launch_fetches_multi30k_where_the_data_is_absent(tmp_path):
    """No multi30k/ in DATA_DIR: the data comes from the Hub (a local stand-in here); unreachable, a clear error and
    runs/latest untouched."""
    from test_fetch import standin

    env = {**os.environ, "RUNS": str(tmp_path / "runs"), "DATA_DIR": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "cache"), "STOP_AFTER": "train"}
    failed = subprocess.run(["bash", "launch.sh", "smoke"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**env, "MULTI30K_HUB": str(tmp_path / "nowhere")})
    assert failed.returncode == 2 and "no Multi30k data" in failed.stderr, failed.stderr[-2000:]
    assert not (tmp_path / "runs" / "latest").exists() and not (tmp_path / "data" / "multi30k").exists()
    out = subprocess.run(["bash", "launch.sh", "smoke"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**env, "MULTI30K_HUB": str(standin(tmp_path, n=(80, 12, 12)))})
    assert out.returncode == 0 and "fetching it from the Hugging Face Hub" in out.stdout, out.stderr[-2000:]
    assert (tmp_path / "data" / "multi30k" / "valid.tgt").read_text().count("\n") == 12
    assert (tmp_path / "runs" / "smoke" / "small" / "final" / "config.json").is_file()
    assert (tmp_path / "runs" / "latest").resolve() == (tmp_path / "runs" / "smoke").resolve()


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
