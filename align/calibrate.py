"""Calibration outputs: the large model's own generations over calibration inputs (by default the training split).

    accelerate launch -m align.calibrate --config configs/multi30k_calibrate.yaml [key=value ...]
    python -m align.calibrate --config configs/multi30k_calibrate.yaml limit=100

Writes `output` (JSONL, one record per example, sorted by index: index, source, output, output_ids) and
`<output>.provenance.json` (model and its content hash or revision, decoding settings, dataset, split).
Batches are length-bucketed and spread over processes; each process appends finished batches to its own
part file and flushes, so an interrupted run, started again with the same command, resumes where it
stopped: no example missing, none twice. Greedy by default (what BiLD's small model must learn to copy).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from data.config import config_from_cli
from data.sources import PromptConfig, load_examples
from decode.loading import greedy_generation_config


@dataclass
class CalibrateConfig(PromptConfig):
    model: str = ""
    """The large model: Hub name or local folder."""
    tokenizer: str | None = None
    """Tokenizer to use; defaults to the model's."""
    revision: str | None = None
    dataset: str = ""
    """Local data folder, JSONL file or Hub dataset name (see data/sources.py)."""
    split: str = "train"
    limit: int | None = None
    max_new_tokens: int = 128
    batch_size: int = 64
    do_sample: bool = False
    num_beams: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    dtype: str = "auto"
    """float32, bfloat16, float16 or auto (bfloat16 on a GPU that supports it, else float32)."""
    output: str = "runs/calibration.jsonl"

    def __post_init__(self):
        if not self.model:
            raise ValueError("calibration needs `model` (the large model)")
        if not self.dataset:
            raise ValueError("calibration needs `dataset`")
        if self.batch_size < 1 or self.max_new_tokens < 1 or self.num_beams < 1:
            raise ValueError("batch_size, max_new_tokens and num_beams must be at least 1")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be at least 1, got {self.limit}")

    def decoding(self) -> dict:
        d = dict(do_sample=self.do_sample, num_beams=self.num_beams, max_new_tokens=self.max_new_tokens)
        if self.do_sample:
            d.update(temperature=self.temperature, top_p=self.top_p)
        return d


def model_fingerprint(model_name: str, revision: str | None, model) -> str:
    """A content hash of local weights, or the Hub commit the weights came from."""
    path = Path(model_name)
    if path.is_dir():
        digest = hashlib.sha256()
        for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 24), b""):
                    digest.update(chunk)
        return "sha256:" + digest.hexdigest()
    commit = getattr(model.config, "_commit_hash", None)
    return f"revision:{commit or revision or 'unknown'}"


