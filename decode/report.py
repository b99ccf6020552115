"""What an evaluation's results say: the speed-quality frontier and the paper's operating points over a sweep, the
report's tables (the main one first), report.md, frontier.png, and writing them all or nothing."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

# each system's row name; with --aligned, its aligned variant adds " (aligned)", and BiLD's and assisted rows " (unaligned)"
ROW_LABELS = {"large": "large", "hf_generate": "large (transformers generate)", "small": "small", "bild": "BiLD",
              "bild_exact": "BiLD lossless (exact rollback)", "assisted": "assisted generation",
              "bild_fallback_only": "BiLD fallback only (no rollback)",
              "bild_rollback_only": "BiLD rollback only (no confidence fallback)"}

# --------------------------------------------------------------------------------------------------


def pareto_frontier(rows: list[dict], metric: str, higher_is_better: bool = True) -> list[dict]:
    """Rows no other row beats on both speed and quality, fastest first."""
    sign = 1 if higher_is_better else -1
    frontier, best = [], -float("inf")
    for row in sorted(rows, key=lambda r: (-r["speedup_vs_large"], -sign * r[metric])):
        if sign * row[metric] > best:
            frontier.append(row)
            best = sign * row[metric]
    return frontier


def within(rows: list[dict], metric: str, reference: float, tolerance: float, higher_is_better=True) -> list[dict]:
    """The rows whose score is within `tolerance` of the reference (at least reference - tolerance, or at most
    reference + tolerance where lower is better)."""
    return [r for r in rows if (r[metric] >= reference - tolerance if higher_is_better else
                                r[metric] <= reference + tolerance)]


def operating_points(rows: list[dict], metric: str, reference: float, tolerances=(0.1, 1.0), higher_is_better=True) -> dict:
    """For each tolerance, the fastest row whose score is within it of the reference (None if no row is)."""
    points = {}
    for tol in tolerances:
        ok = within(rows, metric, reference, tol, higher_is_better)
        points[f"within_{tol:g}"] = max(ok, key=lambda r: r["speedup_vs_large"]) if ok else None
    return points



# --------------------------------------------------------------------------------------------------
# Tables and files



def _f(v, digits=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _interval(v) -> str:
    """"-0.38 [-1.32, +0.54]" from [difference, low, high]."""
    return "-" if v is None else f"{v[0]:+.2f} [{v[1]:+.2f}, {v[2]:+.2f}]"


def _spread(values, say_passes: bool = True) -> str:
    """" (min-max over N passes)" of per-pass speedups (" (min-max)" without say_passes), or nothing with one pass."""
    if not values or len(values) < 2:
        return ""
    return f" ({min(values):.2f}-{max(values):.2f}" + (f" over {len(values)} passes)" if say_passes else ")")


def table(results: dict) -> str:
    m = results["metric"]
    extra = "chrf" if results["config"]["task"] == "translation" else ("rouge2" if results["config"]["task"] == "summarization" else None)
    interval = any("bleu_vs_large" in r for r in results["rows"])
    head = ["system", m] + ([extra] if extra else []) + (["BLEU vs large [95% paired bootstrap]"] if interval else []) + [
                                                          "identical to large", "median ms/example", "tokens/s",
                                                          "speedup vs large", "speedup vs assisted", "fallback rate",
                                                          "rollback rate", "tokens/large call", "path"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results["rows"]:
        if "error" in r:
            lines.append(f"| {r['system']} | failed: {r['error']} |" + " |" * (len(head) - 2))
            continue
        if "unsupported" in r:
            lines.append(f"| {r['system']} | not supported: {r['unsupported']} |" + " |" * (len(head) - 2))
            continue
        cells = [r["system"], _f(r.get(m))] + ([_f(r.get(extra))] if extra else []) + (
            [_interval(r.get("bleu_vs_large"))] if interval else []) + [
            _f(r.get("identical_to_large")), _f(r.get("latency_median_ms"), 1), _f(r.get("tokens_per_s"), 1),
            _f(r.get("speedup_vs_large")) + "x" + _spread(r.get("speedup_passes")), (_f(r.get("speedup_vs_assisted")) + "x") if "speedup_vs_assisted" in r else "-",
            _f(r.get("fallback_rate"), 3), _f(r.get("rollback_rate"), 3), _f(r.get("tokens_per_large_call")),
            r.get("path", "-")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main_table(results: dict) -> str:
    """The table a reader looks at first: quality and its interval against the large model, latency, speedup (with
    its range over the timed passes, where there are several), and tokens per large-model call."""
    m = results["metric"]
    interval = any("bleu_vs_large" in r for r in results["rows"])
    head = ["system", m] + (["vs large [95% CI]"] if interval else []) + ["ms/example", "speedup vs large",
                                                                          "tokens/large call"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results["rows"]:
        if "error" in r or "unsupported" in r:
            lines.append(f"| {r['system']} | {'failed' if 'error' in r else 'not supported'} (below) |" + " |" * (len(head) - 2))
            continue
        cells = [r["system"], _f(r.get(m))] + ([_interval(r.get("bleu_vs_large"))] if interval else []) + [
            _f(r.get("latency_median_ms"), 1), _f(r.get("speedup_vs_large")) + "x" + _spread(r.get("speedup_passes"), False),
            _f(r.get("tokens_per_large_call"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


SPEEDUP_NOTE = ("Speedup: the large model's total decoding time over the system's, on the same examples, so one slow "
                "example weighs in; ms/example is the median, so a row can show a lower median than the large model "
                "and a speedup under 1.")
CPU_NOTE = ("On a CPU: this run shows the pipeline end to end and the method's behaviour at small scale; the speed of "
            "the method at the shapes it is meant for is measured on GPUs (BENCHMARKS.md).")


def alignment_note(results: dict) -> str:
    """Alignment read where it is clean (greedy runs with both lossless rows): those rows write the large model's own
    tokens, so their times differ by the small models' speed alone, where the lossy rows differ in what they write too.
    "" otherwise."""
    rows = {r["system"]: r for r in results["rows"] if "error" not in r and "unsupported" not in r}
    aligned, unaligned = (rows.get(f"{ROW_LABELS['bild_exact']} ({v})") for v in ("aligned", "unaligned"))
    if aligned is None or unaligned is None or results["config"].get("do_sample"):
        return ""
    same = min(aligned.get("identical_to_large", 1.0), unaligned.get("identical_to_large", 1.0))
    note = ("Alignment: the lossless rows write the large model's own tokens"
            + (f" ({100 * same:.0f}% of examples identical here, floating point aside)" if same < 1 else "")
            + ", so they compare the small models' speed alone: aligned "
            f"{_f(aligned['speedup_vs_large'])}x against unaligned {_f(unaligned['speedup_vs_large'])}x, "
            f"{_f(aligned.get('tokens_per_large_call'))} against {_f(unaligned.get('tokens_per_large_call'))} tokens per "
            "large call.")
    lossy = [rows.get(f"{ROW_LABELS['bild']} ({v})") for v in ("aligned", "unaligned")]
    if all(lossy):
        note += (f" The lossy rows differ in what they write as well ({lossy[0]['new_tokens']} against "
                 f"{lossy[1]['new_tokens']} tokens).")
    return note


def throughput_table(results: dict) -> str:
    """Tokens per second by batch size: every system against the large model at the same batch size."""
    m = results["metric"]
    lines = [f"| batch | system | {m} | identical to large (batch 1) | tokens/s | speedup vs large, same batch | "
             "tokens/large call | rows per large pass | path |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results["throughput"]:
        spread = _spread(r.get("speedup_passes"), False)
        lines.append(f"| {r['batch_size']} | {r['base']} | {_f(r.get(m))} | {_f(r['identical_to_large'])} | "
                     f"{_f(r['tokens_per_s'], 0)} | {_f(r['speedup_vs_large_same_batch'])}x{spread} | "
                     f"{_f(r.get('tokens_per_large_call'))} | {_f(r.get('rows_per_large_pass'))} | {r['path']} |")
    return "\n".join(lines)


def sweep_table(results: dict) -> str:
    m = results["metric"]
    points = results["operating_points"]
    lines = [f"Large model on the sweep examples: {m} {_f(points.get('large_score_on_sweep_examples'))}", "",
             f"| model | operating point | fallback | rollback | {m} | speedup vs large | fallback rate | rollback rate | tokens/large call |",
             "|---|---|---|---|---|---|---|---|---|"]
    by_name = {r["system"]: r for r in results["sweep"]}
    labels = results.get("variant_labels", {})
    for variant in [v for v in points if v != "large_score_on_sweep_examples"]:
        label = labels.get(variant, {"small": "unaligned", "aligned": "aligned"}.get(variant, variant))
        for key, name in (points.get(variant) or {}).items():
            r = by_name.get(name)
            if r is None:
                lines.append(f"| {label} | {key} | none | | | | | | |")
                continue
            lines.append(f"| {label} | {key.replace('_', ' ')} | {r['fallback_threshold']:g} | "
                         f"{r['rollback_threshold']:g} | {_f(r[m])} | {_f(r['speedup_vs_large'])}x | {_f(r['fallback_rate'], 3)} | "
                         f"{_f(r['rollback_rate'], 3)} | {_f(r['tokens_per_large_call'])} |")
    return "\n".join(lines)


def _tuned_note(results: dict) -> str:
    """Which rows ran at tuned thresholds instead of the config's (decode.tune), read from the rows."""
    cfg_cap = results["config"]["max_small_steps"]
    tuned = sorted({f"{r['system']} at fallback {r['fallback_threshold']:g}, rollback "
                    f"{r['rollback_threshold']:g}, max small steps {r.get('max_small_steps', cfg_cap)} "
                    f"({r['thresholds_tuned_on']})"
                    for r in results["rows"] if r.get("thresholds_tuned_on") and r.get("rollback_threshold") is not None})
    return ("; tuned points instead: " + "; ".join(tuned)) if tuned else ""


