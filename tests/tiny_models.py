"""Tiny models built from a config (CPU, seconds) and scripted stub models with fixed logits."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    GenerationConfig,
    GPT2Config,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MarianConfig,
    MarianMTModel,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PretrainedConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from decode.loading import make_plain_greedy

VOCAB = 96
PAD, EOS, BOS = 0, 1, 2
ENCODER_DECODER = ("t5", "bart", "marian")
DECODER_ONLY = ("gpt2", "llama", "qwen2", "mistral")
# Families whose differences from Llama the compact passes reproduce, each with every option set: Qwen3's q/k norms,
# Phi-3's fused checkpoint and partial rotary, Gemma 2's soft-capping and sandwich norms with sliding layers
# interleaved, Gemma 3's per-layer-type rotary (linear scaling on the global layers), Llama 3's rope type
MORE_DECODER_ONLY = ("qwen3", "phi3", "gemma2", "gemma3", "llama3")
SLIDING_WINDOW = 8  # tiny Mistral: prompts plus new tokens run well past it


def _config(arch: str, width: int, layers: int, enc_layers: int | None = None) -> PretrainedConfig:
    enc_layers = layers if enc_layers is None else enc_layers
    special = dict(pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS)
    if arch == "t5":
        return T5Config(vocab_size=VOCAB, d_model=width, d_ff=2 * width, d_kv=width // 2, num_heads=2,
                        num_layers=enc_layers, num_decoder_layers=layers, decoder_start_token_id=PAD,
                        initializer_factor=4.0, **special)
    if arch in ("bart", "marian"):
        cls = BartConfig if arch == "bart" else MarianConfig
        return cls(vocab_size=VOCAB, d_model=width, encoder_layers=enc_layers, decoder_layers=layers,
                   encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=2 * width,
                   decoder_ffn_dim=2 * width, max_position_embeddings=256, init_std=0.3,
                   decoder_start_token_id=EOS if arch == "bart" else PAD, forced_eos_token_id=None, **special)
    if arch == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=width, n_layer=layers, n_head=2, n_positions=256,
                          initializer_range=0.3, **special)
    if arch in MORE_DECODER_ONLY:
        common = dict(vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      initializer_range=0.3, tie_word_embeddings=False, **special)
        if arch == "qwen3":
            return Qwen3Config(head_dim=width // 2, **common)
        if arch == "phi3":
            return Phi3Config(partial_rotary_factor=0.5, **common)
        if arch == "llama3":
            rope = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=16)
            return LlamaConfig(rope_parameters=rope, **common)
        types = ["sliding_attention", "full_attention"] * layers
        gemma = dict(head_dim=width // 2, sliding_window=SLIDING_WINDOW, layer_types=types[:layers],
                     query_pre_attn_scalar=width // 4, **common)
        if arch == "gemma2":
            return Gemma2Config(attn_logit_softcapping=5.0, final_logit_softcapping=3.0, **gemma)
        rope = {"sliding_attention": dict(rope_type="default", rope_theta=10000.0),
                "full_attention": dict(rope_type="linear", factor=4.0, rope_theta=1e6)}
        return Gemma3TextConfig(rope_parameters=rope, final_logit_softcapping=3.0, **gemma)
    if arch in ("llama", "qwen2", "mistral"):
        cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch]
        extra = {"sliding_window": SLIDING_WINDOW} if arch == "mistral" else {}
        return cls(**extra, vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                   initializer_range=0.3, tie_word_embeddings=False, **special)
    raise ValueError(arch)


_MODEL = {"t5": T5ForConditionalGeneration, "bart": BartForConditionalGeneration, "marian": MarianMTModel,
          "gpt2": GPT2LMHeadModel, "llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM,
          "mistral": MistralForCausalLM, "qwen3": Qwen3ForCausalLM, "phi3": Phi3ForCausalLM, "llama3": LlamaForCausalLM,
          "gemma2": Gemma2ForCausalLM, "gemma3": Gemma3ForCausalLM}


def _plain_greedy(model):
    gen = model.generation_config
    make_plain_greedy(gen)
    gen.eos_token_id, gen.pad_token_id = EOS, PAD
    return model.eval()


def tiny_model(arch: str, seed: int, width: int = 32, layers: int = 2, enc_layers: int | None = None):
    torch.manual_seed(seed)
    return _plain_greedy(_MODEL[arch](_config(arch, width, layers, enc_layers)))


def tiny_pair(arch: str, seed: int):
    """A (large, small) pair. Odd seeds: an independent smaller model (disagrees often).
    Even seeds: a noisy copy of the large model (agrees often), so long accepted runs occur too."""
    large = tiny_model(arch, seed, width=32, layers=2)
    if seed % 2:
        return large, tiny_model(arch, seed + 10_000, width=16, layers=1)
    small = tiny_model(arch, seed, width=32, layers=2)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in small.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.15 * p.std().clamp(min=1e-3))
    return large, small


def random_prompt(seed: int, length: int = 6, batch: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=gen)


def hf_greedy(model, input_ids, attention_mask=None, max_new_tokens=16):
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False, num_beams=1,
                          max_new_tokens=max_new_tokens, eos_token_id=EOS, pad_token_id=PAD)


class ScriptedLM(nn.Module):
    """A decoder-only stub whose next-token distribution depends only on the absolute position.

    script[pos] = (token, probability): position pos is predicted as `token` with that probability, the
    rest spread evenly. It writes dummy keys/values so the real KV-cache code paths (crop) are exercised.
    """

    def __init__(self, script: dict[int, tuple[int, float]], vocab: int = 64, default=(3, 0.99)):
        super().__init__()
        self.script, self.vocab, self.default = script, vocab, default
        self.config = PretrainedConfig(vocab_size=vocab, eos_token_id=EOS, pad_token_id=PAD, num_hidden_layers=1,
                                       is_encoder_decoder=False)
        self.generation_config = GenerationConfig(eos_token_id=EOS, pad_token_id=PAD)
        self.name_or_path = "scripted"
        self._dummy = nn.Parameter(torch.zeros(1))
        self.calls = []  # tokens fed per call

    def get_output_embeddings(self):
        return None

    def row_logits(self, position: int) -> torch.Tensor:
        token, prob = self.script.get(position, self.default)
        rest = (1.0 - prob) / (self.vocab - 1)
        probs = torch.full((self.vocab,), rest)
        probs[token] = prob
        return probs.log()

    def forward(self, input_ids, past_key_values=None, use_cache=True, **kwargs):
        n = input_ids.shape[1]
        past = past_key_values.get_seq_length()
        self.calls.append(input_ids[0].tolist())
        past_key_values.update(torch.zeros(1, 1, n, 1), torch.zeros(1, 1, n, 1), layer_idx=0)
        # logits at input position p predict position p + 1
        logits = torch.stack([self.row_logits(past + i + 1) for i in range(n)])[None]
        return CausalLMOutputWithPast(logits=logits, past_key_values=past_key_values)


def nll(prob: float) -> float:
    return -math.log(prob)
