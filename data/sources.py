"""Where examples come from, and how a source text becomes the prompt a model sees.

A dataset is one of:
- a local folder in the `../shared/data/<name>` layout: `<split>.src` / `<split>.tgt` (one example per line),
  or `<split>.txt` for language modelling;
- a JSONL file (`{"source": ..., "target": ...}` per line; field names configurable);
- a Hub dataset by name through `datasets.load_dataset`; the paper's tasks have short names
  (`iwslt2017-de-en`, `wmt14-de-en`, `xsum`, `cnn_dailymail`, `wikitext2`).
Several may be joined with `+` (e.g. `../shared/data/multi30k+../shared/data/iwslt14_deen`); the split
then names each part in turn, split the same way (`train+valid.tok.lc`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# Hub datasets the paper evaluates on: (load_dataset path, config name, source field, target field).
# Translation sets keep pairs under `translation` with language keys.
HUB_TASKS = {
    "iwslt2017-de-en": ("IWSLT/iwslt2017", "iwslt2017-de-en", "translation.de", "translation.en"),
    "wmt14-de-en": ("wmt/wmt14", "de-en", "translation.de", "translation.en"),
    "xsum": ("EdinburghNLP/xsum", None, "document", "summary"),
    "cnn_dailymail": ("abisee/cnn_dailymail", "3.0.0", "article", "highlights"),
    "wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1", "text", None),
}


@dataclass
class Example:
    index: int  # position in the split, the example's identity in calibration files and results
    source: str
    target: str | None = None


def _field(record: dict, dotted: str):
    for part in dotted.split("."):
        record = record[part]
    return record


def _read_lines(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def _load_one(dataset: str, split: str, source_field: str, target_field: str) -> list[tuple[str, str | None]]:
    path = Path(dataset)
    if path.is_dir():
        src, tgt, txt, jsonl = (path / f"{split}.src", path / f"{split}.tgt", path / f"{split}.txt", path / f"{split}.jsonl")
        if src.is_file():
            sources = _read_lines(src)
            targets = _read_lines(tgt) if tgt.is_file() else [None] * len(sources)
            if len(sources) != len(targets):
                raise ValueError(f"{src} has {len(sources)} lines but {tgt} has {len(targets)}")
            return list(zip(sources, targets))
        if txt.is_file():
            return [(line, None) for line in _read_lines(txt) if line.strip()]
        if jsonl.is_file():
            path = jsonl
        else:
            available = sorted({p.name.split(".")[0] for p in path.iterdir() if p.suffix in (".src", ".txt", ".jsonl")})
            raise FileNotFoundError(f"no split {split!r} in {path} (found: {', '.join(available) or 'nothing'})")
    if path.suffix == ".jsonl" and path.is_file():
        rows = []
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    rows.append((_field(record, source_field), _field(record, target_field) if target_field in record else None))
        return rows
    if path.exists() or dataset.startswith((".", "/")):
        raise FileNotFoundError(f"dataset {dataset!r} is neither a data folder nor a JSONL file")
    return _load_hub(dataset, split, source_field, target_field)


def _load_hub(name: str, split: str, source_field: str, target_field: str):
    import datasets

    hub_path, config_name = name, None
    if name in HUB_TASKS:
        hub_path, config_name, source_field, target_field = HUB_TASKS[name]
    ds = datasets.load_dataset(hub_path, config_name, split=split)
    rows = []
    for record in ds:
        source = _field(record, source_field)
        if target_field is None and not str(source).strip():
            continue  # empty lines of language-modelling text
        rows.append((source, _field(record, target_field) if target_field else None))
    return rows


def load_examples(
    dataset: str,
    split: str,
    limit: int | None = None,
    source_field: str = "source",
    target_field: str = "target",
) -> list[Example]:
    """All examples of a split (the first `limit` if given), indexed from 0 in file order."""
    parts, splits = dataset.split("+"), split.split("+")
    if len(splits) == 1:
        splits = splits * len(parts)
    if len(splits) != len(parts):
        raise ValueError(f"dataset {dataset!r} has {len(parts)} parts but split {split!r} names {len(splits)}")
    rows = []
    for part, part_split in zip(parts, splits):
        rows.extend(_load_one(part, part_split, source_field, target_field))
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise ValueError(f"split {split!r} of {dataset!r} is empty")
    return [Example(i, s, t) for i, (s, t) in enumerate(rows)]


def format_prompt(source: str, prefix: str = "", template: str | None = None, tokenizer=None, chat: bool = False) -> str:
    """The text a model is given: a task prefix (T5: "translate German to English: "), a template with
    `{source}`, and for chat models the tokenizer's chat template around it."""
    text = template.format(source=source) if template else source
    text = prefix + text
    if chat:
        if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("chat prompts need a tokenizer with a chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    return text


def encode_prompt(tokenizer, source: str, prefix: str = "", template: str | None = None, chat: bool = False,
                  max_length: int | None = None) -> tuple[list[int], bool]:
    """Token ids of the prompt for `source`, and whether truncation to `max_length` cut it.

    Calibration, training and evaluation all encode sources here, so the small model is aligned on exactly
    the inputs it is evaluated on."""
    text = format_prompt(source, prefix, template, tokenizer, chat)
    ids = tokenizer(text, add_special_tokens=not chat)["input_ids"]
    if max_length is not None and len(ids) > max_length:
        # keep the tokenizer's closing special token (EOS for seq2seq tokenizers) when it adds one
        closing = ids[-1:] if (not chat and ids[-1] in tokenizer.all_special_ids) else []
        return ids[: max_length - len(closing)] + closing, True
    return ids, False


@dataclass
class PromptConfig:
    """How examples are read and a source becomes a prompt. Calibration, training and evaluation configs all
    derive from it, so the small model is aligned on exactly the prompts it is evaluated on."""

    source_field: str = "source"
    """JSONL field (dotted for nested records) holding the source."""
    target_field: str = "target"
    """JSONL field holding the reference."""
    source_prefix: str = ""
    """Prepended to every source, e.g. "translate German to English: " for T5."""
    prompt_template: str | None = None
    """Template with {source}, for decoder-only models."""
    chat_template: bool = False
    """Wrap the prompt in the tokenizer's chat template."""
    max_source_length: int = 512
    """Prompts longer than this many tokens are truncated (and counted by the evaluation)."""

    def encode(self, tokenizer, source: str) -> tuple[list[int], bool]:
        return encode_prompt(tokenizer, source, self.source_prefix, self.prompt_template, self.chat_template,
                             self.max_source_length)
