"""What each pass costs while decoding, on the trained models of a `./launch.sh cpu` run: the large model alone
(decode.Greedy) and BiLD at one operating point decode the first --limit test sentences, --repeats times each,
alternating, on the fast path; every call of a runner's verbs (start, step, check) is timed where it is made. Prints
ms per sentence for each system, then each verb's calls per pass over the sentences and their median ms (checks by
how many tokens they run), so the speedup can be read as what its passes cost.

    python scripts/cpu_pass_costs.py [--run runs/latest] [--threads 2] [--limit 100] [--fallback 0.2 --rollback 4]

(scripts/bench_cpu_steps.py times the same shapes with random weights, in isolation.)
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import decode.fast  # noqa: E402
from decode import BiLD, BiLDConfig, Greedy  # noqa: E402
from data.sources import load_examples  # noqa: E402

VERBS = ("start", "step", "check")


def timed_verbs(names: dict[int, str], system: list[str]) -> dict:
    """Wraps FastRunner's verbs so that each call's seconds are kept under (the system decoding, system[0]; model;
    verb; tokens a check runs)."""
    calls = collections.defaultdict(list)
    for verb in VERBS:
        plain = getattr(decode.fast.FastRunner, verb)

        def timed(self, *args, _plain=plain, _verb=verb, **kwargs):
            t = time.perf_counter()
            out = _plain(self, *args, **kwargs)
            width = len(args[0]) if _verb == "check" else 0
            calls[(system[0], names.get(id(self.passes.model_ref()), "?"), _verb, width)].append(time.perf_counter() - t)
            return out

        setattr(decode.fast.FastRunner, verb, timed)
    return calls


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/latest", help="a ./launch.sh run folder (large/, small/, eval.yaml)")
    p.add_argument("--small", default="small", help="the small model's folder in the run: small or small_aligned")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--fallback", type=float, default=0.2)
    p.add_argument("--rollback", type=float, default=4.0)
    args = p.parse_args()
    run = Path(args.run)
    if not (run / "large" / "final").is_dir():
        sys.exit(f"{run / 'large' / 'final'} not found: give --run a finished ./launch.sh cpu run")
    torch.set_num_threads(args.threads)
    cfg = yaml.safe_load((run / "eval.yaml").read_text())
    large = AutoModelForSeq2SeqLM.from_pretrained(run / "large" / "final").eval()
    small = AutoModelForSeq2SeqLM.from_pretrained(run / args.small / "final").eval()
    tok = AutoTokenizer.from_pretrained(run / "large" / "final")
    examples = load_examples(cfg["dataset"], cfg.get("split", "test"), args.limit)
    inputs = [tok([e.source], return_tensors="pt", truncation=True, max_length=cfg.get("max_source_length", 128))
              for e in examples]
    current = [""]
    calls = timed_verbs({id(large): "large", id(small): "small"}, current)
    systems = {"large": Greedy(large, fast_path=True),
               "BiLD": BiLD(large, small, BiLDConfig(fallback_threshold=args.fallback, rollback_threshold=args.rollback,
                                                     max_small_steps=cfg.get("max_small_steps", 10), fast_path=True))}
    max_new = cfg.get("max_new_tokens", 48)

    def decode_all(system):
        return sum(system.generate(x.input_ids, x.attention_mask, max_new_tokens=max_new).sequences.shape[-1]
                   for x in inputs)

    for system in systems.values():
        decode_all(system)  # warm-up
    calls.clear()
    seconds, tokens = collections.defaultdict(list), {}
    for _ in range(args.repeats):
        for name, system in systems.items():
            current[0] = name
            t = time.perf_counter()
            tokens[name] = decode_all(system)
            seconds[name].append(time.perf_counter() - t)
    n = len(inputs)
    print(f"{n} sentences, {args.threads} threads, BiLD at fallback {args.fallback}, rollback {args.rollback}, "
          f"small model {args.small}; median of {args.repeats} passes")
    for name in systems:
        print(f"{name}: {1000 * statistics.median(seconds[name]) / n:.1f} ms per sentence, {tokens[name]} tokens")
    print("\n| system | model | verb | tokens fed | calls per pass | median ms | s per pass |\n|---|---|---|---|---|---|---|")
    for (name, model, verb, width), times in sorted(calls.items(), key=lambda kv: (kv[0][0] != "large", kv[0][1:])):
        print(f"| {name} | {model} | {verb} | {width or '-'} | {len(times) // args.repeats} | "
              f"{1000 * statistics.median(times):.3f} | {sum(times) / args.repeats:.3f} |")


if __name__ == "__main__":
    main()
