"""How the evaluation times its rows (decode/eval.py's `Evaluation` runs them): the untimed warm-up, repeated
interleaved passes of the main table and their per-pass speedups, the throughput table by batch size, and the
thresholds each row runs at.
`ev` is always that Evaluation (not imported here: the evaluation imports this module)."""

from __future__ import annotations

import statistics

from decode.eval_config import BILD_ROWS


def warmup_chunks(indices: list[int], lengths: list[int], warmup: int, batch_size: int) -> list[list[int]]:
    """The untimed calls before a system's timed pass (none when warmup is 0): kernels, allocator, caches and the
    graphs of this batch size warm up on the first `warmup` examples one at a time (the first batch, in batches), then
    on the longest input where it is not among them, since a long prompt takes a pass that short ones do not (the
    compiled passes trace it there, not while timed). lengths: each index's input length."""
    if not warmup:
        return []
    first = indices[:warmup] if batch_size == 1 else indices[:batch_size]
    chunks = [[i] for i in first] if batch_size == 1 else [first]
    longest = indices[max(range(len(indices)), key=lengths.__getitem__)]
    if longest not in first:
        chunks.append([longest] + first[: batch_size - 1])
    return chunks


def repeat_passes(ev, rows: list[dict], plan, indices: list[int], progress) -> None:
    """Passes 2..repeats of the main table, every row once per pass. Each example's latency becomes its median
    over the passes (latency columns, sweep and throughput subsets); a row keeps every pass's total
    (`pass_seconds`), their median as its total, and whether its outputs stayed the same."""
    if ev.cfg.repeats == 1:
        return
    by_name = {r["system"]: r for r in rows if "error" not in r and "unsupported" not in r}
    passes = {name: [ev.latencies[name]] for name in by_name}
    first = {name: ev.outputs[name] for name in by_name}
    for _ in range(ev.cfg.repeats - 1):
        for name, system, small_key in plan:
            if name not in by_name:
                continue
            fb, rb, tuned = row_thresholds(ev, system, small_key)
            again = ev.run(name, ev.decoder(system, small_key, fb, rb, tuned_cap(tuned)), indices, progress)
            passes[name].append(ev.latencies[name])
            by_name[name]["new_tokens"] = again["new_tokens"]
            if ev.outputs[name] != first[name]:
                by_name[name]["outputs_changed_between_passes"] = True
            ev.outputs[name] = first[name]
    for name, row in by_name.items():
        medians = [statistics.median(x) for x in zip(*passes[name])]
        ev.latencies[name] = medians
        totals = [sum(x) for x in passes[name]]
        total = statistics.median(totals)
        row.update(total_seconds=total, latency_median_ms=1000 * statistics.median(medians),
                   latency_mean_ms=1000 * total / len(medians), tokens_per_s=row["new_tokens"] / total if total else float("nan"),
                   pass_seconds=totals)


def repeat_spread(rows: list[dict]) -> None:
    """With repeats: each row's speedup over the large model pass by pass (pass i of the row against pass i of the
    large model, run just before it); the row's speedup is their median, so it lies within the range reported."""
    large = next((r for r in rows if r["system"] == "large"), None)
    if large is None or "pass_seconds" not in large:
        return
    for row in rows:
        if "pass_seconds" in row:
            row["speedup_passes"] = [a / b for a, b in zip(large["pass_seconds"], row["pass_seconds"])]
            row["speedup_vs_large"] = statistics.median(row["speedup_passes"])


def decoder_path(decoder, batch: int) -> str:
    """The decoder's path, and with several rows per call whether they decode together."""
    if batch == 1:
        return decoder.path
    blocker = decoder._batch_blocker()
    return f"{decoder.path}; {batch} rows per call " + ("decoded together" if blocker is None else f"row after row ({blocker})")


def row_thresholds(ev, system: str, small_key: str):
    """(fallback, rollback, tuned record) of a row: tuned thresholds where the small model has them, else the
    config's (None: the decoder's default for that row)."""
    cfg = ev.cfg
    fb = rb = None
    if small_key == "aligned":  # both BiLD rows; the lossless one has no rollback threshold to use
        fb, rb = cfg.aligned_fallback_threshold, cfg.aligned_rollback_threshold
    tuned = ev.tuned.get(small_key) if system in BILD_ROWS else None
    if tuned:
        fb, rb = tuned["fallback_threshold"], tuned["rollback_threshold"]
    return fb, rb, tuned


def tuned_cap(tuned: dict | None):
    """The step cap of a tuned point (None: no cap), or ... (the config's) where nothing was tuned."""
    return tuned["max_small_steps"] if tuned and "max_small_steps" in tuned else ...


def throughput_rows(ev, plan, indices, progress) -> list[dict]:
    """The throughput table: every batch size, the large model first, `repeats` interleaved passes. A row is its
    median pass (by total time); its speedup is the median of the per-pass speedups, each against the large
    model's pass at the same batch size just before it (`speedup_passes`, `pass_seconds`)."""
    passes = [[throughput_row(ev, name, system, small_key, b, indices, progress)
               for b in ev.cfg.throughput_batch_sizes for name, system, small_key in plan]
              for _ in range(ev.cfg.repeats)]
    if len(passes) == 1:
        return passes[0]
    rows = []
    for runs in zip(*passes):  # one (batch size, system) over the passes
        totals = [r["total_seconds"] for r in runs]
        row = dict(sorted(runs, key=lambda r: r["total_seconds"])[len(runs) // 2])
        row.update(pass_seconds=totals, speedup_passes=[r["speedup_vs_large_same_batch"] for r in runs])
        row["speedup_vs_large_same_batch"] = statistics.median(row["speedup_passes"])
        if any(r[ev.metric] != runs[0][ev.metric] for r in runs):
            row["outputs_changed_between_passes"] = True
        rows.append(row)
    return rows


def throughput_row(ev, name: str, system: str, small_key: str, batch: int, indices, progress) -> dict:
    """One row of the throughput table: `system` over `indices` in calls of `batch` rows, against the large
    model at the same batch size (decoded first) and, for agreement, the large model's batch-1 outputs."""
    fb, rb, tuned = row_thresholds(ev, system, small_key)
    decoder = ev.decoder(system, small_key, fb, rb, tuned_cap(tuned))
    row = ev.run(f"{name} @ batch {batch}", decoder, indices, progress, batch)
    outputs = ev.outputs[row["system"]]
    row.update(ev.quality(outputs, indices), base=name, path=decoder_path(decoder, batch))
    row["identical_to_large"] = sum(o == ev.outputs["large"][i] for o, i in zip(outputs, indices)) / len(indices)
    large_time = sum(ev.latencies[f"large @ batch {batch}"])  # the large row's name is always "large" (_names)
    row["speedup_vs_large_same_batch"] = large_time / row["total_seconds"] if row["total_seconds"] else float("nan")
    if system in BILD_ROWS:
        row.update(thresholds_of(decoder))
    return row


def thresholds_of(decoder, step_cap: bool = True) -> dict:
    """The thresholds a BiLD or early-exit row decoded at, as its table shows them (exact mode: no rollback
    threshold), and with `step_cap` its step cap."""
    c = decoder.config
    out = {"fallback_threshold": c.fallback_threshold,
           "rollback_threshold": c.rollback_threshold if c.rollback == "ce" else None}
    return {**out, "max_small_steps": c.max_small_steps} if step_cap else out
