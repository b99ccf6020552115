"""What a batch's first device draft costs before any token is timed: capturing its graphs and, on CUDA, compiling the
draft step's bookkeeping (decode.fast.FUSE_BOOKKEEPING), cold in a fresh process and warm after.

    python scripts/bench_first_draft.py [--shape demo_small] [--batches 4 16]

Each setting (bookkeeping fused, unfused) runs in a fresh process with an empty inductor cache folder, so "cold" is
what a user's first batched generate pays. Per batch size, one runner: a start, a plain draft and a lookahead draft
(cold: the first, with the captures; warm: the same again). Prints one table last (markdown).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(shape: str, batches: list[int], fuse: bool, device: str) -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_step import build

    import decode.fast
    from decode.batch import BatchRunner

    decode.fast.FUSE_BOOKKEEPING = fuse
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    device = torch.device(device)
    model = build(shape, device, torch.bfloat16)
    rows = []
    for batch in batches:
        runner = BatchRunner(model, batch)
        runner.plan([("draft", 1), ("draft_next", 1), ("draft", 1, "ahead"), ("draft_next", 1, "ahead")])
        prompts = [list(range(3, 23))] * batch
        times = []
        for _ in range(2):  # cold (captures, compiles), then warm
            sync()
            start = time.perf_counter()
            with torch.inference_mode():
                runner.start(prompts, 64)
                runner.draft([[5]] * batch, 8, [8] * batch, -1.0, [-1])
                runner.draft([[5]] * batch, 8, [8] * batch, -1.0, [-1], lookahead=(None, [False] * batch, [None] * batch))
            sync()
            times.append(time.perf_counter() - start)
        rows.append({"batch": batch, "fuse": fuse, "cold_s": times[0], "warm_s": times[1],
                     "fell_back": any(f.compiled is None for f in decode.fast._FUSED.values())})
        del runner
    print("RESULT " + json.dumps(rows), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="demo_small")
    p.add_argument("--batches", nargs="*", type=int, default=[4, 16])
    p.add_argument("--device", default="cuda", help="cuda (what it measures); cpu only checks that it runs")
    p.add_argument("--child", choices=["fused", "unfused"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.shape, args.batches, args.child == "fused", args.device)
    rows = []
    for setting in ("fused", "unfused"):
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
            cmd = [sys.executable, __file__, "--child", setting, "--shape", args.shape, "--device", args.device,
                   "--batches", *map(str, args.batches)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode or not line:
                sys.exit(f"{setting} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
            rows += json.loads(line[0][len("RESULT "):])
    print(f"\n{args.shape}, bf16: first start + plain draft + lookahead draft of a new batch runner, seconds")
    print("| batch | bookkeeping | cold (captures, compiling) | warm | fell back to eager |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {'fused' if r['fuse'] else 'unfused'} | {r['cold_s']:.2f} | {r['warm_s']:.3f} | "
              f"{'yes' if r['fell_back'] else 'no'} |")


if __name__ == "__main__":
    main()
