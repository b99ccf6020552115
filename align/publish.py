"""Publish an aligned checkpoint to the Hugging Face Hub with a model card.

    python -m align.publish runs/latest/small_aligned/final --repo-id user/multi30k-small-aligned [--private] [--dry-run]

The card names the base model, the teacher, the calibration data, the metrics before and after alignment,
and recommended BiLD thresholds; it is written into the folder (README.md) before the upload, so
`--dry-run` shows exactly what would be published without touching the network.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def model_card(folder: str | Path, repo_id: str) -> str:
    folder = Path(folder)
    cfg = yaml.safe_load((folder / "train_config.yaml").read_text()) if (folder / "train_config.yaml").is_file() else {}
    metrics = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").is_file() else {}
    prov_path = folder / "calibration.provenance.json"
    prov = json.loads(prov_path.read_text()) if prov_path.is_file() else {}
    base = cfg.get("model") or f"trained from a {cfg.get('model_config', {}).get('model_type', '?')} config"
    teacher = cfg.get("teacher") or prov.get("model") or "n/a"
    before, after = metrics.get("before", {}), metrics.get("after", {})
    rows = "\n".join(
        f"| {k} | {_fmt(before.get(k, 'n/a'))} | {_fmt(after.get(k, 'n/a'))} |"
        for k in ("eval_loss", "eval_top1_agreement")
    )
    tuned_path = folder / "bild_thresholds.json"  # written by python -m decode.tune
    if tuned_path.is_file():
        t = json.loads(tuned_path.read_text())
        thr = (f"`fallback_threshold={t['fallback_threshold']}`, `rollback_threshold={t['rollback_threshold']}`, "
               f"`max_small_steps={t['max_small_steps']}`: tuned on {t['dataset']} split `{t['split']}` "
               f"({t['examples']} examples) as the fastest point within {t['budget']} {t['metric']} of the large "
               f"model ({t['score']:.2f} vs {t['large_score']:.2f}, {t['speedup_vs_large']:.2f}x on {t['device']}); "
               "`BiLD.from_pretrained` reads them from `bild_thresholds.json`")
    else:
        thresholds = cfg.get("recommended_thresholds") or {}
        thr = ", ".join(f"`{k}={v}`" for k, v in thresholds.items()) or "not measured for this checkpoint"
    calib = (f"{prov.get('dataset')} split `{prov.get('split')}` ({prov.get('examples')} examples), decoding "
             f"{json.dumps(prov.get('decoding'))}, teacher fingerprint `{prov.get('model_fingerprint')}`") if prov else "n/a"
    return f"""---
library_name: transformers
tags: [bild, speculative-decoding, distillation]
---

# {repo_id}

A small model aligned to a large one for Big Little Decoder (BiLD) decoding (Kim et al., NeurIPS 2023),
made with the bild-toolkit `align/train.py` (objective `{cfg.get('objective', '?')}`).

- Base model: {base}
- Teacher (large model): {teacher}
- Calibration data: {calib}

## Alignment metrics (held-out calibration pairs)

| metric | before | after |
|---|---|---|
{rows}

Top-1 agreement is how often this model's argmax is the large model's token under teacher forcing;
BiLD's speed grows with it.

## Use with BiLD

Recommended thresholds: {thr}.

```python
from decode import BiLD, BiLDConfig
bild = BiLD.from_pretrained("{teacher}", "{repo_id}", BiLDConfig(fallback_threshold=0.5, rollback_threshold=3.0))
```
"""


def push(folder: str | Path, repo_id: str, private: bool = False, dry_run: bool = False, api=None) -> str:
    """Writes the model card into `folder` and uploads the folder. Returns the card text."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a saved model folder (no config.json)")
    card = model_card(folder, repo_id)
    (folder / "README.md").write_text(card)
    if dry_run:
        return card
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Upload BiLD-aligned checkpoint")
    return card


def main(argv=None):
    parser = argparse.ArgumentParser(description="Publish an aligned checkpoint to the Hugging Face Hub.")
    parser.add_argument("folder")
    parser.add_argument("--repo-id", required=True)
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="write the model card, upload nothing")
    args = parser.parse_args(argv)
    card = push(args.folder, args.repo_id, private=args.private, dry_run=args.dry_run)
    print(card if args.dry_run else f"uploaded {args.folder} to {args.repo_id}")


if __name__ == "__main__":
    main()
