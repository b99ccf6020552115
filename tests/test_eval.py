import json

import pytest
import sacrebleu
import yaml
from rouge_score import rouge_scorer

from decode.eval import main
from decode.report import operating_points, pareto_frontier
from decode.metrics import summarization_scores, translation_scores


@pytest.fixture
def eval_config(toy_data, toy_models, tmp_path):
    cfg = {"task": "translation", "large": toy_models["large"], "small": toy_models["small"],
           "aligned": toy_models["small"], "dataset": str(toy_data), "split": "test", "max_new_tokens": 16,
           "warmup": 1, "sweep_fallback": [0.2, 0.6], "sweep_rollback": [1.0, 4.0], "sweep_limit": 4}
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_end_to_end_writes_every_output(eval_config, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--config", str(eval_config), "--aligned", "--sweep", "--limit", "6", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    names = [r["system"] for r in results["rows"]]
    for expected in ("large", "large (transformers generate)", "small", "small (aligned)", "BiLD (unaligned)",
                     "BiLD (aligned)", "BiLD lossless (exact rollback) (unaligned)", "BiLD lossless (exact rollback) (aligned)",
                     "assisted generation (unaligned)", "assisted generation (aligned)"):
        assert expected in names
    rows = {r["system"]: r for r in results["rows"]}
    assert rows["large"]["identical_to_large"] == 1.0 and rows["large"]["speedup_vs_large"] == pytest.approx(1.0)
    # lossless BiLD and assisted generation reproduce the large model exactly
    assert rows["BiLD lossless (exact rollback) (unaligned)"]["identical_to_large"] == 1.0
    assert rows["assisted generation (unaligned)"]["identical_to_large"] == 1.0
    assert rows["large (transformers generate)"]["identical_to_large"] == 1.0
    assert all("bleu" in r and "chrf" in r for r in results["rows"])
    assert len(results["sweep"]) == 2 * 2 * 2
    assert set(results["operating_points"]) >= {"small", "aligned", "large_score_on_sweep_examples"}
    assert results["device"] and results["versions"]["torch"] and results["examples"] == 6
    # every row but the large model's: its BLEU difference to the large model and a 95% interval around it
    assert "bleu_vs_large" not in rows["large"]
    for r in results["rows"]:
        if r["system"] != "large":
            diff, low, high = r["bleu_vs_large"]
            assert low <= high and abs(diff - (r["bleu"] - rows["large"]["bleu"])) < 1e-9
    report = (out / "report.md").read_text()
    assert "BiLD (aligned)" in report and "operating point" in report and "95% paired bootstrap" in report
    # first the short table (6 columns), the line on how speedup is computed, on a CPU where the GPU figures are
    short = next(b for b in report.split("\n\n") if b.startswith("| system |")).splitlines()
    assert short[0] == "| system | bleu | vs large [95% CI] | ms/example | speedup vs large | tokens/large call |"
    assert len(short) == 2 + len(results["rows"]) and "Speedup: the large model's total decoding time" in report
    assert ("BENCHMARKS.md" in report) == results["device"].startswith("cpu") and "## All columns" in report
    # alignment read on the lossless rows, which write the same tokens: the figures are the rows' own
    lossless = [rows[f"BiLD lossless (exact rollback) ({v})"] for v in ("aligned", "unaligned")]
    assert [r["identical_to_large"] for r in lossless] == [1.0, 1.0]
    assert (f"aligned {lossless[0]['speedup_vs_large']:.2f}x against unaligned {lossless[1]['speedup_vs_large']:.2f}x"
            in report)
    # speedup over assisted generation only on BiLD's rows
    assert "speedup_vs_assisted" not in rows["large"] and "speedup_vs_assisted" in rows["BiLD (aligned)"]
    assert (out / "frontier.png").stat().st_size > 1000
    assert "speedup vs large" in capsys.readouterr().out


def test_bleu_and_rouge_wrappers_agree_with_the_libraries():
    hyps = ["A man rides a horse.", "Two dogs play in the snow", "the cat"]
    refs = ["A man is riding a horse.", "Two dogs are playing in snow.", "A cat sleeps."]
    s = translation_scores(hyps, refs)
    assert s["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert s["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    r = summarization_scores(hyps, refs)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = 100 * sum(scorer.score(ref, hyp)["rougeL"].fmeasure for hyp, ref in zip(hyps, refs)) / 3
    assert r["rougeL"] == pytest.approx(expected)


def test_bleu_difference_is_sacrebleus_and_its_interval_widens_with_fewer_sentences():
    """bleu_difference: the corpus BLEU difference exactly as sacrebleu scores both systems; 0 with a zero-width
    interval for identical outputs; a better system's interval above 0 on many sentences, wider on fewer."""
    import sacrebleu

    from decode.metrics import bleu_difference

    refs = [f"a man number {i} rides a brown horse on the beach today" for i in range(200)]
    good = [f"a man number {i} rides a brown horse on the beach" for i in range(200)]
    poor = [f"man {i} rides horse at beach" if i % 2 else f"a man number {i} rides a horse" for i in range(200)]
    diff, low, high = bleu_difference(good, poor, refs, samples=200)
    expected = sacrebleu.corpus_bleu(good, [refs]).score - sacrebleu.corpus_bleu(poor, [refs]).score
    assert diff == pytest.approx(expected) and 0 < low <= diff <= high
    assert bleu_difference(poor, poor, refs, samples=50) == (0.0, 0.0, 0.0)
    _, low_few, high_few = bleu_difference(good[:20], poor[:20], refs[:20], samples=200)
    assert high_few - low_few > high - low


def test_frontier_and_operating_points_on_hand_made_rows():
    rows = [
        {"system": "a", "speedup_vs_large": 2.0, "bleu": 30.0},
        {"system": "b", "speedup_vs_large": 1.8, "bleu": 34.95},
        {"system": "c", "speedup_vs_large": 1.5, "bleu": 35.0},
        {"system": "d", "speedup_vs_large": 1.4, "bleu": 34.0},  # dominated by b and c
        {"system": "e", "speedup_vs_large": 1.9, "bleu": 34.1},
    ]
    assert [r["system"] for r in pareto_frontier(rows, "bleu")] == ["a", "e", "b", "c"]
    points = operating_points(rows, "bleu", reference=35.02)
    assert points["within_0.1"]["system"] == "b"
    assert points["within_1"]["system"] == "e"
    assert operating_points(rows, "bleu", reference=40.0)["within_1"] is None
    # perplexity: lower is better
    ppl = [{"system": "x", "speedup_vs_large": 2.0, "perplexity": 12.0}, {"system": "y", "speedup_vs_large": 1.2, "perplexity": 10.05}]
    assert operating_points(ppl, "perplexity", 10.0, higher_is_better=False)["within_0.1"]["system"] == "y"
    assert [r["system"] for r in pareto_frontier(ppl, "perplexity", higher_is_better=False)] == ["x", "y"]


@pytest.mark.parametrize(
    "args,overrides,match",
    [
        (["--aligned", "/nonexistent/aligned"], [], "aligned checkpoint not found"),
        ([], ["task=poetry"], "unknown task"),
        ([], ["no_such_key=1"], "unknown config key"),
        ([], ["split=missing"], "no split"),
        ([], ["systems=[large, magic]"], "unknown system"),
        ([], ["fallback_threshold=2"], "fallback_threshold"),
        ([], ["large=runs/nowhere/large/final"], "model not found: runs/nowhere/large/final"),
        ([], ["small=./missing_small"], "model not found: ./missing_small"),
    ],
)
def test_bad_input_fails_cleanly(eval_config, tmp_path, capsys, args, overrides, match):
    out = tmp_path / "bad"
    assert main(["--config", str(eval_config), "--out", str(out), *args, *overrides]) == 2
    assert match in capsys.readouterr().err
    assert not out.exists()


def test_empty_split_fails_cleanly(eval_config, toy_data, tmp_path, capsys):
    (toy_data / "empty.src").write_text("")
    (toy_data / "empty.tgt").write_text("")
    out = tmp_path / "bad"
    assert main(["--config", str(eval_config), "--out", str(out), "split=empty"]) == 2
    assert "empty" in capsys.readouterr().err and not out.exists()


def test_truncated_inputs_are_counted(eval_config, tmp_path):
    out = tmp_path / "t"
    assert main(["--config", str(eval_config), "--limit", "3", "--out", str(out), "max_source_length=4",
                 "systems=[large]", "warmup=0"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["truncated_inputs"] == 3


def test_bleu_and_rouge_wrappers_give_known_scores():
    same = ["a man rides a red horse", "two dogs play in the snow"]
    s = translation_scores(same, same)
    assert s["bleu"] == pytest.approx(100.0) and s["chrf"] == pytest.approx(100.0)
    assert translation_scores(["xyz qqq www vvv"], ["a man rides a horse"])["bleu"] == pytest.approx(0.0)
    # ROUGE-L by hand: LCS("the cat sat", "the cat sat on the mat") = 3, P = 3/3, R = 3/6, F = 2PR / (P + R) = 2/3
    assert summarization_scores(["the cat sat"], ["the cat sat on the mat"])["rougeL"] == pytest.approx(200 / 3)


def test_a_failed_transformers_baseline_is_reported_and_keeps_the_other_rows(eval_config, tmp_path, monkeypatch, capsys):
    """transformers' own baselines may fail in a transformers release (assisted generation did in 5.25): the row
    says why, the run warns and still counts as done (the project's own rows failing is exit 1: below)."""
    import decode.eval

    def broken(*args, **kwargs):
        raise RuntimeError("assistant exploded")

    monkeypatch.setattr(decode.eval, "AssistedGeneration", broken)
    out = tmp_path / "failed"
    assert main(["--config", str(eval_config), "--limit", "3", "--out", str(out), "systems=[large,assisted]"]) == 0
    rows = {r["system"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert "assistant exploded" in rows["assisted generation"]["error"] and rows["large"]["bleu"] >= 0
    assert "warning: 1 system(s) failed: assisted generation" in capsys.readouterr().err


def test_aligned_rows_use_the_aligned_thresholds(eval_config, tmp_path):
    out = tmp_path / "aligned"
    assert main(["--config", str(eval_config), "--aligned", "--limit", "2", "--out", str(out), "systems=[bild,bild_exact]",
                 "aligned_fallback_threshold=0.9", "aligned_rollback_threshold=7.0"]) == 0
    rows = {r["system"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert rows["BiLD (aligned)"]["fallback_threshold"] == 0.9 and rows["BiLD (aligned)"]["rollback_threshold"] == 7.0
    assert rows["BiLD lossless (exact rollback) (aligned)"]["fallback_threshold"] == 0.9
    assert rows["BiLD (unaligned)"]["fallback_threshold"] == 0.5
    assert all(r["path"] == "fast (static cache, no graphs)" for r in rows.values())  # on a CPU: the compact passes


def test_ablation_rows_switch_one_policy_off(eval_config, tmp_path):
    out = tmp_path / "ablation"
    assert main(["--config", str(eval_config), "--limit", "4", "--out", str(out), "fallback_threshold=0.6",
                 "rollback_threshold=1.0", "systems=[bild,bild_fallback_only,bild_rollback_only]"]) == 0
    rows = {r["system"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    full, fb_only, rb_only = rows["BiLD"], rows["BiLD fallback only (no rollback)"], rows["BiLD rollback only (no confidence fallback)"]
    assert fb_only["stats"]["rollbacks"] == 0 and fb_only["rollback_threshold"] == float("inf")
    assert rb_only["stats"]["fallbacks"] == 0 and rb_only["fallback_threshold"] == 0.0
    assert full["stats"]["fallbacks"] > 0  # the toy pair is unsure often enough for the ablations to differ


def test_tuning_picks_the_fastest_point_within_budget_and_everything_uses_it(eval_config, toy_models, tmp_path, capsys,
                                                                             monkeypatch):
    import shutil

    from decode import BiLD
    from decode.thresholds import THRESHOLDS_FILE
    from decode.tune import main as tune_main

    aligned = tmp_path / "aligned"
    shutil.copytree(toy_models["small"], aligned)
    assert tune_main(["--config", str(eval_config), "--limit", "6", "split=test"]) == 2  # never the test split
    assert "never `test`" in capsys.readouterr().err
    # the step cap in the grid (null: none), speed measured in calls of 2 rows, two timed passes per point
    assert tune_main(["--config", str(eval_config), "--aligned", str(aligned), "--limit", "4", "--budget", "100",
                      "sweep_max_small_steps=[2, null]", "batch_size=2", "repeats=2"]) == 0
    record = json.loads((aligned / THRESHOLDS_FILE).read_text())
    assert record["split"] == "valid" and record["budget"] == 100 and len(record["grid"]) == 8
    for point in record["grid"]:  # the median of two passes is their mean
        assert len(point["speedup_passes"]) == 2
        assert point["speedup_vs_large"] == pytest.approx(sum(point["speedup_passes"]) / 2)
    assert record["batch_size"] == 2 and {r["max_small_steps"] for r in record["grid"]} == {2, None}
    # only the points within the budget (here: said to be the grid's first two) are timed again, and one is chosen
    import decode.report
    import decode.tune

    plain = tmp_path / "plain"
    shutil.copytree(toy_models["small"], plain)
    with monkeypatch.context() as patched:
        for module in (decode.tune, decode.report):
            patched.setattr(module, "within", lambda rows, *args: rows[:2])
        assert tune_main(["--config", str(eval_config), f"small={plain}", "--limit", "4", "repeats=3"]) == 0
    tight = json.loads((plain / THRESHOLDS_FILE).read_text())
    assert [len(r["speedup_passes"]) for r in tight["grid"]] == [3, 3] + [1] * (len(tight["grid"]) - 2)
    first_two = [(r["fallback_threshold"], r["rollback_threshold"]) for r in tight["grid"][:2]]
    assert (tight["fallback_threshold"], tight["rollback_threshold"]) in first_two
    # within a budget of 100 BLEU every point qualifies: the choice is the fastest of the grid
    fastest = max(record["grid"], key=lambda r: r["speedup_vs_large"])
    point = ("fallback_threshold", "rollback_threshold", "max_small_steps")
    assert [record[k] for k in point] == [fastest[k] for k in point]
    bild = BiLD.from_pretrained(toy_models["large"], str(aligned))
    assert (bild.config.fallback_threshold, bild.config.rollback_threshold, bild.config.max_small_steps) == \
        tuple(record[k] for k in point)
    assert BiLD.from_pretrained(toy_models["large"], toy_models["small"]).config.fallback_threshold == 0.5  # defaults
    out = tmp_path / "eval"
    assert main(["--config", str(eval_config), "--aligned", str(aligned), "--limit", "2", "--out", str(out),
                 "systems=[bild]"]) == 0
    rows = {r["system"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert rows["BiLD (aligned)"]["fallback_threshold"] == record["fallback_threshold"]
    assert rows["BiLD (aligned)"]["max_small_steps"] == record["max_small_steps"]
    assert rows["BiLD (aligned)"]["thresholds_tuned_on"].startswith("valid")
    assert "thresholds_tuned_on" not in rows["BiLD (unaligned)"]
    assert "tuned points instead: BiLD (aligned) at fallback" in (out / "report.md").read_text()
    from align.publish import model_card

    assert "tuned on" in model_card(aligned, "you/aligned") and "split `valid`" in model_card(aligned, "you/aligned")


def test_early_exit_rows_sweep_and_unsupported_baseline(eval_config, toy_models, tmp_path, capsys):
    import torch
    from transformers import AutoModelForSeq2SeqLM

    from decode.early_exit import ExitHead

    ckpt = tmp_path / "exit_run" / "final"  # a trained exit: the large model with a head saved beside it
    model = AutoModelForSeq2SeqLM.from_pretrained(toy_models["large"])
    model.save_pretrained(ckpt)
    head = ExitHead(model, 1)
    with torch.no_grad():
        head.adapter[-1].weight.normal_(0, 0.3)
    head.save(ckpt, mode="frozen")
    out = tmp_path / "exit"
    assert main(["--config", str(eval_config), "--sweep", "--limit", "4", "--out", str(out), "exit_layers=[1]",
                 f"exit_checkpoints=[{ckpt}]", "systems=[early_exit,early_exit_exact,hf_early_exit]"]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = {r["system"]: r for r in results["rows"]}
    untrained, trained = "exit after layer 1, untrained", "exit after layer 1, trained frozen: exit_run"
    for name in (untrained, trained):
        assert rows[f"BiLD early exit lossless ({name})"]["identical_to_large"] == 1.0
        lossy = rows[f"BiLD early exit ({name})"]
        assert lossy["exit_layer"] == 1 and lossy["path"].startswith("early exit after layer 1 of 2")
        assert lossy["stats"]["small_steps"] > 0
    assert "does not read" in rows["transformers assistant_early_exit=1"]["unsupported"]
    assert {r["model"] for r in results["sweep"]} == {"small", "exit1", "exit_ckpt0"}
    report = (out / "report.md").read_text()
    assert "not supported" in report and f"early exit ({trained})" in report
    # an exit layer the large model does not have: a clear error before decoding
    assert main(["--config", str(eval_config), "--limit", "2", "--out", str(tmp_path / "bad"), "exit_layers=[2]",
                 "systems=[early_exit]"]) == 2
    assert "exit_layer must be an integer from 1 to 1" in capsys.readouterr().err
    out = tmp_path / "exit_only"
    assert main(["--config", str(eval_config), "--sweep", "--limit", "3", "--out", str(out), "exit_layers=[1]",
                 "systems=[early_exit]", "sweep_models=[exit1]"]) == 0
    assert {r["model"] for r in json.loads((out / "results.json").read_text())["sweep"]} == {"exit1"}


def test_sampling_rows(eval_config, tmp_path):
    out = tmp_path / "sampled"
    args = ["--config", str(eval_config), "--limit", "4", "--out", str(out), "do_sample=true", "temperature=0.8",
            "systems=[large,small,bild_exact]", "fallback_threshold=0.4"]
    assert main(args) == 0
    first = json.loads((out / "results.json").read_text())
    rows = {r["system"]: r for r in first["rows"]}
    assert rows["BiLD lossless (exact rollback)"]["stats"]["large_calls"] > 0
    assert "sampling, temperature 0.8" in (out / "report.md").read_text()
    assert main(args) == 0  # seeded per example: the same samples again
    assert json.loads((out / "results.json").read_text())["hypotheses"] == first["hypotheses"]
    # the CE rollback has no sampling analogue: that row fails, and says why
    assert main(["--config", str(eval_config), "--limit", "2", "--out", str(tmp_path / "ce"), "do_sample=true",
                 "systems=[bild]"]) == 1


def test_batch_size_and_throughput_table(eval_config, tmp_path, monkeypatch):
    """Rows per call change nothing in what is decoded (the fast path without graphs on a CPU); the throughput
    table has the large model and each BiLD row at every batch size, against the large model at the same size."""
    base = ["--config", str(eval_config), "--limit", "5", "fast_path=true", "systems=[large,small,bild,bild_exact]"]
    assert main([*base, "--out", str(tmp_path / "b1")]) == 0
    assert main([*base, "--out", str(tmp_path / "b2"), "batch_size=2", "throughput_batch_sizes=[1,3]"]) == 0
    assert main([*base, "--out", str(tmp_path / "b3"), "batch_size=3"]) == 0
    one, two, three = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("b1", "b2", "b3"))
    assert one["hypotheses"] == two["hypotheses"] == three["hypotheses"]
    assert all("compactions" in r["stats"] for r in three["rows"] if "stats" in r)
    assert [r["batch_size"] for r in two["rows"]] == [2] * 4
    tp = two["throughput"]
    assert [(r["batch_size"], r["base"]) for r in tp] == [
        (b, name) for b in (1, 3) for name in ("large", "BiLD", "BiLD lossless (exact rollback)")]
    for r in tp:
        assert r["examples"] == 5 and r["tokens_per_s"] > 0
        assert ("decoded together" in r["path"]) == (r["batch_size"] > 1)
        assert r["bleu"] == next(x for x in two["rows"] if x["system"] == r["base"])["bleu"]  # the same outputs
    assert all(r["identical_to_large"] == 1.0 for r in tp if r["base"] != "BiLD")
    assert all(r["speedup_vs_large_same_batch"] == pytest.approx(1.0) for r in tp if r["base"] == "large")
    assert "## Throughput by batch size" in (tmp_path / "b2" / "report.md").read_text()
    # sampling: rows decoded together too, BiLD's lossless row only (the rejection rule)
    sampled = [*base[:-1], "systems=[large,bild_exact]", "do_sample=true", "throughput_batch_sizes=[4]"]
    assert main([*sampled, "--out", str(tmp_path / "bad"), "throughput_systems=[bild]"]) == 2
    assert main([*sampled, "--out", str(tmp_path / "s"), "throughput_systems=[bild_exact]", "batch_size=2"]) == 0
    tp = json.loads((tmp_path / "s" / "results.json").read_text())["throughput"]
    assert [(r["batch_size"], r["base"]) for r in tp] == [(4, "large"), (4, "BiLD lossless (exact rollback)")]
    assert all("decoded together" in r["path"] and r["tokens_per_s"] > 0 for r in tp)


def test_repeats_interleave_passes_and_report_their_spread(eval_config, tmp_path):
    out = tmp_path / "repeats"
    assert main(["--config", str(eval_config), "--limit", "3", "--out", str(out), "systems=[large,bild]", "repeats=3"]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = {r["system"]: r for r in results["rows"]}
    for row in rows.values():
        assert len(row["pass_seconds"]) == 3 and len(row["speedup_passes"]) == 3
        assert "outputs_changed_between_passes" not in row  # greedy: every pass decodes the same tokens
        # the row's time is the median pass; its speedup the median of the per-pass speedups, inside their range
        assert row["total_seconds"] == sorted(row["pass_seconds"])[1]
        assert row["speedup_vs_large"] == sorted(row["speedup_passes"])[1]
    assert rows["large"]["speedup_passes"] == pytest.approx([1.0] * 3)
    report = (out / "report.md").read_text()
    assert "3 timed passes per row" in report and "over 3 passes" in report
    # the short table too: each row's median speedup and its range
    short = next(b for b in report.split("\n\n") if b.startswith("| system |")).splitlines()
    bild = rows["BiLD"]
    low, high = min(bild["speedup_passes"]), max(bild["speedup_passes"])
    assert any(line.startswith("| BiLD |") and f"{bild['speedup_vs_large']:.2f}x ({low:.2f}-{high:.2f}) |" in line
               for line in short), short
    assert main(["--config", str(eval_config), "--out", str(tmp_path / "bad"), "repeats=0"]) == 2
    # the throughput table too: interleaved passes per batch size, the median pass, the median speedup
    tp_out = tmp_path / "tp"
    assert main(["--config", str(eval_config), "--limit", "3", "--out", str(tp_out), "systems=[large,bild]", "repeats=3",
                 "fast_path=true", "throughput_batch_sizes=[2]", "throughput_systems=[bild]"]) == 0
    tp = json.loads((tp_out / "results.json").read_text())["throughput"]
    assert [r["base"] for r in tp] == ["large", "BiLD"]
    for row in tp:
        assert row["total_seconds"] == sorted(row["pass_seconds"])[1]
        assert row["speedup_vs_large_same_batch"] == sorted(row["speedup_passes"])[1]
    assert tp[0]["speedup_passes"] == pytest.approx([1.0] * 3)


def test_the_warm_up_decodes_the_first_examples_and_the_longest_input():
    from decode.timing import warmup_chunks

    indices, lengths = [4, 5, 6, 7, 8], [3, 9, 2, 30, 5]
    assert warmup_chunks(indices, lengths, warmup=2, batch_size=1) == [[4], [5], [7]]
    assert warmup_chunks(indices, lengths, warmup=2, batch_size=2) == [[4, 5], [7, 4]]
    assert warmup_chunks(indices, lengths, warmup=4, batch_size=1) == [[4], [5], [6], [7]]  # already among them
    assert warmup_chunks(indices, lengths, warmup=0, batch_size=1) == []