def report(results: dict) -> str:
    cfg = results["config"]
    parts = [
        f"# BiLD evaluation: {cfg['dataset']} ({cfg['split']}, {results['examples']} examples)",
        "",
        f"- large: `{cfg['large']}`; small: `{cfg['small']}`" + (f"; aligned: `{results['aligned']}`" if results["aligned"] else ""),
        f"- device: {results['device']}; dtype {results['dtype']}; batch size {cfg.get('batch_size', 1)}, "
        + (f"warm-up {cfg['warmup']} examples and the longest input per system" if cfg["warmup"] else "no warm-up")
        + (" (one batch at larger batch sizes)" if cfg.get("throughput_batch_sizes") and cfg["warmup"] else "")
        + (f"; {cfg['repeats']} timed passes per row, interleaved: speedups are the median of the per-pass speedups, "
           "their range in brackets; latencies are per-example medians" if cfg.get("repeats", 1) > 1 else ""),
        f"- BiLD thresholds: fallback {cfg['fallback_threshold']}, rollback {cfg['rollback_threshold']}, max small steps "
        f"{cfg['max_small_steps']}" + _tuned_note(results)
        + {None: "", True: "; device draft loop at every batch size (device_loop=true)",
           False: "; device draft loop off (device_loop=false)"}[cfg.get("device_loop")]
        + ("; passes compiled (compile=true)" if cfg.get("compile") else ""),
        ("- decoding: sampling, temperature {temperature}, top-k {top_k}, top-p {top_p}, seed {seed} (lossless rows are "
         "speculative sampling: distributed as the large model's sampling, not identical to it)".format(**cfg)
         if cfg.get("do_sample") else "- decoding: greedy"),
        f"- inputs truncated to {cfg['max_source_length']} tokens: {results['truncated_inputs']}",
        f"- {results['date']}; git {results['git_commit']}; " + ", ".join(f"{k} {v}" for k, v in results["versions"].items() if v),
        "",
        main_table(results),
        "",
        SPEEDUP_NOTE + (" " + CPU_NOTE if str(results["device"]).startswith("cpu") else ""),
        "",
        *([note, ""] if (note := alignment_note(results)) else []),
        "## All columns",
        "",
        table(results),
    ]
    if results.get("throughput"):
        parts += ["", "## Throughput by batch size", "", throughput_table(results)]
    if results["sweep"]:
        parts += ["", "## Threshold sweep: the paper's operating points", "", sweep_table(results), "",
                  "![speed-quality frontier](frontier.png)"]
    return "\n".join(parts) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = results["metric"]
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = results.get("variant_labels", {})
    colors = iter(["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive"])
    for variant in results["frontier"]:
        rows = [r for r in results["sweep"] if r["model"] == variant]
        if not rows:
            continue
        color = next(colors, "tab:gray")
        ax.scatter([r["speedup_vs_large"] for r in rows], [r[m] for r in rows], s=12, color=color, alpha=0.5)
        front = [r for r in rows if r["system"] in results["frontier"][variant]]
        ax.plot([r["speedup_vs_large"] for r in front], [r[m] for r in front], "-o", color=color, ms=4,
                label=f"BiLD {labels.get(variant, variant)}")
    ref = results["operating_points"].get("large_score_on_sweep_examples")
    if ref is not None:
        ax.axhline(ref, color="gray", ls="--", lw=1, label="large model")
    ax.set_xlabel("speedup over the large model")
    ax.set_ylabel(m)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(results: dict, out: Path) -> None:
    """All files are made in a temporary folder and moved in at the end: a failed run leaves nothing half-written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".eval-", dir=out.parent))
    try:
        (tmp / "results.json").write_text(json.dumps(results, indent=2, default=str))
        (tmp / "report.md").write_text(report(results))
        if results["sweep"]:
            plot(results, tmp / "frontier.png")
        out.mkdir(parents=True, exist_ok=True)
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
