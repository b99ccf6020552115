"""Loading a model by Hub name or local folder, and the checks a pair of models passes before they decode together
(same kind, same vocabulary, same decoder start, same device; generation settings that greedy decoding ignores)."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, GenerationConfig, PreTrainedModel

from decode.cache import decoder_start_token_id, is_encoder_decoder, vocab_size

# generation_config settings that change greedy decoding; BiLD decodes plain greedy and says so.
_PROCESSOR_SETTINGS = {
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "min_length": GenerationConfig().min_length,  # the library's default (None in 5.24): a set value, even 0, makes
    # generate warn on every assisted step ("Both min_new_tokens and min_length seem to have been set")
    "min_new_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
}


def check_pair(large: PreTrainedModel, small: PreTrainedModel) -> None:
    """Raises ValueError when the two models cannot decode together."""
    if is_encoder_decoder(large) != is_encoder_decoder(small):
        kind = {True: "encoder-decoder", False: "decoder-only"}
        raise ValueError(
            f"the large model is {kind[is_encoder_decoder(large)]} ({type(large).__name__}) but the small model is "
            f"{kind[is_encoder_decoder(small)]} ({type(small).__name__}); BiLD needs two models of the same kind"
        )
    v_large, v_small = vocab_size(large), vocab_size(small)
    if v_large != v_small:
        raise ValueError(
            f"the models do not share a vocabulary: the large model has {v_large} tokens, the small model {v_small}"
        )
    if is_encoder_decoder(large) and decoder_start_token_id(large) != decoder_start_token_id(small):
        raise ValueError(
            f"decoder start tokens differ: large {decoder_start_token_id(large)}, small {decoder_start_token_id(small)}"
        )
    if next(large.parameters()).device != next(small.parameters()).device:
        raise ValueError("the large and small models must be on the same device")


def make_plain_greedy(generation_config) -> None:
    """Sets every generation_config setting that would change greedy decoding to its neutral value."""
    for key, neutral in _PROCESSOR_SETTINGS.items():
        setattr(generation_config, key, neutral)
    generation_config.num_beams, generation_config.do_sample, generation_config.early_stopping = 1, False, False


def greedy_generation_config(model: PreTrainedModel, **settings):
    """A copy of the model's own generation config made plain greedy, then `settings` on top.

    transformers fills every field a partial GenerationConfig leaves unset from `model.generation_config`,
    so a checkpoint's `no_repeat_ngram_size` or `repetition_penalty` would leak into "greedy" decoding;
    starting from the model's own copy and clearing them is the one way that cannot miss a field.
    """
    gen = copy.deepcopy(model.generation_config)
    make_plain_greedy(gen)
    for key, value in settings.items():
        setattr(gen, key, value)
    return gen


def warn_on_processors(model: PreTrainedModel) -> None:
    gen = model.generation_config
    active = [k for k, neutral in _PROCESSOR_SETTINGS.items() if getattr(gen, k, neutral) not in (neutral, None, [])]
    if active:
        warnings.warn(
            f"{type(model).__name__}.generation_config sets {', '.join(active)}; BiLD decodes plain greedy and ignores "
            "them. Compare against generate() with the same settings cleared.",
            stacklevel=3,
        )


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """A dtype by name; "auto" is bfloat16 on a GPU that supports it, else float32."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def check_model_location(name_or_path: str) -> None:
    """A local model folder that does not exist is reported as not found, with its path, before transformers takes
    it for a Hub name (its message then is about the form of repository ids). A Hub id is `name` or `org/name`."""
    name = str(name_or_path)
    if Path(name).expanduser().exists():
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or name.endswith("/"):
        hint = "; ./launch.sh writes the run's models under runs/<profile>/" if "runs/" in name else ""
        raise FileNotFoundError(f"model not found: {name} (no such folder{hint})")


def load_model(name_or_path: str, dtype=None, device=None, **kwargs) -> PreTrainedModel:
    """Loads a causal or seq2seq LM by Hub name or local folder, picking the auto class from its config."""
    check_model_location(name_or_path)
    config = AutoConfig.from_pretrained(name_or_path, **{k: v for k, v in kwargs.items() if k in ("revision", "trust_remote_code")})
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    model = auto.from_pretrained(name_or_path, dtype=dtype, **kwargs)
    if device is not None:
        model = model.to(device)
    return model.eval()
