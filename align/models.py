"""The model a run trains: loaded or built from a config, cut to some of its decoder layers, wrapped with an exit
head for early-exit training, or given LoRA adapters."""

from __future__ import annotations

import torch

from align.config import TrainConfig


def _neutral_generation_config(model, tokenizer) -> None:
    """Plain greedy defaults with the tokenizer's special tokens (BART configs force EOS by default)."""
    from decode.loading import make_plain_greedy

    gen = model.generation_config
    make_plain_greedy(gen)
    gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    if model.config.is_encoder_decoder:
        gen.decoder_start_token_id = model.config.decoder_start_token_id


def build_model(cfg: TrainConfig, tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    if cfg.model is not None:
        from decode.loading import load_model

        model = load_model(cfg.model).train()
        if cfg.keep_decoder_layers is not None:
            keep_decoder_layers(model, cfg.keep_decoder_layers)
        return model
    spec = dict(cfg.model_config)
    model_type = spec.pop("model_type")
    start = tokenizer.pad_token_id if model_type == "t5" else tokenizer.eos_token_id
    spec.setdefault("vocab_size", len(tokenizer))
    spec.setdefault("pad_token_id", tokenizer.pad_token_id)
    spec.setdefault("eos_token_id", tokenizer.eos_token_id)
    spec.setdefault("bos_token_id", tokenizer.bos_token_id)
    spec.setdefault("decoder_start_token_id", start)
    spec.setdefault("forced_eos_token_id", None)
    config = AutoConfig.for_model(model_type, **spec)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = auto.from_config(config)
    _neutral_generation_config(model, tokenizer)
    return model


def keep_decoder_layers(model, keep: list[int]) -> None:
    """Drops every decoder layer of `model` but those in `keep`, in place, and sets the config's layer count and each
    attention's cache index to match."""
    from decode.families import decoder_layer_modules

    layers = decoder_layer_modules(model)
    if max(keep) >= len(layers):
        raise ValueError(f"keep_decoder_layers {keep} but the model has {len(layers)} decoder layers")
    kind = model.config.model_type
    if kind in ("t5", "mt5") and keep[0] != 0:
        raise ValueError("T5 keeps its relative position bias in decoder layer 0: keep_decoder_layers must start at 0")
    name = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and list(m) == layers)
    parent, attribute = model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
    kept = [layers[i] for i in keep]
    for new_index, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    setattr(parent, attribute, torch.nn.ModuleList(kept))
    field = {"t5": "num_decoder_layers", "mt5": "num_decoder_layers"}.get(
        kind, "decoder_layers" if model.config.is_encoder_decoder else "num_hidden_layers")
    setattr(model.config, field, len(kept))
    if getattr(model.config, "layer_types", None) is not None:
        model.config.layer_types = [model.config.layer_types[i] for i in keep]


class ExitTraining(torch.nn.Module):
    """A model and the exit head after its decoder layer `exit_layer`, as one module for Accelerate / DeepSpeed.

    forward returns (the full model's logits, the exit's logits). Layer k's states are read with a forward
    hook on the layer itself, and the exit logits come from the same function early-exit decoding uses
    (ExitHead.logits over the model's own head, decode.families.output_logits), so training and decoding cannot drift
    apart.
    """

    def __init__(self, model, exit_layer: int, mode: str):
        from decode.families import decoder_layer_modules
        from decode.early_exit import ExitHead

        super().__init__()
        self.model, self.mode = model, mode
        self.exit_head = ExitHead(model, exit_layer)
        self.exit_layer = exit_layer
        self._layer = [decoder_layer_modules(model)[exit_layer - 1]]  # a list: not a registered submodule
        if mode == "frozen":
            model.requires_grad_(False)

    @property
    def config(self):
        return self.model.config

    def train(self, mode: bool = True):
        super().train(mode)
        if self.mode == "frozen":
            self.model.eval()  # the reference the exit learns from: no dropout
        return self

    def forward(self, **inputs):
        captured = []

        def keep(module, args, output):
            captured.append(output[0] if isinstance(output, tuple) else output)

        handle = self._layer[0].register_forward_hook(keep)
        try:
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.mode == "joint"):
                logits = self.model(**inputs).logits
        finally:
            handle.remove()
        return logits, self.exit_head.logits(self.model, captured[-1])


def lora_config(cfg: TrainConfig, model):
    from peft import LoraConfig, TaskType

    task = TaskType.SEQ_2_SEQ_LM if model.config.is_encoder_decoder else TaskType.CAUSAL_LM
    return LoraConfig(task_type=task, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_target_modules)


