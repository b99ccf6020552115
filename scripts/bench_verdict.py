"""What a small step's verdict costs (top probability and argmax over the vocabulary), by how it is computed.

    python scripts/bench_verdict.py [--vocab 151936 8000] [--repeats 5]

The step's verdict (decode.cache.step_verdict) runs after the compiled head, outside it: a one-row softmax over the
whole vocabulary and a max. Each way below takes the head's bf16 logits [V] and is timed in a CUDA graph of 20
launches (median of --repeats replays, us per launch), with its tokens and top probabilities compared to the current
way's over 200 random rows (logits scaled as a trained model's are, and as a random one's):
- softmax-max: decode.cache.step_verdict over the logits in float32 (today's: a softmax, then its max);
- argmax-sumexp: the argmax, then 1 / sum(exp(logits - logits[argmax])), eagerly;
- compiled softmax-max, compiled argmax-sumexp: the same under torch.compile (inductor, split reductions).
Prints a table last (markdown).
"""

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from decode.cache import step_verdict  # noqa: E402


def softmax_max(logits):
    """Today's verdict, as every runner computes it."""
    return step_verdict(logits.float())


def argmax_sumexp(logits):
    x = logits.float()
    token = x.argmax(dim=-1)
    return 1.0 / torch.exp(x - x.gather(-1, token[..., None])).sum(-1), token


WAYS = {"softmax-max": softmax_max, "argmax-sumexp": argmax_sumexp}


def graph_us(fn, x, repeats):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(20):
            fn(x)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / 20)
    return statistics.median(times), min(times), max(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, nargs="*", default=[151936, 8000])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_verdict.py times CUDA graphs: it needs a CUDA device")
    ways = dict(WAYS)
    ways.update({f"compiled {name}": torch.compile(fn, fullgraph=True) for name, fn in WAYS.items()})
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for vocab in args.vocab:
        x = (torch.randn(vocab, generator=gen, device="cuda") * 3).to(torch.bfloat16)
        tests = {scale: (torch.randn(200, vocab, generator=gen, device="cuda") * scale).to(torch.bfloat16)
                 for scale in (3.0, 0.05)}
        for name, fn in ways.items():
            us = graph_us(fn, x, args.repeats)
            same, worst = 0, 0.0
            for rows_ in tests.values():
                for row in rows_:
                    conf, tok = fn(row)
                    ref_conf, ref_tok = softmax_max(row)
                    same += int(tok.item() == ref_tok.item())
                    worst = max(worst, abs(conf.item() - ref_conf.item()) / ref_conf.item())
            rows.append((vocab, name, us, same, worst))
            print(f"V={vocab} {name}: {us[0]:.1f} us, same token {same}/400, top probability off by {worst:.1e}",
                  flush=True)
    print(f"\ndevice: {torch.cuda.get_device_name()}; torch {torch.__version__}; bf16 logits, one row; us per verdict, "
          f"median of {args.repeats} replays of a graph of 20 (min-max)\n")
    print("| vocabulary | way | us | same token as today | top probability, largest relative difference |")
    print("|---|---|---|---|---|")
    for vocab, name, (med, lo, hi), same, worst in rows:
        print(f"| {vocab} | {name} | {med:.1f} ({lo:.1f}-{hi:.1f}) | {same}/400 | {worst:.1e} |")


if __name__ == "__main__":
    main()
