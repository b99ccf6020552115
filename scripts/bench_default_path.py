"""The uncompiled fast path (compact passes in CUDA graphs; BILD_COMPILE=0 or compile=False) with decode/kernels.py's attention kernel
rotating q and k (the default), with the passes rotating q and k apart, and
without the kernels: ms per step (host read each step), per graph replayed alone and per check of 10 pending tokens,
random weights, batch 1.

    python scripts/bench_default_path.py --shapes qwen2.5_0.5b demo_large qwen2.5_7b
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from bench_step import SHAPES, build, checked, fmt, graph_only, stepped, with_settings  # noqa: E402

from decode.fast import FastRunner  # noqa: E402

DEVICE = torch.device("cuda")
SETTINGS = {"kernel, rotary in it": dict(DECODE_KERNEL=True, KERNEL_ROTARY=True, CHECK_KERNEL=True),
            "kernel, rotary apart": dict(DECODE_KERNEL=True, KERNEL_ROTARY=False, CHECK_KERNEL=True),
            "without": dict(DECODE_KERNEL=False),
            "kernel in steps only": dict(DECODE_KERNEL=True, KERNEL_ROTARY=True, CHECK_KERNEL=False)}


@torch.inference_mode()
def measure(name, args):
    model = build(name, "cuda", torch.bfloat16)
    prompt = torch.randint(3, 1000, (20,)).tolist()
    steps, capacity = args.steps, args.steps + 24
    row = {"shape": name}

    def make():  # a runner over passes made anew with the settings (nothing to compile)
        runner = FastRunner(model, compile=False)
        runner.plan([("step", 1), ("check", 11, "exact")])
        return runner, 0.0

    def timings(runner):
        return (stepped(runner, prompt, steps, capacity, args.repeats, DEVICE),
                graph_only(runner, prompt, capacity, steps, args.repeats, DEVICE),
                checked(runner, prompt, capacity, 10, steps, args.repeats, DEVICE))

    for label, settings in SETTINGS.items():
        row[label] = with_settings(model, settings, make, timings)
    del model
    torch.cuda.empty_cache()
    cells = [row[k] if isinstance(row[k], str) else " / ".join(fmt(t) for t in row[k][:3]) for k in SETTINGS]
    print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="*", default=["qwen2.5_0.5b", "demo_large"], choices=list(SHAPES))
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; bfloat16; batch 1; uncompiled passes in "
          f"CUDA graphs; ms, median of {args.repeats} runs of {args.steps} (min-max)")
    print("| shape | " + " | ".join(f"{k}: step / graph only / check k=10" for k in SETTINGS) + " |", flush=True)
    print("|---" * (1 + len(SETTINGS)) + "|", flush=True)
    for name in args.shapes:
        measure(name, args)


if __name__ == "__main__":
    main()
