"""Saving a run: checkpoints every few updates (the latest ones kept, found again by --resume), the DeepSpeed settings
checked against the training config, and the final Hugging Face folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from align.config import TrainConfig
from align.models import lora_config
from data.config import save_config



def list_checkpoints(output_dir: Path) -> list[Path]:
    found = [p for p in (output_dir / "checkpoints").glob("step_*") if (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def save_checkpoint(accelerator, output_dir: Path, state: dict, keep: int) -> None:
    path = output_dir / "checkpoints" / f"step_{state['step']}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        # written last: a checkpoint without it is incomplete and ignored by --resume
        (path / "trainer_state.json").write_text(json.dumps(state, indent=2))
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def check_deepspeed(plugin, cfg: TrainConfig) -> None:
    """The training config is the one source of accumulation and clipping. DeepSpeed's own values (from an
    Accelerate config file) would win silently: Accelerate only warns, and then steps the optimizer on its
    schedule and clips at its norm. Unset values are filled in; different ones are an error."""
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    for key, ours in (("gradient_accumulation_steps", cfg.gradient_accumulation_steps),
                      ("gradient_clipping", cfg.max_grad_norm or 0.0)):
        theirs = ds.get(key, "auto")
        if theirs in (None, "auto"):
            ds[key] = ours
        elif float(theirs) != float(ours):
            raise ValueError(f"the DeepSpeed config sets {key}={theirs} but the training config wants {ours}: "
                             f"remove it from the Accelerate config file (the training config is the one source)")


def save_final(accelerator, model, tokenizer, cfg: TrainConfig, metrics: dict, base_model_fn) -> Path:
    """A standard Hugging Face folder: weights, config, generation config, tokenizer, resolved config, metrics."""
    final = Path(cfg.output_dir) / "final"
    state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 shards; every process must call it
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        final.mkdir(parents=True, exist_ok=True)
        if cfg.lora:
            # Rebuild the base model and the adapter on the CPU, load the trained weights, merge, save plain.
            from peft import get_peft_model

            base = base_model_fn()
            peft_model = get_peft_model(base, lora_config(cfg, base))
            result = peft_model.load_state_dict({k: v.cpu() for k, v in state_dict.items()}, strict=False)
            # strict=False only because buffers may be absent from a gathered state dict; a missing or
            # unexpected parameter means the merge would save untrained weights
            params = dict(peft_model.named_parameters())
            missing = [k for k in result.missing_keys if k in params]
            if missing or result.unexpected_keys:
                raise RuntimeError(f"LoRA merge: trained state does not match the rebuilt model (missing "
                                   f"{missing[:5]}, unexpected {result.unexpected_keys[:5]})")
            merged = peft_model.merge_and_unload()
            merged.generation_config = unwrapped.generation_config
            merged.save_pretrained(final)
        elif cfg.objective == "early_exit":  # the model (unchanged when frozen) and its exit head, side by side
            part = lambda prefix: {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}  # noqa: E731
            unwrapped.model.save_pretrained(final, state_dict=part("model."), is_main_process=True,
                                            save_function=accelerator.save)
            unwrapped.exit_head.save(final, part("exit_head."), mode=cfg.exit_mode, base_model=cfg.model,
                                     divergence=cfg.divergence, data=cfg.calibration or cfg.dataset,
                                     eval_top1_agreement=metrics.get("after", {}).get("eval_top1_agreement"))
        else:
            unwrapped.save_pretrained(final, state_dict=state_dict, is_main_process=True, save_function=accelerator.save)
        tokenizer.save_pretrained(final)
        save_config(cfg, final / "train_config.yaml")
        (final / "metrics.json").write_text(json.dumps(metrics, indent=2))
        if cfg.calibration:
            prov = Path(cfg.calibration + ".provenance.json")
            if prov.is_file():
                shutil.copy(prov, final / "calibration.provenance.json")
    accelerator.wait_for_everyone()
    return final


