"""The Qwen-VL network: vision tower, resampler, language model, and the causal-LM root."""

from .causal_lm import QwenVLForCausalLM
from .qwenvl import QWenModel

__all__ = ["QWenModel", "QwenVLForCausalLM"]
