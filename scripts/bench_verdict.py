"""What a small step's verdict costs (top probability and argmax over the vocabulary), by how it is computed.

    python scripts/bench_verdict.py [--vocab 151936 8000] [--repeats 5]

Each way below takes the head's bf16 logits [V] and is timed in a CUDA graph of 20 launches (median of --repeats
replays, us per launch; the input stays in L2 between launches), with its tokens and top probabilities compared to
decode.cache.step_verdict's over 200 random rows (logits scaled as a trained model's are, and as a random one's):
- softmax-max: a softmax in float32, then its max (the verdict before it was a compiled pass);
- max-sumexp: decode.cache.step_verdict (max with its index, then 1 / sum(exp(logits - top))), as the uncompiled runners
  compute it;
- amax-first-sumexp: decode.compact.split_verdict, as the compiled runners compute it (SPLIT_VERDICT): the max value,
  then the first index holding it, then the same sum: reductions without an index, which inductor splits over several
  programs (an argmax it runs in one, 21 us of a 0.5B step);
- compiled, each of these: under torch.compile with the one-token passes' inductor options (decode.compact), as the
  runners' verdict pass compiles. A way that fails to compile gives its error's first line in the table.
Prints a table last (markdown).
"""

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from decode.cache import step_verdict  # noqa: E402
from decode.compact import inductor_options, split_verdict  # noqa: E402


def softmax_max(logits):
    return torch.softmax(logits.float(), dim=-1).max(dim=-1)


def max_sumexp(logits):
    return step_verdict(logits.float())


def amax_first_sumexp(logits):
    return split_verdict(logits.float())


WAYS = {"softmax-max": softmax_max, "max-sumexp": max_sumexp, "amax-first-sumexp": amax_first_sumexp}


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
    options = inductor_options(True, True)  # a tuned one-token pass's, as the step's verdict compiles
    ways.update({f"compiled {name}": torch.compile(fn, fullgraph=True, options=options) for name, fn in WAYS.items()})
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for vocab in args.vocab:
        x = (torch.randn(vocab, generator=gen, device="cuda") * 3).to(torch.bfloat16)
        tests = {scale: (torch.randn(200, vocab, generator=gen, device="cuda") * scale).to(torch.bfloat16)
                 for scale in (3.0, 0.05)}
        for name, fn in ways.items():
            try:
                us = graph_us(fn, x, args.repeats)
            except Exception as err:  # noqa: BLE001 - a way inductor cannot compile: say so in the table
                rows.append((vocab, name, f"{type(err).__name__}: {str(err).splitlines()[0][:80] if str(err) else ''}",
                             None, None))
                print(f"V={vocab} {name}: {rows[-1][2]}", flush=True)
                continue
            same, worst = 0, 0.0
            for rows_ in tests.values():
                for row in rows_:
                    conf, tok = fn(row)
                    ref_conf, ref_tok = max_sumexp(row)
                    same += int(tok.item() == ref_tok.item())
                    worst = max(worst, abs(conf.item() - ref_conf.item()) / ref_conf.item())
            rows.append((vocab, name, us, same, worst))
            print(f"V={vocab} {name}: {us[0]:.1f} us, same token {same}/400, top probability off by {worst:.1e}",
                  flush=True)
    print(f"\ndevice: {torch.cuda.get_device_name()}; torch {torch.__version__}; bf16 logits, one row; us per verdict, "
          f"median of {args.repeats} replays of a graph of 20 (min-max)\n")
    print("| vocabulary | way | us | same token as step_verdict | top probability, largest relative difference |")
    print("|---|---|---|---|---|")
    for vocab, name, us, same, worst in rows:
        if same is None:
            print(f"| {vocab} | {name} | {us} | - | - |")
        else:
            print(f"| {vocab} | {name} | {us[0]:.1f} ({us[1]:.1f}-{us[2]:.1f}) | {same}/400 | {worst:.1e} |")


if __name__ == "__main__":
    main()
