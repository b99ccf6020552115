import os
import sys
from pathlib import Path

# Nothing is fetched from the Hub in tests: every model is built from a config or saved locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the GPU tests run the passes uncompiled unless a test asks for compile=True (each compile takes a minute): users get
# them compiled on CUDA by default, which the compiled-pass tests cover
os.environ.setdefault("BILD_COMPILE", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import random

import pytest

WORDS = ("red blue green small big dog cat bird runs jumps sits on the a under near tree house car boy girl "
         "man woman water street ball two three").split()


def _synthetic_split(rng, n):
    """A toy translation task: the target is the source's words reversed, upper-cased first letter."""
    sources, targets = [], []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 8))]
        sources.append(" ".join(words))
        targets.append(" ".join(w.capitalize() for w in reversed(words)))
    return sources, targets


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    """A data folder in the ../shared/data layout: train/valid/test .src/.tgt."""
    root = tmp_path_factory.mktemp("toy_data")
    rng = random.Random(0)
    for split, n in (("train", 400), ("valid", 60), ("test", 40)):
        src, tgt = _synthetic_split(rng, n)
        (root / f"{split}.src").write_text("\n".join(src) + "\n")
        (root / f"{split}.tgt").write_text("\n".join(tgt) + "\n")
    return root


@pytest.fixture(scope="session")
def toy_models(toy_data, tmp_path_factory):
    """A saved (large, small) BART pair with a shared tokenizer trained on the toy data: local folders,
    loaded through from_pretrained exactly as Hub names are."""
    import torch
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    from data.sources import load_examples
    from data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("toy_models")
    examples = load_examples(str(toy_data), "train")
    tok = train_tokenizer([e.source for e in examples] + [e.target for e in examples], 320, root / "tokenizer")
    paths = {}
    for name, width, layers, seed in (("large", 48, 2, 0), ("small", 24, 1, 1)):
        torch.manual_seed(seed)
        config = AutoConfig.for_model(
            "bart", vocab_size=len(tok), d_model=width, encoder_layers=layers, decoder_layers=layers,
            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=2 * width, decoder_ffn_dim=2 * width,
            max_position_embeddings=128, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            bos_token_id=tok.bos_token_id, decoder_start_token_id=tok.eos_token_id, forced_eos_token_id=None,
            init_std=0.2,
        )
        model = AutoModelForSeq2SeqLM.from_config(config)
        gen = model.generation_config
        gen.forced_eos_token_id, gen.no_repeat_ngram_size, gen.num_beams = None, 0, 1
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths[name] = str(root / name)
    paths["tokenizer"] = str(root / "tokenizer")
    return paths