def read_records(path: Path) -> dict[int, dict]:
    """Complete records of a JSONL file by index. A torn last line (the run was killed mid-write) is dropped."""
    records = {}
    if not path.is_file():
        return records
    with path.open(encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "index" in record and "output_ids" in record:
                records[int(record["index"])] = record
    return records


def _rewrite(path: Path, records: dict[int, dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for i in sorted(records):
            f.write(json.dumps(records[i], ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def bucket(lengths: dict[int, int], batch_size: int) -> list[list[int]]:
    """Batches of example indices of similar length, longest first (an out-of-memory error shows at once)."""
    order = sorted(lengths, key=lambda i: (-lengths[i], i))
    return [order[k : k + batch_size] for k in range(0, len(order), batch_size)]


def calibrate(cfg: CalibrateConfig) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from decode.cache import prefer_fast_attention
    from decode.loading import load_model, resolve_dtype

    accelerator = Accelerator()
    set_seed(cfg.seed)
    prefer_fast_attention()
    output = Path(cfg.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    provenance_path = output.with_name(output.name + ".provenance.json")

    model = load_model(cfg.model, dtype=resolve_dtype(cfg.dtype, accelerator.device), device=accelerator.device,
                       **({"revision": cfg.revision} if cfg.revision else {}))
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.model)
    is_seq2seq = model.config.is_encoder_decoder
    if not is_seq2seq:
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    examples = load_examples(cfg.dataset, cfg.split, cfg.limit, cfg.source_field, cfg.target_field)
    provenance = {
        "model": cfg.model,
        "model_fingerprint": model_fingerprint(cfg.model, cfg.revision, model),
        "tokenizer": cfg.tokenizer or cfg.model,
        "dataset": cfg.dataset,
        "split": cfg.split,
        "examples": len(examples),
        "decoding": {**cfg.decoding(), "seed": cfg.seed},
        "prompt": {"source_prefix": cfg.source_prefix, "prompt_template": cfg.prompt_template,
                   "chat_template": cfg.chat_template, "max_source_length": cfg.max_source_length},
        "dtype": str(model.dtype),
    }
    if accelerator.is_main_process:
        _same_settings_or_exit(output, provenance_path, provenance)
    accelerator.wait_for_everyone()

    done = _finished_records(output)
    todo = [ex for ex in examples if ex.index not in done]

    encoded = {ex.index: cfg.encode(tokenizer, ex.source)[0] for ex in todo}
    batches = bucket({i: len(ids) for i, ids in encoded.items()}, cfg.batch_size)
    mine = batches[accelerator.process_index :: accelerator.num_processes]
    by_index = {ex.index: ex for ex in todo}

    part_path = output.with_name(f"{output.name}.part{accelerator.process_index}")
    _rewrite(part_path, read_records(part_path))  # drop a torn last line before appending
    # the model's own special tokens, with every setting that would change greedy decoding cleared
    gen_config = greedy_generation_config(model, **cfg.decoding(), pad_token_id=tokenizer.pad_token_id)
    eos_ids = set(gen_config.eos_token_id if isinstance(gen_config.eos_token_id, list) else [gen_config.eos_token_id])
    progress = tqdm(total=sum(len(b) for b in mine), desc="calibration", disable=not accelerator.is_local_main_process,
                    initial=0, unit="ex")
    with part_path.open("a", encoding="utf-8") as part:
        for batch in mine:
            features = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt")
            with torch.inference_mode():
                out = model.generate(
                    input_ids=features["input_ids"].to(accelerator.device),
                    attention_mask=features["attention_mask"].to(accelerator.device),
                    generation_config=gen_config,
                )
            new = out[:, 1:] if is_seq2seq else out[:, features["input_ids"].shape[1] :]
            for row, i in zip(new.tolist(), batch):
                record = _record(i, row, by_index[i], tokenizer, eos_ids)
                part.write(json.dumps(record, ensure_ascii=False) + "\n")
            part.flush()
            os.fsync(part.fileno())
            progress.update(len(batch))
    progress.close()
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        _merge(output, examples, provenance, provenance_path, cfg.max_new_tokens, accelerator.print)
    accelerator.wait_for_everyone()
    return output


def _same_settings_or_exit(output: Path, provenance_path: Path, provenance: dict) -> None:
    """Refuses to continue an output started with other settings; records this run's settings beside it."""
    if provenance_path.is_file():
        old = json.loads(provenance_path.read_text())
        old.pop("unfinished_outputs", None)  # written when a run completes
        if old != provenance:
            changed = sorted(k for k in provenance if old.get(k) != provenance[k])
            raise SystemExit(
                f"{output} was started with other settings ({', '.join(changed)} differ); "
                "remove it or choose another output"
            )
    provenance_path.write_text(json.dumps(provenance, indent=2))


def _finished_records(output: Path) -> dict[int, dict]:
    """What earlier runs (any number of processes) finished: the merged file and every part file."""
    done = read_records(output)
    for part in sorted(output.parent.glob(output.name + ".part*")):
        done.update(read_records(part))
    return done


def _record(index: int, row: list[int], example, tokenizer, eos_ids: set[int]) -> dict:
    """One calibration output: the generated ids up to the first EOS, and whether there was one (finished=False: cut
    at max_new_tokens; training gives such outputs no EOS target rather than teach the small model to stop where the
    large one did not)."""
    ids, finished = [], False
    for tok in row:
        if tok in eos_ids:
            finished = True
            break
        ids.append(tok)
    return {"index": index, "source": example.source, "output": tokenizer.decode(ids, skip_special_tokens=True),
            "output_ids": ids, "finished": finished, "reference": example.target}


def _merge(output: Path, examples, provenance: dict, provenance_path: Path, max_new_tokens: int, say) -> None:
    """Every process's part files into the one output file (an example without an output is an error), then the
    parts removed and the count of unfinished outputs recorded."""
    records = read_records(output)
    parts = sorted(output.parent.glob(output.name + ".part*"))
    for p in parts:
        records.update(read_records(p))
    missing = [ex.index for ex in examples if ex.index not in records]
    if missing:
        raise RuntimeError(f"{len(missing)} examples have no calibration output (first: {missing[:5]})")
    _rewrite(output, records)
    for p in parts:
        p.unlink()
    unfinished = sum(not r.get("finished", True) for r in records.values())
    provenance_path.write_text(json.dumps({**provenance, "unfinished_outputs": unfinished}, indent=2))
    say(f"wrote {len(records)} calibration outputs to {output} "
        f"({unfinished} cut at max_new_tokens={max_new_tokens} without EOS)")


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description="Generate calibration outputs with the large model.")
    _, cfg = config_from_cli(CalibrateConfig, parser, argv)
    return calibrate(cfg)


if __name__ == "__main__":
    main()
