"""The paper's comparison on your own pair and data: quality, latency and speedup, with and without alignment.

    python -m decode.eval --aligned                     # after ./launch.sh: its run's models and data
    python -m decode.eval --config configs/multi30k_eval.yaml --aligned [PATH] [--sweep] [--limit N] [--out DIR] [key=value ...]

Systems, every one on the same examples, greedy, same precision, one process, `batch_size` rows per generate
call (1 by default: the paper's setting):
- large: the large model alone, through the same cache machinery as BiLD (the speedup reference);
- large (transformers generate): the same model through `model.generate`, to compare machinery;
- small, and with --aligned the aligned small model alone;
- BiLD (unaligned) at the configured thresholds, its lossless variant (rollback="exact"), and with
  --aligned both again with the aligned small model;
- transformers assisted generation with each small model (the outside baseline);
- on request (`systems=[...]`), the paper's ablations at the same thresholds: BiLD with fallback only (no
  rollback) and with rollback only (no confidence fallback; the step cap still hands over);
- on request, early exit (the paper's RQ4, decode/early_exit.py): `early_exit` and `early_exit_exact` rows
  for the large model exiting after each of `exit_layers` with its own head (untrained), and for each
  trained exit in `exit_checkpoints` (align/train.py objective=early_exit); `hf_early_exit`: transformers'
  `generate(assistant_early_exit=k)` for each of `exit_layers`, or a row saying the architecture is not
  supported there.
Each system decodes `warmup` examples first, untimed; every latency is read with the device synchronised.
`throughput_batch_sizes` adds a throughput table: tokens per second of the large model alone and of the BiLD
rows in `throughput_systems`, at each batch size, on the same examples (decode/batch.py decodes a batch together).
--sweep adds a grid over fallback x rollback thresholds, the speed-quality frontier, and the paper's
operating points (the fastest setting within 0.1 and within 1 point of the large model's score).

Writes to --out: results.json (every row, resolved config, device, library versions, git commit),
report.md (paper-style tables) and frontier.png (with --sweep). Nothing is written if the run fails.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from tqdm.auto import tqdm

from data.config import ConfigError, load_config, to_dict
from data.sources import load_examples
from decode.baselines import AssistedGeneration, Greedy, HFEarlyExit, HFGenerate, hf_early_exit_unsupported
from decode.bild import BiLD, BiLDConfig
from decode.loading import check_model_location, load_model, resolve_dtype
from decode.early_exit import EarlyExitBiLD, check_exit_layer, find_exit_head
from decode.generation import DecodeStats
from decode.thresholds import load_tuned
from decode.timing import (decoder_path, repeat_passes, repeat_spread, row_thresholds, thresholds_of, throughput_rows,
                           tuned_cap, warmup_chunks)
from decode.eval_config import BILD_ROWS, EXIT_ROWS, EvalConfig
from decode.metrics import TASKS, bleu_difference, continuation_perplexity, score
from decode.report import (ROW_LABELS, operating_points, pareto_frontier, sweep_table, table, throughput_table,
                           write_outputs)

LAST_RUN = os.path.join(os.environ.get("RUNS", "runs"), "latest", "eval.yaml")  # ./launch.sh writes it for its run


# --------------------------------------------------------------------------------------------------
# The systems, decoded, timed and scored (the config: decode/eval_config.py; the report: decode/report.py)


def environment() -> dict:
    import accelerate
    import transformers

    versions = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
                "accelerate": accelerate.__version__}
    for name in ("sacrebleu", "rouge_score", "peft", "datasets"):
        try:
            versions[name] = __import__(name).__version__
        except (ImportError, AttributeError):
            versions[name] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip()
        commit = commit if len(commit) == 40 else None  # a copy without git history has none
    except (OSError, subprocess.SubprocessError):
        commit = None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {"device": device, "versions": versions, "git_commit": commit, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


class Evaluation:
    def __init__(self, cfg: EvalConfig, aligned: str | None):
        from transformers import AutoTokenizer


        self.cfg = cfg
        self.higher_is_better = TASKS[cfg.task][1]
        self.metric = TASKS[cfg.task][0]
        device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                              ("cpu" if cfg.device == "auto" else cfg.device))
        dtype = resolve_dtype(cfg.dtype, device)
        self.device, self.dtype = device, str(dtype).removeprefix("torch.")
        for name in (cfg.large, cfg.small, aligned, cfg.tokenizer):
            if name:
                check_model_location(name)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.large)
        self.examples, self.inputs, self.truncated, self.references = self._load_inputs()
        self.models = {"large": load_model(cfg.large, dtype=dtype, device=device),
                       "small": load_model(cfg.small, dtype=dtype, device=device)}
        if aligned:
            self.models["aligned"] = load_model(aligned, dtype=dtype, device=device)

        paths = {"small": cfg.small, "aligned": aligned}
        self.tuned = {k: load_tuned(p) for k, p in paths.items() if p and cfg.use_tuned}
        self.exits = self._load_exits(dtype, device)
        if cfg.task == "lm" and self.models["large"].config.is_encoder_decoder:
            raise ValueError("task lm needs decoder-only models")
        self.outputs: dict[str, list[list[int]]] = {}
        self.latencies: dict[str, list[float]] = {}

    def _load_exits(self, dtype, device) -> dict:
        """The early-exit variants: key -> (model key, exit layer, exit head folder or None, row label)."""

        cfg = self.cfg
        if not any(s in cfg.systems for s in EXIT_ROWS) and "hf_early_exit" not in cfg.systems:
            return {}
        exits = {}
        for k in cfg.exit_layers:
            check_exit_layer(self.models["large"], k)  # a clear error before anything decodes
            exits[f"exit{k}"] = ("large", k, None, f"exit after layer {k}, untrained")
        for i, folder in enumerate(cfg.exit_checkpoints):
            info = find_exit_head(folder)
            if info is None:
                raise FileNotFoundError(f"exit checkpoint {folder} has no exit_head.json (align/train.py objective=early_exit)")
            key = f"exit_ckpt{i}"
            self.models[key] = load_model(folder, dtype=dtype, device=device)
            exits[key] = (key, int(info["exit_layer"]), folder,
                          f"exit after layer {info['exit_layer']}, trained {info.get('mode', '?')}: {Path(folder).parent.name}")
        return exits

    def _load_inputs(self):
        cfg, tok = self.cfg, self.tokenizer
        examples = load_examples(cfg.dataset, cfg.split, None, cfg.source_field, cfg.target_field)
        inputs, truncated, references, kept = [], 0, [], []
        for ex in examples:
            if cfg.task == "lm":
                ids = tok(ex.source, add_special_tokens=False)["input_ids"]
                if len(ids) < cfg.lm_prompt_tokens + 8:
                    continue  # too short to continue
                inputs.append(ids[: cfg.lm_prompt_tokens])
                references.append(tok.decode(ids[cfg.lm_prompt_tokens :]))
            else:
                if ex.target is None:
                    raise ValueError(f"{cfg.dataset} split {cfg.split} has no references (targets) to score against")
                ids, cut = cfg.encode(tok, ex.source)
                inputs.append(ids)
                truncated += int(cut)
                references.append(ex.target)
            kept.append(ex)
            if cfg.limit is not None and len(kept) >= cfg.limit:
                break
        if not kept:
            raise ValueError(f"split {cfg.split!r} of {cfg.dataset!r} gave no usable examples")
        return kept, inputs, truncated, references

    def decoder(self, system: str, small_key: str = "small", fallback=None, rollback=None, cap=...):
        """The decoder of a row. cap: BiLD's max_small_steps (None: no cap; default: the config's)."""
        cfg = self.cfg
        if system in EXIT_ROWS:
            model_key, layer, head, _ = self.exits[small_key]
            settings = dict(fallback_threshold=_first(fallback, cfg.exit_fallback_threshold, cfg.fallback_threshold),
                            rollback_threshold=_first(rollback, cfg.exit_rollback_threshold, cfg.rollback_threshold),
                            max_small_steps=cfg.max_small_steps, fast_path=cfg.fast_path, device_loop=cfg.device_loop,
                            compile=cfg.compile)
            return EarlyExitBiLD(self.models[model_key], layer, BiLDConfig(**{**settings, **EXIT_ROWS[system]}), exit_head=head)
        if system == "hf_early_exit":
            return HFEarlyExit(self.models["large"], self.exits[small_key][1])
        large, small = self.models["large"], self.models[small_key]
        if system == "large":
            return Greedy(large, cfg.fast_path, cfg.device_loop, cfg.compile)
        if system == "hf_generate":
            return HFGenerate(large)
        if system == "small":
            return Greedy(small, cfg.fast_path, cfg.device_loop, cfg.compile)
        if system == "assisted":
            return AssistedGeneration(large, small)
        if system in BILD_ROWS:
            settings = dict(fallback_threshold=cfg.fallback_threshold if fallback is None else fallback,
                            rollback_threshold=cfg.rollback_threshold if rollback is None else rollback,
                            max_small_steps=cfg.max_small_steps if cap is ... else cap, fast_path=cfg.fast_path,
                            device_loop=cfg.device_loop, compile=cfg.compile)
            return BiLD(large, small, BiLDConfig(**{**settings, **BILD_ROWS[system]}))
        raise ValueError(system)

    def batch(self, indices: list[int], left_pad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids and attention_mask of these examples, padded (on the left for decoder-only models, as
        `generate` expects)."""
        width = max(len(self.inputs[i]) for i in indices)
        ids = torch.full((len(indices), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(indices):
            n = len(self.inputs[i])
            cols = slice(width - n, width) if left_pad else slice(0, n)
            ids[row, cols] = torch.tensor(self.inputs[i])
            mask[row, cols] = 1
        return ids, mask

    def run(self, name: str, decoder, indices: list[int], progress, batch_size: int | None = None) -> dict:
        """Decodes the examples, `batch_size` rows per generate call (default: the config's); returns the row
        (quality filled in later). A row's latency is its call's time over the rows in the call."""

        batch_size = batch_size or self.cfg.batch_size
        left_pad = not decoder.is_encoder_decoder

        def generate(chunk):
            ids, mask = self.batch(chunk, left_pad)
            return decoder.generate(ids, mask, max_new_tokens=self.cfg.max_new_tokens, **self._sampling(decoder, chunk[0]))

        for chunk in warmup_chunks(indices, [len(self.inputs[i]) for i in indices], self.cfg.warmup, batch_size):
            generate(chunk)  # untimed
        stats, outputs, latencies = DecodeStats(), [], []
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            out = generate(chunk)
            first_new = out.sequences.shape[1] - max(out.new_lengths)  # both layouts end with the new tokens
            for row, length in enumerate(out.new_lengths):
                outputs.append(out.sequences[row, first_new : first_new + length].tolist())
            latencies += [out.stats.seconds / len(chunk)] * len(chunk)
            stats.add(out.stats)
            progress.update(len(chunk))
        self.outputs[name] = outputs
        self.latencies[name] = latencies
        total = sum(latencies)
        row = {"system": name, "examples": len(indices), "batch_size": batch_size, "new_tokens": stats.new_tokens,
               "total_seconds": total, "latency_median_ms": 1000 * statistics.median(latencies),
               "latency_mean_ms": 1000 * total / len(latencies),
               "tokens_per_s": stats.new_tokens / total if total else float("nan")}
        if stats.small_steps:
            row.update(fallback_rate=stats.fallback_rate, rollback_rate=stats.rollback_rate,
                       tokens_per_large_call=stats.tokens_per_large_call, rows_per_large_pass=stats.rows_per_large_pass,
                       small_share=stats.small_tokens / max(stats.new_tokens, 1), stats=stats.as_dict())
        return row

    def _sampling(self, decoder, i: int) -> dict:
        """generate()'s sampling arguments for example i: a generator seeded by (seed, i), so every row draws
        the same random numbers for the same example (transformers generate: its global RNG, seeded alike)."""
        cfg = self.cfg
        if not cfg.do_sample:
            return {}

        kwargs = dict(do_sample=True, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
        if isinstance(decoder, HFGenerate):
            torch.manual_seed(cfg.seed + i)
            return kwargs
        return {**kwargs, "generator": torch.Generator(self.device).manual_seed(cfg.seed + i)}

    def quality(self, outputs: list[list[int]], indices: list[int]) -> dict:
        if self.cfg.task == "lm":
            return continuation_perplexity(self.models["large"], [self.inputs[i] for i in indices], outputs)
        return score(self.cfg.task, self._texts(outputs), [self.references[i] for i in indices])

    def _texts(self, outputs: list[list[int]]) -> list[str]:
        eos = set(self.tokenizer.all_special_ids)
        return [self.tokenizer.decode([t for t in o if t not in eos], skip_special_tokens=True).strip() for o in outputs]

    def bleu_against_large(self, row: dict, indices: list[int]) -> dict:
        """Translation rows: BLEU minus the large model's on the same examples, with its 95% paired bootstrap interval
        (`bleu_vs_large`: [difference, low, high]); how far the test set can tell the two apart."""
        if self.cfg.task == "translation" and row["system"] != "large":
            row["bleu_vs_large"] = list(bleu_difference(
                self._texts(self.outputs[row["system"]]), self._texts([self.outputs["large"][i] for i in indices]),
                [self.references[i] for i in indices]))
        return row

    def finish_row(self, row: dict, indices: list[int]) -> dict:
        """Quality, and agreement and speed against the large model on the same examples.
        The large model always decodes every example, in order, so example i is its row i."""
        outputs = self.outputs[row["system"]]
        row.update(self.quality(outputs, indices))
        large_outputs, large_latencies = self.outputs["large"], self.latencies["large"]
        row["identical_to_large"] = sum(o == large_outputs[i] for o, i in zip(outputs, indices)) / len(indices)
        large_time = sum(large_latencies[i] for i in indices)
        row["speedup_vs_large"] = large_time / row["total_seconds"] if row["total_seconds"] else float("nan")
        return row


def _first(*values):
    return next(v for v in values if v is not None)


# the rows that run transformers' own generate (row names start so)
TRANSFORMERS_ROWS = (ROW_LABELS["hf_generate"], ROW_LABELS["assisted"], "transformers assistant_early_exit")


def _names(systems: list[str], aligned: bool, exits: dict | None = None) -> list[tuple[str, str, str]]:
    """(row name, system, small model key) for every row of the main table."""
    rows = []
    for system in systems:
        if system in EXIT_ROWS or system == "hf_early_exit":
            for key, (_, layer, head, name) in (exits or {}).items():
                if system == "hf_early_exit":
                    if head is None:
                        rows.append((f"transformers assistant_early_exit={layer}", system, key))
                else:
                    rows.append((f"BiLD early exit{' lossless' if system == 'early_exit_exact' else ''} ({name})", system, key))
            continue
        rows.append((ROW_LABELS[system] + (" (unaligned)" if aligned and (system in BILD_ROWS or system == "assisted") else ""),
                     system, "small"))
        if aligned and (system in BILD_ROWS or system in ("small", "assisted")):
            rows.append((ROW_LABELS[system] + " (aligned)", system, "aligned"))
    return rows


def evaluate(cfg: EvalConfig, aligned: str | None = None, sweep: bool = False, on_main_table=None) -> dict:
    """Runs every row (and the sweep); `on_main_table(results)` is called once the main table is done, before
    the sweep, so that a long sweep interrupted loses only itself."""

    ev = Evaluation(cfg, aligned)
    n = len(ev.examples)
    all_idx = list(range(n))
    plan = _names(cfg.systems, aligned is not None, ev.exits)
    sweep_idx = all_idx[: cfg.sweep_limit] if cfg.sweep_limit else all_idx
    variants = ["small"] + (["aligned"] if aligned else [])
    if "early_exit" in cfg.systems:
        variants += list(ev.exits)  # early exits on the same grid
    if cfg.sweep_models is not None:
        unknown = [v for v in cfg.sweep_models if v not in variants]
        if unknown:
            raise ValueError(f"sweep_models {unknown} are not among this run's models: {', '.join(variants)}")
        variants = list(cfg.sweep_models)
    sweep_points = len(cfg.sweep_fallback) * len(cfg.sweep_rollback) * len(variants) if sweep else 0
    tp_idx = all_idx[: cfg.throughput_limit] if cfg.throughput_limit else all_idx
    tp_plan = [p for p in plan if p[1] == "large"] + [p for p in plan if p[1] in cfg.throughput_systems]
    tp_work = len(tp_idx) * len(tp_plan) * len(cfg.throughput_batch_sizes) * cfg.repeats
    progress = tqdm(total=n * len(plan) * cfg.repeats + tp_work + len(sweep_idx) * sweep_points, desc="decode.eval",
                    unit="ex")

    rows = [_main_row(ev, name, system, small_key, all_idx, progress) for name, system, small_key in plan]
    repeat_passes(ev, rows, plan, all_idx, progress)
    for row in rows:
        if "error" not in row and "unsupported" not in row:
            ev.bleu_against_large(ev.finish_row(row, all_idx), all_idx)
    repeat_spread(rows)
    _speedups_vs_assisted(rows)

    throughput = throughput_rows(ev, tp_plan, tp_idx, progress)
    for name in list(ev.outputs):
        if " @ batch " in name:
            del ev.outputs[name]

    sweep_rows, frontier, points = [], {}, {}
    if on_main_table is not None:
        on_main_table(_results(cfg, aligned, ev, rows, sweep_rows, frontier, points, throughput))
    if sweep:
        sweep_rows, frontier, points = _sweep(ev, variants, sweep_idx, progress)
    progress.close()
    for name in list(ev.outputs):
        if name.startswith("sweep"):
            del ev.outputs[name]
    return _results(cfg, aligned, ev, rows, sweep_rows, frontier, points, throughput)


def _main_row(ev: Evaluation, name: str, system: str, small_key: str, indices: list[int], progress) -> dict:
    """One row of the main table, decoded over `indices`: its timings and counts, the path it took and the thresholds
    it ran at; a baseline that crashes gives a row that says so (the large model's crash is raised), and transformers'
    early exit where it does not cover the architecture a row that says that."""
    fb, rb, tuned = row_thresholds(ev, system, small_key)
    start = progress.n
    if system == "hf_early_exit":
        why = hf_early_exit_unsupported(ev.models["large"])
        if why is not None:  # said in the table, not an error: transformers does not offer it here
            progress.update(len(indices))
            return {"system": name, "unsupported": why}
    try:
        decoder = ev.decoder(system, small_key, fb, rb, tuned_cap(tuned))
        row = ev.run(name, decoder, indices, progress)
    except Exception as exc:  # a baseline that crashes is reported as such, never dropped; main() exits 1
        if system == "large":
            raise
        print(f"error: system {name!r} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        progress.update(len(indices) - (progress.n - start))
        return {"system": name, "error": f"{type(exc).__name__}: {exc}"}
    row["path"] = decoder_path(decoder, ev.cfg.batch_size)
    if system in EXIT_ROWS:
        row["exit_layer"] = decoder.exit_layer
        row.update(thresholds_of(decoder, step_cap=False))
    if system in BILD_ROWS:
        if tuned:
            row["thresholds_tuned_on"] = (f"{tuned['split']} at batch size {tuned.get('batch_size', 1)} (budget "
                                          f"{tuned['budget']:g} {tuned['metric']})")
        row.update(thresholds_of(decoder))
    return row


def _speedups_vs_assisted(rows: list[dict]) -> None:
    """BiLD's rows against transformers' assisted generation with the same small model (their outside baseline; the
    other rows have none)."""
    assisted = {r["system"]: r for r in rows if r["system"].startswith("assisted") and "error" not in r}
    for row in rows:
        if "error" in row or "unsupported" in row or "fallback_threshold" not in row:
            continue
        match = [a for a in assisted.values() if ("(aligned)" in a["system"]) == ("(aligned)" in row["system"])]
        if match:
            row["speedup_vs_assisted"] = match[0]["total_seconds"] / row["total_seconds"]


def _sweep(ev: Evaluation, variants: list[str], indices: list[int], progress) -> tuple[list[dict], dict, dict]:
    """The grid over fallback x rollback thresholds for each small model (or early exit) over `indices`: its rows,
    each model's speed-quality frontier and the paper's operating points."""
    sweep_rows, frontier, points = [], {}, {}
    large_subset = ev.quality([ev.outputs["large"][i] for i in indices], indices)[ev.metric]
    for variant in variants:
        for fb in ev.cfg.sweep_fallback:
            for rb in ev.cfg.sweep_rollback:
                name = f"sweep {variant} fb={fb:g} rb={rb:g}"
                system = "early_exit" if variant in ev.exits else "bild"
                row = ev.run(name, ev.decoder(system, variant, fb, rb), indices, progress)
                row.update(model=variant, fallback_threshold=fb, rollback_threshold=rb)
                sweep_rows.append(ev.finish_row(row, indices))
        mine = [r for r in sweep_rows if r["model"] == variant]
        frontier[variant] = [r["system"] for r in pareto_frontier(mine, ev.metric, ev.higher_is_better)]
        points[variant] = {k: (v["system"] if v else None) for k, v in
                           operating_points(mine, ev.metric, large_subset, higher_is_better=ev.higher_is_better).items()}
    points["large_score_on_sweep_examples"] = large_subset
    return sweep_rows, frontier, points


def _results(cfg, aligned, ev, rows, sweep_rows, frontier, points, throughput=()) -> dict:
    env = environment()
    return {
        "config": to_dict(cfg), "aligned": aligned, "metric": ev.metric, "higher_is_better": ev.higher_is_better,
        "examples": len(ev.examples), "truncated_inputs": ev.truncated, "dtype": ev.dtype, **env,
        "rows": rows, "throughput": list(throughput), "sweep": sweep_rows, "frontier": frontier, "operating_points": points,
        "variant_labels": {"small": "unaligned", "aligned": "aligned",
                           **{k: f"early exit ({v[3]})" for k, v in ev.exits.items()}},
        "hypotheses": {name: [ev.tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]
                       for name, outs in ev.outputs.items()},
    }



def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="BiLD against the large model, the small model and assisted generation.")
    parser.add_argument("--config", default=None,
                        help=f"YAML file of EvalConfig fields (default: {LAST_RUN}, written by ./launch.sh for its run)")
    parser.add_argument("--aligned", nargs="?", const="", default=None,
                        help="also evaluate the aligned small model (PATH, or the config's `aligned`)")
    parser.add_argument("--sweep", action="store_true", help="grid over fallback x rollback thresholds")
    parser.add_argument("--limit", type=int, help="only the first N examples")
    parser.add_argument("--out", help="output folder (default: the config's `out`)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_intermixed_args(argv)
    try:
        overrides = list(args.overrides)
        if args.aligned and "=" in args.aligned and not Path(args.aligned).exists():
            overrides.insert(0, args.aligned)  # `--aligned key=value`: the flag without a path, then an override
            args.aligned = ""
        if args.limit is not None:
            overrides.append(f"limit={args.limit}")
        if args.out:
            overrides.append(f"out={args.out}")
        if args.config is None:
            if not Path(LAST_RUN).is_file():
                raise FileNotFoundError(f"no --config given and no {LAST_RUN}: run ./launch.sh first, or pass --config "
                                        "(for example configs/multi30k_eval.yaml)")
            args.config = LAST_RUN
        cfg = load_config(EvalConfig, args.config, overrides)
        aligned = None
        if args.aligned is not None:
            aligned = args.aligned or cfg.aligned
            if not aligned:
                raise ValueError("--aligned needs a path, or `aligned` in the config")
            if not (Path(aligned) / "config.json").is_file() and (Path(aligned).exists() or aligned.startswith((".", "/"))):
                raise FileNotFoundError(f"aligned checkpoint not found: {aligned} (no config.json); run align/train.py first")
        if cfg.limit is not None and cfg.limit < 1:
            raise ValueError(f"--limit must be at least 1, got {cfg.limit}")
        out = Path(cfg.out)

        def main_table_done(partial: dict) -> None:
            if args.sweep:  # written now, so that an interrupted sweep loses only itself; rewritten at the end
                write_outputs(partial, out)
                print(f"main table written to {out / 'report.md'}; the sweep follows", file=sys.stderr)

        results = evaluate(cfg, aligned, args.sweep, main_table_done)
    except (ConfigError, ValueError, FileNotFoundError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_outputs(results, out)
    print()
    print(table(results))
    if results.get("throughput"):
        print()
        print(throughput_table(results))
    if results["sweep"]:
        print()
        print(sweep_table(results))
    print(f"\nwrote {out / 'results.json'}, {out / 'report.md'}" + (f", {out / 'frontier.png'}" if results["sweep"] else ""))
    failed = [r["system"] for r in results["rows"] if "error" in r]
    # transformers' own baselines failing (assisted generation over an encoder-decoder pair raised IndexError in
    # transformers 5.25) is reported in their rows and here, but does not fail the run: the project's rows are whole
    ours = [name for name in failed if not name.startswith(TRANSFORMERS_ROWS)]
    if failed:
        print(f"{'error' if ours else 'warning'}: {len(failed)} system(s) failed: {', '.join(failed)} (their rows say "
              "why)" + ("" if ours else "; only transformers' baselines, so the run counts as done"), file=sys.stderr)
    return 1 if ours else 0


if __name__ == "__main__":
    sys.exit(main())
