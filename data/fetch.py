"""Multi30k De-En from the Hugging Face Hub, written in the layout the pipeline reads (`<split>.src` German,
`<split>.tgt` English, one sentence per line; splits train, valid, test).

    python -m data.fetch --out runs/data/multi30k            (./launch.sh does this when ../shared/data is absent)

The Hub copy is `bentrevett/multi30k` (29,000 / 1,014 / 1,000 pairs, the WMT16 Multimodal Task 1 splits). Multi30k
is licensed for non-commercial research; it is not shipped with this repository. `--hub` takes another dataset
name or a local folder with train/validation/test files that `datasets.load_dataset` reads (the tests use one).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

HUB_NAME = "bentrevett/multi30k"
SPLITS = {"train": "train", "validation": "valid", "test": "test"}  # Hub split -> file stem


def fetch_multi30k(out: str | Path, hub: str = HUB_NAME) -> Path:
    """Writes out/{train,valid,test}.{src,tgt} from `hub`; the folder appears whole or not at all."""
    import datasets

    out = Path(out)
    if (out / "train.src").is_file():
        return out
    parts = datasets.load_dataset(hub)
    missing = [s for s in SPLITS if s not in parts]
    if missing:
        raise ValueError(f"{hub} has no split {', '.join(missing)} (found: {', '.join(parts)})")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for split, stem in SPLITS.items():
        rows = parts[split]
        for lang, suffix in (("de", "src"), ("en", "tgt")):
            lines = [" ".join(text.split()) for text in rows[lang]]  # one sentence per line, whatever its spacing
            (tmp / f"{stem}.{suffix}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp / "SOURCE.md").write_text(
        f"# Multi30k (Task 1, De-En)\n\n- Fetched from the Hugging Face Hub: `{hub}`, by `python -m data.fetch`.\n"
        "- Licence: Multi30k is for non-commercial research purposes.\n"
        + "".join(f"- {stem}: {len(parts[split])} pairs\n" for split, stem in SPLITS.items()), encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the folder to write (its train/valid/test .src/.tgt files)")
    p.add_argument("--hub", default=os.environ.get("MULTI30K_HUB", HUB_NAME), help=f"dataset name (default {HUB_NAME})")
    args = p.parse_args(argv)
    try:
        out = fetch_multi30k(args.out, args.hub)
    except Exception as exc:  # noqa: BLE001 - no network, no such dataset: one line, not a traceback
        print(f"error: could not fetch Multi30k from {args.hub}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
              file=sys.stderr)
        return 2
    print(f"Multi30k from {args.hub} in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
