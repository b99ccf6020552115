"""Which family's passes a model runs: made once per model (and compile setting), again when its weights moved."""

from __future__ import annotations

import weakref

from transformers import PreTrainedModel

from decode.compact import Passes
from decode.families import DECODER_ONLY
from decode.decoder_only import LlamaPasses
from decode.seq2seq import BartPasses, T5Passes

_PASSES: "weakref.WeakKeyDictionary[PreTrainedModel, dict[bool, Passes]]" = weakref.WeakKeyDictionary()


def model_passes(model: PreTrainedModel, compile: bool = False) -> Passes:
    """The model's passes (compiled or not), made on first use and again when its weights moved."""
    per_model = _PASSES.setdefault(model, {})
    passes = per_model.get(bool(compile))
    param = next(model.parameters())
    if passes is None or (passes.device, passes.dtype) != (param.device, param.dtype) or passes.stale():
        kind = model.config.model_type
        family = LlamaPasses if kind in DECODER_ONLY else T5Passes if kind in ("t5", "mt5") else BartPasses
        passes = per_model[bool(compile)] = family(model, compile)
    return passes


