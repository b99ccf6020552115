"""Per-step cost of the demo pair's model shapes on this device: the numbers BiLD's speedup is made of.

    python scripts/bench_step.py [--dtype bfloat16] [--steps 64]

Builds the large and small models of configs/multi30k_{large,small}.yaml (random weights, vocabulary 8000),
then times, with the device synchronised and warm-up discarded: one decoding step through BiLD's runner
(what the small model pays per token), a large-model pass over k tokens (what one BiLD check costs), and
transformers `generate` per token. Prints a table.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import yaml  # noqa: E402
from transformers import AutoConfig, AutoModelForSeq2SeqLM  # noqa: E402

from decode.cache import ModelRunner  # noqa: E402
from decode.generation import device_sync  # noqa: E402


def build(config_path, vocab, device, dtype):
    spec = dict(yaml.safe_load(Path(config_path).read_text())["model_config"])
    model_type = spec.pop("model_type")
    cfg = AutoConfig.for_model(model_type, vocab_size=vocab, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                               decoder_start_token_id=1, forced_eos_token_id=None, **spec)
    return AutoModelForSeq2SeqLM.from_config(cfg).to(device=device, dtype=dtype).eval()


def timed(fn, repeats, device):
    times = []
    for _ in range(repeats):
        device_sync(device)
        t = time.perf_counter()
        fn()
        device_sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--vocab", type=int, default=8000)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
    src = torch.randint(3, args.vocab, (1, 20))
    rows = []
    for name, path in (("large", "configs/multi30k_large.yaml"), ("small", "configs/multi30k_small.yaml")):
        torch.manual_seed(0)
        model = build(path, args.vocab, device, dtype)
        runner = ModelRunner(model)

        def steps():
            runner.start(src)
            tok = 5
            for _ in range(args.steps):
                tok = runner.forward([tok])[-1].argmax().item()  # host sync per step, as in the decoding loop

        def check(k):
            def run():  # one pass over k new positions after a 4-token prefix, then rewound
                runner.forward(list(range(5, 5 + k)))
                runner.rewind(4)
            return run

        def generate():
            model.generate(src.to(device), max_new_tokens=args.steps, min_new_tokens=args.steps, do_sample=False,
                           num_beams=1, eos_token_id=1, pad_token_id=0)

        steps()
        step_ms = 1000 * timed(steps, 5, device) / args.steps
        runner.start(src)
        runner.forward([1, 5, 6, 7])
        check_ms = {k: 1000 * timed(check(k), 10, device) for k in (1, 4, 8, 11)}
        generate()
        gen_ms = 1000 * timed(generate, 3, device) / args.steps
        params = sum(p.numel() for p in model.parameters()) / 1e6
        rows.append((name, params, step_ms, check_ms, gen_ms))
    dev = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"\ndevice: {dev}; dtype {dtype}; encoder input 20 tokens; median of repeats after warm-up")
    print(f"{'model':6} {'params M':>9} {'runner ms/step':>15} {'check k=1':>10} {'k=4':>7} {'k=8':>7} {'k=11':>7} {'generate ms/token':>18}")
    for name, params, step_ms, check_ms, gen_ms in rows:
        print(f"{name:6} {params:9.1f} {step_ms:15.3f} {check_ms[1]:10.3f} {check_ms[4]:7.3f} {check_ms[8]:7.3f} {check_ms[11]:7.3f} {gen_ms:18.3f}")


if __name__ == "__main__":
    main()
