"""Train one shared subword tokenizer on the training text (source and target sides) and save it as a
standard fast tokenizer that `AutoTokenizer.from_pretrained` loads.

    python -m data.tokenizer --dataset ../shared/data/multi30k --split train --vocab-size 8000 --out runs/latest/tokenizer

Byte-level BPE, so any text encodes; special tokens <pad>=0, </s>=1, <s>=2, <unk>=3; encoding a text
appends </s>, as seq2seq tokenizers do.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from data.sources import load_examples

SPECIAL = ["<pad>", "</s>", "<s>", "<unk>"]


def train_tokenizer(texts, vocab_size: int, out: str | Path, min_frequency: int = 2):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return fast


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train a shared BPE tokenizer on source and target text.")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--split", default="train")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    examples = load_examples(args.dataset, args.split)
    texts = [ex.source for ex in examples] + [ex.target for ex in examples if ex.target]
    tok = train_tokenizer(texts, args.vocab_size, args.out)
    print(f"tokenizer with {len(tok)} tokens saved to {args.out}")


if __name__ == "__main__":
    main()
