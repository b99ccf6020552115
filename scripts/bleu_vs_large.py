"""BLEU difference to the large model, with its 95% paired bootstrap interval, for every row of decode.eval results.

    python scripts/bleu_vs_large.py runs/full/eval/results.json [more results.json ...] [--references PATH]

decode.eval writes this into its table itself (`bleu_vs_large`); this recomputes it from the hypotheses stored in
results.json, e.g. for results written before it did. The references are the results' dataset and split
(`--references`: a file of one reference per line instead, when the dataset path is not where it was).
"""

import argparse
import json

from data.sources import load_examples
from decode.metrics import bleu_difference


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+")
    p.add_argument("--references", help="one reference per line (default: the results' dataset and split)")
    p.add_argument("--samples", type=int, default=1000)
    args = p.parse_args()
    print("| results | system | BLEU vs large | 95% paired bootstrap |")
    print("|---|---|---|---|")
    for path in args.results:
        results = json.load(open(path))
        cfg, hyps = results["config"], results["hypotheses"]
        if args.references:
            refs = open(args.references).read().splitlines()
        else:
            refs = [e.target for e in load_examples(cfg["dataset"], cfg["split"], cfg.get("limit"),
                                                    cfg["source_field"], cfg["target_field"])]
        refs = refs[: len(hyps["large"])]
        for name, texts in hyps.items():
            if name != "large" and len(texts) == len(refs):
                diff, low, high = bleu_difference(texts, hyps["large"], refs, samples=args.samples)
                print(f"| {path} | {name} | {diff:+.2f} | [{low:+.2f}, {high:+.2f}] |")


if __name__ == "__main__":
    main()
