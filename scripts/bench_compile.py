"""How long a model's passes take to compile: in a fresh process on an empty on-disk cache (cold), then in a second
process on that cache (warm). Each process makes a compiled FastRunner over a model of a bench_step shape with random
weights, starts it on a 20-token input and runs a step and checks of 5 and 11 tokens; the table gives the seconds the
passes took to compile (their first calls, per decode.compact's compile log) and the whole process.

    python scripts/bench_compile.py --shape demo_large --device cpu
    python scripts/bench_compile.py --shape qwen2.5_7b --device cuda --dtype bfloat16
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one_process(args) -> dict:
    sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
    import torch
    from bench_step import build

    from decode.fast import FastRunner

    torch.set_num_threads(args.threads)
    model = build(args.shape, args.device, getattr(torch, args.dtype))
    runner = FastRunner(model, compile=True)
    runner.plan([("step", 1), ("check", 5, "ce"), ("check", 11, "ce")])
    with torch.inference_mode():
        runner.start(list(range(5, 25)), 40)
        _, token = runner.step([2])
        runner.check([token, 7, 8, 9, 10], 4, "ce", 3.0)
        runner.check(list(range(11, 22)), 10, "ce", 3.0)
    log = runner.passes.compile_log
    return {"compile_s": round(sum(s for _, _, s in log), 1), "passes": [(p, v, round(s, 1)) for p, v, s in log]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="demo_large")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child process
    args = p.parse_args()
    if args.one:
        print(json.dumps(one_process(args)))
        return
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, HF_HUB_OFFLINE="1")
        rows = []
        for label in ("cold", "warm"):
            start = time.perf_counter()
            done = subprocess.run([sys.executable, __file__, "--one", "--shape", args.shape, "--device", args.device,
                                   "--dtype", args.dtype, "--threads", str(args.threads)],
                                  env=env, capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append((label, result["compile_s"], round(time.perf_counter() - start, 1), result["passes"]))
    print(f"{args.shape}, {args.device}, {args.dtype}: seconds")
    print("| cache | passes compiling | whole process |\n|---|---|---|")
    for label, compile_s, total, _ in rows:
        print(f"| {label} | {compile_s} | {total} |")
    for label, _, _, passes in rows:
        print(f"{label}: " + ", ".join(f"{p} ({v}) {s}" for p, v, s in passes))


if __name__ == "__main__":
    main()
