"""Threshold tuning: the fastest (fallback, rollback) point within a quality budget of the large model, found
on a validation split and written beside the small model's checkpoint.

    python -m decode.tune --config configs/multi30k_eval.yaml --aligned [PATH] [--budget 0.1] [split=valid] [key=value ...]

Operating points do not carry over between model pairs (on a real 0.5B/1.5B pair the demo pair's best
point lost 11.5 BLEU), so each pair needs its own. This decodes the split with the large model alone, then
with BiLD at every point of the config's grid (`sweep_fallback` x `sweep_rollback`, `max_small_steps`),
on the path that will run them (the fast path on CUDA), and keeps the fastest point whose score is within
`--budget` of the large model's (BLEU or ROUGE-L points; perplexity: within that much, lower is better).
`sweep_max_small_steps=[4,10]` adds the step cap to the grid. The speed is measured at the config's
`batch_size` (against the large model at the same batch size): tune at the batch size you will serve
(`batch_size=16`), since the fastest point of batch 1 is not the fastest of a batch, whose every round lasts as
long as its longest draft. `repeats=3` times the points within the budget three times, interleaved with the large
model, and ranks them by their median speedup (one pass by default: on the GPU, points within about 10% of each
other are then not told apart; on 2 CPU cores one pass picked a different point in different runs of the same
models).

Exit status 3 when no point is within the budget (nothing is written). Writes `<small model>/bild_thresholds.json` (the point, the budget, split, dataset, scores, speedup,
device, date). `BiLD.from_pretrained` and `decode.eval` use it when no thresholds are given. The test
split is refused: a point chosen on test would flatter the test score.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from tqdm.auto import tqdm

from data.config import ConfigError, load_config
from decode.eval import Evaluation, environment
from decode.eval_config import EvalConfig
from decode.report import operating_points, within
from decode.thresholds import save_tuned

NONE_WITHIN_BUDGET = 3  # exit status when no grid point is good enough (./launch.sh then keeps the defaults)


class NoPointWithinBudget(ValueError):
    pass


def tune(cfg, small_key: str, budget: float) -> dict:
    """Decodes cfg.split with the large model and every grid point; returns the chosen point's record. With
    cfg.repeats > 1, the points within the budget (the only ones that can be chosen) are timed again, each pass
    interleaved with the large model, and ranked by their median speedup."""
    ev = Evaluation(cfg, cfg.aligned if small_key == "aligned" else None)
    indices = list(range(len(ev.examples)))
    caps = cfg.sweep_max_small_steps or [cfg.max_small_steps]
    grid = [(fb, rb, cap) for fb in cfg.sweep_fallback for rb in cfg.sweep_rollback for cap in caps]
    progress = tqdm(total=len(indices) * (len(grid) + 1), desc="decode.tune", unit="ex")

    def large_pass() -> float:  # seconds
        return ev.run("large", ev.decoder("large"), indices, progress)["total_seconds"]

    def point_pass(fb, rb, cap) -> dict:  # one pass of a grid point over the split: its row, the point in it
        decoder = ev.decoder("bild", small_key, fb, rb, cap)
        row = ev.run(f"fb={fb:g} rb={rb:g} cap={cap}", decoder, indices, progress)
        return {**row, "fallback_threshold": fb, "rollback_threshold": rb, "max_small_steps": cap, "path": decoder.path}

    large_seconds = [large_pass()]
    rows = []
    for point in grid:  # the first pass decodes and scores every point
        row = point_pass(*point)
        rows.append({**ev.finish_row(row, indices), "pass_seconds": [row["total_seconds"]]})
    large_score = ev.quality(ev.outputs["large"], indices)[ev.metric]
    candidates = within(rows, ev.metric, large_score, budget, ev.higher_is_better)
    if len(candidates) > 1 and cfg.repeats > 1:
        progress.total += len(indices) * (len(candidates) + 1) * (cfg.repeats - 1)
        for _ in range(cfg.repeats - 1):  # interleaved passes: the large model, then every candidate
            large_seconds.append(large_pass())
            for row in candidates:
                point = (row["fallback_threshold"], row["rollback_threshold"], row["max_small_steps"])
                row["pass_seconds"].append(point_pass(*point)["total_seconds"])
    progress.close()
    for row in rows:  # each pass's speedup against the large model's pass just before it; the median
        row["speedup_passes"] = [a / b for a, b in zip(large_seconds, row["pass_seconds"])]
        row["speedup_vs_large"] = statistics.median(row["speedup_passes"])
    best = operating_points(rows, ev.metric, large_score, tolerances=(budget,), higher_is_better=ev.higher_is_better)
    best = best[f"within_{budget:g}"]
    if best is None:
        raise NoPointWithinBudget(f"no grid point is within {budget} {ev.metric} of the large model "
                                  f"({large_score:.2f} on {cfg.split}); widen the grid or the budget")
    return {
        "fallback_threshold": best["fallback_threshold"], "rollback_threshold": best["rollback_threshold"],
        "max_small_steps": best["max_small_steps"], "batch_size": cfg.batch_size, "budget": budget, "metric": ev.metric,
        "score": best[ev.metric], "large_score": large_score, "speedup_vs_large": best["speedup_vs_large"],
        "tokens_per_large_call": best.get("tokens_per_large_call"), "path": best.get("path"),
        "dataset": cfg.dataset, "split": cfg.split, "examples": len(indices), "large": cfg.large,
        "repeats": cfg.repeats,
        "grid": [{k: r[k] for k in ("fallback_threshold", "rollback_threshold", "max_small_steps", ev.metric,
                                    "speedup_vs_large", "speedup_passes")} for r in rows],
        **{k: v for k, v in environment().items() if k in ("device", "date", "git_commit")},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Tune BiLD's thresholds on a validation split.")
    parser.add_argument("--config", required=True, help="YAML file of EvalConfig fields (models, data, grid)")
    parser.add_argument("--aligned", nargs="?", const="", default=None,
                        help="tune for the aligned small model (PATH, or the config's `aligned`); default: `small`")
    parser.add_argument("--budget", type=float, default=0.1, help="quality budget against the large model (default 0.1)")
    parser.add_argument("--limit", type=int, help="only the first N examples of the split")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (split=valid is the default)")
    args = parser.parse_intermixed_args(argv)
    try:
        overrides = ["split=valid", *args.overrides]
        if args.aligned:
            overrides.append(f"aligned={args.aligned}")
        if args.limit is not None:
            overrides.append(f"limit={args.limit}")
        cfg = load_config(EvalConfig, args.config, overrides)
        if cfg.split == "test":
            raise ValueError("tuning reads a validation split, never `test` (pass split=valid or another)")
        if args.budget < 0:
            raise ValueError(f"--budget must be >= 0, got {args.budget}")
        small_key = "aligned" if args.aligned is not None else "small"
        target = cfg.aligned if small_key == "aligned" else cfg.small
        if not target or not Path(target).is_dir():
            raise FileNotFoundError(f"the small model to tune for must be a local folder, got {target!r}")
        record = tune(cfg, small_key, args.budget)
    except NoPointWithinBudget as exc:
        print(f"error: {exc}; nothing written", file=sys.stderr)
        return NONE_WITHIN_BUDGET
    except (ConfigError, ValueError, FileNotFoundError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    path = save_tuned(target, record)
    print(f"fallback_threshold={record['fallback_threshold']:g} rollback_threshold={record['rollback_threshold']:g} "
          f"max_small_steps={record['max_small_steps']} at batch size {record['batch_size']}: "
          f"{record['metric']} {record['score']:.2f} (large {record['large_score']:.2f}), "
          f"{record['speedup_vs_large']:.2f}x on {record['split']} ({record['examples']} examples); wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
