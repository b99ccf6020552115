"""BiLD decoding for any pair of Hugging Face models that share a vocabulary."""

from decode.baselines import AssistedGeneration, Greedy, HFGenerate
from decode.bild import BiLD, BiLDConfig
from decode.loading import load_model
from decode.early_exit import EarlyExitBiLD
from decode.generation import DecodeStats, GenerateOutput

__all__ = ["BiLD", "BiLDConfig", "Greedy", "HFGenerate", "AssistedGeneration", "DecodeStats", "GenerateOutput", "load_model", "EarlyExitBiLD"]
